//! A table computed while the query was planned, streamed at execution:
//! [`PreprocessExec`] over a [`PlannedTable`]. `preprocess((SELECT ...), ...)` decides its
//! output columns from the data, so its job runs while planning (in the engine) and leaves
//! its result in working files; this operator streams them, any number of times.

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::plan_datafusion_err;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::execution_plan::EmissionType;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};

use crate::exec::common::{bounded_properties, no_children};

/// A finished table that can be streamed any number of times (a preprocess run's working
/// files). Errors are the producer's own; the operator prefixes them with `preprocess:`.
pub trait PlannedTable: fmt::Debug + Send + Sync {
    /// The table's schema.
    fn schema(&self) -> Result<SchemaRef, Box<dyn std::error::Error + Send + Sync>>;
    /// A new stream over the table's rows, in order.
    fn stream(&self)
    -> Result<SendableRecordBatchStream, Box<dyn std::error::Error + Send + Sync>>;
}

/// Streams a preprocessed table from its working files.
#[derive(Debug)]
pub struct PreprocessExec {
    result: Arc<dyn PlannedTable>,
    description: String,
    properties: Arc<PlanProperties>,
}

impl PreprocessExec {
    /// The operator over a finished run.
    pub fn try_new(result: Arc<dyn PlannedTable>, description: String) -> Result<Self> {
        let schema: SchemaRef = result
            .schema()
            .map_err(|e| plan_datafusion_err!("preprocess: {e}"))?;
        let properties = bounded_properties(
            schema,
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
        );
        Ok(Self {
            result,
            description,
            properties,
        })
    }
}

impl DisplayAs for PreprocessExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "PreprocessExec: {}", self.description)
    }
}

impl ExecutionPlan for PreprocessExec {
    fn name(&self) -> &str {
        "PreprocessExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    crate::no_physical_expressions!();

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        no_children("PreprocessExec", &children)?;
        Ok(self)
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "PreprocessExec has one partition, not {partition}"
            )));
        }
        self.result
            .stream()
            .map_err(|e| DataFusionError::Execution(format!("preprocess: {e}")))
    }
}
