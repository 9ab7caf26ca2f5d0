//! A correction pass as a cluster runs it: every per-partition step a stage of tasks, every
//! global step a task of its own.
//!
//! On one machine the steps of a pass share the spool of a [`PassContext`] (see
//! [`crate::exec::plan`]). A distributed scheduler (Ballista) runs each stage's tasks on any
//! executor, where no spool of an earlier stage is, and it cuts stages at every
//! `CoalescePartitionsExec`. So the cluster plan of a pass is, bottom to top:
//!
//! ```text
//! BalansTaskExec(ingest)      ─► Coalesce ─► BalansMergeExec(profile)   ─► Coalesce ─►
//! BalansTaskExec(gram)        ─► Coalesce ─► BalansMergeExec(pca)       ─► Coalesce ─►
//! BalansTaskExec(reduce)      ─► Coalesce ─► BalansMergeExec(landmarks) ─► Coalesce ─►
//! BalansTaskExec(smooth)      ─► Coalesce ─► BalansMergeExec(smooth)    ─► Coalesce ─►
//! BalansTaskExec(apply)       ─► Coalesce ─► BalansGatherExec
//! ```
//!
//! (ComBat: moments / ComBat fit; sphering: sphering partial / fit.) A [`BalansTaskExec`] has
//! the pass's input, a partition-id table, for the steps that sum leaves the input shifted by
//! one partition ("next"), and the previous global step's output ("state"). The scheduler
//! restricts the input, the ids and the next input of each task to its partition, and keeps the
//! state whole (declared `SinglePartition`). A task spools its own partition, and, when the
//! last leaf it owns runs into the next partitions (leaves are 65,536 rows of the global row
//! order), the head of the next partitions, from the shifted input: the same rows the
//! single-process step reads from the neighbouring spool. It imports the global products
//! (profile, PCA model, landmarks, fitted smoother, ComBat / sphering model) from the state,
//! runs the very step the single-process chain runs and emits its partial batch, Arrow IPC
//! encoded in a `(partition, rows, state)` row. The task of partition 0 forwards the products
//! it was given, so the [`BalansMergeExec`] above gets partials and products from one child.
//! A merge runs the single-process global step over the partials in partition order and emits
//! every product so far as one row: the state of the next stage. The apply tasks emit the
//! corrected rows; [`BalansGatherExec`] emits them partition after partition.
//!
//! Passes chain without a stage that holds a pass's output: a task of pass `k` runs passes
//! `1..k` too ([`BalansTaskExec::specs`]), spooling the input and applying each earlier pass to
//! its rows with that pass's products, which travel in the state (one blob per pass).
//!
//! The kernels, their inputs and the merge order are the single-process ones, so the output is
//! the same bytes. [`finish_cluster_plan`] completes the plan after DataFusion's optimizer (the
//! shifted inputs; the boundaries above global steps, kept from the optimizer by a fetch), and
//! falls back to [`BalansPassExec`] (the pass as one task) when the input is not a file scan
//! under per-partition operators.

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{AsArray, RecordBatch, UInt32Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, UInt32Type};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfig, FileScanConfigBuilder};
use datafusion::datasource::source::DataSourceExec;
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_plan::execution_plan::EmissionType;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::stream::RecordBatchReceiverStream;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, Distribution, ExecutionPlan, ExecutionPlanProperties,
    Partitioning, PlanProperties,
};
use futures::TryStreamExt;

use crate::config::Method;
use crate::error::{OperatorError, Result};
use crate::exec::apply::write_partition;
use crate::exec::combat::{ComBatFitStep, MomentsStep};
use crate::exec::common::{below_coalesce, bounded_properties, plan_properties, single_child};
use crate::exec::concat::OrderedConcatExec;
use crate::exec::context::PassContext;
use crate::exec::ingest::spool_partition;
use crate::exec::landmarks::LandmarkStep;
use crate::exec::pass::BalansPassExec;
use crate::exec::pca::{GramStep, PcaFitStep};
use crate::exec::profile::{PartitionRecord, PartitionRecordRef, profile_from_records};
use crate::exec::reduce::ReduceStep;
use crate::exec::smooth::{SmoothMergeStep, SmoothPartialStep};
use crate::exec::spec::{BalansSpec, balans_output_schema};
use crate::exec::sphering::{SpheringFitStep, SpheringPartialStep};
use crate::exec::step::{
    GlobalStep, PartitionStep, partial_batch, partial_schema, partial_states, run_blocking,
};
use crate::kernels::exact::leaves_starting_in;

/// The `partition` of the row that carries a pass's products in a partial table.
pub const PRODUCTS_ROW: u32 = u32::MAX;

/// A per-partition step of a cluster pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TaskStep {
    /// Spool the partition; emit its record for the profile.
    Ingest,
    /// Gram partials of the PCA.
    Gram,
    /// ComBat's per-batch moments.
    Moments,
    /// Sphering's Gram partials.
    SpheringPartial,
    /// Reduced coordinates and the landmark sample.
    Reduce,
    /// Smoothing partials `A_S X`.
    SmoothPartial,
    /// The corrected rows.
    Apply,
}

impl TaskStep {
    /// Whether the step sums leaves, whose last one may run into the next partitions.
    pub fn reads_next(self) -> bool {
        matches!(
            self,
            Self::Gram | Self::Moments | Self::SpheringPartial | Self::SmoothPartial
        )
    }

    /// The step's name in `EXPLAIN`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ingest => "ingest",
            Self::Gram => "gram",
            Self::Moments => "moments",
            Self::SpheringPartial => "sphering-partial",
            Self::Reduce => "reduce",
            Self::SmoothPartial => "smooth-partial",
            Self::Apply => "apply",
        }
    }
}

/// A global step of a cluster pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MergeStep {
    /// The batch profile.
    Profile,
    /// The PCA model.
    PcaFit,
    /// Landmark sampling.
    Landmarks,
    /// The fitted smoother.
    SmoothMerge,
    /// The ComBat model.
    ComBatFit,
    /// The sphering model.
    SpheringFit,
}

impl MergeStep {
    /// The step's name in `EXPLAIN`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Profile => "profile",
            Self::PcaFit => "pca",
            Self::Landmarks => "landmarks",
            Self::SmoothMerge => "smooth",
            Self::ComBatFit => "combat",
            Self::SpheringFit => "sphering",
        }
    }
}

/// Whether a cluster runs `spec`'s pass as stages (Harmony's global step needs every row's
/// coordinates, so it runs as one task).
pub fn distributes(spec: &BalansSpec) -> bool {
    spec.config.method != Method::Harmony
}

/// The cluster plan of the last pass of `passes` (consecutive, first pass first) over the
/// input of the first pass (see the module docs). `state` is the final global step of the
/// passes before (none for pass 1): their tasks apply them to their rows first. The scheduler
/// completes the plan with [`finish_cluster_plan`].
pub fn cluster_pass(
    input: Arc<dyn ExecutionPlan>,
    passes: Vec<BalansSpec>,
    state: Option<Arc<dyn ExecutionPlan>>,
) -> Result<Arc<dyn ExecutionPlan>> {
    let Some(spec) = passes.last().cloned() else {
        return Err(OperatorError::InvalidParameter(
            "a correction needs at least one pass".into(),
        ));
    };
    spec.config.validate()?;
    if spec.features.is_empty() {
        return Err(OperatorError::BadInput("no feature columns".into()));
    }
    if spec.batch.is_empty() {
        return Err(OperatorError::BadInput("no batch column".into()));
    }
    if !distributes(&spec) {
        return Err(OperatorError::InvalidParameter(format!(
            "{} runs as one task on a cluster",
            spec.config.method
        )));
    }
    let partitions = input.output_partitioning().partition_count();
    let ids = partition_ids(partitions)?;
    let task = |step: TaskStep, state: Option<Arc<dyn ExecutionPlan>>| {
        BalansTaskExec::try_new(
            step,
            passes.clone(),
            partitions,
            input.clone(),
            ids.clone(),
            None,
            state,
        )
        .map(|t| Arc::new(t) as Arc<dyn ExecutionPlan>)
    };
    let merge = |step: MergeStep, tasks: Arc<dyn ExecutionPlan>| {
        Arc::new(BalansMergeExec::new(step, spec.clone(), coalesce(tasks)))
            as Arc<dyn ExecutionPlan>
    };
    let mut state = merge(MergeStep::Profile, task(TaskStep::Ingest, state)?);
    let d = spec.features.len();
    match spec.config.method {
        Method::Balans => {
            if spec.config.pca_components(d).is_some() {
                state = merge(MergeStep::PcaFit, task(TaskStep::Gram, Some(state))?);
            }
            state = merge(MergeStep::Landmarks, task(TaskStep::Reduce, Some(state))?);
            state = merge(
                MergeStep::SmoothMerge,
                task(TaskStep::SmoothPartial, Some(state))?,
            );
        }
        Method::ComBat => {
            state = merge(MergeStep::ComBatFit, task(TaskStep::Moments, Some(state))?);
        }
        Method::Sphering => {
            state = merge(
                MergeStep::SpheringFit,
                task(TaskStep::SpheringPartial, Some(state))?,
            );
        }
        Method::Harmony => unreachable!("checked by distributes"),
    }
    let apply = task(TaskStep::Apply, Some(state))?;
    Ok(Arc::new(BalansGatherExec::new(coalesce(apply))))
}

/// The cluster plan of pass `spec` over `below`, the cluster plan of the passes before it
/// (its [`BalansGatherExec`]); `None` when `below` is not one, or not of the pass before.
pub fn cluster_next_pass(
    below: &Arc<dyn ExecutionPlan>,
    spec: BalansSpec,
) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    let Some(gather) = below.downcast_ref::<BalansGatherExec>() else {
        return Ok(None);
    };
    let Some(apply) = below_coalesce(&gather.input).downcast_ref::<BalansTaskExec>() else {
        return Ok(None);
    };
    if apply.spec().pass + 1 != spec.pass {
        return Ok(None);
    }
    let mut passes = apply.specs.clone();
    passes.push(spec);
    cluster_pass(apply.input.clone(), passes, apply.state.clone()).map(Some)
}

fn coalesce(plan: Arc<dyn ExecutionPlan>) -> Arc<dyn ExecutionPlan> {
    if plan.is::<CoalescePartitionsExec>() {
        plan
    } else {
        Arc::new(CoalescePartitionsExec::new(plan))
    }
}

/// The stage boundary above a global step: a `CoalescePartitionsExec` over its one partition.
/// DataFusion's `EnforceDistribution` removes a coalesce that changes nothing, unless it has a
/// fetch, and Ballista's adaptive planner re-runs that rule after our planner; a fetch the
/// one-row products table never reaches (`u32::MAX` rows: DataFusion's plan serialisation
/// keeps 32 bits of it) keeps the boundary.
const BOUNDARY_FETCH: usize = u32::MAX as usize;

fn stage_boundary(plan: Arc<dyn ExecutionPlan>) -> Arc<dyn ExecutionPlan> {
    match plan.downcast_ref::<CoalescePartitionsExec>() {
        Some(c) if c.fetch().is_some() => plan,
        Some(c) => Arc::new(
            CoalescePartitionsExec::new(c.input().clone()).with_fetch(Some(BOUNDARY_FETCH)),
        ),
        None => Arc::new(CoalescePartitionsExec::new(plan).with_fetch(Some(BOUNDARY_FETCH))),
    }
}

/// A table of `partitions` partitions, partition `i` holding the one value `i`: how a task
/// learns which partition of the pass it runs (the scheduler restricts it like the input).
pub fn partition_ids(partitions: usize) -> Result<Arc<dyn ExecutionPlan>> {
    let schema = partition_id_schema();
    let parts = (0..partitions)
        .map(|i| {
            RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(UInt32Array::from(vec![i as u32]))],
            )
            .map(|b| vec![b])
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(MemorySourceConfig::try_new_exec(&parts, schema, None)?)
}

fn partition_id_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![Field::new(
        "partition",
        DataType::UInt32,
        false,
    )]))
}

/// `plan` with every partition `k` reading the rows of partitions `k + 1, k + 2, ...` in order
/// (the last one reads nothing), when `plan` is a file scan under per-partition operators
/// (projections, filters); `None` otherwise.
pub fn shifted_input(plan: &Arc<dyn ExecutionPlan>) -> Option<Arc<dyn ExecutionPlan>> {
    if let Some(scan) = plan.downcast_ref::<DataSourceExec>() {
        let source: &dyn std::any::Any = scan.data_source().as_ref();
        let config = source.downcast_ref::<FileScanConfig>()?;
        if config.limit.is_some() {
            return None;
        }
        let groups = &config.file_groups;
        let shifted: Vec<FileGroup> = (0..groups.len())
            .map(|k| {
                FileGroup::new(
                    groups[k + 1..]
                        .iter()
                        .flat_map(|g| g.files().iter().cloned())
                        .collect(),
                )
            })
            .collect();
        let config = FileScanConfigBuilder::from(config.clone())
            .with_file_groups(shifted)
            .build();
        return Some(DataSourceExec::from_data_source(config));
    }
    let per_partition = plan.is::<ProjectionExec>() || plan.is::<FilterExec>();
    if !per_partition || plan.fetch().is_some() {
        return None;
    }
    let children = plan.children();
    let [child] = children.as_slice() else {
        return None;
    };
    let child = shifted_input(child)?;
    datafusion::physical_plan::execution_plan::replace_children_if_necessary(
        plan.clone(),
        vec![child],
    )
    .ok()
}

/// Completes a cluster plan after DataFusion's optimizer: each task that sums leaves gets its
/// shifted input, each global step a stage boundary above it (a coalesce with a fetch: the
/// optimizer removes a plain coalesce over one partition), and a pass whose input is not a file scan
/// under per-partition operators becomes a [`BalansPassExec`] (one task).
pub fn finish_cluster_plan(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    let finished = plan.transform_up(|node| {
        if let Some(task) = node.downcast_ref::<BalansTaskExec>() {
            let Some(shifted) = shifted_input(&task.input) else {
                return Ok(Transformed::no(node));
            };
            let next = task.step.reads_next().then_some(shifted);
            let rebuilt = BalansTaskExec::try_new(
                task.step,
                task.specs.clone(),
                task.partitions,
                task.input.clone(),
                task.ids.clone(),
                next,
                task.state.clone().map(stage_boundary),
            )?;
            return Ok(Transformed::yes(Arc::new(rebuilt) as Arc<dyn ExecutionPlan>));
        }
        if let Some(merge) = node.downcast_ref::<BalansMergeExec>() {
            if merge.input.is::<CoalescePartitionsExec>() {
                return Ok(Transformed::no(node));
            }
            let rebuilt = BalansMergeExec::new(
                merge.step,
                merge.spec.clone(),
                coalesce(merge.input.clone()),
            );
            return Ok(Transformed::yes(Arc::new(rebuilt) as Arc<dyn ExecutionPlan>));
        }
        if let Some(gather) = node.downcast_ref::<BalansGatherExec>()
            && let Some(apply) = below_coalesce(&gather.input).downcast_ref::<BalansTaskExec>()
            && shifted_input(&apply.input).is_none()
        {
            let pass = BalansPassExec::try_new(coalesce(apply.input.clone()), apply.specs.clone())?;
            return Ok(Transformed::yes(Arc::new(pass) as Arc<dyn ExecutionPlan>));
        }
        Ok(Transformed::no(node))
    })?;
    Ok(finished.data)
}

/// Encodes a batch as an Arrow IPC stream.
fn batch_to_ipc(batch: &RecordBatch) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut writer =
        datafusion::arrow::ipc::writer::StreamWriter::try_new(&mut buf, &batch.schema())?;
    writer.write(batch)?;
    writer.finish()?;
    drop(writer);
    Ok(buf)
}

/// Decodes what [`batch_to_ipc`] wrote.
fn batch_from_ipc(bytes: &[u8]) -> Result<RecordBatch> {
    let mut reader =
        datafusion::arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
    reader.next().transpose()?.ok_or_else(|| {
        OperatorError::InvalidParameter("a partial of a cluster pass holds no batch".into())
    })
}

/// The products a state child carries.
async fn read_products(state: &Arc<dyn ExecutionPlan>, task: Arc<TaskContext>) -> Result<Vec<u8>> {
    let batches: Vec<RecordBatch> = state.execute(0, task)?.try_collect().await?;
    partial_states(&batches)?
        .into_iter()
        .find(|(p, _)| *p == PRODUCTS_ROW as usize)
        .map(|(_, bytes)| bytes)
        .ok_or_else(|| {
            OperatorError::InvalidParameter(
                "the previous step of the cluster pass sent no products".into(),
            )
        })
}

/// The global partition a task runs (`None` when its slice is empty).
async fn read_partition_id(
    ids: &Arc<dyn ExecutionPlan>,
    partition: usize,
    task: Arc<TaskContext>,
) -> Result<Option<usize>> {
    let batches: Vec<RecordBatch> = ids.execute(partition, task)?.try_collect().await?;
    Ok(batches
        .iter()
        .find(|b| b.num_rows() > 0)
        .map(|b| b.column(0).as_primitive::<UInt32Type>().value(0) as usize))
}

/// A per-partition step of a cluster pass (see the module docs).
#[derive(Debug)]
pub struct BalansTaskExec {
    step: TaskStep,
    specs: Vec<BalansSpec>,
    partitions: usize,
    input: Arc<dyn ExecutionPlan>,
    ids: Arc<dyn ExecutionPlan>,
    next: Option<Arc<dyn ExecutionPlan>>,
    state: Option<Arc<dyn ExecutionPlan>>,
    schemas: Vec<SchemaRef>,
    cache: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl BalansTaskExec {
    /// `step` of the last pass of `specs` (consecutive passes, first pass first: the task
    /// applies the passes before to its rows) over `input`'s partitions, told apart by `ids`
    /// (see [`partition_ids`]); `next` is `input` shifted by a partition ([`shifted_input`]),
    /// `state` the previous global step; `partitions` is the pass's partition count (the
    /// scheduler gives each task a one-partition slice of `input`).
    pub fn try_new(
        step: TaskStep,
        specs: Vec<BalansSpec>,
        partitions: usize,
        input: Arc<dyn ExecutionPlan>,
        ids: Arc<dyn ExecutionPlan>,
        next: Option<Arc<dyn ExecutionPlan>>,
        state: Option<Arc<dyn ExecutionPlan>>,
    ) -> Result<Self> {
        let Some(first) = specs.first() else {
            return Err(OperatorError::InvalidParameter(
                "a cluster task needs at least one pass".into(),
            ));
        };
        for (pass, spec) in (first.pass..).zip(&specs) {
            if spec.pass != pass || first.pass != 1 {
                return Err(OperatorError::InvalidParameter(format!(
                    "the passes of a cluster task must be consecutive from pass 1, got pass {}",
                    spec.pass
                )));
            }
        }
        let n = input.output_partitioning().partition_count();
        let aligned = ids.output_partitioning().partition_count() == n
            && next
                .as_ref()
                .is_none_or(|p| p.output_partitioning().partition_count() == n);
        if !aligned {
            return Err(OperatorError::InvalidParameter(
                "the input, partition ids and next input of a cluster task differ in partitions"
                    .into(),
            ));
        }
        let needs_state = step != TaskStep::Ingest || specs.len() > 1;
        if state.is_some() != needs_state {
            return Err(OperatorError::InvalidParameter(format!(
                "the {} task of pass {} {} the state of a previous step",
                step.name(),
                specs.len(),
                if needs_state { "needs" } else { "takes no" }
            )));
        }
        // Input schema of every pass, then the last pass's output schema.
        let mut schemas = vec![input.schema()];
        for spec in &specs {
            let last = schemas.last().expect("one schema");
            schemas.push(balans_output_schema(last, spec)?);
        }
        let schema = match step {
            TaskStep::Apply => schemas.last().expect("output schema").clone(),
            _ => partial_schema(),
        };
        let cache = bounded_properties(
            schema,
            Partitioning::UnknownPartitioning(n),
            EmissionType::Final,
        );
        Ok(Self {
            step,
            specs,
            partitions,
            input,
            ids,
            next,
            state,
            schemas,
            cache,
            metrics: ExecutionPlanMetricsSet::new(),
        })
    }

    /// The step.
    pub fn step(&self) -> TaskStep {
        self.step
    }

    /// The request of the pass the step belongs to (the last of [`BalansTaskExec::specs`]).
    pub fn spec(&self) -> &BalansSpec {
        self.specs.last().expect("at least one pass")
    }

    /// Every pass the task runs, first pass first.
    pub fn specs(&self) -> &[BalansSpec] {
        &self.specs
    }

    /// The pass's partition count.
    pub fn partitions(&self) -> usize {
        self.partitions
    }

    /// Whether the task has a next input (see [`BalansTaskExec::try_new`]).
    pub fn has_next(&self) -> bool {
        self.next.is_some()
    }

    /// Whether the task has a state child.
    pub fn has_state(&self) -> bool {
        self.state.is_some()
    }

    /// Rebuilds the task from the children [`ExecutionPlan::children`] lists.
    pub fn from_children(
        step: TaskStep,
        specs: Vec<BalansSpec>,
        partitions: usize,
        has_next: bool,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Self> {
        let has_state = step != TaskStep::Ingest || specs.len() > 1;
        let expected = 2 + has_next as usize + has_state as usize;
        if children.len() != expected {
            return Err(OperatorError::InvalidParameter(format!(
                "a cluster task takes {expected} children, got {}",
                children.len()
            )));
        }
        let mut children = children.into_iter();
        let input = children.next().expect("counted");
        let ids = children.next().expect("counted");
        let next = if has_next { children.next() } else { None };
        let state = children.next();
        Self::try_new(step, specs, partitions, input, ids, next, state)
    }
}

impl DisplayAs for BalansTaskExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let partitions = self.cache.output_partitioning().partition_count();
        match t {
            DisplayFormatType::TreeRender => write!(f, "step={}", self.step.name()),
            _ => write!(
                f,
                "BalansTaskExec: {}step={}, partitions={partitions}{}",
                self.spec().pass_label(),
                self.step.name(),
                if self.next.is_some() {
                    ", reads next"
                } else {
                    ""
                }
            ),
        }
    }
}

impl ExecutionPlan for BalansTaskExec {
    fn name(&self) -> &str {
        "BalansTaskExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.cache
    }

    fn required_input_distribution(&self) -> Vec<Distribution> {
        let mut out = vec![Distribution::UnspecifiedDistribution; 2 + self.next.is_some() as usize];
        if self.state.is_some() {
            out.push(Distribution::SinglePartition);
        }
        out
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false; self.children().len()]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        let mut out = vec![&self.input, &self.ids];
        out.extend(self.next.as_ref());
        out.extend(self.state.as_ref());
        out
    }

    crate::no_physical_expressions!();

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(Self::from_children(
            self.step,
            self.specs.clone(),
            self.partitions,
            self.next.is_some(),
            children,
        )?))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DFResult<SendableRecordBatchStream> {
        let n = self.cache.output_partitioning().partition_count();
        if partition >= n {
            return Err(DataFusionError::Internal(format!(
                "BalansTaskExec has {n} partitions, got {partition}"
            )));
        }
        let mut builder = RecordBatchReceiverStream::builder(self.schema(), 2);
        let tx = builder.tx();
        let step = self.step;
        let specs = self.specs.clone();
        let schemas = self.schemas.clone();
        let (input, ids) = (self.input.clone(), self.ids.clone());
        let next = self.next.clone();
        let state = self.state.clone();
        let partitions = self.partitions;
        builder.spawn(async move {
            let Some(i) = read_partition_id(&ids, partition, context.clone()).await? else {
                return Ok(());
            };
            if i >= partitions {
                return Err(DataFusionError::Internal(format!(
                    "a cluster task of {partitions} partitions got partition {i}"
                )));
            }
            let states = match &state {
                Some(state) => decode_states(&read_products(state, context.clone()).await?)?,
                None => Vec::new(),
            };
            // One abort flag for every pass of the task: a failure or a dropped output stops
            // all of them.
            let abort = crate::exec::context::CancelFlag::default();
            let contexts = specs
                .into_iter()
                .enumerate()
                .map(|(p, spec)| {
                    let mut ctx = PassContext::for_task(
                        spec,
                        schemas[p].clone(),
                        schemas[p + 1].clone(),
                        partitions,
                    );
                    ctx.abort = abort.clone();
                    ctx.bind(&context);
                    if let Some(products) = states.get(p) {
                        ctx.import_products(products)?;
                    }
                    Ok(Arc::new(ctx))
                })
                .collect::<Result<Vec<_>>>()?;
            let forward = (i == 0 && !states.is_empty())
                .then(|| encode_states(&states))
                .transpose()?;
            let own = input.execute(partition, context.clone())?;
            let next = match (&next, step.reads_next()) {
                (Some(next), true) => Some(next.execute(partition, context.clone())?),
                _ => None,
            };
            let handle = tokio::runtime::Handle::current();
            let label = contexts.last().expect("one pass").spec.pass_label();
            let started = std::time::Instant::now();
            let out = run_blocking(abort, move || {
                let _runtime = handle.enter();
                run_task(&contexts, step, i, own, next, &handle, &tx, forward)
            })
            .await;
            log::info!(
                "cluster task: {label}{} of partition {i}/{partitions}: {:.3} s",
                step.name(),
                started.elapsed().as_secs_f64()
            );
            match out {
                Ok(()) | Err(OperatorError::Cancelled) => Ok(()),
                Err(e) => Err(e.into()),
            }
        });
        Ok(builder.build())
    }
}

/// The products of every pass so far, one exact binary blob per pass
/// ([`PassContext::export_products`]), as one blob.
fn encode_states(states: &[Vec<u8>]) -> Result<Vec<u8>> {
    bincode::serialize(states).map_err(|e| {
        OperatorError::InvalidParameter(format!("cannot encode the passes' products: {e}"))
    })
}

/// Reads what [`encode_states`] wrote.
fn decode_states(bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
    bincode::deserialize(bytes).map_err(|e| {
        OperatorError::InvalidParameter(format!("malformed products of a cluster pass: {e}"))
    })
}

/// The corrected rows of spooled partition `j` of a pass, computed on a blocking thread.
fn apply_stream(ctx: Arc<PassContext>, j: usize) -> SendableRecordBatchStream {
    let mut builder = RecordBatchReceiverStream::builder(ctx.schema.clone(), 2);
    let tx = builder.tx();
    builder.spawn_blocking(move || match write_partition(&ctx, j, &tx) {
        Ok(()) | Err(OperatorError::Cancelled) => Ok(()),
        Err(e) => Err(e.into()),
    });
    builder.build()
}

/// BALANS's apply and smoothing read the reduced coordinates of every spooled row.
fn reduce_spooled(
    ctx: &PassContext,
    from: usize,
    cancel: &crate::exec::context::CancelFlag,
) -> Result<()> {
    if ctx.spec.config.method != Method::Balans {
        return Ok(());
    }
    for j in from..ctx.partitions {
        if !ctx.is_spooled(j) {
            break;
        }
        ReduceStep.run(ctx, j, cancel)?;
    }
    Ok(())
}

/// What one task does on its blocking thread (see the module docs): spool partition `i` (and
/// the head of the next partitions), apply the passes before, run the step of the last pass.
#[allow(clippy::too_many_arguments)]
fn run_task(
    contexts: &[Arc<PassContext>],
    step: TaskStep,
    i: usize,
    own: SendableRecordBatchStream,
    next: Option<SendableRecordBatchStream>,
    handle: &tokio::runtime::Handle,
    tx: &tokio::sync::mpsc::Sender<DFResult<RecordBatch>>,
    forward: Option<Vec<u8>>,
) -> Result<()> {
    let ctx = contexts.last().expect("one pass");
    let cancel = ctx.abort.clone();
    // Rows of the next partitions the last leaf starting in partition i reads (leaves cut
    // the global row order, which every pass shares: corrected rows are finite).
    let want = if step.reads_next() {
        let profile = ctx.profile()?;
        let rows = profile.partition_rows(i);
        let need_end = leaves_starting_in(rows.clone(), profile.rows, ctx.spec.config.leaf_rows)
            .last()
            .map_or(rows.end, |leaf| leaf.end);
        need_end.saturating_sub(rows.end)
    } else {
        0
    };
    let mut own = Some(own);
    let mut next = next;
    for (p, pass) in contexts.iter().enumerate() {
        let (rows_in, head_in) = if p == 0 {
            let head = match want {
                0 => None,
                _ => Some(next.take().ok_or_else(|| {
                    OperatorError::InvalidParameter(format!(
                        "the task of partition {i} needs the next partitions' first {want} \
                         rows and has no next input"
                    ))
                })?),
            };
            (own.take().expect("read once"), head)
        } else {
            let before = &contexts[p - 1];
            reduce_spooled(before, i, &cancel)?;
            let head = (want > 0).then(|| apply_stream(before.clone(), i + 1));
            (apply_stream(before.clone(), i), head)
        };
        let rows = spool_partition(pass, i, rows_in, handle, None)?;
        if let Ok(profile) = pass.profile() {
            let expected = profile.partition_rows(i).len();
            if rows != expected {
                return Err(input_changed(i, expected, rows));
            }
        }
        if let Some(head) = head_in {
            let got = spool_partition(pass, i + 1, head, handle, Some(want))?;
            if got != want {
                return Err(input_changed(i + 1, want, got));
            }
        }
    }
    if matches!(step, TaskStep::SmoothPartial | TaskStep::Apply) {
        reduce_spooled(ctx, i, &cancel)?;
    }
    let batch = match step {
        TaskStep::Ingest => {
            let spool = ctx.spool(i)?;
            let record = PartitionRecordRef::of_spool(spool).to_bytes()?;
            partial_batch(i, spool.rows, record)?
        }
        TaskStep::Gram => GramStep.run(ctx, i, &cancel)?,
        TaskStep::Moments => MomentsStep.run(ctx, i, &cancel)?,
        TaskStep::SpheringPartial => SpheringPartialStep.run(ctx, i, &cancel)?,
        TaskStep::Reduce => ReduceStep.run(ctx, i, &cancel)?,
        TaskStep::SmoothPartial => SmoothPartialStep.run(ctx, i, &cancel)?,
        TaskStep::Apply => return write_partition(ctx, i, tx),
    };
    let mut out = vec![partial_batch(i, batch.num_rows(), batch_to_ipc(&batch)?)?];
    if let Some(states) = forward {
        out.push(partial_batch(PRODUCTS_ROW as usize, 0, states)?);
    }
    for batch in out {
        if tx.blocking_send(Ok(batch)).is_err() {
            return Err(OperatorError::Cancelled);
        }
    }
    Ok(())
}

fn input_changed(partition: usize, expected: usize, got: usize) -> OperatorError {
    OperatorError::BadInput(format!(
        "input partition {partition} gave {got} rows where the profile counted {expected}: \
         the input changed while the correction ran"
    ))
}

/// A global step of a cluster pass (see the module docs).
#[derive(Debug)]
pub struct BalansMergeExec {
    step: MergeStep,
    spec: BalansSpec,
    input: Arc<dyn ExecutionPlan>,
    /// The products, merged once however many consumers execute the operator (in a cluster
    /// the consumer is one stage; in one process every task of the next step is one).
    products: Arc<tokio::sync::OnceCell<Vec<u8>>>,
    cache: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl BalansMergeExec {
    /// `step` of `spec`'s pass over the partials of `input` (one partition: the coalesced
    /// tasks of the step before).
    pub fn new(step: MergeStep, spec: BalansSpec, input: Arc<dyn ExecutionPlan>) -> Self {
        Self {
            step,
            spec,
            input,
            products: Arc::new(tokio::sync::OnceCell::new()),
            cache: plan_properties(partial_schema(), 1),
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }

    /// The step.
    pub fn step(&self) -> MergeStep {
        self.step
    }

    /// The pass's request.
    pub fn spec(&self) -> &BalansSpec {
        &self.spec
    }
}

impl DisplayAs for BalansMergeExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        match t {
            DisplayFormatType::TreeRender => write!(f, "step={}", self.step.name()),
            _ => write!(f, "BalansMergeExec: step={}", self.step.name()),
        }
    }
}

impl ExecutionPlan for BalansMergeExec {
    fn name(&self) -> &str {
        "BalansMergeExec"
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
        let input = single_child("BalansMergeExec", children)?;
        Ok(Arc::new(Self::new(self.step, self.spec.clone(), input)))
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
                "BalansMergeExec has one partition, got {partition}"
            )));
        }
        let mut builder = RecordBatchReceiverStream::builder(partial_schema(), 1);
        let tx = builder.tx();
        let (step, spec, input) = (self.step, self.spec.clone(), self.input.clone());
        let products = self.products.clone();
        builder.spawn(async move {
            let bytes = products
                .get_or_try_init(|| merge_products(step, spec, input, context))
                .await?
                .clone();
            tx.send(Ok(partial_batch(PRODUCTS_ROW as usize, 0, bytes)?))
                .await
                .map_err(|_| DataFusionError::Execution("the cluster pass was cancelled".into()))?;
            Ok(())
        });
        Ok(builder.build())
    }
}

/// Runs the single-process global step over the partials (in partition order).
fn merge(ctx: &PassContext, step: MergeStep, partials: Vec<(usize, Vec<u8>)>) -> Result<()> {
    let cancel = ctx.abort.clone();
    let batches = partials
        .iter()
        .map(|(_, bytes)| batch_from_ipc(bytes))
        .collect::<Result<Vec<_>>>()?;
    drop(partials);
    match step {
        MergeStep::Profile => {
            let records = partial_states(&batches)?
                .into_iter()
                .map(|(_, state)| PartitionRecord::from_bytes(&state))
                .collect::<Result<Vec<_>>>()?;
            let views: Vec<_> = records.iter().map(|r| r.view()).collect();
            let profile = profile_from_records(ctx, &views)?;
            ctx.set_profile(Arc::new(profile));
        }
        MergeStep::PcaFit => {
            PcaFitStep.merge(ctx, batches, &cancel)?;
        }
        MergeStep::Landmarks => {
            LandmarkStep.merge(ctx, batches, &cancel)?;
        }
        MergeStep::SmoothMerge => {
            SmoothMergeStep.merge(ctx, batches, &cancel)?;
        }
        MergeStep::ComBatFit => {
            ComBatFitStep.merge(ctx, batches, &cancel)?;
        }
        MergeStep::SpheringFit => {
            SpheringFitStep.merge(ctx, batches, &cancel)?;
        }
    }
    Ok(())
}

/// The corrected rows of a cluster pass in input order: the partitions of the apply tasks one
/// after another.
#[derive(Debug)]
pub struct BalansGatherExec {
    input: Arc<dyn ExecutionPlan>,
    cache: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl BalansGatherExec {
    /// Gathers `input` (the coalesced apply tasks: the coalesce is skipped when executed, so
    /// the partitions come in order).
    pub fn new(input: Arc<dyn ExecutionPlan>) -> Self {
        Self {
            cache: plan_properties(input.schema(), 1),
            input,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }
}

impl DisplayAs for BalansGatherExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        match t {
            DisplayFormatType::TreeRender => Ok(()),
            _ => write!(f, "BalansGatherExec"),
        }
    }
}

impl ExecutionPlan for BalansGatherExec {
    fn name(&self) -> &str {
        "BalansGatherExec"
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

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    crate::no_physical_expressions!();

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(Self::new(single_child(
            "BalansGatherExec",
            children,
        )?)))
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
                "BalansGatherExec has one partition, got {partition}"
            )));
        }
        OrderedConcatExec::new(below_coalesce(&self.input).clone()).execute(0, context)
    }
}

/// Runs a merge step: the partials and products of `input`, merged (see the module docs).
async fn merge_products(
    step: MergeStep,
    spec: BalansSpec,
    input: Arc<dyn ExecutionPlan>,
    context: Arc<TaskContext>,
) -> DFResult<Vec<u8>> {
    let batches: Vec<RecordBatch> = input.execute(0, context.clone())?.try_collect().await?;
    // In partition order; the products row (partition `PRODUCTS_ROW`) sorts last.
    let mut partials = partial_states(&batches)?;
    drop(batches);
    let products = match partials.last() {
        Some((p, _)) if *p == PRODUCTS_ROW as usize => partials.pop().map(|(_, bytes)| bytes),
        _ => None,
    };
    let partitions = partials.len();
    if partials.iter().enumerate().any(|(k, (p, _))| *p != k) {
        return Err(DataFusionError::Execution(format!(
            "the {} step of a cluster pass got partials of partitions {:?}",
            step.name(),
            partials.iter().map(|(p, _)| *p).collect::<Vec<_>>()
        )));
    }
    // One products blob per pass so far; this step completes the last pass's.
    let mut states = match &products {
        Some(products) => decode_states(products)?,
        None => Vec::new(),
    };
    let pass = spec.pass;
    let expected = if step == MergeStep::Profile {
        pass - 1
    } else {
        pass
    };
    if states.len() != expected {
        return Err(DataFusionError::Execution(format!(
            "the {} step of pass {pass} of a cluster pass got the products of {} pass(es)",
            step.name(),
            states.len()
        )));
    }
    let ctx = Arc::new(PassContext::for_task(
        spec,
        Arc::new(Schema::empty()),
        partial_schema(),
        partitions,
    ));
    ctx.bind(&context);
    if step != MergeStep::Profile {
        ctx.import_products(&states[pass - 1])?;
    }
    let worker = ctx.clone();
    let (label, started) = (ctx.spec.pass_label(), std::time::Instant::now());
    let bytes = run_blocking(ctx.abort.clone(), move || {
        merge(&worker, step, partials)?;
        let own = worker.export_products()?;
        if step == MergeStep::Profile {
            states.push(own);
        } else {
            states[pass - 1] = own;
        }
        encode_states(&states)
    })
    .await?;
    log::info!(
        "cluster merge: {label}{} of {partitions} partitions: {:.3} s",
        step.name(),
        started.elapsed().as_secs_f64()
    );
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::Field;
    use datafusion::datasource::listing::PartitionedFile;
    use datafusion::datasource::physical_plan::ParquetSource;
    use datafusion::execution::object_store::ObjectStoreUrl;
    use datafusion::physical_plan::expressions::col;
    use datafusion::prelude::SessionContext;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new("a", DataType::Float64, false)]))
    }

    fn scan(groups: &[&[&str]], limit: Option<usize>) -> Arc<dyn ExecutionPlan> {
        let groups = groups
            .iter()
            .map(|g| FileGroup::new(g.iter().map(|f| PartitionedFile::new(*f, 10)).collect()))
            .collect();
        let config = FileScanConfigBuilder::new(
            ObjectStoreUrl::local_filesystem(),
            Arc::new(ParquetSource::new(schema())),
        )
        .with_file_groups(groups)
        .with_limit(limit)
        .build();
        DataSourceExec::from_data_source(config)
    }

    fn groups_of(plan: &Arc<dyn ExecutionPlan>) -> Vec<Vec<String>> {
        let mut leaf = plan.clone();
        while let Some(child) = leaf.children().first().map(|c| (*c).clone()) {
            leaf = child;
        }
        let scan = leaf.downcast_ref::<DataSourceExec>().unwrap();
        let source: &dyn std::any::Any = scan.data_source().as_ref();
        let config = source.downcast_ref::<FileScanConfig>().unwrap();
        config
            .file_groups
            .iter()
            .map(|g| {
                g.files()
                    .iter()
                    .map(|f| f.object_meta.location.to_string())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn the_next_input_reads_the_partitions_after_each_one() {
        let input = scan(&[&["a"], &["b", "c"], &["d"]], None);
        let next = shifted_input(&input).unwrap();
        assert_eq!(next.output_partitioning().partition_count(), 3);
        assert_eq!(
            groups_of(&next),
            vec![vec!["b", "c", "d"], vec!["d"], Vec::<&str>::new()]
        );
        // Through per-partition operators.
        let projected: Arc<dyn ExecutionPlan> = Arc::new(
            ProjectionExec::try_new(vec![(col("a", &schema()).unwrap(), "a".into())], input)
                .unwrap(),
        );
        let next = shifted_input(&projected).unwrap();
        assert!(next.is::<ProjectionExec>());
        assert_eq!(groups_of(&next)[0], vec!["b", "c", "d"]);
        // Not a file scan, or a scan with a limit: no next input (the pass runs as one task).
        assert!(shifted_input(&scan(&[&["a"], &["b"]], Some(5))).is_none());
        assert!(shifted_input(&partition_ids(2).unwrap()).is_none());
        assert!(shifted_input(&coalesce(scan(&[&["a"], &["b"]], None))).is_none());
    }

    #[tokio::test]
    async fn each_partition_of_the_id_table_holds_its_index() {
        let ids = partition_ids(3).unwrap();
        let task = SessionContext::new().task_ctx();
        for i in 0..3 {
            assert_eq!(
                read_partition_id(&ids, i, task.clone()).await.unwrap(),
                Some(i)
            );
        }
    }

    #[test]
    fn products_of_every_pass_travel_exactly() {
        let states = vec![vec![1u8, 2, 3], Vec::new(), vec![255; 40]];
        assert_eq!(
            decode_states(&encode_states(&states).unwrap()).unwrap(),
            states
        );
        assert!(decode_states(&[7, 7]).is_err());
        let batch = partial_batch(4, 2, vec![9, 8]).unwrap();
        assert_eq!(
            batch_from_ipc(&batch_to_ipc(&batch).unwrap()).unwrap(),
            batch
        );
    }
}
