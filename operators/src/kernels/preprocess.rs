//! Profiling preprocessing kernels: pycytominer's `normalize` and `feature_select` and the
//! `mad_int_featselect` recipe of Arevalo et al. 2024, over feature columns.
//!
//! Every function works on one feature column (`&[f64]`, all rows) or on a column-major
//! matrix (column `j` is `data[j * n..(j + 1) * n]`); none takes DataFusion types. The
//! formulas follow the peer tools exactly (see `shared/golden/preprocess/README.md`):
//!
//! - medians are numpy's (the mean of the two middle order statistics for an even count);
//! - the MAD is scipy's `median_abs_deviation`, unscaled (`scale = 1`); pycytominer's
//!   `mad_robustize` multiplies it by 1.4826 and adds an epsilon (default `1e-18`);
//! - `standardize` is scikit-learn's `StandardScaler` (population standard deviation; a
//!   constant feature gets scale 1), `robustize` its `RobustScaler` (median, interquartile
//!   range by numpy's linear percentile; a zero range gets scale 1);
//! - the rank inverse normal transform uses stable ordinal ranks (ties broken by row order)
//!   and Blom's offset: `Φ⁻¹((rank − 3/8) / (n + 1/4))`;
//! - `frequency_threshold`, `variance_threshold`, `drop_na_columns` and
//!   `correlation_threshold` are pycytominer 1.7.1's rules.
//!
//! Fits skip non-finite values (pandas and scikit-learn skip NaN); applying a fit leaves
//! non-finite values as they are.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

/// pycytominer's MAD scale factor (`scipy.stats.median_abs_deviation(scale=1/1.4826)`).
pub const MAD_SCALE: f64 = 1.4826;
/// pycytominer's default `mad_robustize_epsilon`.
pub const DEFAULT_MAD_EPSILON: f64 = 1e-18;
/// Arevalo et al.'s variant-feature rule: `|MAD / median| > 1e-3` on every plate.
pub const VARIANT_MIN_RATIO: f64 = 1e-3;
/// Blom's offset of the rank inverse normal transform.
pub const RANK_INT_OFFSET: f64 = 3.0 / 8.0;

/// How a feature is centred and scaled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Normalization {
    /// `(x − mean) / std` with the population standard deviation (scikit-learn
    /// `StandardScaler`; a constant feature is only centred).
    Standardize,
    /// `(x − median) / IQR` (scikit-learn `RobustScaler`, quartiles by linear interpolation;
    /// a zero range is only centred).
    Robustize,
    /// `(x − median) / (1.4826 · MAD + epsilon)` (pycytominer `mad_robustize`).
    MadRobustize {
        /// Added to the scaled MAD (pycytominer's default is `1e-18`).
        epsilon: f64,
    },
    /// `(x − median) / MAD` with the unscaled MAD and no epsilon (the `mad_int_featselect`
    /// recipe; used after the variant-feature rule has removed zero MADs).
    Mad,
}

impl Normalization {
    /// The name used on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            Normalization::Standardize => "standardize",
            Normalization::Robustize => "robustize",
            Normalization::MadRobustize { .. } => "mad_robustize",
            Normalization::Mad => "mad",
        }
    }
}

/// A fitted affine map `x ↦ (x − center) / scale`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scaling {
    /// Subtracted first.
    pub center: f64,
    /// Divided by second.
    pub scale: f64,
}

impl Scaling {
    /// Applies the map to `x`.
    #[inline]
    pub fn apply(&self, x: f64) -> f64 {
        (x - self.center) / self.scale
    }
}

/// numpy's median of `values` (reordered in place). `NaN` for an empty slice. Values must
/// be finite.
pub fn median_in_place(values: &mut [f64]) -> f64 {
    let n = values.len();
    if n == 0 {
        return f64::NAN;
    }
    let mid = n / 2;
    let (_, &mut upper, _) = values.select_nth_unstable_by(mid, f64::total_cmp);
    if n % 2 == 1 {
        upper
    } else {
        // The lower middle is the largest value left of `mid` after partitioning.
        let lower = values[..mid]
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max);
        (lower + upper) / 2.0
    }
}

/// scipy's unscaled median absolute deviation of `values` around `median`, using `scratch`
/// as working space. `NaN` for an empty slice.
pub fn mad(values: &[f64], median: f64, scratch: &mut Vec<f64>) -> f64 {
    scratch.clear();
    scratch.extend(values.iter().map(|v| (v - median).abs()));
    median_in_place(scratch)
}

/// numpy's `percentile(sorted, q, method="linear")` of an ascending, non-empty slice
/// (`q` in `[0, 100]`).
pub fn percentile_linear(sorted: &[f64], q: f64) -> f64 {
    let n = sorted.len();
    let position = q / 100.0 * (n - 1) as f64;
    let lo = position.floor() as usize;
    let hi = (lo + 1).min(n - 1);
    let t = position - lo as f64;
    let (a, b) = (sorted[lo], sorted[hi]);
    // numpy's `_lerp`: from the nearer end, so the result is monotone in `t`.
    let diff = b - a;
    if t >= 0.5 {
        b - diff * (1.0 - t)
    } else {
        a + diff * t
    }
}

/// Fits `method` on `values` (the finite fit values of one feature and group; reordered in
/// place). `None` when there are no values.
pub fn fit_scaling(values: &mut [f64], method: Normalization) -> Option<Scaling> {
    let n = values.len();
    if n == 0 {
        return None;
    }
    let scaling = match method {
        Normalization::Standardize => {
            let mean = values.iter().sum::<f64>() / n as f64;
            let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
            // scikit-learn's `_is_constant_feature`: variance within rounding of zero.
            let eps = f64::EPSILON;
            let bound = n as f64 * eps * var + (n as f64 * mean * eps).powi(2);
            let scale = if var <= bound { 1.0 } else { var.sqrt() };
            Scaling {
                center: mean,
                scale,
            }
        }
        Normalization::Robustize => {
            values.sort_unstable_by(f64::total_cmp);
            let center = percentile_linear(values, 50.0);
            let range = percentile_linear(values, 75.0) - percentile_linear(values, 25.0);
            let scale = if range < 10.0 * f64::EPSILON {
                1.0
            } else {
                range
            };
            Scaling { center, scale }
        }
        Normalization::MadRobustize { epsilon } => {
            let median = median_in_place(values);
            let mut scratch = Vec::with_capacity(n);
            let mad = mad(values, median, &mut scratch);
            Scaling {
                center: median,
                scale: mad / (1.0 / MAD_SCALE) + epsilon,
            }
        }
        Normalization::Mad => {
            let median = median_in_place(values);
            let mut scratch = Vec::with_capacity(n);
            Scaling {
                center: median,
                scale: mad(values, median, &mut scratch),
            }
        }
    };
    Some(scaling)
}

/// Arevalo et al.'s variant-feature test for one plate: the MAD is non-zero and
/// `|MAD / median| > 1e-3` (a zero median fails, as their `fillna(0).replace(inf, 0)` does).
pub fn is_variant(median: f64, mad: f64) -> bool {
    mad != 0.0 && median != 0.0 && (mad / median).abs() > VARIANT_MIN_RATIO
}

/// The standard normal quantile `Φ⁻¹(p)` (Wichura's algorithm AS 241, `PPND16`, relative
/// accuracy about `1e-16`; scipy's `norm.ppf` uses Cephes `ndtri`, and the two agree to a few
/// ulps). `−∞` at 0, `+∞` at 1, `NaN` outside `[0, 1]`.
#[allow(clippy::excessive_precision)] // AS 241's published coefficients, verbatim
pub fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 8] = [
        3.387_132_872_796_366_608,
        1.331_416_678_917_843_774_5e2,
        1.971_590_950_306_551_442_7e3,
        1.373_169_376_550_946_112_5e4,
        4.592_195_393_154_987_145_7e4,
        6.726_577_092_700_870_085_3e4,
        3.343_057_558_358_812_810_5e4,
        2.509_080_928_730_122_672_7e3,
    ];
    const B: [f64; 8] = [
        1.0,
        4.231_333_070_160_091_125_2e1,
        6.871_870_074_920_579_083e2,
        5.394_196_021_424_751_107_7e3,
        2.121_379_430_158_659_586_7e4,
        3.930_789_580_009_271_061e4,
        2.872_908_573_572_194_267_4e4,
        5.226_495_278_852_854_561e3,
    ];
    const C: [f64; 8] = [
        1.423_437_110_749_683_577_34,
        4.630_337_846_156_545_295_9,
        5.769_497_221_460_691_405_5,
        3.647_848_324_763_204_605_04,
        1.270_458_252_452_368_382_58,
        2.417_807_251_774_506_117_7e-1,
        2.272_384_498_926_918_458_33e-2,
        7.745_450_142_783_414_076_4e-4,
    ];
    const D: [f64; 8] = [
        1.0,
        2.053_191_626_637_758_821_87,
        1.676_384_830_183_803_849_4,
        6.897_673_349_851_000_045_5e-1,
        1.481_039_764_274_800_745_9e-1,
        1.519_866_656_361_645_719_66e-2,
        5.475_938_084_995_344_946e-4,
        1.050_750_071_644_416_843_24e-9,
    ];
    const E: [f64; 8] = [
        6.657_904_643_501_103_777_2,
        5.463_784_911_164_114_369_9,
        1.784_826_539_917_291_335_8,
        2.965_605_718_285_048_912_3e-1,
        2.653_218_952_657_612_309_3e-2,
        1.242_660_947_388_078_438_6e-3,
        2.711_555_568_743_487_578_15e-5,
        2.010_334_399_292_288_132_65e-7,
    ];
    const F: [f64; 8] = [
        1.0,
        5.998_322_065_558_879_376_9e-1,
        1.369_298_809_227_358_053_1e-1,
        1.487_536_129_085_061_485_25e-2,
        7.868_691_311_456_132_591e-4,
        1.846_318_317_510_054_681_8e-5,
        1.421_511_758_316_445_888_7e-7,
        2.044_263_103_389_939_785_64e-15,
    ];
    fn ratio(num: &[f64; 8], den: &[f64; 8], x: f64) -> f64 {
        let horner = |c: &[f64; 8]| c.iter().rev().fold(0.0, |acc, &v| acc * x + v);
        horner(num) / horner(den)
    }
    if p.is_nan() || !(0.0..=1.0).contains(&p) {
        return f64::NAN;
    }
    if p == 0.0 {
        return f64::NEG_INFINITY;
    }
    if p == 1.0 {
        return f64::INFINITY;
    }
    let q = p - 0.5;
    if q.abs() <= 0.425 {
        let r = 0.180625 - q * q;
        return q * ratio(&A, &B, r);
    }
    let tail = if q < 0.0 { p } else { 1.0 - p };
    let r = (-tail.ln()).sqrt();
    let value = if r <= 5.0 {
        ratio(&C, &D, r - 1.6)
    } else {
        ratio(&E, &F, r - 5.0)
    };
    if q < 0.0 { -value } else { value }
}

/// Stable ordinal ranks (1-based) of `column`: ties keep row order (scipy
/// `rankdata(method="ordinal")`). Values must not be NaN.
pub fn ordinal_ranks(column: &[f64]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..column.len() as u32).collect();
    order.sort_by(|&a, &b| column[a as usize].total_cmp(&column[b as usize]));
    let mut ranks = vec![0u32; column.len()];
    for (position, &row) in order.iter().enumerate() {
        ranks[row as usize] = position as u32 + 1;
    }
    ranks
}

/// Replaces `column` by its rank inverse normal transform,
/// `Φ⁻¹((rank − 3/8) / (n + 1/4))` with stable ordinal ranks. Values must be finite.
pub fn rank_inverse_normal(column: &mut [f64]) {
    let n = column.len() as f64;
    let ranks = ordinal_ranks(column);
    let denominator = n - 2.0 * RANK_INT_OFFSET + 1.0;
    for (value, &rank) in column.iter_mut().zip(&ranks) {
        *value = normal_quantile((rank as f64 - RANK_INT_OFFSET) / denominator);
    }
}

/// Counts describing how repetitive a feature is (pycytominer `frequency_threshold`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrequencyStats {
    /// Count of the second most common value over the count of the most common one (0
    /// with fewer than two distinct values).
    pub second_to_first: f64,
    /// Distinct non-NaN values over all rows.
    pub unique_ratio: f64,
}

/// pycytominer's frequency statistics of `column` (NaN ignored in the counts, not in the
/// row count; `scratch` is working space).
pub fn frequency_stats(column: &[f64], scratch: &mut Vec<f64>) -> FrequencyStats {
    scratch.clear();
    scratch.extend(column.iter().copied().filter(|v| !v.is_nan()));
    scratch.sort_unstable_by(f64::total_cmp);
    let (mut first, mut second, mut distinct) = (0usize, 0usize, 0usize);
    let mut i = 0;
    while i < scratch.len() {
        let mut j = i + 1;
        // -0.0 and 0.0 are the same value for pandas.
        while j < scratch.len() && scratch[j] == scratch[i] {
            j += 1;
        }
        let count = j - i;
        distinct += 1;
        if count > first {
            second = first;
            first = count;
        } else if count > second {
            second = count;
        }
        i = j;
    }
    FrequencyStats {
        second_to_first: if distinct < 2 {
            0.0
        } else {
            second as f64 / first as f64
        },
        unique_ratio: distinct as f64 / column.len().max(1) as f64,
    }
}

/// pycytominer's `frequency_threshold` test: `true` when the feature is dropped
/// (`second_to_first < freq_cut` or `unique_ratio < unique_cut`).
pub fn fails_frequency(stats: FrequencyStats, freq_cut: f64, unique_cut: f64) -> bool {
    stats.second_to_first < freq_cut || stats.unique_ratio < unique_cut
}

/// Population variance of the non-NaN values (`numpy.nanvar`, scikit-learn's
/// `VarianceThreshold`); `NaN` when there are none.
pub fn nan_variance(column: &[f64]) -> f64 {
    let (mut n, mut sum) = (0usize, 0.0);
    for &v in column.iter().filter(|v| !v.is_nan()) {
        n += 1;
        sum += v;
    }
    if n == 0 {
        return f64::NAN;
    }
    let mean = sum / n as f64;
    column
        .iter()
        .filter(|v| !v.is_nan())
        .map(|v| (v - mean) * (v - mean))
        .sum::<f64>()
        / n as f64
}

/// Fraction of NaN values (pycytominer `get_na_columns` drops features above its cutoff).
pub fn nan_fraction(column: &[f64]) -> f64 {
    column.iter().filter(|v| v.is_nan()).count() as f64 / column.len().max(1) as f64
}

/// Pearson correlation matrix (`numpy.corrcoef`) of the columns `features` of the
/// column-major matrix `data` with `n` rows. Values must be finite. Accumulates the centred
/// Gram matrix over blocks of `block_rows` rows with sequential GEMMs, so the result does not
/// depend on the thread count.
pub fn pearson_correlation(
    data: &[f64],
    n: usize,
    features: &[usize],
    block_rows: usize,
) -> Mat<f64> {
    let d = features.len();
    let means: Vec<f64> = features
        .iter()
        .map(|&j| data[j * n..(j + 1) * n].iter().sum::<f64>() / n as f64)
        .collect();
    let mut gram = Mat::<f64>::zeros(d, d);
    let block_rows = block_rows.max(1);
    let mut block = Vec::with_capacity(block_rows * d);
    let mut start = 0;
    while start < n {
        let end = (start + block_rows).min(n);
        block.clear();
        for (&j, &mean) in features.iter().zip(&means) {
            block.extend(data[j * n + start..j * n + end].iter().map(|v| v - mean));
        }
        let x = MatRef::from_column_major_slice(&block, end - start, d);
        matmul(gram.as_mut(), Accum::Add, x.transpose(), x, 1.0, Par::Seq);
        crate::kernels::clear_upper_simd_state();
        start = end;
    }
    let std: Vec<f64> = (0..d).map(|i| gram[(i, i)].sqrt()).collect();
    Mat::from_fn(d, d, |i, j| {
        (gram[(i, j)] / std[i] / std[j]).clamp(-1.0, 1.0)
    })
}

/// pycytominer's `correlation_threshold` decision over a correlation matrix: for every pair
/// whose correlation is **greater** than `threshold` (signed), the member with the larger
/// sum of absolute correlations (NaN skipped, diagonal included) is dropped. Pairs are
/// judged independently, as pycytominer does. Equal sums are ordered by column position
/// (pycytominer's order for exact ties depends on pandas' unstable sort). Returns one flag
/// per column, `true` for dropped.
pub fn correlation_exclusions(corr: &Mat<f64>, threshold: f64) -> Vec<bool> {
    let d = corr.nrows();
    let sums: Vec<f64> = (0..d)
        .map(|j| {
            (0..d)
                .map(|i| corr[(i, j)].abs())
                .filter(|v| !v.is_nan())
                .sum()
        })
        .collect();
    let mut order: Vec<usize> = (0..d).collect();
    order.sort_by(|&a, &b| sums[a].total_cmp(&sums[b]));
    let mut position = vec![0usize; d];
    for (p, &j) in order.iter().enumerate() {
        position[j] = p;
    }
    let mut dropped = vec![false; d];
    for a in 0..d {
        for b in 0..a {
            if corr[(a, b)] > threshold {
                let loser = if position[a] > position[b] { a } else { b };
                dropped[loser] = true;
            }
        }
    }
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_match_numpy() {
        assert_eq!(median_in_place(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median_in_place(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median_in_place(&mut [5.0]), 5.0);
        assert!(median_in_place(&mut []).is_nan());
        let mut scratch = Vec::new();
        // scipy.stats.median_abs_deviation([1, 2, 3, 4, 100]) = 1.0
        assert_eq!(mad(&[1.0, 2.0, 3.0, 4.0, 100.0], 3.0, &mut scratch), 1.0);
    }

    #[test]
    fn percentiles_match_numpy() {
        let sorted = [1.0, 2.0, 4.0, 8.0];
        // numpy.percentile([1, 2, 4, 8], [25, 50, 75]) = [1.75, 3.0, 5.0]
        assert_eq!(percentile_linear(&sorted, 25.0), 1.75);
        assert_eq!(percentile_linear(&sorted, 50.0), 3.0);
        assert_eq!(percentile_linear(&sorted, 75.0), 5.0);
        assert_eq!(percentile_linear(&sorted, 100.0), 8.0);
    }

    #[test]
    fn scalings_match_the_peer_formulas() {
        let values = [1.0, 2.0, 3.0, 4.0, 10.0];
        let s = fit_scaling(&mut values.clone(), Normalization::Standardize).unwrap();
        // numpy: mean 4, std(ddof=0) = sqrt(10)
        assert_eq!(s.center, 4.0);
        assert!((s.scale - 10f64.sqrt()).abs() < 1e-15);
        let r = fit_scaling(&mut values.clone(), Normalization::Robustize).unwrap();
        assert_eq!((r.center, r.scale), (3.0, 2.0));
        let m = fit_scaling(
            &mut values.clone(),
            Normalization::MadRobustize { epsilon: 1e-18 },
        )
        .unwrap();
        assert_eq!(m.center, 3.0);
        assert!((m.scale - 1.4826).abs() < 1e-15);
        let u = fit_scaling(&mut values.clone(), Normalization::Mad).unwrap();
        assert_eq!((u.center, u.scale), (3.0, 1.0));
        // Constant features are only centred by the scikit-learn scalers.
        let c = fit_scaling(&mut [2.0; 4], Normalization::Standardize).unwrap();
        assert_eq!((c.center, c.scale), (2.0, 1.0));
        let c = fit_scaling(&mut [2.0; 4], Normalization::Robustize).unwrap();
        assert_eq!((c.center, c.scale), (2.0, 1.0));
        // ... and pycytominer's MAD keeps its epsilon.
        let c = fit_scaling(
            &mut [2.0; 4],
            Normalization::MadRobustize { epsilon: 1e-18 },
        )
        .unwrap();
        assert_eq!(c.scale, 1e-18);
        assert!(fit_scaling(&mut [], Normalization::Mad).is_none());
    }

    #[test]
    fn variant_rule_fails_zero_median_and_zero_mad() {
        assert!(is_variant(10.0, 0.011));
        assert!(!is_variant(10.0, 0.01));
        assert!(is_variant(-10.0, 0.011));
        assert!(!is_variant(0.0, 1.0));
        assert!(!is_variant(1.0, 0.0));
    }

    #[test]
    fn normal_quantile_matches_scipy() {
        // scipy.stats.norm.ppf values.
        let cases = [
            (0.5, 0.0),
            (0.975, 1.959_963_984_540_054),
            (0.025, -1.959_963_984_540_054),
            (0.001, -3.090_232_306_167_813),
            (0.8413447460685429, 1.0),
            (1e-10, -6.361_340_902_404_056),
            (1e-300, -37.047_096_299_361_2),
        ];
        for (p, expected) in cases {
            let x = normal_quantile(p);
            assert!(
                (x - expected).abs() <= 1e-14 * expected.abs().max(1.0),
                "ppf({p}) = {x}, scipy {expected}"
            );
        }
        assert_eq!(normal_quantile(0.0), f64::NEG_INFINITY);
        assert_eq!(normal_quantile(1.0), f64::INFINITY);
        assert!(normal_quantile(1.5).is_nan());
    }

    #[test]
    fn ranks_are_stable_and_ordinal() {
        assert_eq!(
            ordinal_ranks(&[3.0, 1.0, 3.0, 2.0, 1.0]),
            vec![4, 1, 5, 3, 2]
        );
        let mut column = vec![10.0, -5.0, 7.0, 7.0];
        rank_inverse_normal(&mut column);
        let n = 4.0;
        let at = |r: f64| normal_quantile((r - 0.375) / (n + 0.25));
        assert_eq!(column, vec![at(4.0), at(1.0), at(2.0), at(3.0)]);
        // Symmetric: ranks 1 and n map to opposite values.
        assert!((column[0] + column[1]).abs() < 1e-15);
    }

    #[test]
    fn frequency_rule_matches_pycytominer() {
        let mut scratch = Vec::new();
        // value counts 1.0 x4, 0.5 x1 -> 0.25; 2 unique of 6 rows (NaN counts as a row).
        let s = frequency_stats(&[1.0, 1.0, 0.5, 1.0, f64::NAN, 1.0], &mut scratch);
        assert_eq!(s.second_to_first, 0.25);
        assert!((s.unique_ratio - 2.0 / 6.0).abs() < 1e-15);
        assert!(fails_frequency(s, 0.3, 0.01));
        assert!(!fails_frequency(s, 0.2, 0.01));
        assert!(fails_frequency(s, 0.2, 0.5));
        let constant = frequency_stats(&[2.0; 5], &mut scratch);
        assert_eq!(constant.second_to_first, 0.0);
        assert!(fails_frequency(constant, 0.05, 0.01));
    }

    #[test]
    fn nan_statistics() {
        assert_eq!(nan_variance(&[1.0, f64::NAN, 3.0]), 1.0);
        assert!(nan_variance(&[f64::NAN]).is_nan());
        assert_eq!(nan_fraction(&[1.0, f64::NAN, 3.0, f64::NAN]), 0.5);
    }

    #[test]
    fn correlation_matches_a_dense_reference_and_the_drop_rule() {
        // Column-major 6 x 4: c1 = 2 c0 + 1 (r = 1), c2 = -c0 (r = -1), c3 independent-ish.
        let c0 = [1.0, 2.0, 3.0, 4.0, 5.0, 7.0];
        let c3 = [0.5, -1.0, 2.0, 0.0, 1.0, -0.5];
        let mut data = Vec::new();
        data.extend(c0);
        data.extend(c0.iter().map(|v| 2.0 * v + 1.0));
        data.extend(c0.iter().map(|v| -v));
        data.extend(c3);
        let n = 6;
        let corr = pearson_correlation(&data, n, &[0, 1, 2, 3], 4);
        let dense = |a: &[f64], b: &[f64]| {
            let ma = a.iter().sum::<f64>() / 6.0;
            let mb = b.iter().sum::<f64>() / 6.0;
            let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
            let va: f64 = a.iter().map(|x| (x - ma) * (x - ma)).sum();
            let vb: f64 = b.iter().map(|y| (y - mb) * (y - mb)).sum();
            cov / (va * vb).sqrt()
        };
        for i in 0..4 {
            for j in 0..4 {
                let want = dense(&data[i * n..(i + 1) * n], &data[j * n..(j + 1) * n]);
                assert!((corr[(i, j)] - want).abs() < 1e-14, "({i},{j})");
            }
        }
        let dropped = correlation_exclusions(&corr, 0.9);
        // Only (0, 1) is above 0.9 (signed; c2 is anti-correlated): one of them goes.
        assert!(dropped[0] != dropped[1] && !dropped[2] && !dropped[3]);
    }

    #[test]
    fn correlation_rule_drops_the_member_with_the_larger_sum_per_pair() {
        // Sums of |r|: a 2.25, b 2.45, c 2.3 (a, c, b in ascending order).
        let r = [[1.0, 0.95, 0.3], [0.95, 1.0, 0.5], [0.3, 0.5, 1.0]];
        let corr = Mat::from_fn(3, 3, |i, j| r[i][j]);
        assert_eq!(correlation_exclusions(&corr, 0.9), vec![false, true, false]);
        // Every pair above the threshold is judged on its own: b (largest sum) goes for
        // a–b and b–c, and c (sum above a's) goes for a–c.
        let r = [[1.0, 0.95, 0.92], [0.95, 1.0, 0.97], [0.92, 0.97, 1.0]];
        let corr = Mat::from_fn(3, 3, |i, j| r[i][j]);
        assert_eq!(correlation_exclusions(&corr, 0.9), vec![false, true, true]);
        // Ties in the sum: the later column is dropped.
        let r = [[1.0, 0.95], [0.95, 1.0]];
        let corr = Mat::from_fn(2, 2, |i, j| r[i][j]);
        assert_eq!(correlation_exclusions(&corr, 0.9), vec![false, true]);
        // Exactly at the threshold is kept (strictly greater drops).
        let r = [[1.0, 0.9], [0.9, 1.0]];
        let corr = Mat::from_fn(2, 2, |i, j| r[i][j]);
        assert_eq!(correlation_exclusions(&corr, 0.9), vec![false, false]);
    }
}
