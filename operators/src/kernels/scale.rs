//! Per-batch local scales: the squared distance from a landmark to its k-th nearest neighbour
//! inside every batch.

use rayon::prelude::*;

/// The local scale of one landmark inside one batch.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BatchScale {
    /// The neighbour rank actually used (`k` clipped to the batch size, self excluded).
    pub k_used: usize,
    /// Squared distance to the `k_used`-th nearest neighbour (0 when the batch holds only self).
    pub sigma2_kth: f64,
    /// `sigma2_kth` after the floor `1e-12 * max_j d2 + 1e-30`.
    pub sigma2: f64,
}

/// Computes the per-batch scales of landmark `self_index`.
///
/// `d2` holds the squared distances from the landmark to every point, with points grouped by
/// batch: batch `b` is `d2[offsets[b]..offsets[b + 1]]`. `scratch` is reused between calls.
pub fn batch_scales(
    d2: &[f64],
    offsets: &[usize],
    self_index: usize,
    k: usize,
    scratch: &mut Vec<f64>,
) -> Vec<BatchScale> {
    let max_d2 = d2.par_iter().copied().reduce(|| 0.0f64, f64::max);
    let floor = 1e-12 * max_d2 + 1e-30;
    let windows: Vec<(usize, usize)> = offsets.windows(2).map(|w| (w[0], w[1])).collect();
    let one = |(lo, hi): (usize, usize), scratch: &mut Vec<f64>| {
        scratch.clear();
        if (lo..hi).contains(&self_index) {
            scratch.extend_from_slice(&d2[lo..self_index]);
            scratch.extend_from_slice(&d2[self_index + 1..hi]);
        } else {
            scratch.extend_from_slice(&d2[lo..hi]);
        }
        let k_used = k.min(scratch.len());
        let sigma2_kth = if k_used == 0 {
            0.0
        } else {
            let (_, kth, _) = scratch.select_nth_unstable_by(k_used - 1, f64::total_cmp);
            *kth
        };
        BatchScale {
            k_used,
            sigma2_kth,
            sigma2: sigma2_kth.max(floor),
        }
    };
    if windows.len() == 1 {
        return vec![one(windows[0], scratch)];
    }
    windows
        .into_par_iter()
        .map_init(Vec::new, |scr, w| one(w, scr))
        .collect()
}

/// Writes the scaled distances `s_j = d2_j / sigma2_{b(j)}` (and `s_self = 0`).
pub fn scaled_distances(
    d2: &[f64],
    offsets: &[usize],
    scales: &[BatchScale],
    self_index: usize,
    out: &mut [f64],
) {
    for (b, w) in offsets.windows(2).enumerate() {
        let sigma2 = scales[b].sigma2;
        out[w[0]..w[1]]
            .par_chunks_mut(16 * 1024)
            .zip(d2[w[0]..w[1]].par_chunks(16 * 1024))
            .for_each(|(o, d)| {
                for (dst, &v) in o.iter_mut().zip(d) {
                    *dst = v / sigma2;
                }
            });
    }
    out[self_index] = 0.0;
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn brute(d2: &[f64], offsets: &[usize], i: usize, k: usize) -> Vec<(usize, f64)> {
        offsets
            .windows(2)
            .map(|w| {
                let mut v: Vec<f64> = (w[0]..w[1]).filter(|&j| j != i).map(|j| d2[j]).collect();
                v.sort_by(f64::total_cmp);
                let ku = k.min(v.len());
                (ku, if ku == 0 { 0.0 } else { v[ku - 1] })
            })
            .collect()
    }

    #[test]
    fn matches_sorting_reference_self_excluded_and_clipped() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let offsets = [0, 1, 5, 30, 31, 60];
        let d2: Vec<f64> = (0..60).map(|_| rng.random::<f64>() * 10.0).collect();
        let mut scratch = Vec::new();
        for &i in &[0usize, 2, 17, 30, 59] {
            for &k in &[1usize, 3, 10, 40] {
                let mut d = d2.clone();
                d[i] = 0.0;
                let got = batch_scales(&d, &offsets, i, k, &mut scratch);
                let want = brute(&d, &offsets, i, k);
                for (g, w) in got.iter().zip(&want) {
                    assert_eq!(g.k_used, w.0);
                    assert_eq!(g.sigma2_kth, w.1);
                }
            }
        }
    }

    #[test]
    fn duplicates_are_floored() {
        // All points identical except one far point: the k-th distance is 0 and gets floored.
        let d2 = vec![0.0, 0.0, 0.0, 0.0, 100.0];
        let s = batch_scales(&d2, &[0, 5], 0, 2, &mut Vec::new());
        assert_eq!(s[0].sigma2_kth, 0.0);
        assert_eq!(s[0].sigma2, 1e-12 * 100.0 + 1e-30);
        let mut out = vec![0.0; 5];
        scaled_distances(&d2, &[0, 5], &s, 0, &mut out);
        assert!(out[4] > 1e11 && out[1] == 0.0);
    }
}
