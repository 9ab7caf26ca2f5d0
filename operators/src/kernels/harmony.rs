//! Harmony (Korsunsky et al. 2019) as harmonypy 2.1.0 computes it.
//!
//! Soft k-means on cosine-normalised embeddings with a diversity penalty per cluster and
//! batch, alternating with a mixture-of-experts ridge correction. This follows harmonypy
//! 2.1.0's C++ backend step for step, so that with the same seed it gives the same clusters
//! and (to float32 rounding) the same output:
//!
//! - state in `f32`; objective sums and the ridge solve in `f64`;
//! - one `std::mt19937` stream seeded with the seed (libstdc++'s `generate_canonical<float>`,
//!   Lemire's bounded integers and `std::shuffle`, reproduced here): `K` random picks and
//!   `K·N` uniforms for the k-means start (an exponential race weighted by the cosine
//!   distance to each pick, then 10 Lloyd steps), then one shuffle of the cells per
//!   assignment pass;
//! - diversity penalty `((2E + 1) / (O + E + 1))^θ` (harmony 2), blocks of 5 % of the cells
//!   grouped by batch, `O` and `E` kept incrementally;
//! - centroids are the intercepts of the per-cluster ridge regressions (λ = α·E per batch,
//!   intercept unpenalised), batches with a negligible share of a cluster left out of it;
//! - the assignment is reset without the penalty at the start of every iteration but the
//!   first; stop when `0 ≤ Δobjective / |objective| < ε` (default 1e-2) or after 10
//!   iterations.
//!
//! Matrices are cell-major: cell `j`'s coordinates are `z[j * d..(j + 1) * d]` (harmonypy's
//! column-major `d x N`), its assignments `r[j * K..(j + 1) * K]`.

// The K x B statistics (O, E, log-diversity) share one layout; index loops over clusters read
// clearer than zipped iterators over several of them.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use crate::error::{OperatorError, Result};

/// Harmony's parameters (harmonypy's defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct HarmonyParams {
    /// Number of clusters (default `min(round(N / 30), 100)`, Python's half-to-even round).
    pub clusters: Option<usize>,
    /// Diversity penalty θ for every batch (2).
    pub theta: f32,
    /// Soft k-means width σ for every cluster (0.1).
    pub sigma: f32,
    /// Ridge penalty per batch as a fraction of its expected cluster mass, λ = α·E (0.2).
    pub alpha: f32,
    /// Fraction of the cells updated per block (0.05).
    pub block_size: f32,
    /// Most Harmony iterations (10).
    pub max_iter_harmony: usize,
    /// Assignment passes per iteration (4).
    pub max_iter_kmeans: usize,
    /// Convergence of the assignment passes (1e-3).
    pub epsilon_cluster: f32,
    /// Convergence of the iterations (1e-2).
    pub epsilon_harmony: f32,
    /// A batch below this share of a cluster is left out of its regression (1e-5).
    pub batch_prop_cutoff: f32,
    /// Seed of the Mersenne Twister (harmonypy's `random_state`, default 0).
    pub seed: u32,
}

impl Default for HarmonyParams {
    fn default() -> Self {
        Self {
            clusters: None,
            theta: 2.0,
            sigma: 0.1,
            alpha: 0.2,
            block_size: 0.05,
            max_iter_harmony: 10,
            max_iter_kmeans: 4,
            epsilon_cluster: 1e-3,
            epsilon_harmony: 1e-2,
            batch_prop_cutoff: 1e-5,
            seed: 0,
        }
    }
}

/// harmonypy's default cluster count for `n` cells: `min(round(n / 30), 100)`.
pub fn default_clusters(n: usize) -> usize {
    ((n as f64 / 30.0).round_ties_even() as usize).min(100)
}

/// What Harmony returns.
#[derive(Debug, Clone)]
pub struct HarmonyOutput {
    /// Corrected embedding, cell-major `N x d`.
    pub z_corr: Vec<f32>,
    /// Clusters used.
    pub clusters: usize,
    /// Iterations run.
    pub iterations: usize,
    /// Whether the objective converged before the iteration limit.
    pub converged: bool,
    /// Objective after initialisation and after every iteration.
    pub objectives: Vec<f32>,
}

/// The 32-bit Mersenne Twister (`std::mt19937`).
#[derive(Clone)]
pub struct Mt19937 {
    state: Box<[u32; 624]>,
    index: usize,
}

impl Mt19937 {
    /// Seeded as `std::mt19937(seed)`.
    pub fn new(seed: u32) -> Self {
        let mut state = Box::new([0u32; 624]);
        state[0] = seed;
        for i in 1..624 {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self { state, index: 624 }
    }

    fn twist(&mut self) {
        const N: usize = 624;
        const M: usize = 397;
        let mix = |upper: u32, lower: u32, far: u32| {
            let y = (upper & 0x8000_0000) | (lower & 0x7fff_ffff);
            far ^ (y >> 1) ^ if y & 1 != 0 { 0x9908_b0df } else { 0 }
        };
        let s = &mut self.state;
        for i in 0..N - M {
            s[i] = mix(s[i], s[i + 1], s[i + M]);
        }
        for i in N - M..N - 1 {
            s[i] = mix(s[i], s[i + 1], s[i + M - N]);
        }
        s[N - 1] = mix(s[N - 1], s[0], s[M - 1]);
        self.index = 0;
    }

    /// The next 32-bit output.
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// libstdc++'s `uniform_real_distribution<float>(0, 1)`: one draw, `[0, 1)`.
    pub fn uniform01(&mut self) -> f32 {
        let u = self.next_u32() as f32 / 4_294_967_296.0f32;
        if u >= 1.0 {
            1.0 - f32::EPSILON / 2.0
        } else {
            u
        }
    }

    /// A uniform integer in `[0, range)` by Lemire's method, as libstdc++ draws it.
    fn below(&mut self, range: u64) -> u64 {
        let mut product = u64::from(self.next_u32()) * range;
        let mut low = product & 0xffff_ffff;
        if low < range {
            let threshold = ((1u64 << 32) - range) % range;
            while low < threshold {
                product = u64::from(self.next_u32()) * range;
                low = product & 0xffff_ffff;
            }
        }
        product >> 32
    }

    /// libstdc++'s `std::shuffle` of `v` with this generator.
    pub fn shuffle(&mut self, v: &mut [u32]) {
        let n = v.len() as u64;
        if n < 2 {
            return;
        }
        if (u32::MAX as u64) / n >= n {
            // Two positions per draw.
            let mut i = 1usize;
            if n.is_multiple_of(2) {
                let j = self.below(2) as usize;
                v.swap(1, j);
                i = 2;
            }
            while (i as u64) < n {
                let s = i as u64 + 1;
                let x = self.below(s * (s + 1));
                v.swap(i, (x / (s + 1)) as usize);
                v.swap(i + 1, (x % (s + 1)) as usize);
                i += 2;
            }
        } else {
            for i in 1..v.len() {
                let j = self.below(i as u64 + 1) as usize;
                v.swap(i, j);
            }
        }
    }
}

/// Scales every `dim`-long column to unit L2 norm (sum of squares in `f64`; zero columns stay).
fn unit_columns(x: &mut [f32], dim: usize) {
    x.par_chunks_mut(dim.max(1) * 1024).for_each(|block| {
        for column in block.chunks_mut(dim.max(1)) {
            let sum: f64 = column.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            if sum == 0.0 {
                continue;
            }
            let norm = sum.sqrt() as f32;
            column.iter_mut().for_each(|v| *v /= norm);
        }
    });
}

/// Sum in two interleaved lanes (even and odd positions), then added.
fn two_lane_sum(x: &[f32]) -> f32 {
    let (mut a, mut b) = (0.0f32, 0.0f32);
    let mut pairs = x.chunks_exact(2);
    for pair in &mut pairs {
        a += pair[0];
        b += pair[1];
    }
    if let [last] = pairs.remainder() {
        a += last;
    }
    a + b
}

/// Dot product in eight interleaved lanes, combined pairwise.
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        acc[i % 8] += x * y;
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

/// Softmax in place; `false` if the normaliser is not finite and positive.
fn softmax(x: &mut [f32]) -> bool {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    x.iter_mut().for_each(|v| *v = (*v - max).exp());
    let total = two_lane_sum(x);
    if !(total.is_finite() && total > 0.0) {
        return false;
    }
    x.iter_mut().for_each(|v| *v /= total);
    true
}

/// Cells per chunk of the fixed-order partial sums (harmonypy's task size).
const CHUNK: usize = 1024;

struct Harmony<'a> {
    n: usize,
    d: usize,
    k: usize,
    b: usize,
    z_orig: &'a [f32],
    batch: &'a [u32],
    /// Cells of each batch, ascending.
    batch_cells: Vec<Vec<u32>>,
    z_corr: Vec<f32>,
    y: Vec<f32>,
    r: Vec<f32>,
    dist: Vec<f32>,
    /// `O[k, b]` at `o[b * K + k]`; `E` likewise.
    o: Vec<f32>,
    e: Vec<f32>,
    pr_b: Vec<f32>,
    batch_sizes: Vec<f32>,
    sigma: Vec<f32>,
    theta: Vec<f32>,
    rng: Mt19937,
    params: HarmonyParams,
    objective_kmeans: Vec<f32>,
    objective_harmony: Vec<f32>,
}

/// Runs Harmony on the cell-major `N x d` embedding `z` with batch codes `batch` (in
/// `0..n_batches`, codes numbered in sorted label order as harmonypy does). `cancelled` is
/// polled between passes; `progress(iteration, objective)` is called after each iteration.
pub fn harmonize(
    z: &[f32],
    d: usize,
    batch: &[u32],
    n_batches: usize,
    params: &HarmonyParams,
    cancelled: &dyn Fn() -> bool,
    progress: &mut dyn FnMut(usize, f32),
) -> Result<HarmonyOutput> {
    let n = batch.len();
    if d == 0 || z.len() != n * d {
        return Err(OperatorError::InvalidParameter(format!(
            "Harmony needs an N x d embedding: {} values for {n} cells and {d} dimensions",
            z.len()
        )));
    }
    if z.iter().any(|v| !v.is_finite()) {
        return Err(OperatorError::BadInput(
            "Harmony's input embedding has non-finite values".into(),
        ));
    }
    let k = params.clusters.unwrap_or_else(|| default_clusters(n));
    if k < 1 {
        return Err(OperatorError::BadInput(format!(
            "Harmony needs at least one cluster: {n} cells give round(N / 30) = 0; set the \
             cluster count explicitly"
        )));
    }
    if k > n {
        return Err(OperatorError::InvalidParameter(format!(
            "Harmony: {k} clusters for {n} cells"
        )));
    }
    let mut h = Harmony::new(z, d, batch, n_batches, k, params.clone());
    h.init()?;
    for it in 1..=params.max_iter_harmony {
        if cancelled() {
            return Err(OperatorError::Cancelled);
        }
        h.cluster()?;
        h.correct()?;
        progress(it, *h.objective_harmony.last().unwrap());
        if h.converged() {
            return Ok(h.output(it, true));
        }
    }
    Ok(h.output(params.max_iter_harmony, false))
}

impl<'a> Harmony<'a> {
    fn new(
        z: &'a [f32],
        d: usize,
        batch: &'a [u32],
        b: usize,
        k: usize,
        params: HarmonyParams,
    ) -> Self {
        let n = batch.len();
        let mut batch_cells = vec![Vec::new(); b];
        for (j, &code) in batch.iter().enumerate() {
            batch_cells[code as usize].push(j as u32);
        }
        let batch_sizes: Vec<f32> = batch_cells.iter().map(|c| c.len() as f32).collect();
        let pr_b = batch_sizes.iter().map(|&s| s / n as f32).collect();
        Self {
            n,
            d,
            k,
            b,
            z_orig: z,
            batch,
            batch_cells,
            z_corr: z.to_vec(),
            y: vec![0.0; k * d],
            r: vec![0.0; n * k],
            dist: vec![0.0; n * k],
            o: vec![0.0; k * b],
            e: vec![0.0; k * b],
            pr_b,
            batch_sizes,
            sigma: vec![params.sigma; k],
            theta: vec![params.theta; b],
            rng: Mt19937::new(params.seed),
            params,
            objective_kmeans: Vec::new(),
            objective_harmony: Vec::new(),
        }
    }

    fn output(self, iterations: usize, converged: bool) -> HarmonyOutput {
        HarmonyOutput {
            z_corr: self.z_corr,
            clusters: self.k,
            iterations,
            converged,
            objectives: self.objective_harmony,
        }
    }

    fn init(&mut self) -> Result<()> {
        unit_columns(&mut self.z_corr, self.d);
        self.y = self.kmeans_init()?;
        unit_columns(&mut self.y, self.d);
        self.assign_without_diversity()?;
        self.rebuild_o_e();
        let obj = self.compute_objective();
        self.objective_kmeans.push(obj);
        self.objective_harmony.push(obj);
        Ok(())
    }

    /// Random picks, an exponential race for each start weighted by the cosine distance to
    /// its pick, then 10 Lloyd steps (over the cosine-normalised cells).
    fn kmeans_init(&mut self) -> Result<Vec<f32>> {
        let (n, d, k) = (self.n, self.d, self.k);
        let x = &self.z_corr;
        let mut y = vec![0.0f32; k * d];
        for i in 0..k {
            let idx = ((self.rng.uniform01() * n as f32).round() as usize).min(n - 1);
            y[i * d..(i + 1) * d].copy_from_slice(&x[idx * d..(idx + 1) * d]);
        }
        let mut chosen: Vec<usize> = Vec::with_capacity(k);
        let mut u = vec![0.0f32; n];
        let mut p = vec![0.0f32; n];
        for i in 0..k {
            u.iter_mut().for_each(|v| *v = self.rng.uniform01());
            let pick = y[i * d..(i + 1) * d].to_vec();
            p.par_iter_mut()
                .zip(x.par_chunks(d))
                .zip(u.par_iter())
                .for_each(|((p, cell), &u)| {
                    let distance = ((1.0f32 - dot8(&pick, cell)) * 2.0f32).abs();
                    *p = (-u.ln()) / (distance + 1e-10f32);
                });
            let max = parallel_max(&p);
            for &c in &chosen {
                p[c] = max;
            }
            let mut best = first_argmin(&p);
            while chosen.contains(&best) {
                p[best] = parallel_max(&p);
                best = first_argmin(&p);
            }
            chosen.push(best);
            y[i * d..(i + 1) * d].copy_from_slice(&x[best * d..(best + 1) * d]);
        }
        for _ in 0..10 {
            if !lloyd_step(&mut y, x, d, k) {
                return Err(OperatorError::BadInput(format!(
                    "Harmony's k-means start failed: more empty clusters than clusters to \
                     split ({k} clusters, {n} cells); lower the cluster count"
                )));
            }
        }
        Ok(y)
    }

    /// Cosine distances to the centroids and the softmax assignment without the penalty.
    fn assign_without_diversity(&mut self) -> Result<()> {
        let (d, k) = (self.d, self.k);
        // Centroids transposed (dimension-major), so each dimension updates all K dot
        // products at once; every dot product still sums its terms in dimension order.
        let y_t = transpose(&self.y, k, d);
        let sigma = &self.sigma;
        let ok = self
            .z_corr
            .par_chunks(d)
            .zip(self.dist.par_chunks_mut(k))
            .zip(self.r.par_chunks_mut(k))
            .map(|((x, dist), r)| {
                dist.iter_mut().for_each(|v| *v = 0.0);
                for (a, &xa) in x.iter().enumerate() {
                    let row = &y_t[a * k..(a + 1) * k];
                    for (acc, &yv) in dist.iter_mut().zip(row) {
                        *acc += xa * yv;
                    }
                }
                for c in 0..k {
                    dist[c] = 2.0f32 * (1.0f32 - dist[c]);
                    r[c] = (-dist[c]) / sigma[c];
                }
                softmax(r)
            })
            .reduce(|| true, |a, b| a && b);
        if ok {
            Ok(())
        } else {
            Err(numerical(
                "the assignment normalisers must be finite and positive",
            ))
        }
    }

    /// `E = rowsum(R)·Pr_b`, `O[:, b] = Σ_{j ∈ b} R[:, j]`.
    fn rebuild_o_e(&mut self) {
        let k = self.k;
        let mut totals = vec![0.0f32; k];
        for block in self.r.chunks(CHUNK * k) {
            let mut acc = vec![0.0f32; k];
            for r in block.chunks(k) {
                acc.iter_mut().zip(r).for_each(|(a, v)| *a += v);
            }
            totals.iter_mut().zip(&acc).for_each(|(t, a)| *t += a);
        }
        for b in 0..self.b {
            for c in 0..k {
                self.e[b * k + c] = totals[c] * self.pr_b[b];
            }
        }
        self.o.iter_mut().for_each(|v| *v = 0.0);
        for b in 0..self.b {
            for run in self.batch_cells[b].chunks(CHUNK) {
                let sums = sum_cells(&self.r, k, run);
                self.o[b * k..(b + 1) * k]
                    .iter_mut()
                    .zip(&sums)
                    .for_each(|(o, s)| *o += s);
            }
        }
    }

    fn cross_entropy(&self) -> f64 {
        let mut cross = 0.0f64;
        for b in 0..self.b {
            for c in 0..self.k {
                let e = self.e[b * self.k + c];
                let o = self.o[b * self.k + c];
                let ratio = (o + e + 1.0) / (2.0 * e + 1.0);
                let term = ratio.ln() * self.theta[b] * self.sigma[c] * o;
                cross += f64::from(term);
            }
        }
        cross
    }

    fn record_objective(&mut self, error: f64, entropy: f64) -> f32 {
        let norm = 2000.0f32 / self.n as f32;
        let cross = self.cross_entropy();
        let obj = (error as f32 + entropy as f32 + cross as f32) * norm;
        self.objective_kmeans.push(obj);
        obj
    }

    fn compute_objective(&mut self) -> f32 {
        let k = self.k;
        let sigma = &self.sigma;
        let partial: Vec<(f64, f64)> = self
            .r
            .par_chunks(CHUNK * k)
            .zip(self.dist.par_chunks(CHUNK * k))
            .map(|(r, dist)| {
                let (mut error, mut entropy) = (0.0f64, 0.0f64);
                for (rj, dj) in r.chunks(k).zip(dist.chunks(k)) {
                    for c in 0..k {
                        error += f64::from(rj[c]) * f64::from(dj[c]);
                        if rj[c] > 0.0 {
                            entropy += f64::from(sigma[c]) * f64::from(rj[c] * rj[c].ln());
                        }
                    }
                }
                (error, entropy)
            })
            .collect();
        let (error, entropy) = partial
            .iter()
            .fold((0.0, 0.0), |(a, b), (e, s)| (a + e, b + s));
        self.record_objective(error, entropy)
    }

    fn cluster(&mut self) -> Result<()> {
        if self.objective_harmony.len() > 1 {
            unit_columns(&mut self.z_corr, self.d);
            self.assign_without_diversity()?;
            self.rebuild_o_e();
        }
        for i in 0..self.params.max_iter_kmeans {
            let (error, entropy) = self.update_r()?;
            self.record_objective(error, entropy);
            if i > 3 && self.converged_kmeans() {
                break;
            }
        }
        let last = *self.objective_kmeans.last().unwrap();
        self.objective_harmony.push(last);
        Ok(())
    }

    fn converged_kmeans(&self) -> bool {
        let obj = &self.objective_kmeans;
        let len = obj.len();
        if len < 5 {
            return false;
        }
        let mut old = 0.0f32;
        let mut new = 0.0f32;
        for i in 0..3 {
            old += obj[len - 2 - i];
            new += obj[len - 1 - i];
        }
        ((old - new) / old).abs() < self.params.epsilon_cluster
    }

    fn converged(&self) -> bool {
        let obj = &self.objective_harmony;
        let (old, new) = (obj[obj.len() - 2], obj[obj.len() - 1]);
        if !old.is_finite() || !new.is_finite() {
            return false;
        }
        if old == 0.0 {
            return new == 0.0;
        }
        let delta = (old - new) / old.abs();
        delta >= 0.0 && delta < self.params.epsilon_harmony
    }

    /// One assignment pass over all cells in blocks, with `O` and `E` frozen per block.
    /// Returns the pass's k-means error and entropy terms.
    fn update_r(&mut self) -> Result<(f64, f64)> {
        let (n, k) = (self.n, self.k);
        let mut order: Vec<u32> = (0..n as u32).collect();
        self.rng.shuffle(&mut order);
        let n_blocks = (1.0f64 / f64::from(self.params.block_size)).ceil() as usize;
        let per_block = ((n as f32 * self.params.block_size) as usize).max(1);
        let (mut update_error, mut update_entropy) = (0.0f64, 0.0f64);
        let mut log_div = vec![0.0f32; k * self.b];
        let mut new_r: Vec<f32> = Vec::new();
        for i in 0..n_blocks {
            let lo = i * per_block;
            if lo >= n {
                break;
            }
            let hi = if i == n_blocks - 1 {
                n
            } else {
                ((i + 1) * per_block).min(n)
            };
            // Cells grouped by batch (stable), in runs of at most CHUNK of one batch.
            let block = group_by_batch(&order[lo..hi], self.batch, self.b);
            let runs = batch_runs(&block, self.batch);
            // Take the block out of O and E.
            let run_sums: Vec<Vec<f32>> = runs
                .par_iter()
                .map(|&(_, start, end)| sum_cells(&self.r, k, &block[start..end]))
                .collect();
            let mut totals = vec![0.0f32; k];
            for (&(b, _, _), sums) in runs.iter().zip(&run_sums) {
                for c in 0..k {
                    self.o[b * k + c] -= sums[c];
                    totals[c] += sums[c];
                }
            }
            for b in 0..self.b {
                for c in 0..k {
                    self.e[b * k + c] -= totals[c] * self.pr_b[b];
                }
            }
            for b in 0..self.b {
                for c in 0..k {
                    let e = self.e[b * k + c];
                    let o = self.o[b * k + c];
                    let twice = 2.0 * e;
                    log_div[b * k + c] = ((twice + 1.0).ln() - (o + e + 1.0).ln()) * self.theta[b];
                }
            }
            // Reassign the block's cells (independent given the frozen O, E), in parallel;
            // the per-run sums then add the cells in order.
            new_r.clear();
            new_r.resize(block.len() * k, 0.0);
            let terms: Vec<Option<(f64, f64)>> = new_r
                .par_chunks_mut(k * 64)
                .zip(block.par_chunks(64))
                .flat_map_iter(|(out, cells)| {
                    let mut terms = Vec::with_capacity(cells.len());
                    for (&j, rj) in cells.iter().zip(out.chunks_mut(k)) {
                        let b = self.batch[j as usize] as usize;
                        terms.push(reassign_cell(
                            &self.dist[j as usize * k..(j as usize + 1) * k],
                            &log_div[b * k..(b + 1) * k],
                            &self.sigma,
                            rj,
                        ));
                    }
                    terms
                })
                .collect();
            if terms.iter().any(Option::is_none) {
                return Err(numerical(
                    "the assignment normalisers must be finite and positive",
                ));
            }
            // Per run, in cell order: the new assignments' sums, error and entropy.
            let per_run: Vec<(Vec<f32>, f64, f64)> = runs
                .par_iter()
                .map(|&(_, start, end)| {
                    let mut sums = vec![0.0f32; k];
                    let (mut error, mut entropy) = (0.0f64, 0.0f64);
                    for pos in start..end {
                        let (cell_error, cell_entropy) = terms[pos].expect("checked");
                        let rj = &new_r[pos * k..(pos + 1) * k];
                        sums.iter_mut().zip(rj).for_each(|(s, &p)| *s += p);
                        error += cell_error;
                        entropy += cell_entropy;
                    }
                    (sums, error, entropy)
                })
                .collect();
            // Scatter the new rows into R (the block's cells are distinct).
            let rows = RowsPtr(self.r.as_mut_ptr());
            block
                .par_iter()
                .zip(new_r.par_chunks(k))
                .for_each(|(&j, rj)| {
                    let rows = &rows;
                    // SAFETY: every cell appears once in the block, so the rows written are
                    // disjoint, and `self.r` has N x K values.
                    unsafe {
                        std::ptr::copy_nonoverlapping(rj.as_ptr(), rows.0.add(j as usize * k), k)
                    };
                });
            let mut totals = vec![0.0f32; k];
            for (&(b, _, _), (sums, error, entropy)) in runs.iter().zip(&per_run) {
                for c in 0..k {
                    self.o[b * k + c] += sums[c];
                    totals[c] += sums[c];
                }
                update_error += error;
                update_entropy += entropy;
            }
            for b in 0..self.b {
                for c in 0..k {
                    self.e[b * k + c] += totals[c] * self.pr_b[b];
                }
            }
        }
        Ok((update_error, update_entropy))
    }

    /// The mixture-of-experts ridge correction: new centroids from the intercepts, and
    /// `Z_corr = Z_orig − Σ_k R[k, j]·M_b[:, k]`.
    fn correct(&mut self) -> Result<()> {
        let (d, k, nb) = (self.d, self.k, self.b);
        let cutoff = self.params.batch_prop_cutoff;
        let mut keeps: Vec<Vec<usize>> = Vec::with_capacity(k);
        let mut used = vec![false; nb];
        for c in 0..k {
            let kept: Vec<usize> = (0..nb)
                .filter(|&b| self.o[b * k + c] / self.batch_sizes[b] > cutoff)
                .collect();
            let kept = if kept.len() > 1 { kept } else { Vec::new() };
            for &b in &kept {
                used[b] = true;
            }
            keeps.push(kept);
        }
        // Per used batch: RZ[k, i] = Σ_{j ∈ b} R[k, j]·Z_orig[i, j] and o[k] = Σ R[k, j] (f64).
        let sums: Vec<Option<(Vec<f64>, Vec<f64>)>> = (0..nb)
            .into_par_iter()
            .map(|b| {
                if !used[b] {
                    return None;
                }
                // rz[i * K + c]: dimension-major, so each coordinate updates all K sums at
                // once; every sum still adds the cells in order.
                let mut rz = vec![0.0f64; k * d];
                let mut tot = vec![0.0f64; k];
                let mut r64 = vec![0.0f64; k];
                for &j in &self.batch_cells[b] {
                    let j = j as usize;
                    let r = &self.r[j * k..(j + 1) * k];
                    for ((t, w), &v) in tot.iter_mut().zip(r64.iter_mut()).zip(r) {
                        *w = f64::from(v);
                        *t += *w;
                    }
                    let z = &self.z_orig[j * d..(j + 1) * d];
                    for (i, &zi) in z.iter().enumerate() {
                        let zi = f64::from(zi);
                        for (acc, &w) in rz[i * k..(i + 1) * k].iter_mut().zip(&r64) {
                            *acc += w * zi;
                        }
                    }
                }
                Some((rz, tot))
            })
            .collect();
        // M_b[:, k], cluster-major: m[b][k * d + i].
        let mut m: Vec<Vec<f32>> = (0..nb)
            .map(|b| {
                if used[b] {
                    vec![0.0f32; k * d]
                } else {
                    Vec::new()
                }
            })
            .collect();
        for (c, kept) in keeps.iter().enumerate() {
            if kept.is_empty() {
                continue;
            }
            let mut s = 0.0f64;
            let mut rhs = vec![0.0f64; d];
            let mut diag = Vec::with_capacity(kept.len());
            for &b in kept {
                let (rz, tot) = sums[b].as_ref().expect("used batch");
                let o = tot[c];
                let lambda = f64::from(self.params.alpha * self.e[b * k + c]);
                diag.push(o + lambda);
                s += o;
                rhs.iter_mut()
                    .enumerate()
                    .for_each(|(i, r)| *r += rz[i * k + c]);
            }
            let largest = s;
            for (&b, &dd) in kept.iter().zip(&diag) {
                let (rz, tot) = sums[b].as_ref().expect("used batch");
                let o = tot[c];
                let scale = o / dd;
                s -= scale * o;
                rhs.iter_mut()
                    .enumerate()
                    .for_each(|(i, r)| *r -= scale * rz[i * k + c]);
            }
            if s.is_nan() || s <= 1e-10 * largest {
                return Err(numerical("the ridge system of a cluster is singular"));
            }
            let l = s.sqrt();
            let w0: Vec<f64> = rhs.iter().map(|v| (v / l) / l).collect();
            for (yi, w) in self.y[c * d..(c + 1) * d].iter_mut().zip(&w0) {
                *yi = *w as f32;
            }
            for (&b, &dd) in kept.iter().zip(&diag) {
                let (rz, tot) = sums[b].as_ref().expect("used batch");
                let o = tot[c];
                for i in 0..d {
                    m[b][c * d + i] = ((rz[i * k + c] - o * w0[i]) / dd) as f32;
                }
            }
        }
        let r = &self.r;
        let z_orig = self.z_orig;
        let batch = self.batch;
        self.z_corr
            .par_chunks_mut(d)
            .enumerate()
            .for_each(|(j, out)| {
                let z = &z_orig[j * d..(j + 1) * d];
                let mb = &m[batch[j] as usize];
                if mb.is_empty() {
                    out.copy_from_slice(z);
                    return;
                }
                let mut sum = vec![0.0f32; d];
                let rj = &r[j * k..(j + 1) * k];
                for c in 0..k {
                    let direction = &mb[c * d..(c + 1) * d];
                    for (s, &v) in sum.iter_mut().zip(direction) {
                        *s += v * rj[c];
                    }
                }
                for ((o, &zv), s) in out.iter_mut().zip(z).zip(&sum) {
                    *o = zv - s;
                }
            });
        unit_columns(&mut self.y, d);
        Ok(())
    }
}

/// One Lloyd step (assign to the nearest mean, recompute means; an empty mean takes the
/// last member of a live mean, as harmonypy's Armadillo-compatible step does). `false` if
/// it cannot refill the empty means.
fn lloyd_step(means: &mut [f32], x: &[f32], d: usize, k: usize) -> bool {
    // Means transposed: each dimension updates the running sums of all K means at once.
    // Per mean, even dimensions go to one sum and odd ones to another, in dimension order
    // (harmonypy's two-lane distance).
    let means_t = transpose(means, k, d);
    let assignment: Vec<usize> = x
        .par_chunks(d)
        .map_init(
            || (vec![0.0f32; k], vec![0.0f32; k]),
            |(acc1, acc2), cell| {
                acc1.iter_mut().for_each(|v| *v = 0.0);
                acc2.iter_mut().for_each(|v| *v = 0.0);
                for (a, &xa) in cell.iter().enumerate() {
                    let row = &means_t[a * k..(a + 1) * k];
                    // The last, unpaired dimension of an odd d goes to the first lane.
                    let acc = if a % 2 == 0 { &mut *acc1 } else { &mut *acc2 };
                    for (s, &m) in acc.iter_mut().zip(row) {
                        let t = xa - m;
                        *s += t * t;
                    }
                }
                let mut best = 0usize;
                let mut best_dist = f32::INFINITY;
                for g in 0..k {
                    let dist = acc1[g] + acc2[g];
                    if dist < best_dist {
                        best_dist = dist;
                        best = g;
                    }
                }
                best
            },
        )
        .collect();
    let mut sums = vec![0.0f32; k * d];
    let mut counts = vec![0usize; k];
    let mut last_cell = vec![0usize; k];
    for (j, &g) in assignment.iter().enumerate() {
        counts[g] += 1;
        last_cell[g] = j;
        sums[g * d..(g + 1) * d]
            .iter_mut()
            .zip(&x[j * d..(j + 1) * d])
            .for_each(|(s, v)| *s += v);
    }
    let mut new_means = vec![0.0f32; k * d];
    for g in 0..k {
        if counts[g] >= 1 {
            for i in 0..d {
                new_means[g * d + i] = sums[g * d + i] / counts[g] as f32;
            }
        }
    }
    let dead: Vec<usize> = (0..k).filter(|&g| counts[g] == 0).collect();
    if !dead.is_empty() {
        let live: Vec<usize> = (0..k).rev().filter(|&g| counts[g] >= 2).collect();
        if live.len() < dead.len() {
            return false;
        }
        for (&dead_g, &live_g) in dead.iter().zip(&live) {
            if live_g == dead_g {
                return false;
            }
            let cell = last_cell[live_g];
            new_means[dead_g * d..(dead_g + 1) * d].copy_from_slice(&x[cell * d..(cell + 1) * d]);
        }
    }
    if new_means.iter().any(|v| !v.is_finite()) {
        return false;
    }
    means.copy_from_slice(&new_means);
    true
}

/// A raw pointer to R's rows, shared by the threads that write distinct rows.
struct RowsPtr(*mut f32);
// SAFETY: only used to write disjoint rows from several threads.
unsafe impl Sync for RowsPtr {}

/// Largest value (exact in any order).
fn parallel_max(p: &[f32]) -> f32 {
    p.par_chunks(1 << 14)
        .map(|c| c.iter().copied().fold(f32::NEG_INFINITY, f32::max))
        .reduce(|| f32::NEG_INFINITY, f32::max)
}

/// Index of the first smallest value.
fn first_argmin(p: &[f32]) -> usize {
    let chunk = 1 << 14;
    let best: Vec<(f32, usize)> = p
        .par_chunks(chunk)
        .enumerate()
        .map(|(c, values)| {
            let mut best = 0;
            for (j, &v) in values.iter().enumerate() {
                if v < values[best] {
                    best = j;
                }
            }
            (values[best], c * chunk + best)
        })
        .collect();
    let mut winner = best[0];
    for &candidate in &best[1..] {
        if candidate.0 < winner.0 {
            winner = candidate;
        }
    }
    winner.1
}

/// `cells` stably grouped by batch (batch ascending, input order within a batch), by counting.
fn group_by_batch(cells: &[u32], batch: &[u32], n_batches: usize) -> Vec<u32> {
    let mut offsets = vec![0usize; n_batches + 1];
    let codes: Vec<u32> = cells.iter().map(|&j| batch[j as usize]).collect();
    for &b in &codes {
        offsets[b as usize + 1] += 1;
    }
    for b in 0..n_batches {
        offsets[b + 1] += offsets[b];
    }
    let mut out = vec![0u32; cells.len()];
    for (&j, &b) in cells.iter().zip(&codes) {
        out[offsets[b as usize]] = j;
        offsets[b as usize] += 1;
    }
    out
}

/// Row-major `rows x cols` to row-major `cols x rows`.
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = x[r * cols + c];
        }
    }
    t
}

/// `Σ_{j ∈ cells} R[:, j]` in cell order.
fn sum_cells(r: &[f32], k: usize, cells: &[u32]) -> Vec<f32> {
    let mut acc = vec![0.0f32; k];
    for &j in cells {
        acc.iter_mut()
            .zip(&r[j as usize * k..(j as usize + 1) * k])
            .for_each(|(a, v)| *a += v);
    }
    acc
}

/// `(batch, start, end)` runs of at most [`CHUNK`] cells of one batch over batch-sorted cells.
fn batch_runs(block: &[u32], batch: &[u32]) -> Vec<(usize, usize, usize)> {
    let mut runs = Vec::new();
    let mut start = 0;
    while start < block.len() {
        let b = batch[block[start] as usize];
        let mut end = start;
        while end < block.len() && batch[block[end] as usize] == b {
            end += 1;
        }
        let mut s = start;
        while s < end {
            let e = (s + CHUNK).min(end);
            runs.push((b as usize, s, e));
            s = e;
        }
        start = end;
    }
    runs
}

/// New assignments of one cell into `r` with the penalty `log_div` of its batch frozen;
/// its k-means error and entropy terms, or `None` if the normaliser is not finite and positive.
fn reassign_cell(
    dist: &[f32],
    log_div: &[f32],
    sigma: &[f32],
    r: &mut [f32],
) -> Option<(f64, f64)> {
    let k = r.len();
    for c in 0..k {
        r[c] = (-dist[c]) / sigma[c] + log_div[c];
    }
    let max = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let (mut weighted, mut weighted_shifted) = (0.0f64, 0.0f64);
    for c in 0..k {
        let shifted = r[c] - max;
        let e = shifted.exp();
        r[c] = e;
        let w = f64::from(sigma[c]) * f64::from(e);
        weighted += w;
        weighted_shifted += w * f64::from(shifted);
    }
    let total = two_lane_sum(r);
    if !(total.is_finite() && total > 0.0) {
        return None;
    }
    let mut error = 0.0f64;
    for c in 0..k {
        let p = r[c] / total;
        r[c] = p;
        error += f64::from(p) * f64::from(dist[c]);
    }
    let entropy = (weighted_shifted - f64::from(total).ln() * weighted) / f64::from(total);
    Some((error, entropy))
}

fn numerical(what: &str) -> OperatorError {
    OperatorError::BadInput(format!(
        "Harmony numerical error: {what} (try a larger sigma or fewer clusters)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mersenne_twister_matches_the_standard() {
        // C++11 [rand.predef]: the 10000th output of a default-constructed mt19937 is
        // 4123659995.
        let mut rng = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = rng.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
        // Seed 0's first output (numpy.random.RandomState(0)'s MT19937 state is the same).
        assert_eq!(Mt19937::new(0).next_u32(), 2_357_136_044);
    }

    #[test]
    fn uniforms_and_shuffles_are_in_range_and_permutations() {
        let mut rng = Mt19937::new(1);
        for _ in 0..1000 {
            let u = rng.uniform01();
            assert!((0.0..1.0).contains(&u));
        }
        for n in [1usize, 2, 3, 10, 11] {
            let mut v: Vec<u32> = (0..n as u32).collect();
            rng.shuffle(&mut v);
            let mut sorted = v.clone();
            sorted.sort();
            assert_eq!(sorted, (0..n as u32).collect::<Vec<_>>());
        }
    }

    #[test]
    fn default_cluster_count_rounds_half_to_even() {
        assert_eq!(default_clusters(45), 2);
        assert_eq!(default_clusters(75), 2);
        assert_eq!(default_clusters(3000), 100);
        assert_eq!(default_clusters(632), 21);
        assert_eq!(default_clusters(10), 0);
    }

    #[test]
    fn lanes_and_softmax() {
        assert_eq!(two_lane_sum(&[1.0, 2.0, 3.0]), 6.0);
        assert_eq!(dot8(&[1.0; 9], &[2.0; 9]), 18.0);
        let mut x = [0.0f32, 0.0];
        assert!(softmax(&mut x));
        assert_eq!(x, [0.5, 0.5]);
    }

    /// Two batches offset by a constant along every axis, each a mix of two tight groups:
    /// Harmony must bring the batch means together and keep the groups apart.
    #[test]
    fn removes_a_batch_shift_and_keeps_groups() {
        let mut rng = Mt19937::new(3);
        let (n, d) = (400usize, 5usize);
        let mut z = Vec::with_capacity(n * d);
        let mut batch = Vec::with_capacity(n);
        let mut group = Vec::with_capacity(n);
        for j in 0..n {
            let b = (j % 2) as u32;
            let g = (j / 2) % 2;
            // Groups along two axes; batch 1 is shifted along two others.
            let centre = if g == 0 {
                [4.0, 1.0, 0.0, 0.0, 0.0]
            } else {
                [1.0, 4.0, 0.0, 0.0, 0.0]
            };
            let shift = if b == 1 {
                [0.0, 0.0, 1.0, 0.5, 0.0]
            } else {
                [0.0; 5]
            };
            for i in 0..d {
                z.push(centre[i] + shift[i] + (rng.uniform01() - 0.5) * 0.6);
            }
            batch.push(b);
            group.push(g);
        }
        let params = HarmonyParams {
            clusters: Some(4),
            ..HarmonyParams::default()
        };
        let out = harmonize(&z, d, &batch, 2, &params, &|| false, &mut |_, _| {}).unwrap();
        let mean = |x: &[f32], b: u32, g: usize| {
            let rows: Vec<usize> = (0..n).filter(|&j| batch[j] == b && group[j] == g).collect();
            (0..d)
                .map(|i| rows.iter().map(|&j| x[j * d + i]).sum::<f32>() / rows.len() as f32)
                .collect::<Vec<f32>>()
        };
        let gap = |x: &[f32], g: usize| {
            let (a, b) = (mean(x, 0, g), mean(x, 1, g));
            a.iter()
                .zip(&b)
                .map(|(p, q)| (p - q).powi(2))
                .sum::<f32>()
                .sqrt()
        };
        for g in 0..2 {
            assert!(
                gap(&out.z_corr, g) < 0.3 * gap(&z, g),
                "batch gap of group {g}: {} -> {}",
                gap(&z, g),
                gap(&out.z_corr, g)
            );
        }
        // Groups stay far apart.
        let (m0, m1) = (mean(&out.z_corr, 0, 0), mean(&out.z_corr, 0, 1));
        assert!((m0[0] - m1[0]).abs() > 2.5, "{m0:?} {m1:?}");
        // Same seed, same bits.
        let again = harmonize(&z, d, &batch, 2, &params, &|| false, &mut |_, _| {}).unwrap();
        assert_eq!(out.z_corr, again.z_corr);
        assert!(out.objectives.iter().all(|o| o.is_finite()));
    }

    #[test]
    fn rejects_bad_shapes_and_values() {
        let params = HarmonyParams::default();
        let none = &|| false;
        assert!(harmonize(&[1.0; 5], 2, &[0, 1], 2, &params, none, &mut |_, _| {}).is_err());
        let z = [f32::NAN, 1.0, 2.0, 3.0];
        assert!(harmonize(&z, 2, &[0, 1], 2, &params, none, &mut |_, _| {}).is_err());
        // Too few cells for the default cluster count.
        let z = [1.0, 0.0, 0.0, 1.0];
        let err = harmonize(&z, 2, &[0, 1], 2, &params, none, &mut |_, _| {}).unwrap_err();
        assert!(err.to_string().contains("at least one cluster"), "{err}");
    }
}
