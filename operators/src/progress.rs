//! Progress reporting and the run summary of a correction.

use std::fmt::Debug;

/// Receives progress events from a running correction (the CLI draws progress bars from them).
pub trait ProgressSink: Send + Sync + Debug {
    /// A stage starts; `total` is its number of steps when known.
    fn stage_started(&self, stage: &str, total: Option<u64>);
    /// Work done so far in the current stage, with an optional status message.
    fn stage_progress(&self, done: u64, message: Option<String>);
    /// The current stage ended.
    fn stage_finished(&self, stage: &str);
    /// A warning the user should see (e.g. k clipped for a small batch).
    fn warn(&self, message: &str);
    /// The run finished; `summary` describes it.
    fn finished(&self, summary: &RunSummary);
}

/// A sink that ignores every event.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl ProgressSink for NoProgress {
    fn stage_started(&self, _: &str, _: Option<u64>) {}
    fn stage_progress(&self, _: u64, _: Option<String>) {}
    fn stage_finished(&self, _: &str) {}
    fn warn(&self, _: &str) {}
    fn finished(&self, _: &RunSummary) {}
}

/// Wall time of one stage.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StageTiming {
    /// Stage name.
    pub stage: String,
    /// Seconds spent.
    pub seconds: f64,
}

/// What a BALANS run did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct RunSummary {
    /// Correction method (`balans`, `combat`).
    pub method: String,
    /// Rows in the output.
    pub rows: usize,
    /// Rows dropped for non-finite features (`--nan drop-rows`).
    pub dropped_rows: usize,
    /// Input feature columns.
    pub features: usize,
    /// Dimensions used for distances (PCA components, or the features).
    pub distance_dims: usize,
    /// PCA components (0 = no PCA).
    pub pca_components: usize,
    /// Batches and their sizes, sorted by key.
    pub batches: Vec<(String, usize)>,
    /// Landmarks sampled (rows of `A_S`; a point drawn twice counts twice).
    pub landmarks: usize,
    /// Distinct landmark points.
    pub distinct_landmarks: usize,
    /// Fraction of points kept by some landmark.
    pub coverage: f64,
    /// Points no landmark keeps (they keep their input values, or take their nearest
    /// landmark's correction when the landmarks were drawn from a row sample).
    pub uncovered: usize,
    /// Why sampling stopped.
    pub stop_reason: String,
    /// `nnz(A_S)`.
    pub nnz: usize,
    /// Mean kept entries per landmark row.
    pub mean_kept_per_row: f64,
    /// Landmarks needed for full coverage.
    pub steps_to_full_coverage: Option<usize>,
    /// Constant feature columns (they pass through unchanged).
    pub constant_features: Vec<String>,
    /// Warnings raised during the run.
    pub warnings: Vec<String>,
    /// Wall time per stage.
    pub stages: Vec<StageTiming>,
    /// Rows the landmarks were sampled from (all rows when no row sample was drawn).
    pub sample_rows: usize,
    /// Input partitions the pass ran over.
    pub partitions: usize,
    /// Highest memory reserved in the session's pool during the pass.
    pub peak_reserved_bytes: usize,
    /// Landmarks of every pass so far, first pass first (filled in by sinks that merge the
    /// passes' summaries; a single pass leaves it empty).
    pub landmarks_per_pass: Vec<usize>,
    /// Anchor rows the batch offsets were estimated from (0: unanchored, every row).
    pub anchor_rows: usize,
    /// `--anchor-label` values present in at least two batches (their rows are anchors).
    pub anchor_labels_shared: usize,
    /// `--anchor-label` values present in one batch only (ignored as anchors).
    pub anchor_labels_single_batch: usize,
}
