//! The logical node of a BALANS correction.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use balans_operators::{BalansSpec, exec::balans_output_schema};
use datafusion::common::{DFSchema, DFSchemaRef};
use datafusion::error::Result;
use datafusion::logical_expr::{Expr, Extension, LogicalPlan, UserDefinedLogicalNodeCore};

use crate::inputs::single_input;

/// Column a plan adds to carry a `negcon` predicate's value (true for the rows a sphering or
/// negcon-anchored correction is fitted on) to the operator.
pub const FIT_MASK_COLUMN: &str = "__balans_fit_row";

/// `Balans: features=…, batch=…, k=…` over one input relation.
#[derive(Debug, Clone)]
pub struct BalansNode {
    input: LogicalPlan,
    spec: BalansSpec,
    schema: DFSchemaRef,
}

impl BalansNode {
    /// Creates the node; fails when a named column is missing from `input`.
    pub fn try_new(input: LogicalPlan, spec: BalansSpec) -> Result<Self> {
        let arrow_schema = balans_output_schema(input.schema().as_arrow(), &spec)?;
        let schema = Arc::new(DFSchema::try_from(arrow_schema.as_ref().clone())?);
        Ok(Self {
            input,
            spec,
            schema,
        })
    }

    /// The correction request.
    pub fn spec(&self) -> &BalansSpec {
        &self.spec
    }

    fn key(&self) -> (&[String], &[String], String) {
        (
            &self.spec.features,
            &self.spec.batch,
            self.spec.config.describe(),
        )
    }
}

impl PartialEq for BalansNode {
    fn eq(&self, other: &Self) -> bool {
        self.input == other.input && self.key() == other.key()
    }
}

impl Eq for BalansNode {}

impl Hash for BalansNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.input.hash(state);
        self.key().hash(state);
    }
}

impl PartialOrd for BalansNode {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        self.key().partial_cmp(&other.key())
    }
}

impl UserDefinedLogicalNodeCore for BalansNode {
    fn name(&self) -> &str {
        "Balans"
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
        write!(
            f,
            "Balans: {}features={}, batch=[{}], {}",
            self.spec.pass_label(),
            self.spec.features.len(),
            self.spec.batch.join(", "),
            self.spec.config.describe()
        )
    }

    fn with_exprs_and_inputs(&self, exprs: Vec<Expr>, inputs: Vec<LogicalPlan>) -> Result<Self> {
        Self::try_new(single_input("Balans", exprs, inputs)?, self.spec.clone())
    }
}

/// Wraps `input` in a correction: one node per pass (`spec.config.passes()`), each
/// correcting the output of the one below it.
pub fn balans_plan(input: LogicalPlan, spec: BalansSpec) -> Result<LogicalPlan> {
    let mut plan = input;
    for pass in 1..=spec.config.passes().max(1) {
        let spec = BalansSpec {
            pass,
            ..spec.clone()
        };
        plan = LogicalPlan::Extension(Extension {
            node: Arc::new(BalansNode::try_new(plan, spec)?),
        });
    }
    Ok(plan)
}
