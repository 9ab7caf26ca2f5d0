//! Exact silhouette scores in bounded memory: scikit-learn's `silhouette_samples`, scib's
//! label silhouette `(s + 1) / 2` and scib 1.x's batch silhouette.
//!
//! A silhouette needs, for each row, the sum of its distances to the rows of every cluster.
//! - **Cosine**: the distance `1 - u_i.u_j` (unit rows `u`) is linear in `u_j`, so the sum over
//!   cluster `c` is exactly `n_c - u_i . U_c` with `U_c` the sum of the cluster's unit rows:
//!   one `n x d` by `d x clusters` product, `O(n d clusters)` work instead of `O(n^2 d)`, with
//!   the same rounding order of magnitude as summing the distances one by one (about
//!   `1e-16 * n_c`).
//! - **Euclidean**: pairwise distances are streamed in tiles (a block of query rows x a block
//!   of reference rows, one matrix product each, scikit-learn's Gram form
//!   `sqrt(max(|x|^2 - 2 x.y + |y|^2, 0))`) and folded at once into per-row sums per cluster.
//!
//! Memory beyond the input is `O(clusters * d + threads * block * (block + clusters))`, never
//! `n x n`. Query blocks run in parallel; each row's sums are accumulated in a fixed order, so
//! results do not depend on the number of threads. A row's distance to itself is 0.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::cluster::dense_codes;
use crate::error::{MetricsError, Result, ensure_finite};
use crate::types::Distance;
use crate::types::gather_rows;

/// Query rows per tile (and per parallel task).
const QUERY_BLOCK: usize = 128;
/// Reference rows per Euclidean tile.
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
    ensure_finite(x, d)
}

/// Unit rows (a zero row stays zero, as scikit-learn's `normalize`, so its cosine distance to
/// every other row is 1).
fn unit_rows(x: &[f64], d: usize) -> Vec<f64> {
    let mut rows = x.to_vec();
    for row in rows.chunks_exact_mut(d) {
        let norm = row.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm > 0.0 {
            row.iter_mut().for_each(|v| *v /= norm);
        }
    }
    rows
}

/// Per-row sums of distances to each cluster, for one block of query rows (`nq x clusters`).
trait ClusterSums: Sync {
    fn block_sums(&self, q0: usize, nq: usize) -> Vec<f64>;
}

/// Cosine sums from per-cluster sums of unit rows.
struct CosineSums<'a> {
    units: Vec<f64>,
    d: usize,
    codes: &'a [u32],
    sizes: &'a [usize],
    /// `clusters x d`: sum of the unit rows of each cluster, in row order.
    cluster_units: Vec<f64>,
}

impl<'a> CosineSums<'a> {
    fn new(x: &[f64], d: usize, codes: &'a [u32], sizes: &'a [usize]) -> Self {
        let units = unit_rows(x, d);
        let mut cluster_units = vec![0.0; sizes.len() * d];
        for (row, &c) in units.chunks_exact(d).zip(codes) {
            let target = &mut cluster_units[c as usize * d..(c as usize + 1) * d];
            target.iter_mut().zip(row).for_each(|(t, v)| *t += v);
        }
        Self {
            units,
            d,
            codes,
            sizes,
            cluster_units,
        }
    }
}

impl ClusterSums for CosineSums<'_> {
    fn block_sums(&self, q0: usize, nq: usize) -> Vec<f64> {
        let d = self.d;
        let n_clusters = self.sizes.len();
        let queries = MatRef::from_row_major_slice(&self.units[q0 * d..(q0 + nq) * d], nq, d);
        let centroids = MatRef::from_row_major_slice(&self.cluster_units, n_clusters, d);
        let mut sums = vec![0.0; nq * n_clusters];
        matmul(
            MatMut::from_row_major_slice_mut(&mut sums, nq, n_clusters),
            Accum::Replace,
            queries,
            centroids.transpose(),
            1.0,
            Par::Seq,
        );
        crate::simd::clear_upper_simd_state();
        for (qi, row_sums) in sums.chunks_exact_mut(n_clusters).enumerate() {
            for (sum, &size) in row_sums.iter_mut().zip(self.sizes) {
                *sum = size as f64 - *sum;
            }
            // Remove the row's own term 1 - |u_i|^2: its distance to itself is 0.
            let i = q0 + qi;
            let unit = &self.units[i * d..(i + 1) * d];
            let own = self.codes[i] as usize;
            row_sums[own] -= 1.0 - unit.iter().map(|v| v * v).sum::<f64>();
            row_sums.iter_mut().for_each(|s| *s = s.max(0.0));
        }
        sums
    }
}

/// Euclidean sums streamed over tiles of pairwise distances.
struct EuclideanSums<'a> {
    x: &'a [f64],
    d: usize,
    codes: &'a [u32],
    n_clusters: usize,
    squared_norms: Vec<f64>,
}

impl ClusterSums for EuclideanSums<'_> {
    fn block_sums(&self, q0: usize, nq: usize) -> Vec<f64> {
        let d = self.d;
        let n = self.codes.len();
        let queries = MatRef::from_row_major_slice(&self.x[q0 * d..(q0 + nq) * d], nq, d);
        let mut sums = vec![0.0; nq * self.n_clusters];
        let mut gram = vec![0.0; nq * REFERENCE_BLOCK];
        for r0 in (0..n).step_by(REFERENCE_BLOCK) {
            let nr = REFERENCE_BLOCK.min(n - r0);
            let references = MatRef::from_row_major_slice(&self.x[r0 * d..(r0 + nr) * d], nr, d);
            let tile = &mut gram[..nq * nr];
            matmul(
                MatMut::from_row_major_slice_mut(tile, nq, nr),
                Accum::Replace,
                queries,
                references.transpose(),
                1.0,
                Par::Seq,
            );
            crate::simd::clear_upper_simd_state();
            let reference_norms = &self.squared_norms[r0..r0 + nr];
            let reference_codes = &self.codes[r0..r0 + nr];
            for (qi, dots) in tile.chunks_exact(nr).enumerate() {
                let i = q0 + qi;
                let query_norm = self.squared_norms[i];
                let row_sums = &mut sums[qi * self.n_clusters..(qi + 1) * self.n_clusters];
                for (rj, ((&dot, &norm), &code)) in dots
                    .iter()
                    .zip(reference_norms)
                    .zip(reference_codes)
                    .enumerate()
                {
                    if r0 + rj != i {
                        row_sums[code as usize] += (query_norm - 2.0 * dot + norm).max(0.0).sqrt();
                    }
                }
            }
        }
        sums
    }
}

/// Silhouette of each row given dense cluster codes `0..n_clusters` and cluster sizes.
fn silhouette_dense(
    x: &[f64],
    d: usize,
    codes: &[u32],
    sizes: &[usize],
    distance: Distance,
) -> Vec<f64> {
    match distance {
        Distance::Cosine => {
            silhouette_from_sums(&CosineSums::new(x, d, codes, sizes), codes, sizes)
        }
        Distance::Euclidean => {
            let sums = EuclideanSums {
                x,
                d,
                codes,
                n_clusters: sizes.len(),
                squared_norms: x
                    .chunks_exact(d)
                    .map(|r| r.iter().map(|v| v * v).sum())
                    .collect(),
            };
            silhouette_from_sums(&sums, codes, sizes)
        }
    }
}

/// Silhouettes from the per-cluster distance sums, in parallel over query blocks.
fn silhouette_from_sums(sums: &impl ClusterSums, codes: &[u32], sizes: &[usize]) -> Vec<f64> {
    let n_clusters = sizes.len();
    let mut result = vec![0.0; codes.len()];
    result
        .par_chunks_mut(QUERY_BLOCK)
        .enumerate()
        .for_each(|(block, out)| {
            let q0 = block * QUERY_BLOCK;
            let block_sums = sums.block_sums(q0, out.len());
            for (qi, s) in out.iter_mut().enumerate() {
                let row_sums = &block_sums[qi * n_clusters..(qi + 1) * n_clusters];
                *s = silhouette_of_row(row_sums, sizes, codes[q0 + qi] as usize);
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
    Ok(silhouette_dense(x, d, &codes, &sizes, distance))
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
        let subset = gather_rows(x, d, rows);
        let s = silhouette_dense(&subset, d, &batch_codes, &sizes, distance);
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
    fn tight_clusters_keep_precision() {
        // Cosine distances of order 1e-8 inside clusters: the cluster-sum form must stay as
        // accurate as summing the distances one by one.
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let d = 6;
        let centres: Vec<f64> = (0..3 * d).map(|_| rng.random::<f64>() - 0.5).collect();
        let labels: Vec<u32> = (0..300).map(|i| i % 3).collect();
        let x: Vec<f64> = (0..300 * d)
            .map(|k| centres[labels[k / d] as usize * d + k % d] + 1e-4 * rng.random::<f64>())
            .collect();
        let fast = silhouette_samples(&x, d, &labels, Distance::Cosine).unwrap();
        let slow = brute_force(&x, d, &labels, Distance::Cosine);
        for (f, s) in fast.iter().zip(&slow) {
            assert!((f - s).abs() < 1e-9, "{f} vs {s}");
        }
    }

    #[test]
    fn zero_row_is_at_cosine_distance_one() {
        let x = [0.0, 0.0, 1.0, 0.0, 1.0, 0.1, 0.0, 1.0, 0.1, 1.0];
        let s = silhouette_samples(&x, 2, &[0, 0, 0, 1, 1], Distance::Cosine).unwrap();
        // Row 0 is at distance 1 from every other row: a = b = 1.
        assert_eq!(s[0], 0.0);
        // Row 3 = (0, 1): own cluster {(0.1, 1)}, other cluster {0, (1, 0), (1, 0.1)}.
        let cos = |a: [f64; 2], b: [f64; 2]| {
            1.0 - (a[0] * b[0] + a[1] * b[1]) / (a[0].hypot(a[1]) * b[0].hypot(b[1]))
        };
        let a = cos([0.0, 1.0], [0.1, 1.0]);
        let b = (1.0 + cos([0.0, 1.0], [1.0, 0.0]) + cos([0.0, 1.0], [1.0, 0.1])) / 3.0;
        assert!(
            (s[3] - (b - a) / b).abs() < 1e-15,
            "{} vs {}",
            s[3],
            (b - a) / b
        );
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
