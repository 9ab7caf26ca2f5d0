//! `evaluate((SELECT ...), batch => ..., label => ...)` in SQL: the metric suite as a relation
//! with one row per score (`metric`, `kind`, `value`), as `balans evaluate` prints them.
//!
//! The relation planner ([`crate::relation`]) projects the subquery into a canonical layout
//! (`f0..f{d-1}` as float64, `__batch`, `__label`, `__plate`, `__well` as text, `__negcon` as
//! boolean); [`EvaluateNode`] is the logical node (shown in `EXPLAIN`) and [`EvaluateExec`]
//! collects its input, runs the suite on a blocking thread and emits the score table.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, LazyLock};

use async_trait::async_trait;
use balans_metrics::suite::{EvalInput, EvalOptions, MetricSelection, evaluate};
use balans_metrics::types::Codes;

use crate::evaluate::CanonicalRows;
use balans_planner::BalansExtensionPlanner;
use datafusion::arrow::array::{ArrayRef, Float64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::Session;
use datafusion::common::{DFSchema, DFSchemaRef, exec_datafusion_err};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::context::QueryPlanner;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{
    Expr, LogicalPlan, UserDefinedLogicalNode, UserDefinedLogicalNodeCore,
};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, Distribution, ExecutionPlan, Partitioning, PlanProperties,
};
use datafusion::physical_planner::{DefaultPhysicalPlanner, ExtensionPlanner, PhysicalPlanner};
use futures::TryStreamExt;

/// What the suite computes: the embedding width, the optional columns and the options that
/// `evaluate(...)` accepts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd)]
pub struct EvaluateSpec {
    /// Embedding columns `f0..f{d-1}`.
    pub d: usize,
    /// Whether `__plate` is present.
    pub has_plate: bool,
    /// Whether `__well` is present.
    pub has_well: bool,
    /// Seed of the suite.
    pub seed: u64,
    /// Metric families left out (silhouette, graph, kbet, lisi, map, classifier).
    pub skip: Vec<String>,
    /// Evaluate the clustering and mixing metrics on at most this many cells.
    pub subsample: Option<usize>,
}

/// The metric families `skip => '...'` may name.
pub const METRIC_FAMILIES: &[&str] = &["silhouette", "graph", "kbet", "lisi", "map", "classifier"];

impl EvaluateSpec {
    /// The suite's options.
    pub fn options(&self) -> EvalOptions {
        let mut metrics = MetricSelection::default();
        for family in &self.skip {
            match family.as_str() {
                "silhouette" => metrics.silhouette = false,
                "graph" => metrics.graph = false,
                "kbet" => metrics.kbet = false,
                "lisi" => metrics.lisi = false,
                "map" => metrics.map = false,
                _ => metrics.classifier = false,
            }
        }
        EvalOptions {
            seed: self.seed,
            subsample: self.subsample,
            metrics,
            ..EvalOptions::default()
        }
    }
}

/// The score table's schema.
static SCORE_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("metric", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("value", DataType::Float64, true),
    ]))
});

/// `Evaluate: d=…` over the canonical projection of the input.
#[derive(Debug, Clone)]
pub struct EvaluateNode {
    input: LogicalPlan,
    spec: EvaluateSpec,
    schema: DFSchemaRef,
}

impl EvaluateNode {
    /// The node over `input` (already in the canonical layout).
    pub fn try_new(input: LogicalPlan, spec: EvaluateSpec) -> Result<Self> {
        let schema = Arc::new(DFSchema::try_from(SCORE_SCHEMA.as_ref().clone())?);
        Ok(Self {
            input,
            spec,
            schema,
        })
    }
}

impl PartialEq for EvaluateNode {
    fn eq(&self, other: &Self) -> bool {
        self.input == other.input && self.spec == other.spec
    }
}

impl Eq for EvaluateNode {}

impl Hash for EvaluateNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.input.hash(state);
        self.spec.hash(state);
    }
}

impl PartialOrd for EvaluateNode {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        self.spec.partial_cmp(&other.spec)
    }
}

impl UserDefinedLogicalNodeCore for EvaluateNode {
    fn name(&self) -> &str {
        "Evaluate"
    }

    fn inputs(&self) -> Vec<&LogicalPlan> {
        vec![&self.input]
    }

    fn schema(&self) -> &DFSchemaRef {
        &self.schema
    }

    fn expressions(&self) -> Vec<Expr> {
        vec![]
    }

    fn fmt_for_explain(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "Evaluate: {}", describe(&self.spec))
    }

    fn with_exprs_and_inputs(
        &self,
        exprs: Vec<Expr>,
        mut inputs: Vec<LogicalPlan>,
    ) -> Result<Self> {
        if !exprs.is_empty() || inputs.len() != 1 {
            return Err(DataFusionError::Internal(
                "Evaluate takes one input and no expressions".into(),
            ));
        }
        Self::try_new(inputs.swap_remove(0), self.spec.clone())
    }
}

fn describe(spec: &EvaluateSpec) -> String {
    format!(
        "dims={}, plate={}, well={}, seed={}, skip=[{}]",
        spec.d,
        spec.has_plate,
        spec.has_well,
        spec.seed,
        spec.skip.join(", ")
    )
}

/// Collects the input, runs the metric suite, emits one row per score.
#[derive(Debug)]
pub struct EvaluateExec {
    input: Arc<dyn ExecutionPlan>,
    spec: EvaluateSpec,
    properties: Arc<PlanProperties>,
}

impl EvaluateExec {
    /// The operator over `input` (canonical layout).
    pub fn new(input: Arc<dyn ExecutionPlan>, spec: EvaluateSpec) -> Self {
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(SCORE_SCHEMA.clone()),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        ));
        Self {
            input,
            spec,
            properties,
        }
    }
}

impl DisplayAs for EvaluateExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "EvaluateExec: {}", describe(&self.spec))
    }
}

impl ExecutionPlan for EvaluateExec {
    fn name(&self) -> &str {
        "EvaluateExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn required_input_distribution(&self) -> Vec<Distribution> {
        vec![Distribution::SinglePartition]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(
            &Arc<dyn PhysicalExpr>,
        ) -> Result<datafusion::common::tree_node::TreeNodeRecursion>,
    ) -> Result<datafusion::common::tree_node::TreeNodeRecursion> {
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return Err(DataFusionError::Internal(
                "EvaluateExec takes one child".into(),
            ));
        }
        Ok(Arc::new(Self::new(
            children.swap_remove(0),
            self.spec.clone(),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "EvaluateExec has one partition, not {partition}"
            )));
        }
        let input = self.input.execute(0, context)?;
        let spec = self.spec.clone();
        let scores = async move {
            let batches: Vec<RecordBatch> = input.try_collect().await?;
            tokio::task::spawn_blocking(move || score_table(&spec, &batches))
                .await
                .map_err(|e| exec_datafusion_err!("the evaluation stopped: {e}"))?
        };
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            SCORE_SCHEMA.clone(),
            futures::stream::once(scores),
        )))
    }
}

/// The suite over the canonical columns of `batches`, as the score table.
fn score_table(spec: &EvaluateSpec, batches: &[RecordBatch]) -> Result<RecordBatch> {
    let d = spec.d;
    let mut rows = CanonicalRows::default();
    for b in batches {
        rows.push(b, d)?;
    }
    let CanonicalRows {
        x,
        batch,
        label,
        plate,
        well,
        is_negcon,
    } = rows;
    if is_negcon.is_empty() {
        return Err(exec_datafusion_err!("evaluate: the input has no rows"));
    }
    let (batch, label) = (Codes::from_strings(&batch), Codes::from_strings(&label));
    let plate = spec.has_plate.then(|| Codes::from_strings(&plate));
    let well = spec.has_well.then(|| Codes::from_strings(&well));
    let input = EvalInput {
        x: &x,
        d,
        batch: &batch,
        label: &label,
        is_negcon: &is_negcon,
        plate: plate.as_ref(),
        well: well.as_ref(),
    };
    let report = evaluate(&input, &spec.options(), &|_| {})
        .map_err(|e| exec_datafusion_err!("evaluate: {e}"))?;
    let rows = report.scores.rows();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
        Arc::new(Float64Array::from(
            rows.iter().map(|r| r.2).collect::<Vec<_>>(),
        )),
    ];
    Ok(RecordBatch::try_new(SCORE_SCHEMA.clone(), columns)?)
}

/// Plans [`EvaluateNode`] as [`EvaluateExec`].
#[derive(Debug, Default, Clone, Copy)]
pub struct EvaluateExtensionPlanner;

#[async_trait]
impl ExtensionPlanner for EvaluateExtensionPlanner {
    async fn plan_extension(
        &self,
        _planner: &dyn PhysicalPlanner,
        node: &dyn UserDefinedLogicalNode,
        _logical_inputs: &[&LogicalPlan],
        physical_inputs: &[Arc<dyn ExecutionPlan>],
        _session: &dyn Session,
        _planning_ctx: &PhysicalPlanningContext,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        let Some(node) = node.as_any().downcast_ref::<EvaluateNode>() else {
            return Ok(None);
        };
        let input = physical_inputs
            .first()
            .ok_or_else(|| DataFusionError::Internal("Evaluate without input".into()))?;
        Ok(Some(Arc::new(EvaluateExec::new(
            input.clone(),
            node.spec.clone(),
        ))))
    }
}

/// The engine's query planner: DataFusion's planner with the correction and evaluation
/// extensions.
#[derive(Debug, Default, Clone, Copy)]
pub struct EngineQueryPlanner;

#[async_trait]
impl QueryPlanner for EngineQueryPlanner {
    async fn create_physical_plan(
        &self,
        logical_plan: &LogicalPlan,
        session: &dyn Session,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        DefaultPhysicalPlanner::with_extension_planners(vec![
            Arc::new(BalansExtensionPlanner),
            Arc::new(EvaluateExtensionPlanner),
            Arc::new(crate::preprocess_relation::PreprocessExtensionPlanner),
            Arc::new(crate::embed::EmbedExtensionPlanner),
        ])
        .create_physical_plan(logical_plan, session)
        .await
    }
}
