//! # balans-udfs
//!
//! SQL functions of Balans, registered with [`register_all`]:
//!
//! - `pack_features(c1, ..., cn)` packs numeric columns into one `FixedSizeList<Float32, n>`
//!   vector per row (the engine's working layout for profiles);
//! - `l2_distance(a, b)` and `cosine_similarity(a, b)` compare two packed vectors.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, FixedSizeListArray, Float32Array, Float64Array,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Float32Type};
use datafusion::common::{Result, exec_err, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
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
    use datafusion::arrow::datatypes::Float64Type;

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
    async fn rejects_bad_arguments() {
        let e = query("SELECT pack_features('x') FROM t").await.unwrap_err();
        assert!(e.to_string().contains("numeric"), "{e}");
        let e = query("SELECT l2_distance(pack_features(a), pack_features(a, b)) FROM t")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("same length"), "{e}");
    }
}
