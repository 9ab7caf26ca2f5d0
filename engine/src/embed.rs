//! The model-embedding step: a learned model ([`balans_learned`]) applied to a table as a
//! streaming operator. [`EmbedNode`] (logical, shown in `EXPLAIN`) and [`EmbedExec`]
//! (physical) map every input batch to its embedding as it arrives, partition by partition,
//! so memory holds one batch at a time.
//!
//! The output keeps the input's metadata columns (every column that is neither one of the
//! model's features nor another numeric non-`Metadata_` column) in input order, followed by
//! `E1..Ek` (`Float32`). The model's features are found by name; a table that lacks any of
//! them is a planning error listing them. A model with a source token (CellPainTR) reads each
//! row's source from the batch column it was trained with; a source it has not seen, or a
//! table without that column, gets the unknown-source token (the documented fallback).

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use balans_learned::Embedder;
use datafusion::arrow::array::{Array, ArrayRef, AsArray, Float32Array, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Float32Type, Schema, SchemaRef};
use datafusion::catalog::Session;
use datafusion::common::{DFSchema, DFSchemaRef, plan_datafusion_err};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext;
use datafusion::logical_expr::{
    Expr, Extension, LogicalPlan, UserDefinedLogicalNode, UserDefinedLogicalNodeCore,
};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use datafusion::physical_planner::{ExtensionPlanner, PhysicalPlanner};
use futures::StreamExt;

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
struct Layout {
    features: Vec<usize>,
    keep: Vec<usize>,
    /// The source (batch) column, for models with a source token.
    source: Option<usize>,
}

fn layout(schema: &Schema, model: &Embedder) -> Result<Layout> {
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

fn output_schema(input: &Schema, layout: &Layout, width: usize) -> SchemaRef {
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

fn describe(dir: &Path, model: &Embedder) -> String {
    format!(
        "model={} ({}), features={}, width={}",
        dir.display(),
        model.card.architecture.name(),
        model.features().len(),
        model.width()
    )
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

    fn with_exprs_and_inputs(
        &self,
        exprs: Vec<Expr>,
        mut inputs: Vec<LogicalPlan>,
    ) -> Result<Self> {
        if !exprs.is_empty() || inputs.len() != 1 {
            return Err(DataFusionError::Internal(
                "Embed takes one input and no expressions".into(),
            ));
        }
        Self::try_new(inputs.swap_remove(0), &self.model_dir)
    }
}

/// The embedding plan over `input`.
pub fn embed_plan(input: LogicalPlan, model_dir: &Path) -> Result<LogicalPlan> {
    Ok(LogicalPlan::Extension(Extension {
        node: Arc::new(EmbedNode::try_new(input, model_dir)?),
    }))
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
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            input.properties().partitioning.clone(),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Ok(Self {
            input,
            model_dir,
            model,
            layout,
            schema,
            properties,
        })
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

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(
            &Arc<dyn PhysicalExpr>,
        ) -> Result<datafusion::common::tree_node::TreeNodeRecursion>,
    ) -> Result<datafusion::common::tree_node::TreeNodeRecursion> {
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return Err(DataFusionError::Internal(
                "EmbedExec takes one child".into(),
            ));
        }
        Ok(Arc::new(Self::try_new(
            children.swap_remove(0),
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
        _session: &dyn Session,
        _planning_ctx: &PhysicalPlanningContext,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        let Some(node) = node.as_any().downcast_ref::<EmbedNode>() else {
            return Ok(None);
        };
        let input = physical_inputs
            .first()
            .ok_or_else(|| DataFusionError::Internal("Embed without input".into()))?;
        Ok(Some(Arc::new(EmbedExec::try_new(
            input.clone(),
            node.model_dir.clone(),
            node.model.clone(),
        )?)))
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

/// SQL's `embed(v, 'model_dir/')`: a packed vector (`pack_features(...)` with the model's
/// features in the model's order) to its embedding, a `FixedSizeList<Float32, k>`; null
/// vectors give null. Batches are embedded as they stream, partition by partition.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct EmbedFunction {
    signature: datafusion::logical_expr::Signature,
}

impl Default for EmbedFunction {
    fn default() -> Self {
        Self {
            signature: datafusion::logical_expr::Signature::any(
                2,
                datafusion::logical_expr::Volatility::Immutable,
            ),
        }
    }
}

fn model_argument(value: Option<&datafusion::scalar::ScalarValue>) -> Result<PathBuf> {
    use datafusion::scalar::ScalarValue;
    match value {
        Some(ScalarValue::Utf8(Some(s)))
        | Some(ScalarValue::LargeUtf8(Some(s)))
        | Some(ScalarValue::Utf8View(Some(s))) => Ok(PathBuf::from(s)),
        _ => Err(plan_datafusion_err!(
            "embed(v, 'model_dir/'): the model directory must be a string literal"
        )),
    }
}

impl datafusion::logical_expr::ScalarUDFImpl for EmbedFunction {
    fn name(&self) -> &str {
        "embed"
    }

    fn signature(&self) -> &datafusion::logical_expr::Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Err(plan_datafusion_err!(
            "embed: the type comes from return_field_from_args"
        ))
    }

    fn return_field_from_args(
        &self,
        args: datafusion::logical_expr::ReturnFieldArgs,
    ) -> Result<datafusion::arrow::datatypes::FieldRef> {
        let dir = model_argument(args.scalar_arguments[1])?;
        let model = load_model(&dir)?;
        match args.arg_fields[0].data_type() {
            DataType::FixedSizeList(_, n) if *n as usize == model.features().len() => {}
            DataType::FixedSizeList(_, n) => {
                return Err(plan_datafusion_err!(
                    "embed: the vector has {n} values but the model takes {} features \
                     (pack them in the model's order: {}, ...)",
                    model.features().len(),
                    model
                        .features()
                        .iter()
                        .take(3)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            other => {
                return Err(plan_datafusion_err!(
                    "embed takes a packed vector (pack_features(...)), got {other}"
                ));
            }
        }
        Ok(Arc::new(Field::new(
            self.name(),
            DataType::FixedSizeList(
                Arc::new(Field::new("item", DataType::Float32, true)),
                model.width() as i32,
            ),
            true,
        )))
    }

    fn invoke_with_args(
        &self,
        args: datafusion::logical_expr::ScalarFunctionArgs,
    ) -> Result<datafusion::logical_expr::ColumnarValue> {
        use datafusion::arrow::array::FixedSizeListArray;
        use datafusion::arrow::buffer::NullBuffer;
        let rows = args.number_rows;
        let dir = match &args.args[1] {
            datafusion::logical_expr::ColumnarValue::Scalar(s) => model_argument(Some(s))?,
            _ => {
                return Err(plan_datafusion_err!(
                    "embed(v, 'model_dir/'): the model directory must be a string literal"
                ));
            }
        };
        let model = load_model(&dir)?;
        let vectors = args.args[0].to_array(rows)?;
        let vectors = vectors.as_fixed_size_list();
        let d = vectors.value_length() as usize;
        let flat = cast(vectors.values(), &DataType::Float32)?;
        let flat = flat.as_primitive::<Float32Type>();
        let offset = vectors.offset();
        let valid: Vec<usize> = (0..rows).filter(|&i| vectors.is_valid(i)).collect();
        let mut x = Vec::with_capacity(valid.len() * d);
        for &i in &valid {
            for j in 0..d {
                let at = (offset + i) * d + j;
                if flat.is_null(at) {
                    return Err(DataFusionError::Execution(format!(
                        "embed: value {} of a vector is null; impute or drop it first",
                        j + 1
                    )));
                }
                x.push(flat.value(at));
            }
        }
        let embedded = model
            .embed(&x, None)
            .map_err(|e| DataFusionError::Execution(format!("embed: {e}")))?;
        let k = model.width();
        let mut values = vec![0f32; rows * k];
        for (r, &i) in valid.iter().enumerate() {
            values[i * k..(i + 1) * k].copy_from_slice(&embedded[r * k..(r + 1) * k]);
        }
        let nulls = NullBuffer::from((0..rows).map(|i| vectors.is_valid(i)).collect::<Vec<_>>());
        let array = FixedSizeListArray::try_new(
            Arc::new(Field::new("item", DataType::Float32, true)),
            k as i32,
            Arc::new(Float32Array::from(values)),
            Some(nulls),
        )?;
        Ok(datafusion::logical_expr::ColumnarValue::Array(Arc::new(
            array,
        )))
    }
}
