//! The `balans bench` command: the BALANS paper's synthetic scalability workload.
//!
//! For each workload it generates the synthetic data set (K = 10 compounds, B = 5 batches;
//! generation time not counted), runs `balans correct` on it in a child process (so peak
//! memory is that run's own) and prints a Markdown table of wall time, landmarks, coverage and
//! peak memory against the float32 input size.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::error::{BalansError, Result};
use crate::synth::{SynthParams, write_parquet};

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

/// The result of one workload.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchRow {
    /// Rows.
    pub n: usize,
    /// Features.
    pub d: usize,
    /// Wall time of the correction (child process, including reading and writing Parquet).
    pub seconds: f64,
    /// Landmarks.
    pub landmarks: u64,
    /// Coverage.
    pub coverage: f64,
    /// Peak resident memory of the run.
    pub peak_rss_bytes: u64,
    /// Float32 size of the feature matrix.
    pub input_f32_bytes: u64,
    /// Seconds per stage.
    pub stages: Vec<(String, f64)>,
}

/// Runs every workload with `threads` worker threads, using `exe` as the `balans` binary and
/// `dir` for the generated data.
pub fn run_bench(
    exe: &Path,
    workloads: &[Workload],
    threads: usize,
    dir: &Path,
    extra: &[String],
) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    for w in workloads {
        let input = dir.join(format!("synthetic_{}x{}.parquet", w.n, w.d));
        if !input.exists() {
            let params = SynthParams {
                n: w.n,
                d: w.d,
                k: 10,
                batches: 5,
                seed: 7,
                ..SynthParams::default()
            };
            write_parquet(&params, &input, 65_536)?;
        }
        let output = dir.join("corrected.parquet");
        let summary = dir.join("summary.json");
        let started = Instant::now();
        let status = Command::new(exe)
            .args([
                "--quiet",
                "--threads",
                &threads.to_string(),
                "correct",
                "--batch",
                "Metadata_Batch",
                "--overwrite",
            ])
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .arg("--summary-json")
            .arg(&summary)
            .args(extra)
            .status()?;
        let seconds = started.elapsed().as_secs_f64();
        if !status.success() {
            return Err(BalansError::InvalidArgument(format!(
                "benchmark run {}x{} failed",
                w.n, w.d
            )));
        }
        let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&summary)?)
            .map_err(|e| BalansError::InvalidArgument(format!("bad summary: {e}")))?;
        let stages = s["stages"]
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
        rows.push(BenchRow {
            n: w.n,
            d: w.d,
            seconds,
            landmarks: s["landmarks"].as_u64().unwrap_or(0),
            coverage: s["coverage"].as_f64().unwrap_or(0.0),
            peak_rss_bytes: s["peak_rss_bytes"].as_u64().unwrap_or(0),
            input_f32_bytes: (w.n * w.d * 4) as u64,
            stages,
        });
        let _ = std::fs::remove_file(&output);
    }
    Ok(rows)
}

/// Formats the results as a Markdown table.
pub fn markdown_table(rows: &[BenchRow]) -> String {
    let mut out = String::from(
        "| n | d | wall (s) | landmarks m | coverage | peak RSS (MiB) | f32 input (MiB) | peak / input | stages (s) |\n|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let stages: Vec<String> = r
            .stages
            .iter()
            .map(|(s, t)| format!("{s} {t:.2}"))
            .collect();
        out.push_str(&format!(
            "| {} | {} | {:.2} | {} | {:.4} | {:.0} | {:.0} | {:.2} | {} |\n",
            r.n,
            r.d,
            r.seconds,
            r.landmarks,
            r.coverage,
            mib(r.peak_rss_bytes),
            mib(r.input_f32_bytes),
            r.peak_rss_bytes as f64 / r.input_f32_bytes as f64,
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
}
