//! The metric suite as an operator: [`EvaluateExec`] collects its input (in the canonical
//! layout of [`CanonicalRows`]), runs the suite of [`balans_metrics`] on a blocking thread and
//! emits one row per score (`metric`, `kind`, `value`), as `balans evaluate` prints them. The
//! logical node that plans it is `balans_planner::evaluate::EvaluateNode`.

use std::fmt;
use std::sync::{Arc, LazyLock};

use balans_metrics::suite::{EvalInput, EvalOptions, MetricSelection, evaluate};
use balans_metrics::types::Codes;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float64Array, RecordBatch, StringArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef};
use datafusion::common::exec_datafusion_err;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, Distribution, ExecutionPlan, PlanProperties,
};
use futures::TryStreamExt;

use crate::exec::common::{plan_properties, single_child};

/// What the suite computes: the embedding width, the optional columns and the options that
/// `evaluate(...)` accepts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, serde::Serialize, serde::Deserialize)]
pub struct EvaluateSpec {
    /// Embedding columns `f0..f{d-1}`.
    pub d: usize,
    /// Whether `__plate` is present.
    pub has_plate: bool,
    /// Whether `__well` is present.
    pub has_well: bool,
    /// Seed of the suite.
    pub seed: u64,
    /// Metric families left out (silhouette, graph, kbet, lisi, map, classifier).
    pub skip: Vec<String>,
    /// Evaluate the clustering and mixing metrics on at most this many cells.
    pub subsample: Option<usize>,
}

/// The metric families `skip => '...'` may name.
pub const METRIC_FAMILIES: &[&str] = &["silhouette", "graph", "kbet", "lisi", "map", "classifier"];

impl EvaluateSpec {
    /// The suite's options.
    pub fn options(&self) -> EvalOptions {
        let mut metrics = MetricSelection::default();
        for family in &self.skip {
            match family.as_str() {
                "silhouette" => metrics.silhouette = false,
                "graph" => metrics.graph = false,
                "kbet" => metrics.kbet = false,
                "lisi" => metrics.lisi = false,
                "map" => metrics.map = false,
                _ => metrics.classifier = false,
            }
        }
        EvalOptions {
            seed: self.seed,
            subsample: self.subsample,
            metrics,
            ..EvalOptions::default()
        }
    }
}

/// The score table's schema: `metric`, `kind` (text) and `value` (float64, null when a
/// metric is undefined).
pub static SCORE_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("metric", DataType::Utf8, false),
        Field::new("kind", DataType::Utf8, false),
        Field::new("value", DataType::Float64, true),
    ]))
});

/// How `EXPLAIN` shows an evaluation.
pub fn describe(spec: &EvaluateSpec) -> String {
    format!(
        "dims={}, plate={}, well={}, seed={}, skip=[{}]",
        spec.d,
        spec.has_plate,
        spec.has_well,
        spec.seed,
        spec.skip.join(", ")
    )
}

/// An embedding collected from batches in the canonical layout (`f0..f{d-1}` as float64,
/// `__batch`, `__label`, `__plate`, `__well` as text, `__negcon` as boolean; the projection
/// is `balans_planner::evaluate::canonical_columns`).
#[derive(Debug, Default)]
pub struct CanonicalRows {
    /// Row-major embedding.
    pub x: Vec<f64>,
    /// Batch key of each row.
    pub batch: Vec<String>,
    /// Label of each row.
    pub label: Vec<String>,
    /// Plate of each row (empty without `__plate`).
    pub plate: Vec<String>,
    /// Well of each row (empty without `__well`).
    pub well: Vec<String>,
    /// Negative-control flags.
    pub is_negcon: Vec<bool>,
}

impl CanonicalRows {
    /// Appends one batch of `d` embedding columns (with `__plate` / `__well` when present).
    pub fn push(
        &mut self,
        batch: &arrow::array::RecordBatch,
        d: usize,
    ) -> datafusion::error::Result<()> {
        let rows = batch.num_rows();
        let start = self.x.len();
        self.x.resize(start + rows * d, 0.0);
        for j in 0..d {
            let column = batch.column(j).as_primitive::<Float64Type>();
            for i in 0..rows {
                self.x[start + i * d + j] = if column.is_null(i) {
                    f64::NAN
                } else {
                    column.value(i)
                };
            }
        }
        for (name, out) in [
            ("__batch", &mut self.batch),
            ("__label", &mut self.label),
            ("__plate", &mut self.plate),
            ("__well", &mut self.well),
        ] {
            if let Some(column) = batch.column_by_name(name) {
                let column = column.as_string::<i32>();
                out.extend((0..rows).map(|i| column.value(i).to_string()));
            }
        }
        let flags: &BooleanArray = batch
            .column_by_name("__negcon")
            .ok_or_else(|| {
                datafusion::error::DataFusionError::Internal("no __negcon column".into())
            })?
            .as_boolean();
        self.is_negcon
            .extend((0..rows).map(|i| flags.is_valid(i) && flags.value(i)));
        Ok(())
    }
}

/// Collects the input, runs the metric suite, emits one row per score.
#[derive(Debug)]
pub struct EvaluateExec {
    input: Arc<dyn ExecutionPlan>,
    spec: EvaluateSpec,
    properties: Arc<PlanProperties>,
}

impl EvaluateExec {
    /// The operator over `input` (canonical layout).
    pub fn new(input: Arc<dyn ExecutionPlan>, spec: EvaluateSpec) -> Self {
        let properties = plan_properties(SCORE_SCHEMA.clone(), 1);
        Self {
            input,
            spec,
            properties,
        }
    }

    /// What the suite computes.
    pub fn spec(&self) -> &EvaluateSpec {
        &self.spec
    }
}

impl DisplayAs for EvaluateExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "EvaluateExec: {}", describe(&self.spec))
    }
}

impl ExecutionPlan for EvaluateExec {
    fn name(&self) -> &str {
        "EvaluateExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn required_input_distribution(&self) -> Vec<Distribution> {
        vec![Distribution::SinglePartition]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    crate::no_physical_expressions!();

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(Self::new(
            single_child("EvaluateExec", children)?,
            self.spec.clone(),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "EvaluateExec has one partition, not {partition}"
            )));
        }
        let input = self.input.execute(0, context)?;
        let spec = self.spec.clone();
        let scores = async move {
            let batches: Vec<RecordBatch> = input.try_collect().await?;
            tokio::task::spawn_blocking(move || score_table(&spec, &batches))
                .await
                .map_err(|e| exec_datafusion_err!("the evaluation stopped: {e}"))?
        };
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            SCORE_SCHEMA.clone(),
            futures::stream::once(scores),
        )))
    }
}

/// The suite over the canonical columns of `batches`, as the score table.
fn score_table(spec: &EvaluateSpec, batches: &[RecordBatch]) -> Result<RecordBatch> {
    let d = spec.d;
    let mut rows = CanonicalRows::default();
    for b in batches {
        rows.push(b, d)?;
    }
    let CanonicalRows {
        x,
        batch,
        label,
        plate,
        well,
        is_negcon,
    } = rows;
    if is_negcon.is_empty() {
        return Err(exec_datafusion_err!("evaluate: the input has no rows"));
    }
    let (batch, label) = (Codes::from_strings(&batch), Codes::from_strings(&label));
    let plate = spec.has_plate.then(|| Codes::from_strings(&plate));
    let well = spec.has_well.then(|| Codes::from_strings(&well));
    let input = EvalInput {
        x: &x,
        d,
        batch: &batch,
        label: &label,
        is_negcon: &is_negcon,
        plate: plate.as_ref(),
        well: well.as_ref(),
    };
    let report = evaluate(&input, &spec.options(), &|_| {})
        .map_err(|e| exec_datafusion_err!("evaluate: {e}"))?;
    let rows = report.scores.rows();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
        Arc::new(Float64Array::from(
            rows.iter().map(|r| r.2).collect::<Vec<_>>(),
        )),
    ];
    Ok(RecordBatch::try_new(SCORE_SCHEMA.clone(), columns)?)
}
