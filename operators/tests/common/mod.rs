//! Helpers shared by the golden-file tests: the shared folder and Parquet column readers.
#![allow(dead_code)]

use std::fs::File;
use std::path::PathBuf;

use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::compute::{cast, concat_batches};
use datafusion::arrow::datatypes::{DataType, Float64Type, Int64Type};
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
