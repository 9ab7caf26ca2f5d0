//! `preprocess((SELECT ...), recipe => 'mad_int_featselect', plate => ..., negcon => ...)` in
//! a plan.
//!
//! Feature selection decides the output columns from the data, and a relation's schema must
//! be known when the query is planned. So the relation planner runs the job while planning,
//! through the [`PreprocessRunner`] the engine provides: it executes the subquery in the same
//! session, applies the steps in the job's memory-mapped working files, and returns the
//! finished table. [`PreprocessNode`] is a leaf whose schema is the kept columns;
//! [`PreprocessExec`] then streams the result from those files (any number of times; they
//! are deleted with the plan). `EXPLAIN` shows the node and what the fit kept; it runs the
//! job too, since the columns it would show are the job's result.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use balans_operators::exec::preprocess::{PlannedTable, PreprocessExec};
use datafusion::catalog::Session;
use datafusion::common::{DFSchema, DFSchemaRef, plan_datafusion_err};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::SessionState;
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{
    Expr, LogicalPlan, UserDefinedLogicalNode, UserDefinedLogicalNodeCore,
};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_planner::{ExtensionPlanner, PhysicalPlanner};

use crate::columns::FeatureSelection;

/// Gives the relation planner the session it plans for (bound once the session exists).
pub type SessionStateSource = Arc<OnceLock<Box<dyn Fn() -> Option<SessionState> + Send + Sync>>>;

/// Distinguishes preprocess results in plan equality (each run has its own working files).
static NEXT_RUN: AtomicU64 = AtomicU64::new(0);

/// Runs the preprocessing job while a `preprocess(...)` relation is planned. The engine
/// implements it (the job lives there); the planner only calls it.
pub trait PreprocessRunner: fmt::Debug + Send + Sync {
    /// Runs the job on `input` in `state`. `named` holds the arguments after the subquery
    /// other than `features`, `exclude` and `negcon` (lower-case names, literal text).
    /// Returns the finished table and how `EXPLAIN` describes it.
    fn run(
        &self,
        state: SessionState,
        input: LogicalPlan,
        named: Vec<(String, String)>,
        selection: FeatureSelection,
        negcon: Option<String>,
    ) -> Result<(Arc<dyn PlannedTable>, String)>;
}

/// `Preprocess: <steps> | <rows>, <in> -> <kept> features`: a preprocessed table, fitted and
/// transformed when the query was planned.
#[derive(Debug, Clone)]
pub struct PreprocessNode {
    run: u64,
    result: Arc<dyn PlannedTable>,
    description: String,
    schema: DFSchemaRef,
}

impl PreprocessNode {
    /// The node over a finished run.
    pub fn try_new(result: Arc<dyn PlannedTable>, description: String) -> Result<Self> {
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
