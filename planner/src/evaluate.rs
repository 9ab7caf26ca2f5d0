//! `evaluate((SELECT ...), batch => ..., label => ...)` in a plan: the relation planner
//! ([`crate::relation`]) projects the subquery into the canonical layout of
//! [`canonical_columns`]; [`EvaluateNode`] is the logical node (shown in `EXPLAIN`) and
//! [`EvaluateExtensionPlanner`] lowers it to [`EvaluateExec`].

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use async_trait::async_trait;
use balans_operators::exec::evaluate::{EvaluateExec, EvaluateSpec, SCORE_SCHEMA, describe};
use datafusion::arrow::datatypes::DataType;
use datafusion::catalog::Session;
use datafusion::common::{DFSchema, DFSchemaRef};
use datafusion::error::Result;
use datafusion::functions::core::expr_fn::coalesce;
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{
    Expr, ExprSchemable, LogicalPlan, UserDefinedLogicalNode, UserDefinedLogicalNodeCore,
};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_planner::{ExtensionPlanner, PhysicalPlanner};
use datafusion::prelude::{ident, lit};

use crate::inputs::{physical_input, single_input};

/// Default plate column, used when present and none is named.
pub const DEFAULT_PLATE_COLUMN: &str = "Metadata_Plate";
/// Default well column, used when present and none is named.
pub const DEFAULT_WELL_COLUMN: &str = "Metadata_Well";

/// The columns the metric suite reads, as a projection of a profile table: `f0..f{d-1}`
/// (the embedding as float64), `__batch` (the batch columns as text joined by ` / `),
/// `__label`, `__plate` and `__well` (text; a null is `(null)`) and `__negcon` (`negcon`).
pub fn canonical_columns(
    schema: &datafusion::common::DFSchema,
    features: &[String],
    batch: &[String],
    label: &str,
    plate: Option<&str>,
    well: Option<&str>,
    negcon: Expr,
) -> datafusion::error::Result<Vec<Expr>> {
    let as_text = |name: &str| -> datafusion::error::Result<Expr> {
        Ok(coalesce(vec![
            ident(name).cast_to(&DataType::Utf8, schema)?,
            lit("(null)"),
        ]))
    };
    let mut columns = Vec::with_capacity(features.len() + 5);
    for (i, f) in features.iter().enumerate() {
        columns.push(
            ident(f.as_str())
                .cast_to(&DataType::Float64, schema)?
                .alias(format!("f{i}")),
        );
    }
    let mut keys = Vec::new();
    for (i, b) in batch.iter().enumerate() {
        if i > 0 {
            keys.push(lit(" / "));
        }
        keys.push(as_text(b)?);
    }
    columns.push(datafusion::functions::string::expr_fn::concat(keys).alias("__batch"));
    columns.push(as_text(label)?.alias("__label"));
    if let Some(p) = plate {
        columns.push(as_text(p)?.alias("__plate"));
    }
    if let Some(w) = well {
        columns.push(as_text(w)?.alias("__well"));
    }
    columns.push(negcon.alias("__negcon"));
    Ok(columns)
}

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

    /// What the suite computes.
    pub fn spec(&self) -> &EvaluateSpec {
        &self.spec
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

    fn with_exprs_and_inputs(&self, exprs: Vec<Expr>, inputs: Vec<LogicalPlan>) -> Result<Self> {
        Self::try_new(single_input("Evaluate", exprs, inputs)?, self.spec.clone())
    }
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
        let input = physical_input("Evaluate", physical_inputs)?;
        Ok(Some(Arc::new(EvaluateExec::new(
            input.clone(),
            node.spec.clone(),
        ))))
    }
}
