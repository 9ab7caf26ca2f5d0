//! Lowering of [`BalansNode`] to the operator chain of one correction pass
//! ([`balans_operators::exec::plan`]), and the session's query planner with every extension
//! planner of this crate.

use std::sync::Arc;

use async_trait::async_trait;
use balans_operators::exec::correction_node;
use balans_operators::exec::pass::BalansPassExec;
use datafusion::catalog::Session;
use datafusion::error::Result;
use datafusion::execution::context::QueryPlanner;
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{LogicalPlan, UserDefinedLogicalNode};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
use datafusion::physical_planner::{DefaultPhysicalPlanner, ExtensionPlanner, PhysicalPlanner};

use crate::embed::EmbedExtensionPlanner;
use crate::evaluate::EvaluateExtensionPlanner;
use crate::inputs::physical_input;
use crate::node::BalansNode;
use crate::preprocess::PreprocessExtensionPlanner;

/// Marks a session that plans for a cluster (a [`SessionConfig`] extension, set by the
/// cluster scheduler's sessions): a correction is then planned as one [`BalansPassExec`] over
/// `CoalescePartitionsExec(input)` instead of the operator chain, because the chain's steps
/// share the pass's working files on one machine (see `balans_operators::exec::pass`).
///
/// [`SessionConfig`]: datafusion::prelude::SessionConfig
#[derive(Debug, Default, Clone, Copy)]
pub struct ClusterPlanning;

/// Whether `session` plans for a cluster (see [`ClusterPlanning`]).
pub fn plans_for_cluster(session: &dyn Session) -> bool {
    session
        .config()
        .get_extension::<ClusterPlanning>()
        .is_some()
}

/// Plans [`BalansNode`] as one pass of partitioned operators (or, for a cluster, as part of a
/// [`BalansPassExec`]).
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
        session: &dyn Session,
        _planning_ctx: &PhysicalPlanningContext,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        let Some(balans) = node.as_any().downcast_ref::<BalansNode>() else {
            return Ok(None);
        };
        let input = physical_input("Balans", physical_inputs)?;
        let spec = balans.spec().clone();
        if !plans_for_cluster(session) {
            return Ok(Some(correction_node(input.clone(), spec)?));
        }
        // The next pass of a correction joins the operator of the passes below it.
        if let Some(below) = input.downcast_ref::<BalansPassExec>()
            && below.specs().last().map(|s| s.pass + 1) == Some(spec.pass)
        {
            return Ok(Some(Arc::new(below.with_next_pass(spec)?)));
        }
        let coalesced = Arc::new(CoalescePartitionsExec::new(input.clone()));
        Ok(Some(Arc::new(BalansPassExec::try_new(
            coalesced,
            vec![spec],
        )?)))
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
