//! `preprocess((SELECT ...), recipe => 'mad_int_featselect', plate => ..., negcon => ...)` in
//! SQL: the preprocessing job ([`crate::preprocess`]) as a relation.
//!
//! Feature selection decides the output columns from the data, and a relation's schema must
//! be known when the query is planned. So the relation planner runs the job while planning:
//! it executes the subquery in the same session, applies the steps in the job's
//! memory-mapped working files, and plans a [`PreprocessNode`] leaf whose schema is the kept
//! columns. [`PreprocessExec`] then streams the result from those files (any number of times;
//! they are deleted with the plan). `EXPLAIN` shows the node and what the fit kept; it runs
//! the job too, since the columns it would show are the job's result.

use std::cmp::Ordering;
use std::fmt;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::Session;
use datafusion::common::{DFSchema, DFSchemaRef, plan_datafusion_err, plan_err};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, SessionState, TaskContext};
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{
    Expr, Extension, LogicalPlan, UserDefinedLogicalNode, UserDefinedLogicalNodeCore,
};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};
use datafusion::physical_planner::{ExtensionPlanner, PhysicalPlanner};
use datafusion::prelude::DataFrame;

use crate::preprocess::{FrameSpec, PreprocessSteps, Preprocessed, StepOptions, preprocess_frame};
use crate::relation::take_named;
use crate::source::{FeatureSelection, resolve_columns};

/// Gives the relation planner the session it plans for (bound once the session exists).
pub type SessionStateSource = Arc<OnceLock<Box<dyn Fn() -> Option<SessionState> + Send + Sync>>>;

/// Distinguishes preprocess results in plan equality (each run has its own working files).
static NEXT_RUN: AtomicU64 = AtomicU64::new(0);

/// Runs `future` to completion from synchronous planning code: on the current runtime when it
/// has worker threads to spare, else on a runtime of its own on a scoped thread.
fn run_now<T: Send>(future: impl Future<Output = T> + Send) -> Result<T> {
    use tokio::runtime::{Builder, Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            Ok(tokio::task::block_in_place(|| handle.block_on(future)))
        }
        _ => std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime = Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                        .map_err(|e| {
                            plan_datafusion_err!("preprocess: cannot start a runtime: {e}")
                        })?;
                    Ok(runtime.block_on(future))
                })
                .join()
                .map_err(|_| plan_datafusion_err!("preprocess: the planning thread panicked"))?
        }),
    }
}

/// Plans `preprocess((SELECT ...), ...)`: runs the job on `input` and returns the leaf node.
/// `named` holds the arguments after the subquery (lower-case names, literal text).
pub(crate) fn plan_preprocess(
    input: LogicalPlan,
    mut named: Vec<(String, String)>,
    selection: FeatureSelection,
    negcon: Option<String>,
    session: &SessionStateSource,
) -> Result<LogicalPlan> {
    let plate = take_named(&mut named, "plate");
    let well = take_named(&mut named, "well");
    let mut options = StepOptions::default();
    for (key, value) in &named {
        options
            .set(key, value)
            .map_err(|e| plan_datafusion_err!("preprocess: {e}"))?;
    }
    let steps = options
        .steps(plate.is_some(), negcon.is_some())
        .map_err(|e| plan_datafusion_err!("preprocess: {e}"))?;
    let schema = input.schema().as_arrow().clone();
    let keys: Vec<String> = plate
        .iter()
        .chain(well.iter().filter(|_| steps.aggregate.is_some()))
        .cloned()
        .collect();
    let features = resolve_columns(&schema, &selection, &keys)
        .map_err(|e| plan_datafusion_err!("preprocess: {e}"))?
        .features;
    let spec = FrameSpec {
        features,
        plate,
        well,
        negcon,
        steps,
    };
    spec.check()
        .map_err(|e| plan_datafusion_err!("preprocess: {e}"))?;
    let Some(state) = session.get().and_then(|state| state()) else {
        return plan_err!(
            "preprocess(...) needs a session from balans_engine::session::build_session"
        );
    };
    let frame = DataFrame::new(state, input);
    let result = run_now(async { preprocess_frame(frame, &spec, &|_| {}).await })?
        .map_err(|e| plan_datafusion_err!("preprocess: {e}"))?;
    let description = describe(&spec, &result);
    let node = PreprocessNode::try_new(Arc::new(result), description)?;
    Ok(LogicalPlan::Extension(Extension {
        node: Arc::new(node),
    }))
}

fn describe(spec: &FrameSpec, result: &Preprocessed) -> String {
    let outcome = &result.outcome;
    let recipe = PreprocessSteps {
        aggregate: spec.steps.aggregate,
        ..PreprocessSteps::mad_int_featselect()
    };
    let steps = if spec.steps == recipe {
        spec.steps
            .aggregate
            .map(|a| format!("aggregate {a:?}; ").to_lowercase())
            .unwrap_or_default()
            + "recipe mad_int_featselect"
    } else {
        spec.steps.describe().join("; ")
    };
    format!(
        "{steps} | {} rows, {} -> {} features",
        outcome.rows,
        outcome.input_features.len(),
        outcome.features.len()
    )
}

/// `Preprocess: <steps> | <rows>, <in> -> <kept> features`: a preprocessed table, fitted and
/// transformed when the query was planned.
#[derive(Debug, Clone)]
pub struct PreprocessNode {
    run: u64,
    result: Arc<Preprocessed>,
    description: String,
    schema: DFSchemaRef,
}

impl PreprocessNode {
    /// The node over a finished run.
    pub fn try_new(result: Arc<Preprocessed>, description: String) -> Result<Self> {
        let arrow = result
            .schema()
            .map_err(|e| plan_datafusion_err!("preprocess: {e}"))?;
        let schema = Arc::new(DFSchema::try_from(arrow.as_ref().clone())?);
        Ok(Self {
            run: NEXT_RUN.fetch_add(1, AtomicOrdering::Relaxed),
            result,
            description,
            schema,
        })
    }
}

impl PartialEq for PreprocessNode {
    fn eq(&self, other: &Self) -> bool {
        self.run == other.run
    }
}

impl Eq for PreprocessNode {}

impl Hash for PreprocessNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.run.hash(state);
    }
}

impl PartialOrd for PreprocessNode {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        self.run.partial_cmp(&other.run)
    }
}

impl UserDefinedLogicalNodeCore for PreprocessNode {
    fn name(&self) -> &str {
        "Preprocess"
    }

    fn inputs(&self) -> Vec<&LogicalPlan> {
        vec![]
    }

    fn schema(&self) -> &DFSchemaRef {
        &self.schema
    }

    fn expressions(&self) -> Vec<Expr> {
        vec![]
    }

    fn fmt_for_explain(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "Preprocess: {}", self.description)
    }

    fn with_exprs_and_inputs(&self, exprs: Vec<Expr>, inputs: Vec<LogicalPlan>) -> Result<Self> {
        if !exprs.is_empty() || !inputs.is_empty() {
            return Err(DataFusionError::Internal(
                "Preprocess takes no inputs and no expressions".into(),
            ));
        }
        Ok(self.clone())
    }
}

/// Streams a preprocessed table from its working files.
#[derive(Debug)]
pub struct PreprocessExec {
    result: Arc<Preprocessed>,
    description: String,
    properties: Arc<PlanProperties>,
}

impl PreprocessExec {
    /// The operator over a finished run.
    pub fn try_new(result: Arc<Preprocessed>, description: String) -> Result<Self> {
        let schema: SchemaRef = result
            .schema()
            .map_err(|e| plan_datafusion_err!("preprocess: {e}"))?;
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Ok(Self {
            result,
            description,
            properties,
        })
    }
}

impl DisplayAs for PreprocessExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "PreprocessExec: {}", self.description)
    }
}

impl ExecutionPlan for PreprocessExec {
    fn name(&self) -> &str {
        "PreprocessExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
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
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if !children.is_empty() {
            return Err(DataFusionError::Internal(
                "PreprocessExec takes no children".into(),
            ));
        }
        Ok(self)
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "PreprocessExec has one partition, not {partition}"
            )));
        }
        self.result
            .stream()
            .map_err(|e| DataFusionError::Execution(format!("preprocess: {e}")))
    }
}

/// Plans [`PreprocessNode`] as [`PreprocessExec`].
#[derive(Debug, Default, Clone, Copy)]
pub struct PreprocessExtensionPlanner;

#[async_trait]
impl ExtensionPlanner for PreprocessExtensionPlanner {
    async fn plan_extension(
        &self,
        _planner: &dyn PhysicalPlanner,
        node: &dyn UserDefinedLogicalNode,
        _logical_inputs: &[&LogicalPlan],
        _physical_inputs: &[Arc<dyn ExecutionPlan>],
        _session: &dyn Session,
        _planning_ctx: &PhysicalPlanningContext,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        let Some(node) = node.as_any().downcast_ref::<PreprocessNode>() else {
            return Ok(None);
        };
        Ok(Some(Arc::new(PreprocessExec::try_new(
            node.result.clone(),
            node.description.clone(),
        )?)))
    }
}
