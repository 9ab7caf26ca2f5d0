//! Small kNN quality checks used by tests and the run summary: batch mixing and label purity.
//!
//! Exact brute-force neighbours (O(n^2 p)); meant for checks on up to ~20k rows. The full
//! metric suite (scib / copairs) is the evaluation crate's job.

use crate::kernels::distance::sq_distances_to;
use rayon::prelude::*;

/// The `k` nearest neighbours (self excluded) of every row of a row-major `n x p` matrix.
pub fn knn_indices(x: &[f32], p: usize, k: usize) -> Vec<Vec<usize>> {
    let n = x.len() / p;
    (0..n)
        .into_par_iter()
        .map(|i| {
            let mut d = vec![0.0; n];
            sq_distances_to(&x[i * p..(i + 1) * p], x, p, &mut d);
            let mut idx: Vec<usize> = (0..n).filter(|&j| j != i).collect();
            let kk = k.min(idx.len());
            if kk > 0 && kk < idx.len() {
                idx.select_nth_unstable_by(kk - 1, |&a, &b| d[a].total_cmp(&d[b]).then(a.cmp(&b)));
            }
            idx.truncate(kk);
            idx.sort_by(|&a, &b| d[a].total_cmp(&d[b]).then(a.cmp(&b)));
            idx
        })
        .collect()
}

/// Batch mixing: mean over rows of (fraction of neighbours from another batch) divided by the
/// fraction expected under perfect mixing (`1 - n_b / n`). 1 = perfectly mixed, 0 = separated.
pub fn batch_mixing(neighbours: &[Vec<usize>], batch: &[usize]) -> f64 {
    let n = batch.len();
    let nb = batch.iter().max().map_or(0, |&m| m + 1);
    let mut sizes = vec![0usize; nb];
    batch.iter().for_each(|&b| sizes[b] += 1);
    let total: f64 = neighbours
        .iter()
        .enumerate()
        .map(|(i, nn)| {
            let other = nn.iter().filter(|&&j| batch[j] != batch[i]).count() as f64
                / nn.len().max(1) as f64;
            let expected = 1.0 - sizes[batch[i]] as f64 / n as f64;
            if expected > 0.0 {
                other / expected
            } else {
                1.0
            }
        })
        .sum();
    total / n as f64
}

/// Label purity: mean fraction of a row's neighbours that share its label.
pub fn label_purity(neighbours: &[Vec<usize>], label: &[usize]) -> f64 {
    let total: f64 = neighbours
        .iter()
        .enumerate()
        .map(|(i, nn)| {
            nn.iter().filter(|&&j| label[j] == label[i]).count() as f64 / nn.len().max(1) as f64
        })
        .sum();
    total / label.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separated_and_mixed_batches() {
        // Two clusters (labels) x two batches. Batches separated along the second axis.
        let mut x = Vec::new();
        let mut batch = Vec::new();
        let mut label = Vec::new();
        for i in 0..40 {
            let l = i % 2;
            let b = (i / 2) % 2;
            x.extend([l as f32 * 100.0 + (i as f32) * 0.01, b as f32 * 10.0]);
            batch.push(b);
            label.push(l);
        }
        let nn = knn_indices(&x, 2, 5);
        assert!(batch_mixing(&nn, &batch) < 0.05);
        assert!((label_purity(&nn, &label) - 1.0).abs() < 1e-12);
        // Remove the batch axis: batches mix, labels stay pure.
        let mixed: Vec<f32> = x.chunks(2).flat_map(|r| [r[0], 0.0]).collect();
        let nn = knn_indices(&mixed, 2, 5);
        assert!(batch_mixing(&nn, &batch) > 0.6);
        assert!((label_purity(&nn, &label) - 1.0).abs() < 1e-12);
    }
}
