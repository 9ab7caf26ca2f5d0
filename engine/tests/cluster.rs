//! Distributed execution (cargo feature `cluster`): a scheduler and two executors started by
//! our binary as child processes on loopback, a multi-file table in the SeaweedFS test server
//! (`common/seaweed.rs`), and the same jobs run in one process and on the cluster.
//!
//! - `jobs_on_the_cluster_give_the_single_process_results`: BALANS and ComBat through `balans
//!   correct --scheduler`, `balans((SELECT ...))` and `evaluate((SELECT ...))` in `balans sql
//!   --scheduler`, `balans evaluate` and `balans preprocess --scheduler` equal their
//!   single-process results; the corrections' per-partition stages ran on both executors
//!   (each executor's work directory holds shuffle files of them); a killed executor either lets the job
//!   finish with the same values or fails it with a clear error, never leaving a partial file.
//! - `an_unreachable_scheduler_or_store_is_a_clear_error`: a dead scheduler is reported within
//!   seconds without running anything locally; an executor that cannot reach the object store
//!   fails the job with the store's error and no output.

#![cfg(feature = "cluster")]

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::seaweed::{BUCKET, Server};
use common::{arg, balans, example_path, read, stderr, stdout};
use datafusion::arrow::array::RecordBatch;

/// The tests of this file take turns: each starts a SeaweedFS server, whose port choice is
/// not safe against a second server starting at the same moment.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, what: &str, log: &Path) {
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what} did not listen on {port} within 60 s: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An executor process and its work directory.
struct Executor {
    child: Child,
    work_dir: PathBuf,
}

/// A scheduler and its executors, killed on drop.
struct Cluster {
    scheduler: Child,
    executors: Vec<Executor>,
    /// `df://127.0.0.1:PORT`.
    url: String,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// A scheduler and `executors` executors (one task at a time each) reading S3 at
    /// `s3_endpoint`.
    fn start(executors: usize, s3_endpoint: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("scheduler.log");
        let mut scheduler = Command::new(env!("CARGO_BIN_EXE_balans"))
            .args([
                "cluster",
                "scheduler",
                "--bind",
                "127.0.0.1:0",
                "--executor-timeout",
                "6",
                "--s3-endpoint",
                s3_endpoint,
            ])
            .stdout(Stdio::piped())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("start the scheduler");
        let mut line = String::new();
        BufReader::new(scheduler.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("balans: scheduler listening on ")
            .unwrap_or_else(|| panic!("unexpected scheduler output '{line}'"))
            .to_string();
        let mut cluster = Cluster {
            scheduler,
            executors: Vec::new(),
            url,
            dir,
        };
        for i in 0..executors {
            cluster.add_executor(i, s3_endpoint);
        }
        // Registration goes before the services start; give the heartbeat a moment too.
        std::thread::sleep(Duration::from_millis(1500));
        cluster
    }

    fn scheduler_address(&self) -> &str {
        self.url.strip_prefix("df://").unwrap()
    }

    fn add_executor(&mut self, i: usize, s3_endpoint: &str) {
        let (port, grpc) = (free_port(), free_port());
        let work_dir = self.dir.path().join(format!("executor{i}"));
        let log = self.dir.path().join(format!("executor{i}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_balans"))
            .args([
                "cluster",
                "executor",
                "--scheduler",
                self.scheduler_address(),
                "--bind",
                &format!("127.0.0.1:{port}"),
                "--grpc-port",
                &grpc.to_string(),
                "--concurrent-tasks",
                "1",
                "--heartbeat",
                "1",
                "--work-dir",
                arg(&work_dir),
                "--s3-endpoint",
                s3_endpoint,
            ])
            // Task and merge times of the corrections, counted below.
            .env("RUST_LOG", "balans_operators=info")
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("start an executor");
        wait_for_port(port, "an executor", &log);
        wait_for_port(grpc, "an executor", &log);
        self.executors.push(Executor { child, work_dir });
    }

    /// The executors' logs, for failure messages.
    fn logs(&self) -> String {
        let mut out = String::new();
        for entry in std::fs::read_dir(self.dir.path()).unwrap().flatten() {
            if entry.path().extension().is_some_and(|e| e == "log") {
                out += &format!(
                    "--- {}\n{}\n",
                    entry.path().display(),
                    std::fs::read_to_string(entry.path()).unwrap_or_default()
                );
            }
        }
        out
    }

    /// Stage directories (`JOB/STAGE`) holding shuffle files in executor `i`'s work directory.
    fn stages_with_output(&self, i: usize) -> Vec<String> {
        let mut stages = Vec::new();
        let Ok(jobs) = std::fs::read_dir(&self.executors[i].work_dir) else {
            return stages;
        };
        for job in jobs.flatten().filter(|j| j.path().is_dir()) {
            for stage in std::fs::read_dir(job.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                if has_file(&stage.path()) {
                    stages.push(format!(
                        "{}/{}",
                        job.file_name().to_string_lossy(),
                        stage.file_name().to_string_lossy()
                    ));
                }
            }
        }
        stages.sort();
        stages
    }
}

fn has_file(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            let p = e.path();
            if p.is_dir() { has_file(&p) } else { true }
        })
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for e in &mut self.executors {
            let _ = e.child.kill();
            let _ = e.child.wait();
        }
        let _ = self.scheduler.kill();
        let _ = self.scheduler.wait();
    }
}

/// Writes three plates of the example table as one file each under `s3://BUCKET/PREFIX/`;
/// returns the prefix's URL.
fn upload_plates(endpoint: &str, prefix: &str) -> String {
    let example = example_path();
    let local = format!("CREATE EXTERNAL TABLE local STORED AS PARQUET LOCATION '{example}'");
    for (i, batch) in ["Week1", "Week2", "Week3"].iter().enumerate() {
        let o = balans(&[
            "sql",
            "--s3-endpoint",
            endpoint,
            &format!(
                "{local}; COPY (SELECT * FROM local WHERE Metadata_Batch IN ('{batch}', 'Week{}')) \
                 TO 's3://{BUCKET}/{prefix}/{i}.parquet' STORED AS PARQUET",
                i + 4
            ),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    format!("s3://{BUCKET}/{prefix}/")
}

#[track_caller]
fn assert_success(o: &Output, cluster: &Cluster) {
    assert!(
        o.status.success(),
        "{}\n{}",
        stderr(o),
        if o.status.success() {
            String::new()
        } else {
            cluster.logs()
        }
    );
}

/// Runs `balans ARGS --output DIR/NAME-single.parquet` here and `balans ARGS
/// --output DIR/NAME-cluster.parquet --scheduler URL CLUSTER_ARGS`; returns both outputs and
/// the cluster run's process output.
#[track_caller]
fn here_and_on(
    cluster: &Cluster,
    dir: &Path,
    name: &str,
    args: &[&str],
    cluster_args: &[&str],
) -> (RecordBatch, RecordBatch, Output) {
    let single = dir.join(format!("{name}-single.parquet"));
    let distributed = dir.join(format!("{name}-cluster.parquet"));
    let o = balans(&[args, &["--output", arg(&single)]].concat());
    assert!(o.status.success(), "{name}: {}", stderr(&o));
    let o = balans(
        &[
            args,
            &["--output", arg(&distributed), "--scheduler", &cluster.url],
            cluster_args,
        ]
        .concat(),
    );
    assert_success(&o, cluster);
    (read(&single), read(&distributed), o)
}

/// What `balans ARGS` prints here and with `--scheduler URL`.
#[track_caller]
fn printed_here_and_on(cluster: &Cluster, args: &[&str]) -> (String, String) {
    let single = balans(args);
    assert!(single.status.success(), "{}", stderr(&single));
    let o = balans(&[args, &["--scheduler", &cluster.url]].concat());
    assert_success(&o, cluster);
    (stdout(&single), stdout(&o))
}

/// The files in `dir` (no temporary or partial files beside an output).
fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn jobs_on_the_cluster_give_the_single_process_results() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = Server::start();
    let endpoint = server.endpoint();
    let input = upload_plates(&endpoint, "plates");
    let cluster = Cluster::start(2, &endpoint);
    let out = tempfile::tempdir().unwrap();
    let path = |name: &str| out.path().join(name);

    // `balans correct`: BALANS and ComBat, here and on the cluster, same values.
    for (method, extra) in [
        ("balans", vec!["--seed", "3", "--k", "10"]),
        ("combat", vec![]),
    ] {
        let mut args = vec![
            "correct",
            "--input",
            &input,
            "--s3-endpoint",
            &endpoint,
            "--batch",
            "Metadata_Batch",
            "--method",
            method,
            "--partitions",
            "3",
        ];
        args.extend(extra);
        let cluster_args: &[&str] = if method == "combat" {
            &["--shuffle-compression", "none"]
        } else {
            &[]
        };
        let (a, b, o) = here_and_on(&cluster, out.path(), method, &args, cluster_args);
        assert!(
            stderr(&o).contains("corrected on the cluster"),
            "{}",
            stderr(&o)
        );
        assert!(a.num_rows() > 300, "{}", a.num_rows());
        assert_eq!(a, b, "{method}: the cluster's output differs");
    }
    // The corrections' per-partition steps ran as tasks on both executors: each holds
    // shuffle files of the same stages (BALANS: ingest, PCA Gram, reduce, smoothing, apply,
    // for each of its two passes; ComBat: ingest, moments, apply).
    let (first, second) = (cluster.stages_with_output(0), cluster.stages_with_output(1));
    let shared: Vec<&String> = first.iter().filter(|s| second.contains(s)).collect();
    assert!(
        shared.len() >= 8,
        "too few stages ran on both executors: {first:?} vs {second:?}"
    );
    // Every global step ran as one task (not once per task of the stage after it), every
    // per-partition step as one task per partition.
    let logs = cluster.logs();
    for (line, times) in [
        ("cluster merge: pass 1/2 profile of 3 partitions", 1),
        ("cluster merge: pass 1/2 landmarks of 3 partitions", 1),
        ("cluster merge: pass 2/2 smooth of 3 partitions", 1),
        ("cluster merge: combat of 3 partitions", 1),
        ("cluster task: pass 2/2 smooth-partial of partition 2/3", 1),
        ("cluster task: moments of partition 0/3", 1),
    ] {
        assert_eq!(logs.matches(line).count(), times, "{line}\n{logs}");
    }

    // SQL: a correction and an evaluation as relations.
    let table = format!("CREATE EXTERNAL TABLE p STORED AS PARQUET LOCATION '{input}'");
    let script = format!(
        "{table}; SELECT * FROM balans((SELECT * FROM p), batch => 'Metadata_Batch', k => 10, \
         seed => 5)"
    );
    let (a, b, _) = here_and_on(
        &cluster,
        out.path(),
        "sql",
        &["sql", "--s3-endpoint", &endpoint, &script],
        &[],
    );
    assert_eq!(a, b, "balans((SELECT ...))");

    let evaluate = format!(
        "{table}; SELECT metric, kind, value FROM evaluate((SELECT * FROM p), \
         batch => 'Metadata_Batch', label => 'Metadata_MoA', skip => 'kbet,classifier') \
         ORDER BY metric"
    );
    let (single, o) =
        printed_here_and_on(&cluster, &["sql", "--s3-endpoint", &endpoint, &evaluate]);
    assert!(single.contains("bio_score"), "{single}");
    assert_eq!(single, o, "evaluate((SELECT ...))");

    // `balans evaluate` and `balans preprocess` read through the cluster.
    let (single, o) = printed_here_and_on(
        &cluster,
        &[
            "evaluate",
            "--input",
            &input,
            "--s3-endpoint",
            &endpoint,
            "--batch",
            "Metadata_Batch",
            "--label",
            "Metadata_MoA",
            "--skip",
            "kbet,classifier",
        ],
    );
    assert_eq!(single, o, "balans evaluate");

    let (a, b, _) = here_and_on(
        &cluster,
        out.path(),
        "pp",
        &[
            "preprocess",
            "--input",
            &input,
            "--s3-endpoint",
            &endpoint,
            "--aggregate",
            "median",
            "--plate",
            "Metadata_Plate",
            "--well",
            "Metadata_Well",
            "--normalize",
            "mad-robustize",
        ],
        &[],
    );
    assert_eq!(a, b, "balans preprocess");

    // preprocess(...) in SQL cannot run on a cluster: a clear error.
    let o = balans(&[
        "sql",
        "--s3-endpoint",
        &endpoint,
        "--scheduler",
        &cluster.url,
        &format!(
            "{table}; SELECT count(*) FROM preprocess((SELECT * FROM p), normalize => 'standardize')"
        ),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("balans preprocess --scheduler"),
        "{}",
        stderr(&o)
    );

    // The model-embedding step (EmbedNode / EmbedExec): the executors read the model
    // directory where the client names it (one machine here).
    let model = path("model");
    let o = balans(&[
        "train",
        "--model",
        "abra",
        "-i",
        &input,
        "--s3-endpoint",
        &endpoint,
        "-b",
        "Metadata_Batch",
        "--label",
        "Metadata_Compound",
        "-o",
        arg(&model),
        "--hidden",
        "16",
        "--embedding",
        "4",
        "--epochs",
        "2",
        "--seed",
        "4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (a, b, _) = here_and_on(
        &cluster,
        out.path(),
        "embed",
        &[
            "correct",
            "--input",
            &input,
            "--s3-endpoint",
            &endpoint,
            "--batch",
            "Metadata_Batch",
            "--method",
            "embed",
            "--model",
            arg(&model),
        ],
        &[],
    );
    assert_eq!(a, b, "embed");

    // A killed executor: the job completes on the other one (Ballista re-runs the lost
    // tasks) with the same values, or fails with an error; never a partial output.
    drop(cluster);
    let mut cluster = Cluster::start(2, &endpoint);
    let reference = path("balans-single.parquet");
    let target_dir = tempfile::tempdir().unwrap();
    let target = target_dir.path().join("killed.parquet");
    let job = Command::new(env!("CARGO_BIN_EXE_balans"))
        .args([
            "--quiet",
            "correct",
            "--input",
            &input,
            "--s3-endpoint",
            &endpoint,
            "--batch",
            "Metadata_Batch",
            "--partitions",
            "3",
            "--seed",
            "3",
            "--k",
            "10",
            "--scheduler",
            &cluster.url,
            "--output",
            arg(&target),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let victim = loop {
        if let Some(i) = (0..2).find(|&i| !cluster.stages_with_output(i).is_empty()) {
            break Some(i);
        }
        if started.elapsed() > Duration::from_secs(60) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let victim = victim.expect("no executor wrote shuffle files within 60 s");
    cluster.executors[victim].child.kill().unwrap();
    let o = job.wait_with_output().unwrap();
    if o.status.success() {
        assert_eq!(read(&reference), read(&target), "after a killed executor");
        assert_eq!(files_in(target_dir.path()), vec!["killed.parquet"]);
    } else {
        let message = stderr(&o);
        assert!(message.contains("balans: error:"), "{message}");
        assert!(
            files_in(target_dir.path()).is_empty(),
            "a failed job left {:?}",
            files_in(target_dir.path())
        );
    }
    eprintln!(
        "killed executor {victim}: the job {} in {:.1} s",
        if o.status.success() {
            "completed"
        } else {
            "failed cleanly"
        },
        started.elapsed().as_secs_f64()
    );
}

#[test]
fn an_unreachable_scheduler_or_store_is_a_clear_error() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("out.parquet");
    // Nobody listens at the scheduler's address: an error within seconds, nothing written.
    let dead = format!("df://127.0.0.1:{}", free_port());
    let started = Instant::now();
    let o = balans(&[
        "correct",
        "--input",
        &example_path(),
        "--batch",
        "Metadata_Batch",
        "--scheduler",
        &dead,
        "--output",
        arg(&output),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(&format!("cannot reach the scheduler at {dead}")),
        "{}",
        stderr(&o)
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(files_in(dir.path()).is_empty());
    let o = balans(&["sql", "--scheduler", &dead, "SELECT 1"]);
    assert!(
        stderr(&o).contains("cannot reach the scheduler"),
        "{}",
        stderr(&o)
    );
    let o = balans(&["sql", "--scheduler", "127.0.0.1:1", "SELECT 1"]);
    assert!(
        stderr(&o).contains("--scheduler takes df://HOST:PORT"),
        "{}",
        stderr(&o)
    );
    // An executor on every interface must say how the others reach it.
    let o = balans(&[
        "cluster",
        "executor",
        "--scheduler",
        "127.0.0.1:1",
        "--bind",
        "0.0.0.0:0",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--external-host NAME"),
        "{}",
        stderr(&o)
    );

    // The executors cannot reach the object store the client lists: the job fails with the
    // store's error, and no output is left.
    let server = Server::start();
    let endpoint = server.endpoint();
    let input = upload_plates(&endpoint, "unreachable");
    let cluster = Cluster::start(1, &format!("http://127.0.0.1:{}", free_port()));
    let started = Instant::now();
    let o = balans(&[
        "correct",
        "--input",
        &input,
        "--s3-endpoint",
        &endpoint,
        "--batch",
        "Metadata_Batch",
        "--method",
        "combat",
        "--scheduler",
        &cluster.url,
        "--output",
        arg(&output),
    ]);
    assert!(!o.status.success(), "{}", cluster.logs());
    let message = stderr(&o);
    assert!(message.contains("balans: error:"), "{message}");
    assert!(
        message.contains("127.0.0.1") || message.to_lowercase().contains("connect"),
        "the error does not name the store: {message}"
    );
    assert!(
        files_in(dir.path()).is_empty(),
        "{:?}",
        files_in(dir.path())
    );
    eprintln!(
        "unreachable store seen from the executor: failed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
