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

/// `sql` with `${EXAMPLE}` and `${SHARED}` replaced by their paths.
fn expand(sql: &str) -> String {
    let example = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/data/bbbc021.parquet")
        .canonicalize()
        .unwrap();
    let shared = std::env::var_os("BALANS_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    sql.replace("${EXAMPLE}", &example.display().to_string())
        .replace("${SHARED}", &shared.display().to_string())
}

#[tokio::test]
async fn sqllogictest_files_pass() {
    let files = slt_files();
    assert!(!files.is_empty(), "no .slt files in tests/slt");
    let mut failures = Vec::new();
    let mut count = 0;
    for file in &files {
        // Each file gets a fresh session.
        let ctx = build_session(&SessionSettings::default()).unwrap();
        let text = std::fs::read_to_string(file).unwrap();
        for mut record in parse(&text) {
            record.sql = expand(&record.sql);
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

/// Every query of the `.slt` files, planned as a cluster plans it, survives the cluster's
/// codecs: the logical plan (client → scheduler) and the physical plan the scheduler makes
/// of it (scheduler → executors) decode to the same plans. `preprocess(...)` cannot travel
/// and is refused with the way around it.
#[tokio::test]
async fn every_slt_plan_round_trips_through_the_cluster_codecs() {
    use balans_engine::cluster::{BalansLogicalCodec, BalansPhysicalCodec, scheduler_session};
    use balans_operators::NoProgress;
    use datafusion::physical_plan::displayable;
    use datafusion_proto::bytes::{
        logical_plan_from_bytes_with_extension_codec, logical_plan_to_bytes_with_extension_codec,
        physical_plan_from_bytes_with_extension_codec, physical_plan_to_bytes_with_extension_codec,
    };
    use std::sync::Arc;

    let logical_codec = BalansLogicalCodec::new(Arc::new(NoProgress));
    let physical_codec = BalansPhysicalCodec::new(Arc::new(NoProgress));
    let scheduler = scheduler_session().unwrap();
    let task = scheduler.task_ctx();
    let (mut plans, mut refused, mut corrections) = (0, 0, 0);
    for file in slt_files() {
        let ctx = build_session(&SessionSettings::default()).unwrap();
        // `CREATE TABLE ... AS` makes in-memory tables of this session; a cluster has none
        // (Ballista runs no CREATE TABLE), so queries over them are not sent.
        let mut memory_tables: Vec<String> = Vec::new();
        for record in parse(&std::fs::read_to_string(&file).unwrap()) {
            let sql = expand(&record.sql);
            let head = sql.trim_start().to_ascii_uppercase();
            let query = head.starts_with("SELECT") || head.starts_with("WITH");
            let at = format!(
                "{}:{}",
                file.file_name().unwrap().to_string_lossy(),
                record.line
            );
            match (&record.expect, query) {
                (Expect::Rows { .. } | Expect::Contains(_), true) => {}
                (Expect::Ok, false) => {
                    let words: Vec<&str> = sql.split_whitespace().collect();
                    if words.len() > 2 && words[..2] == ["CREATE", "TABLE"] {
                        memory_tables.push(words[2].to_string());
                    }
                    ctx.sql(&sql).await.unwrap().collect().await.unwrap();
                    continue;
                }
                _ => continue,
            }
            // The session's catalog lives in the client: its tables cannot travel.
            if sql.contains("information_schema")
                || sql
                    .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .any(|w| memory_tables.iter().any(|t| t == w))
            {
                continue;
            }
            let plan = ctx.sql(&sql).await.unwrap().into_optimized_plan().unwrap();
            let bytes = match logical_plan_to_bytes_with_extension_codec(&plan, &logical_codec) {
                Ok(bytes) => bytes,
                Err(e) if sql.contains("preprocess(") => {
                    assert!(
                        e.to_string().contains("balans preprocess --scheduler"),
                        "{at}: {e}"
                    );
                    refused += 1;
                    continue;
                }
                Err(e) => panic!("{at}: the logical plan does not encode: {e}\n{sql}"),
            };
            let decoded =
                logical_plan_from_bytes_with_extension_codec(&bytes, &task, &logical_codec)
                    .unwrap_or_else(|e| panic!("{at}: the logical plan does not decode: {e}"));
            assert_eq!(
                decoded.display_indent().to_string(),
                plan.display_indent().to_string(),
                "{at}: logical round trip"
            );
            let physical = scheduler
                .state()
                .create_physical_plan(&decoded)
                .await
                .unwrap_or_else(|e| panic!("{at}: the scheduler cannot plan it: {e}"));
            let bytes =
                physical_plan_to_bytes_with_extension_codec(physical.clone(), &physical_codec)
                    .unwrap_or_else(|e| panic!("{at}: the physical plan does not encode: {e}"));
            let back =
                physical_plan_from_bytes_with_extension_codec(&bytes, &task, &physical_codec)
                    .unwrap_or_else(|e| panic!("{at}: the physical plan does not decode: {e}"));
            assert_eq!(
                displayable(back.as_ref()).indent(true).to_string(),
                displayable(physical.as_ref()).indent(true).to_string(),
                "{at}: physical round trip"
            );
            plans += 1;
            let text = displayable(physical.as_ref()).indent(true).to_string();
            if text.contains("BalansPassExec") || text.contains("BalansGatherExec") {
                // The one-machine chain never reaches a cluster: its steps share files.
                assert!(
                    !text.contains("BalansIngestExec"),
                    "{at}: a step left in:\n{text}"
                );
                corrections += 1;
            }
        }
    }
    assert!(plans >= 20, "only {plans} plans were round-tripped");
    assert!(
        corrections >= 5,
        "only {corrections} corrections were planned for the cluster"
    );
    assert!(refused >= 1, "no preprocess(...) plan was refused");
}
