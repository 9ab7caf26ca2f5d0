//! `balans sql`: statements in order, the last result printed or written atomically, and the
//! failing statement named.

mod common;

use std::fs::File;

use common::{balans, example_path};
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

fn create(example: &str) -> String {
    format!("CREATE EXTERNAL TABLE p STORED AS PARQUET LOCATION '{example}'")
}

#[test]
fn prints_or_writes_the_last_result() {
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "{}; SELECT Metadata_Batch, count(*) AS wells FROM p GROUP BY Metadata_Batch ORDER BY 1",
        create(&example_path())
    );
    let o = balans(&["sql", &script, "--max-rows", "3"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("| Week1          | 93    |"), "{stdout}");
    assert!(stdout.contains("(10 rows, first 3 shown"), "{stdout}");

    let out = dir.path().join("counts.parquet");
    let file = dir.path().join("script.sql");
    std::fs::write(&file, format!("-- per-batch well counts\n{script};\n")).unwrap();
    let o = balans(&[
        "sql",
        "--file",
        file.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&out).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let rows: usize = reader.map(|b| b.unwrap().num_rows()).sum();
    assert_eq!(rows, 10);
    // An existing output needs --overwrite.
    let o = balans(&["sql", &script, "--output", out.to_str().unwrap()]);
    assert!(!o.status.success());
}

#[test]
fn a_failing_statement_is_named_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.parquet");
    let script = format!("{}; SELECT nope FROM p", create(&example_path()));
    let o = balans(&["sql", &script, "--output", out.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("statement 2 of 2") && stderr.contains("nope"),
        "{stderr}"
    );
    assert!(!out.exists());
    let o = balans(&["sql", "--output", out.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--output needs the statements"));
}

#[test]
fn statements_from_standard_input_run_one_by_one_and_are_kept_in_the_history() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let history = dir.path().join("history");
    let script = format!(
        "{};\nSELECT count(*) AS wells\n  FROM p;\nSELECT nope FROM p;\nSELECT 41 + 1 AS answer;\n",
        create(&example_path())
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_balans"))
        .args(["--quiet", "sql"])
        .env("BALANS_HISTORY", &history)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    // Every statement ran; the failing one is reported and the next still runs.
    assert!(
        stdout.contains("| 632   |") && stdout.contains("| 42     |"),
        "{stdout}"
    );
    assert!(stderr.contains("nope"), "{stderr}");
    assert!(
        !o.status.success(),
        "a failed statement makes piped input fail"
    );
    let kept = std::fs::read_to_string(&history).unwrap();
    assert_eq!(kept.lines().count(), 4, "{kept}");
    assert!(
        kept.contains("SELECT count(*) AS wells   FROM p;"),
        "{kept}"
    );
}
