//! The two operator shapes of a correction pass, and the plumbing they share.
//!
//! - [`PartitionStepExec`]: one task per input partition (they run concurrently on
//!   DataFusion's runtime). Its child is the global step before it (one partition; every task
//!   waits for it, the result is computed once). Each task runs the step's kernel on a
//!   blocking thread over its spooled partition and emits one small batch (a partial state).
//! - [`GlobalStepExec`]: one partition, `SinglePartition` input (a `CoalescePartitionsExec`
//!   over a per-partition step). It gathers the partial batches, orders them by partition and
//!   merges them once, however many consumers execute it (like a hash join's build side); its
//!   product goes to the pass context and out as a small Arrow table.
//!
//! A step is a type implementing [`PartitionStep`] or [`GlobalStep`]; each lives in its own
//! file under `exec/` with its tests.

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, UInt32Type};
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, Distribution, ExecutionPlan, PlanProperties,
};
use futures::{StreamExt, TryStreamExt};
use tokio::sync::OnceCell;

use crate::error::{OperatorError, Result};
use crate::exec::common::{plan_properties, single_child};
use crate::exec::context::{CancelFlag, PassContext};

/// Schema of the partial batches of per-partition steps: the partition, its rows and an
/// opaque state.
pub fn partial_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("partition", DataType::UInt32, false),
        Field::new("rows", DataType::UInt64, false),
        Field::new("state", DataType::Binary, false),
    ]))
}

/// A partial batch: `(partition, rows, state)`.
pub fn partial_batch(partition: usize, rows: usize, state: Vec<u8>) -> Result<RecordBatch> {
    use datafusion::arrow::array::{BinaryArray, UInt32Array, UInt64Array};
    Ok(RecordBatch::try_new(
        partial_schema(),
        vec![
            Arc::new(UInt32Array::from(vec![partition as u32])),
            Arc::new(UInt64Array::from(vec![rows as u64])),
            Arc::new(BinaryArray::from(vec![state.as_slice()])),
        ],
    )?)
}

/// The states of partial batches in partition order.
pub fn partial_states(batches: &[RecordBatch]) -> Result<Vec<(usize, Vec<u8>)>> {
    let mut out = Vec::new();
    for b in batches {
        let parts = b
            .column_by_name("partition")
            .ok_or_else(|| OperatorError::InvalidParameter("partial without partition".into()))?
            .as_primitive::<UInt32Type>()
            .clone();
        let states = b
            .column_by_name("state")
            .ok_or_else(|| OperatorError::InvalidParameter("partial without state".into()))?
            .as_binary::<i32>()
            .clone();
        for r in 0..b.num_rows() {
            out.push((parts.value(r) as usize, states.value(r).to_vec()));
        }
    }
    out.sort_by_key(|(p, _)| *p);
    Ok(out)
}

/// Collects every batch of partition `partition` of `plan`.
pub async fn collect_partition(
    plan: &Arc<dyn ExecutionPlan>,
    partition: usize,
    task: Arc<TaskContext>,
) -> DFResult<Vec<RecordBatch>> {
    plan.execute(partition, task)?.try_collect().await
}

/// Runs `f` on a blocking thread; dropping the returned future cancels `flag`.
pub async fn run_blocking<T: Send + 'static>(
    flag: CancelFlag,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let guard = flag.guard();
    let out = tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OperatorError::InvalidParameter(format!("a correction worker failed: {e}")))?;
    guard.disarm();
    out.map_err(|e| flag.explain(e))
}

/// A step that runs once per input partition.
pub trait PartitionStep: fmt::Debug + Send + Sync + 'static {
    /// Operator name, e.g. `BalansSmoothPartialExec`.
    fn name(&self) -> &'static str;
    /// Stage name for progress and timings.
    fn stage(&self) -> &'static str;
    /// Whether the global step after this one reports under the same stage (its time then
    /// counts into the stage).
    fn merged_stage(&self) -> bool {
        true
    }
    /// Extra text after `partitions=...` in `EXPLAIN`.
    fn describe(&self, ctx: &PassContext) -> String;
    /// Schema of the emitted batches ([`partial_schema`] unless the step says otherwise).
    fn schema(&self, _ctx: &PassContext) -> SchemaRef {
        partial_schema()
    }
    /// Computes the partial of partition `partition` (one batch of [`PartitionStep::schema`]).
    fn run(&self, ctx: &PassContext, partition: usize, cancel: &CancelFlag) -> Result<RecordBatch>;
}

/// A step that merges the partials of every partition once.
pub trait GlobalStep: fmt::Debug + Send + Sync + 'static {
    /// Operator name, e.g. `BalansSmoothExec`.
    fn name(&self) -> &'static str;
    /// Stage name for progress and timings.
    fn stage(&self) -> &'static str;
    /// Extra text in `EXPLAIN`.
    fn describe(&self, ctx: &PassContext) -> String;
    /// Schema of the product table.
    fn schema(&self, ctx: &PassContext) -> SchemaRef;
    /// Merges the partial batches (in partition order), records the product in `ctx` and
    /// returns it as a table.
    fn merge(
        &self,
        ctx: &PassContext,
        partials: Vec<RecordBatch>,
        cancel: &CancelFlag,
    ) -> Result<RecordBatch>;
}

/// A per-partition step of a correction pass (see the module docs).
#[derive(Debug)]
pub struct PartitionStepExec<S: PartitionStep> {
    step: Arc<S>,
    ctx: Arc<PassContext>,
    input: Arc<dyn ExecutionPlan>,
    cache: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl<S: PartitionStep> PartitionStepExec<S> {
    /// The step over the pass's partitions, after the global step `input`.
    pub fn new(step: S, ctx: Arc<PassContext>, input: Arc<dyn ExecutionPlan>) -> Self {
        let cache = plan_properties(step.schema(&ctx), ctx.partitions);
        Self {
            step: Arc::new(step),
            ctx,
            input,
            cache,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    /// The step.
    pub fn step(&self) -> &S {
        &self.step
    }
}

impl<S: PartitionStep> DisplayAs for PartitionStepExec<S> {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        match t {
            DisplayFormatType::TreeRender => write!(f, "partitions={}", self.ctx.partitions),
            _ => write!(
                f,
                "{}: {}partitions={}{}",
                self.step.name(),
                self.ctx.spec.pass_label(),
                self.ctx.partitions,
                prefixed(self.step.describe(&self.ctx))
            ),
        }
    }
}

fn prefixed(text: String) -> String {
    if text.is_empty() {
        text
    } else {
        format!(", {text}")
    }
}

impl<S: PartitionStep> ExecutionPlan for PartitionStepExec<S> {
    fn name(&self) -> &str {
        self.step.name()
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
        Ok(Arc::new(Self {
            step: self.step.clone(),
            ctx: self.ctx.clone(),
            input: single_child(self.step.name(), children)?,
            cache: self.cache.clone(),
            metrics: ExecutionPlanMetricsSet::new(),
        }))
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
                "{} has {} partitions, got {partition}",
                self.step.name(),
                self.ctx.partitions
            )));
        }
        self.ctx.bind(&context);
        let (step, ctx, input) = (self.step.clone(), self.ctx.clone(), self.input.clone());
        let schema = ExecutionPlan::schema(self);
        let fut = async move {
            // The global step before this one (computed once, shared by every partition).
            collect_partition(&input, 0, context).await?;
            let flag = ctx.abort.clone();
            let out = run_blocking(flag, move || {
                let participants = ctx.partitions + step.merged_stage() as usize;
                ctx.stage_begin(step.stage(), participants, None);
                let cancel = ctx.abort.clone();
                let out = step.run(&ctx, partition, &cancel);
                if let Err(e) = &out {
                    ctx.abort.fail(e);
                }
                ctx.stage_end(step.stage());
                out
            })
            .await?;
            Ok::<_, DataFusionError>(out)
        };
        let stream = futures::stream::once(fut);
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }
}

/// A global step of a correction pass (see the module docs).
#[derive(Debug)]
pub struct GlobalStepExec<G: GlobalStep> {
    step: Arc<G>,
    ctx: Arc<PassContext>,
    input: Arc<dyn ExecutionPlan>,
    schema: SchemaRef,
    cache: Arc<PlanProperties>,
    result: Arc<OnceCell<std::result::Result<RecordBatch, Arc<DataFusionError>>>>,
    metrics: ExecutionPlanMetricsSet,
}

impl<G: GlobalStep> GlobalStepExec<G> {
    /// The step over `input` (one partition: a coalesced per-partition step).
    pub fn new(step: G, ctx: Arc<PassContext>, input: Arc<dyn ExecutionPlan>) -> Self {
        let schema = step.schema(&ctx);
        Self {
            cache: plan_properties(schema.clone(), 1),
            schema,
            step: Arc::new(step),
            ctx,
            input,
            result: Arc::new(OnceCell::new()),
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    /// The step.
    pub fn step(&self) -> &G {
        &self.step
    }
}

impl<G: GlobalStep> DisplayAs for GlobalStepExec<G> {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        match t {
            DisplayFormatType::TreeRender => write!(f, "global"),
            _ => write!(
                f,
                "{}: {}global{}",
                self.step.name(),
                self.ctx.spec.pass_label(),
                prefixed(self.step.describe(&self.ctx))
            ),
        }
    }
}

impl<G: GlobalStep> ExecutionPlan for GlobalStepExec<G> {
    fn name(&self) -> &str {
        self.step.name()
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
        Ok(Arc::new(Self {
            step: self.step.clone(),
            ctx: self.ctx.clone(),
            input: single_child(self.step.name(), children)?,
            schema: self.schema.clone(),
            cache: self.cache.clone(),
            result: Arc::new(OnceCell::new()),
            metrics: ExecutionPlanMetricsSet::new(),
        }))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DFResult<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "{} has one partition, got {partition}",
                self.step.name()
            )));
        }
        self.ctx.bind(&context);
        let (step, ctx, input, result) = (
            self.step.clone(),
            self.ctx.clone(),
            self.input.clone(),
            self.result.clone(),
        );
        let fut = async move {
            let out = result
                .get_or_init(|| async move {
                    let compute = async {
                        let partials = collect_partition(&input, 0, context).await?;
                        let flag = ctx.abort.clone();
                        let batch = run_blocking(flag, move || {
                            ctx.stage_begin(step.stage(), 1, None);
                            let cancel = ctx.abort.clone();
                            let out = step.merge(&ctx, partials, &cancel);
                            if let Err(e) = &out {
                                ctx.abort.fail(e);
                            }
                            ctx.stage_end(step.stage());
                            out
                        })
                        .await?;
                        Ok::<_, DataFusionError>(batch)
                    };
                    compute.await.map_err(Arc::new)
                })
                .await;
            out.clone().map_err(DataFusionError::Shared)
        };
        let stream = futures::stream::once(fut).boxed();
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            stream,
        )))
    }
}
