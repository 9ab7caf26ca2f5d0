//! `OrderedConcatExec`: the partitions of its input, one after another, as one partition.
//!
//! A correction keeps the input's row order: partition 0's rows, then partition 1's, and so
//! on. Every input partition is started at once (so they compute concurrently, each up to its
//! own bounded buffer) and drained in order.

use std::fmt;
use std::sync::Arc;

use datafusion::error::Result as DFResult;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::ExecutionPlanProperties;
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::StreamExt;

use crate::exec::common::{plan_properties, single_child};

/// Concatenates its input's partitions in order (see the module docs).
#[derive(Debug)]
pub struct OrderedConcatExec {
    input: Arc<dyn ExecutionPlan>,
    cache: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl OrderedConcatExec {
    /// One partition holding `input`'s partitions in order.
    pub fn new(input: Arc<dyn ExecutionPlan>) -> Self {
        Self {
            cache: plan_properties(input.schema(), 1),
            input,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }
}

impl DisplayAs for OrderedConcatExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let n = self.input.output_partitioning().partition_count();
        match t {
            DisplayFormatType::TreeRender => write!(f, "partitions={n}"),
            _ => write!(f, "OrderedConcatExec: partitions={n} in order"),
        }
    }
}

impl ExecutionPlan for OrderedConcatExec {
    fn name(&self) -> &str {
        "OrderedConcatExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.cache
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    crate::no_physical_expressions!();

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(Self::new(single_child(
            "OrderedConcatExec",
            children,
        )?)))
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
            return Err(datafusion::error::DataFusionError::Internal(format!(
                "OrderedConcatExec has one partition, got {partition}"
            )));
        }
        let n = self.input.output_partitioning().partition_count();
        let streams = (0..n)
            .map(|i| self.input.execute(i, context.clone()))
            .collect::<DFResult<Vec<_>>>()?;
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.input.schema(),
            futures::stream::iter(streams).flatten(),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, RecordBatch};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::datasource::memory::MemorySourceConfig;
    use datafusion::physical_plan::collect;
    use datafusion::prelude::SessionContext;

    #[tokio::test]
    async fn emits_partitions_in_order() {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let part = |a: i64| {
            vec![
                RecordBatch::try_new(
                    schema.clone(),
                    vec![Arc::new(Int64Array::from(vec![a, a + 1]))],
                )
                .unwrap(),
            ]
        };
        let input =
            MemorySourceConfig::try_new_exec(&[part(0), part(10), part(20)], schema, None).unwrap();
        let concat = Arc::new(OrderedConcatExec::new(input));
        let out = collect(concat, SessionContext::new().task_ctx())
            .await
            .unwrap();
        let values: Vec<i64> = out
            .iter()
            .flat_map(|b| {
                b.column(0)
                    .as_any()
                    .downcast_ref::<Int64Array>()
                    .unwrap()
                    .values()
                    .to_vec()
            })
            .collect();
        assert_eq!(values, vec![0, 1, 10, 11, 20, 21]);
    }
}
