//! Sphering as two steps: `BalansSpheringPartialExec` (per partition: the Gram matrix of the
//! fit rows — the negative controls — of its leaves, around every feature's mid-range, in
//! order-independent fixed point) and `BalansSpheringExec` (global: the whitening of
//! [`crate::kernels::sphering`]). The write step applies it per row. The table holds the
//! singular values used.

use std::sync::Arc;

use datafusion::arrow::array::{Float64Array, RecordBatch, UInt32Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::error::{OperatorError, Result};
use crate::exec::combat::FIT_STAGE;
use crate::exec::context::{CancelFlag, PassContext};
use crate::exec::step::{
    GlobalStep, GlobalStepExec, PartitionStep, PartitionStepExec, partial_batch, partial_states,
};
use crate::kernels::exact::{ExactSum, leaves_starting_in};
use crate::kernels::pca::GramAccumulator;
use crate::kernels::sphering::SpheringAccumulator;

/// Per-partition Gram matrix of the fit rows (see the module docs).
#[derive(Debug, Default, Clone, Copy)]
pub struct SpheringPartialStep;

/// The per-partition sphering operator.
pub type BalansSpheringPartialExec = PartitionStepExec<SpheringPartialStep>;

/// The global whitening fit (see the module docs).
#[derive(Debug, Default, Clone, Copy)]
pub struct SpheringFitStep;

/// The whitening fit operator.
pub type BalansSpheringExec = GlobalStepExec<SpheringFitStep>;

/// Rows per Gram update.
const GRAM_CHUNK: usize = 1024;

fn gram_sums(ctx: &PassContext) -> Result<(Vec<f64>, ExactSum)> {
    let profile = ctx.profile()?;
    let d = ctx.spec.features.len();
    let n = profile.rows as f64;
    let r = profile.half_range();
    let mut bounds: Vec<f64> = r.iter().map(|&ri| n * ri).collect();
    for j in 0..d {
        for i in 0..d {
            bounds.push(n * r[i] * r[j]);
        }
    }
    Ok((profile.center(), ExactSum::new(d + d * d, &bounds)))
}

impl PartitionStep for SpheringPartialStep {
    fn name(&self) -> &'static str {
        "BalansSpheringPartialExec"
    }

    fn stage(&self) -> &'static str {
        FIT_STAGE
    }

    fn describe(&self, ctx: &PassContext) -> String {
        format!(
            "fit_rows={}",
            ctx.spec.fit_mask.as_deref().unwrap_or("(none)")
        )
    }

    fn run(&self, ctx: &PassContext, partition: usize, cancel: &CancelFlag) -> Result<RecordBatch> {
        let d = ctx.spec.features.len();
        let profile = ctx.profile()?.clone();
        let mask = profile.fit_mask.as_ref().ok_or_else(|| {
            OperatorError::InvalidParameter(
                "sphering is fitted on negative controls: give --negcon PREDICATE".into(),
            )
        })?;
        ctx.reserve(
            GramAccumulator::size_bytes(d) + ExactSum::size_bytes(d + d * d, d + d * d),
            "the sphering state (features x features)",
        )?;
        let (shift, mut total) = gram_sums(ctx)?;
        let features = ctx.feature_rows()?;
        let mut count = 0u64;
        let mut chunk = Vec::with_capacity(GRAM_CHUNK * d);
        let rows = profile.partition_rows(partition);
        for leaf in leaves_starting_in(rows, profile.rows, ctx.spec.config.leaf_rows) {
            cancel.check()?;
            let mut acc = GramAccumulator::new(shift.clone());
            for i in leaf.clone() {
                if mask[i] {
                    chunk.extend_from_slice(features.row(i));
                    if chunk.len() == GRAM_CHUNK * d {
                        acc.update(&chunk);
                        chunk.clear();
                    }
                }
            }
            acc.update(&chunk);
            chunk.clear();
            let (_, n, sum, gram) = acc.to_parts();
            total.add_slice(0, &sum);
            total.add_slice(d, &gram);
            count += n;
            ctx.stage_progress(FIT_STAGE, leaf.len() as u64, None);
        }
        let mut state = count.to_le_bytes().to_vec();
        state.extend_from_slice(&total.to_bytes());
        partial_batch(partition, count as usize, state)
    }
}

impl GlobalStep for SpheringFitStep {
    fn name(&self) -> &'static str {
        "BalansSpheringExec"
    }

    fn stage(&self) -> &'static str {
        FIT_STAGE
    }

    fn describe(&self, ctx: &PassContext) -> String {
        format!(
            "sphering={}, epsilon={}",
            ctx.spec.config.sphering, ctx.spec.config.epsilon
        )
    }

    fn schema(&self, _ctx: &PassContext) -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("component", DataType::UInt32, false),
            Field::new("singular_value", DataType::Float64, false),
        ]))
    }

    fn merge(
        &self,
        ctx: &PassContext,
        partials: Vec<RecordBatch>,
        cancel: &CancelFlag,
    ) -> Result<RecordBatch> {
        let d = ctx.spec.features.len();
        let (shift, mut total) = gram_sums(ctx)?;
        let mut n = 0u64;
        for (_, state) in partial_states(&partials)? {
            cancel.check()?;
            let bad = || OperatorError::InvalidParameter("malformed sphering partial".into());
            n += u64::from_le_bytes(
                state
                    .get(..8)
                    .ok_or_else(bad)?
                    .try_into()
                    .map_err(|_| bad())?,
            );
            total.merge_bytes(&state[8..]).ok_or_else(bad)?;
        }
        let values = total.values();
        let acc =
            SpheringAccumulator::from_parts(shift, n, values[..d].to_vec(), values[d..].to_vec())
                .ok_or_else(|| {
                OperatorError::InvalidParameter("sphering state of the wrong size".into())
            })?;
        let cfg = &ctx.spec.config;
        let model = acc.fit(cfg.sphering, cfg.epsilon, &ctx.spec.features)?;
        ctx.with_summary(|s| {
            s.stop_reason = format!("{} negative-control rows", model.n);
            s.coverage = 1.0;
            s.distance_dims = d;
        });
        let sv = model.singular_values.clone();
        let table = RecordBatch::try_new(
            self.schema(ctx),
            vec![
                Arc::new(UInt32Array::from((0..sv.len() as u32).collect::<Vec<_>>())),
                Arc::new(Float64Array::from(sv)),
            ],
        )?;
        ctx.set_sphering(Arc::new(model));
        Ok(table)
    }
}
