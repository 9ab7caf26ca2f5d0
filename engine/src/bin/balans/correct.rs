//! `balans correct`: batch-correct a profile table (BALANS, ComBat, sphering, Harmony or a
//! learned embedding); its options are documented in `balans correct --help`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use balans_engine::auto::run_correct_auto;
use balans_engine::correct::CorrectOutcome;
use balans_engine::progress::{TerminalProgress, format_summary, peak_rss_bytes};
use balans_engine::source::SourceOptions;
use balans_engine::{BalansError, CorrectRequest, Result, run_correct, run_evaluate};
use balans_operators::config::{Metric, PcaSetting};
use balans_operators::{
    Anchor, BalansConfig, ElbowRule, Estimator, NanPolicy, OutputSpace, Variant,
};
use clap::{Args, ValueEnum};
use datafusion::prelude::SessionContext;

use crate::args::{ClusterArgs, EvalArgs, InputArgs, SessionArgs};
use crate::output::{check_eval_outputs, evaluate_output, present_evaluations, step_printer};

#[derive(Args, Debug)]
pub struct CorrectArgs {
    #[command(flatten)]
    input: InputArgs,
    /// Batch key column(s), comma-separated; several are combined into one key.
    #[arg(long, short, value_delimiter = ',', required = true)]
    batch: Vec<String>,
    /// Output Parquet file (written atomically; never over the input).
    #[arg(long, short)]
    output: PathBuf,
    /// Correction method.
    #[arg(long, value_enum, default_value = "balans")]
    method: Method,
    /// Model directory of --method embed (written by `balans train`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Whitening of --method sphering (fitted on the --negcon rows).
    #[arg(long, value_enum, default_value = "zca-cor")]
    sphering: SpheringArg,
    /// Regulariser of --method sphering, added to the singular values as pycytominer does.
    #[arg(long, default_value_t = 1e-6)]
    epsilon: f64,
    /// Clusters of --method harmony [default: min(round(rows / 30), 100)].
    #[arg(long)]
    clusters: Option<usize>,
    /// Diversity penalty theta of --method harmony.
    #[arg(long, default_value_t = 2.0)]
    theta: f64,
    /// Soft k-means width sigma of --method harmony.
    #[arg(long, default_value_t = 0.1)]
    sigma: f64,
    /// Most iterations of --method harmony.
    #[arg(long, default_value_t = 10)]
    harmony_iterations: usize,
    /// Form of the correction; the other BALANS options default to this variant's defaults
    /// (docs/balans.md).
    #[arg(long, value_enum, default_value = "residual")]
    variant: VariantArg,
    /// Neighbour rank of the per-batch local scale [default: 40, 10 for --variant paper].
    #[arg(long)]
    k: Option<usize>,
    /// Stop after this many consecutive landmarks that cover no new point [default: 50].
    #[arg(long)]
    tau: Option<usize>,
    /// Block length J of the sampling weights [default: 20].
    #[arg(long)]
    block: Option<usize>,
    /// PCA components before distances: auto (50 when > 50 features), off, or a number
    /// [default: auto].
    #[arg(long)]
    pca: Option<String>,
    /// Sparsification rule of each landmark row [default: kneedle].
    #[arg(long, value_enum)]
    elbow: Option<ElbowArg>,
    /// Keep each batch's k nearest points in every landmark row, whatever the elbow rule
    /// [default: true, false for --variant paper].
    #[arg(long)]
    batch_knn_floor: Option<bool>,
    /// Fraction of the correction applied, in (0, 1], or `auto`: strength and passes chosen
    /// for the data set among 0.25 / 0.5 / 1 x 1 / 2 passes by a label-free criterion on the
    /// --negcon rows (docs/balans.md; costs six corrections) [default: 1].
    #[arg(long)]
    strength: Option<String>,
    /// Passes, each correcting the previous pass's output [default: 2, 1 for --variant paper].
    #[arg(long)]
    iterations: Option<usize>,
    /// Estimator of the corrected values (nystrom: --variant paper only) [default: smooth].
    #[arg(long, value_enum)]
    estimator: Option<EstimatorArg>,
    /// Output space: corrected features, or corrected PCA coordinates (PC1..PCp).
    #[arg(long, value_enum, default_value = "features")]
    output_space: SpaceArg,
    /// Distance of the affinities [default: euclidean].
    #[arg(long, value_enum)]
    metric: Option<MetricArg>,
    /// Seed of the landmark sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Cap on the number of landmarks.
    #[arg(long)]
    max_landmarks: Option<usize>,
    /// Rows the landmarks are sampled from: a stratified uniform sample of about this many
    /// rows (every batch keeps at least 4 (k + 1) rows), or `all`; the smoothing still
    /// streams every row [default: 20000].
    #[arg(long)]
    sample_rows: Option<String>,
    /// Partitions the input is read and corrected in (runs of files or row groups; the
    /// output does not depend on it) [default: the worker threads].
    #[arg(long)]
    partitions: Option<usize>,
    /// Rows BALANS estimates the batch offsets from (every row is corrected): the negative
    /// controls (with --negcon), labels shared by several batches (with --anchor-label), both,
    /// or none (every row). Use it when batches hold different biology (docs/balans.md)
    /// [default: none; label when --anchor-label is given].
    #[arg(long, value_enum)]
    anchor: Option<AnchorArg>,
    /// Label column for --anchor label / both (e.g. Metadata_Compound): rows whose value
    /// occurs in at least two batches are anchors; values in one batch only are ignored.
    #[arg(long)]
    anchor_label: Option<String>,
    /// What to do with NaN / infinite / null features.
    #[arg(long, value_enum, default_value = "error")]
    nan: NanArg,
    #[command(flatten)]
    session: SessionArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Replace an existing output file.
    #[arg(long)]
    overwrite: bool,
    /// Also write the run summary as JSON to this file.
    #[arg(long)]
    summary_json: Option<PathBuf>,
    /// Evaluate the input and the corrected output and print the metrics side by side
    /// (needs --label; see `balans evaluate --help` for the metric options).
    #[arg(long)]
    evaluate: bool,
    #[command(flatten)]
    eval: EvalArgs,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum Method {
    /// BALANS (batch-dependent local-scale affinities, adaptive landmarks).
    Balans,
    /// ComBat (parametric empirical Bayes, as scanpy's pp.combat; the BALANS options do not apply).
    Combat,
    /// Sphering (ZCA / ZCA-cor whitening) fitted on the --negcon rows, as pycytominer.
    Sphering,
    /// Harmony on the PCA coordinates (--pca, default 50 when there are more features), as
    /// harmonypy 2.1; writes PC1..PCp.
    Harmony,
    /// A learned model's embedding (--model DIR from `balans train`); writes E1..Ek.
    Embed,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum SpheringArg {
    Zca,
    ZcaCor,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum AnchorArg {
    /// Every row (the unanchored correction).
    None,
    /// The negative controls (--negcon PREDICATE).
    Negcon,
    /// Rows whose --anchor-label value occurs in at least two batches.
    Label,
    /// Negative controls and shared labels.
    Both,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum VariantArg {
    /// X + batch-balanced minus own-batch local mean (the default; keeps within-neighbourhood
    /// variation).
    Residual,
    /// Landmark smoothing with every batch weighted equally in each landmark's local mean.
    Balanced,
    /// The paper's reading: landmark smoothing `Q^T P X` (shared/specs/balans.md).
    Paper,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum ElbowArg {
    Kneedle,
    KneedleSorted,
    MaxGap,
    MaxLogGap,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum EstimatorArg {
    Smooth,
    Nystrom,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum SpaceArg {
    Features,
    Pca,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum MetricArg {
    Euclidean,
    Cosine,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum NanArg {
    Error,
    DropRows,
    Zero,
}

pub async fn run(a: CorrectArgs, quiet: bool) -> Result<()> {
    let started = Instant::now();
    let config = correct_config(&a)?;
    if a.evaluate {
        if a.eval.label.is_none() {
            return Err(BalansError::InvalidArgument(
                "--evaluate needs --label COL (the biological label, e.g. Metadata_MoA)".into(),
            ));
        }
        check_eval_outputs(&a.eval, a.overwrite, std::slice::from_ref(&a.input.input))?;
    } else if a.eval.json.is_some() || a.eval.report.is_some() {
        return Err(BalansError::InvalidArgument(
            "--json and --report of `correct` need --evaluate".into(),
        ));
    }
    let auto = a.strength.as_deref().map(str::trim) == Some("auto");
    if a.cluster.scheduler.is_some() && (auto || a.evaluate) {
        return Err(BalansError::InvalidArgument(
            "--strength auto and --evaluate run on this machine: leave them out with \
             --scheduler (evaluate the output with `balans evaluate --scheduler ...`)"
                .into(),
        ));
    }
    let ctx = a.cluster.session(&a.session.settings()?).await?;
    let progress = Arc::new(TerminalProgress::new(quiet));
    let request = CorrectRequest {
        input: a.input.input.clone(),
        output: a.output.clone(),
        batch: a.batch.clone(),
        selection: a.input.select.selection(),
        config,
        overwrite: a.overwrite,
        source: SourceOptions {
            scan_partitions: a
                .partitions
                .unwrap_or_else(rayon::current_num_threads)
                .max(1),
            ..a.input.select.source()
        },
        negcon: a.eval.negcon.clone(),
        anchor_label: a.anchor_label.clone(),
        model: match (a.method, &a.model) {
            (Method::Embed, Some(dir)) => Some(dir.clone()),
            (Method::Embed, None) => {
                return Err(BalansError::InvalidArgument(
                    "--method embed needs --model DIR (a directory written by `balans train`)"
                        .into(),
                ));
            }
            (_, Some(_)) => {
                return Err(BalansError::InvalidArgument(
                    "--model applies to --method embed only".into(),
                ));
            }
            (_, None) => None,
        },
    };
    if auto && a.iterations.is_some() {
        return Err(BalansError::InvalidArgument(
            "--strength auto chooses the passes too: leave out --iterations".into(),
        ));
    }
    let (outcome, summary, candidates) = if auto {
        let chosen = run_correct_auto(&ctx, &request, quiet).await?;
        (chosen.outcome, chosen.summary, Some(chosen.candidates))
    } else {
        let outcome = run_correct(&ctx, &request, progress.clone()).await?;
        (outcome, progress.summary().unwrap_or_default(), None)
    };
    let total = started.elapsed().as_secs_f64();
    let peak = peak_rss_bytes();
    if let Some(c) = candidates
        .as_ref()
        .and_then(|c| c.iter().find(|c| c.chosen))
    {
        eprintln!(
            "balans: --strength auto chose strength {} with {} pass(es) (score {:.4})",
            c.strength, c.passes, c.criterion.score
        );
    }
    if let Some(dir) = &request.model {
        // The model-embedding step streams: no correction summary, just what was written.
        eprintln!(
            "balans: embedded {} rows with {} into {} ({:.2} s{})",
            outcome.written.rows,
            dir.display(),
            a.output.display(),
            total,
            peak.map(|p| format!(
                ", peak memory (RSS) {:.1} MiB",
                p as f64 / (1024.0 * 1024.0)
            ))
            .unwrap_or_default()
        );
    } else if let Some(url) = &a.cluster.scheduler {
        // The stages ran on an executor: their timings are in its log, not here.
        eprintln!(
            "balans: wrote {} rows x {} features to {} (corrected on the cluster at {url}, \
             {total:.2} s)",
            outcome.written.rows,
            outcome.roles.features.len(),
            a.output.display()
        );
    } else {
        eprintln!(
            "balans: wrote {} rows x {} features to {}",
            outcome.written.rows,
            outcome.roles.features.len(),
            a.output.display()
        );
        eprint!("{}", format_summary(&summary, total, peak));
    }
    if let Some(path) = &a.summary_json {
        let mut value = serde_json::to_value(&summary)
            .map_err(|e| BalansError::InvalidArgument(e.to_string()))?;
        value["total_seconds"] = serde_json::json!(total);
        value["peak_rss_bytes"] = serde_json::json!(peak);
        if let Some(c) = &candidates {
            value["strength_auto"] = serde_json::json!(c);
        }
        std::fs::write(path, serde_json::to_string_pretty(&value).expect("json"))?;
    }
    if a.evaluate {
        evaluate_correction(&a, &ctx, &outcome, quiet).await?;
    }
    Ok(())
}

/// `correct --evaluate`: the input and the corrected output, side by side.
async fn evaluate_correction(
    a: &CorrectArgs,
    ctx: &SessionContext,
    outcome: &CorrectOutcome,
    quiet: bool,
) -> Result<()> {
    let before_request = a.eval.request(&a.input, &a.batch)?;
    let before = run_evaluate(
        ctx,
        &before_request,
        "eval_before",
        step_printer(quiet, "before"),
    )
    .await?;
    let after = evaluate_output(ctx, &before_request, &a.output, outcome, quiet).await?;
    present_evaluations(
        &a.eval,
        &[
            ("before", &before.0, &before.1),
            ("after", &after.0, &after.1),
        ],
        quiet,
    )
}

fn pca_setting(text: &str) -> Result<PcaSetting> {
    Ok(balans_planner::parameters::pca_setting(text)?)
}

fn elbow_rule(a: ElbowArg) -> ElbowRule {
    match a {
        ElbowArg::Kneedle => ElbowRule::Kneedle,
        ElbowArg::KneedleSorted => ElbowRule::KneedleSorted,
        ElbowArg::MaxGap => ElbowRule::MaxGap,
        ElbowArg::MaxLogGap => ElbowRule::MaxLogGap,
    }
}

fn estimator(a: EstimatorArg) -> Estimator {
    match a {
        EstimatorArg::Smooth => Estimator::Smooth,
        EstimatorArg::Nystrom => Estimator::Nystrom,
    }
}

fn metric(a: MetricArg) -> Metric {
    match a {
        MetricArg::Euclidean => Metric::Euclidean,
        MetricArg::Cosine => Metric::Cosine,
    }
}

fn variant(a: VariantArg) -> Variant {
    match a {
        VariantArg::Residual => Variant::Residual,
        VariantArg::Balanced => Variant::Balanced,
        VariantArg::Paper => Variant::Paper,
    }
}

fn correct_config(a: &CorrectArgs) -> Result<BalansConfig> {
    let base = BalansConfig::for_variant(variant(a.variant));
    let config = BalansConfig {
        method: match a.method {
            Method::Balans => balans_operators::Method::Balans,
            Method::Combat => balans_operators::Method::ComBat,
            Method::Sphering => balans_operators::Method::Sphering,
            Method::Harmony => balans_operators::Method::Harmony,
            // The model-embedding step does not use the correction settings.
            Method::Embed => balans_operators::Method::Balans,
        },
        harmony: balans_operators::config::HarmonyOptions {
            clusters: a.clusters,
            theta: a.theta,
            sigma: a.sigma,
            max_iterations: a.harmony_iterations,
        },
        sphering: match a.sphering {
            SpheringArg::Zca => balans_operators::SpheringMethod::Zca,
            SpheringArg::ZcaCor => balans_operators::SpheringMethod::ZcaCor,
        },
        epsilon: a.epsilon,
        k: a.k.unwrap_or(base.k),
        tau: a.tau.unwrap_or(base.tau),
        block: a.block.unwrap_or(base.block),
        pca: match &a.pca {
            Some(text) => pca_setting(text)?,
            None => base.pca,
        },
        elbow: a.elbow.map_or(base.elbow, elbow_rule),
        batch_knn_floor: a.batch_knn_floor.unwrap_or(base.batch_knn_floor),
        strength: match a.strength.as_deref().map(str::trim) {
            None | Some("auto") => base.strength,
            Some(text) => text.parse().map_err(|_| {
                BalansError::InvalidArgument(format!(
                    "--strength takes a number in (0, 1] or 'auto', not '{text}'"
                ))
            })?,
        },
        iterations: a.iterations.unwrap_or(base.iterations),
        estimator: a.estimator.map_or(base.estimator, estimator),
        output_space: match a.output_space {
            SpaceArg::Features => OutputSpace::Features,
            SpaceArg::Pca => OutputSpace::Pca,
        },
        metric: a.metric.map_or(base.metric, metric),
        seed: a.seed,
        max_landmarks: a.max_landmarks,
        sample_rows: match a.sample_rows.as_deref().map(str::trim) {
            None => base.sample_rows,
            Some("all") => None,
            Some(text) => Some(text.parse().map_err(|_| {
                BalansError::InvalidArgument(format!(
                    "--sample-rows takes a number of rows or 'all', not '{text}'"
                ))
            })?),
        },
        nan: match a.nan {
            NanArg::Error => NanPolicy::Error,
            NanArg::DropRows => NanPolicy::DropRows,
            NanArg::Zero => NanPolicy::Zero,
        },
        anchor: match (a.anchor, &a.anchor_label) {
            (Some(AnchorArg::None), _) => Anchor::None,
            (Some(AnchorArg::Negcon), _) => Anchor::Negcon,
            (Some(AnchorArg::Label), _) | (None, Some(_)) => Anchor::Label,
            (Some(AnchorArg::Both), _) => Anchor::Both,
            (None, None) => Anchor::None,
        },
        ..base
    };
    config
        .validate()
        .map_err(|e| BalansError::InvalidArgument(e.to_string()))?;
    Ok(config)
}
