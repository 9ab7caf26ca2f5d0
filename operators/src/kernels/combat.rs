//! ComBat: parametric empirical-Bayes location / scale batch correction, as scanpy's
//! `pp.combat` computes it (no covariates).
//!
//! Everything ComBat needs from the data is, per batch and feature, the row count, mean and
//! sum of squared deviations. [`BatchMoments`] accumulates them in one streaming pass
//! (Chan's mergeable update, rows in input order, so the result does not depend on the
//! thread count); [`fit_combat`] turns them into the model; [`ComBatModel::apply_row`]
//! corrects one row in the second pass. Per feature g and batch b (scanpy's steps):
//! 1. `grand_mean = Σ_b (n_b / n) mean_b`, `var_pooled = Σ_b SS_b / n` (divided by n);
//!    `s = (x - grand_mean) / sqrt(var_pooled)`.
//! 2. `gamma_hat = mean_b(s)`, `delta_hat = var_b(s)` with ddof = 1.
//! 3. Priors over the features of each batch: `gamma_bar`, `t2` (ddof = 0); `a`, `b` from the
//!    mean and the ddof = 1 variance of `delta_hat`.
//! 4. From `(gamma_hat, delta_hat)`, iterate
//!    `gamma = (t2 n_b gamma_hat + delta gamma_bar) / (t2 n_b + delta)`,
//!    `delta = (Σ (s - gamma)² / 2 + b) / (n_b / 2 + a - 1)` until every feature of the batch
//!    changes by at most `1e-4` relatively (scanpy's rule, including its signed denominator:
//!    a feature with a negative `gamma` does not hold the iteration back). `Σ (s - gamma)²`
//!    comes from the moments, so the iteration needs no pass over the data.
//! 5. `x' = (s - gamma*) / sqrt(delta*) · sqrt(var_pooled) + grand_mean`.
//!
//! Differences from scanpy, on purpose: a constant feature (`var_pooled = 0`) passes through
//! unchanged and is left out of the priors (scanpy sets it to its mean and, through a 0/0 in
//! the stopping rule, ends the iteration after one step for every feature of the batch); a
//! batch of one row is an error (its variance is undefined).

use crate::error::{OperatorError, Result};

/// Relative change at which the empirical-Bayes iteration stops (scanpy's `conv`).
pub const COMBAT_TOLERANCE: f64 = 1e-4;

/// Iterations after which a non-converging fit is an error.
pub const COMBAT_MAX_ITERATIONS: usize = 10_000;

/// Per batch and feature: row count, mean and sum of squared deviations.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchMoments {
    d: usize,
    count: Vec<u64>,
    mean: Vec<f64>,
    m2: Vec<f64>,
}

impl BatchMoments {
    /// Empty moments for `batches` batches and `d` features.
    pub fn new(batches: usize, d: usize) -> Self {
        Self {
            d,
            count: vec![0; batches],
            mean: vec![0.0; batches * d],
            m2: vec![0.0; batches * d],
        }
    }

    /// Number of batches.
    pub fn batches(&self) -> usize {
        self.count.len()
    }

    /// Number of features.
    pub fn features(&self) -> usize {
        self.d
    }

    /// Rows seen in batch `b`.
    pub fn count(&self, b: usize) -> u64 {
        self.count[b]
    }

    /// Adds one row of batch `b` (Welford's update).
    pub fn add_row(&mut self, b: usize, row: &[f64]) {
        assert_eq!(row.len(), self.d);
        self.count[b] += 1;
        let n = self.count[b] as f64;
        let at = b * self.d;
        for ((mean, m2), &x) in self.mean[at..at + self.d]
            .iter_mut()
            .zip(&mut self.m2[at..at + self.d])
            .zip(row)
        {
            let delta = x - *mean;
            *mean += delta / n;
            *m2 += delta * (x - *mean);
        }
    }

    /// Moments from sums around a shift: per batch `b` and feature `f`, `count[b]` rows with
    /// `s1 = sum (x - shift_f)` and `s2 = sum (x - shift_f)^2` (row-major `batches x d`).
    pub fn from_shifted_sums(shift: &[f64], count: &[u64], s1: &[f64], s2: &[f64]) -> Self {
        let d = shift.len();
        let batches = count.len();
        assert_eq!((s1.len(), s2.len()), (batches * d, batches * d));
        let mut mean = vec![0.0; batches * d];
        let mut m2 = vec![0.0; batches * d];
        for (b, &c) in count.iter().enumerate() {
            let n = c as f64;
            if n == 0.0 {
                continue;
            }
            let at = b * d;
            for (f, &sh) in shift.iter().enumerate() {
                let k = at + f;
                let delta = s1[k] / n;
                mean[k] = sh + delta;
                m2[k] = (s2[k] - s1[k] * delta).max(0.0);
            }
        }
        Self {
            d,
            count: count.to_vec(),
            mean,
            m2,
        }
    }

    /// Merges moments of later rows into these (Chan et al.'s pairwise update).
    pub fn merge(&mut self, other: &Self) {
        assert_eq!((self.batches(), self.d), (other.batches(), other.d));
        for b in 0..self.batches() {
            let (na, nb) = (self.count[b] as f64, other.count[b] as f64);
            if nb == 0.0 {
                continue;
            }
            let n = na + nb;
            let at = b * self.d;
            for f in at..at + self.d {
                let delta = other.mean[f] - self.mean[f];
                self.mean[f] += delta * nb / n;
                self.m2[f] += other.m2[f] + delta * delta * na * nb / n;
            }
            self.count[b] += other.count[b];
        }
    }
}

/// What ComBat estimated for one batch (one value per feature).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ComBatBatch {
    /// Rows in the batch.
    pub n: u64,
    /// Standardised batch means.
    pub gamma_hat: Vec<f64>,
    /// Standardised batch variances (ddof = 1).
    pub delta_hat: Vec<f64>,
    /// Prior mean of `gamma_hat` over features.
    pub gamma_bar: f64,
    /// Prior variance of `gamma_hat` over features (ddof = 0).
    pub t2: f64,
    /// Inverse-gamma prior shape of `delta_hat`.
    pub a_prior: f64,
    /// Inverse-gamma prior scale of `delta_hat`.
    pub b_prior: f64,
    /// Posterior location adjustment.
    pub gamma_star: Vec<f64>,
    /// Posterior scale adjustment.
    pub delta_star: Vec<f64>,
    /// Iterations the empirical-Bayes loop took.
    pub iterations: usize,
}

/// A fitted ComBat model.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ComBatModel {
    /// Overall feature means.
    pub grand_mean: Vec<f64>,
    /// Pooled within-batch variances (divided by n).
    pub var_pooled: Vec<f64>,
    /// Per batch estimates, in batch-code order.
    pub batches: Vec<ComBatBatch>,
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    sum / n as f64
}

fn variance(values: &[f64], ddof: usize) -> f64 {
    let m = mean(values.iter().copied());
    values.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / (values.len() - ddof) as f64
}

/// Fits ComBat from per-batch moments. `names` name the batches in errors.
pub fn fit_combat(moments: &BatchMoments, names: &[String]) -> Result<ComBatModel> {
    let (batches, d) = (moments.batches(), moments.d);
    if batches < 2 {
        return Err(OperatorError::BadInput(
            "ComBat needs at least two batches".into(),
        ));
    }
    if let Some(b) = (0..batches).find(|&b| moments.count[b] < 2) {
        return Err(OperatorError::BadInput(format!(
            "batch '{}' has {} row(s); ComBat needs at least 2 rows per batch (a variance)",
            names.get(b).map_or("?", String::as_str),
            moments.count[b]
        )));
    }
    let n: f64 = moments.count.iter().map(|&c| c as f64).sum();
    let mut grand_mean = vec![0.0; d];
    let mut var_pooled = vec![0.0; d];
    for b in 0..batches {
        let w = moments.count[b] as f64 / n;
        for f in 0..d {
            grand_mean[f] += w * moments.mean[b * d + f];
            var_pooled[f] += moments.m2[b * d + f] / n;
        }
    }
    let varying: Vec<usize> = (0..d).filter(|&f| var_pooled[f] > 0.0).collect();
    if varying.len() < 2 {
        return Err(OperatorError::BadInput(
            "ComBat needs at least two non-constant features (its priors pool over features)"
                .into(),
        ));
    }
    let mut out = Vec::with_capacity(batches);
    for b in 0..batches {
        let nb = moments.count[b] as f64;
        let mut gamma_hat = vec![0.0; d];
        let mut delta_hat = vec![0.0; d];
        for &f in &varying {
            let sd = var_pooled[f].sqrt();
            gamma_hat[f] = (moments.mean[b * d + f] - grand_mean[f]) / sd;
            delta_hat[f] = moments.m2[b * d + f] / var_pooled[f] / (nb - 1.0);
        }
        let gh: Vec<f64> = varying.iter().map(|&f| gamma_hat[f]).collect();
        let dh: Vec<f64> = varying.iter().map(|&f| delta_hat[f]).collect();
        let gamma_bar = mean(gh.iter().copied());
        let t2 = variance(&gh, 0);
        let m = mean(dh.iter().copied());
        let s2 = variance(&dh, 1);
        let a_prior = (2.0 * s2 + m * m) / s2;
        let b_prior = (m * s2 + m * m * m) / s2;
        // Σ over the batch's rows of (s - g)² = (n_b - 1) δ̂ + n_b (γ̂ - g)².
        let sum_sq = |i: usize, g: f64| (nb - 1.0) * dh[i] + nb * (gh[i] - g) * (gh[i] - g);
        let (mut g_old, mut d_old) = (gh.clone(), dh.clone());
        let mut iterations = 0;
        loop {
            iterations += 1;
            let g_new: Vec<f64> = (0..gh.len())
                .map(|i| (t2 * nb * gh[i] + d_old[i] * gamma_bar) / (t2 * nb + d_old[i]))
                .collect();
            let d_new: Vec<f64> = (0..gh.len())
                .map(|i| (0.5 * sum_sq(i, g_new[i]) + b_prior) / (nb / 2.0 + a_prior - 1.0))
                .collect();
            let change = (0..gh.len())
                .flat_map(|i| {
                    [
                        (g_new[i] - g_old[i]).abs() / g_old[i],
                        (d_new[i] - d_old[i]).abs() / d_old[i],
                    ]
                })
                .fold(f64::NEG_INFINITY, f64::max);
            g_old = g_new;
            d_old = d_new;
            if change <= COMBAT_TOLERANCE {
                break;
            }
            if !change.is_finite() || iterations >= COMBAT_MAX_ITERATIONS {
                return Err(OperatorError::BadInput(format!(
                    "ComBat's empirical-Bayes estimates for batch '{}' do not converge",
                    names.get(b).map_or("?", String::as_str)
                )));
            }
        }
        let mut gamma_star = vec![0.0; d];
        let mut delta_star = vec![1.0; d];
        for (i, &f) in varying.iter().enumerate() {
            gamma_star[f] = g_old[i];
            delta_star[f] = d_old[i];
        }
        out.push(ComBatBatch {
            n: moments.count[b],
            gamma_hat,
            delta_hat,
            gamma_bar,
            t2,
            a_prior,
            b_prior,
            gamma_star,
            delta_star,
            iterations,
        });
    }
    Ok(ComBatModel {
        grand_mean,
        var_pooled,
        batches: out,
    })
}

impl ComBatModel {
    /// Corrects one row of batch `b` into `out`; constant features pass through.
    pub fn apply_row(&self, b: usize, row: &[f64], out: &mut [f64]) {
        let batch = &self.batches[b];
        for (f, (o, &x)) in out.iter_mut().zip(row).enumerate() {
            let vp = self.var_pooled[f];
            *o = if vp > 0.0 {
                let sd = vp.sqrt();
                let s = (x - self.grand_mean[f]) / sd;
                (s - batch.gamma_star[f]) / batch.delta_star[f].sqrt() * sd + self.grand_mean[f]
            } else {
                x
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn data(seed: u64) -> (Vec<Vec<f64>>, Vec<usize>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut rows = Vec::new();
        let mut batch = Vec::new();
        for b in 0..3 {
            for _ in 0..(20 + 7 * b) {
                rows.push(
                    (0..5)
                        .map(|f| {
                            b as f64 * (f as f64 - 2.0)
                                + (1.0 + 0.3 * b as f64) * rng.random::<f64>()
                        })
                        .collect(),
                );
                batch.push(b);
            }
        }
        (rows, batch)
    }

    fn names() -> Vec<String> {
        (0..3).map(|b| format!("b{b}")).collect()
    }

    #[test]
    fn moments_match_two_pass_formulas_and_merge_in_any_split() {
        let (rows, batch) = data(1);
        let mut whole = BatchMoments::new(3, 5);
        rows.iter()
            .zip(&batch)
            .for_each(|(r, &b)| whole.add_row(b, r));
        let mut split = BatchMoments::new(3, 5);
        for chunk in rows.chunks(11).zip(batch.chunks(11)) {
            let mut part = BatchMoments::new(3, 5);
            chunk
                .0
                .iter()
                .zip(chunk.1)
                .for_each(|(r, &b)| part.add_row(b, r));
            split.merge(&part);
        }
        for b in 0..3 {
            let members: Vec<&Vec<f64>> = rows
                .iter()
                .zip(&batch)
                .filter(|(_, x)| **x == b)
                .map(|(r, _)| r)
                .collect();
            for f in 0..5 {
                let m = members.iter().map(|r| r[f]).sum::<f64>() / members.len() as f64;
                let ss: f64 = members.iter().map(|r| (r[f] - m).powi(2)).sum();
                for mo in [&whole, &split] {
                    assert!((mo.mean[b * 5 + f] - m).abs() < 1e-12);
                    assert!((mo.m2[b * 5 + f] - ss).abs() < 1e-10 * ss.max(1.0));
                }
            }
        }
    }

    #[test]
    fn corrected_batches_share_mean_and_pooled_scale_roughly() {
        let (rows, batch) = data(2);
        let mut mo = BatchMoments::new(3, 5);
        rows.iter().zip(&batch).for_each(|(r, &b)| mo.add_row(b, r));
        let model = fit_combat(&mo, &names()).unwrap();
        let mut out = vec![0.0; 5];
        let mut after = BatchMoments::new(3, 5);
        for (r, &b) in rows.iter().zip(&batch) {
            model.apply_row(b, r, &mut out);
            after.add_row(b, &out);
        }
        for f in 0..5 {
            let spread_before = (0..3).map(|b| mo.mean[b * 5 + f]).fold(f64::MIN, f64::max)
                - (0..3).map(|b| mo.mean[b * 5 + f]).fold(f64::MAX, f64::min);
            let spread_after = (0..3)
                .map(|b| after.mean[b * 5 + f])
                .fold(f64::MIN, f64::max)
                - (0..3)
                    .map(|b| after.mean[b * 5 + f])
                    .fold(f64::MAX, f64::min);
            assert!(
                spread_after < 0.25 * spread_before.max(0.1),
                "{f}: {spread_before} -> {spread_after}"
            );
        }
    }

    #[test]
    fn bad_inputs_are_clear_errors_and_constant_features_pass_through() {
        let mut mo = BatchMoments::new(2, 3);
        mo.add_row(0, &[1.0, 2.0, 5.0]);
        mo.add_row(0, &[2.0, 1.0, 5.0]);
        mo.add_row(1, &[3.0, 3.0, 5.0]);
        let err = fit_combat(&mo, &["w1".into(), "w2".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("batch 'w2' has 1 row"), "{err}");
        mo.add_row(1, &[4.0, 6.0, 5.0]);
        let model = fit_combat(&mo, &["w1".into(), "w2".into()]).unwrap();
        let mut out = vec![0.0; 3];
        model.apply_row(1, &[4.0, 6.0, 5.0], &mut out);
        assert_eq!(out[2], 5.0);
        assert!(out.iter().all(|v| v.is_finite()));
        let one = BatchMoments::new(1, 3);
        assert!(
            fit_combat(&one, &["w1".into()])
                .unwrap_err()
                .to_string()
                .contains("two batches")
        );
    }
}
