//! The model-embedding step in a plan: [`EmbedNode`] (logical, shown in `EXPLAIN` as
//! `Embed: model=..., features=..., width=...`) and its lowering to
//! [`balans_operators::exec::embed::EmbedExec`].

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use balans_learned::Embedder;
use balans_operators::exec::concat::OrderedConcatExec;
use balans_operators::exec::embed::{EmbedExec, describe, layout, load_model, output_schema};
use datafusion::catalog::Session;
use datafusion::common::{DFSchema, DFSchemaRef};
use datafusion::error::Result;
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{
    Expr, Extension, LogicalPlan, UserDefinedLogicalNode, UserDefinedLogicalNodeCore,
};
use datafusion::physical_plan::{ExecutionPlan, ExecutionPlanProperties};
use datafusion::physical_planner::{ExtensionPlanner, PhysicalPlanner};

use crate::inputs::{physical_input, single_input};
use crate::physical::plans_for_cluster;

/// `Embed: model=<dir>, features=<d>, width=<k>` over its input.
#[derive(Debug, Clone)]
pub struct EmbedNode {
    input: LogicalPlan,
    model_dir: PathBuf,
    model: Arc<Embedder>,
    schema: DFSchemaRef,
}

impl EmbedNode {
    /// The node applying the model in `model_dir` to `input`.
    pub fn try_new(input: LogicalPlan, model_dir: &Path) -> Result<Self> {
        let model = load_model(model_dir)?;
        let arrow = input.schema().as_arrow().clone();
        let layout = layout(&arrow, &model)?;
        let out = output_schema(&arrow, &layout, model.width());
        Ok(Self {
            input,
            model_dir: model_dir.to_path_buf(),
            model,
            schema: Arc::new(DFSchema::try_from(out.as_ref().clone())?),
        })
    }

    /// The model directory.
    pub fn model_dir(&self) -> &Path {
        &self.model_dir
    }
}

impl PartialEq for EmbedNode {
    fn eq(&self, other: &Self) -> bool {
        self.input == other.input && self.model_dir == other.model_dir
    }
}

impl Eq for EmbedNode {}

impl Hash for EmbedNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.input.hash(state);
        self.model_dir.hash(state);
    }
}

impl PartialOrd for EmbedNode {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        self.model_dir.partial_cmp(&other.model_dir)
    }
}

impl UserDefinedLogicalNodeCore for EmbedNode {
    fn name(&self) -> &str {
        "Embed"
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
        write!(f, "Embed: {}", describe(&self.model_dir, &self.model))
    }

    fn with_exprs_and_inputs(&self, exprs: Vec<Expr>, inputs: Vec<LogicalPlan>) -> Result<Self> {
        Self::try_new(single_input("Embed", exprs, inputs)?, &self.model_dir)
    }
}

/// The embedding plan over `input`.
pub fn embed_plan(input: LogicalPlan, model_dir: &Path) -> Result<LogicalPlan> {
    Ok(LogicalPlan::Extension(Extension {
        node: Arc::new(EmbedNode::try_new(input, model_dir)?),
    }))
}

/// Plans [`EmbedNode`] as [`EmbedExec`].
#[derive(Debug, Default, Clone, Copy)]
pub struct EmbedExtensionPlanner;

#[async_trait]
impl ExtensionPlanner for EmbedExtensionPlanner {
    async fn plan_extension(
        &self,
        _planner: &dyn PhysicalPlanner,
        node: &dyn UserDefinedLogicalNode,
        _logical_inputs: &[&LogicalPlan],
        physical_inputs: &[Arc<dyn ExecutionPlan>],
        session: &dyn Session,
        _planning_ctx: &PhysicalPlanningContext,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        let Some(node) = node.as_any().downcast_ref::<EmbedNode>() else {
            return Ok(None);
        };
        let input = physical_input("Embed", physical_inputs)?;
        let embed: Arc<dyn ExecutionPlan> = Arc::new(EmbedExec::try_new(
            input.clone(),
            node.model_dir.clone(),
            node.model.clone(),
        )?);
        // The output keeps the input's row order: partition 0's rows, then partition 1's, ...
        // (a cluster's client reads the final stage's partitions in that order itself).
        if embed.output_partitioning().partition_count() > 1 && !plans_for_cluster(session) {
            return Ok(Some(Arc::new(OrderedConcatExec::new(embed))));
        }
        Ok(Some(embed))
    }
}
