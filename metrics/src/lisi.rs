//! Local inverse Simpson index (LISI) on a kNN graph, as scib-metrics' `lisi_knn` computes it.
//!
//! Per row: a Gaussian kernel `exp(-beta * d)` over its neighbour distances (entries that point
//! at the row itself get weight 0), with `beta` found by scib-metrics' bisection so that the
//! kernel's entropy `H = ln(sum P) + beta * sum(d P) / sum P` equals `ln(perplexity)`: start at
//! `beta = 1`; while `|H - ln(perplexity)| >= 1e-5` and fewer than 50 steps were taken, if `H`
//! is too high raise `beta` (double it while no upper bound is known, else move halfway to the
//! upper bound), otherwise lower it (halve it, or move halfway to the lower bound). The
//! normalised weights are summed per category and `LISI = 1 / sum_c p_c^2`. A row whose kernel
//! vanishes (`sum P == 0`, or `H == 0`) gets scib-metrics' sentinel `LISI = -1`.
//!
//! Precision: scib-metrics runs this in JAX float32; this module computes in f64. The two agree
//! to about 1e-5 relative: both stop within the same `1e-5` entropy tolerance, and their paths
//! can only differ where `|H - ln(perplexity)|` is within float32 rounding of that tolerance,
//! i.e. one bisection step near convergence. Rows whose only category is one value get exactly
//! 1 here where float32 gives `0.999999`.

use rayon::prelude::*;

use crate::error::{MetricsError, Result};
use crate::types::Neighbors;

/// Entropy tolerance of the bisection (scib-metrics' `tol`).
const ENTROPY_TOLERANCE: f64 = 1e-5;
/// Maximum number of bisection steps (scib-metrics' limit).
const MAX_STEPS: usize = 50;

/// Per-row LISI of the categories `codes` (one code `< n_categories` per row of `nn`) over
/// the neighbourhoods `nn` (indices into the same rows), with the Gaussian kernel calibrated to
/// `perplexity` (scib uses 30 with 90 neighbours). See the module documentation.
pub fn lisi(
    nn: &Neighbors,
    codes: &[u32],
    n_categories: usize,
    perplexity: f64,
) -> Result<Vec<f64>> {
    if codes.len() != nn.n {
        return Err(MetricsError::InvalidInput(format!(
            "{} category codes for {} neighbour rows",
            codes.len(),
            nn.n
        )));
    }
    if nn.indices.len() != nn.n * nn.k || nn.distances.len() != nn.n * nn.k {
        return Err(MetricsError::InvalidInput(format!(
            "neighbour lists hold {} indices and {} distances, expected n * k = {}",
            nn.indices.len(),
            nn.distances.len(),
            nn.n * nn.k
        )));
    }
    if !(perplexity.is_finite() && perplexity > 0.0) {
        return Err(MetricsError::InvalidInput(format!(
            "perplexity must be positive and finite, got {perplexity}"
        )));
    }
    if let Some(row) = codes.iter().position(|&c| c as usize >= n_categories) {
        return Err(MetricsError::InvalidInput(format!(
            "row {row} has category code {} but there are {n_categories} categories",
            codes[row]
        )));
    }
    if let Some(pos) = nn.indices.iter().position(|&j| j as usize >= nn.n) {
        return Err(MetricsError::InvalidInput(format!(
            "row {} has neighbour index {} out of range ({} rows)",
            pos / nn.k.max(1),
            nn.indices[pos],
            nn.n
        )));
    }
    if let Some(pos) = nn.distances.iter().position(|d| !d.is_finite()) {
        return Err(MetricsError::InvalidInput(format!(
            "row {} has a non-finite neighbour distance",
            pos / nn.k.max(1)
        )));
    }
    let target = perplexity.ln();
    let lisi = (0..nn.n)
        .into_par_iter()
        .map_init(
            || (vec![0.0; nn.k], vec![0.0; n_categories]),
            |(weights, per_category), row| {
                let distances = nn.distances_of(row);
                let neighbours = nn.indices_of(row);
                let entropy = calibrate_kernel(distances, neighbours, row, target, weights);
                if entropy == 0.0 {
                    return -1.0;
                }
                per_category.iter_mut().for_each(|p| *p = 0.0);
                for (&j, &w) in neighbours.iter().zip(weights.iter()) {
                    per_category[codes[j as usize] as usize] += w;
                }
                1.0 / per_category.iter().map(|p| p * p).sum::<f64>()
            },
        )
        .collect();
    Ok(lisi)
}

/// Finds `beta` by scib-metrics' bisection and leaves the normalised kernel weights in
/// `weights`; returns the final entropy (0 when the kernel vanished).
fn calibrate_kernel(
    distances: &[f64],
    neighbours: &[u32],
    row: usize,
    target: f64,
    weights: &mut [f64],
) -> f64 {
    let mut beta = 1.0f64;
    let mut lower = f64::NEG_INFINITY;
    let mut upper = f64::INFINITY;
    let mut entropy = kernel(distances, neighbours, row, beta, weights);
    let mut steps = 0;
    while (entropy - target).abs() >= ENTROPY_TOLERANCE && steps < MAX_STEPS {
        if entropy > target {
            lower = beta;
            beta = if upper == f64::INFINITY {
                beta * 2.0
            } else {
                (beta + upper) / 2.0
            };
        } else {
            upper = beta;
            beta = if lower == f64::NEG_INFINITY {
                beta / 2.0
            } else {
                (beta + lower) / 2.0
            };
        }
        entropy = kernel(distances, neighbours, row, beta, weights);
        steps += 1;
    }
    entropy
}

/// Normalised weights `exp(-beta d) / sum` (0 for entries pointing at `row` itself) and their
/// entropy; all-zero weights and entropy 0 when the sum vanishes.
fn kernel(
    distances: &[f64],
    neighbours: &[u32],
    row: usize,
    beta: f64,
    weights: &mut [f64],
) -> f64 {
    let mut sum = 0.0;
    let mut weighted_distance = 0.0;
    for ((w, &d), &j) in weights.iter_mut().zip(distances).zip(neighbours) {
        *w = if j as usize == row {
            0.0
        } else {
            (-d * beta).exp()
        };
        sum += *w;
        weighted_distance += d * *w;
    }
    if sum == 0.0 {
        weights.iter_mut().for_each(|w| *w = 0.0);
        return 0.0;
    }
    weights.iter_mut().for_each(|w| *w /= sum);
    sum.ln() + beta * weighted_distance / sum
}

/// NaN-skipping median (`numpy.nanmedian`): mean of the two middle values for an even count;
/// NaN when every value is NaN or there is none.
fn nan_median(values: &[f64]) -> f64 {
    let mut kept: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
    if kept.is_empty() {
        return f64::NAN;
    }
    kept.sort_unstable_by(f64::total_cmp);
    let mid = kept.len() / 2;
    if kept.len() % 2 == 1 {
        kept[mid]
    } else {
        (kept[mid - 1] + kept[mid]) / 2.0
    }
}

/// scib's scaled iLISI: `(nanmedian(per_row) - 1) / (n_batches - 1)` (higher is better mixing).
/// NaN when there are fewer than two batches or no non-NaN value.
pub fn ilisi_score(per_row: &[f64], n_batches: usize) -> f64 {
    if n_batches < 2 {
        return f64::NAN;
    }
    let batches = n_batches as f64;
    (nan_median(per_row) - 1.0) / (batches - 1.0)
}

/// scib's scaled cLISI: `(n_labels - nanmedian(per_row)) / (n_labels - 1)` (higher is better
/// label separation). NaN when there are fewer than two labels or no non-NaN value.
pub fn clisi_score(per_row: &[f64], n_labels: usize) -> f64 {
    if n_labels < 2 {
        return f64::NAN;
    }
    let labels = n_labels as f64;
    (labels - nan_median(per_row)) / (labels - 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_skips_nan_and_averages_the_middle_pair() {
        assert_eq!(nan_median(&[3.0, f64::NAN, 1.0, 2.0]), 2.0);
        assert_eq!(nan_median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(nan_median(&[f64::NAN]).is_nan());
    }

    #[test]
    fn kernel_reaches_the_target_entropy() {
        let distances: Vec<f64> = (0..90).map(|i| 0.1 + 0.01 * i as f64).collect();
        let neighbours: Vec<u32> = (1..91).collect();
        let mut weights = vec![0.0; 90];
        let target = 30f64.ln();
        let h = calibrate_kernel(&distances, &neighbours, 0, target, &mut weights);
        assert!((h - target).abs() < ENTROPY_TOLERANCE);
        assert!((weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        let direct: f64 = -weights.iter().map(|&p| p * p.ln()).sum::<f64>();
        assert!((direct - h).abs() < 1e-9);
    }
}
