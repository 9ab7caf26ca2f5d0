//! Two-dimensional embeddings for pictures: a UMAP layout of a fuzzy neighbour graph and a
//! PCA projection.
//!
//! Both are deterministic: the UMAP optimisation runs on one thread with a seeded generator,
//! and the PCA accumulates its covariance over fixed row blocks with sequential linear algebra.

use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::evd::{ComputeEigenvectors, self_adjoint_evd, self_adjoint_evd_scratch};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::error::{MetricsError, Result, ensure_finite};
use crate::types::CsrGraph;

/// UMAP curve parameter `a` for `min_dist = 0.1`, `spread = 1`: the value umap-learn's
/// `find_ab_params` fits (least squares of `1 / (1 + a d^(2b))` against the offset exponential).
pub const UMAP_A: f64 = 1.576_943_460_405_378;

/// UMAP curve parameter `b` for `min_dist = 0.1`, `spread = 1` (see [`UMAP_A`]).
pub const UMAP_B: f64 = 0.895_060_878_122_785_9;

/// Negative samples drawn per positive sample (umap-learn's `negative_sample_rate`).
const NEGATIVE_SAMPLE_RATE: f64 = 5.0;
/// Learning rate at the first epoch, decayed linearly to zero.
const INITIAL_LEARNING_RATE: f64 = 1.0;
/// Weight of the repulsive term (umap-learn's `repulsion_strength`, gamma).
const REPULSION_STRENGTH: f64 = 1.0;
/// Each gradient component is clipped to `[-GRADIENT_CLIP, GRADIENT_CLIP]`.
const GRADIENT_CLIP: f64 = 4.0;
/// The initial layout is scaled into `[0, INIT_BOX]` per coordinate, as umap-learn does.
const INIT_BOX: f64 = 10.0;
/// Half-width of the uniform jitter added to the initial layout (breaks exact ties).
const INIT_JITTER: f64 = 1e-4;
/// Orthogonal-iteration steps of the spectral initialisation.
const SPECTRAL_INIT_ITERATIONS: usize = 100;
/// Rows per block when accumulating the PCA covariance.
const PCA_BLOCK_ROWS: usize = 1024;

/// Lays out the nodes of a fuzzy neighbour graph in 2-D with UMAP (McInnes et al. 2018).
///
/// `graph` holds the symmetric UMAP connectivities (weights in `(0, 1]`); every stored entry
/// `(i, j)` is one attractive edge, as in umap-learn, so a symmetric graph pulls each pair from
/// both ends. The optimisation follows umap-learn's `optimize_layout_euclidean`: edges lighter
/// than `max_weight / n_epochs` are dropped, each edge is sampled once every
/// `max_weight / weight` epochs, each positive sample draws 5 uniformly random negative nodes,
/// the learning rate decays linearly from 1 to 0, gradient components are clipped at 4, and
/// the curve parameters are [`UMAP_A`], [`UMAP_B`] (`min_dist = 0.1`, `spread = 1`).
///
/// Initialisation: a cheap spectral layout, the two leading non-trivial eigenvectors of the
/// normalised adjacency `D^-1/2 W D^-1/2` approximated by 100 steps of seeded orthogonal
/// iteration (`O(100 nnz)`, instead of an exact sparse eigen-solve), scaled into `[0, 10]` per
/// coordinate with a `1e-4` jitter. A coordinate that comes out constant is drawn uniformly.
///
/// Two deliberate departures from umap-learn, for speed: the optimisation runs in `f32` with a
/// polynomial `powf` (relative error below 1e-5), and the negative samples of one positive sample
/// are all evaluated at the same head position and their (clipped) steps summed, instead of being
/// applied one after another.
///
/// Runs on one thread (the sparse products of the initialisation use rayon, row by row, which
/// does not change their results), so the output is bit-identical for a given `seed`. Cost: about
/// `n_epochs * sum(weight / max_weight) * 6` gradient evaluations; for 100k nodes x 25 neighbours
/// x 200 epochs (~1e9 evaluations) about 40 CPU-seconds were measured on a shared 2-core
/// machine (release build), so callers may want to subsample larger inputs.
///
/// Errors: fewer than two nodes, a malformed CSR structure, negative or non-finite weights,
/// `n_epochs == 0`, or no positive off-diagonal weight.
pub fn umap_layout(graph: &CsrGraph, n_epochs: usize, seed: u64) -> Result<Vec<[f64; 2]>> {
    validate_graph(graph)?;
    if n_epochs == 0 {
        return Err(MetricsError::InvalidInput(
            "umap_layout needs at least one epoch".into(),
        ));
    }
    let edges = SampledEdges::from_graph(graph, n_epochs)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut coords = spectral_init(graph, &mut rng);
    optimize_layout(&mut coords, &edges, n_epochs, &mut rng);
    Ok(coords
        .iter()
        .map(|&[x, y]| [f64::from(x), f64::from(y)])
        .collect())
}

/// Checks the CSR structure, index range and weights of `graph`.
fn validate_graph(graph: &CsrGraph) -> Result<()> {
    let n = graph.n;
    if n < 2 {
        return Err(MetricsError::InvalidInput(format!(
            "umap_layout needs at least 2 nodes, got {n}"
        )));
    }
    if u32::try_from(n).is_err() {
        return Err(MetricsError::InvalidInput(format!(
            "umap_layout supports at most {} nodes, got {n}",
            u32::MAX
        )));
    }
    if graph.indptr.len() != n + 1 {
        return Err(MetricsError::InvalidInput(format!(
            "graph indptr has {} entries, expected n + 1 = {}",
            graph.indptr.len(),
            n + 1
        )));
    }
    if graph.indices.len() != graph.weights.len() {
        return Err(MetricsError::InvalidInput(format!(
            "graph has {} indices but {} weights",
            graph.indices.len(),
            graph.weights.len()
        )));
    }
    if graph.indptr[0] != 0
        || graph.indptr[n] != graph.indices.len()
        || graph.indptr.windows(2).any(|w| w[0] > w[1])
    {
        return Err(MetricsError::InvalidInput(
            "graph indptr must start at 0, be non-decreasing and end at nnz".into(),
        ));
    }
    if let Some(&bad) = graph.indices.iter().find(|&&j| j as usize >= n) {
        return Err(MetricsError::InvalidInput(format!(
            "graph column index {bad} out of range for {n} nodes"
        )));
    }
    if let Some(&bad) = graph.weights.iter().find(|w| !w.is_finite() || **w < 0.0) {
        return Err(MetricsError::InvalidInput(format!(
            "graph weights must be finite and non-negative, found {bad}"
        )));
    }
    Ok(())
}

/// The attractive edges of the optimisation with their sampling schedule.
struct SampledEdges {
    /// Node moved by the edge.
    heads: Vec<u32>,
    /// Node it is pulled towards.
    tails: Vec<u32>,
    /// Epochs between two samples of the edge: `max_weight / weight`.
    epochs_per_sample: Vec<f64>,
}

impl SampledEdges {
    /// Collects the off-diagonal entries heavier than `max_weight / n_epochs`, in CSR order.
    fn from_graph(graph: &CsrGraph, n_epochs: usize) -> Result<Self> {
        let mut max_weight = 0.0f64;
        for i in 0..graph.n {
            let (cols, weights) = graph.row(i);
            for (&j, &w) in cols.iter().zip(weights) {
                if j as usize != i {
                    max_weight = max_weight.max(w);
                }
            }
        }
        if max_weight <= 0.0 {
            return Err(MetricsError::InvalidInput(
                "graph has no positive off-diagonal weight to lay out".into(),
            ));
        }
        let threshold = max_weight / n_epochs as f64;
        let mut edges = Self {
            heads: Vec::new(),
            tails: Vec::new(),
            epochs_per_sample: Vec::new(),
        };
        for i in 0..graph.n {
            let (cols, weights) = graph.row(i);
            for (&j, &w) in cols.iter().zip(weights) {
                if j as usize != i && w > 0.0 && w >= threshold {
                    // `i < n <= u32::MAX` was checked by `validate_graph`.
                    edges.heads.push(i as u32);
                    edges.tails.push(j);
                    edges.epochs_per_sample.push(max_weight / w);
                }
            }
        }
        Ok(edges)
    }
}

/// A uniform node index in `0..n` from 32 random bits (multiply-shift; `n <= u32::MAX`).
fn random_node(rng: &mut ChaCha8Rng, n: usize) -> usize {
    ((u64::from(rng.next_u32()) * n as u64) >> 32) as usize
}

/// The stochastic gradient descent of umap-learn's `optimize_layout_euclidean`, in place.
///
/// Works in `f32`, as umap-learn does (the layout only needs picture precision), with
/// [`fast_pow`] in place of `powf`, which dominated the loop.
fn optimize_layout(
    coords: &mut [[f32; 2]],
    edges: &SampledEdges,
    n_epochs: usize,
    rng: &mut ChaCha8Rng,
) {
    let n = coords.len();
    let (a, b) = (UMAP_A as f32, UMAP_B as f32);
    let attraction_scale = -2.0 * a * b;
    let repulsion_scale = 2.0 * REPULSION_STRENGTH as f32 * b;
    let clip_at = GRADIENT_CLIP as f32;
    let epochs_per_negative_sample: Vec<f64> = edges
        .epochs_per_sample
        .iter()
        .map(|e| e / NEGATIVE_SAMPLE_RATE)
        .collect();
    let mut next_sample = edges.epochs_per_sample.clone();
    let mut next_negative_sample = epochs_per_negative_sample.clone();

    for epoch in 0..n_epochs {
        let epoch_f = epoch as f64;
        let alpha = (INITIAL_LEARNING_RATE * (1.0 - epoch_f / n_epochs as f64)) as f32;
        for e in 0..edges.heads.len() {
            if next_sample[e] > epoch_f {
                continue;
            }
            let head = edges.heads[e] as usize;
            let tail = edges.tails[e] as usize;
            let [mut hx, mut hy] = coords[head];

            // Attraction, applied to both ends of the edge.
            let (dx, dy) = (hx - coords[tail][0], hy - coords[tail][1]);
            let dist2 = dx * dx + dy * dy;
            if dist2 > 0.0 {
                let pow_b = fast_pow(dist2, b);
                // -2ab d^(2(b-1)) / (1 + a d^(2b)), with d^(2(b-1)) = d^(2b) / d^2.
                let coeff = attraction_scale * (pow_b / dist2) / (a * pow_b + 1.0);
                let gx = (coeff * dx).clamp(-clip_at, clip_at) * alpha;
                let gy = (coeff * dy).clamp(-clip_at, clip_at) * alpha;
                hx += gx;
                hy += gy;
                coords[tail][0] -= gx;
                coords[tail][1] -= gy;
            }
            next_sample[e] += edges.epochs_per_sample[e];

            // Repulsion from uniformly drawn nodes, moving the head only. All negatives of this
            // sample see the same head position and their steps are summed (umap-learn applies
            // them one after another): that removes a serial dependency between them and makes
            // the loop several times faster, for a difference of order alpha^2 per step.
            let owed = (epoch_f - next_negative_sample[e]) / epochs_per_negative_sample[e];
            let n_negative = if owed > 0.0 { owed as usize } else { 0 };
            let (mut push_x, mut push_y) = (0.0f32, 0.0f32);
            for _ in 0..n_negative {
                let other = random_node(rng, n);
                if other == head {
                    continue;
                }
                let (dx, dy) = (hx - coords[other][0], hy - coords[other][1]);
                let dist2 = dx * dx + dy * dy;
                if dist2 > 0.0 {
                    let coeff =
                        repulsion_scale / ((0.001 + dist2) * (a * fast_pow(dist2, b) + 1.0));
                    push_x += (coeff * dx).clamp(-clip_at, clip_at);
                    push_y += (coeff * dy).clamp(-clip_at, clip_at);
                }
            }
            hx += push_x * alpha;
            hy += push_y * alpha;
            coords[head] = [hx, hy];
            next_negative_sample[e] += n_negative as f64 * epochs_per_negative_sample[e];
        }
    }
}

/// Coefficients of `log2(1 + t) ~ t (L1 + t (L2 + ...))` on `t` in `[0, 1)` (least squares at
/// Chebyshev nodes, max error 2.5e-6).
const LOG2_POLY: [f32; 6] = [
    1.442_534_8,
    -0.718_033_2,
    0.457_156_13,
    -0.277_337_22,
    0.121_468_53,
    -0.025_790_712,
];
/// Coefficients of `2^f ~ 1 + f (E1 + f (E2 + ...))` on `f` in `[0, 1)` (max error 1.2e-7).
const EXP2_POLY: [f32; 5] = [
    0.693_152_5,
    0.240_152_43,
    0.055_836_644,
    0.008_972_839,
    0.001_885_431_4,
];

/// `x^y` for `x > 0` via polynomial `log2` / `exp2` (relative error below 1e-5 where the result
/// is a normal `f32`; `x` below the smallest normal `f32` is raised to it). Only `f32` adds and
/// multiplies, so the result is bit-identical on every platform, unlike libm's `powf`, and
/// several times faster.
fn fast_pow(x: f32, y: f32) -> f32 {
    let bits = x.max(f32::MIN_POSITIVE).to_bits();
    let exponent = ((bits >> 23) & 0xff) as i32 - 127;
    let t = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000) - 1.0;
    let [l1, l2, l3, l4, l5, l6] = LOG2_POLY;
    let log2 = exponent as f32 + t * (l1 + t * (l2 + t * (l3 + t * (l4 + t * (l5 + t * l6)))));
    let power = (y * log2).clamp(-126.0, 127.999_99);
    let mut whole = power as i32;
    if whole as f32 > power {
        whole -= 1;
    }
    let f = power - whole as f32;
    let [e1, e2, e3, e4, e5] = EXP2_POLY;
    let fraction = 1.0 + f * (e1 + f * (e2 + f * (e3 + f * (e4 + f * e5))));
    f32::from_bits(((whole + 127) as u32) << 23) * fraction
}

/// Approximate spectral layout (see [`umap_layout`]), scaled into `[0, INIT_BOX]` per coordinate.
fn spectral_init(graph: &CsrGraph, rng: &mut ChaCha8Rng) -> Vec<[f32; 2]> {
    let n = graph.n;
    let degree: Vec<f64> = (0..n).map(|i| graph.row(i).1.iter().sum()).collect();
    let inv_sqrt_degree: Vec<f64> = degree
        .iter()
        .map(|&d| if d > 0.0 { 1.0 / d.sqrt() } else { 0.0 })
        .collect();
    // The trivial eigenvector of D^-1/2 W D^-1/2 (eigenvalue 1), normalised.
    let mut trivial: Vec<f64> = degree.iter().map(|d| d.sqrt()).collect();
    normalize(&mut trivial);

    let mut basis: [Vec<f64>; 2] =
        std::array::from_fn(|_| (0..n).map(|_| rng.random_range(-1.0..1.0)).collect());
    let mut product = vec![0.0; n];
    for _ in 0..SPECTRAL_INIT_ITERATIONS {
        for k in 0..2 {
            // (I + D^-1/2 W D^-1/2) / 2: same eigenvectors, spectrum shifted into [0, 1].
            let column = &basis[k];
            product.par_iter_mut().enumerate().for_each(|(i, out)| {
                let (cols, weights) = graph.row(i);
                let mut sum = 0.0;
                for (&j, &w) in cols.iter().zip(weights) {
                    sum += w * inv_sqrt_degree[j as usize] * column[j as usize];
                }
                *out = 0.5 * (column[i] + inv_sqrt_degree[i] * sum);
            });
            std::mem::swap(&mut basis[k], &mut product);
            remove_component(&mut basis[k], &trivial);
            if k == 1 {
                let (first, second) = basis.split_at_mut(1);
                remove_component(&mut second[0], &first[0]);
            }
            normalize(&mut basis[k]);
        }
    }

    let mut coords = vec![[0.0f32; 2]; n];
    for (k, column) in basis.iter().enumerate() {
        let (lo, hi) = column
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        let range = hi - lo;
        let usable = range.is_finite() && range > 1e-12 * lo.abs().max(hi.abs()).max(1e-300);
        for (i, &v) in column.iter().enumerate() {
            let scaled = if usable {
                INIT_BOX * (v - lo) / range
            } else {
                rng.random_range(0.0..INIT_BOX)
            };
            coords[i][k] = (scaled + rng.random_range(-INIT_JITTER..INIT_JITTER)) as f32;
        }
    }
    coords
}

/// Subtracts from `v` its projection on the unit vector `unit`.
fn remove_component(v: &mut [f64], unit: &[f64]) {
    let dot: f64 = v.iter().zip(unit).map(|(a, b)| a * b).sum();
    v.iter_mut().zip(unit).for_each(|(a, b)| *a -= dot * b);
}

/// Scales `v` to unit norm (leaves a zero vector as is).
fn normalize(v: &mut [f64]) {
    let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|a| *a /= norm);
    }
}

/// Projects the rows of a row-major `n x d` matrix on its top two principal components.
///
/// The rows are centred; the components are the two leading eigenvectors of the `d x d`
/// covariance (faer's symmetric eigensolver, sequential, so results do not depend on the thread
/// count), each with its sign fixed so that its largest-magnitude loading is positive (the first
/// such loading on ties). Returns one `[pc1, pc2]` score pair per row.
///
/// Errors: `d < 2`, fewer than two rows, a length that is not a multiple of `d`, non-finite values,
/// or an eigensolver failure.
pub fn pca_2d(x: &[f64], d: usize) -> Result<Vec<[f64; 2]>> {
    if d < 2 {
        return Err(MetricsError::InvalidInput(format!(
            "pca_2d needs at least 2 features, got {d}"
        )));
    }
    if !x.len().is_multiple_of(d) {
        return Err(MetricsError::InvalidInput(format!(
            "embedding length {} is not a multiple of d = {d}",
            x.len()
        )));
    }
    let n = x.len() / d;
    if n < 2 {
        return Err(MetricsError::InvalidInput(format!(
            "pca_2d needs at least 2 rows, got {n}"
        )));
    }
    ensure_finite(x, d)?;

    let mut mean = vec![0.0; d];
    for row in x.chunks_exact(d) {
        mean.iter_mut().zip(row).for_each(|(m, v)| *m += v);
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);

    // Covariance (up to the 1 / (n - 1) factor) accumulated over fixed row blocks.
    let mut scatter = Mat::<f64>::zeros(d, d);
    let mut block = Mat::<f64>::zeros(PCA_BLOCK_ROWS.min(n), d);
    for rows in x.chunks(PCA_BLOCK_ROWS * d) {
        let m = rows.len() / d;
        for (r, row) in rows.chunks_exact(d).enumerate() {
            for c in 0..d {
                block[(r, c)] = row[c] - mean[c];
            }
        }
        let centered = block.as_ref().subrows(0, m);
        matmul(
            scatter.as_mut(),
            Accum::Add,
            centered.transpose(),
            centered,
            1.0,
            Par::Seq,
        );
        crate::simd::clear_upper_simd_state();
    }

    let components = top_two_eigenvectors(scatter.as_ref())?;
    let scores = x
        .par_chunks(d)
        .map(|row| {
            let mut score = [0.0; 2];
            for (k, component) in components.iter().enumerate() {
                score[k] = row
                    .iter()
                    .zip(&mean)
                    .zip(component)
                    .map(|((v, m), w)| (v - m) * w)
                    .sum();
            }
            score
        })
        .collect();
    Ok(scores)
}

/// The eigenvectors of the two largest eigenvalues of a symmetric matrix, sign-fixed so that the
/// largest-magnitude entry of each is positive.
fn top_two_eigenvectors(symmetric: MatRef<'_, f64>) -> Result<[Vec<f64>; 2]> {
    let d = symmetric.nrows();
    let mut vectors = Mat::<f64>::zeros(d, d);
    let mut values = Diag::<f64>::zeros(d);
    let mut scratch = MemBuffer::new(self_adjoint_evd_scratch::<f64>(
        d,
        ComputeEigenvectors::Yes,
        Par::Seq,
        Default::default(),
    ));
    self_adjoint_evd(
        symmetric,
        values.as_mut(),
        Some(vectors.as_mut()),
        Par::Seq,
        MemStack::new(&mut scratch),
        Default::default(),
    )
    .map_err(|e| MetricsError::Numeric(format!("covariance eigen-decomposition failed: {e:?}")))?;
    // Eigenvalues come in non-decreasing order.
    Ok(std::array::from_fn(|k| {
        let mut v: Vec<f64> = vectors.col(d - 1 - k).iter().copied().collect();
        let mut pivot = 0;
        for (i, a) in v.iter().enumerate() {
            if a.abs() > v[pivot].abs() {
                pivot = i;
            }
        }
        if v[pivot] < 0.0 {
            v.iter_mut().for_each(|a| *a = -*a);
        }
        v
    }))
}

#[cfg(test)]
mod tests {
    use super::fast_pow;

    #[test]
    fn fast_pow_matches_powf() {
        let mut x = 1e-30f32;
        while x < 1e30 {
            for y in [super::UMAP_B as f32, 0.5, 1.0, 2.0, -0.7] {
                let exact = f64::from(x).powf(f64::from(y));
                if exact > f64::from(f32::MIN_POSITIVE) && exact < f64::from(f32::MAX) {
                    let rel = (f64::from(fast_pow(x, y)) - exact).abs() / exact;
                    assert!(rel < 1e-5, "{x}^{y}: {} vs {exact}", fast_pow(x, y));
                }
            }
            x *= 1.37;
        }
        assert_eq!(fast_pow(1.0, super::UMAP_B as f32), 1.0);
    }
}
