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

/// The label-free criterion `--strength auto` ranks corrections by (see `docs/balans.md`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct AnchorCriterion {
    /// Batch mixing of the anchor rows after the correction ([`batch_mixing`] over their `k`
    /// nearest anchors, capped at 1): anchors hold the same biology in every batch, so a
    /// correction should mix them.
    pub anchor_mixing: f64,
    /// Mean `|ln(d_after / d_before)|` over the other rows, `d` = distance to the centroid of
    /// their own batch's anchors: the batch effect acts on a row and on its batch's anchors
    /// alike, so a correction should keep how far a row lies from its own controls.
    pub anchor_distance_change: f64,
    /// `anchor_mixing - anchor_distance_change` (higher is better).
    pub score: f64,
}

/// Scores a correction without labels: `before` and `after` are the same rows (row-major,
/// `p` columns) before and after it, `batch` their batch codes and `anchor` the anchor rows.
pub fn anchor_criterion(
    before: &[f32],
    after: &[f32],
    p: usize,
    batch: &[usize],
    anchor: &[bool],
    k: usize,
) -> AnchorCriterion {
    let n = batch.len();
    assert_eq!(before.len(), n * p);
    assert_eq!(after.len(), n * p);
    assert_eq!(anchor.len(), n);
    let anchors: Vec<usize> = (0..n).filter(|&i| anchor[i]).collect();
    let anchor_rows: Vec<f32> = anchors
        .iter()
        .flat_map(|&i| after[i * p..(i + 1) * p].iter().copied())
        .collect();
    let anchor_batch: Vec<usize> = anchors.iter().map(|&i| batch[i]).collect();
    let nn = knn_indices(&anchor_rows, p, k);
    let anchor_mixing = batch_mixing(&nn, &anchor_batch).min(1.0);
    let nb = batch.iter().max().map_or(0, |&b| b + 1);
    let centroids = |x: &[f32]| {
        let mut c = vec![0.0f64; nb * p];
        let mut count = vec![0usize; nb];
        for &i in &anchors {
            count[batch[i]] += 1;
            for (acc, &v) in c[batch[i] * p..(batch[i] + 1) * p]
                .iter_mut()
                .zip(&x[i * p..])
            {
                *acc += v as f64;
            }
        }
        for (b, &cnt) in count.iter().enumerate() {
            c[b * p..(b + 1) * p]
                .iter_mut()
                .for_each(|v| *v /= cnt.max(1) as f64);
        }
        c
    };
    let (c0, c1) = (centroids(before), centroids(after));
    let dist = |x: &[f32], c: &[f64]| {
        x.iter()
            .zip(c)
            .map(|(&v, &m)| (v as f64 - m).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let (mut total, mut rows) = (0.0f64, 0usize);
    for i in (0..n).filter(|&i| !anchor[i]) {
        let b = batch[i];
        let d0 = dist(&before[i * p..(i + 1) * p], &c0[b * p..(b + 1) * p]);
        let d1 = dist(&after[i * p..(i + 1) * p], &c1[b * p..(b + 1) * p]);
        if d0 > 0.0 && d1 > 0.0 {
            total += (d1 / d0).ln().abs();
            rows += 1;
        }
    }
    let anchor_distance_change = if rows > 0 { total / rows as f64 } else { 0.0 };
    AnchorCriterion {
        anchor_mixing,
        anchor_distance_change,
        score: anchor_mixing - anchor_distance_change,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchor_criterion_prefers_the_shift_seen_on_the_anchors() {
        // Two batches; controls at 0 and a compound at (4, 0) in batch 0 only. Batch 1 is
        // shifted by (0, 3). Removing the shift mixes the controls and keeps the distances;
        // pulling the compound onto the other batch's controls is penalised.
        let (mut x, mut batch, mut anchor) = (Vec::new(), Vec::new(), Vec::new());
        for b in 0..2 {
            for i in 0..30 {
                let jitter = (i as f32 * 0.37).sin() * 0.3;
                x.extend([jitter, b as f32 * 3.0 + (i as f32 * 0.11).cos() * 0.3]);
                batch.push(b);
                anchor.push(true);
            }
        }
        for i in 0..30 {
            x.extend([
                4.0 + (i as f32 * 0.7).sin() * 0.3,
                (i as f32 * 0.3).cos() * 0.3,
            ]);
            batch.push(0);
            anchor.push(false);
        }
        let unshift: Vec<f32> = x
            .chunks(2)
            .zip(&batch)
            .flat_map(|(r, &b)| [r[0], r[1] - 3.0 * b as f32])
            .collect();
        let none = anchor_criterion(&x, &x, 2, &batch, &anchor, 5);
        let good = anchor_criterion(&x, &unshift, 2, &batch, &anchor, 5);
        assert_eq!(none.anchor_distance_change, 0.0);
        assert!(none.anchor_mixing < 0.1);
        assert!(good.anchor_mixing > 0.6, "{good:?}");
        assert!(good.anchor_distance_change < 1e-6, "{good:?}");
        // Over-correction: the compound is also pulled halfway to the controls.
        let mut over = unshift.clone();
        for (r, &a) in over.chunks_mut(2).zip(&anchor) {
            if !a {
                r[0] *= 0.5;
            }
        }
        let bad = anchor_criterion(&x, &over, 2, &batch, &anchor, 5);
        assert!(bad.score < good.score - 0.3, "{bad:?} vs {good:?}");
        assert!(good.score > none.score + 0.5);
    }

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
