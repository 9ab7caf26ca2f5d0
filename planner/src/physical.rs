//! Lowering of [`BalansNode`] to the operator chain of one correction pass
//! ([`balans_operators::exec::plan`]), and the session's query planner with every extension
//! planner of this crate.

use std::sync::Arc;

use async_trait::async_trait;
use balans_operators::exec::correction_node;
use datafusion::catalog::Session;
use datafusion::error::Result;
use datafusion::execution::context::QueryPlanner;
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{LogicalPlan, UserDefinedLogicalNode};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_planner::{DefaultPhysicalPlanner, ExtensionPlanner, PhysicalPlanner};

use crate::embed::EmbedExtensionPlanner;
use crate::evaluate::EvaluateExtensionPlanner;
use crate::inputs::physical_input;
use crate::node::BalansNode;
use crate::preprocess::PreprocessExtensionPlanner;

/// Plans [`BalansNode`] as one pass of partitioned operators.
#[derive(Debug, Default, Clone, Copy)]
pub struct BalansExtensionPlanner;

#[async_trait]
impl ExtensionPlanner for BalansExtensionPlanner {
    async fn plan_extension(
        &self,
        _planner: &dyn PhysicalPlanner,
        node: &dyn UserDefinedLogicalNode,
        _logical_inputs: &[&LogicalPlan],
        physical_inputs: &[Arc<dyn ExecutionPlan>],
        _session: &dyn Session,
        _planning_ctx: &PhysicalPlanningContext,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        let Some(balans) = node.as_any().downcast_ref::<BalansNode>() else {
            return Ok(None);
        };
        let input = physical_input("Balans", physical_inputs)?;
        Ok(Some(correction_node(input.clone(), balans.spec().clone())?))
    }
}

/// The session's query planner: DataFusion's default planner plus the Balans extensions
/// (corrections, evaluation, preprocessing, model embedding).
#[derive(Debug, Default, Clone, Copy)]
pub struct BalansQueryPlanner;

#[async_trait]
impl QueryPlanner for BalansQueryPlanner {
    async fn create_physical_plan(
        &self,
        logical_plan: &LogicalPlan,
        session: &dyn Session,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        DefaultPhysicalPlanner::with_extension_planners(vec![
            Arc::new(BalansExtensionPlanner),
            Arc::new(EvaluateExtensionPlanner),
            Arc::new(PreprocessExtensionPlanner),
            Arc::new(EmbedExtensionPlanner),
        ])
        .create_physical_plan(logical_plan, session)
        .await
    }
}
