//! Helpers shared by the engine's command-line tests.
#![allow(dead_code)]

pub mod seaweed;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::compute::concat_batches;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// `../shared` (or `$BALANS_SHARED`).
pub fn shared() -> PathBuf {
    std::env::var_os("BALANS_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
}

/// The bundled BBBC021 example table.
pub fn example_path() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/data/bbbc021.parquet")
        .display()
        .to_string()
}

/// The shared synthetic table (3,000 x 20, 5 batches, seed 7).
pub fn synthetic_path() -> String {
    shared()
        .join("data/synthetic/synthetic_n3000_d20_k10_b5_seed7.parquet")
        .display()
        .to_string()
}

/// Runs `balans --quiet ARGS...`.
pub fn balans(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_balans"))
        .arg("--quiet")
        .args(args)
        .output()
        .expect("run balans")
}

/// A command's standard error as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// A command's standard output as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// A whole Parquet file as one record batch.
pub fn read(path: &Path) -> RecordBatch {
    let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
    concat_batches(&batches[0].schema(), &batches).unwrap()
}
