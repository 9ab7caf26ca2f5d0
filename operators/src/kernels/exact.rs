//! Order-independent sums for reductions across partitions.
//!
//! Every reduction of the engine (PCA Gram matrix, ComBat moments, the smoothing sums
//! `Y = A_S X`) is split into fixed *leaves*: blocks of [`crate::config::BalansConfig::leaf_rows`]
//! consecutive rows of the global row order. A leaf is summed in `f64`, in row order, by one
//! task, so its value does not depend on how the rows are partitioned or on the thread count.
//! Leaf sums are then converted to fixed point and added as 128-bit integers ([`ExactSum`]),
//! which is associative: partitions can merge their leaves in any order and the total has the
//! same bits. Each slot's scale comes from a bound on the total's magnitude (for example
//! `rows * max |x|`), so the fixed-point grid is far finer than `f64`'s own rounding of the
//! leaf sums (at least 70 bits below the bound).

/// Top bit position used: totals up to `2^125` in magnitude fit an `i128` with room to spare.
const FIXED_TOP_BIT: i32 = 125;

/// The power-of-two exponent `F` of a slot whose total is at most `bound` in magnitude: values
/// are stored as `trunc(v * 2^F)`.
pub fn fixed_exponent(bound: f64) -> i32 {
    let bound = if bound.is_finite() && bound > 0.0 {
        bound
    } else {
        f64::MIN_POSITIVE
    };
    // ceil(log2(bound)), clamped so that 2^F stays a normal f64.
    let e = bound.log2().ceil() as i32 + 1;
    (FIXED_TOP_BIT - e).clamp(-1000, 1000)
}

/// `2^e` as an exact `f64` (`|e| <= 1000`).
fn pow2(e: i32) -> f64 {
    f64::from_bits(((1023 + e) as u64) << 52)
}

/// Fixed-point sums with one scale per slot group (slot `i` uses scale `i % period`).
#[derive(Debug, Clone, PartialEq)]
pub struct ExactSum {
    fixed: Vec<i128>,
    scale: Vec<f64>,
    inverse: Vec<f64>,
}

impl ExactSum {
    /// `len` zero slots; `bounds[i % bounds.len()]` bounds the magnitude of slot `i`'s total.
    pub fn new(len: usize, bounds: &[f64]) -> Self {
        assert!(
            !bounds.is_empty() || len == 0,
            "ExactSum needs at least one bound"
        );
        let exps: Vec<i32> = bounds.iter().map(|&b| fixed_exponent(b)).collect();
        Self {
            fixed: vec![0; len],
            scale: exps.iter().map(|&e| pow2(e)).collect(),
            inverse: exps.iter().map(|&e| pow2(-e)).collect(),
        }
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.fixed.len()
    }

    /// Whether there are no slots.
    pub fn is_empty(&self) -> bool {
        self.fixed.is_empty()
    }

    /// Bytes held (for memory accounting) for `len` slots and `period` scales.
    pub fn size_bytes(len: usize, period: usize) -> usize {
        len * 16 + period * 16
    }

    #[inline]
    fn to_fixed(&self, i: usize, v: f64) -> i128 {
        // Scaling by a power of two is exact; the conversion truncates toward zero and
        // saturates (a bound that was too small would show as a saturated total, never as UB).
        (v * self.scale[i % self.scale.len()]) as i128
    }

    /// Adds `v` to slot `i`.
    #[inline]
    pub fn add(&mut self, i: usize, v: f64) {
        let f = self.to_fixed(i, v);
        self.fixed[i] = self.fixed[i].wrapping_add(f);
    }

    /// Adds `values[k]` to slot `start + k`.
    pub fn add_slice(&mut self, start: usize, values: &[f64]) {
        for (k, &v) in values.iter().enumerate() {
            self.add(start + k, v);
        }
    }

    /// Adds another sum with the same layout (integer addition: any order gives the same bits).
    pub fn merge(&mut self, other: &ExactSum) {
        assert_eq!(
            self.fixed.len(),
            other.fixed.len(),
            "ExactSum layouts differ"
        );
        assert_eq!(self.scale, other.scale, "ExactSum scales differ");
        for (a, &b) in self.fixed.iter_mut().zip(&other.fixed) {
            *a = a.wrapping_add(b);
        }
    }

    /// The total of slot `i` as `f64`.
    #[inline]
    pub fn value(&self, i: usize) -> f64 {
        self.fixed[i] as f64 * self.inverse[i % self.inverse.len()]
    }

    /// All totals as `f64`.
    pub fn values(&self) -> Vec<f64> {
        (0..self.fixed.len()).map(|i| self.value(i)).collect()
    }

    /// The slots as little-endian bytes (for Arrow `Binary` partial states).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.fixed.len() * 16);
        for v in &self.fixed {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Adds slots serialised by [`ExactSum::to_bytes`] from a sum with this layout.
    pub fn merge_bytes(&mut self, bytes: &[u8]) -> Option<()> {
        if bytes.len() != self.fixed.len() * 16 {
            return None;
        }
        for (a, chunk) in self.fixed.iter_mut().zip(bytes.chunks_exact(16)) {
            let v = i128::from_le_bytes(chunk.try_into().ok()?);
            *a = a.wrapping_add(v);
        }
        Some(())
    }
}

/// The leaves `[start, end)` (global rows) whose first row lies in `rows`, for `n` rows in all.
pub fn leaves_starting_in(
    rows: std::ops::Range<usize>,
    n: usize,
    leaf_rows: usize,
) -> Vec<std::ops::Range<usize>> {
    let leaf_rows = leaf_rows.max(1);
    let first = rows.start.div_ceil(leaf_rows) * leaf_rows;
    (first..rows.end.min(n))
        .step_by(leaf_rows)
        .map(|s| s..(s + leaf_rows).min(n))
        .collect()
}

/// A 64-bit hash of a row number under a seed (SplitMix64 finaliser): the row sample of
/// landmark sampling keeps row `j` when `row_hash(seed, j) < threshold`, whatever the
/// partitioning.
pub fn row_hash(seed: u64, row: u64) -> u64 {
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(row)
        .wrapping_add(0x632B_E59B_D9B4_E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The hash threshold that keeps a fraction `rate` of rows (`u64::MAX` keeps every row).
pub fn rate_threshold(rate: f64) -> u64 {
    if rate >= 1.0 {
        u64::MAX
    } else if rate <= 0.0 {
        0
    } else {
        (rate * 18_446_744_073_709_551_616.0) as u64
    }
}

/// Whether row `row` is in the sample kept below `threshold` ([`rate_threshold`]).
#[inline]
pub fn in_row_sample(seed: u64, row: u64, threshold: u64) -> bool {
    threshold == u64::MAX || row_hash(seed, row) < threshold
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn sums_do_not_depend_on_grouping_or_order() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let values: Vec<f64> = (0..10_000)
            .map(|_| (rng.random::<f64>() - 0.5) * 1e3)
            .collect();
        let bound = values.iter().map(|v| v.abs()).sum::<f64>();
        let total = |groups: &[usize]| {
            let mut acc = ExactSum::new(1, &[bound]);
            let mut start = 0;
            for &g in groups {
                let mut part = ExactSum::new(1, &[bound]);
                let leaf: f64 = values[start..start + g].iter().sum();
                part.add(0, leaf);
                acc.merge(&part);
                start += g;
            }
            acc
        };
        // The same leaves merged in any grouping give the same bits.
        let mut a = ExactSum::new(1, &[bound]);
        let mut b = ExactSum::new(1, &[bound]);
        let leaves: Vec<f64> = values.chunks(1000).map(|c| c.iter().sum()).collect();
        for &l in &leaves {
            a.add(0, l);
        }
        for &l in leaves.iter().rev() {
            b.add(0, l);
        }
        assert_eq!(a, b);
        assert_eq!(a.value(0).to_bits(), b.value(0).to_bits());
        let exact: f64 = values.iter().sum();
        assert!((a.value(0) - exact).abs() <= 1e-9 * bound);
        // Different leaf cuts give (slightly) different sums, but each is close to the truth.
        let c = total(&[3000, 7000]);
        assert!((c.value(0) - exact).abs() <= 1e-9 * bound);
    }

    #[test]
    fn bytes_round_trip_and_scales_per_slot() {
        let mut a = ExactSum::new(4, &[1.0, 1e12]);
        a.add_slice(0, &[0.25, 5e11, -0.5, -3e11]);
        let mut b = ExactSum::new(4, &[1.0, 1e12]);
        b.merge_bytes(&a.to_bytes()).unwrap();
        assert_eq!(a, b);
        assert_eq!(b.values(), vec![0.25, 5e11, -0.5, -3e11]);
        assert!(b.merge_bytes(&[0u8; 3]).is_none());
        // Tiny values far below a slot's bound lose only bits below 2^-(125 - log2 bound).
        let mut c = ExactSum::new(1, &[1e6]);
        c.add(0, 1e-9);
        assert!((c.value(0) - 1e-9).abs() < 1e-20);
    }

    #[test]
    fn leaves_belong_to_the_partition_of_their_first_row() {
        assert_eq!(leaves_starting_in(0..10, 25, 10), vec![0..10]);
        assert_eq!(leaves_starting_in(3..12, 25, 10), vec![10..20]);
        assert_eq!(leaves_starting_in(12..25, 25, 10), vec![20..25]);
        assert!(leaves_starting_in(21..25, 25, 10).is_empty());
        // Every leaf is claimed exactly once, whatever the cut.
        for cuts in [vec![0, 25], vec![0, 7, 13, 25], vec![0, 1, 2, 20, 25]] {
            let all: Vec<_> = cuts
                .windows(2)
                .flat_map(|w| leaves_starting_in(w[0]..w[1], 25, 10))
                .collect();
            assert_eq!(all, vec![0..10, 10..20, 20..25]);
        }
    }

    #[test]
    fn row_sample_keeps_about_the_rate() {
        let t = rate_threshold(0.1);
        let kept = (0..100_000u64).filter(|&r| in_row_sample(7, r, t)).count();
        assert!((9_000..11_000).contains(&kept), "{kept}");
        assert!((0..1000u64).all(|r| in_row_sample(7, r, rate_threshold(1.0))));
        assert_ne!(row_hash(1, 5), row_hash(2, 5));
    }
}
