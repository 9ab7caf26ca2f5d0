//! The `balans bench` command: the BALANS paper's synthetic scalability workload, with the
//! peer methods measured in the same run.
//!
//! For each workload it generates the synthetic data set (K = 10 compounds, B = 5 batches;
//! one file, or a directory of files; generation time not counted) and times whole processes
//! (Parquet read and write included), each in a child process so peak memory is the run's own:
//! `balans correct` with the default options (plus any extra options), and on request our
//! Harmony (`--method harmony`) and harmonypy 2.1 (`bench/peers/harmonypy_bench.py` under a
//! given Python). It prints a Markdown table: wall time, landmarks per pass, the landmark
//! sample, peak reserved and resident memory (also per row), stage times and the speed-up over
//! harmonypy.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::error::{BalansError, Result};
use crate::synth::{SynthParams, write_parquet, write_parquet_parts};

/// One workload: rows x features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// Rows.
    pub n: usize,
    /// Features.
    pub d: usize,
}

impl Workload {
    /// Parses `100000x300` or `1000000` (with `default_d` features).
    pub fn parse(text: &str, default_d: usize) -> Result<Self> {
        let bad = || BalansError::InvalidArgument(format!("workload '{text}' is not N or NxD"));
        let (n, d) = match text.split_once('x') {
            Some((n, d)) => (
                n.trim().parse().map_err(|_| bad())?,
                d.trim().parse().map_err(|_| bad())?,
            ),
            None => (text.trim().parse().map_err(|_| bad())?, default_d),
        };
        Ok(Self { n, d })
    }
}

/// How to run the benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The `balans` binary to run.
    pub exe: PathBuf,
    /// Worker threads of every run.
    pub threads: usize,
    /// Where the generated data lives (kept between runs).
    pub dir: PathBuf,
    /// Extra options for the BALANS runs (`balans correct`).
    pub extra: Vec<String>,
    /// Write each data set as a directory of files of this many rows.
    pub rows_per_file: Option<usize>,
    /// Also time our Harmony.
    pub harmony: bool,
    /// Also time harmonypy, with this Python (which has harmonypy, numpy, pandas, pyarrow).
    pub harmonypy: Option<PathBuf>,
}

/// The result of one workload.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BenchRow {
    /// Rows.
    pub n: usize,
    /// Features.
    pub d: usize,
    /// Input files.
    pub files: usize,
    /// Wall time of the BALANS correction (child process, reading and writing Parquet).
    pub seconds: f64,
    /// Landmarks of each pass.
    pub landmarks_per_pass: Vec<u64>,
    /// Rows of the landmark sample (last pass).
    pub sample_rows: u64,
    /// Coverage (last pass).
    pub coverage: f64,
    /// Peak resident memory of the run.
    pub peak_rss_bytes: u64,
    /// Peak memory reserved in the session's pool.
    pub peak_reserved_bytes: u64,
    /// Float32 size of the feature matrix.
    pub input_f32_bytes: u64,
    /// Seconds per stage.
    pub stages: Vec<(String, f64)>,
    /// Wall time of our Harmony, when measured.
    pub harmony_seconds: Option<f64>,
    /// Wall time of harmonypy, when measured.
    pub harmonypy_seconds: Option<f64>,
    /// Why the BALANS run failed, if it did.
    pub error: Option<String>,
}

/// The data set of workload `w` (generated unless present).
fn data_set(w: &Workload, opts: &BenchOptions) -> Result<(PathBuf, usize)> {
    let params = SynthParams {
        n: w.n,
        d: w.d,
        k: 10,
        batches: 5,
        seed: 7,
        ..SynthParams::default()
    };
    match opts.rows_per_file {
        Some(per) => {
            let path = opts.dir.join(format!("synthetic_{}x{}_per{per}", w.n, w.d));
            if !path.is_dir() {
                write_parquet_parts(&params, &path, per, 65_536)?;
            }
            let files = std::fs::read_dir(&path)?.count();
            Ok((path, files))
        }
        None => {
            let path = opts.dir.join(format!("synthetic_{}x{}.parquet", w.n, w.d));
            if !path.exists() {
                write_parquet(&params, &path, 65_536)?;
            }
            Ok((path, 1))
        }
    }
}

/// Runs `balans correct` on `input` with `args`; returns wall seconds, or the failure.
fn time_correct(
    opts: &BenchOptions,
    input: &Path,
    summary: Option<&Path>,
    args: &[String],
) -> Result<std::result::Result<f64, String>> {
    let output = opts.dir.join("corrected.parquet");
    let mut cmd = Command::new(&opts.exe);
    cmd.args([
        "--quiet",
        "--threads",
        &opts.threads.to_string(),
        "correct",
        "--batch",
        "Metadata_Batch",
        "--overwrite",
    ])
    .arg("--input")
    .arg(input)
    .arg("--output")
    .arg(&output)
    .args(args);
    if let Some(s) = summary {
        cmd.arg("--summary-json").arg(s);
    }
    let started = Instant::now();
    let out = cmd.output()?;
    let seconds = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&output);
    Ok(if out.status.success() {
        Ok(seconds)
    } else {
        Err(String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("failed")
            .to_string())
    })
}

/// Runs harmonypy on `input` with `python`; returns wall seconds.
fn time_harmonypy(python: &Path, input: &Path, opts: &BenchOptions) -> Result<f64> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/peers/harmonypy_bench.py");
    let output = opts.dir.join("harmonypy.parquet");
    let started = Instant::now();
    let status = Command::new(python)
        .arg(&script)
        .arg(input)
        .arg(&output)
        .env("OMP_NUM_THREADS", opts.threads.to_string())
        .env("OPENBLAS_NUM_THREADS", opts.threads.to_string())
        .status()?;
    let seconds = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&output);
    if !status.success() {
        return Err(BalansError::InvalidArgument(format!(
            "harmonypy on {} failed",
            input.display()
        )));
    }
    Ok(seconds)
}

/// Runs every workload.
pub fn run_bench(workloads: &[Workload], opts: &BenchOptions) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    for w in workloads {
        let (input, files) = data_set(w, opts)?;
        let summary = opts.dir.join("summary.json");
        let _ = std::fs::remove_file(&summary);
        let mut row = BenchRow {
            n: w.n,
            d: w.d,
            files,
            input_f32_bytes: (w.n * w.d * 4) as u64,
            ..BenchRow::default()
        };
        match time_correct(opts, &input, Some(&summary), &opts.extra)? {
            Ok(seconds) => {
                row.seconds = seconds;
                let s: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(&summary)?)
                        .map_err(|e| BalansError::InvalidArgument(format!("bad summary: {e}")))?;
                row.stages = s["stages"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|st| {
                                (
                                    st["stage"].as_str().unwrap_or("?").to_string(),
                                    st["seconds"].as_f64().unwrap_or(0.0),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                row.landmarks_per_pass = s["landmarks_per_pass"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
                    .unwrap_or_default();
                row.sample_rows = s["sample_rows"].as_u64().unwrap_or(0);
                row.coverage = s["coverage"].as_f64().unwrap_or(0.0);
                row.peak_rss_bytes = s["peak_rss_bytes"].as_u64().unwrap_or(0);
                row.peak_reserved_bytes = s["peak_reserved_bytes"].as_u64().unwrap_or(0);
            }
            Err(e) => row.error = Some(e),
        }
        if opts.harmony {
            let args = vec!["--method".to_string(), "harmony".to_string()];
            row.harmony_seconds = time_correct(opts, &input, None, &args)?.ok();
        }
        if let Some(python) = &opts.harmonypy {
            row.harmonypy_seconds = Some(time_harmonypy(python, &input, opts)?);
        }
        rows.push(row);
    }
    Ok(rows)
}

/// Formats the results as a Markdown table.
pub fn markdown_table(rows: &[BenchRow]) -> String {
    let mut out = String::from(
        "| n | d | files | BALANS (s) | Harmony, ours (s) | harmonypy (s) | harmonypy / BALANS | m per pass | landmark sample | peak reserved (MiB) | peak RSS (MiB) | RSS bytes / row | stages (s) |\n\
         |---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|\n",
    );
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |s| format!("{s:.2}"));
    for r in rows {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let stages: Vec<String> = r
            .stages
            .iter()
            .map(|(s, t)| format!("{s} {t:.2}"))
            .collect();
        let balans = match &r.error {
            Some(e) => format!("failed: {e}"),
            None => format!("{:.2}", r.seconds),
        };
        let ratio = match (r.harmonypy_seconds, r.error.is_none()) {
            (Some(h), true) if r.seconds > 0.0 => format!("{:.1}x", h / r.seconds),
            _ => "-".to_string(),
        };
        let m: Vec<String> = r.landmarks_per_pass.iter().map(|m| m.to_string()).collect();
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {} |\n",
            r.n,
            r.d,
            r.files,
            balans,
            opt(r.harmony_seconds),
            opt(r.harmonypy_seconds),
            ratio,
            m.join(", "),
            r.sample_rows,
            mib(r.peak_reserved_bytes),
            mib(r.peak_rss_bytes),
            r.peak_rss_bytes as f64 / r.n.max(1) as f64,
            stages.join(", ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_workloads() {
        assert_eq!(
            Workload::parse("100000x300", 10).unwrap(),
            Workload { n: 100_000, d: 300 }
        );
        assert_eq!(
            Workload::parse("5000000", 10).unwrap(),
            Workload {
                n: 5_000_000,
                d: 10
            }
        );
        assert!(Workload::parse("big", 10).is_err());
    }

    #[test]
    fn table_shows_failures_and_ratios() {
        let ok = BenchRow {
            n: 10,
            d: 2,
            files: 1,
            seconds: 2.0,
            harmonypy_seconds: Some(8.0),
            landmarks_per_pass: vec![5, 4],
            ..BenchRow::default()
        };
        let failed = BenchRow {
            error: Some("out of memory".into()),
            ..ok.clone()
        };
        let table = markdown_table(&[ok, failed]);
        assert!(table.contains("| 4.0x |"), "{table}");
        assert!(table.contains("| 5, 4 |"), "{table}");
        assert!(table.contains("failed: out of memory"), "{table}");
    }
}
