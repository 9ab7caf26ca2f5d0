//! The whole evaluation suite: every metric of the reference benchmark on one embedding, with the
//! batch / bio / overall aggregates (Arevalo et al. 2024; definitions in `shared/specs/metrics.md`).
//!
//! Negative-control rows are excluded from every clustering and mixing metric ("cells" below are
//! the other rows); they are used only as the negatives of the phenotypic-activity mAP.

use std::time::Instant;

use rand::SeedableRng;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::classifier::{batch_classifier, stratified_folds};
use crate::cluster::{ari, modularity, nmi};
use crate::error::{MetricsError, Result, ensure_finite};
use crate::graph::{graph_connectivity, umap_connectivities};
use crate::kbet::kbet_per_label;
use crate::knn::exact_knn;
use crate::leiden::leiden;
use crate::lisi::{clisi_score, ilisi_score, lisi};
use crate::map::{
    ApOutput, LabelMap, MapMetadata, MapSummary, QueryAp, average_precision_negcon,
    average_precision_nonrep, mean_average_precision, summarize_map,
};
use crate::silhouette::{silhouette_batch, silhouette_samples};
use crate::types::{Codes, CsrGraph, Distance, Neighbors, gather_rows};

/// One embedding with its metadata, all rows (negative controls included).
#[derive(Debug, Clone, Copy)]
pub struct EvalInput<'a> {
    /// Row-major embedding, `n * d`.
    pub x: &'a [f64],
    /// Embedding dimensions.
    pub d: usize,
    /// Batch of each row.
    pub batch: &'a Codes,
    /// Biological label (perturbation, MoA) of each row.
    pub label: &'a Codes,
    /// Whether each row is a negative control.
    pub is_negcon: &'a [bool],
    /// Plate of each row (needed by mAP).
    pub plate: Option<&'a Codes>,
    /// Well position of each row (negcon mAP positives must differ in well).
    pub well: Option<&'a Codes>,
}

/// Which metric families to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MetricSelection {
    /// Silhouette label and silhouette batch.
    pub silhouette: bool,
    /// Graph connectivity, Leiden NMI / ARI (25-NN graph).
    pub graph: bool,
    /// kBET.
    pub kbet: bool,
    /// iLISI and cLISI.
    pub lisi: bool,
    /// Phenotypic activity (negcon) and consistency (nonrep) mAP.
    pub map: bool,
    /// Batch classifier (not part of the aggregates).
    pub classifier: bool,
}

impl Default for MetricSelection {
    fn default() -> Self {
        Self {
            silhouette: true,
            graph: true,
            kbet: true,
            lisi: true,
            map: true,
            classifier: true,
        }
    }
}

/// Parameters of the suite; the defaults are the reference benchmark's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalOptions {
    /// Neighbours of the kNN graph, the row itself included (scanpy's `n_neighbors`).
    pub n_neighbors: usize,
    /// Neighbours for LISI (the row itself excluded).
    pub lisi_neighbors: usize,
    /// LISI perplexity.
    pub perplexity: f64,
    /// Leiden resolution.
    pub resolution: f64,
    /// Leiden runs (seeds `seed`, `seed + 1`, ...); the partition of highest modularity is kept.
    pub leiden_restarts: usize,
    /// scib-metrics' protocol instead of Arevalo's: Leiden at resolutions 0.2, 0.4, ..., 2.0,
    /// NMI / ARI of the resolution with the best NMI (`resolution` is then ignored).
    pub resolution_sweep: bool,
    /// Seed of every random choice (Leiden, folds, mAP null, subsampling).
    pub seed: u64,
    /// Size of the mAP null distribution.
    pub null_size: usize,
    /// Significance threshold for the mAP p / q values and kBET.
    pub alpha: f64,
    /// Folds of the batch classifier's cross-validation.
    pub cv_folds: usize,
    /// Evaluate the clustering / mixing metrics on at most this many cells, drawn at random.
    pub subsample: Option<usize>,
    /// Which metrics to compute.
    pub metrics: MetricSelection,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            n_neighbors: 25,
            lisi_neighbors: 90,
            perplexity: 30.0,
            resolution: 1.0,
            leiden_restarts: 3,
            resolution_sweep: false,
            seed: 0,
            null_size: 10_000,
            alpha: 0.05,
            cv_folds: 5,
            subsample: None,
            metrics: MetricSelection::default(),
        }
    }
}

/// Every scalar the suite reports; `None` where a metric was not computed or is undefined.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Scores {
    /// Silhouette batch (1 - |s| within labels).
    pub silhouette_batch: Option<f64>,
    /// Graph connectivity.
    pub graph_connectivity: Option<f64>,
    /// kBET acceptance (1 - rejection).
    pub kbet: Option<f64>,
    /// Scaled iLISI.
    pub ilisi: Option<f64>,
    /// Scaled cLISI.
    pub clisi: Option<f64>,
    /// Leiden NMI against the labels.
    pub nmi: Option<f64>,
    /// Leiden ARI against the labels.
    pub ari: Option<f64>,
    /// Rescaled cosine silhouette on labels, `(s + 1) / 2`.
    pub silhouette_label: Option<f64>,
    /// Phenotypic activity mAP (positives vs negative controls).
    pub negcon_map: Option<f64>,
    /// Consistency mAP (positives vs other labels).
    pub nonrep_map: Option<f64>,
    /// Batch classifier score, `1 - macro F1` (not in the aggregates).
    pub batch_classifier: Option<f64>,
    /// Mean of the available batch metrics.
    pub batch_score: Option<f64>,
    /// Mean of the available biology metrics.
    pub bio_score: Option<f64>,
    /// `0.4 batch + 0.6 bio`.
    pub overall: Option<f64>,
}

impl Scores {
    /// `(name, group, value)` of every score in report order.
    pub fn rows(&self) -> Vec<(&'static str, &'static str, Option<f64>)> {
        vec![
            ("silhouette_batch", "batch", self.silhouette_batch),
            ("graph_connectivity", "batch", self.graph_connectivity),
            ("kbet", "batch", self.kbet),
            ("ilisi", "batch", self.ilisi),
            ("clisi", "bio", self.clisi),
            ("nmi", "bio", self.nmi),
            ("ari", "bio", self.ari),
            ("silhouette_label", "bio", self.silhouette_label),
            ("negcon_map", "bio", self.negcon_map),
            ("nonrep_map", "bio", self.nonrep_map),
            ("batch_score", "aggregate", self.batch_score),
            ("bio_score", "aggregate", self.bio_score),
            ("overall", "aggregate", self.overall),
            ("batch_classifier", "other", self.batch_classifier),
        ]
    }
}

/// Per-label details.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelDetail {
    /// Label name.
    pub label: String,
    /// Cells with this label.
    pub n_cells: usize,
    /// Batches these cells span.
    pub n_batches: usize,
    /// Silhouette batch of the label (None: skipped).
    pub silhouette_batch: Option<f64>,
    /// Graph connectivity of the label.
    pub graph_connectivity: Option<f64>,
    /// kBET acceptance of the label (None: skipped).
    pub kbet: Option<f64>,
    /// Phenotypic-activity mAP of the label, its p and q values.
    pub negcon_map: Option<(f64, f64, f64)>,
    /// Consistency mAP of the label, its p and q values.
    pub nonrep_map: Option<(f64, f64, f64)>,
}

/// Wall time of one metric family.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timing {
    /// Step name.
    pub step: String,
    /// Seconds.
    pub seconds: f64,
}

/// Everything the suite computed.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// The scores and aggregates.
    pub scores: Scores,
    /// Rows of the input.
    pub n_rows: usize,
    /// Negative-control rows.
    pub n_negcon: usize,
    /// Cells (non-control rows) used for the clustering and mixing metrics.
    pub n_cells: usize,
    /// Cells before subsampling.
    pub n_cells_total: usize,
    /// Distinct batches among the cells.
    pub n_batches: usize,
    /// Distinct labels among the cells.
    pub n_labels: usize,
    /// Embedding dimensions.
    pub n_dims: usize,
    /// Leiden clusters found.
    pub leiden_clusters: Option<usize>,
    /// Modularity of the Leiden partition.
    pub leiden_modularity: Option<f64>,
    /// Resolution of the Leiden partition used for NMI / ARI.
    pub leiden_resolution: Option<f64>,
    /// Aggregated batch metrics (out of 4).
    pub batch_components: usize,
    /// Aggregated biology metrics (out of 6).
    pub bio_components: usize,
    /// Fractions of labels with p < alpha and q < alpha, negcon mAP.
    pub negcon_significance: Option<MapSummary>,
    /// Same for the consistency mAP.
    pub nonrep_significance: Option<MapSummary>,
    /// Per-label details.
    pub labels: Vec<LabelDetail>,
    /// What was subsampled, if anything.
    pub subsampled: Option<String>,
    /// Things the user should know (skipped metrics and why).
    pub warnings: Vec<String>,
    /// Seconds per step.
    pub timings: Vec<Timing>,
    /// The options used.
    pub options: EvalOptions,
    /// Per-cell outputs, for reports.
    #[serde(skip)]
    pub cells: CellOutputs,
}

/// Per-cell intermediate results a report can draw.
#[derive(Debug, Clone, Default)]
pub struct CellOutputs {
    /// Input rows of the cells used.
    pub rows: Vec<usize>,
    /// The UMAP connectivities of the cells (for a 2-D layout).
    pub graph: Option<CsrGraph>,
    /// Leiden cluster of each cell.
    pub leiden: Option<Vec<u32>>,
}

/// Runs every selected metric on `input`. `on_step` is told the name of each step as it starts.
pub fn evaluate(
    input: &EvalInput<'_>,
    options: &EvalOptions,
    on_step: &dyn Fn(&str),
) -> Result<EvalReport> {
    let n = input.is_negcon.len();
    validate(input, n)?;
    let mut warnings = Vec::new();
    let mut timings = Vec::new();
    let mut clock = |step: &str, start: Instant| {
        timings.push(Timing {
            step: step.to_string(),
            seconds: start.elapsed().as_secs_f64(),
        })
    };

    // Cells: non-control rows, optionally subsampled (sorted, so row order is kept).
    let all_cells: Vec<usize> = (0..n).filter(|&i| !input.is_negcon[i]).collect();
    let n_cells_total = all_cells.len();
    let (rows, subsampled) = match options.subsample {
        Some(limit) if limit < n_cells_total => {
            let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
            let mut picked: Vec<usize> = sample(&mut rng, n_cells_total, limit)
                .into_iter()
                .map(|i| all_cells[i])
                .collect();
            picked.sort_unstable();
            let note = format!(
                "clustering and mixing metrics on {limit} of {n_cells_total} cells drawn at \
                 random (seed {}); mAP on all rows",
                options.seed
            );
            (picked, Some(note))
        }
        _ => (all_cells, None),
    };
    let n_cells = rows.len();
    if n_cells < 3 {
        return Err(MetricsError::InvalidInput(format!(
            "only {n_cells} non-control rows: at least 3 are needed"
        )));
    }
    let d = input.d;
    let cells_x = gather_rows(input.x, d, &rows);
    let batch = input.batch.subset(&rows);
    let label = input.label.subset(&rows);
    let n_batches = batch.n_categories();
    let n_labels = label.n_categories();
    if n_batches < 2 {
        warnings.push(format!(
            "the cells come from a single batch ({}): batch-mixing metrics are undefined",
            batch.names.first().map(String::as_str).unwrap_or("")
        ));
    }

    let mut scores = Scores::default();
    let mut label_details: Vec<LabelDetail> = label
        .names
        .iter()
        .enumerate()
        .map(|(code, name)| {
            let members: Vec<usize> = (0..n_cells)
                .filter(|&i| label.codes[i] as usize == code)
                .collect();
            let mut batches: Vec<u32> = members.iter().map(|&i| batch.codes[i]).collect();
            batches.sort_unstable();
            batches.dedup();
            LabelDetail {
                label: name.clone(),
                n_cells: members.len(),
                n_batches: batches.len(),
                silhouette_batch: None,
                graph_connectivity: None,
                kbet: None,
                negcon_map: None,
                nonrep_map: None,
            }
        })
        .collect();
    let mut outputs = CellOutputs {
        rows: rows.clone(),
        ..CellOutputs::default()
    };
    let mut leiden_clusters = None;
    let mut leiden_modularity = None;
    let mut leiden_resolution = None;

    // One exact neighbour search serves the kNN graph (the row itself included) and LISI (the
    // row itself excluded): both are prefixes of the same ordered candidate list.
    let need_graph = options.metrics.graph || options.metrics.kbet;
    let graph_k = options.n_neighbors.min(n_cells);
    let lisi_k = options.lisi_neighbors.min(n_cells - 1);
    let search_k = match (need_graph, options.metrics.lisi) {
        (true, true) => graph_k.max(lisi_k + 1),
        (true, false) => graph_k,
        (false, true) => lisi_k + 1,
        (false, false) => 0,
    };
    let neighbors = if search_k > 0 {
        on_step("exact kNN");
        let start = Instant::now();
        let nn = exact_knn(&cells_x, d, search_k, Distance::Cosine, false)?;
        clock("exact knn", start);
        Some(nn)
    } else {
        None
    };
    if need_graph && let Some(all) = &neighbors {
        let nn = prefix(all, graph_k);
        if options.metrics.graph {
            on_step("UMAP connectivities, graph connectivity and Leiden");
            let start = Instant::now();
            let graph = umap_connectivities(&nn)?;
            let connectivity = graph_connectivity(&graph, &label.codes, n_labels)?;
            for (detail, value) in label_details.iter_mut().zip(&connectivity.per_label) {
                detail.graph_connectivity = finite(*value);
            }
            scores.graph_connectivity = finite(connectivity.score);
            let (clusters, quality, resolution) = if options.resolution_sweep {
                let mut best: Option<(Vec<u32>, f64, f64, f64)> = None;
                for step in 1..=10 {
                    let resolution = 0.2 * f64::from(step);
                    let (clusters, quality) = best_leiden(&graph, options, resolution)?;
                    let score = nmi(&label.codes, &clusters)?;
                    if best.as_ref().is_none_or(|b| score > b.3) {
                        best = Some((clusters, quality, resolution, score));
                    }
                }
                let (clusters, quality, resolution, _) = best.expect("ten resolutions");
                warnings.push(format!(
                    "NMI / ARI from the resolution sweep 0.2-2.0 (scib-metrics' protocol, not \
                     Arevalo's): best NMI at resolution {resolution:.1}"
                ));
                (clusters, quality, resolution)
            } else {
                let (clusters, quality) = best_leiden(&graph, options, options.resolution)?;
                (clusters, quality, options.resolution)
            };
            scores.nmi = finite(nmi(&label.codes, &clusters)?);
            scores.ari = finite(ari(&label.codes, &clusters)?);
            leiden_modularity = Some(quality);
            leiden_resolution = Some(resolution);
            leiden_clusters = Some(clusters.iter().map(|&c| c as usize + 1).max().unwrap_or(0));
            outputs.leiden = Some(clusters);
            outputs.graph = Some(graph);
            clock("graph connectivity + leiden", start);
        }
        if options.metrics.kbet {
            on_step("kBET");
            let start = Instant::now();
            if n_batches < 2 {
                warnings.push("kBET skipped: a single batch".into());
            } else {
                let kbet = kbet_per_label(&nn, &batch.codes, &label.codes, options.alpha)?;
                for (detail, value) in label_details.iter_mut().zip(&kbet.per_label) {
                    detail.kbet = finite(*value);
                }
                scores.kbet = finite(kbet.score);
                if scores.kbet.is_none() {
                    warnings.push(
                        "kBET undefined: no label has at least 10 cells in more than one batch"
                            .into(),
                    );
                }
            }
            clock("kbet", start);
        }
    }

    if options.metrics.lisi
        && let Some(all) = &neighbors
    {
        on_step("LISI");
        let start = Instant::now();
        let nn = without_self(all, lisi_k);
        let per_batch = lisi(&nn, &batch.codes, n_batches, options.perplexity)?;
        let per_label = lisi(&nn, &label.codes, n_labels, options.perplexity)?;
        if n_batches >= 2 {
            scores.ilisi = finite(ilisi_score(&per_batch, n_batches));
        }
        if n_labels >= 2 {
            scores.clisi = finite(clisi_score(&per_label, n_labels));
        }
        clock("lisi", start);
    }

    if options.metrics.silhouette {
        on_step("silhouettes");
        let start = Instant::now();
        if n_labels >= 2 {
            let s = silhouette_samples(&cells_x, d, &label.codes, Distance::Cosine)?;
            let mean = s.iter().sum::<f64>() / s.len() as f64;
            scores.silhouette_label = finite((mean + 1.0) / 2.0);
        } else {
            warnings.push("silhouette label skipped: a single label".into());
        }
        if n_batches >= 2 {
            let sb = silhouette_batch(&cells_x, d, &batch.codes, &label.codes, Distance::Cosine)?;
            for (detail, value) in label_details.iter_mut().zip(&sb.per_label) {
                detail.silhouette_batch = finite(*value);
            }
            scores.silhouette_batch = finite(sb.score);
        }
        clock("silhouettes", start);
    }

    let mut negcon_significance = None;
    let mut nonrep_significance = None;
    if options.metrics.map {
        on_step("mAP");
        let start = Instant::now();
        let plate = input.plate.ok_or_else(|| {
            MetricsError::InvalidInput(
                "mAP needs a plate column (negatives are drawn from the same plate)".into(),
            )
        })?;
        let wells_as_rows;
        let well = match input.well {
            Some(well) => well,
            None => {
                warnings.push(
                    "no well column: every row counts as its own well for the negcon mAP".into(),
                );
                wells_as_rows = Codes {
                    codes: (0..n as u32).collect(),
                    names: (0..n).map(|i| i.to_string()).collect(),
                };
                &wells_as_rows
            }
        };
        let meta = MapMetadata {
            labels: &input.label.codes,
            plates: &plate.codes,
            wells: &well.codes,
            is_negcon: input.is_negcon,
        };
        if input.is_negcon.iter().any(|&c| c) {
            let ap = average_precision_negcon(input.x, d, &meta)?;
            let (maps, summary) = map_of(&ap, input, options, &mut warnings, "negcon", plate)?;
            scores.negcon_map = finite(summary.mean_map);
            for m in &maps {
                label_details_set(
                    &mut label_details,
                    &input.label.names[m.label as usize],
                    |dtl| {
                        dtl.negcon_map =
                            Some((m.mean_average_precision, m.p_value, m.corrected_p_value))
                    },
                );
            }
            negcon_significance = Some(summary);
        } else {
            warnings.push("negcon mAP skipped: no negative-control rows (see --negcon)".into());
        }
        let ap = average_precision_nonrep(input.x, d, &meta)?;
        let (maps, summary) = map_of(&ap, input, options, &mut warnings, "nonrep", plate)?;
        scores.nonrep_map = finite(summary.mean_map);
        for m in &maps {
            label_details_set(
                &mut label_details,
                &input.label.names[m.label as usize],
                |dtl| {
                    dtl.nonrep_map =
                        Some((m.mean_average_precision, m.p_value, m.corrected_p_value))
                },
            );
        }
        nonrep_significance = Some(summary);
        clock("map", start);
    }

    if options.metrics.classifier {
        on_step("batch classifier");
        let start = Instant::now();
        if n_batches >= 2 {
            let folds = stratified_folds(&batch.codes, options.cv_folds, options.seed)?;
            let result = batch_classifier(&cells_x, d, &batch.codes, n_batches, &folds)?;
            scores.batch_classifier = finite(result.score);
        } else {
            warnings.push("batch classifier skipped: a single batch".into());
        }
        clock("batch classifier", start);
    }

    let batch_parts = [
        scores.silhouette_batch,
        scores.graph_connectivity,
        scores.kbet,
        scores.ilisi,
    ];
    let bio_parts = [
        scores.clisi,
        scores.negcon_map,
        scores.nonrep_map,
        scores.nmi,
        scores.ari,
        scores.silhouette_label,
    ];
    let (batch_score, batch_components) = mean_of_available(&batch_parts);
    let (bio_score, bio_components) = mean_of_available(&bio_parts);
    scores.batch_score = batch_score;
    scores.bio_score = bio_score;
    scores.overall = match (batch_score, bio_score) {
        (Some(b), Some(c)) => Some(0.4 * b + 0.6 * c),
        _ => None,
    };
    if batch_components < batch_parts.len() && batch_components > 0 {
        warnings.push(format!(
            "batch score averages {batch_components} of {} metrics",
            batch_parts.len()
        ));
    }
    if bio_components < bio_parts.len() && bio_components > 0 {
        warnings.push(format!(
            "bio score averages {bio_components} of {} metrics",
            bio_parts.len()
        ));
    }

    Ok(EvalReport {
        scores,
        n_rows: n,
        n_negcon: input.is_negcon.iter().filter(|&&c| c).count(),
        n_cells,
        n_cells_total,
        n_batches,
        n_labels,
        n_dims: d,
        leiden_clusters,
        leiden_modularity,
        leiden_resolution,
        batch_components,
        bio_components,
        negcon_significance,
        nonrep_significance,
        labels: label_details,
        subsampled,
        warnings,
        timings,
        options: options.clone(),
        cells: outputs,
    })
}

fn validate(input: &EvalInput<'_>, n: usize) -> Result<()> {
    let d = input.d;
    if d == 0 {
        return Err(MetricsError::InvalidInput(
            "the embedding has no dimensions".into(),
        ));
    }
    if input.x.len() != n * d {
        return Err(MetricsError::InvalidInput(format!(
            "embedding has {} values, expected {n} rows x {d} dims",
            input.x.len()
        )));
    }
    for (name, codes) in [
        ("batch", Some(input.batch)),
        ("label", Some(input.label)),
        ("plate", input.plate),
        ("well", input.well),
    ] {
        if let Some(codes) = codes
            && codes.codes.len() != n
        {
            return Err(MetricsError::InvalidInput(format!(
                "{name} has {} rows, the embedding {n}",
                codes.codes.len()
            )));
        }
    }
    ensure_finite(input.x, d)
}

/// The Leiden partition (at `resolution`) of highest modularity over `options.leiden_restarts` seeds (ties: the
/// earlier seed). A single run can stop in a poorer local optimum (e.g. two labels merged).
fn best_leiden(
    graph: &CsrGraph,
    options: &EvalOptions,
    resolution: f64,
) -> Result<(Vec<u32>, f64)> {
    let mut best: Option<(Vec<u32>, f64)> = None;
    for r in 0..options.leiden_restarts.max(1) as u64 {
        let clusters = leiden(graph, resolution, options.seed.wrapping_add(r))?;
        let quality = modularity(graph, &clusters, resolution);
        if best.as_ref().is_none_or(|(_, q)| quality > *q) {
            best = Some((clusters, quality));
        }
    }
    Ok(best.expect("at least one run"))
}

/// Per-label mAP and its summary; warns about skipped labels and plates.
fn map_of(
    ap: &ApOutput,
    input: &EvalInput<'_>,
    options: &EvalOptions,
    warnings: &mut Vec<String>,
    kind: &str,
    plate: &Codes,
) -> Result<(Vec<LabelMap>, MapSummary)> {
    if !ap.single_replicate_labels.is_empty() {
        warnings.push(format!(
            "{kind} mAP: {} label(s) with a single replicate skipped: {}",
            ap.single_replicate_labels.len(),
            name_list(&ap.single_replicate_labels, &input.label.names)
        ));
    }
    // Queries with positives but no negative pair: copairs scores them AP = 1. For the
    // phenotypic-activity mAP that would reward plates without controls, so their queries are
    // skipped; the consistency mAP keeps copairs' rule (plates holding a single label).
    let skip_unpaired = kind == "negcon";
    if !ap.plates_without_negatives.is_empty() {
        let what = if skip_unpaired {
            "plate(s) without negative controls skipped"
        } else {
            "plate(s) with a single label give their queries no negatives (AP = 1, as copairs)"
        };
        warnings.push(format!(
            "{kind} mAP: {} {what}: {}",
            ap.plates_without_negatives.len(),
            name_list(&ap.plates_without_negatives, &plate.names)
        ));
    }
    let kept: Vec<QueryAp>;
    let queries = if skip_unpaired {
        kept = ap
            .queries
            .iter()
            .filter(|q| q.n_total > q.n_pos)
            .cloned()
            .collect();
        &kept[..]
    } else {
        &ap.queries[..]
    };
    let maps = mean_average_precision(
        queries,
        &input.label.codes,
        options.null_size,
        options.alpha,
        options.seed,
    )?;
    let summary = summarize_map(&maps, ap.single_replicate_labels.len());
    Ok((maps, summary))
}

fn name_list(codes: &[u32], names: &[String]) -> String {
    let shown: Vec<&str> = codes
        .iter()
        .take(10)
        .map(|&c| names[c as usize].as_str())
        .collect();
    if codes.len() > shown.len() {
        format!(
            "{}, ... ({} more)",
            shown.join(", "),
            codes.len() - shown.len()
        )
    } else {
        shown.join(", ")
    }
}

fn label_details_set(details: &mut [LabelDetail], name: &str, f: impl FnOnce(&mut LabelDetail)) {
    if let Some(detail) = details.iter_mut().find(|d| d.label == name) {
        f(detail);
    }
}

/// The first `k` neighbours of each row.
fn prefix(nn: &Neighbors, k: usize) -> Neighbors {
    if k == nn.k {
        return nn.clone();
    }
    let mut indices = Vec::with_capacity(nn.n * k);
    let mut distances = Vec::with_capacity(nn.n * k);
    for i in 0..nn.n {
        indices.extend_from_slice(&nn.indices_of(i)[..k]);
        distances.extend_from_slice(&nn.distances_of(i)[..k]);
    }
    Neighbors {
        n: nn.n,
        k,
        indices,
        distances,
    }
}

/// The first `k` neighbours of each row other than the row itself (a list that includes the
/// row itself, with at least `k + 1` entries).
fn without_self(nn: &Neighbors, k: usize) -> Neighbors {
    let mut indices = Vec::with_capacity(nn.n * k);
    let mut distances = Vec::with_capacity(nn.n * k);
    for i in 0..nn.n {
        let kept = nn
            .indices_of(i)
            .iter()
            .zip(nn.distances_of(i))
            .filter(|(j, _)| **j as usize != i)
            .take(k);
        for (&j, &dist) in kept {
            indices.push(j);
            distances.push(dist);
        }
    }
    Neighbors {
        n: nn.n,
        k,
        indices,
        distances,
    }
}

fn finite(value: f64) -> Option<f64> {
    value.is_finite().then_some(value)
}

fn mean_of_available(parts: &[Option<f64>]) -> (Option<f64>, usize) {
    let present: Vec<f64> = parts.iter().flatten().copied().collect();
    if present.is_empty() {
        (None, 0)
    } else {
        (
            Some(present.iter().sum::<f64>() / present.len() as f64),
            present.len(),
        )
    }
}
