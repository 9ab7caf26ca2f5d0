//! The two streaming passes that turn landmark rows into corrected values.
//!
//! Pass 1 accumulates `A_S X` and the row sums of `A_S`: per landmark for the paper's
//! variant, per landmark and batch for the batch-balanced variants. Within a block of rows
//! (a leaf of the global row order, see [`crate::kernels::exact`]) each landmark's sum runs
//! over points in row order in `f64` ([`SmoothAccumulator`]); leaves are added as fixed-point
//! integers ([`SmoothSums`]), so the totals do not depend on the partitioning or the thread
//! count. The fit then forms the per-landmark values of pass 2:
//! - paper, smooth: `Y_l = (A_S X)_l / rowsum_l` (`P X`); Nyström: `pinv(A_SS) A_S X`;
//! - balanced: `Ybar_l` = mean over the batches the row reaches of the per-batch local
//!   means `Y_lb = sum_{j in b} A_lj X_j / sum_{j in b} A_lj`;
//! - residual: the per-batch offsets `Ybar_l - Y_lb`.
//!
//! Pass 2 emits, for point `j` of batch `b` with column entries `A_lj` (in landmark order):
//! `sum_l A_lj Y_l / sum_l A_lj` (paper smooth and balanced, `Q^T Y`), `sum_l A_lj W_l`
//! (Nyström), or `X_j + sum_l A_lj (Ybar_l - Y_lb) / sum_l A_lj` (residual). A point no
//! landmark keeps keeps its input value, or, with [`SmoothOptions::nearest_fallback`] (rows
//! outside the sample the landmarks were drawn from), takes the column of its nearest landmark
//! with weight 1.

use crate::config::{Estimator, Variant};
use crate::kernels::exact::ExactSum;
use crate::kernels::landmark::Landmark;
use crate::kernels::search::{ColumnEntries, LandmarkSearch};
use rayon::prelude::*;

/// One point of a chunk: its reduced coordinates and batch.
pub type PointRef<'a> = (&'a [f32], usize);

/// How the fitted landmark values become corrected rows.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SmoothOptions {
    /// Estimator (Nyström applies to the paper variant only).
    pub estimator: Estimator,
    /// Form of the correction.
    pub variant: Variant,
    /// Fraction of the correction applied: `X + strength (X_corrected - X)`.
    pub strength: f64,
    /// A point no landmark keeps takes its nearest landmark's column (weight 1) instead of
    /// keeping its input value.
    pub nearest_fallback: bool,
}

impl SmoothOptions {
    /// The paper's smoothing estimator, applied in full.
    pub fn paper(estimator: Estimator) -> Self {
        Self {
            estimator,
            variant: Variant::Paper,
            strength: 1.0,
            nearest_fallback: false,
        }
    }
}

/// Number of accumulator groups per landmark: one per batch for the batch-balanced variants.
pub fn group_count(landmarks: &[Landmark], variant: Variant) -> usize {
    if variant.per_batch() {
        landmarks.first().map_or(1, |l| l.scales.len().max(1))
    } else {
        1
    }
}

/// Accumulates `A_S X` and the row sums of `A_S` (per batch when the variant needs it) over
/// rows in order, in `f64`.
#[derive(Debug, Clone)]
pub struct SmoothAccumulator {
    m: usize,
    d: usize,
    groups: usize,
    y: Vec<f64>,
    weight: Vec<f64>,
    search: LandmarkSearch,
    entries: ColumnEntries,
    nnz: usize,
}

impl SmoothAccumulator {
    /// An empty accumulator for `landmarks`, `d` output columns and `variant`.
    pub fn new(landmarks: &[Landmark], d: usize, variant: Variant) -> Self {
        Self::with_search(landmarks, LandmarkSearch::new(landmarks), d, variant)
    }

    /// An empty accumulator reusing a prepared search.
    pub fn with_search(
        landmarks: &[Landmark],
        search: LandmarkSearch,
        d: usize,
        variant: Variant,
    ) -> Self {
        let m = landmarks.len();
        let groups = group_count(landmarks, variant);
        Self {
            m,
            d,
            groups,
            y: vec![0.0; m * groups * d],
            weight: vec![0.0; m * groups],
            search,
            entries: ColumnEntries::default(),
            nnz: 0,
        }
    }

    /// Bytes held (for memory accounting) with `groups` accumulators per landmark (1, or the
    /// number of batches for the batch-balanced variants).
    pub fn size_bytes(m: usize, d: usize, groups: usize) -> usize {
        (m * d + m) * groups * 8
    }

    /// Kept entries seen so far.
    pub fn nnz(&self) -> usize {
        self.nnz
    }

    /// Adds a chunk of points: `points[r]` are the coordinates and batch of row `r`, `x` the
    /// chunk's output-space values (row-major, `points.len() x d`).
    pub fn add_chunk(&mut self, landmarks: &[Landmark], points: &[PointRef<'_>], x: &[f32]) {
        let z: Vec<f32> = points.iter().flat_map(|p| p.0.iter().copied()).collect();
        let batch: Vec<u32> = points.iter().map(|p| p.1 as u32).collect();
        self.add_rows(landmarks, &z, &batch, x);
    }

    /// Adds rows: coordinates `z` (row-major), batch codes and output-space values `x`
    /// (row-major, `d` columns).
    pub fn add_rows(&mut self, landmarks: &[Landmark], z: &[f32], batch: &[u32], x: &[f32]) {
        assert_eq!(landmarks.len(), self.m);
        assert_eq!(x.len(), batch.len() * self.d);
        let mut entries = std::mem::take(&mut self.entries);
        self.search
            .entries(landmarks, z, batch, false, &mut entries);
        let per_batch = self.groups > 1;
        let mut by_landmark: Vec<Vec<(u32, f64)>> = vec![Vec::new(); self.m];
        for r in 0..batch.len() {
            for &(l, a) in entries.row(r) {
                by_landmark[l as usize].push((r as u32, a));
            }
        }
        self.nnz += entries.items.len();
        self.entries = entries;
        let (d, groups) = (self.d, self.groups);
        self.y
            .par_chunks_mut((d * groups).max(1))
            .zip(self.weight.par_chunks_mut(groups))
            .zip(by_landmark.par_iter())
            .for_each(|((yl, wl), list)| {
                for &(r, a) in list {
                    let g = if per_batch {
                        batch[r as usize] as usize
                    } else {
                        0
                    };
                    wl[g] += a;
                    let xr = &x[r as usize * d..(r as usize + 1) * d];
                    axpy_f32(a, xr, &mut yl[g * d..(g + 1) * d]);
                }
            });
    }

    /// Moves the sums into `total` (as one leaf) and clears them.
    pub fn drain_into(&mut self, total: &mut SmoothSums) {
        assert_eq!(
            (self.m, self.d, self.groups),
            (total.m, total.d, total.groups)
        );
        let d = self.d;
        for (lg, w) in self.weight.iter_mut().enumerate() {
            if *w != 0.0 {
                total.weight.add(lg, *w);
                total.y.add_slice(lg * d, &self.y[lg * d..(lg + 1) * d]);
                *w = 0.0;
                self.y[lg * d..(lg + 1) * d].fill(0.0);
            }
        }
        total.nnz += self.nnz as u64;
        self.nnz = 0;
    }

    /// Finishes pass 1 into the per-landmark values used by pass 2.
    pub fn finish(
        self,
        options: &SmoothOptions,
        landmarks: &[Landmark],
        batch_of: impl Fn(usize) -> usize + Sync,
    ) -> FittedSmoother {
        let totals = SmoothTotals {
            m: self.m,
            d: self.d,
            groups: self.groups,
            y: self.y,
            weight: self.weight,
        };
        totals.fit(options, landmarks, self.search, batch_of)
    }
}

/// Order-independent totals of pass 1: leaves of [`SmoothAccumulator`] added in fixed point.
#[derive(Debug, Clone, PartialEq)]
pub struct SmoothSums {
    m: usize,
    d: usize,
    groups: usize,
    y: ExactSum,
    weight: ExactSum,
    nnz: u64,
}

impl SmoothSums {
    /// Empty totals for `m` landmarks, `groups` groups per landmark and `d` output columns;
    /// `x_bound[c]` bounds `sum_j |x_jc|` over all rows, `rows` is the number of rows (the
    /// affinities are at most 1).
    pub fn new(m: usize, d: usize, groups: usize, x_bound: &[f64], rows: usize) -> Self {
        assert_eq!(x_bound.len(), d);
        Self {
            m,
            d,
            groups,
            y: ExactSum::new(m * groups * d, if d == 0 { &[1.0] } else { x_bound }),
            weight: ExactSum::new(m * groups, &[rows.max(1) as f64]),
            nnz: 0,
        }
    }

    /// Bytes held (for memory accounting).
    pub fn size_bytes(m: usize, d: usize, groups: usize) -> usize {
        ExactSum::size_bytes(m * groups * d, d) + ExactSum::size_bytes(m * groups, 1)
    }

    /// Adds another partition's totals.
    pub fn merge(&mut self, other: &SmoothSums) {
        self.y.merge(&other.y);
        self.weight.merge(&other.weight);
        self.nnz += other.nnz;
    }

    /// Kept entries summed over.
    pub fn nnz(&self) -> u64 {
        self.nnz
    }

    /// The totals as bytes (`nnz`, weights, sums).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.nnz.to_le_bytes().to_vec();
        out.extend_from_slice(&self.weight.to_bytes());
        out.extend_from_slice(&self.y.to_bytes());
        out
    }

    /// Adds totals serialised by [`SmoothSums::to_bytes`] with this layout.
    pub fn merge_bytes(&mut self, bytes: &[u8]) -> Option<()> {
        let w = self.weight.len() * 16;
        if bytes.len() != 8 + w + self.y.len() * 16 {
            return None;
        }
        self.nnz += u64::from_le_bytes(bytes[..8].try_into().ok()?);
        self.weight.merge_bytes(&bytes[8..8 + w])?;
        self.y.merge_bytes(&bytes[8 + w..])
    }

    /// The totals in `f64`.
    pub fn totals(&self) -> SmoothTotals {
        SmoothTotals {
            m: self.m,
            d: self.d,
            groups: self.groups,
            y: self.y.values(),
            weight: self.weight.values(),
        }
    }
}

/// `A_S X` and the row sums of `A_S` in `f64` (per landmark and group, row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct SmoothTotals {
    /// Landmarks.
    pub m: usize,
    /// Output columns.
    pub d: usize,
    /// Groups per landmark.
    pub groups: usize,
    /// `(A_S X)` per landmark and group, `m x groups x d`.
    pub y: Vec<f64>,
    /// Row sums per landmark and group, `m x groups`.
    pub weight: Vec<f64>,
}

impl SmoothTotals {
    /// Forms the per-landmark values of pass 2. `batch_of(i)` is the batch of landmark point
    /// `i` (Nyström's `A_SS`).
    pub fn fit(
        self,
        options: &SmoothOptions,
        landmarks: &[Landmark],
        search: LandmarkSearch,
        batch_of: impl Fn(usize) -> usize + Sync,
    ) -> FittedSmoother {
        let (estimator, variant) = (options.estimator, options.variant);
        let (m, d, groups) = (self.m, self.d, self.groups);

        let row_sum: Vec<f64> = self.weight.chunks(groups).map(|w| w.iter().sum()).collect();
        let values = match (variant, estimator) {
            (Variant::Paper, Estimator::Smooth) => {
                let mut y = self.y;
                for (yl, &rs) in y.chunks_mut(d.max(1)).zip(&row_sum) {
                    if rs > 0.0 {
                        yl.iter_mut().for_each(|v| *v /= rs);
                    }
                }
                y
            }
            (Variant::Paper, Estimator::Nystrom) => {
                let a_ss = crate::kernels::landmark::landmark_block(landmarks, batch_of);
                let pinv = pseudo_inverse(&a_ss, m);
                let mut w = vec![0.0; m * d];
                w.par_chunks_mut(d.max(1)).enumerate().for_each(|(l, wl)| {
                    for (c, &coef) in pinv[l * m..(l + 1) * m].iter().enumerate() {
                        if coef != 0.0 {
                            let yc = &self.y[c * d..(c + 1) * d];
                            for (acc, &v) in wl.iter_mut().zip(yc) {
                                *acc += coef * v;
                            }
                        }
                    }
                });
                w
            }
            (Variant::Balanced | Variant::Residual, _) => {
                let residual = variant == Variant::Residual;
                let out_groups = if residual { groups } else { 1 };
                let mut out = vec![0.0; m * out_groups * d];
                out.par_chunks_mut((out_groups * d).max(1))
                    .zip(self.y.par_chunks((groups * d).max(1)))
                    .zip(self.weight.par_chunks(groups))
                    .for_each(|((ol, yl), wl)| {
                        let reached = wl.iter().filter(|&&w| w > 0.0).count();
                        if reached == 0 {
                            return;
                        }
                        let mut mean = vec![0.0f64; d];
                        for (g, &w) in wl.iter().enumerate() {
                            if w > 0.0 {
                                for (acc, &v) in mean.iter_mut().zip(&yl[g * d..(g + 1) * d]) {
                                    *acc += v / w;
                                }
                            }
                        }
                        mean.iter_mut().for_each(|v| *v /= reached as f64);
                        if !residual {
                            ol.copy_from_slice(&mean);
                            return;
                        }
                        for (g, &w) in wl.iter().enumerate() {
                            if w > 0.0 {
                                let og = &mut ol[g * d..(g + 1) * d];
                                for ((o, &v), &mu) in
                                    og.iter_mut().zip(&yl[g * d..(g + 1) * d]).zip(&mean)
                                {
                                    *o = mu - v / w;
                                }
                            }
                        }
                    });
                out
            }
        };
        FittedSmoother {
            options: *options,
            d,
            groups: if variant == Variant::Residual {
                groups
            } else {
                1
            },
            values,
            row_sum,
            search,
        }
    }
}

/// The per-landmark values of pass 2 (`Y = P X`, `W = pinv(A_SS) A_S X`, the batch-balanced
/// `Ybar`, or the residual offsets `Ybar - Y_b`).
#[derive(Debug, Clone)]
pub struct FittedSmoother {
    options: SmoothOptions,
    d: usize,
    groups: usize,
    values: Vec<f64>,
    row_sum: Vec<f64>,
    search: LandmarkSearch,
}

/// What [`FittedSmoother::apply_rows`] saw in a chunk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyStats {
    /// Rows no landmark keeps.
    pub uncovered: usize,
    /// Nonzero entries used.
    pub nnz: usize,
}

/// The fitted values of a [`FittedSmoother`] without its landmark search (which is rebuilt
/// from the landmarks): what travels between the machines of a cluster.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SmootherParts {
    options: SmoothOptions,
    d: usize,
    groups: usize,
    values: Vec<f64>,
    row_sum: Vec<f64>,
}

impl FittedSmoother {
    /// The fitted values, without the search.
    pub fn to_parts(&self) -> SmootherParts {
        SmootherParts {
            options: self.options,
            d: self.d,
            groups: self.groups,
            values: self.values.clone(),
            row_sum: self.row_sum.clone(),
        }
    }

    /// The smoother `parts` came from, over `search` (built from the same landmarks).
    pub fn from_parts(parts: SmootherParts, search: LandmarkSearch) -> Self {
        Self {
            options: parts.options,
            d: parts.d,
            groups: parts.groups,
            values: parts.values,
            row_sum: parts.row_sum,
            search,
        }
    }
}

impl FittedSmoother {
    /// The per-landmark values, row-major: `m x d`, or `m x B x d` for the residual offsets.
    pub fn values(&self) -> &[f64] {
        &self.values
    }

    /// Row sums of `A_S`.
    pub fn row_sums(&self) -> &[f64] {
        &self.row_sum
    }

    /// The options the smoother applies.
    pub fn options(&self) -> &SmoothOptions {
        &self.options
    }

    /// Output columns.
    pub fn columns(&self) -> usize {
        self.d
    }

    /// Writes the corrected rows of a chunk into `out` (`points.len() x d`); `x` holds the
    /// input values (kept by uncovered points; the base of the residual form). Returns the
    /// number of uncovered points and the total number of nonzero entries seen, and marks
    /// coverage in `covered`.
    pub fn apply_chunk(
        &self,
        landmarks: &[Landmark],
        points: &[PointRef<'_>],
        x: &[f32],
        out: &mut [f32],
        covered: &mut [bool],
    ) -> (usize, usize) {
        let z: Vec<f32> = points.iter().flat_map(|p| p.0.iter().copied()).collect();
        let batch: Vec<u32> = points.iter().map(|p| p.1 as u32).collect();
        let s = self.apply_rows(landmarks, &z, &batch, x, out, covered);
        (s.uncovered, s.nnz)
    }

    /// Writes the corrected rows of coordinates `z` (row-major), batch codes `batch` and input
    /// values `x` (row-major, `d` columns) into `out`, marking coverage in `covered`.
    pub fn apply_rows(
        &self,
        landmarks: &[Landmark],
        z: &[f32],
        batch: &[u32],
        x: &[f32],
        out: &mut [f32],
        covered: &mut [bool],
    ) -> ApplyStats {
        let d = self.d;
        assert_eq!(out.len(), batch.len() * d);
        let options = &self.options;
        let mut entries = ColumnEntries::default();
        self.search
            .entries(landmarks, z, batch, options.nearest_fallback, &mut entries);
        let residual = options.variant == Variant::Residual;
        let strength = options.strength;
        let fallback_entry: Vec<[(u32, f64); 1]> =
            entries.nearest.iter().map(|&l| [(l, 1.0)]).collect();
        let stats = out
            .par_chunks_mut(d.max(1))
            .zip(x.par_chunks(d.max(1)))
            .zip(covered.par_iter_mut())
            .enumerate()
            .map_init(
                || vec![0.0f64; d],
                |acc, (r, ((o, xr), cov))| {
                    let mut row = entries.row(r);
                    *cov = !row.is_empty();
                    let uncovered = row.is_empty() as usize;
                    if row.is_empty() {
                        if !options.nearest_fallback || entries.nearest[r] == u32::MAX {
                            o.copy_from_slice(xr);
                            return (uncovered, 0);
                        }
                        row = &fallback_entry[r];
                    }
                    let b = batch[r] as usize;
                    acc.fill(0.0);
                    let mut col_sum = 0.0;
                    let g = if self.groups > 1 { b } else { 0 };
                    for &(l, a) in row {
                        col_sum += a;
                        let at = (l as usize * self.groups + g) * d;
                        axpy_f64(a, &self.values[at..at + d], acc);
                    }
                    let scale = match options.estimator {
                        Estimator::Nystrom if !options.variant.per_batch() => 1.0,
                        _ => 1.0 / col_sum,
                    };
                    for ((dst, s), &v) in o.iter_mut().zip(acc.iter()).zip(xr.iter()) {
                        let v = v as f64;
                        let target = if residual { v + s * scale } else { s * scale };
                        *dst = if strength == 1.0 {
                            target
                        } else {
                            v + strength * (target - v)
                        } as f32;
                    }
                    (uncovered, row.len() * (1 - uncovered))
                },
            )
            .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        ApplyStats {
            uncovered: stats.0,
            nnz: stats.1,
        }
    }
}

/// `y += a * x` (elementwise, `x` widened to `f64`); AVX2 where available, same bits.
#[inline]
fn axpy_f32(a: f64, x: &[f32], y: &mut [f64]) {
    #[inline(always)]
    fn body(a: f64, x: &[f32], y: &mut [f64]) {
        for (acc, &v) in y.iter_mut().zip(x) {
            *acc += a * v as f64;
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn wide(a: f64, x: &[f32], y: &mut [f64]) {
            body(a, x, y)
        }
        if crate::kernels::distance::has_avx2() {
            // SAFETY: AVX2 is available (checked above).
            return unsafe { wide(a, x, y) };
        }
    }
    body(a, x, y)
}

/// `y += a * x` (elementwise); AVX2 where available, same bits.
#[inline]
fn axpy_f64(a: f64, x: &[f64], y: &mut [f64]) {
    #[inline(always)]
    fn body(a: f64, x: &[f64], y: &mut [f64]) {
        for (acc, &v) in y.iter_mut().zip(x) {
            *acc += a * v;
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn wide(a: f64, x: &[f64], y: &mut [f64]) {
            body(a, x, y)
        }
        if crate::kernels::distance::has_avx2() {
            // SAFETY: AVX2 is available (checked above).
            return unsafe { wide(a, x, y) };
        }
    }
    body(a, x, y)
}

/// Moore–Penrose pseudo-inverse of a square row-major `m x m` matrix (singular values below
/// `1e-8 * s_max` are treated as zero), row-major.
pub fn pseudo_inverse(a: &[f64], m: usize) -> Vec<f64> {
    if m == 0 {
        return Vec::new();
    }
    let mat = faer::Mat::<f64>::from_fn(m, m, |i, j| a[i * m + j]);
    let svd = mat.thin_svd().expect("SVD of A_SS");
    let (u, s, v) = (svd.U(), svd.S(), svd.V());
    let s: Vec<f64> = (0..m).map(|i| s.column_vector()[i]).collect();
    let s_max = s.iter().copied().fold(0.0, f64::max);
    let cut = 1e-8 * s_max;
    let mut out = vec![0.0; m * m];
    for i in 0..m {
        for j in 0..m {
            let mut acc = 0.0;
            for (r, &sr) in s.iter().enumerate() {
                if sr > cut {
                    acc += v[(i, r)] * u[(j, r)] / sr;
                }
            }
            out[i * m + j] = acc;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ElbowRule;
    use crate::kernels::elbow::ElbowParams;
    use crate::kernels::landmark::{RowBlocks, RowBuffers, landmark_row};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    struct Setup {
        z: Vec<f32>,
        x: Vec<f32>,
        offsets: Vec<usize>,
        landmarks: Vec<Landmark>,
        n: usize,
        p: usize,
        d: usize,
    }

    fn setup(seed: u64, picks: &[usize]) -> Setup {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (n, p, d) = (90, 3, 4);
        let z: Vec<f32> = (0..n * p)
            .map(|i| ((i / p) % 3) as f32 * 3.0 + rng.random::<f32>())
            .collect();
        let x: Vec<f32> = (0..n * d).map(|_| rng.random::<f32>() * 10.0).collect();
        let offsets = vec![0, 30, 60, 90];
        let view = RowBlocks::new(vec![&z], p);
        let elbow = ElbowParams {
            rule: ElbowRule::Kneedle,
            a_min: 1e-8,
            bins: 4096,
            r_min: 4,
            min_threshold: 0.0,
        };
        let mut buf = RowBuffers::default();
        let landmarks = picks
            .iter()
            .map(|&i| landmark_row(&view, &offsets, i, 3, &elbow, &mut buf))
            .collect();
        Setup {
            z,
            x,
            offsets,
            landmarks,
            n,
            p,
            d,
        }
    }

    fn dense_a(s: &Setup) -> Vec<Vec<f64>> {
        let batch = |j: usize| s.offsets.partition_point(|&o| o <= j) - 1;
        s.landmarks
            .iter()
            .map(|l| {
                (0..s.n)
                    .map(|j| l.affinity(&s.z[j * s.p..(j + 1) * s.p], batch(j)))
                    .collect()
            })
            .collect()
    }

    fn run(s: &Setup, est: Estimator, chunk: usize) -> (Vec<f32>, usize) {
        run_variant(s, est, Variant::Paper, chunk)
    }

    fn run_variant(s: &Setup, est: Estimator, variant: Variant, chunk: usize) -> (Vec<f32>, usize) {
        let options = SmoothOptions {
            variant,
            ..SmoothOptions::paper(est)
        };
        run_options(s, &options, chunk)
    }

    fn run_options(s: &Setup, options: &SmoothOptions, chunk: usize) -> (Vec<f32>, usize) {
        let variant = options.variant;
        let batch = |j: usize| s.offsets.partition_point(|&o| o <= j) - 1;
        let points: Vec<PointRef> = (0..s.n)
            .map(|j| (&s.z[j * s.p..(j + 1) * s.p], batch(j)))
            .collect();
        let mut acc = SmoothAccumulator::new(&s.landmarks, s.d, variant);
        for c0 in (0..s.n).step_by(chunk) {
            let c1 = (c0 + chunk).min(s.n);
            acc.add_chunk(&s.landmarks, &points[c0..c1], &s.x[c0 * s.d..c1 * s.d]);
        }
        let lm_batch = |i: usize| batch(i);
        let fit = acc.finish(options, &s.landmarks, lm_batch);
        let mut out = vec![0.0; s.n * s.d];
        let mut cov = vec![false; s.n];
        let (unc, _) = fit.apply_chunk(&s.landmarks, &points, &s.x, &mut out, &mut cov);
        (out, unc)
    }

    #[test]
    fn smooth_matches_dense_p_and_q() {
        let s = setup(1, &[0, 31, 62, 5]);
        let a = dense_a(&s);
        let m = a.len();
        // P: rows normalised; Y = P X.
        let y: Vec<Vec<f64>> = (0..m)
            .map(|l| {
                let rs: f64 = a[l].iter().sum();
                (0..s.d)
                    .map(|f| {
                        (0..s.n)
                            .map(|j| a[l][j] / rs * s.x[j * s.d + f] as f64)
                            .sum()
                    })
                    .collect()
            })
            .collect();
        let (out, uncovered) = run(&s, Estimator::Smooth, 7);
        let mut n_unc = 0;
        for j in 0..s.n {
            let cs: f64 = (0..m).map(|l| a[l][j]).sum();
            for f in 0..s.d {
                let want = if cs == 0.0 {
                    s.x[j * s.d + f] as f64
                } else {
                    (0..m).map(|l| a[l][j] / cs * y[l][f]).sum::<f64>()
                };
                assert!((out[j * s.d + f] as f64 - want).abs() <= 1e-5 * want.abs().max(1.0));
            }
            n_unc += (cs == 0.0) as usize;
        }
        assert_eq!(uncovered, n_unc);
        // Both P and Q are row-stochastic: a constant feature stays constant.
        let mut c = setup(1, &[0, 31, 62, 5]);
        c.x.iter_mut().enumerate().for_each(|(i, v)| {
            if i % c.d == 0 {
                *v = 2.5
            }
        });
        let (out, _) = run(&c, Estimator::Smooth, 90);
        assert!((0..c.n).all(|j| (out[j * c.d] - 2.5).abs() < 1e-5));
    }

    #[test]
    fn chunking_does_not_change_bytes() {
        let s = setup(2, &[3, 40, 77, 40]);
        assert_eq!(
            run(&s, Estimator::Smooth, 1).0,
            run(&s, Estimator::Smooth, 90).0
        );
        assert_eq!(
            run(&s, Estimator::Nystrom, 4).0,
            run(&s, Estimator::Nystrom, 90).0
        );
    }

    #[test]
    fn nystrom_matches_dense_formula() {
        let s = setup(3, &[1, 33, 65]);
        let a = dense_a(&s);
        let m = a.len();
        let idx: Vec<usize> = s.landmarks.iter().map(|l| l.index).collect();
        let a_ss: Vec<f64> = (0..m)
            .flat_map(|r| idx.iter().map(move |&c| (r, c)))
            .map(|(r, c)| a[r][c])
            .collect();
        let pinv = pseudo_inverse(&a_ss, m);
        let ax: Vec<Vec<f64>> = (0..m)
            .map(|l| {
                (0..s.d)
                    .map(|f| (0..s.n).map(|j| a[l][j] * s.x[j * s.d + f] as f64).sum())
                    .collect()
            })
            .collect();
        let w: Vec<Vec<f64>> = (0..m)
            .map(|l| {
                (0..s.d)
                    .map(|f| (0..m).map(|c| pinv[l * m + c] * ax[c][f]).sum())
                    .collect()
            })
            .collect();
        let (out, _) = run(&s, Estimator::Nystrom, 11);
        for j in 0..s.n {
            let cs: f64 = (0..m).map(|l| a[l][j]).sum();
            for f in 0..s.d {
                let want = if cs == 0.0 {
                    s.x[j * s.d + f] as f64
                } else {
                    (0..m).map(|l| a[l][j] * w[l][f]).sum()
                };
                assert!(
                    (out[j * s.d + f] as f64 - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "{j} {f}"
                );
            }
        }
    }

    /// Per landmark, per batch: the local mean, or `None` when the batch is not reached.
    type PerBatchMeans = Vec<Vec<Option<Vec<f64>>>>;

    /// Dense per-batch reference: `(Ybar_l, Y_lb)` from the full affinity matrix.
    fn dense_batch_means(s: &Setup) -> (Vec<Vec<f64>>, PerBatchMeans) {
        let a = dense_a(s);
        let batches = s.offsets.len() - 1;
        let batch = |j: usize| s.offsets.partition_point(|&o| o <= j) - 1;
        let (mut ybar, mut yb) = (Vec::new(), Vec::new());
        for row in &a {
            let per: Vec<Option<Vec<f64>>> = (0..batches)
                .map(|b| {
                    let w: f64 = (0..s.n).filter(|&j| batch(j) == b).map(|j| row[j]).sum();
                    (w > 0.0).then(|| {
                        (0..s.d)
                            .map(|f| {
                                (0..s.n)
                                    .filter(|&j| batch(j) == b)
                                    .map(|j| row[j] * s.x[j * s.d + f] as f64)
                                    .sum::<f64>()
                                    / w
                            })
                            .collect()
                    })
                })
                .collect();
            let present = per.iter().flatten().count() as f64;
            ybar.push(
                (0..s.d)
                    .map(|f| per.iter().flatten().map(|v| v[f]).sum::<f64>() / present)
                    .collect(),
            );
            yb.push(per);
        }
        (ybar, yb)
    }

    #[test]
    fn balanced_and_residual_match_dense_formulas() {
        let s = setup(4, &[0, 31, 62, 5, 88]);
        let a = dense_a(&s);
        let batch = |j: usize| s.offsets.partition_point(|&o| o <= j) - 1;
        let (ybar, yb) = dense_batch_means(&s);
        for strength in [1.0, 0.4] {
            let options = |variant| SmoothOptions {
                estimator: Estimator::Smooth,
                variant,
                strength,
                nearest_fallback: false,
            };
            let (bal, unc_b) = run_options(&s, &options(Variant::Balanced), 13);
            let (res, unc_r) = run_options(&s, &options(Variant::Residual), 13);
            assert_eq!(unc_b, unc_r);
            for j in 0..s.n {
                let w: Vec<f64> = (0..a.len()).map(|l| a[l][j]).collect();
                let cs: f64 = w.iter().sum();
                for f in 0..s.d {
                    let xj = s.x[j * s.d + f] as f64;
                    let (want_bal, want_res) = if cs == 0.0 {
                        (xj, xj)
                    } else {
                        let bal: f64 = w.iter().zip(&ybar).map(|(w, y)| w * y[f]).sum::<f64>() / cs;
                        let off: f64 = (0..a.len())
                            .filter(|&l| w[l] > 0.0)
                            .map(|l| {
                                let own = yb[l][batch(j)].as_ref().expect("reached");
                                w[l] * (ybar[l][f] - own[f])
                            })
                            .sum::<f64>()
                            / cs;
                        (xj + strength * (bal - xj), xj + strength * off)
                    };
                    let tol = |w: f64| 1e-5 * w.abs().max(1.0);
                    assert!((bal[j * s.d + f] as f64 - want_bal).abs() <= tol(want_bal));
                    assert!((res[j * s.d + f] as f64 - want_res).abs() <= tol(want_res));
                }
            }
        }
    }

    #[test]
    fn residual_removes_a_pure_batch_shift_and_keeps_within_batch_variation() {
        // Two batches with the same points, the second shifted by +5 in feature 0.
        let mut s = setup(5, &[0, 31, 62, 5, 45, 70]);
        let batch = |j: usize| s.offsets.partition_point(|&o| o <= j) - 1;
        for j in 0..s.n {
            s.x[j * s.d + 1] = 7.0;
            if batch(j) == 1 {
                s.x[j * s.d] += 5.0;
            }
        }
        let (out, _) = run_variant(&s, Estimator::Smooth, Variant::Residual, 90);
        // A constant feature stays constant; the batch offset is moved toward the mean.
        assert!((0..s.n).all(|j| (out[j * s.d + 1] - 7.0).abs() < 1e-5));
        let mean = |v: &[f32], b: usize| {
            let rows: Vec<usize> = (0..s.n).filter(|&j| batch(j) == b).collect();
            rows.iter().map(|&j| v[j * s.d] as f64).sum::<f64>() / rows.len() as f64
        };
        let before = mean(&s.x, 1) - mean(&s.x, 0);
        let after = mean(&out, 1) - mean(&out, 0);
        assert!(after.abs() < 0.5 * before.abs(), "{before} -> {after}");
        // Within a batch the spread survives (smoothing would flatten it).
        let spread = |v: &[f32]| {
            let rows: Vec<usize> = (0..s.n).filter(|&j| batch(j) == 0).collect();
            let m = mean(v, 0);
            rows.iter()
                .map(|&j| (v[j * s.d] as f64 - m).powi(2))
                .sum::<f64>()
                / rows.len() as f64
        };
        assert!(
            spread(&out) > 0.8 * spread(&s.x),
            "{} vs {}",
            spread(&out),
            spread(&s.x)
        );
    }

    /// Anchored residual: sums over the anchor rows with the anchor landmarks, offsets applied
    /// to every row through the landmarks' own weights.
    fn run_anchored(s: &Setup, anchors: &[bool], strength: f64) -> (Vec<f32>, Vec<Landmark>) {
        let batch = |j: usize| s.offsets.partition_point(|&o| o <= j) - 1;
        let view = RowBlocks::new(vec![&s.z], s.p);
        let alms =
            crate::kernels::landmark::anchor_landmarks(&view, &s.offsets, anchors, &s.landmarks, 3);
        let m = s.landmarks.len();
        let groups = s.offsets.len() - 1;
        let mut acc = SmoothAccumulator::new(&alms, s.d, Variant::Residual);
        let (mut z, mut x, mut codes) = (Vec::new(), Vec::new(), Vec::new());
        for j in (0..s.n).filter(|&j| anchors[j]) {
            z.extend_from_slice(&s.z[j * s.p..(j + 1) * s.p]);
            x.extend_from_slice(&s.x[j * s.d..(j + 1) * s.d]);
            codes.push(batch(j) as u32);
        }
        acc.add_rows(&alms, &z, &codes, &x);
        let mut sums = SmoothSums::new(m, s.d, groups, &vec![1e4; s.d], s.n);
        acc.drain_into(&mut sums);
        let options = SmoothOptions {
            estimator: Estimator::Smooth,
            variant: Variant::Residual,
            strength,
            nearest_fallback: false,
        };
        let fit = sums.totals().fit(
            &options,
            &s.landmarks,
            LandmarkSearch::new(&s.landmarks),
            batch,
        );
        let all_batches: Vec<u32> = (0..s.n).map(|j| batch(j) as u32).collect();
        let mut out = vec![0.0; s.n * s.d];
        let mut cov = vec![false; s.n];
        fit.apply_rows(&s.landmarks, &s.z, &all_batches, &s.x, &mut out, &mut cov);
        (out, alms)
    }

    fn floored(seed: u64, picks: &[usize]) -> Setup {
        let mut s = setup(seed, picks);
        let view = RowBlocks::new(vec![&s.z], s.p);
        let elbow = ElbowParams {
            rule: ElbowRule::Kneedle,
            a_min: 1e-8,
            bins: 4096,
            r_min: 4,
            min_threshold: crate::config::BATCH_KNN_FLOOR,
        };
        let mut buf = RowBuffers::default();
        s.landmarks = picks
            .iter()
            .map(|&i| landmark_row(&view, &s.offsets, i, 3, &elbow, &mut buf))
            .collect();
        s
    }

    #[test]
    fn anchored_residual_matches_the_dense_formula() {
        let s = floored(8, &[0, 31, 62, 5, 88, 47]);
        let batch = |j: usize| s.offsets.partition_point(|&o| o <= j) - 1;
        // Anchors: every fourth row (each batch has some), plus landmark 0's own row.
        let anchors: Vec<bool> = (0..s.n).map(|j| j % 4 == 1 || j == 0).collect();
        let strength = 0.7;
        let (out, alms) = run_anchored(&s, &anchors, strength);
        let (m, batches) = (s.landmarks.len(), s.offsets.len() - 1);
        // Dense: the anchor scales are the k-th nearest *anchor* of each batch.
        for (lm, alm) in s.landmarks.iter().zip(&alms) {
            assert_eq!((lm.threshold, &lm.coords), (alm.threshold, &alm.coords));
            for b in 0..batches {
                let mut d2: Vec<f64> = (0..s.n)
                    .filter(|&j| anchors[j] && batch(j) == b && j != lm.index)
                    .map(|j| sq_dist_ref(&lm.coords, &s.z[j * s.p..(j + 1) * s.p]))
                    .collect();
                d2.sort_by(f64::total_cmp);
                let kth = d2[2.min(d2.len() - 1)];
                assert!((alm.scales[b].sigma2_kth - kth).abs() <= 1e-12 * kth.max(1.0));
            }
        }
        // Y_lb over anchors with the anchor kernel; Q over every row with the landmarks'.
        let a_anchor =
            |l: usize, j: usize| alms[l].affinity(&s.z[j * s.p..(j + 1) * s.p], batch(j));
        let a_all =
            |l: usize, j: usize| s.landmarks[l].affinity(&s.z[j * s.p..(j + 1) * s.p], batch(j));
        let mut offsets = vec![vec![None::<Vec<f64>>; batches]; m];
        for (l, offsets_l) in offsets.iter_mut().enumerate() {
            let per: Vec<Option<Vec<f64>>> = (0..batches)
                .map(|b| {
                    let rows: Vec<usize> =
                        (0..s.n).filter(|&j| anchors[j] && batch(j) == b).collect();
                    let w: f64 = rows.iter().map(|&j| a_anchor(l, j)).sum();
                    (w > 0.0).then(|| {
                        (0..s.d)
                            .map(|f| {
                                rows.iter()
                                    .map(|&j| a_anchor(l, j) * s.x[j * s.d + f] as f64)
                                    .sum::<f64>()
                                    / w
                            })
                            .collect()
                    })
                })
                .collect();
            // The floor reaches every batch's anchors.
            assert!(per.iter().all(|v| v.is_some()), "landmark {l}");
            let mean: Vec<f64> = (0..s.d)
                .map(|f| per.iter().flatten().map(|v| v[f]).sum::<f64>() / batches as f64)
                .collect();
            for (b, slot) in offsets_l.iter_mut().enumerate() {
                let own = per[b].as_ref().unwrap();
                *slot = Some((0..s.d).map(|f| mean[f] - own[f]).collect());
            }
        }
        for j in 0..s.n {
            let w: Vec<f64> = (0..m).map(|l| a_all(l, j)).collect();
            let cs: f64 = w.iter().sum();
            for f in 0..s.d {
                let xj = s.x[j * s.d + f] as f64;
                let want = if cs == 0.0 {
                    xj
                } else {
                    let off: f64 = (0..m)
                        .map(|l| w[l] * offsets[l][batch(j)].as_ref().unwrap()[f])
                        .sum::<f64>()
                        / cs;
                    xj + strength * off
                };
                let got = out[j * s.d + f] as f64;
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{j} {f}: {got} {want}"
                );
            }
        }
    }

    fn sq_dist_ref(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(&u, &v)| (u as f64 - v as f64).powi(2))
            .sum()
    }

    #[test]
    fn anchors_on_every_row_reproduce_the_residual_output() {
        let s = floored(9, &[0, 31, 62, 5, 45, 70]);
        let (anchored, alms) = run_anchored(&s, &vec![true; s.n], 1.0);
        assert_eq!(alms, s.landmarks);
        let (plain, _) = run_variant(&s, Estimator::Smooth, Variant::Residual, 90);
        assert_eq!(anchored, plain);
    }

    #[test]
    fn per_batch_variants_do_not_depend_on_chunking() {
        let s = setup(6, &[3, 40, 77]);
        for v in [Variant::Balanced, Variant::Residual] {
            assert_eq!(
                run_variant(&s, Estimator::Smooth, v, 1).0,
                run_variant(&s, Estimator::Smooth, v, 90).0
            );
        }
    }

    #[test]
    fn pseudo_inverse_properties() {
        // Rank-deficient: duplicate rows (a landmark drawn twice).
        let a = vec![1.0, 0.5, 1.0, 0.5, 1.0, 0.5, 1.0, 0.5, 1.0];
        let p = pseudo_inverse(&a, 3);
        let mul = |x: &[f64], y: &[f64]| -> Vec<f64> {
            (0..9)
                .map(|k| (0..3).map(|i| x[(k / 3) * 3 + i] * y[i * 3 + k % 3]).sum())
                .collect()
        };
        let apa = mul(&mul(&a, &p), &a);
        for (u, v) in apa.iter().zip(&a) {
            assert!((u - v).abs() < 1e-9);
        }
        let pap = mul(&mul(&p, &a), &p);
        for (u, v) in pap.iter().zip(&p) {
            assert!((u - v).abs() < 1e-9);
        }
    }
}
