//! The model-embedding operator: a learned model ([`balans_learned`]) applied to every batch
//! of every input partition as it arrives, so memory holds one batch at a time. The logical
//! node that plans it is `balans_planner::embed::EmbedNode`.
//!
//! The output keeps the input's metadata columns (every column that is neither one of the
//! model's features nor another numeric non-`Metadata_` column) in input order, followed by
//! `E1..Ek` (`Float32`). The model's features are found by name; a table that lacks any of
//! them is a planning error listing them. A model with a source token (CellPainTR) reads each
//! row's source from the batch column it was trained with; a source it has not seen, or a
//! table without that column, gets the unknown-source token (the documented fallback).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use balans_learned::Embedder;
use datafusion::arrow::array::{Array, ArrayRef, AsArray, Float32Array, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Float32Type, Schema, SchemaRef};
use datafusion::common::plan_datafusion_err;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::execution_plan::EmissionType;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::StreamExt;

use crate::exec::common::{bounded_properties, single_child};

/// When a model directory's files were last written, and their sizes.
type Stamp = Vec<(Option<std::time::SystemTime>, u64)>;

/// Loaded models by directory, so a statement or a session loads each model once.
static MODELS: Mutex<Vec<(PathBuf, Stamp, Arc<Embedder>)>> = Mutex::new(Vec::new());

fn stamp(dir: &Path) -> Stamp {
    use balans_learned::store::{CARD_FILE, WEIGHTS_FILE};
    [CARD_FILE, WEIGHTS_FILE]
        .iter()
        .map(|f| match std::fs::metadata(dir.join(f)) {
            Ok(m) => (m.modified().ok(), m.len()),
            Err(_) => (None, 0),
        })
        .collect()
}

/// Loads (or reuses) the model in `dir`. The files are read again only when they changed
/// (a model retrained into the same directory), not for every batch `embed(...)` sees.
pub fn load_model(dir: &Path) -> Result<Arc<Embedder>> {
    let key = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let current = stamp(dir);
    let mut models = MODELS.lock().expect("model cache");
    if let Some((_, _, cached)) = models.iter().find(|(k, s, _)| *k == key && *s == current) {
        return Ok(cached.clone());
    }
    let model = Arc::new(Embedder::load(dir).map_err(|e| plan_datafusion_err!("embed: {e}"))?);
    models.retain(|(k, _, _)| *k != key);
    models.push((key, current, model.clone()));
    Ok(model)
}

/// Names of the embedding columns, `E1..Ek`.
pub fn embedding_columns(width: usize) -> Vec<String> {
    (1..=width).map(|i| format!("E{i}")).collect()
}

/// Where the model's features and the kept metadata are in an input schema.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd)]
pub struct Layout {
    features: Vec<usize>,
    keep: Vec<usize>,
    /// The source (batch) column, for models with a source token.
    source: Option<usize>,
}

/// Finds the model's features, the kept metadata columns and the source column in `schema`.
pub fn layout(schema: &Schema, model: &Embedder) -> Result<Layout> {
    let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    let features = model
        .match_features(&names)
        .map_err(|e| plan_datafusion_err!("embed: {e}"))?;
    for &i in &features {
        let field = schema.field(i);
        if !(field.data_type().is_numeric()) {
            return Err(plan_datafusion_err!(
                "embed: feature '{}' is {}, not numeric",
                field.name(),
                field.data_type()
            ));
        }
    }
    let keep = (0..names.len())
        .filter(|i| {
            let field = schema.field(*i);
            !features.contains(i)
                && (field.name().starts_with("Metadata_") || !field.data_type().is_numeric())
        })
        .collect();
    let source = model
        .uses_sources()
        .then(|| schema.index_of(&model.card.batch_column).ok())
        .flatten();
    Ok(Layout {
        features,
        keep,
        source,
    })
}

/// The operator's output schema: kept metadata columns, then `E1..Ek`.
pub fn output_schema(input: &Schema, layout: &Layout, width: usize) -> SchemaRef {
    let mut fields: Vec<Field> = layout
        .keep
        .iter()
        .map(|&i| input.field(i).clone())
        .collect();
    fields.extend(
        embedding_columns(width)
            .into_iter()
            .map(|name| Field::new(name, DataType::Float32, false)),
    );
    Arc::new(Schema::new(fields))
}

/// How `EXPLAIN` names a model: directory, architecture, feature count and width.
pub fn describe(dir: &Path, model: &Embedder) -> String {
    format!(
        "model={} ({}), features={}, width={}",
        dir.display(),
        model.card.architecture.name(),
        model.features().len(),
        model.width()
    )
}

/// Applies a model to every batch of every input partition.
#[derive(Debug)]
pub struct EmbedExec {
    input: Arc<dyn ExecutionPlan>,
    model_dir: PathBuf,
    model: Arc<Embedder>,
    layout: Layout,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
}

impl EmbedExec {
    /// The operator over `input` with a loaded model.
    pub fn try_new(
        input: Arc<dyn ExecutionPlan>,
        model_dir: PathBuf,
        model: Arc<Embedder>,
    ) -> Result<Self> {
        let layout = layout(&input.schema(), &model)?;
        let schema = output_schema(&input.schema(), &layout, model.width());
        let properties = bounded_properties(
            schema.clone(),
            input.properties().partitioning.clone(),
            EmissionType::Incremental,
        );
        Ok(Self {
            input,
            model_dir,
            model,
            layout,
            schema,
            properties,
        })
    }

    /// The model directory (every process that runs the operator reads the model there).
    pub fn model_dir(&self) -> &Path {
        &self.model_dir
    }
}

impl DisplayAs for EmbedExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "EmbedExec: {}", describe(&self.model_dir, &self.model))
    }
}

/// One batch's embedding.
fn embed_batch(
    batch: &RecordBatch,
    model: &Embedder,
    layout: &Layout,
    schema: &SchemaRef,
) -> Result<RecordBatch> {
    let n = batch.num_rows();
    let d = layout.features.len();
    let mut x = vec![0f32; n * d];
    for (j, &c) in layout.features.iter().enumerate() {
        let column = cast(batch.column(c), &DataType::Float32)?;
        let values = column.as_primitive::<Float32Type>();
        for i in 0..n {
            if values.is_null(i) {
                return Err(DataFusionError::Execution(format!(
                    "embed: feature '{}' is null in a row; impute or drop it first",
                    batch.schema().field(c).name()
                )));
            }
            x[i * d + j] = values.value(i);
        }
    }
    let sources: Option<Vec<String>> = match layout.source {
        Some(c) => {
            let text = cast(batch.column(c), &DataType::Utf8)?;
            let text = text.as_string::<i32>();
            Some(
                (0..n)
                    .map(|i| {
                        if text.is_null(i) {
                            String::new()
                        } else {
                            text.value(i).to_string()
                        }
                    })
                    .collect(),
            )
        }
        None => None,
    };
    let e = model
        .embed(&x, sources.as_deref())
        .map_err(|e| DataFusionError::Execution(format!("embed: {e}")))?;
    let k = model.width();
    let mut columns: Vec<ArrayRef> = layout
        .keep
        .iter()
        .map(|&i| batch.column(i).clone())
        .collect();
    for j in 0..k {
        columns.push(Arc::new(Float32Array::from_iter_values(
            (0..n).map(|i| e[i * k + j]),
        )));
    }
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

impl ExecutionPlan for EmbedExec {
    fn name(&self) -> &str {
        "EmbedExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    crate::no_physical_expressions!();

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(Self::try_new(
            single_child("EmbedExec", children)?,
            self.model_dir.clone(),
            self.model.clone(),
        )?))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        let (model, layout, schema) =
            (self.model.clone(), self.layout.clone(), self.schema.clone());
        let stream = input.map(move |batch| embed_batch(&batch?, &model, &layout, &schema));
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            self.schema.clone(),
            stream,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_columns_are_numbered_from_one() {
        assert_eq!(embedding_columns(3), vec!["E1", "E2", "E3"]);
    }
}
