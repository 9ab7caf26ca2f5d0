//! The `evaluate` job: read an embedding (a profile table), run the metric suite of
//! [`balans_metrics::suite`], and present the results (text table, JSON, HTML report).

use std::fmt::Write as _;
use std::sync::Arc;

use arrow::datatypes::DataType;
use balans_metrics::suite::{EvalInput, EvalOptions, EvalReport, evaluate};
use balans_metrics::{Codes, MetricsError};
use datafusion::functions::core::expr_fn::coalesce;
use datafusion::logical_expr::{Expr, ExprSchemable};
use datafusion::prelude::{SessionContext, lit};
use futures::StreamExt;
use serde::Serialize;

pub use balans_planner::evaluate::{DEFAULT_PLATE_COLUMN, DEFAULT_WELL_COLUMN};

use balans_operators::exec::evaluate::CanonicalRows;
use balans_planner::evaluate::canonical_columns;

use crate::error::{BalansError, Result};
use crate::source::{
    FeatureSelection, ProfileTable, SourceOptions, register_profiles, resolve_columns,
};

/// What to evaluate and how.
#[derive(Debug, Clone)]
pub struct EvaluateRequest {
    /// Input location (as for `correct`).
    pub input: String,
    /// Batch column(s); several are combined into one key.
    pub batch: Vec<String>,
    /// Biological label column (perturbation, compound, MoA).
    pub label: String,
    /// SQL predicate over the columns that marks negative-control rows.
    pub negcon: Option<String>,
    /// Plate column (default `Metadata_Plate` when present).
    pub plate: Option<String>,
    /// Well column (default `Metadata_Well` when present).
    pub well: Option<String>,
    /// Embedding columns.
    pub selection: FeatureSelection,
    /// Suite parameters.
    pub options: EvalOptions,
    /// Object-store options.
    pub source: SourceOptions,
}

/// An embedding read into memory with the metadata the metrics need.
#[derive(Debug, Clone)]
pub struct LoadedEmbedding {
    /// The table read.
    pub table: ProfileTable,
    /// Embedding columns, in order.
    pub features: Vec<String>,
    /// Row-major embedding, `n * d`.
    pub x: Vec<f64>,
    /// Batch of each row.
    pub batch: Codes,
    /// Label of each row.
    pub label: Codes,
    /// Plate of each row, if a plate column exists.
    pub plate: Option<Codes>,
    /// Well of each row, if a well column exists.
    pub well: Option<Codes>,
    /// Negative-control flag of each row.
    pub is_negcon: Vec<bool>,
    /// The plate column used.
    pub plate_column: Option<String>,
    /// The well column used.
    pub well_column: Option<String>,
}

impl LoadedEmbedding {
    /// Rows read.
    pub fn n_rows(&self) -> usize {
        self.is_negcon.len()
    }

    /// Embedding dimensions.
    pub fn d(&self) -> usize {
        self.features.len()
    }

    /// The suite's view of this embedding.
    pub fn as_input(&self) -> EvalInput<'_> {
        EvalInput {
            x: &self.x,
            d: self.d(),
            batch: &self.batch,
            label: &self.label,
            is_negcon: &self.is_negcon,
            plate: self.plate.as_ref(),
            well: self.well.as_ref(),
        }
    }
}

/// The result of one evaluation, as written to `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    /// The input location.
    pub input: String,
    /// Batch column(s).
    pub batch: Vec<String>,
    /// Label column.
    pub label: String,
    /// Negative-control predicate.
    pub negcon: Option<String>,
    /// Plate column used.
    pub plate: Option<String>,
    /// Well column used.
    pub well: Option<String>,
    /// Embedding columns used.
    pub n_features: usize,
    /// Everything the suite computed.
    pub report: EvalReport,
}

/// Reads the embedding and metadata of `request` from a table registered as `table_name`.
pub async fn load_embedding(
    ctx: &SessionContext,
    request: &EvaluateRequest,
    table_name: &str,
) -> Result<LoadedEmbedding> {
    let table = register_profiles(ctx, &request.input, table_name, &request.source).await?;
    let schema = table.schema.clone();
    let require = |name: &str, role: &str| -> Result<()> {
        if schema.index_of(name).is_err() {
            return Err(BalansError::BadInput(format!(
                "{role} column '{name}' is not in {} (columns: {})",
                request.input,
                column_preview(&schema)
            )));
        }
        Ok(())
    };
    require(&request.label, "label")?;
    let optional_column =
        |given: &Option<String>, default: &str, role: &str| -> Result<Option<String>> {
            match given {
                Some(name) => {
                    require(name, role)?;
                    Ok(Some(name.clone()))
                }
                None => Ok(schema
                    .index_of(default)
                    .is_ok()
                    .then(|| default.to_string())),
            }
        };
    let plate_column = optional_column(&request.plate, DEFAULT_PLATE_COLUMN, "plate")?;
    let well_column = optional_column(&request.well, DEFAULT_WELL_COLUMN, "well")?;
    if request.options.metrics.map && plate_column.is_none() {
        return Err(BalansError::BadInput(format!(
            "mAP needs a plate column (negatives come from the same plate) and {} has no \
             '{DEFAULT_PLATE_COLUMN}': name one with --plate COL, or skip mAP with --skip map",
            request.input
        )));
    }
    let mut roles = resolve_columns(&schema, &request.selection, &request.batch)?;
    let metadata_roles: Vec<&String> = [
        Some(&request.label),
        plate_column.as_ref(),
        well_column.as_ref(),
    ]
    .into_iter()
    .flatten()
    .collect();
    roles.features.retain(|f| !metadata_roles.contains(&f));
    if roles.features.is_empty() {
        return Err(BalansError::BadInput(
            "no embedding columns left after removing the label, plate and well columns".into(),
        ));
    }

    let df = ctx.table(table_name).await?;
    let negcon_expr = match &request.negcon {
        Some(predicate) => negcon_predicate(&df, predicate)?,
        None => lit(false),
    };
    let select = canonical_columns(
        df.schema(),
        &roles.features,
        &roles.batch,
        &request.label,
        plate_column.as_deref(),
        well_column.as_deref(),
        negcon_expr,
    )?;
    let df = df.select(select).map_err(|e| match &request.negcon {
        Some(p) => BalansError::InvalidArgument(format!("--negcon '{p}' cannot be evaluated: {e}")),
        None => BalansError::DataFusion(e),
    })?;
    let d = roles.features.len();
    let mut collected = CanonicalRows::default();
    let mut stream = df.execute_stream().await?;
    while let Some(batch) = stream.next().await {
        collected.push(&batch?, d)?;
    }
    let CanonicalRows {
        x,
        batch: batch_values,
        label: label_values,
        plate: plate_values,
        well: well_values,
        is_negcon,
    } = collected;
    if is_negcon.is_empty() {
        return Err(BalansError::BadInput(format!(
            "{} has no rows",
            request.input
        )));
    }
    Ok(LoadedEmbedding {
        table,
        features: roles.features,
        x,
        batch: Codes::from_strings(&batch_values),
        label: Codes::from_strings(&label_values),
        plate: plate_column
            .as_ref()
            .map(|_| Codes::from_strings(&plate_values)),
        well: well_column
            .as_ref()
            .map(|_| Codes::from_strings(&well_values)),
        is_negcon,
        plate_column,
        well_column,
    })
}

/// Runs the suite on a loaded embedding (CPU-bound; call it from a blocking task).
pub fn evaluate_loaded(
    request: &EvaluateRequest,
    loaded: &LoadedEmbedding,
    on_step: &dyn Fn(&str),
) -> Result<Evaluation> {
    if request.negcon.is_some() && !loaded.is_negcon.iter().any(|&c| c) {
        return Err(BalansError::BadInput(format!(
            "--negcon '{}' matches no row of {}",
            request.negcon.as_deref().unwrap_or_default(),
            request.input
        )));
    }
    let report = evaluate(&loaded.as_input(), &request.options, on_step).map_err(|e| match e {
        MetricsError::NonFinite { count, rows } => BalansError::BadInput(format!(
            "the embedding of {} has NaN or infinite values in {count} row(s) (0-based rows \
             {}): drop or impute them first (e.g. `balans correct --nan drop-rows`)",
            request.input,
            rows.iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        other => BalansError::BadInput(other.to_string()),
    })?;
    Ok(Evaluation {
        input: request.input.clone(),
        batch: request.batch.clone(),
        label: request.label.clone(),
        negcon: request.negcon.clone(),
        plate: loaded.plate_column.clone(),
        well: loaded.well_column.clone(),
        n_features: loaded.d(),
        report,
    })
}

/// Loads and evaluates `request`; `on_step` is told each metric step as it starts. The metrics
/// run on a blocking thread.
pub async fn run_evaluate(
    ctx: &SessionContext,
    request: &EvaluateRequest,
    table_name: &str,
    on_step: Arc<dyn Fn(&str) + Send + Sync>,
) -> Result<(LoadedEmbedding, Evaluation)> {
    let loaded = load_embedding(ctx, request, table_name).await?;
    let request = request.clone();
    tokio::task::spawn_blocking(move || {
        let evaluation = evaluate_loaded(&request, &loaded, &*on_step)?;
        Ok((loaded, evaluation))
    })
    .await
    .map_err(|e| BalansError::BadInput(format!("the evaluation failed: {e}")))?
}

/// A plain-text table of the scores of one or more evaluations, side by side.
pub fn format_scores(columns: &[(&str, &Evaluation)]) -> String {
    let mut out = String::new();
    let width = columns
        .iter()
        .map(|(name, _)| name.len())
        .max()
        .unwrap_or(0)
        .max(9);
    let _ = write!(out, "{:<20}", "metric");
    for (name, _) in columns {
        let _ = write!(out, " {name:>width$}");
    }
    out.push('\n');
    let rows: Vec<Vec<(&str, &str, Option<f64>)>> = columns
        .iter()
        .map(|(_, e)| e.report.scores.rows())
        .collect();
    let mut last_group = "";
    for (i, (metric, group, _)) in rows[0].iter().enumerate() {
        if *group != last_group {
            let _ = writeln!(out, "[{group}]");
            last_group = group;
        }
        let _ = write!(out, "  {metric:<18}");
        for column in &rows {
            match column[i].2 {
                Some(v) => {
                    let _ = write!(out, " {v:>width$.4}");
                }
                None => {
                    let _ = write!(out, " {:>width$}", "-");
                }
            }
        }
        out.push('\n');
    }
    for (name, evaluation) in columns {
        let r = &evaluation.report;
        let _ = writeln!(
            out,
            "{name}: {} rows, {} negative controls, {} cells, {} batches, {} labels, {} dims",
            r.n_rows, r.n_negcon, r.n_cells, r.n_batches, r.n_labels, r.n_dims
        );
        if let Some(s) = &r.subsampled {
            let _ = writeln!(out, "{name}: subsampled: {s}");
        }
        for w in &r.warnings {
            let _ = writeln!(out, "{name}: warning: {w}");
        }
    }
    out
}

/// Stage timings of an evaluation as `step seconds` lines.
pub fn format_timings(evaluation: &Evaluation) -> String {
    let mut out = String::new();
    for t in &evaluation.report.timings {
        let _ = writeln!(out, "  {:<28} {:>8.2} s", t.step, t.seconds);
    }
    out
}

fn column_preview(schema: &arrow::datatypes::Schema) -> String {
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    if names.len() > 12 {
        format!("{}, ... ({} in all)", names[..12].join(", "), names.len())
    } else {
        names.join(", ")
    }
}

/// Cells drawn per heatmap (the affinity matrix is drawn between these cells).
const HEATMAP_MAX_CELLS: usize = 300;
/// Above this many cells the 2-D picture uses PCA instead of a UMAP layout.
const UMAP_MAX_CELLS: usize = 50_000;
/// UMAP epochs of the report's layout.
const UMAP_EPOCHS: usize = 200;

/// Renders the HTML report of one or more evaluations (e.g. before / after): a 2-D embedding
/// per evaluation coloured by batch and by label, the metric table and bar chart, and the
/// affinity heatmaps (rows ordered by batch, columns by label).
pub fn render_report(
    columns: &[(&str, &LoadedEmbedding, &Evaluation)],
    seed: u64,
) -> Result<String> {
    use balans_report::{EmbeddingPanel, MetricGroup, MetricRow, ReportInput};
    let first = columns
        .first()
        .ok_or_else(|| BalansError::InvalidArgument("nothing to report".into()))?;
    let mut panels = Vec::new();
    let mut heatmaps = Vec::new();
    let mut notes = Vec::new();
    for (name, loaded, evaluation) in columns {
        let report = &evaluation.report;
        let rows = &report.cells.rows;
        let cells_x = balans_metrics::gather_rows(&loaded.x, loaded.d(), rows);
        let (coords, method) = match &report.cells.graph {
            Some(graph) if rows.len() <= UMAP_MAX_CELLS => (
                balans_metrics::layout::umap_layout(graph, UMAP_EPOCHS, seed)
                    .map_err(|e| BalansError::BadInput(format!("UMAP layout: {e}")))?,
                "UMAP",
            ),
            _ => (
                balans_metrics::layout::pca_2d(&cells_x, loaded.d())
                    .map_err(|e| BalansError::BadInput(format!("PCA layout: {e}")))?,
                "PCA",
            ),
        };
        if method == "PCA" && report.cells.graph.is_some() {
            notes.push(format!(
                "{name}: {} cells is above {UMAP_MAX_CELLS}: the picture shows the first two \
                 principal components instead of a UMAP layout",
                rows.len()
            ));
        }
        let batch = loaded.batch.subset(rows);
        let label = loaded.label.subset(rows);
        panels.push(EmbeddingPanel {
            title: format!("{name}: {method} of {} cells", rows.len()),
            coords,
            batch: batch.codes.clone(),
            batch_names: batch.names.clone(),
            label: label.codes.clone(),
            label_names: label.names.clone(),
        });
        heatmaps.push(affinity_heatmap(
            name,
            &cells_x,
            loaded.d(),
            &batch,
            &label,
            seed,
        ));
        if let Some(s) = &report.subsampled {
            notes.push(format!("{name}: subsampled: {s}"));
        }
        for w in &report.warnings {
            notes.push(format!("{name}: {w}"));
        }
    }
    let metric_names = first.2.report.scores.rows();
    let metrics = metric_names
        .iter()
        .enumerate()
        .map(|(i, (metric, group, _))| MetricRow {
            name: metric.to_string(),
            group: match *group {
                "batch" => MetricGroup::Batch,
                "bio" => MetricGroup::Bio,
                "aggregate" => MetricGroup::Aggregate,
                _ => MetricGroup::Other,
            },
            higher_is_better: true,
            values: columns
                .iter()
                .map(|(_, _, e)| e.report.scores.rows()[i].2)
                .collect(),
        })
        .collect();
    let r = &first.2.report;
    let input = ReportInput {
        title: "Balans evaluation".to_string(),
        subtitle: format!(
            "{} — {} rows, {} cells, {} batches ({}), {} labels ({}), {} dims",
            columns
                .iter()
                .map(|(n, _, e)| format!("{n}: {}", e.input))
                .collect::<Vec<_>>()
                .join(" · "),
            r.n_rows,
            r.n_cells,
            r.n_batches,
            first.2.batch.join(", "),
            r.n_labels,
            first.2.label,
            r.n_dims
        ),
        columns: columns.iter().map(|(n, _, _)| n.to_string()).collect(),
        metrics,
        panels,
        heatmaps,
        notes,
    };
    balans_report::render_html(&input)
        .map_err(|e| BalansError::InvalidArgument(format!("cannot render the report: {e}")))
}

/// Pearson correlations between up to [`HEATMAP_MAX_CELLS`] cells (drawn at random, seeded),
/// rows ordered by batch then label, columns by label then batch (the BALANS paper's Figure 1).
fn affinity_heatmap(
    name: &str,
    x: &[f64],
    d: usize,
    batch: &Codes,
    label: &Codes,
    seed: u64,
) -> balans_report::Heatmap {
    use rand::SeedableRng;
    let n = batch.codes.len();
    let mut picked: Vec<usize> = if n > HEATMAP_MAX_CELLS {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        rand::seq::index::sample(&mut rng, n, HEATMAP_MAX_CELLS).into_vec()
    } else {
        (0..n).collect()
    };
    picked.sort_unstable();
    // Centred, unit-norm rows: a dot product is then the Pearson correlation.
    let centred: Vec<Vec<f64>> = picked
        .iter()
        .map(|&i| {
            let row = &x[i * d..(i + 1) * d];
            let mean = row.iter().sum::<f64>() / d as f64;
            let mut v: Vec<f64> = row.iter().map(|a| a - mean).collect();
            let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
            if norm > 0.0 {
                v.iter_mut().for_each(|a| *a /= norm);
            }
            v
        })
        .collect();
    let by = |primary: &Codes, secondary: &Codes| {
        let mut order: Vec<usize> = (0..picked.len()).collect();
        order.sort_by_key(|&p| (primary.codes[picked[p]], secondary.codes[picked[p]], p));
        order
    };
    let row_order = by(batch, label);
    let col_order = by(label, batch);
    let mut values = Vec::with_capacity(picked.len() * picked.len());
    for &r in &row_order {
        for &c in &col_order {
            values.push(centred[r].iter().zip(&centred[c]).map(|(a, b)| a * b).sum());
        }
    }
    let groups = |order: &[usize], codes: &Codes| {
        let mut out: Vec<(String, usize)> = Vec::new();
        for &p in order {
            let group = &codes.names[codes.codes[picked[p]] as usize];
            match out.last_mut() {
                Some((g, count)) if g == group => *count += 1,
                _ => out.push((group.clone(), 1)),
            }
        }
        out
    };
    balans_report::Heatmap {
        title: format!(
            "{name}: correlation between {} cells (rows by batch, columns by label)",
            picked.len()
        ),
        n_rows: picked.len(),
        n_cols: picked.len(),
        row_label: "batch".to_string(),
        col_label: "label".to_string(),
        values,
        row_groups: groups(&row_order, batch),
        col_groups: groups(&col_order, label),
    }
}

/// The `--negcon` SQL predicate over `df`'s columns as a boolean expression (null counts as
/// false), or a clear error naming the predicate.
pub fn negcon_predicate(df: &datafusion::prelude::DataFrame, predicate: &str) -> Result<Expr> {
    let expr = df.parse_sql_expr(predicate).map_err(|e| {
        BalansError::InvalidArgument(format!(
            "--negcon '{predicate}' is not a valid SQL predicate over the columns: {e}"
        ))
    })?;
    let data_type = expr.get_type(df.schema()).map_err(|e| {
        BalansError::InvalidArgument(format!("--negcon '{predicate}' cannot be evaluated: {e}"))
    })?;
    if data_type != DataType::Boolean {
        return Err(BalansError::InvalidArgument(format!(
            "--negcon must be a boolean predicate (e.g. \"Metadata_PertType = 'negcon'\"), \
             but '{predicate}' has type {data_type}"
        )));
    }
    Ok(coalesce(vec![expr, lit(false)]))
}
