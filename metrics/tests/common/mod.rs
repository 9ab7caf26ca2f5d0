//! Readers for the golden reference files in `../shared/golden/metrics/` (test-only).
#![allow(dead_code)]

use std::fs::File;
use std::path::PathBuf;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// `../shared` (or `$BALANS_SHARED`).
pub fn shared_dir() -> PathBuf {
    match std::env::var_os("BALANS_SHARED") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"),
    }
}

/// `shared/golden/metrics/<folder>/<file>`.
pub fn golden(folder: &str, file: &str) -> PathBuf {
    shared_dir().join("golden/metrics").join(folder).join(file)
}

/// Reads a whole Parquet file into one record batch.
pub fn read_parquet(path: &std::path::Path) -> RecordBatch {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
    let schema = batches[0].schema();
    concat_batches(&schema, &batches).unwrap()
}

/// A numeric column as `f64` (any numeric type; nulls as NaN).
pub fn col_f64(batch: &RecordBatch, name: &str) -> Vec<f64> {
    let col = batch
        .column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"));
    let col = cast(col, &DataType::Float64).unwrap();
    let arr = col.as_primitive::<Float64Type>();
    (0..arr.len())
        .map(|i| {
            if arr.is_null(i) {
                f64::NAN
            } else {
                arr.value(i)
            }
        })
        .collect()
}

/// An integer column as `i64`.
pub fn col_i64(batch: &RecordBatch, name: &str) -> Vec<i64> {
    let col = batch
        .column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"));
    let col = cast(col, &DataType::Int64).unwrap();
    col.as_primitive::<Int64Type>().values().to_vec()
}

/// A string (or boolean, rendered "true"/"false") column.
pub fn col_str(batch: &RecordBatch, name: &str) -> Vec<String> {
    let col = batch
        .column_by_name(name)
        .unwrap_or_else(|| panic!("no column {name}"));
    let col = cast(col, &DataType::Utf8).unwrap();
    let arr = col.as_string::<i32>();
    (0..arr.len()).map(|i| arr.value(i).to_string()).collect()
}

/// One golden embedding: the input table and the "cells" (non-DMSO rows) of it.
pub struct GoldenEmbedding {
    /// Folder name under `golden/metrics/`.
    pub folder: &'static str,
    /// All rows of the input, row-major, `n_rows * d` (every non-`Metadata_` column as f64).
    pub all: Vec<f64>,
    /// Feature count.
    pub d: usize,
    /// Number of input rows.
    pub n_rows: usize,
    /// Whether each input row is a negative control (DMSO).
    pub is_negcon: Vec<bool>,
    /// Label (MoA or compound) of each input row.
    pub label: Vec<String>,
    /// Batch of each input row.
    pub batch: Vec<String>,
    /// Plate of each input row.
    pub plate: Vec<String>,
    /// Well of each input row.
    pub well: Vec<String>,
    /// Input rows of the cells, in order.
    pub cell_rows: Vec<usize>,
    /// Cells only, row-major, `cell_rows.len() * d`.
    pub cells: Vec<f64>,
    /// Label of each cell.
    pub cell_label: Vec<String>,
    /// Batch of each cell.
    pub cell_batch: Vec<String>,
}

/// The six golden embeddings' folder names.
pub const FOLDERS: [&str; 6] = [
    "bbbc021_preprocessed",
    "bbbc021_combat",
    "bbbc021_harmony",
    "synthetic_raw",
    "synthetic_combat",
    "synthetic_harmony",
];

/// Loads a golden embedding by folder name (see the golden README's table).
pub fn load(folder: &'static str) -> GoldenEmbedding {
    let (input, label_key) = match folder {
        "bbbc021_preprocessed" => (
            "golden/preprocess/final_mad_int_featselect.parquet",
            "Metadata_MoA",
        ),
        "bbbc021_combat" => ("golden/combat/bbbc021_combat.parquet", "Metadata_MoA"),
        "bbbc021_harmony" => ("golden/harmony/bbbc021_harmony.parquet", "Metadata_MoA"),
        "synthetic_raw" => (
            "data/synthetic/synthetic_n3000_d20_k10_b5_seed7.parquet",
            "Metadata_Compound",
        ),
        "synthetic_combat" => (
            "golden/combat/synthetic_combat.parquet",
            "Metadata_Compound",
        ),
        "synthetic_harmony" => (
            "golden/harmony/synthetic_harmony.parquet",
            "Metadata_Compound",
        ),
        other => panic!("unknown golden folder {other}"),
    };
    let batch = read_parquet(&shared_dir().join(input));
    let schema = batch.schema();
    let features: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .filter(|n| !n.starts_with("Metadata_"))
        .collect();
    let n_rows = batch.num_rows();
    let d = features.len();
    let columns: Vec<Vec<f64>> = features.iter().map(|f| col_f64(&batch, f)).collect();
    let mut all = vec![0.0; n_rows * d];
    for (j, col) in columns.iter().enumerate() {
        for i in 0..n_rows {
            all[i * d + j] = col[i];
        }
    }
    let is_negcon: Vec<bool> = if schema.column_with_name("Metadata_PertType").is_some() {
        col_str(&batch, "Metadata_PertType")
            .iter()
            .map(|s| s == "negcon")
            .collect()
    } else {
        col_str(&batch, "Metadata_IsControl")
            .iter()
            .map(|s| s == "true")
            .collect()
    };
    let label = col_str(&batch, label_key);
    let batch_col = col_str(&batch, "Metadata_Batch");
    let plate = col_str(&batch, "Metadata_Plate");
    let well = col_str(&batch, "Metadata_Well");
    let cell_rows: Vec<usize> = (0..n_rows).filter(|&i| !is_negcon[i]).collect();
    let mut cells = Vec::with_capacity(cell_rows.len() * d);
    for &r in &cell_rows {
        cells.extend_from_slice(&all[r * d..(r + 1) * d]);
    }
    let cell_label = cell_rows.iter().map(|&r| label[r].clone()).collect();
    let cell_batch = cell_rows.iter().map(|&r| batch_col[r].clone()).collect();
    GoldenEmbedding {
        folder,
        all,
        d,
        n_rows,
        is_negcon,
        label,
        batch: batch_col,
        plate,
        well,
        cell_rows,
        cells,
        cell_label,
        cell_batch,
    }
}

/// `metrics.json` of a golden folder.
pub fn metrics_json(folder: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(golden(folder, "metrics.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}
