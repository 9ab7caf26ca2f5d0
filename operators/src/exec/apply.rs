//! `BalansApplyExec`: the write step of a correction pass, per partition.
//!
//! Each output partition is one input partition: its spooled rows, in input order, with the
//! feature columns replaced by the method's corrected values (BALANS: the fitted smoother over
//! the landmark entries recomputed per row; ComBat and sphering: their models per row;
//! Harmony: its corrected coordinates) and every other column passed through. Partitions run
//! concurrently, each on a blocking thread feeding a bounded channel; dropping the stream
//! stops the thread at its next chunk.

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, BooleanArray, Float32Array, RecordBatch};
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::stream::RecordBatchReceiverStream;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, Distribution, ExecutionPlan, PlanProperties,
};

use crate::config::{Method, OutputSpace};
use crate::error::{OperatorError, Result};
use crate::exec::common::{plan_properties, single_child};
use crate::exec::context::PassContext;
use crate::exec::smooth::output_rows;
use crate::exec::spec::COVERED_COLUMN;
use crate::exec::step::collect_partition;

/// Stage name of the write step.
pub const WRITE_STAGE: &str = "write";

/// The write step of a pass (see the module docs).
#[derive(Debug)]
pub struct BalansApplyExec {
    ctx: Arc<PassContext>,
    input: Arc<dyn ExecutionPlan>,
    cache: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl BalansApplyExec {
    /// Writes the pass `ctx` once its last global step `input` has run.
    pub fn new(ctx: Arc<PassContext>, input: Arc<dyn ExecutionPlan>) -> Self {
        Self {
            cache: plan_properties(ctx.schema.clone(), ctx.partitions),
            ctx,
            input,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }
}

impl DisplayAs for BalansApplyExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        match t {
            DisplayFormatType::TreeRender => write!(f, "partitions={}", self.ctx.partitions),
            _ => write!(
                f,
                "BalansApplyExec: {}partitions={}, method={}, output_space={}",
                self.ctx.spec.pass_label(),
                self.ctx.partitions,
                self.ctx.spec.config.method,
                self.ctx.spec.output_space()
            ),
        }
    }
}

impl ExecutionPlan for BalansApplyExec {
    fn name(&self) -> &str {
        "BalansApplyExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.cache
    }

    fn required_input_distribution(&self) -> Vec<Distribution> {
        vec![Distribution::SinglePartition]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    crate::no_physical_expressions!();

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(Self::new(
            self.ctx.clone(),
            single_child("BalansApplyExec", children)?,
        )))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DFResult<SendableRecordBatchStream> {
        if partition >= self.ctx.partitions {
            return Err(DataFusionError::Internal(format!(
                "BalansApplyExec has {} partitions, got {partition}",
                self.ctx.partitions
            )));
        }
        self.ctx.bind(&context);
        let mut builder = RecordBatchReceiverStream::builder(self.ctx.schema.clone(), 2);
        let tx = builder.tx();
        let (ctx, input) = (self.ctx.clone(), self.input.clone());
        builder.spawn(async move {
            collect_partition(&input, 0, context).await?;
            let worker = ctx.clone();
            let out = tokio::task::spawn_blocking(move || {
                worker.stage_begin(WRITE_STAGE, worker.partitions, None);
                let out = write_partition(&worker, partition, &tx);
                if out.is_err() {
                    worker.stage_end(WRITE_STAGE);
                }
                out
            })
            .await
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
            match out {
                Ok(()) | Err(OperatorError::Cancelled) => Ok(()),
                Err(e) => {
                    ctx.abort.fail(&e);
                    Err(e.into())
                }
            }
        });
        Ok(builder.build())
    }
}

/// The source of one output column.
#[derive(Debug, Clone, Copy)]
enum OutputColumn {
    /// A metadata column (index in the metadata working file).
    Meta(usize),
    /// Corrected value column `f`.
    Value(usize),
    /// The coverage flag.
    Covered,
}

/// Where each output column comes from, in output-schema order.
fn output_columns(ctx: &PassContext, meta_schema: &Schema) -> Result<Vec<OutputColumn>> {
    let spec = &ctx.spec;
    let mut next_value = 0usize;
    ctx.schema
        .fields()
        .iter()
        .map(|field| {
            let name = field.name().as_str();
            if name == COVERED_COLUMN && spec.emits_covered_column() {
                return Ok(OutputColumn::Covered);
            }
            let value = match spec.output_space() {
                OutputSpace::Features => spec.features.iter().position(|f| f == name),
                OutputSpace::Pca if meta_schema.index_of(name).is_err() => {
                    next_value += 1;
                    Some(next_value - 1)
                }
                OutputSpace::Pca => None,
            };
            Ok(match value {
                Some(f) => OutputColumn::Value(f),
                None => OutputColumn::Meta(meta_schema.index_of(name)?),
            })
        })
        .collect()
}

/// Builds one output batch from metadata rows and corrected values (`dx` per row).
fn assemble(
    schema: &SchemaRef,
    plan: &[OutputColumn],
    meta: &RecordBatch,
    values: &[f32],
    dx: usize,
    covered: &[bool],
) -> Result<RecordBatch> {
    let r = meta.num_rows();
    let columns: Vec<ArrayRef> = plan
        .iter()
        .map(|c| -> ArrayRef {
            match *c {
                OutputColumn::Covered => Arc::new(BooleanArray::from(covered.to_vec())),
                OutputColumn::Meta(i) => meta.column(i).clone(),
                OutputColumn::Value(f) => Arc::new(Float32Array::from(
                    (0..r).map(|i| values[i * dx + f]).collect::<Vec<f32>>(),
                )),
            }
        })
        .collect();
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// Computes and sends the corrected rows of partition `i`.
pub(crate) fn write_partition(
    ctx: &PassContext,
    i: usize,
    tx: &tokio::sync::mpsc::Sender<DFResult<RecordBatch>>,
) -> Result<()> {
    let spec = &ctx.spec;
    let profile = ctx.profile()?.clone();
    let spool = ctx.spool(i)?.clone();
    let start = profile.partition_start[i];
    let plan = output_columns(ctx, spool.meta.schema())?;
    let features = ctx.feature_rows()?;
    let d = spec.features.len();
    let chunk = spec.config.chunk_rows;
    let (mut uncovered, mut nnz) = (0usize, 0usize);
    let mut row = 0usize;
    // What the method needs, fetched once.
    let balans = match spec.config.method {
        Method::Balans => Some((
            ctx.landmarks()?.clone(),
            ctx.smoother()?.clone(),
            output_rows(ctx)?,
            ctx.distance_rows()?,
        )),
        _ => None,
    };
    for mb in spool.meta.batches() {
        let end = row + mb.num_rows();
        let mut lo = row;
        while lo < end {
            if tx.is_closed() || ctx.abort.is_cancelled() {
                return Err(OperatorError::Cancelled);
            }
            let hi = (lo + chunk).min(end);
            let (g0, g1) = (start + lo, start + hi);
            let r = hi - lo;
            let mut covered = vec![true; r];
            let (values, dx) = match spec.config.method {
                Method::Balans => {
                    let (set, smoother, x_rows, z_rows) = balans.as_ref().expect("BALANS state");
                    let dx = x_rows.p();
                    let (mut x, mut z) = (Vec::with_capacity(r * dx), Vec::new());
                    for g in g0..g1 {
                        x.extend_from_slice(x_rows.row(g));
                        z.extend_from_slice(z_rows.row(g));
                    }
                    let mut out = vec![0.0f32; r * dx];
                    let stats = smoother.apply_rows(
                        &set.landmarks,
                        &z,
                        &profile.codes[g0..g1],
                        &x,
                        &mut out,
                        &mut covered,
                    );
                    uncovered += stats.uncovered;
                    nnz += stats.nnz;
                    (out, dx)
                }
                Method::ComBat => {
                    let model = ctx.combat()?;
                    let mut out = vec![0.0f32; r * d];
                    let (mut x64, mut o64) = (vec![0.0f64; d], vec![0.0f64; d]);
                    for (k, g) in (g0..g1).enumerate() {
                        x64.iter_mut()
                            .zip(features.row(g))
                            .for_each(|(o, &v)| *o = v as f64);
                        model.apply_row(profile.codes[g] as usize, &x64, &mut o64);
                        for (dst, &v) in out[k * d..(k + 1) * d].iter_mut().zip(&o64) {
                            *dst = v as f32;
                        }
                    }
                    (out, d)
                }
                Method::Sphering => {
                    let model = ctx.sphering()?;
                    let x64: Vec<f64> = (g0..g1)
                        .flat_map(|g| features.row(g).iter().map(|&v| v as f64))
                        .collect();
                    let mut o64 = vec![0.0f64; x64.len()];
                    model.apply_rows(&x64, &mut o64);
                    (o64.iter().map(|&v| v as f32).collect(), d)
                }
                Method::Harmony => {
                    let z = ctx.harmony()?;
                    let p = z.len() / profile.rows.max(1);
                    (z[g0 * p..g1 * p].to_vec(), p)
                }
            };
            let meta = mb.slice(lo - row, r);
            let batch = assemble(&ctx.schema, &plan, &meta, &values, dx, &covered)?;
            if tx.blocking_send(Ok(batch)).is_err() {
                return Err(OperatorError::Cancelled);
            }
            ctx.stage_progress(WRITE_STAGE, r as u64, None);
            lo = hi;
        }
        row = end;
    }
    ctx.stage_end(WRITE_STAGE);
    ctx.partition_written(uncovered, nnz);
    Ok(())
}
