//! Runs the sqllogictest files in `tests/slt/` against a Balans session (our functions
//! registered), with a small runner for the format's core records:
//!
//! - `statement ok` / `statement error <text>` followed by SQL;
//! - `query <column types> [rowsort]` followed by SQL, `----` and the expected rows
//!   (values separated by one space; `NULL` for nulls; floats with up to 6 decimals,
//!   trailing zeros removed);
//! - `query <column types> contains`: every expected line must appear in the result's text
//!   (for `EXPLAIN`, whose full text names every column);
//! - `query error <text>` followed by SQL.
//!
//! A record ends at a blank line; `#` starts a comment. `${EXAMPLE}` in SQL is the bundled
//! example table's path, `${SHARED}` the shared data folder (`../shared` or `$BALANS_SHARED`). (The `sqllogictest` crate would change feature flags that the
//! DataFusion build shares and rebuild it, so the runner is kept here.)

use std::path::{Path, PathBuf};

use balans_engine::session::{SessionSettings, build_session};
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Float32Type, Float64Type};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::prelude::SessionContext;

#[derive(Debug)]
enum Expect {
    Ok,
    Error(String),
    Rows { sort: bool, rows: Vec<String> },
    Contains(Vec<String>),
}

#[derive(Debug)]
struct Record {
    line: usize,
    sql: String,
    expect: Expect,
}

fn parse(text: &str) -> Vec<Record> {
    let lines: Vec<&str> = text.lines().collect();
    let mut records = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        if line.is_empty() || line.starts_with('#') {
            i += 1;
            continue;
        }
        let start = i + 1;
        let words: Vec<&str> = line.split_whitespace().collect();
        let header = line.to_string();
        i += 1;
        let mut sql = Vec::new();
        while i < lines.len() && !lines[i].trim().is_empty() && lines[i].trim() != "----" {
            sql.push(lines[i]);
            i += 1;
        }
        let sql = sql.join("\n");
        let error_text = |prefix: &str| header[prefix.len()..].trim().to_string();
        let expect = match words.as_slice() {
            ["statement", "ok"] => Expect::Ok,
            ["statement", "error", ..] => Expect::Error(error_text("statement error")),
            ["query", "error", ..] => Expect::Error(error_text("query error")),
            ["query", _types, rest @ ..] => {
                assert!(
                    i < lines.len() && lines[i].trim() == "----",
                    "line {start}: a query needs ---- and its expected rows"
                );
                i += 1;
                let mut rows = Vec::new();
                while i < lines.len() && !lines[i].trim().is_empty() {
                    rows.push(lines[i].trim().to_string());
                    i += 1;
                }
                if rest.contains(&"contains") {
                    Expect::Contains(rows)
                } else {
                    Expect::Rows {
                        sort: rest.contains(&"rowsort"),
                        rows,
                    }
                }
            }
            _ => panic!("line {start}: unknown record '{line}'"),
        };
        records.push(Record {
            line: start,
            sql,
            expect,
        });
    }
    records
}

fn format_float(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    let text = format!("{v:.6}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" {
        "0".into()
    } else {
        text.into()
    }
}

fn rows(batches: &[RecordBatch]) -> Vec<String> {
    let options = FormatOptions::default().with_null("NULL");
    let mut out = Vec::new();
    for batch in batches {
        let formatters: Vec<_> = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).unwrap())
            .collect();
        for r in 0..batch.num_rows() {
            let cells: Vec<String> = batch
                .columns()
                .iter()
                .zip(&formatters)
                .map(|(c, f)| {
                    if c.is_null(r) {
                        return "NULL".to_string();
                    }
                    match c.data_type() {
                        DataType::Float64 => format_float(c.as_primitive::<Float64Type>().value(r)),
                        DataType::Float32 => {
                            format_float(f64::from(c.as_primitive::<Float32Type>().value(r)))
                        }
                        _ => f.value(r).to_string(),
                    }
                })
                .collect();
            out.push(cells.join(" "));
        }
    }
    out
}

async fn run_record(ctx: &SessionContext, record: &Record) -> Result<(), String> {
    let result = async {
        let df = ctx.sql(&record.sql).await?;
        df.collect().await
    }
    .await;
    match (&record.expect, result) {
        (Expect::Ok, Ok(_)) => Ok(()),
        (Expect::Ok, Err(e)) => Err(format!("expected success, got: {e}")),
        (Expect::Error(text), Err(e)) => {
            if e.to_string().contains(text.as_str()) {
                Ok(())
            } else {
                Err(format!("expected an error containing '{text}', got: {e}"))
            }
        }
        (Expect::Error(text), Ok(_)) => Err(format!("expected an error containing '{text}'")),
        (Expect::Rows { .. } | Expect::Contains(_), Err(e)) => Err(format!("query failed: {e}")),
        (Expect::Contains(lines), Ok(batches)) => {
            let text = rows(&batches).join("\n");
            match lines.iter().find(|l| !text.contains(l.as_str())) {
                None => Ok(()),
                Some(missing) => Err(format!("'{missing}' is not in the result:\n{text}")),
            }
        }
        (Expect::Rows { sort, rows: want }, Ok(batches)) => {
            let mut got = rows(&batches);
            let mut want = want.clone();
            if *sort {
                got.sort();
                want.sort();
            }
            if got == want {
                Ok(())
            } else {
                Err(format!(
                    "rows differ\n  expected:\n    {}\n  got:\n    {}",
                    want.join("\n    "),
                    got.join("\n    ")
                ))
            }
        }
    }
}

fn slt_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("slt");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "slt"))
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn sqllogictest_files_pass() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/data/bbbc021.parquet")
        .canonicalize()
        .unwrap();
    let shared = std::env::var_os("BALANS_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    let files = slt_files();
    assert!(!files.is_empty(), "no .slt files in tests/slt");
    let mut failures = Vec::new();
    let mut count = 0;
    for file in &files {
        // Each file gets a fresh session.
        let ctx = build_session(&SessionSettings::default()).unwrap();
        let text = std::fs::read_to_string(file).unwrap();
        for mut record in parse(&text) {
            record.sql = record
                .sql
                .replace("${EXAMPLE}", &example.display().to_string())
                .replace("${SHARED}", &shared.display().to_string());
            count += 1;
            if let Err(message) = run_record(&ctx, &record).await {
                failures.push(format!(
                    "{}:{}: {}\n  {}",
                    file.file_name().unwrap().to_string_lossy(),
                    record.line,
                    message,
                    record.sql.replace('\n', "\n  ")
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {count} records failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn the_runner_parses_every_record_kind() {
    let records = parse(
        "# comment\nstatement ok\nCREATE TABLE t AS VALUES (1)\n\nquery I rowsort\nSELECT 1\n----\n1\n\nquery error No field\nSELECT x\n\nstatement error bad\nDROP x\n",
    );
    assert_eq!(records.len(), 4);
    assert!(matches!(records[0].expect, Expect::Ok));
    assert!(
        matches!(&records[1].expect, Expect::Rows { sort: true, rows } if rows == &vec!["1".to_string()])
    );
    assert!(matches!(&records[2].expect, Expect::Error(t) if t == "No field"));
    assert_eq!(records[3].line, 13);
    assert_eq!(format_float(0.5000001), "0.5");
    assert_eq!(format_float(2.0), "2");
    assert_eq!(format_float(-0.0000001), "0");
}
