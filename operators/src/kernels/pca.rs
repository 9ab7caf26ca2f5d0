//! Streaming PCA: a mergeable Gram-matrix state per partition, then an eigendecomposition.
//!
//! Rows are shifted by a fixed reference row before accumulation (so `X^T X - n mu mu^T` does
//! not cancel catastrophically when the mean is large). Accumulation runs in `f64` with a
//! sequential GEMM per chunk, so the result does not depend on the thread count.

use faer::linalg::matmul::triangular::{self, BlockStructure};
use faer::{Accum, Mat, MatRef, Par, Side};

/// Mergeable state of the PCA fit: count, shifted sums and shifted Gram matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct GramAccumulator {
    d: usize,
    shift: Vec<f64>,
    n: u64,
    sum: Vec<f64>,
    gram: Mat<f64>,
}

impl GramAccumulator {
    /// An empty state for `d` features, shifted by `shift` (e.g. the first input row).
    pub fn new(shift: Vec<f64>) -> Self {
        let d = shift.len();
        Self {
            d,
            shift,
            n: 0,
            sum: vec![0.0; d],
            gram: Mat::zeros(d, d),
        }
    }

    /// Bytes held (for memory accounting).
    pub fn size_bytes(d: usize) -> usize {
        (d * d + 2 * d) * 8
    }

    /// Adds the rows of a row-major `f32` chunk.
    pub fn update(&mut self, rows: &[f32]) {
        let d = self.d;
        if d == 0 || rows.is_empty() {
            return;
        }
        let r = rows.len() / d;
        let centred: Vec<f64> = rows
            .chunks_exact(d)
            .flat_map(|row| row.iter().zip(&self.shift).map(|(&v, &s)| v as f64 - s))
            .collect();
        for row in centred.chunks_exact(d) {
            for (acc, &v) in self.sum.iter_mut().zip(row) {
                *acc += v;
            }
        }
        let b = MatRef::from_row_major_slice(&centred, r, d);
        // The Gram matrix is symmetric: only its lower triangle is accumulated (half the
        // work), and every reader goes through `Self::entry`.
        triangular::matmul(
            self.gram.as_mut(),
            BlockStructure::TriangularLower,
            Accum::Add,
            b.transpose(),
            BlockStructure::Rectangular,
            b,
            BlockStructure::Rectangular,
            1.0,
            Par::Seq,
        );
        crate::kernels::clear_upper_simd_state();
        self.n += r as u64;
    }

    /// Entry `(i, j)` of the shifted Gram matrix (stored in the lower triangle).
    #[inline]
    fn entry(&self, i: usize, j: usize) -> f64 {
        if i >= j {
            self.gram[(i, j)]
        } else {
            self.gram[(j, i)]
        }
    }

    /// Merges another partition's state (same shift).
    pub fn merge(&mut self, other: &GramAccumulator) {
        assert_eq!(
            self.shift, other.shift,
            "merged PCA states must share the shift"
        );
        self.n += other.n;
        for (a, b) in self.sum.iter_mut().zip(&other.sum) {
            *a += b;
        }
        for j in 0..self.d {
            for i in 0..self.d {
                self.gram[(i, j)] += other.gram[(i, j)];
            }
        }
    }

    /// Merges a state accumulated around another shift: `other` is first re-centred on this
    /// state's shift `a` (from shift `b`, with `s_b = Σ(x − b)` and `δ = b − a`:
    /// `Σ(x−a)(x−a)ᵀ = Σ(x−b)(x−b)ᵀ + δ s_bᵀ + s_b δᵀ + n_b δδᵀ`, `Σ(x−a) = s_b + n_b δ`).
    pub fn merge_recentred(&mut self, other: &GramAccumulator) {
        assert_eq!(
            self.d, other.d,
            "merged PCA states must have the same width"
        );
        if self.shift == other.shift {
            self.merge(other);
            return;
        }
        let d = self.d;
        let nb = other.n as f64;
        let delta: Vec<f64> = other
            .shift
            .iter()
            .zip(&self.shift)
            .map(|(b, a)| b - a)
            .collect();
        for j in 0..d {
            for i in 0..d {
                self.gram[(i, j)] += other.gram[(i, j)]
                    + delta[i] * other.sum[j]
                    + other.sum[i] * delta[j]
                    + nb * delta[i] * delta[j];
            }
        }
        for ((acc, s), dl) in self.sum.iter_mut().zip(&other.sum).zip(&delta) {
            *acc += s + nb * dl;
        }
        self.n += other.n;
    }

    /// The state as flat parts: `(shift, n, sum, gram column-major)`, for serialising.
    pub fn to_parts(&self) -> (Vec<f64>, u64, Vec<f64>, Vec<f64>) {
        let d = self.d;
        let gram = (0..d * d).map(|k| self.entry(k % d, k / d)).collect();
        (self.shift.clone(), self.n, self.sum.clone(), gram)
    }

    /// The state from [`GramAccumulator::to_parts`]; `None` if the lengths do not agree.
    pub fn from_parts(shift: Vec<f64>, n: u64, sum: Vec<f64>, gram: Vec<f64>) -> Option<Self> {
        let d = shift.len();
        if sum.len() != d || gram.len() != d * d {
            return None;
        }
        Some(Self {
            d,
            shift,
            n,
            sum,
            gram: Mat::from_fn(d, d, |i, j| gram[j * d + i]),
        })
    }

    /// Number of rows seen.
    pub fn count(&self) -> u64 {
        self.n
    }

    /// Sample covariance (`n - 1` denominator) and mean.
    pub fn covariance(&self) -> (Mat<f64>, Vec<f64>) {
        let n = self.n.max(1) as f64;
        let mu_shifted: Vec<f64> = self.sum.iter().map(|s| s / n).collect();
        let denom = (self.n.max(2) - 1) as f64;
        let cov = Mat::from_fn(self.d, self.d, |i, j| {
            (self.entry(i, j) - n * mu_shifted[i] * mu_shifted[j]) / denom
        });
        let mean = mu_shifted
            .iter()
            .zip(&self.shift)
            .map(|(m, s)| m + s)
            .collect();
        (cov, mean)
    }

    /// Fits the top `p` principal axes.
    pub fn finish(&self, p: usize) -> PcaModel {
        let (cov, mean) = self.covariance();
        let d = self.d;
        let p = p.min(d);
        let eig = cov
            .self_adjoint_eigen(Side::Lower)
            .expect("eigendecomposition of the covariance");
        let (vals, vecs) = (eig.S().column_vector(), eig.U());
        let mut components = vec![0.0; p * d];
        let mut explained_variance = Vec::with_capacity(p);
        for c in 0..p {
            let col = d - 1 - c; // eigenvalues ascending
            explained_variance.push(vals[col].max(0.0));
            // Deterministic sign: the largest-magnitude loading is positive.
            let mut best = 0;
            for i in 0..d {
                if vecs[(i, col)].abs() > vecs[(best, col)].abs() {
                    best = i;
                }
            }
            let sign = if vecs[(best, col)] < 0.0 { -1.0 } else { 1.0 };
            for i in 0..d {
                components[c * d + i] = sign * vecs[(i, col)];
            }
        }
        PcaModel {
            d,
            p,
            mean,
            components,
            explained_variance,
        }
    }
}

/// A fitted PCA: mean and the top `p` axes (row-major `p x d`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PcaModel {
    /// Number of input features.
    pub d: usize,
    /// Number of components.
    pub p: usize,
    /// Feature means.
    pub mean: Vec<f64>,
    /// Principal axes, one per row.
    pub components: Vec<f64>,
    /// Variance along each axis.
    pub explained_variance: Vec<f64>,
}

impl PcaModel {
    /// Projects row-major rows (`r x d`) into `out` (`r x p`): `(x - mean) V^T`.
    ///
    /// Each output is the `f64` sum over features in feature order, so a row's projection has
    /// the same bits whichever block it is projected in. The loop runs over features outside
    /// and components inside (four rows at a time), which vectorises across components.
    pub fn project(&self, rows: &[f32], out: &mut [f32]) {
        let (d, p) = (self.d, self.p);
        if p == 0 {
            return;
        }
        // Axes transposed: feature-major `d x p`.
        let mut vt = vec![0.0f64; d * p];
        for c in 0..p {
            for f in 0..d {
                vt[f * p + c] = self.components[c * d + f];
            }
        }
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::distance::has_avx2() {
            // SAFETY: AVX2 is available (checked above).
            unsafe { project_avx2(&vt, &self.mean, d, p, rows, out) };
            return;
        }
        project_body(&vt, &self.mean, d, p, rows, out)
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn project_avx2(
    vt: &[f64],
    mean: &[f64],
    d: usize,
    p: usize,
    rows: &[f32],
    out: &mut [f32],
) {
    project_body(vt, mean, d, p, rows, out)
}

/// The projection loop (same operations in the same order with or without AVX2).
#[inline(always)]
fn project_body(vt: &[f64], mean: &[f64], d: usize, p: usize, rows: &[f32], out: &mut [f32]) {
    const R: usize = 4;
    let mut acc = vec![0.0f64; R * p];
    for (x, o) in rows.chunks(R * d.max(1)).zip(out.chunks_mut(R * p)) {
        let r = x.len() / d.max(1);
        acc.iter_mut().for_each(|v| *v = 0.0);
        for f in 0..d {
            let axis = &vt[f * p..(f + 1) * p];
            for k in 0..r {
                let t = x[k * d + f] as f64 - mean[f];
                for (a, &w) in acc[k * p..(k + 1) * p].iter_mut().zip(axis) {
                    *a += t * w;
                }
            }
        }
        for (dst, &v) in o.iter_mut().zip(&acc[..r * p]) {
            *dst = v as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn data(n: usize, d: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .flat_map(|_| {
                let t: f32 = rng.random::<f32>() * 10.0;
                let u: f32 = rng.random::<f32>();
                (0..d)
                    .map(move |f| {
                        100.0 + t * (f as f32 + 1.0) + u * if f % 2 == 0 { 1.0 } else { -1.0 }
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn covariance_matches_dense_reference_and_merges() {
        let (n, d) = (500, 6);
        let x = data(n, d, 1);
        let shift: Vec<f64> = x[..d].iter().map(|&v| v as f64).collect();
        let mut a = GramAccumulator::new(shift.clone());
        let mut b = GramAccumulator::new(shift.clone());
        a.update(&x[..d * 123]);
        b.update(&x[d * 123..]);
        a.merge(&b);
        let (cov, mean) = a.covariance();
        let mu: Vec<f64> = (0..d)
            .map(|f| (0..n).map(|i| x[i * d + f] as f64).sum::<f64>() / n as f64)
            .collect();
        for f in 0..d {
            assert!((mean[f] - mu[f]).abs() < 1e-9 * mu[f].abs());
            for g in 0..d {
                let want: f64 = (0..n)
                    .map(|i| (x[i * d + f] as f64 - mu[f]) * (x[i * d + g] as f64 - mu[g]))
                    .sum::<f64>()
                    / (n - 1) as f64;
                assert!(
                    (cov[(f, g)] - want).abs() <= 1e-8 * want.abs().max(1.0),
                    "{f},{g}"
                );
            }
        }
    }

    #[test]
    fn recentred_merge_and_parts_round_trip() {
        let (n, d) = (300, 4);
        let x: Vec<f32> = data(n, d, 11).iter().map(|v| v + 1000.0).collect();
        let mut whole = GramAccumulator::new(x[..d].iter().map(|&v| v as f64).collect());
        whole.update(&x);
        // Two halves with different shifts, merged, and a round trip through the parts.
        let mut a = GramAccumulator::new(x[..d].iter().map(|&v| v as f64).collect());
        a.update(&x[..150 * d]);
        let mut b = GramAccumulator::new(x[150 * d..151 * d].iter().map(|&v| v as f64).collect());
        b.update(&x[150 * d..]);
        let (shift, count, sum, gram) = b.to_parts();
        let b = GramAccumulator::from_parts(shift, count, sum, gram).unwrap();
        a.merge_recentred(&b);
        let ((ca, ma), (cw, mw)) = (a.covariance(), whole.covariance());
        for i in 0..d {
            assert!((ma[i] - mw[i]).abs() < 1e-9);
            for j in 0..d {
                assert!((ca[(i, j)] - cw[(i, j)]).abs() < 1e-9 * cw[(i, i)].abs().max(1.0));
            }
        }
        assert!(GramAccumulator::from_parts(vec![0.0; 2], 1, vec![0.0; 2], vec![0.0; 3]).is_none());
    }

    #[test]
    fn top_axis_and_projection() {
        let (n, d) = (400, 5);
        let x = data(n, d, 2);
        let mut acc = GramAccumulator::new(vec![0.0; d]);
        acc.update(&x);
        let model = acc.finish(2);
        // The dominant direction is proportional to (1, 2, 3, 4, 5).
        let norm = (1..=5).map(|v| (v * v) as f64).sum::<f64>().sqrt();
        for f in 0..d {
            assert!((model.components[f] - (f + 1) as f64 / norm).abs() < 1e-3);
        }
        assert!(model.explained_variance[0] > 100.0 * model.explained_variance[1]);
        // Projection equals the dense formula, and projected data has zero mean.
        let mut z = vec![0.0f32; n * 2];
        model.project(&x, &mut z);
        let mean0: f64 = (0..n).map(|i| z[i * 2] as f64).sum::<f64>() / n as f64;
        assert!(mean0.abs() < 1e-3);
        let want: f64 = (0..d)
            .map(|f| (x[f] as f64 - model.mean[f]) * model.components[f])
            .sum();
        assert!((z[0] as f64 - want).abs() < 1e-4);
    }

    #[test]
    fn chunking_does_not_change_the_state() {
        let x = data(300, 4, 3);
        let mut a = GramAccumulator::new(vec![1.0; 4]);
        a.update(&x);
        let mut b = GramAccumulator::new(vec![1.0; 4]);
        for c in x.chunks(4 * 64) {
            b.update(c);
        }
        let (ca, _) = a.covariance();
        let (cb, _) = b.covariance();
        for i in 0..4 {
            for j in 0..4 {
                assert!((ca[(i, j)] - cb[(i, j)]).abs() < 1e-9 * ca[(i, j)].abs().max(1.0));
            }
        }
    }
}
