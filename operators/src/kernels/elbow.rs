//! Elbow rules that sparsify one affinity row.
//!
//! Every rule returns a threshold `t` on the scaled distances `s_j` of the row: the row keeps
//! exactly the points with `s_j < t` (self has `s = 0` and is always kept). Candidates are the
//! non-self points with affinity `exp(-s_j) >= a_min`. A row always keeps at least `r_min`
//! entries (self included): when a rule keeps fewer, the `r_min` nearest points are kept.

use crate::config::ElbowRule;
use rayon::prelude::*;

/// Parameters of the elbow rules.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ElbowParams {
    /// Which rule.
    pub rule: ElbowRule,
    /// Smallest candidate affinity (default 1e-8, i.e. `s <= 18.42`).
    pub a_min: f64,
    /// Histogram bins of [`ElbowRule::Kneedle`] (default 4096).
    pub bins: usize,
    /// Minimum kept entries per row, self included (default `k + 1`).
    pub r_min: usize,
    /// Lowest threshold a row may get (0: none; see `BATCH_KNN_FLOOR`).
    pub min_threshold: f64,
}

/// Returns the threshold of one row under `params` (see the module docs).
pub fn row_threshold(
    s: &[f64],
    self_index: usize,
    params: &ElbowParams,
    scratch: &mut Vec<f64>,
) -> f64 {
    let s_max = -params.a_min.ln();
    let t = match params.rule {
        ElbowRule::Kneedle => kneedle_histogram(s, self_index, s_max, params.bins, params.r_min),
        rule => {
            scratch.clear();
            scratch.extend(
                s.iter()
                    .enumerate()
                    .filter(|&(j, &v)| j != self_index && v <= s_max)
                    .map(|(_, &v)| v),
            );
            scratch.sort_unstable_by(f64::total_cmp);
            match rule {
                ElbowRule::KneedleSorted => kneedle_sorted(scratch, params.r_min),
                ElbowRule::MaxGap => max_gap(scratch, params.r_min, false),
                ElbowRule::MaxLogGap => max_gap(scratch, params.r_min, true),
                ElbowRule::Kneedle => unreachable!(),
            }
        }
    };
    enforce_min_kept(s, t, params.r_min, scratch).max(params.min_threshold)
}

/// Raises `t` so that at least `r_min` entries of `s` lie below it.
pub fn enforce_min_kept(s: &[f64], t: f64, r_min: usize, scratch: &mut Vec<f64>) -> f64 {
    let kept = s.par_iter().filter(|&&v| v < t).count();
    if kept >= r_min.min(s.len()) || r_min == 0 {
        return t;
    }
    scratch.clear();
    scratch.extend_from_slice(s);
    let r = r_min.min(s.len());
    let (_, nth, _) = scratch.select_nth_unstable_by(r - 1, f64::total_cmp);
    nth.next_up().max(t)
}

/// Kneedle located on a histogram of the candidates' scaled distances over `[0, s_max]`.
///
/// With `L` candidates, `cum_b` of them below the upper edge `e_b` of bin `b`, the curve is
/// `x_b = cum_b / L`, `y_b = (exp(-e_b) - a_last) / (a_first - a_last)` where `a_first` is the
/// affinity at the lower edge of the first non-empty bin and `a_last` at the upper edge of the
/// last one; the knee maximises `(1 - x_b) - y_b` over bins with `cum_b >= r_min - 1`, and the
/// threshold is that bin's upper edge. Bin assignment follows `numpy.histogram`.
pub fn kneedle_histogram(
    s: &[f64],
    self_index: usize,
    s_max: f64,
    bins: usize,
    r_min: usize,
) -> f64 {
    let step = s_max / bins as f64;
    let edge = |i: usize| if i == bins { s_max } else { i as f64 * step };
    let norm = bins as f64 / s_max;
    // Integer counts per fixed chunk, merged: exact whatever the thread count.
    const CHUNK: usize = 64 * 1024;
    let counts: Vec<u64> = s
        .par_chunks(CHUNK)
        .enumerate()
        .map(|(c, chunk)| {
            let mut counts = vec![0u64; bins];
            for (i, &v) in chunk.iter().enumerate() {
                if c * CHUNK + i == self_index || v.is_nan() || v > s_max {
                    continue;
                }
                let mut idx = ((v * norm) as usize).min(bins - 1);
                if v < edge(idx) {
                    idx -= 1;
                } else if idx + 1 < bins && v >= edge(idx + 1) {
                    idx += 1;
                }
                counts[idx] += 1;
            }
            counts
        })
        .reduce(
            || vec![0u64; bins],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        );
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let first = counts.iter().position(|&c| c > 0).unwrap();
    let last = counts.iter().rposition(|&c| c > 0).unwrap();
    let a_first = (-edge(first)).exp();
    let a_last = (-edge(last + 1)).exp();
    let span = a_first - a_last;
    let min_cum = r_min.saturating_sub(1) as u64;
    let mut best: Option<(f64, usize)> = None;
    let mut cum = 0u64;
    for (b, &c) in counts.iter().enumerate() {
        cum += c;
        if cum < min_cum || cum == 0 {
            continue;
        }
        let x = cum as f64 / total as f64;
        let y = ((-edge(b + 1)).exp() - a_last) / span;
        let d = (1.0 - x) - y;
        if best.is_none_or(|(bd, _)| d > bd) {
            best = Some((d, b));
        }
    }
    match best {
        Some((_, b)) => edge(b + 1),
        // Fewer candidates than r_min - 1: keep them all.
        None => s_max.next_up(),
    }
}

/// Kneedle on the sorted candidate scaled distances `sorted` (ascending).
///
/// The r-th nearest candidate (1-based) has `x = r / L` and
/// `y = (a_r - a_L) / (a_1 - a_L)`; the knee maximises `(1 - x) - y` over `r >= r_min - 1`.
pub fn kneedle_sorted(sorted: &[f64], r_min: usize) -> f64 {
    let l = sorted.len();
    if l == 0 {
        return 0.0;
    }
    let a_first = (-sorted[0]).exp();
    let a_last = (-sorted[l - 1]).exp();
    let span = a_first - a_last;
    if span <= 0.0 {
        return sorted[l - 1].next_up();
    }
    let start = r_min.saturating_sub(1).max(1);
    if start > l {
        return sorted[l - 1].next_up();
    }
    let mut best = (f64::NEG_INFINITY, start);
    for r in start..=l {
        let x = r as f64 / l as f64;
        let y = ((-sorted[r - 1]).exp() - a_last) / span;
        let d = (1.0 - x) - y;
        if d > best.0 {
            best = (d, r);
        }
    }
    sorted[best.1 - 1].next_up()
}

/// Largest drop between consecutive sorted candidates, in affinity (`log = false`) or in
/// log-affinity (`log = true`); keeps the candidates before the drop.
pub fn max_gap(sorted: &[f64], r_min: usize, log: bool) -> f64 {
    let l = sorted.len();
    if l == 0 {
        return 0.0;
    }
    let start = r_min.saturating_sub(1).max(1);
    if start >= l {
        return sorted[l - 1].next_up();
    }
    let mut best = (f64::NEG_INFINITY, start);
    for r in start..l {
        let gap = if log {
            sorted[r] - sorted[r - 1]
        } else {
            (-sorted[r - 1]).exp() - (-sorted[r]).exp()
        };
        if gap > best.0 {
            best = (gap, r);
        }
    }
    sorted[best.1 - 1].next_up()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn params(rule: ElbowRule) -> ElbowParams {
        ElbowParams {
            rule,
            a_min: 1e-8,
            bins: 4096,
            r_min: 11,
            min_threshold: 0.0,
        }
    }

    #[test]
    fn min_threshold_raises_a_low_threshold_only() {
        // Three near points, then a wide gap: max-gap stops at the gap (t <= 0.2+).
        let s: Vec<f64> = [0.0, 0.1, 0.15, 0.2, 3.0, 3.1, 3.2, 3.3].to_vec();
        let mut p = params(ElbowRule::MaxGap);
        p.r_min = 2;
        let mut scratch = Vec::new();
        let plain = row_threshold(&s, 0, &p, &mut scratch);
        assert!(plain <= 3.0 && plain > 0.2, "{plain}");
        p.min_threshold = crate::config::BATCH_KNN_FLOOR;
        let floored = row_threshold(&s, 0, &p, &mut scratch);
        assert_eq!(floored, plain.max(crate::config::BATCH_KNN_FLOOR));
        p.min_threshold = 0.05;
        assert_eq!(row_threshold(&s, 0, &p, &mut scratch), plain);
    }

    /// A row with a clear elbow: a tight cluster of `c` points, then a diffuse tail.
    fn clustered_row(rng: &mut ChaCha8Rng, c: usize, n: usize) -> Vec<f64> {
        let mut s = vec![0.0];
        s.extend((0..c).map(|_| rng.random::<f64>() * 0.5));
        s.extend((0..n - c - 1).map(|_| 3.0 + rng.random::<f64>() * 20.0));
        s
    }

    #[test]
    fn histogram_and_sorted_forms_agree() {
        // Stated tolerance: the histogram threshold lies within one bin width of the sorted
        // threshold's bin, so the kept sets differ only by points inside that bin (here <= 2%).
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for trial in 0..20 {
            let c = 20 + trial * 13;
            let s = clustered_row(&mut rng, c, 2000);
            let mut scratch = Vec::new();
            let th = row_threshold(&s, 0, &params(ElbowRule::Kneedle), &mut scratch);
            let ts = row_threshold(&s, 0, &params(ElbowRule::KneedleSorted), &mut scratch);
            let kh = s.iter().filter(|&&v| v < th).count() as f64;
            let ks = s.iter().filter(|&&v| v < ts).count() as f64;
            assert!(
                (kh - ks).abs() <= 0.02 * ks + 2.0,
                "trial {trial}: {kh} vs {ks}"
            );
            assert!(
                (th - ts).abs() <= 2.0 * 18.42 / 4096.0 + 0.5,
                "{th} vs {ts}"
            );
        }
    }

    #[test]
    fn kneedle_sorted_matches_definition_by_brute_force() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let s = clustered_row(&mut rng, 40, 300);
        let mut cand: Vec<f64> = s[1..].iter().copied().filter(|&v| v <= 18.42068).collect();
        cand.sort_by(f64::total_cmp);
        let l = cand.len();
        let (a1, al) = ((-cand[0]).exp(), (-cand[l - 1]).exp());
        let best_r = (10..=l)
            .max_by(|&a, &b| {
                let d = |r: usize| {
                    (1.0 - r as f64 / l as f64) - ((-cand[r - 1]).exp() - al) / (a1 - al)
                };
                d(a).total_cmp(&d(b)).then(b.cmp(&a))
            })
            .unwrap();
        let t = row_threshold(&s, 0, &params(ElbowRule::KneedleSorted), &mut Vec::new());
        assert_eq!(s.iter().filter(|&&v| v < t).count(), best_r + 1);
        // The knee is the first point past the tight cluster of 40 (largest distance below the
        // chord), so the row keeps the cluster plus that one point.
        assert_eq!(best_r, 41);
    }

    #[test]
    fn gap_rules_find_the_cluster_edge() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let s = clustered_row(&mut rng, 30, 500);
        let t = row_threshold(&s, 0, &params(ElbowRule::MaxGap), &mut Vec::new());
        assert_eq!(s.iter().filter(|&&v| v < t).count(), 31);
        let t = row_threshold(&s, 0, &params(ElbowRule::MaxLogGap), &mut Vec::new());
        assert!(s.iter().filter(|&&v| v < t).count() >= 11);
    }

    #[test]
    fn keeps_at_least_r_min() {
        // Two candidates only: every rule keeps the r_min nearest (here all 3 points).
        let s = vec![0.0, 1.0, 30.0];
        for rule in [
            ElbowRule::Kneedle,
            ElbowRule::KneedleSorted,
            ElbowRule::MaxGap,
            ElbowRule::MaxLogGap,
        ] {
            let t = row_threshold(&s, 0, &params(rule), &mut Vec::new());
            assert_eq!(s.iter().filter(|&&v| v < t).count(), 3, "{rule}");
        }
        // Many far points: r_min nearest kept.
        let s: Vec<f64> = std::iter::once(0.0)
            .chain((1..100).map(|i| 50.0 + i as f64))
            .collect();
        let t = row_threshold(&s, 0, &params(ElbowRule::Kneedle), &mut Vec::new());
        assert_eq!(s.iter().filter(|&&v| v < t).count(), 11);
    }

    #[test]
    fn histogram_bins_follow_numpy_edges() {
        // A value exactly on an edge goes to the bin above it, as in numpy.histogram.
        let s_max = -(1e-8f64).ln();
        let step = s_max / 4096.0;
        let mut s = vec![0.0];
        s.extend(std::iter::repeat_n(10.0 * step, 12));
        s.extend(std::iter::repeat_n(3000.0 * step, 50));
        let t = kneedle_histogram(&s, 0, s_max, 4096, 11);
        assert!(
            t > 10.0 * step,
            "edge values belong to bin 10, threshold {t}"
        );
    }
}
