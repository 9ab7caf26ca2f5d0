//! Lowering of [`BalansNode`] to the operator chain of one correction pass
//! ([`balans_operators::exec::plan`]), and the session's query planner with every extension
//! planner of this crate.

use std::sync::Arc;

use async_trait::async_trait;
use balans_operators::exec::cluster::{
    cluster_next_pass, cluster_pass, distributes, finish_cluster_plan,
};
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
/// cluster scheduler's sessions): the chain's steps share the pass's working files on one
/// machine, so a correction is planned instead as stages of tasks that each rebuild their
/// partition's spool (`balans_operators::exec::cluster`), or, for Harmony and chained passes
/// (and inputs other than file scans), as one [`BalansPassExec`] over
/// `CoalescePartitionsExec(input)` (see `balans_operators::exec::pass`).
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
        // BALANS, ComBat, sphering: every per-partition step a stage of tasks; a later pass
        // continues the stages of the passes before it.
        if distributes(&spec) {
            if let Some(plan) = cluster_next_pass(input, spec.clone())? {
                return Ok(Some(plan));
            }
            if spec.pass == 1 {
                return Ok(Some(cluster_pass(input.clone(), vec![spec], None)?));
            }
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
        let plan = DefaultPhysicalPlanner::with_extension_planners(vec![
            Arc::new(BalansExtensionPlanner),
            Arc::new(EvaluateExtensionPlanner),
            Arc::new(PreprocessExtensionPlanner),
            Arc::new(EmbedExtensionPlanner),
        ])
        .create_physical_plan(logical_plan, session)
        .await?;
        if plans_for_cluster(session) {
            // After the optimizer, which would remove the stage boundaries above global steps.
            return Ok(finish_cluster_plan(plan)?);
        }
        Ok(plan)
    }
}
