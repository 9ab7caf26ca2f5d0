//! Sphering (ZCA whitening) fitted on negative controls, as pycytominer 1.7.1's `Spherize`
//! computes it (the formula the Arevalo et al. benchmark vendored).
//!
//! With `mu` the mean of the fit rows, `s` their standard deviation (ddof 0; 1 for plain
//! ZCA) and `Z = (X_fit - mu) / s`, let `Z^T Z = V diag(S^2) V^T`. Then
//! `W = V diag(sqrt(n - 1) / (S + eps)) V^T` and every row becomes `((x - mu) / s) W`.
//! Epsilon is added to the *singular values* `S_i = sqrt(n l_i)`, not to the eigenvalues
//! (`shared/golden/sphering/README.md` explains how far this is from the textbook form). When
//! the fit rows do not span every direction (n <= d, or collinear features), the missing
//! singular values repeat the smallest nonzero one, as pycytominer pads them.
//!
//! [`SpheringAccumulator`] collects the mean and the shifted Gram matrix in one streaming pass
//! (chunks in input order, sequential GEMM, so the result does not depend on the thread
//! count); [`SpheringAccumulator::fit`] decomposes the `d x d` matrix with faer.

use faer::{Mat, Side};

use crate::error::{OperatorError, Result};

/// Which whitening.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, serde::Serialize, serde::Deserialize,
)]
pub enum SpheringMethod {
    /// ZCA on the centred features.
    Zca,
    /// ZCA on the centred and standardised features (ZCA-cor; the default).
    ZcaCor,
}

impl std::fmt::Display for SpheringMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Zca => "zca",
            Self::ZcaCor => "zca-cor",
        })
    }
}

/// Mean and Gram matrix of the fit rows, shifted by the first row for accuracy.
#[derive(Debug, Clone)]
pub struct SpheringAccumulator {
    d: usize,
    n: u64,
    shift: Option<Vec<f64>>,
    sum: Vec<f64>,
    gram: Mat<f64>,
}

/// A fitted whitening: `y = ((x - mean) / scale) W`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SpheringModel {
    /// Mean of the fit rows.
    pub mean: Vec<f64>,
    /// Standard deviation of the fit rows (ddof 0) for ZCA-cor; ones for ZCA.
    pub scale: Vec<f64>,
    /// The `d x d` whitening matrix, row-major.
    pub w: Vec<f64>,
    /// Singular values `S` used (descending, after padding).
    pub singular_values: Vec<f64>,
    /// Rows the model was fitted on.
    pub n: u64,
}

impl SpheringAccumulator {
    /// An empty accumulator over `d` features.
    pub fn new(d: usize) -> Self {
        Self {
            d,
            n: 0,
            shift: None,
            sum: vec![0.0; d],
            gram: Mat::zeros(d, d),
        }
    }

    /// Bytes held (for memory accounting).
    pub fn size_bytes(d: usize) -> usize {
        (d * d + 3 * d) * 8
    }

    /// A state from sums around `shift`: `n` rows, `sum = sum (x - shift)` and the Gram matrix
    /// `sum (x - shift)(x - shift)^T` (column-major `d x d`). `None` if the sizes disagree.
    pub fn from_parts(shift: Vec<f64>, n: u64, sum: Vec<f64>, gram: Vec<f64>) -> Option<Self> {
        let d = shift.len();
        if sum.len() != d || gram.len() != d * d {
            return None;
        }
        Some(Self {
            d,
            n,
            shift: (n > 0).then_some(shift),
            sum,
            gram: Mat::from_fn(d, d, |i, j| gram[j * d + i]),
        })
    }

    /// Rows added so far.
    pub fn count(&self) -> u64 {
        self.n
    }

    /// Adds a chunk of fit rows (row-major, `d` values each).
    pub fn add_rows(&mut self, rows: &[f64]) {
        let d = self.d;
        assert_eq!(rows.len() % d.max(1), 0);
        let r = rows.len() / d.max(1);
        if r == 0 {
            return;
        }
        let shift = self.shift.get_or_insert_with(|| rows[..d].to_vec());
        let chunk = Mat::from_fn(r, d, |i, j| rows[i * d + j] - shift[j]);
        for i in 0..r {
            for j in 0..d {
                self.sum[j] += chunk[(i, j)];
            }
        }
        faer::linalg::matmul::matmul(
            self.gram.as_mut(),
            faer::Accum::Add,
            chunk.transpose(),
            chunk.as_ref(),
            1.0,
            faer::Par::Seq,
        );
        crate::kernels::clear_upper_simd_state();
        self.n += r as u64;
    }

    /// Fits the whitening. `names` name the features in errors.
    pub fn fit(
        &self,
        method: SpheringMethod,
        epsilon: f64,
        names: &[String],
    ) -> Result<SpheringModel> {
        let d = self.d;
        if self.n < 2 {
            return Err(OperatorError::BadInput(format!(
                "sphering is fitted on the negative controls, and {} row(s) matched; it needs \
                 at least 2",
                self.n
            )));
        }
        let n = self.n as f64;
        let shift = self.shift.as_ref().expect("rows were added");
        let m_shifted: Vec<f64> = self.sum.iter().map(|s| s / n).collect();
        // Population covariance (ddof 0).
        let cov = Mat::from_fn(d, d, |i, j| {
            self.gram[(i, j)] / n - m_shifted[i] * m_shifted[j]
        });
        let mean: Vec<f64> = m_shifted.iter().zip(shift).map(|(m, s)| m + s).collect();
        let scale: Vec<f64> = match method {
            SpheringMethod::Zca => vec![1.0; d],
            SpheringMethod::ZcaCor => {
                let s: Vec<f64> = (0..d).map(|i| cov[(i, i)].max(0.0).sqrt()).collect();
                if let Some(i) = (0..d).find(|&i| s[i] == 0.0) {
                    return Err(OperatorError::BadInput(format!(
                        "feature '{}' is constant over the negative controls; ZCA-cor \
                         standardises by their spread (drop the feature or use --sphering zca)",
                        names.get(i).map_or("?", String::as_str)
                    )));
                }
                s
            }
        };
        // Z^T Z = n * (scaled covariance).
        let gram_z = Mat::from_fn(d, d, |i, j| n * cov[(i, j)] / (scale[i] * scale[j]));
        let eig = gram_z.self_adjoint_eigen(Side::Lower).map_err(|e| {
            OperatorError::BadInput(format!("sphering eigen-decomposition failed: {e:?}"))
        })?;
        let values = eig.S().column_vector();
        let vectors = eig.U();
        let mut order: Vec<usize> = (0..d).collect();
        order.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
        let mut s: Vec<f64> = order.iter().map(|&c| values[c].max(0.0).sqrt()).collect();
        // numpy.linalg.matrix_rank's tolerance on singular values of the n x d matrix Z.
        let tol =
            s.first().copied().unwrap_or(0.0) * (self.n as usize).max(d) as f64 * f64::EPSILON;
        let rank = s
            .iter()
            .take((self.n as usize).min(d))
            .filter(|&&v| v > tol)
            .count();
        if rank == 0 {
            return Err(OperatorError::BadInput(
                "the negative controls have no spread; sphering cannot be fitted".into(),
            ));
        }
        let smallest = s[rank - 1];
        s.iter_mut().skip(rank).for_each(|v| *v = smallest);
        let gain: Vec<f64> = s
            .iter()
            .map(|&v| (n - 1.0).sqrt() / (v + epsilon))
            .collect();
        let mut w = vec![0.0; d * d];
        for (k, &c) in order.iter().enumerate() {
            let g = gain[k];
            for i in 0..d {
                let vi = vectors[(i, c)] * g;
                if vi == 0.0 {
                    continue;
                }
                for j in 0..d {
                    w[i * d + j] += vi * vectors[(j, c)];
                }
            }
        }
        Ok(SpheringModel {
            mean,
            scale,
            w,
            singular_values: s,
            n: self.n,
        })
    }
}

impl SpheringModel {
    /// Whitens a chunk of rows (row-major) into `out` with one matrix product (sequential,
    /// so the bytes do not depend on the thread count).
    pub fn apply_rows(&self, rows: &[f64], out: &mut [f64]) {
        let d = self.mean.len();
        let r = rows.len() / d.max(1);
        let z = Mat::from_fn(r, d, |i, j| {
            (rows[i * d + j] - self.mean[j]) / self.scale[j]
        });
        let w = faer::MatRef::from_row_major_slice(&self.w, d, d);
        let mut y = Mat::<f64>::zeros(r, d);
        faer::linalg::matmul::matmul(
            y.as_mut(),
            faer::Accum::Replace,
            z.as_ref(),
            w,
            1.0,
            faer::Par::Seq,
        );
        crate::kernels::clear_upper_simd_state();
        for i in 0..r {
            for j in 0..d {
                out[i * d + j] = y[(i, j)];
            }
        }
    }

    /// Whitens one row into `out`.
    pub fn apply_row(&self, row: &[f64], out: &mut [f64]) {
        let d = self.mean.len();
        out.iter_mut().for_each(|o| *o = 0.0);
        for (i, ((&x, &mean), &scale)) in row.iter().zip(&self.mean).zip(&self.scale).enumerate() {
            let z = (x - mean) / scale;
            if z == 0.0 {
                continue;
            }
            for (o, &w) in out.iter_mut().zip(&self.w[i * d..(i + 1) * d]) {
                *o += z * w;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn rows(n: usize, d: usize, seed: u64) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut x = Vec::with_capacity(n * d);
        for _ in 0..n {
            let base: f64 = rng.random::<f64>() * 3.0;
            for j in 0..d {
                x.push(10.0 + base * (j as f64 + 1.0) + rng.random::<f64>() * (j as f64 + 0.5));
            }
        }
        x
    }

    fn names(d: usize) -> Vec<String> {
        (0..d).map(|j| format!("f{j}")).collect()
    }

    /// Sample covariance (ddof 1) of the whitened fit rows.
    fn whitened_cov(model: &SpheringModel, x: &[f64], d: usize) -> Vec<f64> {
        let n = x.len() / d;
        let mut y = vec![0.0; n * d];
        for (r, o) in x.chunks(d).zip(y.chunks_mut(d)) {
            model.apply_row(r, o);
        }
        let mean: Vec<f64> = (0..d)
            .map(|j| (0..n).map(|i| y[i * d + j]).sum::<f64>() / n as f64)
            .collect();
        let mut c = vec![0.0; d * d];
        for i in 0..n {
            for a in 0..d {
                for b in 0..d {
                    c[a * d + b] +=
                        (y[i * d + a] - mean[a]) * (y[i * d + b] - mean[b]) / (n as f64 - 1.0);
                }
            }
        }
        c
    }

    #[test]
    fn without_epsilon_the_fit_rows_come_out_white() {
        let (n, d) = (200, 5);
        let x = rows(n, d, 1);
        for method in [SpheringMethod::Zca, SpheringMethod::ZcaCor] {
            let mut acc = SpheringAccumulator::new(d);
            for chunk in x.chunks(d * 17) {
                acc.add_rows(chunk);
            }
            let model = acc.fit(method, 0.0, &names(d)).unwrap();
            let c = whitened_cov(&model, &x, d);
            // The chunked product gives the per-row values.
            let mut chunked = vec![0.0; x.len()];
            model.apply_rows(&x, &mut chunked);
            let mut one = vec![0.0; d];
            for (row, got) in x.chunks(d).zip(chunked.chunks(d)) {
                model.apply_row(row, &mut one);
                for (a, b) in one.iter().zip(got) {
                    assert!((a - b).abs() < 1e-9 * a.abs().max(1.0));
                }
            }
            for a in 0..d {
                for b in 0..d {
                    let want = if a == b { 1.0 } else { 0.0 };
                    assert!((c[a * d + b] - want).abs() < 1e-9, "{method} {a} {b}");
                }
            }
            // W is symmetric (ZCA: the whitening closest to the identity).
            for a in 0..d {
                for b in 0..d {
                    assert!((model.w[a * d + b] - model.w[b * d + a]).abs() < 1e-9);
                }
            }
        }
    }

    #[test]
    fn epsilon_shrinks_the_gain_on_the_singular_values() {
        let (n, d) = (50, 4);
        let x = rows(n, d, 2);
        let mut acc = SpheringAccumulator::new(d);
        acc.add_rows(&x);
        let plain = acc.fit(SpheringMethod::ZcaCor, 0.0, &names(d)).unwrap();
        let eps = 0.5;
        let reg = acc.fit(SpheringMethod::ZcaCor, eps, &names(d)).unwrap();
        assert_eq!(plain.singular_values, reg.singular_values);
        // Along each eigenvector the gain ratio is S / (S + eps).
        let c = whitened_cov(&reg, &x, d);
        let trace: f64 = (0..d).map(|a| c[a * d + a]).sum();
        let want: f64 = plain
            .singular_values
            .iter()
            .map(|s| (s / (s + eps)).powi(2))
            .sum();
        assert!((trace - want).abs() < 1e-9, "{trace} vs {want}");
    }

    #[test]
    fn degenerate_fits_are_clear_errors() {
        let d = 3;
        let mut acc = SpheringAccumulator::new(d);
        assert!(acc.fit(SpheringMethod::Zca, 1e-2, &names(d)).is_err());
        acc.add_rows(&[1.0, 2.0, 5.0, 2.0, 1.0, 5.0, 3.0, 0.5, 5.0]);
        let err = acc
            .fit(SpheringMethod::ZcaCor, 1e-2, &names(d))
            .unwrap_err()
            .to_string();
        assert!(err.contains("'f2' is constant"), "{err}");
        // Plain ZCA: the missing direction takes the smallest nonzero singular value.
        let model = acc.fit(SpheringMethod::Zca, 1e-2, &names(d)).unwrap();
        let s = &model.singular_values;
        assert!(s[2] == s[1] && s[1] > 0.0, "{s:?}");
        assert!(model.w.iter().all(|v| v.is_finite()));
    }
}
