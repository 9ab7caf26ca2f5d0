//! Helpers shared by the operator tests: the shared folder, Parquet column readers and small
//! in-memory profile tables.
#![allow(dead_code)]

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, AsArray, BooleanArray, Float32Array, RecordBatch, StringArray,
};
use datafusion::arrow::compute::{cast, concat_batches};
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// The shared data folder (`BALANS_SHARED`, default `../shared` beside the repository).
pub fn shared() -> PathBuf {
    std::env::var_os("BALANS_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
}

/// Reads a whole Parquet file below the shared folder.
pub fn read(rel: &str) -> RecordBatch {
    let path = shared().join(rel);
    let file = File::open(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (set BALANS_SHARED to the shared/ folder)",
            path.display()
        )
    });
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
    concat_batches(&batches[0].schema(), &batches).unwrap()
}

/// A column as f64.
pub fn f64_col(b: &RecordBatch, name: &str) -> Vec<f64> {
    let c = cast(
        b.column_by_name(name)
            .unwrap_or_else(|| panic!("column {name}")),
        &DataType::Float64,
    )
    .unwrap();
    c.as_primitive::<Float64Type>().values().to_vec()
}

/// A column as i64.
pub fn i64_col(b: &RecordBatch, name: &str) -> Vec<i64> {
    let c = cast(b.column_by_name(name).unwrap(), &DataType::Int64).unwrap();
    c.as_primitive::<Int64Type>().values().to_vec()
}

/// A string column (cast to Utf8).
pub fn str_col(b: &RecordBatch, name: &str) -> Vec<String> {
    let c = cast(b.column_by_name(name).unwrap(), &DataType::Utf8).unwrap();
    c.as_string::<i32>()
        .iter()
        .map(|v| v.unwrap_or_default().to_string())
        .collect()
}

/// The feature columns of a profile table: every column not named `Metadata_*`, in order.
pub fn feature_names(b: &RecordBatch) -> Vec<String> {
    b.schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .filter(|n| !n.starts_with("Metadata_"))
        .collect()
}

/// The named columns as one row-major f64 matrix.
pub fn row_major(b: &RecordBatch, features: &[String]) -> Vec<f64> {
    let d = features.len();
    let mut x = vec![0.0; b.num_rows() * d];
    for (f, name) in features.iter().enumerate() {
        for (i, v) in f64_col(b, name).into_iter().enumerate() {
            x[i * d + f] = v;
        }
    }
    x
}

/// A profile table: `Metadata_Batch`, the string column `label`, the boolean column `flag`,
/// then the Float32 features `f0`, `f1`, ...; no column is nullable.
pub fn profile_table(
    batch: Vec<String>,
    label: (&str, Vec<String>),
    flag: (&str, Vec<bool>),
    features: Vec<Vec<f32>>,
) -> RecordBatch {
    let mut fields = vec![
        Field::new("Metadata_Batch", DataType::Utf8, false),
        Field::new(label.0, DataType::Utf8, false),
        Field::new(flag.0, DataType::Boolean, false),
    ];
    fields
        .extend((0..features.len()).map(|f| Field::new(format!("f{f}"), DataType::Float32, false)));
    let mut arrays: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(batch)),
        Arc::new(StringArray::from(label.1)),
        Arc::new(BooleanArray::from(flag.1)),
    ];
    arrays.extend(
        features
            .into_iter()
            .map(|c| Arc::new(Float32Array::from(c)) as ArrayRef),
    );
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).unwrap()
}
