//! Plumbing every operator of this crate shares, so each operator file holds only what is its
//! own: plan properties, rebuilding with new children, and the `apply_expressions` of an
//! operator that holds no physical expressions ([`no_physical_expressions!`]).

use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::error::{DataFusionError, Result};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::{ExecutionPlan, Partitioning, PlanProperties};

/// The properties of a bounded operator that emits its output at the end, with `partitions`
/// output partitions (at least one).
pub fn plan_properties(schema: SchemaRef, partitions: usize) -> Arc<PlanProperties> {
    bounded_properties(
        schema,
        Partitioning::UnknownPartitioning(partitions.max(1)),
        EmissionType::Final,
    )
}

/// The properties of a bounded operator with the given partitioning and emission (a streaming
/// operator keeps its input's partitioning and emits incrementally).
pub fn bounded_properties(
    schema: SchemaRef,
    partitioning: Partitioning,
    emission: EmissionType,
) -> Arc<PlanProperties> {
    Arc::new(PlanProperties::new(
        EquivalenceProperties::new(schema),
        partitioning,
        emission,
        Boundedness::Bounded,
    ))
}

/// The input of `plan` when it is a `CoalescePartitionsExec`, else `plan`: the partitions an
/// operator over a coalesce (a cluster's stage boundary) reads one by one, in order.
pub fn below_coalesce(plan: &Arc<dyn ExecutionPlan>) -> &Arc<dyn ExecutionPlan> {
    match plan
        .downcast_ref::<datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec>()
    {
        Some(coalesce) => coalesce.input(),
        None => plan,
    }
}

/// The one child of an operator rebuilt by `with_new_children`.
pub fn single_child(
    name: &str,
    mut children: Vec<Arc<dyn ExecutionPlan>>,
) -> Result<Arc<dyn ExecutionPlan>> {
    if children.len() != 1 {
        return Err(DataFusionError::Internal(format!(
            "{name} takes one child, got {}",
            children.len()
        )));
    }
    Ok(children.swap_remove(0))
}

/// Checks that a leaf operator rebuilt by `with_new_children` gets no children.
pub fn no_children(name: &str, children: &[Arc<dyn ExecutionPlan>]) -> Result<()> {
    if children.is_empty() {
        Ok(())
    } else {
        Err(DataFusionError::Internal(format!(
            "{name} takes no children, got {}",
            children.len()
        )))
    }
}

/// `ExecutionPlan::apply_expressions` of an operator without physical expressions: there is
/// nothing to visit. Use it inside the `impl ExecutionPlan` block.
#[macro_export]
macro_rules! no_physical_expressions {
    () => {
        fn apply_expressions(
            &self,
            _f: &mut dyn FnMut(
                &std::sync::Arc<dyn datafusion::physical_expr::PhysicalExpr>,
            ) -> datafusion::error::Result<
                datafusion::common::tree_node::TreeNodeRecursion,
            >,
        ) -> datafusion::error::Result<datafusion::common::tree_node::TreeNodeRecursion> {
            Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::Schema;
    use datafusion::physical_plan::empty::EmptyExec;

    #[test]
    fn child_counts_are_checked_with_the_operator_named() {
        let leaf: Arc<dyn ExecutionPlan> = Arc::new(EmptyExec::new(Arc::new(Schema::empty())));
        assert!(single_child("X", vec![leaf.clone()]).is_ok());
        let err = single_child("XExec", vec![leaf.clone(), leaf.clone()]).unwrap_err();
        assert!(
            err.to_string().contains("XExec takes one child, got 2"),
            "{err}"
        );
        assert!(no_children("LeafExec", &[]).is_ok());
        let err = no_children("LeafExec", &[leaf]).unwrap_err();
        assert!(
            err.to_string()
                .contains("LeafExec takes no children, got 1"),
            "{err}"
        );
    }

    #[test]
    fn final_properties_have_at_least_one_partition() {
        let props = plan_properties(Arc::new(Schema::empty()), 0);
        assert_eq!(props.partitioning.partition_count(), 1);
        assert_eq!(props.emission_type, EmissionType::Final);
    }
}
