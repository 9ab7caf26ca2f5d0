//! `BalansPassExec`: a whole correction (one or more chained passes) as one operator with one
//! output partition — the shape a correction takes in a cluster plan.
//!
//! On one machine a pass is a chain of operators that share the pass's spool through a
//! [`PassContext`](crate::exec::context::PassContext) (see [`crate::exec::plan`]). A
//! distributed scheduler (Ballista) cuts a plan into stages at every `CoalescePartitionsExec`
//! and may run the stages on different machines, where the spool of the stage below is not
//! there. This operator keeps the chain out of the scheduler's sight: it is planned over
//! `CoalescePartitionsExec(input)` (so the stage below it reads and shuffles the input with
//! all the cluster's executors), and when executed it plans the usual chain
//! ([`correction_node`] per pass) over the coalesced input's own partitions and runs it in
//! this task, with this machine's cores. The output is the same bytes as the single-process
//! plan: the chain is the same and its output does not depend on the partition count.

use std::fmt;
use std::sync::Arc;

use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, Distribution, ExecutionPlan, ExecutionPlanProperties,
    PlanProperties,
};

use crate::error::{OperatorError, Result};
use crate::exec::common::{below_coalesce, plan_properties, single_child};
use crate::exec::concat::OrderedConcatExec;
use crate::exec::plan::correction_node;
use crate::exec::spec::{BalansSpec, balans_output_schema};

/// Every pass of a correction as one single-partition operator (see the module docs).
#[derive(Debug)]
pub struct BalansPassExec {
    input: Arc<dyn ExecutionPlan>,
    specs: Vec<BalansSpec>,
    cache: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl BalansPassExec {
    /// The passes `specs` (consecutive, first pass first) over `input`. `input` should have
    /// one partition; the planner gives it `CoalescePartitionsExec(input)`, whose own input's
    /// partitions the passes then read.
    pub fn try_new(input: Arc<dyn ExecutionPlan>, specs: Vec<BalansSpec>) -> Result<Self> {
        let Some(first) = specs.first() else {
            return Err(OperatorError::InvalidParameter(
                "a correction needs at least one pass".into(),
            ));
        };
        let mut schema = input.schema();
        for (pass, spec) in (first.pass..).zip(&specs) {
            if spec.pass != pass {
                return Err(OperatorError::InvalidParameter(format!(
                    "the passes of a correction must be consecutive: expected pass {pass}, got {}",
                    spec.pass
                )));
            }
            schema = balans_output_schema(&schema, spec)?;
        }
        Ok(Self {
            cache: plan_properties(schema, 1),
            input,
            specs,
            metrics: ExecutionPlanMetricsSet::new(),
        })
    }

    /// The passes, first pass first.
    pub fn specs(&self) -> &[BalansSpec] {
        &self.specs
    }

    /// The operator's input (normally a `CoalescePartitionsExec`).
    pub fn input(&self) -> &Arc<dyn ExecutionPlan> {
        &self.input
    }

    /// This correction followed by the pass `next` (the planner merges chained passes).
    pub fn with_next_pass(&self, next: BalansSpec) -> Result<Self> {
        let mut specs = self.specs.clone();
        specs.push(next);
        Self::try_new(self.input.clone(), specs)
    }

    /// The partitions the passes read: the coalesced input's own input when there is one.
    fn source(&self) -> Arc<dyn ExecutionPlan> {
        below_coalesce(&self.input).clone()
    }

    /// The single-process chain of every pass over `source`, as one partition.
    fn chain(&self) -> Result<Arc<dyn ExecutionPlan>> {
        let mut plan = self.source();
        for spec in &self.specs {
            plan = correction_node(plan, spec.clone())?;
        }
        if plan.output_partitioning().partition_count() != 1 {
            plan = Arc::new(OrderedConcatExec::new(plan));
        }
        Ok(plan)
    }
}

impl DisplayAs for BalansPassExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let first = &self.specs[0];
        let passes = format!(
            "{}..{}",
            first.pass,
            first.pass + self.specs.len().saturating_sub(1)
        );
        match t {
            DisplayFormatType::TreeRender => write!(f, "passes={passes}"),
            _ => write!(
                f,
                "BalansPassExec: passes={passes}, features={}, batch=[{}], {}",
                first.features.len(),
                first.batch.join(", "),
                first.config.describe()
            ),
        }
    }
}

impl ExecutionPlan for BalansPassExec {
    fn name(&self) -> &str {
        "BalansPassExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.cache
    }

    fn required_input_distribution(&self) -> Vec<Distribution> {
        vec![Distribution::SinglePartition]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    crate::no_physical_expressions!();

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        let input = single_child("BalansPassExec", children)?;
        Ok(Arc::new(Self::try_new(input, self.specs.clone())?))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DFResult<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "BalansPassExec has one partition, got {partition}"
            )));
        }
        self.chain()?.execute(0, context)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BalansConfig, Method};
    use crate::progress::NoProgress;
    use datafusion::arrow::array::{Float64Array, RecordBatch, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::util::pretty::pretty_format_batches;
    use datafusion::datasource::memory::MemorySourceConfig;
    use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;
    use datafusion::physical_plan::collect;
    use datafusion::prelude::SessionContext;

    fn input(parts: usize) -> Arc<dyn ExecutionPlan> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("Metadata_Batch", DataType::Utf8, false),
            Field::new("a", DataType::Float64, false),
            Field::new("b", DataType::Float64, false),
        ]));
        let rows = 120;
        let per = rows / parts;
        let partitions: Vec<Vec<RecordBatch>> = (0..parts)
            .map(|p| {
                let range = p * per..(p + 1) * per;
                let batch: Vec<String> = range.clone().map(|i| format!("b{}", i % 3)).collect();
                let a: Vec<f64> = range
                    .clone()
                    .map(|i| (i as f64 * 0.37).sin() + (i % 3) as f64)
                    .collect();
                let b: Vec<f64> = range.map(|i| (i as f64 * 0.11).cos()).collect();
                vec![
                    RecordBatch::try_new(
                        schema.clone(),
                        vec![
                            Arc::new(StringArray::from(batch)),
                            Arc::new(Float64Array::from(a)),
                            Arc::new(Float64Array::from(b)),
                        ],
                    )
                    .unwrap(),
                ]
            })
            .collect();
        MemorySourceConfig::try_new_exec(&partitions, schema, None).unwrap()
    }

    fn spec(method: Method, pass: usize) -> BalansSpec {
        let config = BalansConfig {
            method,
            k: 5,
            ..BalansConfig::default()
        };
        let mut spec = BalansSpec::new(
            vec!["a".into(), "b".into()],
            vec!["Metadata_Batch".into()],
            config,
            Arc::new(NoProgress),
        );
        spec.pass = pass;
        spec
    }

    async fn run(plan: Arc<dyn ExecutionPlan>) -> String {
        let out = collect(plan, SessionContext::new().task_ctx())
            .await
            .unwrap();
        pretty_format_batches(&out).unwrap().to_string()
    }

    #[tokio::test]
    async fn gives_the_chains_output_as_one_partition() {
        for method in [Method::Balans, Method::ComBat] {
            let passes: Vec<BalansSpec> = (1..=spec(method, 1).config.passes())
                .map(|p| spec(method, p))
                .collect();
            let mut chain = input(3);
            for s in &passes {
                chain = correction_node(chain, s.clone()).unwrap();
            }
            let expected = run(chain).await;
            let mut merged = BalansPassExec::try_new(
                Arc::new(CoalescePartitionsExec::new(input(3))),
                vec![passes[0].clone()],
            )
            .unwrap();
            for s in &passes[1..] {
                merged = merged.with_next_pass(s.clone()).unwrap();
            }
            assert_eq!(merged.properties().partitioning.partition_count(), 1);
            assert!(merged.source().output_partitioning().partition_count() == 3);
            assert_eq!(run(Arc::new(merged)).await, expected, "{method}");
        }
    }

    #[test]
    fn rejects_passes_out_of_order() {
        let err = BalansPassExec::try_new(input(1), vec![spec(Method::Balans, 2)])
            .and_then(|p| p.with_next_pass(spec(Method::Balans, 1)))
            .unwrap_err();
        assert!(err.to_string().contains("consecutive"), "{err}");
        assert!(BalansPassExec::try_new(input(1), vec![]).is_err());
    }
}
