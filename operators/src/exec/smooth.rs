//! Smoothing as two steps: `BalansSmoothPartialExec` (per partition: `A_S X` and the row sums
//! of `A_S` over the leaves that start in the partition, every entry recomputed from the
//! landmark descriptors) and `BalansSmoothExec` (global: the partials added in fixed point, then
//! the per-landmark values of the chosen variant). The table of `BalansSmoothExec` lists every
//! landmark's row sum.

use std::sync::Arc;

use datafusion::arrow::array::{Float64Array, RecordBatch, UInt32Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::config::{Metric, OutputSpace};
use crate::error::{OperatorError, Result};
use crate::exec::context::{CancelFlag, PassContext};
use crate::exec::step::{
    GlobalStep, GlobalStepExec, PartitionStep, PartitionStepExec, partial_batch, partial_states,
};
use crate::kernels::exact::leaves_starting_in;
use crate::kernels::landmark::RowBlocks;
use crate::kernels::search::LandmarkSearch;
use crate::kernels::smooth::{SmoothAccumulator, SmoothSums, group_count};

/// Stage name of the smoothing steps.
pub const SMOOTH_STAGE: &str = "smooth";

/// Per-partition smoothing sums (see the module docs).
#[derive(Debug, Default, Clone, Copy)]
pub struct SmoothPartialStep;

/// The per-partition smoothing operator.
pub type BalansSmoothPartialExec = PartitionStepExec<SmoothPartialStep>;

/// The global smoothing fit (see the module docs).
#[derive(Debug, Default, Clone, Copy)]
pub struct SmoothMergeStep;

/// The smoothing fit operator.
pub type BalansSmoothExec = GlobalStepExec<SmoothMergeStep>;

/// The rows the correction smooths (features, or the PCA coordinates with
/// `--output-space pca`), global row order.
pub fn output_rows(ctx: &PassContext) -> Result<RowBlocks<'_>> {
    match ctx.spec.output_space() {
        OutputSpace::Features => ctx.feature_rows(),
        OutputSpace::Pca => ctx.distance_rows(),
    }
}

/// Columns of [`output_rows`], known without the rows (a cluster's merge task has none).
fn output_width(ctx: &PassContext) -> usize {
    let d = ctx.spec.features.len();
    match ctx.spec.output_space() {
        OutputSpace::Features => d,
        OutputSpace::Pca => match ctx.pca() {
            Ok(Some(model)) => model.p,
            _ => d,
        },
    }
}

/// Per output column: a bound on `sum_j |x_jc|` over every row.
fn column_bounds(ctx: &PassContext, dx: usize) -> Result<Vec<f64>> {
    let profile = ctx.profile()?;
    let n = profile.rows.max(1) as f64;
    Ok(match ctx.spec.output_space() {
        OutputSpace::Features => profile.abs_max().iter().map(|&a| n * a).collect(),
        OutputSpace::Pca => {
            // |z_c| <= ||x - mean|| <= the diagonal of the features' bounding box.
            let diag: f64 = if ctx.spec.config.metric == Metric::Cosine {
                1.0
            } else {
                profile
                    .half_range()
                    .iter()
                    .map(|&r| (2.0 * r) * (2.0 * r))
                    .sum::<f64>()
                    .sqrt()
            };
            vec![n * diag * (1.0 + 1e-6) + 1e-300; dx]
        }
    })
}

fn empty_sums(ctx: &PassContext, dx: usize) -> Result<SmoothSums> {
    let set = ctx.landmarks()?;
    let groups = group_count(&set.landmarks, ctx.spec.config.variant);
    Ok(SmoothSums::new(
        set.landmarks.len(),
        dx,
        groups,
        &column_bounds(ctx, dx)?,
        ctx.profile()?.rows,
    ))
}

impl PartitionStep for SmoothPartialStep {
    fn name(&self) -> &'static str {
        "BalansSmoothPartialExec"
    }

    fn stage(&self) -> &'static str {
        SMOOTH_STAGE
    }

    fn describe(&self, ctx: &PassContext) -> String {
        format!(
            "variant={}, output_space={}",
            ctx.spec.config.variant,
            ctx.spec.output_space()
        )
    }

    fn run(&self, ctx: &PassContext, partition: usize, cancel: &CancelFlag) -> Result<RecordBatch> {
        let cfg = &ctx.spec.config;
        let set = ctx.landmarks()?.clone();
        // Anchored: the sums run over the anchor rows, with the anchor scales.
        let landmarks = set.anchor_landmarks.as_ref().unwrap_or(&set.landmarks);
        let profile = ctx.profile()?.clone();
        let anchors = profile.anchors.as_deref();
        let x_rows = output_rows(ctx)?;
        let z_rows = ctx.distance_rows()?;
        let dx = x_rows.p();
        let p = z_rows.p();
        let groups = group_count(landmarks, cfg.variant);
        let m = landmarks.len();
        ctx.reserve(
            SmoothAccumulator::size_bytes(m, dx, groups) + SmoothSums::size_bytes(m, dx, groups),
            "Y = A_S X (landmarks x batches x output columns)",
        )?;
        let mut sums = empty_sums(ctx, dx)?;
        let mut acc = SmoothAccumulator::with_search(
            landmarks,
            LandmarkSearch::new(landmarks),
            dx,
            cfg.variant,
        );
        let rows = profile.partition_rows(partition);
        let mut seen = 0usize;
        let (mut z, mut x, mut codes) = (Vec::new(), Vec::new(), Vec::new());
        for leaf in leaves_starting_in(rows, profile.rows, cfg.leaf_rows) {
            let mut lo = leaf.start;
            while lo < leaf.end {
                cancel.check()?;
                let hi = (lo + cfg.chunk_rows).min(leaf.end);
                z.clear();
                x.clear();
                codes.clear();
                for i in lo..hi {
                    if anchors.is_some_and(|a| !a[i]) {
                        continue;
                    }
                    z.extend_from_slice(z_rows.row(i));
                    x.extend_from_slice(x_rows.row(i));
                    codes.push(profile.codes[i]);
                }
                debug_assert_eq!(z.len(), codes.len() * p);
                acc.add_rows(landmarks, &z, &codes, &x);
                ctx.stage_progress(SMOOTH_STAGE, (hi - lo) as u64, None);
                seen += hi - lo;
                lo = hi;
            }
            acc.drain_into(&mut sums);
        }
        partial_batch(partition, seen, sums.to_bytes())
    }
}

impl GlobalStep for SmoothMergeStep {
    fn name(&self) -> &'static str {
        "BalansSmoothExec"
    }

    fn stage(&self) -> &'static str {
        SMOOTH_STAGE
    }

    fn describe(&self, ctx: &PassContext) -> String {
        let c = &ctx.spec.config;
        format!(
            "variant={}, estimator={}, strength={}",
            c.variant, c.estimator, c.strength
        )
    }

    fn schema(&self, _ctx: &PassContext) -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("landmark", DataType::UInt32, false),
            Field::new("row_sum", DataType::Float64, false),
        ]))
    }

    fn merge(
        &self,
        ctx: &PassContext,
        partials: Vec<RecordBatch>,
        cancel: &CancelFlag,
    ) -> Result<RecordBatch> {
        let set = ctx.landmarks()?.clone();
        let dx = output_width(ctx);
        let mut sums = empty_sums(ctx, dx)?;
        for (_, state) in partial_states(&partials)? {
            cancel.check()?;
            sums.merge_bytes(&state).ok_or_else(|| {
                OperatorError::InvalidParameter("malformed smoothing partial".into())
            })?;
        }
        let mut options = ctx.spec.config.smooth_options();
        options.nearest_fallback = !set.all_rows;
        let fitted = sums.totals().fit(
            &options,
            &set.landmarks,
            LandmarkSearch::new(&set.landmarks),
            |i| set.sample_batch(i),
        );
        let row_sums = fitted.row_sums().to_vec();
        let table = RecordBatch::try_new(
            self.schema(ctx),
            vec![
                Arc::new(UInt32Array::from(
                    (0..row_sums.len() as u32).collect::<Vec<_>>(),
                )),
                Arc::new(Float64Array::from(row_sums)),
            ],
        )?;
        ctx.set_smoother(Arc::new(fitted));
        Ok(table)
    }
}
