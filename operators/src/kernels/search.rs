//! Which landmarks keep a point: blocked `f32` distances as a matrix product, then the exact
//! `f64` rule for the candidates.
//!
//! A landmark `l` keeps point `j` of batch `b` when `s = d2(z_l, z_j) / sigma2_{l,b} < t_l`
//! ([`Landmark::affinity`], `f64`, the same bits as in the sampling loop). For a block of
//! points, `||z - z_l||^2` is first estimated for every landmark as
//! `||z~||^2 + ||z~_l||^2 - 2 z~ . z~_l` from one `f32` matrix product over coordinates centred
//! on the landmarks' mean. The estimate's error is bounded by
//! `(2p + 16) 2^-24 (||z~||^2 + ||z~_l||^2)` (rounding of the centred coordinates and of the
//! dot products, whatever the summation order), so a landmark whose estimate exceeds its radius
//! `t_l sigma2_{l,b}` by more than that bound cannot keep the point; every other landmark is
//! checked with the exact rule. The entries found are exactly the nonzero entries of the
//! column, in landmark order.
//!
//! Points no landmark keeps can get their *nearest* landmark (smallest scaled distance, exact
//! `f64`, ties to the lower index) instead: the fallback for rows outside the sample the
//! landmarks were drawn from.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};
use rayon::prelude::*;

use crate::kernels::landmark::Landmark;

/// Points per block of the distance product (fixed: results do not depend on threads).
const BLOCK: usize = 256;

/// Precomputed landmark data for [`LandmarkSearch::entries`].
#[derive(Debug, Clone)]
pub struct LandmarkSearch {
    m: usize,
    p: usize,
    center: Vec<f32>,
    /// Centred coordinates, row-major `m x p`.
    coords: Vec<f32>,
    norms: Vec<f64>,
    /// `(1 - margin) ||z~_l||^2`: the landmark's part of the estimate's lower bound.
    norms_low: Vec<f64>,
    /// `t_l * sigma2_{l,b}` (batch-major `batches x m`), slightly widened.
    radius2: Vec<f64>,
    /// `1 / sigma2_{l,b}` (batch-major) for the nearest-landmark fallback.
    inv_sigma2: Vec<f64>,
}

/// Nonzero column entries of a block of points.
#[derive(Debug, Clone, Default)]
pub struct ColumnEntries {
    /// Row `r`'s entries are `items[offsets[r]..offsets[r + 1]]`.
    pub offsets: Vec<usize>,
    /// `(landmark, A_lj)` in landmark order.
    pub items: Vec<(u32, f64)>,
    /// For rows without entries (when asked for): their nearest landmark, else `u32::MAX`.
    pub nearest: Vec<u32>,
}

impl ColumnEntries {
    /// Entries of row `r`.
    pub fn row(&self, r: usize) -> &[(u32, f64)] {
        &self.items[self.offsets[r]..self.offsets[r + 1]]
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }
}

/// One block's result: end offset of each row's entries, the entries, nearest per row.
type BlockEntries = (Vec<usize>, Vec<(u32, f64)>, Vec<u32>);

/// Error bound factor of the `f32` estimate (see the module docs).
fn margin_factor(p: usize) -> f64 {
    (2 * p + 16) as f64 * (1.0 / 16_777_216.0)
}

impl LandmarkSearch {
    /// Prepares the search over `landmarks` (all with the same number of batches).
    pub fn new(landmarks: &[Landmark]) -> Self {
        let m = landmarks.len();
        let p = landmarks.first().map_or(0, |l| l.coords.len());
        let batches = landmarks.first().map_or(0, |l| l.scales.len());
        let mut center = vec![0.0f64; p];
        for l in landmarks {
            for (c, &v) in center.iter_mut().zip(&l.coords) {
                *c += v as f64;
            }
        }
        let center: Vec<f32> = center
            .iter()
            .map(|&c| (c / m.max(1) as f64) as f32)
            .collect();
        let coords: Vec<f32> = landmarks
            .iter()
            .flat_map(|l| l.coords.iter().zip(&center).map(|(&v, &c)| v - c))
            .collect();
        let norms: Vec<f64> = if p == 0 {
            vec![0.0; m]
        } else {
            coords
                .chunks(p)
                .map(|r| r.iter().map(|&v| (v as f64) * (v as f64)).sum())
                .collect()
        };
        let factor = margin_factor(p);
        let norms_low = norms.iter().map(|&n| (1.0 - factor) * n).collect();
        let mut radius2 = vec![0.0; m * batches];
        let mut inv_sigma2 = vec![0.0; m * batches];
        for (l, lm) in landmarks.iter().enumerate() {
            assert_eq!(lm.scales.len(), batches, "landmarks disagree on batches");
            for (b, s) in lm.scales.iter().enumerate() {
                radius2[b * m + l] = lm.threshold * s.sigma2 * (1.0 + 1e-9) + 1e-30;
                inv_sigma2[b * m + l] = 1.0 / s.sigma2;
            }
        }
        Self {
            m,
            p,
            center,
            coords,
            norms,
            norms_low,
            radius2,
            inv_sigma2,
        }
    }

    /// Number of landmarks.
    pub fn landmarks(&self) -> usize {
        self.m
    }

    /// Finds the entries of the points `z` (row-major, `p` columns) in batches `batch`:
    /// kept entries in landmark order, and with `nearest` the nearest landmark of every point
    /// no landmark keeps.
    pub fn entries(
        &self,
        landmarks: &[Landmark],
        z: &[f32],
        batch: &[u32],
        nearest: bool,
        out: &mut ColumnEntries,
    ) {
        let p = self.p.max(1);
        let n = batch.len();
        assert_eq!(z.len(), n * self.p, "coordinates do not match the batches");
        let blocks: Vec<BlockEntries> = (0..n.div_ceil(BLOCK))
            .into_par_iter()
            .map(|b| {
                let (r0, r1) = (b * BLOCK, ((b + 1) * BLOCK).min(n));
                self.block(landmarks, &z[r0 * p..r1 * p], &batch[r0..r1], nearest)
            })
            .collect();
        out.offsets.clear();
        out.items.clear();
        out.nearest.clear();
        out.offsets.push(0);
        for (counts, items, near) in blocks {
            let base = out.items.len();
            out.offsets.extend(counts.iter().map(|&c| base + c));
            out.items.extend_from_slice(&items);
            out.nearest.extend_from_slice(&near);
        }
    }

    /// One block: (end offset of each row's entries, entries, nearest per row).
    fn block(
        &self,
        landmarks: &[Landmark],
        z: &[f32],
        batch: &[u32],
        nearest: bool,
    ) -> BlockEntries {
        let (m, p, r) = (self.m, self.p, batch.len());
        let mut ends = Vec::with_capacity(r);
        let mut items = Vec::new();
        let mut near = vec![u32::MAX; r];
        if m == 0 || r == 0 {
            ends.resize(r, 0);
            return (ends, items, near);
        }
        let centred: Vec<f32> = z
            .chunks_exact(p.max(1))
            .flat_map(|row| row.iter().zip(&self.center).map(|(&v, &c)| v - c))
            .collect();
        let row_norms: Vec<f64> = centred
            .chunks_exact(p.max(1))
            .map(|row| row.iter().map(|&v| (v as f64) * (v as f64)).sum())
            .collect();
        // Column i: the dot products of point i with every landmark (contiguous).
        let mut dots = Mat::<f32>::zeros(m, r);
        if p > 0 {
            matmul(
                dots.as_mut(),
                Accum::Replace,
                MatRef::from_row_major_slice(&self.coords, m, p),
                MatRef::from_row_major_slice(&centred, r, p).transpose(),
                1.0f32,
                Par::Seq,
            );
        }
        crate::kernels::clear_upper_simd_state();
        let factor = margin_factor(p);
        let mut candidates: Vec<u32> = Vec::with_capacity(m);
        for i in 0..r {
            let zi = &z[i * p..(i + 1) * p];
            let b = batch[i] as usize;
            let nz = row_norms[i];
            let col = dots.col_as_slice(i);
            // Lower bound of the squared distance: (1 - f)(||z~||^2 + ||z~_l||^2) - 2 z~.z~_l.
            let base = (1.0 - factor) * nz;
            let radius = &self.radius2[b * m..(b + 1) * m];
            candidates.clear();
            for (l, ((&dot, &nl), &r2)) in col.iter().zip(&self.norms_low).zip(radius).enumerate() {
                if base + nl - 2.0 * (dot as f64) < r2 {
                    candidates.push(l as u32);
                }
            }
            let start = items.len();
            for &l in &candidates {
                let a = landmarks[l as usize].affinity(zi, b);
                if a > 0.0 {
                    items.push((l, a));
                }
            }
            ends.push(items.len());
            if nearest && items.len() == start {
                // Upper bound of the best scaled distance, then exact checks of every
                // landmark whose lower bound does not exceed it.
                let inv = &self.inv_sigma2[b * m..(b + 1) * m];
                let bounds = |l: usize| {
                    let estimate = nz + self.norms[l] - 2.0 * col[l] as f64;
                    let margin = factor * (nz + self.norms[l]) + 1e-30;
                    (
                        (estimate - margin).max(0.0) * inv[l],
                        (estimate + margin).max(0.0) * inv[l],
                    )
                };
                let best_upper = (0..m).map(|l| bounds(l).1).fold(f64::INFINITY, f64::min);
                let mut best = (f64::INFINITY, u32::MAX);
                for (l, landmark) in landmarks.iter().enumerate().take(m) {
                    if bounds(l).0 <= best_upper * (1.0 + 1e-9) {
                        let s = landmark.scaled_distance(zi, b);
                        if s < best.0 {
                            best = (s, l as u32);
                        }
                    }
                }
                near[i] = best.1;
            }
        }
        (ends, items, near)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ElbowRule;
    use crate::kernels::elbow::ElbowParams;
    use crate::kernels::landmark::{RowBlocks, SamplingParams, sample_landmarks};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn brute(landmarks: &[Landmark], z: &[f32], b: usize) -> Vec<(u32, f64)> {
        landmarks
            .iter()
            .enumerate()
            .filter_map(|(l, lm)| {
                let a = lm.affinity(z, b);
                (a > 0.0).then_some((l as u32, a))
            })
            .collect()
    }

    fn sampled(
        n: usize,
        p: usize,
        offset: f32,
        seed: u64,
    ) -> (Vec<f32>, Vec<usize>, Vec<Landmark>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Far from the origin, so the centring matters for the f32 estimate.
        let x: Vec<f32> = (0..n * p)
            .map(|i| offset + ((i / p) % 7) as f32 * 2.0 + rng.random::<f32>() * 1.5)
            .collect();
        let offsets = vec![0, n / 3, 2 * n / 3, n];
        let z = RowBlocks::new(vec![&x], p);
        let params = SamplingParams {
            k: 10,
            block: 20,
            tau: 30,
            max_landmarks: 10_000,
            seed: 3,
            elbow: ElbowParams {
                rule: ElbowRule::Kneedle,
                a_min: 1e-8,
                bins: 4096,
                r_min: 11,
                min_threshold: 0.0,
            },
        };
        let r = sample_landmarks(&z, &offsets, &params, None, &|| false, &mut |_, _| {}).unwrap();
        (x, offsets, r.landmarks)
    }

    #[test]
    fn finds_exactly_the_nonzero_entries() {
        for (p, offset) in [(6, 0.0f32), (3, 1000.0), (40, 50.0)] {
            let n = 1500;
            let (x, offsets, landmarks) = sampled(n, p, offset, p as u64);
            let search = LandmarkSearch::new(&landmarks);
            let batch: Vec<u32> = (0..n)
                .map(|j| (offsets.partition_point(|&o| o <= j) - 1) as u32)
                .collect();
            let mut out = ColumnEntries::default();
            search.entries(&landmarks, &x, &batch, false, &mut out);
            let mut total = 0;
            for j in 0..n {
                let want = brute(&landmarks, &x[j * p..(j + 1) * p], batch[j] as usize);
                assert_eq!(out.row(j), want.as_slice(), "p {p} column {j}");
                total += want.len();
            }
            let nnz: usize = landmarks.iter().map(|l| l.kept).sum();
            assert_eq!(total, nnz, "p {p}");
        }
    }

    #[test]
    fn nearest_fallback_is_the_exact_minimum() {
        let (p, n) = (5, 900);
        let (x, offsets, landmarks) = sampled(n, p, 10.0, 9);
        // A few landmarks only, so many points are outside every kept ball.
        let few: Vec<Landmark> = landmarks.into_iter().take(3).collect();
        let search = LandmarkSearch::new(&few);
        let batch: Vec<u32> = (0..n)
            .map(|j| (offsets.partition_point(|&o| o <= j) - 1) as u32)
            .collect();
        let mut out = ColumnEntries::default();
        search.entries(&few, &x, &batch, true, &mut out);
        let mut fallbacks = 0;
        for j in 0..n {
            let zj = &x[j * p..(j + 1) * p];
            if out.row(j).is_empty() {
                fallbacks += 1;
                let want = (0..few.len())
                    .map(|l| (few[l].scaled_distance(zj, batch[j] as usize), l))
                    .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)))
                    .unwrap()
                    .1;
                assert_eq!(out.nearest[j], want as u32, "point {j}");
            } else {
                assert_eq!(out.nearest[j], u32::MAX);
            }
        }
        assert!(fallbacks > 0);
    }

    #[test]
    fn results_do_not_depend_on_the_block_split() {
        let (p, n) = (4, 700);
        let (x, offsets, landmarks) = sampled(n, p, 3.0, 4);
        let search = LandmarkSearch::new(&landmarks);
        let batch: Vec<u32> = (0..n)
            .map(|j| (offsets.partition_point(|&o| o <= j) - 1) as u32)
            .collect();
        let mut whole = ColumnEntries::default();
        search.entries(&landmarks, &x, &batch, true, &mut whole);
        let mut parts = ColumnEntries::default();
        for (a, b) in [(0, 1), (1, 300), (300, 700)] {
            search.entries(&landmarks, &x[a * p..b * p], &batch[a..b], true, &mut parts);
            for r in 0..b - a {
                assert_eq!(parts.row(r), whole.row(a + r));
                assert_eq!(parts.nearest[r], whole.nearest[a + r]);
            }
        }
    }
}
