//! PCA as two steps: `BalansGramExec` (per partition: the Gram matrix of its leaves around
//! every feature's mid-range, in order-independent fixed point) and `BalansPcaExec` (global:
//! the merged covariance, its eigendecomposition, the top `p` axes).
//!
//! The shift is the same for every leaf (from the profile), so the partial sums simply add;
//! the table of `BalansPcaExec` holds the mean and one row of loadings per component.

use std::sync::Arc;

use datafusion::arrow::array::{Array, FixedSizeListArray, Float64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::error::{OperatorError, Result};
use crate::exec::context::{CancelFlag, PassContext};
use crate::exec::step::{
    GlobalStep, GlobalStepExec, PartitionStep, PartitionStepExec, partial_batch, partial_states,
};
use crate::kernels::exact::{ExactSum, leaves_starting_in};
use crate::kernels::pca::GramAccumulator;

/// Stage name of the PCA steps.
pub const PCA_STAGE: &str = "pca";

/// Rows per Gram update (fixed: the leaf sum does not depend on threads).
const GRAM_CHUNK: usize = 1024;

/// Per-partition Gram partials (see the module docs).
#[derive(Debug, Default, Clone, Copy)]
pub struct GramStep;

/// The per-partition Gram operator.
pub type BalansGramExec = PartitionStepExec<GramStep>;

/// The global PCA fit (see the module docs).
#[derive(Debug, Default, Clone, Copy)]
pub struct PcaFitStep;

/// The PCA fit operator.
pub type BalansPcaExec = GlobalStepExec<PcaFitStep>;

/// The fixed-point layout of a Gram state: `[sum (d) | gram (d x d, column-major)]`.
fn gram_sums(ctx: &PassContext) -> Result<(Vec<f64>, ExactSum)> {
    let profile = ctx.profile()?;
    let d = ctx.spec.features.len();
    let n = profile.rows as f64;
    let r = profile.half_range();
    let mut bounds = Vec::with_capacity(d + d * d);
    bounds.extend(r.iter().map(|&ri| n * ri));
    for j in 0..d {
        for i in 0..d {
            bounds.push(n * r[i] * r[j]);
        }
    }
    Ok((profile.center(), ExactSum::new(d + d * d, &bounds)))
}

/// Gram partial of the leaves that start in rows `rows` of `features`, around `shift`.
pub fn gram_partial(
    features: &crate::kernels::landmark::RowBlocks<'_>,
    rows: std::ops::Range<usize>,
    leaf_rows: usize,
    shift: &[f64],
    total: &mut ExactSum,
    cancel: &CancelFlag,
) -> Result<u64> {
    let d = shift.len();
    let mut count = 0u64;
    let mut chunk = Vec::with_capacity(GRAM_CHUNK * d);
    for leaf in leaves_starting_in(rows, features.n(), leaf_rows) {
        cancel.check()?;
        let mut acc = GramAccumulator::new(shift.to_vec());
        let mut start = leaf.start;
        while start < leaf.end {
            let end = (start + GRAM_CHUNK).min(leaf.end);
            chunk.clear();
            for i in start..end {
                chunk.extend_from_slice(features.row(i));
            }
            acc.update(&chunk);
            start = end;
        }
        let (_, n, sum, gram) = acc.to_parts();
        total.add_slice(0, &sum);
        total.add_slice(d, &gram);
        count += n;
    }
    Ok(count)
}

impl PartitionStep for GramStep {
    fn name(&self) -> &'static str {
        "BalansGramExec"
    }

    fn stage(&self) -> &'static str {
        PCA_STAGE
    }

    fn describe(&self, ctx: &PassContext) -> String {
        format!("features={}", ctx.spec.features.len())
    }

    fn run(&self, ctx: &PassContext, partition: usize, cancel: &CancelFlag) -> Result<RecordBatch> {
        let d = ctx.spec.features.len();
        ctx.reserve(
            GramAccumulator::size_bytes(d) + ExactSum::size_bytes(d + d * d, d + d * d),
            "the PCA state (features x features)",
        )?;
        let (shift, mut total) = gram_sums(ctx)?;
        let rows = ctx.profile()?.partition_rows(partition);
        let features = ctx.feature_rows()?;
        let count = gram_partial(
            &features,
            rows,
            ctx.spec.config.leaf_rows,
            &shift,
            &mut total,
            cancel,
        )?;
        let mut state = count.to_le_bytes().to_vec();
        state.extend_from_slice(&total.to_bytes());
        partial_batch(partition, count as usize, state)
    }
}

impl GlobalStep for PcaFitStep {
    fn name(&self) -> &'static str {
        "BalansPcaExec"
    }

    fn stage(&self) -> &'static str {
        PCA_STAGE
    }

    fn describe(&self, ctx: &PassContext) -> String {
        let d = ctx.spec.features.len();
        format!(
            "components={}",
            ctx.spec.config.pca_components(d).unwrap_or(d)
        )
    }

    fn schema(&self, ctx: &PassContext) -> SchemaRef {
        let d = ctx.spec.features.len();
        Arc::new(Schema::new(vec![
            Field::new("row", DataType::Utf8, false),
            Field::new("explained_variance", DataType::Float64, true),
            Field::new(
                "values",
                DataType::FixedSizeList(
                    Arc::new(Field::new("item", DataType::Float64, false)),
                    d as i32,
                ),
                false,
            ),
        ]))
    }

    fn merge(
        &self,
        ctx: &PassContext,
        partials: Vec<RecordBatch>,
        cancel: &CancelFlag,
    ) -> Result<RecordBatch> {
        let d = ctx.spec.features.len();
        let p = ctx
            .spec
            .config
            .pca_components(d)
            .ok_or_else(|| OperatorError::InvalidParameter("PCA is off".into()))?;
        let (shift, mut total) = gram_sums(ctx)?;
        let mut n = 0u64;
        for (_, state) in partial_states(&partials)? {
            cancel.check()?;
            let bad = || OperatorError::InvalidParameter("malformed PCA partial".into());
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
        let acc = GramAccumulator::from_parts(shift, n, values[..d].to_vec(), values[d..].to_vec())
            .ok_or_else(|| OperatorError::InvalidParameter("PCA state of the wrong size".into()))?;
        let model = acc.finish(p);
        ctx.with_summary(|s| {
            s.pca_components = model.p;
            s.distance_dims = model.p;
        });
        let mut names = vec!["mean".to_string()];
        names.extend((1..=model.p).map(|c| format!("PC{c}")));
        let mut variance: Vec<Option<f64>> = vec![None];
        variance.extend(model.explained_variance.iter().map(|&v| Some(v)));
        let mut flat = model.mean.clone();
        flat.extend_from_slice(&model.components);
        let list = FixedSizeListArray::try_new(
            Arc::new(Field::new("item", DataType::Float64, false)),
            d as i32,
            Arc::new(Float64Array::from(flat)),
            None,
        )?;
        let table = RecordBatch::try_new(
            self.schema(ctx),
            vec![
                Arc::new(StringArray::from(names)),
                Arc::new(Float64Array::from(variance)),
                Arc::new(list) as Arc<dyn Array>,
            ],
        )?;
        ctx.set_pca(Some(Arc::new(model)));
        Ok(table)
    }
}
