//! Landmark rows of `A_S` and the adaptive sampling loop that chooses them.
//!
//! A landmark row is fully described by the landmark's coordinates, its per-batch scales and
//! its elbow threshold: `A_lj = exp(-s_lj)` if `s_lj = d2(z_l, z_j) / sigma2_{l, b(j)} < t_l`,
//! else 0. Storing that description (O(p + B) per landmark) instead of the sparse row
//! (O(n)) keeps `A_S` out of memory; the smoothing passes recompute entries bit for bit.

use crate::error::{OperatorError, Result};
use crate::kernels::distance::sq_dist;
use crate::kernels::elbow::{ElbowParams, row_threshold};
use crate::kernels::sampling::{AdaptiveSampler, StopReason};
use crate::kernels::scale::{BatchScale, batch_scales, scaled_distances};
use rayon::prelude::*;

/// A row-major matrix stored as a list of contiguous row blocks (e.g. the record batches of a
/// memory-mapped Arrow IPC file).
#[derive(Debug, Clone)]
pub struct RowBlocks<'a> {
    blocks: Vec<(usize, &'a [f32])>,
    p: usize,
    n: usize,
}

impl<'a> RowBlocks<'a> {
    /// Builds the view from consecutive blocks of `p` columns each.
    pub fn new(blocks: Vec<&'a [f32]>, p: usize) -> Self {
        let mut start = 0;
        let blocks = blocks
            .into_iter()
            .map(|b| {
                assert_eq!(b.len() % p, 0, "block length is not a multiple of p");
                let s = start;
                start += b.len() / p;
                (s, b)
            })
            .collect();
        Self {
            blocks,
            p,
            n: start,
        }
    }

    /// A window of a larger matrix: the blocks hold rows `first_row..` of a matrix of `n` rows
    /// in all (rows outside the blocks must not be asked for).
    pub fn window(first_row: usize, blocks: Vec<&'a [f32]>, p: usize, n: usize) -> Self {
        let mut view = Self::new(blocks, p);
        for block in &mut view.blocks {
            block.0 += first_row;
        }
        assert!(first_row + view.n <= n, "window past the matrix's end");
        view.n = n;
        view
    }

    /// Number of rows.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Number of columns.
    pub fn p(&self) -> usize {
        self.p
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &'a [f32] {
        let b = self.blocks.partition_point(|(s, _)| *s <= i) - 1;
        let (s, data) = self.blocks[b];
        &data[(i - s) * self.p..(i - s + 1) * self.p]
    }

    /// `out[j] = ||query - row_j||^2` for every row.
    pub fn sq_distances_to(&self, query: &[f32], out: &mut [f64]) {
        for &(s, data) in &self.blocks {
            let len = data.len() / self.p;
            crate::kernels::distance::sq_distances_to(query, data, self.p, &mut out[s..s + len]);
        }
    }
}

/// One landmark row of `A_S`, described compactly.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Landmark {
    /// Index of the landmark in the batch-grouped order.
    pub index: usize,
    /// Coordinates `z_l` (reduced space).
    pub coords: Vec<f32>,
    /// Per-batch local scales.
    pub scales: Vec<BatchScale>,
    /// Elbow threshold on scaled distances (keep `s < t`).
    pub threshold: f64,
    /// Number of kept entries (self included).
    pub kept: usize,
}

impl Landmark {
    /// Scaled distance from this landmark to a point with coordinates `z` in batch `batch`.
    #[inline]
    pub fn scaled_distance(&self, z: &[f32], batch: usize) -> f64 {
        sq_dist(&self.coords, z) / self.scales[batch].sigma2
    }

    /// The affinity `A_lj` of a point (0 when not kept).
    #[inline]
    pub fn affinity(&self, z: &[f32], batch: usize) -> f64 {
        let s = self.scaled_distance(z, batch);
        if s < self.threshold { (-s).exp() } else { 0.0 }
    }
}

/// Parameters of the sampling loop.
#[derive(Debug, Clone, Copy)]
pub struct SamplingParams {
    /// Neighbour rank of the local scale.
    pub k: usize,
    /// Block length `J`.
    pub block: usize,
    /// Patience `tau`.
    pub tau: usize,
    /// Landmark cap.
    pub max_landmarks: usize,
    /// Seed.
    pub seed: u64,
    /// Elbow rule parameters.
    pub elbow: ElbowParams,
}

/// What the sampling loop produced.
#[derive(Debug, Clone)]
pub struct SamplingResult {
    /// The landmarks in sampling order (a point may be drawn more than once).
    pub landmarks: Vec<Landmark>,
    /// Why sampling stopped.
    pub stop: StopReason,
    /// Which points (batch-grouped order) some landmark keeps.
    pub covered: Vec<bool>,
    /// Number of covered points.
    pub n_covered: usize,
    /// Newly covered points per landmark.
    pub delta: Vec<usize>,
    /// Landmarks needed for full coverage, if reached.
    pub steps_to_full_coverage: Option<usize>,
}

impl SamplingResult {
    /// Total kept entries `nnz(A_S)`.
    pub fn nnz(&self) -> usize {
        self.landmarks.iter().map(|l| l.kept).sum()
    }
}

/// Reusable buffers of one landmark row.
#[derive(Debug, Default)]
pub struct RowBuffers {
    d2: Vec<f64>,
    s: Vec<f64>,
    scratch: Vec<f64>,
}

/// Computes the landmark row of point `i` (batch-grouped index).
pub fn landmark_row(
    z: &RowBlocks<'_>,
    offsets: &[usize],
    i: usize,
    k: usize,
    elbow: &ElbowParams,
    buf: &mut RowBuffers,
) -> Landmark {
    let n = z.n();
    buf.d2.resize(n, 0.0);
    buf.s.resize(n, 0.0);
    let coords = z.row(i).to_vec();
    z.sq_distances_to(&coords, &mut buf.d2);
    buf.d2[i] = 0.0;
    let scales = batch_scales(&buf.d2, offsets, i, k, &mut buf.scratch);
    scaled_distances(&buf.d2, offsets, &scales, i, &mut buf.s);
    let threshold = row_threshold(&buf.s, i, elbow, &mut buf.scratch);
    let kept = buf.s.par_iter().filter(|&&v| v < threshold).count();
    Landmark {
        index: i,
        coords,
        scales,
        threshold,
        kept,
    }
}

/// Runs the adaptive sampling loop over the batch-grouped reduced matrix `z`.
///
/// With `replay`, the given landmark indices are used in order instead of sampled ones (to
/// reproduce a recorded run). `cancelled` is polled once per landmark; `progress` receives
/// `(landmarks, covered points)` after each one.
pub fn sample_landmarks(
    z: &RowBlocks<'_>,
    offsets: &[usize],
    params: &SamplingParams,
    replay: Option<&[usize]>,
    cancelled: &(dyn Fn() -> bool + Sync),
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SamplingResult> {
    let n = z.n();
    if n == 0 {
        return Err(OperatorError::BadInput(
            "no rows to sample landmarks from".into(),
        ));
    }
    let max = replay.map_or(params.max_landmarks, |r| r.len());
    let mut sampler = AdaptiveSampler::new(n, params.block, params.tau, max, params.seed);
    let mut buf = RowBuffers::default();
    let mut landmarks = Vec::new();
    let mut delta = Vec::new();
    let stop = loop {
        if cancelled() {
            return Err(OperatorError::Cancelled);
        }
        let i = match replay {
            Some(r) => r[landmarks.len()],
            None => sampler.next_index(),
        };
        if i >= n {
            return Err(OperatorError::InvalidParameter(format!(
                "landmark {i} out of range"
            )));
        }
        let row = landmark_row(z, offsets, i, params.k, &params.elbow, &mut buf);
        let d = sampler.observe_dense(&buf.s, row.threshold);
        delta.push(d);
        landmarks.push(row);
        progress(landmarks.len(), sampler.n_covered());
        if let Some(reason) = sampler.stop_reason() {
            break reason;
        }
    };
    Ok(SamplingResult {
        landmarks,
        stop,
        n_covered: sampler.n_covered(),
        covered: sampler.covered().to_vec(),
        delta,
        steps_to_full_coverage: sampler.steps_to_full_coverage(),
    })
}

/// The landmarks of an anchored correction: the same coordinates and thresholds, with every
/// per-batch scale measured on the anchor rows only (`sigma2_{l,b}` = squared distance to the
/// `k`-th nearest anchor of batch `b`, self excluded, `k` clipped to the batch's anchors; the
/// floor of [`batch_scales`] over the anchors).
///
/// `z` and `offsets` are the batch-grouped rows the landmarks were sampled from and
/// `anchors[i]` marks the anchor rows among them. The anchor kernel reaches the `k` nearest
/// anchors of every batch wherever the landmark lies (with the per-batch floor the threshold
/// keeps them), so a landmark far from every anchor still gets each batch's local anchor mean.
/// With every row an anchor the result equals `landmarks`, bit for bit.
pub fn anchor_landmarks(
    z: &RowBlocks<'_>,
    offsets: &[usize],
    anchors: &[bool],
    landmarks: &[Landmark],
    k: usize,
) -> Vec<Landmark> {
    assert_eq!(anchors.len(), z.n(), "one anchor flag per row");
    let p = z.p();
    let idx: Vec<usize> = (0..z.n()).filter(|&i| anchors[i]).collect();
    let anchor_offsets: Vec<usize> = offsets
        .iter()
        .map(|&o| idx.partition_point(|&i| i < o))
        .collect();
    let coords: Vec<f32> = idx.iter().flat_map(|&i| z.row(i).iter().copied()).collect();
    let rows = RowBlocks::new(vec![&coords], p);
    landmarks
        .par_iter()
        .map_init(
            || (vec![0.0f64; idx.len()], Vec::new()),
            |(d2, scratch), lm| {
                rows.sq_distances_to(&lm.coords, d2);
                let self_pos = match idx.binary_search(&lm.index) {
                    Ok(pos) => {
                        d2[pos] = 0.0;
                        pos
                    }
                    Err(_) => usize::MAX,
                };
                Landmark {
                    scales: batch_scales(d2, &anchor_offsets, self_pos, k, scratch),
                    ..lm.clone()
                }
            },
        )
        .collect()
}

/// Nonzero entries `(landmark, A_lj)` of column `j` of `A_S`, in landmark order.
#[inline]
pub fn column_entries(landmarks: &[Landmark], z: &[f32], batch: usize, out: &mut Vec<(u32, f64)>) {
    out.clear();
    for (l, lm) in landmarks.iter().enumerate() {
        let a = lm.affinity(z, batch);
        if a > 0.0 {
            out.push((l as u32, a));
        }
    }
}

/// The dense `m x m` block `A_SS` (row `l`, column = landmark `l'`'s point), row-major.
pub fn landmark_block(
    landmarks: &[Landmark],
    batch_of: impl Fn(usize) -> usize + Sync,
) -> Vec<f64> {
    let m = landmarks.len();
    let mut out = vec![0.0; m * m];
    out.par_chunks_mut(m.max(1))
        .zip(landmarks.par_iter())
        .for_each(|(row, lm)| {
            for (c, other) in landmarks.iter().enumerate() {
                row[c] = lm.affinity(&other.coords, batch_of(other.index));
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ElbowRule;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn a_window_is_indexed_by_global_row() {
        let (a, b) = ([1.0f32, 2.0, 3.0, 4.0], [5.0f32, 6.0]);
        let view = RowBlocks::window(10, vec![&a, &b], 2, 20);
        assert_eq!(view.n(), 20);
        assert_eq!(view.row(10), &[1.0, 2.0]);
        assert_eq!(view.row(11), &[3.0, 4.0]);
        assert_eq!(view.row(12), &[5.0, 6.0]);
        let whole = RowBlocks::new(vec![&a, &b], 2);
        assert_eq!((whole.n(), whole.row(2)), (3, &[5.0f32, 6.0][..]));
    }

    #[test]
    #[should_panic(expected = "window past the matrix's end")]
    fn a_window_must_fit_the_matrix() {
        let a = [1.0f32, 2.0];
        RowBlocks::window(5, vec![&a], 1, 6);
    }

    fn data(n_per: usize, batches: usize, p: usize, seed: u64) -> (Vec<f32>, Vec<usize>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut x = Vec::new();
        let mut offsets = vec![0];
        for b in 0..batches {
            for i in 0..n_per {
                let cluster = (i % 3) as f32 * 6.0;
                for f in 0..p {
                    x.push(cluster + b as f32 * 0.7 + rng.random::<f32>() - 0.5 + f as f32 * 0.0);
                }
            }
            offsets.push((b + 1) * n_per);
        }
        (x, offsets)
    }

    fn params() -> SamplingParams {
        SamplingParams {
            k: 5,
            block: 4,
            tau: 8,
            max_landmarks: 10_000,
            seed: 1,
            elbow: ElbowParams {
                rule: ElbowRule::Kneedle,
                a_min: 1e-8,
                bins: 4096,
                r_min: 6,
                min_threshold: 0.0,
            },
        }
    }

    #[test]
    fn row_blocks_split_anywhere_give_the_same_rows() {
        let (x, _) = data(10, 3, 4, 1);
        let whole = RowBlocks::new(vec![&x], 4);
        let split = RowBlocks::new(vec![&x[..4 * 7], &x[4 * 7..4 * 19], &x[4 * 19..]], 4);
        for i in 0..30 {
            assert_eq!(whole.row(i), split.row(i));
        }
        let mut a = vec![0.0; 30];
        let mut b = vec![0.0; 30];
        whole.sq_distances_to(whole.row(3), &mut a);
        split.sq_distances_to(whole.row(3), &mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn batch_knn_floor_keeps_the_k_nearest_of_every_batch() {
        let (x, offsets) = data(40, 3, 5, 3);
        let z = RowBlocks::new(vec![&x], 5);
        let mut buf = RowBuffers::default();
        let mut p = params();
        p.elbow.rule = ElbowRule::MaxGap;
        let batch_of = |j: usize| offsets.partition_point(|&o| o <= j) - 1;
        let kept_per_batch = |lm: &Landmark| {
            let mut kept = vec![0usize; 3];
            for j in 0..z.n() {
                if j != lm.index && lm.affinity(z.row(j), batch_of(j)) > 0.0 {
                    kept[batch_of(j)] += 1;
                }
            }
            kept
        };
        let plain = landmark_row(&z, &offsets, 5, p.k, &p.elbow, &mut buf);
        p.elbow.min_threshold = crate::config::BATCH_KNN_FLOOR;
        let floored = landmark_row(&z, &offsets, 5, p.k, &p.elbow, &mut buf);
        assert!(floored.threshold >= plain.threshold);
        assert!(floored.threshold >= crate::config::BATCH_KNN_FLOOR);
        assert!(kept_per_batch(&floored).iter().all(|&c| c >= p.k));
    }

    #[test]
    fn recomputed_entries_equal_the_sampled_row() {
        let (x, offsets) = data(40, 3, 5, 2);
        let z = RowBlocks::new(vec![&x], 5);
        let mut buf = RowBuffers::default();
        let p = params();
        let lm = landmark_row(&z, &offsets, 17, p.k, &p.elbow, &mut buf);
        let batch_of = |j: usize| offsets.partition_point(|&o| o <= j) - 1;
        let mut kept = 0;
        for j in 0..z.n() {
            let a = lm.affinity(z.row(j), batch_of(j));
            let s = buf.s[j];
            if s < lm.threshold {
                kept += 1;
                assert_eq!(a, (-s).exp(), "entry {j} recomputed bit for bit");
            } else {
                assert_eq!(a, 0.0);
            }
        }
        assert_eq!(kept, lm.kept);
        assert!(lm.kept >= 6);
        assert_eq!(lm.affinity(z.row(17), batch_of(17)), 1.0, "A_ii = 1");
    }

    #[test]
    fn sampling_covers_everything_and_replays() {
        let (x, offsets) = data(50, 4, 3, 3);
        let z = RowBlocks::new(vec![&x], 3);
        let p = params();
        let r = sample_landmarks(&z, &offsets, &p, None, &|| false, &mut |_, _| {}).unwrap();
        assert_eq!(r.stop, StopReason::Tau);
        assert_eq!(r.n_covered, 200);
        assert_eq!(r.delta.iter().sum::<usize>(), 200);
        assert!(r.delta.iter().rev().take(p.tau).all(|&d| d == 0));
        let seq: Vec<usize> = r.landmarks.iter().map(|l| l.index).collect();
        let again =
            sample_landmarks(&z, &offsets, &p, Some(&seq), &|| false, &mut |_, _| {}).unwrap();
        assert_eq!(again.landmarks, r.landmarks);
        let mut capped = p;
        capped.max_landmarks = 2;
        let c = sample_landmarks(&z, &offsets, &capped, None, &|| false, &mut |_, _| {}).unwrap();
        assert_eq!((c.landmarks.len(), c.stop), (2, StopReason::MaxLandmarks));
    }

    #[test]
    fn cancellation_is_honoured() {
        let (x, offsets) = data(10, 2, 2, 4);
        let z = RowBlocks::new(vec![&x], 2);
        let e = sample_landmarks(&z, &offsets, &params(), None, &|| true, &mut |_, _| {});
        assert!(matches!(e, Err(OperatorError::Cancelled)));
    }
}
