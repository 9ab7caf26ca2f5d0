//! Terminal progress bars (one per stage) and the run summary table.

use std::sync::Mutex;
use std::time::Duration;

use balans_operators::{ProgressSink, RunSummary};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Draws one progress bar per stage on stderr and keeps the final summary.
#[derive(Debug, Default)]
pub struct TerminalProgress {
    quiet: bool,
    bar: Mutex<Option<ProgressBar>>,
    summary: Mutex<Option<RunSummary>>,
}

impl TerminalProgress {
    /// A display; `quiet` hides the bars (warnings are still printed).
    pub fn new(quiet: bool) -> Self {
        Self {
            quiet,
            ..Self::default()
        }
    }

    /// The summary of the finished run, if any.
    pub fn summary(&self) -> Option<RunSummary> {
        self.summary.lock().expect("summary lock").clone()
    }
}

impl ProgressSink for TerminalProgress {
    fn stage_started(&self, stage: &str, total: Option<u64>) {
        let bar = match total {
            Some(t) => ProgressBar::new(t).with_style(
                ProgressStyle::with_template(
                    "{prefix:>8} [{bar:30}] {pos}/{len} {msg} ({elapsed})",
                )
                .expect("template")
                .progress_chars("=> "),
            ),
            None => ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template("{prefix:>8} {spinner} {pos} rows {msg} ({elapsed})")
                    .expect("template"),
            ),
        };
        if self.quiet {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        } else {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            bar.enable_steady_tick(Duration::from_millis(200));
        }
        bar.set_prefix(stage.to_string());
        *self.bar.lock().expect("bar lock") = Some(bar);
    }

    fn stage_progress(&self, done: u64, message: Option<String>) {
        if let Some(bar) = self.bar.lock().expect("bar lock").as_ref() {
            bar.set_position(done);
            if let Some(m) = message {
                bar.set_message(m);
            }
        }
    }

    fn stage_finished(&self, _stage: &str) {
        if let Some(bar) = self.bar.lock().expect("bar lock").take() {
            bar.finish();
        }
    }

    fn warn(&self, message: &str) {
        let guard = self.bar.lock().expect("bar lock");
        match guard.as_ref() {
            Some(bar) if !self.quiet => bar.println(format!("warning: {message}")),
            _ => eprintln!("warning: {message}"),
        }
    }

    fn finished(&self, summary: &RunSummary) {
        // Several passes each report; the summary is the last pass's, with every pass's
        // stage timings and warnings.
        let mut slot = self.summary.lock().expect("summary lock");
        let mut merged = summary.clone();
        merged.landmarks_per_pass = vec![summary.landmarks];
        if let Some(previous) = slot.take() {
            merged.landmarks_per_pass = previous
                .landmarks_per_pass
                .into_iter()
                .chain([summary.landmarks])
                .collect();
            merged.peak_reserved_bytes =
                merged.peak_reserved_bytes.max(previous.peak_reserved_bytes);
            merged.stages = previous.stages.into_iter().chain(merged.stages).collect();
            let mut warnings = previous.warnings;
            for w in merged.warnings {
                if !warnings.contains(&w) {
                    warnings.push(w);
                }
            }
            merged.warnings = warnings;
        }
        *slot = Some(merged);
    }
}

/// Peak resident memory of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Formats the run summary as an aligned text table.
pub fn format_summary(s: &RunSummary, total_seconds: f64, peak: Option<u64>) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("  {k:<24} {v}\n"));
    line(
        "rows",
        format!(
            "{}{}",
            s.rows,
            if s.dropped_rows > 0 {
                format!(" ({} dropped: non-finite)", s.dropped_rows)
            } else {
                String::new()
            }
        ),
    );
    line("features", s.features.to_string());
    line(
        "distance dims",
        if s.pca_components > 0 {
            format!("{} (PCA)", s.distance_dims)
        } else {
            format!("{} (features)", s.distance_dims)
        },
    );
    let sizes: Vec<String> = s
        .batches
        .iter()
        .take(8)
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    line(
        "batches",
        format!(
            "{} [{}{}]",
            s.batches.len(),
            sizes.join(", "),
            if s.batches.len() > 8 { ", ..." } else { "" }
        ),
    );
    if s.method == "combat" || s.method == "sphering" {
        line("method", s.method.clone());
        line("fit", s.stop_reason.clone());
    } else {
        let per_pass = if s.landmarks_per_pass.len() > 1 {
            let passes: Vec<String> = s
                .landmarks_per_pass
                .iter()
                .enumerate()
                .map(|(i, m)| format!("pass {}: {m}", i + 1))
                .collect();
            format!("; {}", passes.join(", "))
        } else {
            String::new()
        };
        line(
            "landmarks m",
            format!(
                "{} ({} distinct{per_pass})",
                s.landmarks, s.distinct_landmarks
            ),
        );
        if s.anchor_rows > 0 {
            let labels = if s.anchor_labels_shared + s.anchor_labels_single_batch > 0 {
                format!(
                    "; {} label value(s) shared by several batches, {} in one batch only (not anchors)",
                    s.anchor_labels_shared, s.anchor_labels_single_batch
                )
            } else {
                String::new()
            };
            line(
                "anchors",
                format!("{} of {} rows{labels}", s.anchor_rows, s.rows),
            );
        }
        if s.sample_rows > 0 && s.sample_rows < s.rows {
            line(
                "landmark sample",
                format!("{} of {} rows", s.sample_rows, s.rows),
            );
        }
        let outside = if s.sample_rows > 0 && s.sample_rows < s.rows {
            "outside every kept ball, corrected by their nearest landmark"
        } else {
            "uncovered"
        };
        line(
            "coverage",
            format!("{:.4} ({} {outside})", s.coverage, s.uncovered),
        );
        line("stop reason", s.stop_reason.clone());
        line(
            "kept entries per row",
            format!("{:.1} (nnz {})", s.mean_kept_per_row, s.nnz),
        );
    }
    for st in &s.stages {
        line(
            &format!("time {}", st.stage),
            format!("{:.3} s", st.seconds),
        );
    }
    line("time total", format!("{total_seconds:.3} s"));
    if s.partitions > 1 {
        line("partitions", s.partitions.to_string());
    }
    if s.peak_reserved_bytes > 0 {
        line(
            "peak memory (reserved)",
            format!(
                "{:.1} MiB",
                s.peak_reserved_bytes as f64 / (1024.0 * 1024.0)
            ),
        );
    }
    if let Some(p) = peak {
        line(
            "peak memory (RSS)",
            format!("{:.1} MiB", p as f64 / (1024.0 * 1024.0)),
        );
    }
    out
}
