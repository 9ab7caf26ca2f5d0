//! `--strength auto`: BALANS's strength and number of passes chosen per data set by a
//! criterion that needs no labels of interest.
//!
//! Every candidate setting corrects the input into a temporary file beside the output; each
//! result is scored against the input by [`anchor_criterion`] on the negative controls (the
//! anchors of the criterion, whatever anchors the correction itself uses): how well the
//! controls of different batches mix, minus how much every other row's distance to its own
//! batch's controls changed. The best-scoring file becomes the output (ties go to the earlier
//! candidate); the others are removed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use balans_operators::config::OutputSpace;
use balans_operators::kernels::quality::{AnchorCriterion, anchor_criterion};
use balans_operators::{BalansConfig, Method, RunSummary};
use datafusion::prelude::SessionContext;
use serde::Serialize;

use crate::correct::{CorrectOutcome, CorrectRequest, run_correct};
use crate::error::{BalansError, Result};
use crate::evaluate::{EvaluateRequest, load_embedding};
use crate::progress::TerminalProgress;
use crate::session::{SessionSettings, build_session};
use crate::source::FeatureSelection;

/// Rows the criterion is computed on (an even stride through the table).
pub const CRITERION_ROWS: usize = 6_000;

/// Neighbours of the anchors' batch-mixing term.
const CRITERION_NEIGHBOURS: usize = 15;

/// The candidate `(strength, passes)` settings of `--strength auto`, in order of preference
/// on ties (gentler first).
pub const AUTO_CANDIDATES: [(f64, usize); 6] =
    [(0.25, 1), (0.5, 1), (1.0, 1), (0.25, 2), (0.5, 2), (1.0, 2)];

/// One scored candidate of `--strength auto`.
#[derive(Debug, Clone, Serialize)]
pub struct AutoCandidate {
    /// Fraction of the correction applied.
    pub strength: f64,
    /// Passes.
    pub passes: usize,
    /// The label-free criterion.
    pub criterion: AnchorCriterion,
    /// Whether this candidate became the output.
    pub chosen: bool,
}

/// Scores the correction `output` of `input` with [`anchor_criterion`] over `features`, the
/// rows marked by the `negcon` predicate being the anchors.
pub async fn score_correction(
    request: &CorrectRequest,
    output: &Path,
    features: &[String],
    negcon: &str,
) -> Result<AnchorCriterion> {
    // One partition, file scans not split: both tables are read in file order, so their rows
    // line up.
    let ctx = build_session(&SessionSettings::default())?;
    let load = |input: String, name: &'static str| {
        let ctx = ctx.clone();
        let mut eval = EvaluateRequest {
            input,
            batch: request.batch.clone(),
            label: request.batch[0].clone(),
            negcon: Some(negcon.to_string()),
            plate: None,
            well: None,
            selection: FeatureSelection {
                include: features.to_vec(),
                exclude: Vec::new(),
            },
            options: Default::default(),
            source: request.source.clone(),
        };
        eval.options.metrics.map = false;
        eval.source.scan_partitions = 1;
        async move { load_embedding(&ctx, &eval, name).await }
    };
    let before = load(request.input.clone(), "auto_input").await?;
    let after = load(output.display().to_string(), "auto_output").await?;
    if before.n_rows() != after.n_rows() || before.d() != after.d() {
        return Err(BalansError::BadInput(format!(
            "--strength auto: the corrected table has {} x {} values, the input {} x {}",
            after.n_rows(),
            after.d(),
            before.n_rows(),
            before.d()
        )));
    }
    let n = before.n_rows();
    let d = before.d();
    let stride = n.div_ceil(CRITERION_ROWS).max(1);
    let rows: Vec<usize> = (0..n).step_by(stride).collect();
    let pick = |x: &[f64]| -> Vec<f32> {
        rows.iter()
            .flat_map(|&i| x[i * d..(i + 1) * d].iter().map(|&v| v as f32))
            .collect()
    };
    let (x0, x1) = (pick(&before.x), pick(&after.x));
    let batch: Vec<usize> = rows
        .iter()
        .map(|&i| before.batch.codes[i] as usize)
        .collect();
    let anchor: Vec<bool> = rows.iter().map(|&i| before.is_negcon[i]).collect();
    if !anchor.iter().any(|&a| a) {
        return Err(BalansError::BadInput(format!(
            "--strength auto scores corrections on the negative controls, and '{negcon}' \
             matches none of the {} rows it reads",
            rows.len()
        )));
    }
    tokio::task::spawn_blocking(move || {
        anchor_criterion(&x0, &x1, d, &batch, &anchor, CRITERION_NEIGHBOURS)
    })
    .await
    .map_err(|e| BalansError::InvalidArgument(format!("--strength auto: {e}")))
}

/// Temporary path of candidate `i` beside `output`.
fn candidate_path(output: &Path, i: usize) -> PathBuf {
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "balans".into());
    output.with_file_name(format!(".{name}.auto-{i}.tmp.parquet"))
}

/// What `--strength auto` produced.
#[derive(Debug)]
pub struct AutoOutcome {
    /// The chosen candidate's correction (written to the requested output).
    pub outcome: CorrectOutcome,
    /// The chosen candidate's run summary (every pass).
    pub summary: RunSummary,
    /// Every candidate with its score, in the order run.
    pub candidates: Vec<AutoCandidate>,
}

/// Runs every candidate of `--strength auto` and keeps the best as `request.output`
/// (progress bars unless `quiet`; each candidate's score is reported as a warning line).
pub async fn run_correct_auto(
    ctx: &SessionContext,
    request: &CorrectRequest,
    quiet: bool,
) -> Result<AutoOutcome> {
    let config: &BalansConfig = &request.config;
    if config.method != Method::Balans {
        return Err(BalansError::InvalidArgument(
            "--strength auto applies to --method balans".into(),
        ));
    }
    if config.output_space != OutputSpace::Features {
        return Err(BalansError::InvalidArgument(
            "--strength auto compares corrected features with the input: use --output-space \
             features"
                .into(),
        ));
    }
    let negcon = request.negcon.clone().ok_or_else(|| {
        BalansError::InvalidArgument(
            "--strength auto scores each candidate on the negative controls: give --negcon \
             PREDICATE (e.g. \"Metadata_PertType = 'negcon'\")"
                .into(),
        )
    })?;
    if request.output.exists() && !request.overwrite {
        return Err(BalansError::InvalidArgument(format!(
            "{} exists (use --overwrite to replace it)",
            request.output.display()
        )));
    }
    let mut scored: Vec<(PathBuf, CorrectOutcome, AutoCandidate, RunSummary)> = Vec::new();
    let cleanup = |paths: &[PathBuf]| {
        for p in paths {
            let _ = std::fs::remove_file(p);
        }
    };
    let mut written: Vec<PathBuf> = Vec::new();
    for (i, &(strength, passes)) in AUTO_CANDIDATES.iter().enumerate() {
        let path = candidate_path(&request.output, i);
        let candidate = CorrectRequest {
            output: path.clone(),
            overwrite: true,
            config: BalansConfig {
                strength,
                iterations: passes,
                ..config.clone()
            },
            ..request.clone()
        };
        let progress = Arc::new(TerminalProgress::new(quiet));
        let outcome = match run_correct(ctx, &candidate, progress.clone()).await {
            Ok(o) => o,
            Err(e) => {
                cleanup(&written);
                return Err(e);
            }
        };
        written.push(path.clone());
        let criterion =
            match score_correction(request, &path, &outcome.roles.features, &negcon).await {
                Ok(c) => c,
                Err(e) => {
                    cleanup(&written);
                    return Err(e);
                }
            };
        eprintln!(
            "balans: --strength auto: strength {strength}, {passes} pass(es): control mixing \
             {:.4}, distance-to-controls change {:.4}, score {:.4}",
            criterion.anchor_mixing, criterion.anchor_distance_change, criterion.score
        );
        scored.push((
            path,
            outcome,
            AutoCandidate {
                strength,
                passes,
                criterion,
                chosen: false,
            },
            progress.summary().unwrap_or_default(),
        ));
    }
    let best = (0..scored.len())
        .reduce(|a, b| {
            if scored[b].2.criterion.score > scored[a].2.criterion.score {
                b
            } else {
                a
            }
        })
        .expect("candidates");
    scored[best].2.chosen = true;
    let keep = scored[best].0.clone();
    if let Err(e) = std::fs::rename(&keep, &request.output) {
        cleanup(&written);
        return Err(e.into());
    }
    written.retain(|p| p != &keep);
    cleanup(&written);
    let candidates: Vec<AutoCandidate> = scored.iter().map(|s| s.2.clone()).collect();
    let (_, outcome, _, summary) = scored.swap_remove(best);
    Ok(AutoOutcome {
        outcome,
        summary,
        candidates,
    })
}
