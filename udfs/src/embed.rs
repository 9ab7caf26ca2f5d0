//! `embed(v, 'model_dir/')`: a learned model applied to packed feature vectors.

use std::path::PathBuf;
use std::sync::Arc;

use balans_operators::exec::embed::load_model;
use datafusion::arrow::array::{Array, AsArray, Float32Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Float32Type};
use datafusion::common::plan_datafusion_err;
use datafusion::error::{DataFusionError, Result};

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
