//! Helpers shared by the engine's command-line tests.
#![allow(dead_code)]

pub mod seaweed;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::compute::{cast, concat_batches};
use datafusion::arrow::datatypes::{DataType, Float64Type};
use datafusion::parquet::arrow::ArrowWriter;
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

/// A path as a command-line argument (test paths are UTF-8).
pub fn arg(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

/// Runs `balans --quiet ARGS...`.
pub fn balans(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_balans"))
        .arg("--quiet")
        .args(args)
        .output()
        .expect("run balans")
}

/// Runs `balans --quiet ARGS...` and panics with its standard error unless it succeeds.
#[track_caller]
pub fn balans_ok(args: &[&str]) -> Output {
    let o = balans(args);
    assert_ok(&o);
    o
}

/// The arguments `correct -i INPUT -b Metadata_Batch -o OUTPUT EXTRA...`.
pub fn correct_args<'a>(input: &'a Path, output: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "correct",
        "-i",
        arg(input),
        "-b",
        "Metadata_Batch",
        "-o",
        arg(output),
    ];
    args.extend_from_slice(extra);
    args
}

/// Runs `balans correct -i INPUT -b Metadata_Batch -o OUTPUT EXTRA...`.
pub fn correct<I, O>(input: &I, output: &O, extra: &[&str]) -> Output
where
    I: AsRef<Path> + ?Sized,
    O: AsRef<Path> + ?Sized,
{
    balans(&correct_args(input.as_ref(), output.as_ref(), extra))
}

/// Runs `balans synth EXTRA... -o OUTPUT` and panics with its standard error unless it succeeds.
#[track_caller]
pub fn synth(output: &Path, extra: &[&str]) {
    let mut args = vec!["synth"];
    args.extend_from_slice(extra);
    args.extend(["-o", arg(output)]);
    balans_ok(&args);
}

/// Runs `balans sql SCRIPT --output OUTPUT`.
pub fn sql_to(script: &str, output: &Path) -> Output {
    balans(&["sql", script, "--output", arg(output)])
}

/// The statement that registers the Parquet file or folder `location` as table `p`.
pub fn create_p(location: &str) -> String {
    format!("CREATE EXTERNAL TABLE p STORED AS PARQUET LOCATION '{location}'")
}

/// A command's standard error as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// A command's standard output as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// Asserts that a command succeeded, showing its standard error otherwise.
#[track_caller]
pub fn assert_ok(o: &Output) {
    assert!(o.status.success(), "{}", stderr(o));
}

/// Asserts that a command's standard error mentions `needle`.
#[track_caller]
pub fn assert_stderr_has(o: &Output, needle: &str) {
    let e = stderr(o);
    assert!(e.contains(needle), "stderr lacks '{needle}': {e}");
}

/// Asserts that a command's standard output mentions `needle`.
#[track_caller]
pub fn assert_stdout_has(o: &Output, needle: &str) {
    let out = stdout(o);
    assert!(out.contains(needle), "stdout lacks '{needle}': {out}");
}

/// Asserts that a command failed and that its standard error mentions `needle`.
#[track_caller]
pub fn assert_fails_with(o: &Output, needle: &str) {
    assert!(!o.status.success(), "expected failure: {}", stderr(o));
    assert_stderr_has(o, needle);
}

/// Asserts that a command failed mentioning `needle` and that `output` does not exist.
#[track_caller]
pub fn assert_fails_writing_nothing(o: &Output, needle: &str, output: &Path) {
    assert_fails_with(o, needle);
    assert!(!output.exists(), "{} was written", output.display());
}

/// Asserts `dir` holds exactly the files named in `expected` (no leftovers).
#[track_caller]
pub fn assert_dir_holds(dir: &Path, expected: &[&str]) {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(names, want, "files left in {}", dir.display());
}

/// Checks that a finished command failed with `needle` in its message and wrote nothing.
#[track_caller]
pub fn assert_fails_cleanly(o: Output, dir: &Path, inputs: &[&str], needle: &str) {
    assert_fails_with(&o, needle);
    assert_dir_holds(dir, inputs);
}

/// A JSON file, parsed.
pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_reader(File::open(path).unwrap()).unwrap()
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

/// Writes one record batch as a Parquet file.
pub fn write_parquet(path: &Path, batch: &RecordBatch) {
    let mut w = ArrowWriter::try_new(File::create(path).unwrap(), batch.schema(), None).unwrap();
    w.write(batch).unwrap();
    w.close().unwrap();
}

/// The column names of a table, in schema order.
pub fn column_names(b: &RecordBatch) -> Vec<String> {
    b.schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect()
}

/// A numeric column cast to f64.
pub fn f64_column(b: &RecordBatch, name: &str) -> Vec<f64> {
    let c = cast(b.column_by_name(name).unwrap(), &DataType::Float64).unwrap();
    c.as_primitive::<Float64Type>().values().to_vec()
}
