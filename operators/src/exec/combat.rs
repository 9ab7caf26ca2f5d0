//! ComBat as two steps: `BalansMomentsExec` (per partition: per batch and feature the row
//! count and the sums of `x - c` and `(x - c)^2` over its leaves, `c` the feature's mid-range,
//! in order-independent fixed point) and `BalansComBatExec` (global: the moments, then the
//! empirical-Bayes fit of [`crate::kernels::combat`]). The write step applies the model per
//! row. The table lists, per batch, its rows and the mean of its location and scale estimates.

use std::sync::Arc;

use datafusion::arrow::array::{Float64Array, RecordBatch, StringArray, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::error::{OperatorError, Result};
use crate::exec::context::{CancelFlag, PassContext};
use crate::exec::step::{
    GlobalStep, GlobalStepExec, PartitionStep, PartitionStepExec, partial_batch, partial_states,
};
use crate::kernels::combat::{BatchMoments, fit_combat};
use crate::kernels::exact::{ExactSum, leaves_starting_in};

/// Stage name of the ComBat fit.
pub const FIT_STAGE: &str = "fit";

/// Per-partition ComBat moments (see the module docs).
#[derive(Debug, Default, Clone, Copy)]
pub struct MomentsStep;

/// The per-partition moments operator.
pub type BalansMomentsExec = PartitionStepExec<MomentsStep>;

/// The global ComBat fit (see the module docs).
#[derive(Debug, Default, Clone, Copy)]
pub struct ComBatFitStep;

/// The ComBat fit operator.
pub type BalansComBatExec = GlobalStepExec<ComBatFitStep>;

/// Fixed-point layout: per batch `[s1 (d) | s2 (d)]`.
fn moment_sums(ctx: &PassContext) -> Result<(Vec<f64>, usize, ExactSum)> {
    let profile = ctx.profile()?;
    let d = ctx.spec.features.len();
    let batches = profile.batch_keys.len();
    let n = profile.rows as f64;
    let r = profile.half_range();
    let mut bounds: Vec<f64> = r.iter().map(|&ri| n * ri).collect();
    bounds.extend(r.iter().map(|&ri| n * ri * ri));
    Ok((
        profile.center(),
        batches,
        ExactSum::new(batches * 2 * d, &bounds),
    ))
}

impl PartitionStep for MomentsStep {
    fn name(&self) -> &'static str {
        "BalansMomentsExec"
    }

    fn stage(&self) -> &'static str {
        FIT_STAGE
    }

    fn describe(&self, ctx: &PassContext) -> String {
        format!("features={}", ctx.spec.features.len())
    }

    fn run(&self, ctx: &PassContext, partition: usize, cancel: &CancelFlag) -> Result<RecordBatch> {
        let d = ctx.spec.features.len();
        let profile = ctx.profile()?.clone();
        let (shift, batches, mut total) = moment_sums(ctx)?;
        ctx.reserve(
            ExactSum::size_bytes(batches * 2 * d, 2 * d) + batches * (2 * d + 1) * 8,
            "ComBat's per-batch moments (batches x features)",
        )?;
        let features = ctx.feature_rows()?;
        let mut counts = vec![0u64; batches];
        let mut leaf = vec![0.0f64; batches * 2 * d];
        let rows = profile.partition_rows(partition);
        for range in leaves_starting_in(rows, profile.rows, ctx.spec.config.leaf_rows) {
            cancel.check()?;
            leaf.fill(0.0);
            for i in range.clone() {
                let b = profile.codes[i] as usize;
                counts[b] += 1;
                let (s1, s2) = leaf[b * 2 * d..(b + 1) * 2 * d].split_at_mut(d);
                for (f, &v) in features.row(i).iter().enumerate() {
                    let t = v as f64 - shift[f];
                    s1[f] += t;
                    s2[f] += t * t;
                }
            }
            total.add_slice(0, &leaf);
            ctx.stage_progress(FIT_STAGE, range.len() as u64, None);
        }
        let mut state: Vec<u8> = counts.iter().flat_map(|c| c.to_le_bytes()).collect();
        state.extend_from_slice(&total.to_bytes());
        let seen = counts.iter().sum::<u64>() as usize;
        partial_batch(partition, seen, state)
    }
}

impl GlobalStep for ComBatFitStep {
    fn name(&self) -> &'static str {
        "BalansComBatExec"
    }

    fn stage(&self) -> &'static str {
        FIT_STAGE
    }

    fn describe(&self, _ctx: &PassContext) -> String {
        "empirical Bayes".to_string()
    }

    fn schema(&self, _ctx: &PassContext) -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("batch", DataType::Utf8, false),
            Field::new("rows", DataType::UInt64, false),
            Field::new("mean_gamma", DataType::Float64, false),
            Field::new("mean_delta", DataType::Float64, false),
        ]))
    }

    fn merge(
        &self,
        ctx: &PassContext,
        partials: Vec<RecordBatch>,
        cancel: &CancelFlag,
    ) -> Result<RecordBatch> {
        let d = ctx.spec.features.len();
        let profile = ctx.profile()?.clone();
        let (shift, batches, mut total) = moment_sums(ctx)?;
        let mut counts = vec![0u64; batches];
        for (_, state) in partial_states(&partials)? {
            cancel.check()?;
            let bad = || OperatorError::InvalidParameter("malformed ComBat partial".into());
            if state.len() < batches * 8 {
                return Err(bad());
            }
            for (b, c) in counts.iter_mut().enumerate() {
                *c += u64::from_le_bytes(state[b * 8..(b + 1) * 8].try_into().map_err(|_| bad())?);
            }
            total.merge_bytes(&state[batches * 8..]).ok_or_else(bad)?;
        }
        let values = total.values();
        let (mut s1, mut s2) = (
            Vec::with_capacity(batches * d),
            Vec::with_capacity(batches * d),
        );
        for b in 0..batches {
            s1.extend_from_slice(&values[b * 2 * d..b * 2 * d + d]);
            s2.extend_from_slice(&values[b * 2 * d + d..(b + 1) * 2 * d]);
        }
        let moments = BatchMoments::from_shifted_sums(&shift, &counts, &s1, &s2);
        let model = fit_combat(&moments, &profile.batch_keys)?;
        ctx.with_summary(|s| {
            s.stop_reason = format!("{batches} batches, empirical Bayes");
            s.coverage = 1.0;
            s.distance_dims = d;
        });
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let table = RecordBatch::try_new(
            self.schema(ctx),
            vec![
                Arc::new(StringArray::from(profile.batch_keys.clone())),
                Arc::new(UInt64Array::from(counts)),
                Arc::new(Float64Array::from(
                    model
                        .batches
                        .iter()
                        .map(|b| mean(&b.gamma_star))
                        .collect::<Vec<_>>(),
                )),
                Arc::new(Float64Array::from(
                    model
                        .batches
                        .iter()
                        .map(|b| mean(&b.delta_star))
                        .collect::<Vec<_>>(),
                )),
            ],
        )?;
        ctx.set_combat(Arc::new(model));
        Ok(table)
    }
}
