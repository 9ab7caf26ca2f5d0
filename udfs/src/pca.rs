//! `pca_fit(v, k)` (aggregate) and `pca_project(v, model, k)` (scalar): PCA in SQL.
//!
//! `pca_fit` accumulates the engine's mergeable Gram state (`kernels::pca::GramAccumulator`:
//! count, shifted sums and shifted Gram matrix in `f64`; partial states with different
//! shifts are re-centred when merged) and returns the model as a struct of `mean`,
//! `components` (row-major `k x d`) and `explained_variance` lists, with the engine's sign rule
//! (largest loading positive). `pca_project(v, (SELECT pca_fit(v, k) FROM t), k)` gives
//! `(v − mean)·Vᵀ` as a `FixedSizeList<Float32, k>`.

use std::sync::Arc;

use balans_operators::kernels::pca::GramAccumulator;
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, FixedSizeListArray, Float32Array, ListArray, StructArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Fields, Float32Type, Float64Type};
use datafusion::common::{Result, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDFImpl, ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs,
    ScalarUDFImpl, Signature, Volatility,
};
use datafusion::physical_expr::expressions::Literal;

fn list_of_f64() -> DataType {
    DataType::List(Arc::new(Field::new("item", DataType::Float64, true)))
}

/// The model's struct fields.
fn model_fields() -> Fields {
    Fields::from(vec![
        Field::new("mean", list_of_f64(), true),
        Field::new("components", list_of_f64(), true),
        Field::new("explained_variance", list_of_f64(), true),
    ])
}

/// A positive component count from a literal argument.
fn component_count(value: Option<&ScalarValue>, function: &str) -> Result<usize> {
    let k = match value {
        Some(v) if !v.is_null() => v.cast_to(&DataType::Int64)?,
        _ => return plan_err!("{function}: the component count must be an integer literal"),
    };
    match k {
        ScalarValue::Int64(Some(k)) if k >= 1 => Ok(k as usize),
        other => plan_err!("{function}: the component count must be at least 1, got {other}"),
    }
}

fn vector_width(t: &DataType, function: &str) -> Result<usize> {
    match t {
        DataType::FixedSizeList(_, n) => Ok(*n as usize),
        other => plan_err!("{function} takes a packed vector (pack_features(...)), got {other}"),
    }
}

/// `pca_fit(v, k)`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct PcaFit {
    signature: Signature,
}

impl PcaFit {
    /// The function.
    pub fn new() -> Self {
        Self {
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

impl Default for PcaFit {
    fn default() -> Self {
        Self::new()
    }
}

impl AggregateUDFImpl for PcaFit {
    fn name(&self) -> &str {
        "pca_fit"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        vector_width(&arg_types[0], "pca_fit")?;
        Ok(DataType::Struct(model_fields()))
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        let d = vector_width(args.expr_fields[0].data_type(), "pca_fit")?;
        let literal = args.exprs[1].downcast_ref::<Literal>().map(|l| l.value());
        let k = component_count(literal, "pca_fit")?;
        Ok(Box::new(PcaFitAccumulator { d, k, state: None }))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        let field = |suffix: &str, t: DataType| {
            Arc::new(Field::new(format!("{}_{suffix}", args.name), t, true))
        };
        Ok(vec![
            field("shift", list_of_f64()),
            field("count", DataType::UInt64),
            field("sum", list_of_f64()),
            field("gram", list_of_f64()),
        ])
    }
}

#[derive(Debug)]
struct PcaFitAccumulator {
    d: usize,
    k: usize,
    state: Option<GramAccumulator>,
}

impl PcaFitAccumulator {
    fn absorb(&mut self, other: GramAccumulator) {
        match &mut self.state {
            Some(state) => state.merge_recentred(&other),
            None => self.state = Some(other),
        }
    }
}

fn f64_list(values: &[f64]) -> ScalarValue {
    ScalarValue::List(ScalarValue::new_list_nullable(
        &values
            .iter()
            .map(|&v| ScalarValue::Float64(Some(v)))
            .collect::<Vec<_>>(),
        &DataType::Float64,
    ))
}

fn list_values(list: &ListArray, row: usize) -> Vec<f64> {
    let values = list.value(row);
    values.as_primitive::<Float64Type>().values().to_vec()
}

impl Accumulator for PcaFitAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let vectors = values[0].as_fixed_size_list();
        let d = self.d;
        let flat = cast(vectors.values(), &DataType::Float32)?;
        let flat = flat.as_primitive::<Float32Type>();
        let mut rows: Vec<f32> = Vec::with_capacity(vectors.len() * d);
        for i in 0..vectors.len() {
            if vectors.is_null(i) {
                continue;
            }
            let at = (vectors.offset() + i) * d;
            let row: Vec<f32> = (at..at + d).map(|k| flat.value(k)).collect();
            if (at..at + d).any(|k| flat.is_null(k)) || row.iter().any(|v| !v.is_finite()) {
                continue;
            }
            rows.extend(row);
        }
        if rows.is_empty() {
            return Ok(());
        }
        let state = self.state.get_or_insert_with(|| {
            GramAccumulator::new(rows[..d].iter().map(|&v| f64::from(v)).collect())
        });
        state.update(&rows);
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let fields = model_fields();
        let Some(state) = self.state.as_ref().filter(|s| s.count() >= 2) else {
            return ScalarValue::try_from(DataType::Struct(fields));
        };
        let model = state.finish(self.k);
        let columns: Vec<ArrayRef> = [&model.mean, &model.components, &model.explained_variance]
            .iter()
            .map(|v| f64_list(v).to_array())
            .collect::<Result<_>>()?;
        Ok(ScalarValue::Struct(Arc::new(StructArray::try_new(
            fields, columns, None,
        )?)))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + GramAccumulator::size_bytes(self.d)
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let (shift, n, sum, gram) = match &self.state {
            Some(s) => s.to_parts(),
            None => (Vec::new(), 0, Vec::new(), Vec::new()),
        };
        Ok(vec![
            f64_list(&shift),
            ScalarValue::UInt64(Some(n)),
            f64_list(&sum),
            f64_list(&gram),
        ])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let (shift, count, sum, gram) = (
            states[0].as_list::<i32>(),
            states[1].as_primitive::<datafusion::arrow::datatypes::UInt64Type>(),
            states[2].as_list::<i32>(),
            states[3].as_list::<i32>(),
        );
        for row in 0..count.len() {
            if count.is_null(row) || count.value(row) == 0 {
                continue;
            }
            let Some(other) = GramAccumulator::from_parts(
                list_values(shift, row),
                count.value(row),
                list_values(sum, row),
                list_values(gram, row),
            ) else {
                return exec_err!("pca_fit: a partial state has inconsistent lengths");
            };
            if other.count() > 0 && list_values(shift, row).len() != self.d {
                return exec_err!("pca_fit: partial states of different widths");
            }
            self.absorb(other);
        }
        Ok(())
    }
}

/// `pca_project(v, model, k)`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct PcaProject {
    signature: Signature,
}

impl PcaProject {
    /// The function.
    pub fn new() -> Self {
        Self {
            signature: Signature::any(3, Volatility::Immutable),
        }
    }
}

impl Default for PcaProject {
    fn default() -> Self {
        Self::new()
    }
}

impl ScalarUDFImpl for PcaProject {
    fn name(&self) -> &str {
        "pca_project"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        plan_err!("pca_project: the type comes from return_field_from_args")
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        vector_width(args.arg_fields[0].data_type(), "pca_project")?;
        if !matches!(args.arg_fields[1].data_type(), DataType::Struct(f) if f == &model_fields()) {
            return plan_err!(
                "pca_project(v, model, k): model must be a pca_fit result, got {}",
                args.arg_fields[1].data_type()
            );
        }
        let k = component_count(args.scalar_arguments[2], "pca_project")?;
        Ok(Arc::new(Field::new(
            self.name(),
            DataType::FixedSizeList(
                Arc::new(Field::new("item", DataType::Float32, true)),
                k as i32,
            ),
            true,
        )))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let DataType::FixedSizeList(_, k) = args.return_field.data_type() else {
            return exec_err!("pca_project: unexpected return type");
        };
        let k = *k as usize;
        let rows = args.number_rows;
        let vectors = args.args[0].to_array(rows)?;
        let vectors = vectors.as_fixed_size_list();
        let d = vectors.value_length() as usize;
        let flat = cast(vectors.values(), &DataType::Float32)?;
        let flat = flat.as_primitive::<Float32Type>();
        let models = args.args[1].to_array(rows)?;
        let models = models.as_struct();
        let (means, components) = (
            models.column(0).as_list::<i32>(),
            models.column(1).as_list::<i32>(),
        );
        let mut out: Vec<Option<f32>> = Vec::with_capacity(rows * k);
        let mut valid = Vec::with_capacity(rows);
        for i in 0..rows {
            let usable = vectors.is_valid(i) && models.is_valid(i) && means.is_valid(i);
            if !usable {
                out.extend(std::iter::repeat_n(None, k));
                valid.push(false);
                continue;
            }
            let mean = means.value(i);
            let mean = mean.as_primitive::<Float64Type>().values();
            let axes = components.value(i);
            let axes = axes.as_primitive::<Float64Type>().values();
            if mean.len() != d {
                return exec_err!(
                    "pca_project: the model was fitted on {} features, the vector has {d}",
                    mean.len()
                );
            }
            if axes.len() < k * d {
                return exec_err!(
                    "pca_project: the model has {} components, {k} asked for",
                    axes.len() / d.max(1)
                );
            }
            let at = (vectors.offset() + i) * d;
            for c in 0..k {
                let mut acc = 0.0f64;
                for j in 0..d {
                    acc += (f64::from(flat.value(at + j)) - mean[j]) * axes[c * d + j];
                }
                out.push(Some(acc as f32));
            }
            valid.push(true);
        }
        let field = Arc::new(Field::new("item", DataType::Float32, true));
        Ok(ColumnarValue::Array(Arc::new(FixedSizeListArray::try_new(
            field,
            k as i32,
            Arc::new(Float32Array::from(out)),
            Some(valid.into()),
        )?)))
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Float64Array, RecordBatch};
    use datafusion::arrow::datatypes::Schema;
    use datafusion::datasource::MemTable;
    use datafusion::prelude::{SessionConfig, SessionContext};

    use super::*;

    /// The model as flat numbers: mean, components, explained variance.
    async fn fit(partitions: usize) -> Vec<f64> {
        let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(4));
        crate::register_all(&ctx);
        let schema = Arc::new(Schema::new(vec![
            Field::new("a", DataType::Float64, false),
            Field::new("b", DataType::Float64, false),
            Field::new("c", DataType::Float64, false),
        ]));
        let rows: Vec<[f64; 3]> = (0..60)
            .map(|i| {
                let t = i as f64;
                [1000.0 + t, 2.0 * t + (t * 0.7).sin(), (t * 1.3).cos()]
            })
            .collect();
        let per = rows.len() / partitions;
        let parts: Vec<Vec<RecordBatch>> = rows
            .chunks(per)
            .map(|chunk| {
                let column = |k: usize| -> ArrayRef {
                    Arc::new(Float64Array::from(
                        chunk.iter().map(|r| r[k]).collect::<Vec<_>>(),
                    ))
                };
                vec![
                    RecordBatch::try_new(schema.clone(), vec![column(0), column(1), column(2)])
                        .unwrap(),
                ]
            })
            .collect();
        ctx.register_table("t", Arc::new(MemTable::try_new(schema, parts).unwrap()))
            .unwrap();
        let out = ctx
            .sql("SELECT pca_fit(pack_features(a, b, c), 2) AS m FROM t")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let model = out[0].column(0).as_struct();
        (0..3)
            .flat_map(|f| list_values(model.column(f).as_list::<i32>(), 0))
            .collect()
    }

    #[tokio::test]
    async fn partial_states_merge_to_the_single_partition_model() {
        let single = fit(1).await;
        let split = fit(3).await;
        assert_eq!(single.len(), 3 + 6 + 2);
        for (a, b) in single.iter().zip(&split) {
            assert!((a - b).abs() <= 1e-9 * a.abs().max(1.0), "{a} vs {b}");
        }
    }
}
