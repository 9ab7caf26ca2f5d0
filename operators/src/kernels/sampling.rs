//! Coverage-based adaptive landmark sampling (the paper's Algorithm 1, as the spec fixes it).
//!
//! Landmarks are drawn in blocks of `J` steps. `c_J(i)` is the sum of the kept affinities of
//! the rows sampled in the current block (reset after each block); `covered` marks points kept
//! by any row so far. The next landmark is uniform among points with `c_J = 0` that were never
//! covered; else uniform among points with `c_J = 0`; else drawn with probability proportional
//! to `1 / c_J(i)`. The first landmark is uniform. Sampling stops after `tau` consecutive rows
//! that cover no new point, or at the landmark cap.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Why the sampling loop stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StopReason {
    /// `tau` consecutive landmarks covered no new point.
    Tau,
    /// The landmark cap was reached.
    MaxLandmarks,
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tau => "tau",
            Self::MaxLandmarks => "max-landmarks",
        })
    }
}

/// State of the adaptive sampler over `n` points.
#[derive(Debug, Clone)]
pub struct AdaptiveSampler {
    rng: ChaCha8Rng,
    block: usize,
    tau: usize,
    max_landmarks: usize,
    c_block: Vec<f64>,
    covered: Vec<bool>,
    n_covered: usize,
    steps: usize,
    zero_streak: usize,
    first_full_coverage: Option<usize>,
}

impl AdaptiveSampler {
    /// A sampler over `n` points with block length `block`, patience `tau`, a landmark cap
    /// and a seed.
    pub fn new(n: usize, block: usize, tau: usize, max_landmarks: usize, seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            block: block.max(1),
            tau: tau.max(1),
            max_landmarks: max_landmarks.max(1),
            c_block: vec![0.0; n],
            covered: vec![false; n],
            n_covered: 0,
            steps: 0,
            zero_streak: 0,
            first_full_coverage: None,
        }
    }

    /// Draws the next landmark index.
    pub fn next_index(&mut self) -> usize {
        let n = self.c_block.len();
        if self.steps == 0 {
            return self.rng.random_range(0..n);
        }
        let (c, cov) = (&self.c_block, &self.covered);
        let zero_uncovered = count_chunks(n, |j| c[j] == 0.0 && !cov[j]);
        let total: usize = zero_uncovered.iter().sum();
        if total > 0 {
            let r = self.rng.random_range(0..total);
            return nth_in_chunks(&zero_uncovered, r, |j| c[j] == 0.0 && !cov[j]);
        }
        let zero = count_chunks(n, |j| c[j] == 0.0);
        let total: usize = zero.iter().sum();
        if total > 0 {
            let r = self.rng.random_range(0..total);
            return nth_in_chunks(&zero, r, |j| c[j] == 0.0);
        }
        // Probability proportional to 1 / c: per-chunk sums (fixed chunks, so the result does
        // not depend on the thread count), then a scan inside the chosen chunk.
        let sums: Vec<f64> = c
            .par_chunks(CHUNK)
            .map(|ch| ch.iter().map(|&v| 1.0 / v).sum())
            .collect();
        let total: f64 = sums.iter().sum();
        let mut u = self.rng.random::<f64>() * total;
        for (k, &w) in sums.iter().enumerate() {
            if u < w || k + 1 == sums.len() {
                let start = k * CHUNK;
                let mut acc = 0.0;
                for (i, &v) in c[start..(start + CHUNK).min(n)].iter().enumerate() {
                    acc += 1.0 / v;
                    if acc > u {
                        return start + i;
                    }
                }
                return (start + CHUNK).min(n) - 1;
            }
            u -= w;
        }
        n - 1
    }

    /// Records a dense row: every point with `s_j < threshold` is kept with affinity
    /// `exp(-s_j)`. Same effect as [`Self::observe`], in parallel over fixed chunks.
    pub fn observe_dense(&mut self, s: &[f64], threshold: f64) -> usize {
        let delta: usize = self
            .c_block
            .par_chunks_mut(CHUNK)
            .zip(self.covered.par_chunks_mut(CHUNK))
            .zip(s.par_chunks(CHUNK))
            .map(|((c, cov), s)| {
                let mut d = 0;
                for ((cj, covj), &sj) in c.iter_mut().zip(cov.iter_mut()).zip(s) {
                    if sj < threshold {
                        *cj += (-sj).exp();
                        if !*covj {
                            *covj = true;
                            d += 1;
                        }
                    }
                }
                d
            })
            .sum();
        self.record_step(delta);
        delta
    }

    /// Records the kept entries `(index, affinity)` of the row just sampled and returns
    /// `Delta`, the number of points it covered for the first time.
    pub fn observe<I: IntoIterator<Item = (usize, f64)>>(&mut self, kept: I) -> usize {
        let mut delta = 0;
        for (j, a) in kept {
            self.c_block[j] += a;
            if !self.covered[j] {
                self.covered[j] = true;
                delta += 1;
            }
        }
        self.record_step(delta);
        delta
    }

    fn record_step(&mut self, delta: usize) {
        self.n_covered += delta;
        self.steps += 1;
        if self.first_full_coverage.is_none() && self.n_covered == self.covered.len() {
            self.first_full_coverage = Some(self.steps);
        }
        self.zero_streak = if delta == 0 { self.zero_streak + 1 } else { 0 };
        if self.steps.is_multiple_of(self.block) {
            self.c_block.par_iter_mut().for_each(|c| *c = 0.0);
        }
    }

    /// The reason to stop now, if any.
    pub fn stop_reason(&self) -> Option<StopReason> {
        if self.zero_streak >= self.tau {
            Some(StopReason::Tau)
        } else if self.steps >= self.max_landmarks {
            Some(StopReason::MaxLandmarks)
        } else {
            None
        }
    }

    /// Number of landmarks sampled so far.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Number of points covered so far.
    pub fn n_covered(&self) -> usize {
        self.n_covered
    }

    /// Which points are covered.
    pub fn covered(&self) -> &[bool] {
        &self.covered
    }

    /// The step after which every point was covered, if that happened.
    pub fn steps_to_full_coverage(&self) -> Option<usize> {
        self.first_full_coverage
    }
}

/// Points per parallel chunk of the sampler's scans (fixed: results do not depend on threads).
const CHUNK: usize = 64 * 1024;

/// Number of points matching `pred` in each fixed chunk of `0..n`.
fn count_chunks(n: usize, pred: impl Fn(usize) -> bool + Sync) -> Vec<usize> {
    (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|k| {
            (k * CHUNK..((k + 1) * CHUNK).min(n))
                .filter(|&j| pred(j))
                .count()
        })
        .collect()
}

/// Index of the `r`-th (0-based) point matching `pred`, given the per-chunk counts.
fn nth_in_chunks(counts: &[usize], mut r: usize, pred: impl Fn(usize) -> bool) -> usize {
    for (k, &c) in counts.iter().enumerate() {
        if r < c {
            return (k * CHUNK..)
                .filter(|&j| pred(j))
                .nth(r)
                .expect("r < count");
        }
        r -= c;
    }
    unreachable!("r exceeds the number of matching points")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefers_uncovered_zero_weight_points() {
        let mut s = AdaptiveSampler::new(10, 3, 5, 100, 1);
        let first = s.next_index();
        assert!(first < 10);
        // The first row covers points 0..5 with weight.
        assert_eq!(s.observe((0..5).map(|j| (j, 0.5))), 5);
        for _ in 0..50 {
            let i = s.clone().next_index();
            assert!(i >= 5, "must pick an uncovered zero-weight point, got {i}");
        }
    }

    #[test]
    fn then_zero_weight_then_inverse_weight() {
        let mut s = AdaptiveSampler::new(4, 10, 50, 100, 2);
        s.next_index();
        // Everything covered; points 0..3 get weight, point 3 stays at zero.
        assert_eq!(s.observe([(0, 1.0), (1, 1.0), (2, 1.0), (3, 0.0)]), 4);
        for _ in 0..20 {
            assert_eq!(s.clone().next_index(), 3);
        }
        s.observe([(3, 1.0)]);
        // Now all weights are positive: draw proportional to 1/c with c = (100, 1, 1, 2).
        s.observe([(0, 99.0), (3, 1.0)]);
        let mut hits = [0usize; 4];
        let mut rng_state = s.clone();
        for _ in 0..4000 {
            hits[rng_state.next_index()] += 1;
        }
        // Expected frequencies: 1/100 : 1 : 1 : 1/2 over a total of 2.51.
        assert!(hits[0] < 60, "{hits:?}");
        assert!(
            (hits[1] as f64 / 4000.0 - 1.0 / 2.51).abs() < 0.04,
            "{hits:?}"
        );
        assert!(
            (hits[3] as f64 / 4000.0 - 0.5 / 2.51).abs() < 0.04,
            "{hits:?}"
        );
    }

    #[test]
    fn weights_reset_after_each_block() {
        let mut s = AdaptiveSampler::new(3, 2, 50, 100, 3);
        s.observe([(0, 1.0), (1, 1.0), (2, 1.0)]);
        assert!(s.c_block.iter().all(|&c| c > 0.0));
        s.observe([(0, 1.0)]);
        assert!(
            s.c_block.iter().all(|&c| c == 0.0),
            "reset after J = 2 rows"
        );
    }

    #[test]
    fn delta_and_tau_stop() {
        let mut s = AdaptiveSampler::new(5, 20, 3, 100, 4);
        assert_eq!(s.observe([(0, 1.0), (1, 0.5)]), 2);
        assert_eq!(s.observe([(1, 1.0), (2, 0.5)]), 1);
        assert_eq!(s.stop_reason(), None);
        for _ in 0..2 {
            assert_eq!(s.observe([(0, 1.0)]), 0);
            assert_eq!(s.stop_reason(), None);
        }
        assert_eq!(s.observe([(1, 1.0)]), 0);
        assert_eq!(s.stop_reason(), Some(StopReason::Tau));
        assert_eq!(s.n_covered(), 3);
    }

    #[test]
    fn cap_stops() {
        let mut s = AdaptiveSampler::new(5, 20, 3, 2, 4);
        s.observe([(0, 1.0)]);
        s.observe([(1, 1.0)]);
        assert_eq!(s.stop_reason(), Some(StopReason::MaxLandmarks));
    }

    #[test]
    fn seeded_sequences_repeat() {
        let run = |seed| {
            let mut s = AdaptiveSampler::new(1000, 5, 10, 100, seed);
            (0..30)
                .map(|_| {
                    let i = s.next_index();
                    s.observe([(i, 1.0), ((i * 7) % 1000, 0.3)]);
                    i
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }
}
