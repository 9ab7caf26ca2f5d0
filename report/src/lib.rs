//! Self-contained HTML evaluation reports for batch correction: a metric table, a grouped bar
//! chart of the metrics, 2-D embeddings coloured by batch and by label, and an affinity heatmap
//! (rows ordered by batch, columns by label, as in the BALANS paper's Figure 1).
//!
//! Figures are drawn with `plotters` into in-memory RGB buffers, PNG-encoded and embedded as
//! `data:image/png;base64` URIs, so the HTML file needs no external resource. Text is drawn with
//! a bundled DejaVu Sans font (no system font lookup). Output bytes depend only on the input.

mod figures;
mod html;
mod palette;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub use figures::{
    EMBEDDING_FIGURE_SIZE, Figure, HEATMAP_FIGURE_SIZE, METRICS_FIGURE_WIDTH, embedding_figure,
    heatmap_figure, metrics_figure, metrics_figure_height,
};
pub use html::render_html;

/// The kind of a metric, used to group rows in the table and the bar chart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MetricGroup {
    /// Batch-removal metrics (e.g. iLISI, kBET, graph connectivity).
    Batch,
    /// Biological-conservation metrics (e.g. NMI, ARI, mAP).
    Bio,
    /// Aggregate scores (e.g. the 0.4 batch + 0.6 bio overall score).
    Aggregate,
    /// Anything else.
    Other,
}

impl MetricGroup {
    /// Display name of the group.
    pub fn name(self) -> &'static str {
        match self {
            Self::Batch => "batch",
            Self::Bio => "bio",
            Self::Aggregate => "aggregate",
            Self::Other => "other",
        }
    }
}

/// One metric with one value per report column (e.g. before / after correction).
#[derive(Debug, Clone, PartialEq)]
pub struct MetricRow {
    /// Metric name.
    pub name: String,
    /// Group the metric belongs to.
    pub group: MetricGroup,
    /// One value per column of [`ReportInput::columns`]; `None` when not computed.
    pub values: Vec<Option<f64>>,
    /// Whether a larger value is better (decides which value is highlighted).
    pub higher_is_better: bool,
}

/// A 2-D embedding of the same points, coloured once by batch and once by label.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingPanel {
    /// Panel title, e.g. "before correction".
    pub title: String,
    /// One 2-D point per row.
    pub coords: Vec<[f64; 2]>,
    /// Batch code of each row, indexing `batch_names`.
    pub batch: Vec<u32>,
    /// Name of each batch code.
    pub batch_names: Vec<String>,
    /// Label code of each row, indexing `label_names`.
    pub label: Vec<u32>,
    /// Name of each label code.
    pub label_names: Vec<String>,
}

/// A dense affinity matrix whose rows are ordered by batch and columns by label.
#[derive(Debug, Clone, PartialEq)]
pub struct Heatmap {
    /// Figure title.
    pub title: String,
    /// Row-major `n_rows x n_cols` values.
    pub values: Vec<f64>,
    /// Number of rows.
    pub n_rows: usize,
    /// Number of columns.
    pub n_cols: usize,
    /// What the row groups are (e.g. "batch").
    pub row_label: String,
    /// What the column groups are (e.g. "compound").
    pub col_label: String,
    /// Consecutive row groups as `(name, number of rows)`, in row order; counts sum to `n_rows`.
    pub row_groups: Vec<(String, usize)>,
    /// Consecutive column groups as `(name, number of columns)`; counts sum to `n_cols`.
    pub col_groups: Vec<(String, usize)>,
}

/// Everything a report shows.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReportInput {
    /// Page title.
    pub title: String,
    /// Line under the title (data set, method, parameters).
    pub subtitle: String,
    /// Names of the metric value columns, e.g. `["before", "after"]`.
    pub columns: Vec<String>,
    /// Metric rows; each has one value per column.
    pub metrics: Vec<MetricRow>,
    /// Embedding panels, e.g. before and after correction.
    pub panels: Vec<EmbeddingPanel>,
    /// Affinity heatmaps, e.g. before and after correction (drawn side by side in order).
    pub heatmaps: Vec<Heatmap>,
    /// Free-text notes listed at the end.
    pub notes: Vec<String>,
}

/// Errors raised while building or writing a report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The input has nothing to show, or inconsistent shapes, codes or values.
    #[error("invalid report input: {0}")]
    InvalidInput(String),
    /// Drawing or PNG encoding of a figure failed.
    #[error("figure rendering failed: {0}")]
    Render(String),
    /// Reading or writing a file failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The destination exists and is not a report written by this crate; it is left untouched.
    #[error("refusing to replace {0}: it exists and is not a balans report")]
    WouldOverwrite(PathBuf),
}

/// Marker written into every report; [`write_html_atomic`] only replaces files that carry it.
pub const GENERATOR_MARKER: &str = r#"<meta name="generator" content="balans-report">"#;

/// Writes `html` to `path` atomically: to a new temporary file in the same directory, synced,
/// then renamed over `path`.
///
/// An existing file at `path` is replaced only if it is a previous report (its first 4 KiB
/// contain [`GENERATOR_MARKER`]); anything else, such as an input data file given by mistake,
/// is refused with [`ReportError::WouldOverwrite`]. `html` itself must carry the marker.
pub fn write_html_atomic(path: &Path, html: &str) -> Result<(), ReportError> {
    if !html.contains(GENERATOR_MARKER) {
        return Err(ReportError::InvalidInput(
            "write_html_atomic writes reports from render_html only".into(),
        ));
    }
    let io_error = |source| ReportError::Io {
        path: path.to_path_buf(),
        source,
    };
    if path.exists() && !is_previous_report(path).map_err(io_error)? {
        return Err(ReportError::WouldOverwrite(path.to_path_buf()));
    }
    let file_name = path
        .file_name()
        .ok_or_else(|| ReportError::InvalidInput(format!("{} has no file name", path.display())))?;
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (temp_path, mut temp) = create_temp_file(&dir, &file_name.to_string_lossy())?;
    let written = temp
        .write_all(html.as_bytes())
        .and_then(|()| temp.sync_all())
        .and_then(|()| std::fs::rename(&temp_path, path));
    if let Err(source) = written {
        // Best effort: the temporary file is ours and incomplete.
        let _ = std::fs::remove_file(&temp_path);
        return Err(io_error(source));
    }
    Ok(())
}

/// Whether the file at `path` starts like a report written by this crate.
fn is_previous_report(path: &Path) -> std::io::Result<bool> {
    if !path.is_file() {
        return Ok(false);
    }
    let mut head = Vec::with_capacity(4096);
    std::fs::File::open(path)?
        .take(4096)
        .read_to_end(&mut head)?;
    Ok(String::from_utf8_lossy(&head).contains(GENERATOR_MARKER))
}

/// Creates a fresh `.{name}.tmp-{pid}-{i}` file in `dir`, never reusing an existing name.
fn create_temp_file(dir: &Path, name: &str) -> Result<(PathBuf, std::fs::File), ReportError> {
    let pid = std::process::id();
    for attempt in 0..1000 {
        let candidate = dir.join(format!(".{name}.tmp-{pid}-{attempt}"));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&candidate)
        {
            Ok(file) => return Ok((candidate, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(source) => {
                return Err(ReportError::Io {
                    path: candidate,
                    source,
                });
            }
        }
    }
    Err(ReportError::InvalidInput(format!(
        "could not find a free temporary file name in {}",
        dir.display()
    )))
}
