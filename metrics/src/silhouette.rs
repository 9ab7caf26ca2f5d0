//! Exact silhouette scores in bounded memory: scikit-learn's `silhouette_samples`, scib's
//! label silhouette `(s + 1) / 2` and scib 1.x's batch silhouette.
//!
//! Pairwise distances are streamed in tiles (a block of query rows x a block of reference rows,
//! one matrix product each) and folded at once into per-row sums of distances per cluster, so
//! memory is `O(threads * block * (block + clusters))` beyond the input, never `n x n`. Query
//! blocks run in parallel; each row's sums are accumulated in reference-row order, so results
//! do not depend on the number of threads.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::cluster::dense_codes;
use crate::error::{MetricsError, Result};
use crate::types::Distance;

/// Query rows per tile (and per parallel task).
const QUERY_BLOCK: usize = 128;
/// Reference rows per tile.
const REFERENCE_BLOCK: usize = 1024;

/// Scib 1.x batch silhouette (`scib.metrics.silhouette_batch`) with per-row and per-label detail.
#[derive(Debug, Clone, PartialEq)]
pub struct SilhouetteBatch {
    /// `1 - |s|` of each row, `s` its silhouette against batches among the rows of its label;
    /// NaN for rows of skipped labels.
    pub per_row: Vec<f64>,
    /// Mean of `per_row` over each label, indexed by label code (`max(label) + 1` entries);
    /// NaN for skipped or absent codes.
    pub per_label: Vec<f64>,
    /// Mean of `per_label` over the scored labels (NaN if none is scored).
    pub score: f64,
}

/// Checks the embedding shape and values.
fn validate_embedding(x: &[f64], d: usize, n: usize) -> Result<()> {
    if d == 0 {
        return Err(MetricsError::InvalidInput(
            "the embedding has no features (d = 0)".to_string(),
        ));
    }
    if x.len() != n * d {
        return Err(MetricsError::InvalidInput(format!(
            "embedding length {} is not {n} rows x {d} features",
            x.len()
        )));
    }
    let bad: Vec<usize> = (0..n)
        .filter(|&i| x[i * d..(i + 1) * d].iter().any(|v| !v.is_finite()))
        .collect();
    if !bad.is_empty() {
        return Err(MetricsError::NonFinite {
            count: bad.len(),
            rows: bad.into_iter().take(10).collect(),
        });
    }
    Ok(())
}

/// Row data prepared for distance tiles: unit rows for cosine (zero rows stay zero, as
/// scikit-learn's `normalize`), raw rows and squared norms for Euclidean.
struct Prepared {
    rows: Vec<f64>,
    squared_norms: Vec<f64>,
    distance: Distance,
}

impl Prepared {
    fn new(x: &[f64], d: usize, distance: Distance) -> Self {
        let squared_norms: Vec<f64> = x
            .chunks_exact(d)
            .map(|r| r.iter().map(|v| v * v).sum())
            .collect();
        let rows = match distance {
            Distance::Euclidean => x.to_vec(),
            Distance::Cosine => x
                .chunks_exact(d)
                .zip(&squared_norms)
                .flat_map(|(r, &sq)| {
                    let norm = sq.sqrt();
                    r.iter()
                        .map(move |v| if norm > 0.0 { v / norm } else { 0.0 })
                })
                .collect(),
        };
        Self {
            rows,
            squared_norms,
            distance,
        }
    }

    /// Distance from the dot product of (prepared) rows `i` and `j`, as scikit-learn's
    /// `cosine_distances` (clipped to `[0, 2]`) / `euclidean_distances` (Gram form).
    fn distance(&self, dot: f64, i: usize, j: usize) -> f64 {
        if i == j {
            return 0.0;
        }
        match self.distance {
            Distance::Cosine => (1.0 - dot).clamp(0.0, 2.0),
            Distance::Euclidean => (self.squared_norms[i] - 2.0 * dot + self.squared_norms[j])
                .max(0.0)
                .sqrt(),
        }
    }
}

/// Silhouette of each row given dense cluster codes `0..n_clusters` and cluster sizes.
fn silhouette_dense(data: &Prepared, d: usize, codes: &[u32], sizes: &[usize]) -> Vec<f64> {
    let n = codes.len();
    let n_clusters = sizes.len();
    let mut result = vec![0.0; n];
    result
        .par_chunks_mut(QUERY_BLOCK)
        .enumerate()
        .for_each(|(block, out)| {
            let q0 = block * QUERY_BLOCK;
            let nq = out.len();
            let queries = MatRef::from_row_major_slice(&data.rows[q0 * d..(q0 + nq) * d], nq, d);
            let mut sums = vec![0.0f64; nq * n_clusters];
            let mut gram = vec![0.0f64; nq * REFERENCE_BLOCK];
            for r0 in (0..n).step_by(REFERENCE_BLOCK) {
                let nr = REFERENCE_BLOCK.min(n - r0);
                let references =
                    MatRef::from_row_major_slice(&data.rows[r0 * d..(r0 + nr) * d], nr, d);
                let tile = &mut gram[..nq * nr];
                matmul(
                    MatMut::from_row_major_slice_mut(tile, nq, nr),
                    Accum::Replace,
                    queries,
                    references.transpose(),
                    1.0,
                    Par::Seq,
                );
                for (qi, dots) in tile.chunks_exact(nr).enumerate() {
                    let row_sums = &mut sums[qi * n_clusters..(qi + 1) * n_clusters];
                    for (rj, &dot) in dots.iter().enumerate() {
                        let j = r0 + rj;
                        row_sums[codes[j] as usize] += data.distance(dot, q0 + qi, j);
                    }
                }
            }
            for (qi, s) in out.iter_mut().enumerate() {
                let own = codes[q0 + qi] as usize;
                let row_sums = &sums[qi * n_clusters..(qi + 1) * n_clusters];
                *s = silhouette_of_row(row_sums, sizes, own);
            }
        });
    result
}

/// `(b - a) / max(a, b)` from one row's distance sums per cluster; 0 for a row alone in its
/// cluster or when `a = b = 0` (scikit-learn's `nan_to_num`).
fn silhouette_of_row(sums: &[f64], sizes: &[usize], own: usize) -> f64 {
    if sizes[own] <= 1 {
        return 0.0;
    }
    let intra = sums[own] / (sizes[own] - 1) as f64;
    let inter = sums
        .iter()
        .zip(sizes)
        .enumerate()
        .filter(|&(c, (_, &size))| c != own && size > 0)
        .map(|(_, (&sum, &size))| sum / size as f64)
        .fold(f64::INFINITY, f64::min);
    let denominator = intra.max(inter);
    if denominator > 0.0 {
        (inter - intra) / denominator
    } else {
        0.0
    }
}

/// Validates shapes and the cluster count, returning dense codes and sizes.
fn prepare_labels(x: &[f64], d: usize, labels: &[u32]) -> Result<(Vec<u32>, Vec<usize>)> {
    let n = labels.len();
    validate_embedding(x, d, n)?;
    let (codes, n_clusters) = dense_codes(labels);
    if n_clusters < 2 || n_clusters >= n {
        return Err(MetricsError::InvalidInput(format!(
            "silhouette needs 2 <= number of clusters <= n - 1, got {n_clusters} clusters for {n} rows"
        )));
    }
    let mut sizes = vec![0usize; n_clusters];
    for &c in &codes {
        sizes[c as usize] += 1;
    }
    Ok((codes, sizes))
}

/// Silhouette of each row of the row-major `n x d` embedding `x` against the clusters
/// `labels` (arbitrary ids), as scikit-learn's `silhouette_samples(x, labels, metric)`:
/// `s = (b - a) / max(a, b)` with `a` the mean distance to the other rows of its cluster and `b`
/// the smallest mean distance to another cluster; `s = 0` for a row alone in its cluster.
/// Cosine distance is `1 - x.y / (|x| |y|)` (a zero row has distance 1 to every other row).
///
/// Errors on a shape mismatch, non-finite values, or fewer than 2 or more than `n - 1` clusters.
pub fn silhouette_samples(
    x: &[f64],
    d: usize,
    labels: &[u32],
    distance: Distance,
) -> Result<Vec<f64>> {
    let (codes, sizes) = prepare_labels(x, d, labels)?;
    let data = Prepared::new(x, d, distance);
    Ok(silhouette_dense(&data, d, &codes, &sizes))
}

/// Scib's label silhouette: `(mean silhouette_samples + 1) / 2` (scikit-learn's
/// `silhouette_score`, rescaled to `[0, 1]`). Errors as [`silhouette_samples`].
pub fn silhouette_label(x: &[f64], d: usize, labels: &[u32], distance: Distance) -> Result<f64> {
    let s = silhouette_samples(x, d, labels, distance)?;
    let mean = s.iter().sum::<f64>() / s.len() as f64;
    Ok((mean + 1.0) / 2.0)
}

/// Scib 1.x batch silhouette: for each label whose rows span `1 < n_batches < n_rows` batches,
/// the silhouette `s` of its rows against their batches (computed among that label's rows
/// only), scored `1 - |s|` per row and averaged per label; `score` is the mean over those labels.
/// Other labels are skipped (NaN). Labels are dense codes (e.g. [`crate::Codes`]); batches are
/// arbitrary ids.
///
/// Errors on shape mismatches or non-finite values.
pub fn silhouette_batch(
    x: &[f64],
    d: usize,
    batches: &[u32],
    labels: &[u32],
    distance: Distance,
) -> Result<SilhouetteBatch> {
    let n = labels.len();
    if batches.len() != n {
        return Err(MetricsError::InvalidInput(format!(
            "{} batch ids for {n} labels",
            batches.len()
        )));
    }
    validate_embedding(x, d, n)?;
    let n_codes = labels.iter().max().map_or(0, |&l| l as usize + 1);
    let mut rows_of_label: Vec<Vec<usize>> = vec![Vec::new(); n_codes];
    for (i, &l) in labels.iter().enumerate() {
        rows_of_label[l as usize].push(i);
    }
    let mut per_row = vec![f64::NAN; n];
    let mut per_label = vec![f64::NAN; n_codes];
    for (label, rows) in rows_of_label.iter().enumerate() {
        let label_batches: Vec<u32> = rows.iter().map(|&i| batches[i]).collect();
        let (batch_codes, n_batches) = dense_codes(&label_batches);
        if n_batches <= 1 || n_batches >= rows.len() {
            continue;
        }
        let mut sizes = vec![0usize; n_batches];
        for &b in &batch_codes {
            sizes[b as usize] += 1;
        }
        let mut subset = Vec::with_capacity(rows.len() * d);
        for &i in rows {
            subset.extend_from_slice(&x[i * d..(i + 1) * d]);
        }
        let data = Prepared::new(&subset, d, distance);
        let s = silhouette_dense(&data, d, &batch_codes, &sizes);
        let mut total = 0.0;
        for (&i, &si) in rows.iter().zip(&s) {
            per_row[i] = 1.0 - si.abs();
            total += per_row[i];
        }
        per_label[label] = total / rows.len() as f64;
    }
    let scored: Vec<f64> = per_label.iter().copied().filter(|v| !v.is_nan()).collect();
    let score = if scored.is_empty() {
        f64::NAN
    } else {
        scored.iter().sum::<f64>() / scored.len() as f64
    };
    Ok(SilhouetteBatch {
        per_row,
        per_label,
        score,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// O(n^2) silhouette straight from the definition.
    fn brute_force(x: &[f64], d: usize, labels: &[u32], distance: Distance) -> Vec<f64> {
        let n = labels.len();
        let row = |i: usize| &x[i * d..(i + 1) * d];
        let dist = |i: usize, j: usize| -> f64 {
            if i == j {
                return 0.0;
            }
            match distance {
                Distance::Euclidean => row(i)
                    .iter()
                    .zip(row(j))
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f64>()
                    .sqrt(),
                Distance::Cosine => {
                    let dot: f64 = row(i).iter().zip(row(j)).map(|(a, b)| a * b).sum();
                    let ni: f64 = row(i).iter().map(|a| a * a).sum::<f64>().sqrt();
                    let nj: f64 = row(j).iter().map(|a| a * a).sum::<f64>().sqrt();
                    1.0 - dot / (ni * nj)
                }
            }
        };
        let mut distinct = labels.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        (0..n)
            .map(|i| {
                let own: Vec<usize> = (0..n)
                    .filter(|&j| labels[j] == labels[i] && j != i)
                    .collect();
                if own.is_empty() {
                    return 0.0;
                }
                let a = own.iter().map(|&j| dist(i, j)).sum::<f64>() / own.len() as f64;
                let b = distinct
                    .iter()
                    .filter(|&&l| l != labels[i])
                    .map(|&l| {
                        let members: Vec<usize> = (0..n).filter(|&j| labels[j] == l).collect();
                        members.iter().map(|&j| dist(i, j)).sum::<f64>() / members.len() as f64
                    })
                    .fold(f64::INFINITY, f64::min);
                (b - a) / a.max(b)
            })
            .collect()
    }

    fn random_data(n: usize, d: usize, n_labels: u32, seed: u64) -> (Vec<f64>, Vec<u32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let labels: Vec<u32> = (0..n)
            .map(|_| rng.random_range(0..n_labels) * 3 + 1)
            .collect();
        let x = (0..n * d)
            .map(|k| rng.random::<f64>() - 0.5 + f64::from(labels[k / d]) * 0.05)
            .collect();
        (x, labels)
    }

    #[test]
    fn matches_brute_force_across_tiles() {
        // n spans several query and reference blocks, with a partial last tile.
        let (x, mut labels) = random_data(1300, 7, 5, 11);
        labels[17] = 99; // a singleton cluster
        for distance in [Distance::Cosine, Distance::Euclidean] {
            let fast = silhouette_samples(&x, 7, &labels, distance).unwrap();
            let slow = brute_force(&x, 7, &labels, distance);
            assert_eq!(fast[17], 0.0);
            for (f, s) in fast.iter().zip(&slow) {
                assert!((f - s).abs() < 1e-12, "{distance:?}: {f} vs {s}");
            }
        }
    }

    #[test]
    fn label_score_is_rescaled_mean() {
        let (x, labels) = random_data(60, 4, 3, 2);
        let s = silhouette_samples(&x, 4, &labels, Distance::Cosine).unwrap();
        let mean = s.iter().sum::<f64>() / 60.0;
        let score = silhouette_label(&x, 4, &labels, Distance::Cosine).unwrap();
        assert!((score - (mean + 1.0) / 2.0).abs() < 1e-15);
    }

    #[test]
    fn two_tight_clusters() {
        // Points at 0, 1 (cluster A) and 10, 11 (cluster B) on a line, Euclidean.
        let x = [0.0, 1.0, 10.0, 11.0];
        let s = silhouette_samples(&x, 1, &[0, 0, 1, 1], Distance::Euclidean).unwrap();
        // Row 0: a = 1, b = (10 + 11) / 2 = 10.5, s = 9.5 / 10.5.
        assert!((s[0] - 9.5 / 10.5).abs() < 1e-15);
        // Row 1: a = 1, b = (9 + 10) / 2 = 9.5, s = 8.5 / 9.5.
        assert!((s[1] - 8.5 / 9.5).abs() < 1e-15);
    }

    #[test]
    fn batch_silhouette_skips_and_scores() {
        let (x, batches) = random_data(90, 5, 3, 5);
        // Label 0: rows 0..30 (several batches), label 1: rows 30..60 forced to one batch,
        // label 2: rows 60..90.
        let labels: Vec<u32> = (0..90).map(|i| (i / 30) as u32).collect();
        let mut batches = batches;
        for b in &mut batches[30..60] {
            *b = 4;
        }
        let result = silhouette_batch(&x, 5, &batches, &labels, Distance::Cosine).unwrap();
        assert!(result.per_label[1].is_nan());
        assert!(result.per_row[30..60].iter().all(|v| v.is_nan()));
        for label in [0usize, 2] {
            let rows = label * 30..(label + 1) * 30;
            let s = brute_force(
                &x[rows.start * 5..rows.end * 5],
                5,
                &batches[rows.clone()],
                Distance::Cosine,
            );
            let expected: f64 = s.iter().map(|v| 1.0 - v.abs()).sum::<f64>() / 30.0;
            assert!((result.per_label[label] - expected).abs() < 1e-12);
        }
        let expected_score = (result.per_label[0] + result.per_label[2]) / 2.0;
        assert!((result.score - expected_score).abs() < 1e-15);
    }

    #[test]
    fn bad_input_is_rejected() {
        let x = [0.0, 1.0, 2.0, 3.0];
        assert!(silhouette_samples(&x, 2, &[0, 1, 1], Distance::Cosine).is_err());
        assert!(silhouette_samples(&x, 1, &[0, 0, 0, 0], Distance::Cosine).is_err());
        assert!(silhouette_samples(&x, 1, &[0, 1, 2, 3], Distance::Cosine).is_err());
        assert!(matches!(
            silhouette_samples(
                &[0.0, f64::NAN, 1.0, 2.0],
                1,
                &[0, 0, 1, 1],
                Distance::Cosine
            ),
            Err(MetricsError::NonFinite { count: 1, .. })
        ));
        assert!(silhouette_batch(&x, 1, &[0, 1], &[0, 0, 0, 0], Distance::Cosine).is_err());
    }
}
