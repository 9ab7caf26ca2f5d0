//! # balans-udfs
//!
//! SQL functions of Balans, registered with [`register_all`]:
//!
//! - `pack_features(c1, ..., cn)` packs numeric columns into one `FixedSizeList<Float32, n>`
//!   vector per row (the engine's working layout for profiles);
//! - `l2_distance(a, b)` and `cosine_similarity(a, b)` compare two packed vectors;
//! - `unpack_features(v [, 'name1,name2,...'])` turns a packed vector back into a struct of
//!   `Float32` fields (`f1..fn`, or the names given); `unnest(...)` spreads it into columns;
//! - `pca_fit(v, k)` (aggregate) and `pca_project(v, model, k)` ([`pca`]): PCA in SQL;
//! - `mad(x)`, an aggregate: the unscaled median absolute deviation (scipy's
//!   `median_abs_deviation`; NaN and nulls skipped), per group, mergeable across partitions
//!   (with DataFusion's `median(x)` it gives the per-plate robust statistics of pycytominer's
//!   `mad_robustize`: multiply by 1.4826);
//! - `embed(v, 'model_dir/')` ([`embed`]): a learned model applied to packed vectors.

pub mod embed;
pub mod pca;

pub use embed::EmbedFunction;

use std::sync::Arc;

use balans_operators::kernels::preprocess::{mad, median_in_place};
use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, FixedSizeListArray, Float32Array, Float64Array, StructArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Fields, Float32Type, Float64Type};
use datafusion::common::ScalarValue;
use datafusion::common::{Result, exec_err, plan_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, ColumnarValue, ReturnFieldArgs,
    ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;

/// Registers every Balans SQL function in `ctx`.
pub fn register_all(ctx: &SessionContext) {
    ctx.register_udf(ScalarUDF::new_from_impl(PackFeatures::new()));
    ctx.register_udf(ScalarUDF::new_from_impl(VectorCompare::new(
        Comparison::L2Distance,
    )));
    ctx.register_udf(ScalarUDF::new_from_impl(VectorCompare::new(
        Comparison::CosineSimilarity,
    )));
    ctx.register_udf(ScalarUDF::new_from_impl(UnpackFeatures::new()));
    ctx.register_udaf(AggregateUDF::new_from_impl(MedianAbsoluteDeviation::new()));
    ctx.register_udaf(AggregateUDF::new_from_impl(pca::PcaFit::new()));
    ctx.register_udf(ScalarUDF::new_from_impl(pca::PcaProject::new()));
    ctx.register_udf(ScalarUDF::new_from_impl(EmbedFunction::default()));
}

/// `unpack_features(v [, 'names'])`: `FixedSizeList<_, n>` → `Struct<n x Float32>`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct UnpackFeatures {
    signature: Signature,
}

impl UnpackFeatures {
    /// The function.
    pub fn new() -> Self {
        Self {
            signature: Signature::variadic_any(Volatility::Immutable),
        }
    }
}

impl Default for UnpackFeatures {
    fn default() -> Self {
        Self::new()
    }
}

/// The struct fields of an unpacked `n`-vector: `names` (comma-separated) or `f1..fn`.
fn unpacked_fields(n: usize, names: Option<&str>) -> Result<Fields> {
    let names: Vec<String> = match names {
        Some(text) => text.split(',').map(|s| s.trim().to_string()).collect(),
        None => (1..=n).map(|i| format!("f{i}")).collect(),
    };
    if names.len() != n {
        return plan_err!(
            "unpack_features: {} names for a vector of {n} values",
            names.len()
        );
    }
    Ok(names
        .into_iter()
        .map(|name| Field::new(name, DataType::Float32, true))
        .collect())
}

impl ScalarUDFImpl for UnpackFeatures {
    fn name(&self) -> &str {
        "unpack_features"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        plan_err!("unpack_features: the type comes from return_field_from_args")
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        let n = match args.arg_fields.first().map(|f| f.data_type()) {
            Some(DataType::FixedSizeList(_, n)) => *n as usize,
            Some(other) => {
                return plan_err!("unpack_features takes a packed vector, got {other}");
            }
            None => return plan_err!("unpack_features takes a packed vector"),
        };
        let names = match (args.arg_fields.len(), args.scalar_arguments.get(1)) {
            (1, _) => None,
            (2, Some(Some(ScalarValue::Utf8(Some(text))))) => Some(text.as_str()),
            _ => {
                return plan_err!(
                    "unpack_features(v [, 'name1,name2,...']): the names must be one string literal"
                );
            }
        };
        Ok(Arc::new(Field::new(
            self.name(),
            DataType::Struct(unpacked_fields(n, names)?),
            true,
        )))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let DataType::Struct(fields) = args.return_field.data_type() else {
            return exec_err!("unpack_features: unexpected return type");
        };
        let rows = args.number_rows;
        let vectors = args.args[0].to_array(rows)?;
        let vectors = vectors.as_fixed_size_list();
        let n = vectors.value_length() as usize;
        let values = cast(vectors.values(), &DataType::Float32)?;
        let values = values.as_primitive::<Float32Type>();
        let columns: Vec<ArrayRef> = (0..n)
            .map(|j| {
                let column: Float32Array = (0..rows)
                    .map(|i| {
                        let at = (vectors.offset() + i) * n + j;
                        (vectors.is_valid(i) && values.is_valid(at)).then(|| values.value(at))
                    })
                    .collect();
                Arc::new(column) as ArrayRef
            })
            .collect();
        Ok(ColumnarValue::Array(Arc::new(StructArray::try_new(
            fields.clone(),
            columns,
            vectors.nulls().cloned(),
        )?)))
    }
}

/// `mad(x)`: the unscaled median absolute deviation of the finite values of a group.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct MedianAbsoluteDeviation {
    signature: Signature,
}

impl MedianAbsoluteDeviation {
    /// The function.
    pub fn new() -> Self {
        Self {
            signature: Signature::numeric(1, Volatility::Immutable),
        }
    }
}

impl Default for MedianAbsoluteDeviation {
    fn default() -> Self {
        Self::new()
    }
}

impl AggregateUDFImpl for MedianAbsoluteDeviation {
    fn name(&self) -> &str {
        "mad"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }

    fn accumulator(&self, _acc_args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(MadAccumulator::default()))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new(
            format!("{}_values", args.name),
            DataType::List(Arc::new(Field::new("item", DataType::Float64, true))),
            true,
        ))])
    }
}

/// Keeps a group's finite values (exact, like DataFusion's `median`).
#[derive(Debug, Default)]
struct MadAccumulator {
    values: Vec<f64>,
}

impl MadAccumulator {
    fn extend(&mut self, array: &ArrayRef) -> Result<()> {
        let values = cast(array, &DataType::Float64)?;
        let values = values.as_primitive::<Float64Type>();
        self.values
            .extend(values.iter().flatten().filter(|v| v.is_finite()));
        Ok(())
    }
}

impl Accumulator for MadAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.extend(&values[0])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        if self.values.is_empty() {
            return Ok(ScalarValue::Float64(None));
        }
        let mut values = self.values.clone();
        let median = median_in_place(&mut values);
        let mut scratch = Vec::new();
        Ok(ScalarValue::Float64(Some(mad(
            &values,
            median,
            &mut scratch,
        ))))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.values.capacity() * 8
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let list = ScalarValue::new_list_nullable(
            &self
                .values
                .iter()
                .map(|&v| ScalarValue::Float64(Some(v)))
                .collect::<Vec<_>>(),
            &DataType::Float64,
        );
        Ok(vec![ScalarValue::List(list)])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let lists = states[0].as_list::<i32>();
        for i in 0..lists.len() {
            if lists.is_valid(i) {
                self.extend(&lists.value(i))?;
            }
        }
        Ok(())
    }
}

fn vector_type(n: usize) -> DataType {
    DataType::FixedSizeList(
        Arc::new(Field::new("item", DataType::Float32, true)),
        n as i32,
    )
}

/// `pack_features(c1, ..., cn)`: numeric columns → `FixedSizeList<Float32, n>`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct PackFeatures {
    signature: Signature,
}

impl PackFeatures {
    /// The function.
    pub fn new() -> Self {
        Self {
            signature: Signature::variadic_any(Volatility::Immutable),
        }
    }
}

impl Default for PackFeatures {
    fn default() -> Self {
        Self::new()
    }
}

impl ScalarUDFImpl for PackFeatures {
    fn name(&self) -> &str {
        "pack_features"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        if arg_types.is_empty() {
            return plan_err!("pack_features needs at least one column");
        }
        if let Some(t) = arg_types
            .iter()
            .find(|t| !t.is_numeric() && **t != DataType::Null)
        {
            return plan_err!("pack_features takes numeric columns, got {t}");
        }
        Ok(vector_type(arg_types.len()))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.args.len();
        let rows = args.number_rows;
        let columns: Vec<ArrayRef> = args
            .args
            .iter()
            .map(|a| {
                a.to_array(rows)
                    .and_then(|arr| Ok(cast(&arr, &DataType::Float32)?))
            })
            .collect::<Result<_>>()?;
        let mut values: Vec<Option<f32>> = Vec::with_capacity(rows * n);
        for i in 0..rows {
            for c in &columns {
                let c = c.as_primitive::<Float32Type>();
                values.push(if c.is_null(i) { None } else { Some(c.value(i)) });
            }
        }
        let field = Arc::new(Field::new("item", DataType::Float32, true));
        let list = FixedSizeListArray::try_new(
            field,
            n as i32,
            Arc::new(Float32Array::from(values)),
            None,
        )?;
        Ok(ColumnarValue::Array(Arc::new(list)))
    }
}

/// How [`VectorCompare`] compares two vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Comparison {
    /// Euclidean distance.
    L2Distance,
    /// Cosine similarity (null when a vector has norm 0).
    CosineSimilarity,
}

/// `l2_distance(a, b)` / `cosine_similarity(a, b)` over packed vectors.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct VectorCompare {
    kind: Comparison,
    signature: Signature,
}

impl VectorCompare {
    /// The function of kind `kind`.
    pub fn new(kind: Comparison) -> Self {
        Self {
            kind,
            signature: Signature::any(2, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for VectorCompare {
    fn name(&self) -> &str {
        match self.kind {
            Comparison::L2Distance => "l2_distance",
            Comparison::CosineSimilarity => "cosine_similarity",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        match (&arg_types[0], &arg_types[1]) {
            (DataType::FixedSizeList(_, a), DataType::FixedSizeList(_, b)) if a == b => {
                Ok(DataType::Float64)
            }
            (a, b) => plan_err!(
                "{} takes two vectors of the same length (pack_features), got {a} and {b}",
                self.name()
            ),
        }
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        let a = args.args[0].to_array(rows)?;
        let b = args.args[1].to_array(rows)?;
        let (a, b) = (a.as_fixed_size_list(), b.as_fixed_size_list());
        let d = a.value_length() as usize;
        if b.value_length() as usize != d {
            return exec_err!("vectors of different lengths");
        }
        let av = cast(a.values(), &DataType::Float32)?;
        let bv = cast(b.values(), &DataType::Float32)?;
        let (av, bv) = (
            av.as_primitive::<Float32Type>(),
            bv.as_primitive::<Float32Type>(),
        );
        let out: Float64Array = (0..rows)
            .map(|i| {
                if a.is_null(i) || b.is_null(i) {
                    return None;
                }
                let (oa, ob) = ((a.offset() + i) * d, (b.offset() + i) * d);
                let (mut dot, mut na, mut nb, mut sq) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
                for f in 0..d {
                    if av.is_null(oa + f) || bv.is_null(ob + f) {
                        return None;
                    }
                    let (x, y) = (av.value(oa + f) as f64, bv.value(ob + f) as f64);
                    dot += x * y;
                    na += x * x;
                    nb += y * y;
                    sq += (x - y) * (x - y);
                }
                match self.kind {
                    Comparison::L2Distance => Some(sq.sqrt()),
                    Comparison::CosineSimilarity if na > 0.0 && nb > 0.0 => {
                        Some(dot / (na.sqrt() * nb.sqrt()))
                    }
                    Comparison::CosineSimilarity => None,
                }
            })
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn query(sql: &str) -> Result<Vec<datafusion::arrow::array::RecordBatch>> {
        let ctx = SessionContext::new();
        register_all(&ctx);
        ctx.sql("CREATE TABLE t (a DOUBLE, b INT, c FLOAT) AS VALUES (3.0, 4, 0.0), (1.0, 0, 1.0), (NULL, 1, 1.0)").await?.collect().await?;
        ctx.sql(sql).await?.collect().await
    }

    #[tokio::test]
    async fn packs_and_compares() {
        let out = query("SELECT l2_distance(pack_features(a, b), pack_features(c, c)) AS l2, cosine_similarity(pack_features(a, b), pack_features(b, a)) AS cs FROM t").await.unwrap();
        let l2 = out[0].column(0).as_primitive::<Float64Type>();
        assert!((l2.value(0) - 5.0).abs() < 1e-9);
        assert!((l2.value(1) - 1.0).abs() < 1e-9);
        assert!(l2.is_null(2), "a null feature gives a null distance");
        let cs = out[0].column(1).as_primitive::<Float64Type>();
        assert!((cs.value(0) - 24.0 / 25.0).abs() < 1e-9);
        let packed = query("SELECT pack_features(a, b, c) AS v FROM t")
            .await
            .unwrap();
        assert_eq!(packed[0].schema().field(0).data_type(), &vector_type(3));
    }

    #[tokio::test]
    async fn mad_matches_scipy_per_group_and_skips_nan() {
        let ctx = SessionContext::new();
        register_all(&ctx);
        // scipy.stats.median_abs_deviation([1, 2, 3, 4, 100]) = 1; ([2, 4]) = 1.
        let out = ctx
            .sql(
                "SELECT g, mad(x) AS m FROM (VALUES ('a', 1.0), ('a', 2.0), ('a', 3.0), \
                 ('a', 4.0), ('a', 100.0), ('b', 2.0), ('b', 'NaN'::double), ('b', 4.0), \
                 ('c', NULL)) AS t(g, x) GROUP BY g ORDER BY g",
            )
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let m = out[0].column(1).as_primitive::<Float64Type>();
        assert_eq!((m.value(0), m.value(1)), (1.0, 1.0));
        assert!(m.is_null(2), "no finite value: NULL");
    }

    #[tokio::test]
    async fn rejects_bad_arguments() {
        let e = query("SELECT pack_features('x') FROM t").await.unwrap_err();
        assert!(e.to_string().contains("numeric"), "{e}");
        let e = query("SELECT l2_distance(pack_features(a), pack_features(a, b)) FROM t")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("same length"), "{e}");
    }
}
