//! Input checks every logical node and extension planner of this crate shares.

use std::sync::Arc;

use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::physical_plan::ExecutionPlan;

/// The one input of a node rebuilt by `with_exprs_and_inputs` (the node holds no
/// expressions).
pub fn single_input(
    node: &str,
    exprs: Vec<Expr>,
    mut inputs: Vec<LogicalPlan>,
) -> Result<LogicalPlan> {
    if !exprs.is_empty() || inputs.len() != 1 {
        return Err(DataFusionError::Internal(format!(
            "{node} takes one input and no expressions"
        )));
    }
    Ok(inputs.swap_remove(0))
}

/// The physical input of a unary node being lowered by its extension planner.
pub fn physical_input<'a>(
    node: &str,
    inputs: &'a [Arc<dyn ExecutionPlan>],
) -> Result<&'a Arc<dyn ExecutionPlan>> {
    inputs
        .first()
        .ok_or_else(|| DataFusionError::Internal(format!("{node} without input")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::logical_expr::{LogicalPlanBuilder, lit};

    #[test]
    fn a_unary_node_takes_exactly_one_input_and_no_expressions() {
        let plan = LogicalPlanBuilder::empty(false).build().unwrap();
        assert!(single_input("Balans", vec![], vec![plan.clone()]).is_ok());
        for (exprs, inputs) in [(vec![lit(1)], vec![plan.clone()]), (vec![], vec![])] {
            let err = single_input("Balans", exprs, inputs).unwrap_err();
            assert!(err.to_string().contains("Balans takes one input"), "{err}");
        }
        let err = physical_input("Embed", &[]).unwrap_err();
        assert!(err.to_string().contains("Embed without input"), "{err}");
    }
}
