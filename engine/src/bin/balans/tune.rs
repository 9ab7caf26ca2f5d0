//! `balans tune`: run BALANS over a grid of its parameters and score every setting; its
//! options are documented in `balans tune --help`.

use std::sync::Arc;
use std::time::Instant;

use balans_engine::auto::score_correction;
use balans_engine::evaluate::Evaluation;
use balans_engine::progress::TerminalProgress;
use balans_engine::session::{SessionSettings, build_session};
use balans_engine::writer::write_bytes_atomic;
use balans_engine::{BalansError, CorrectRequest, Result, run_correct, run_evaluate};
use balans_operators::kernels::quality::AnchorCriterion;
use balans_operators::{BalansConfig, OutputSpace, RunSummary};
use clap::Args;

use crate::args::{EvalArgs, InputArgs};
use crate::output::{check_eval_outputs, evaluate_output, step_printer};

#[derive(Args, Debug)]
pub struct TuneArgs {
    #[command(flatten)]
    input: InputArgs,
    /// Batch key column(s), comma-separated.
    #[arg(long, short, value_delimiter = ',', required = true)]
    batch: Vec<String>,
    /// One grid dimension per use, NAME=V1,V2,... with NAME one of variant, iterations, elbow,
    /// batch-knn-floor, strength, k, tau, block, pca, metric, estimator, seed, max-landmarks,
    /// sample-rows, anchor (other parameters keep the defaults of the setting's variant).
    #[arg(long = "grid", value_name = "NAME=V1,V2,...")]
    grid: Vec<String>,
    /// Label column of the settings with anchor=label or anchor=both (see `correct`).
    #[arg(long)]
    anchor_label: Option<String>,
    /// Replace an existing --json file.
    #[arg(long)]
    overwrite: bool,
    #[command(flatten)]
    eval: EvalArgs,
}

/// Most settings one `tune` run takes (each is a full correction plus an evaluation).
const MAX_GRID_SETTINGS: usize = 256;

pub async fn run(a: TuneArgs, quiet: bool) -> Result<()> {
    if a.eval.report.is_some() {
        return Err(BalansError::InvalidArgument(
            "tune writes no HTML report; run `balans correct --evaluate --report` on the chosen \
             setting"
                .into(),
        ));
    }
    let settings = grid_settings(&a.grid)?;
    if settings.len() > MAX_GRID_SETTINGS {
        return Err(BalansError::InvalidArgument(format!(
            "the grid has {} settings; at most {MAX_GRID_SETTINGS} per run",
            settings.len()
        )));
    }
    let mut configs = Vec::with_capacity(settings.len());
    for setting in &settings {
        let mut config = BalansConfig::default();
        // The variant first: it resets the other parameters to its own defaults.
        let (variants, others): (Vec<_>, Vec<_>) =
            setting.iter().partition(|(name, _)| name == "variant");
        for (name, value) in variants.into_iter().chain(others) {
            apply_grid_value(&mut config, name, value)?;
        }
        config
            .validate()
            .map_err(|e| BalansError::InvalidArgument(e.to_string()))?;
        configs.push(config);
    }
    check_eval_outputs(&a.eval, a.overwrite, std::slice::from_ref(&a.input.input))?;
    let base = a.eval.request(&a.input, &a.batch)?;
    let ctx = build_session(&SessionSettings::default())?;
    let work = tempfile::tempdir()?;
    let (_, baseline) =
        run_evaluate(&ctx, &base, "tune_input", step_printer(true, "input")).await?;
    let mut rows: Vec<TuneRow> = Vec::new();
    for (i, (setting, config)) in settings.iter().zip(configs).enumerate() {
        let label = if setting.is_empty() {
            "defaults".to_string()
        } else {
            setting
                .iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        if !quiet {
            eprintln!("balans: tune {}/{}: {label}", i + 1, settings.len());
        }
        let output = work.path().join(format!("setting_{i}.parquet"));
        let anchor_label = config
            .anchor
            .label()
            .then(|| a.anchor_label.clone())
            .flatten();
        let request = CorrectRequest {
            input: a.input.input.clone(),
            output: output.clone(),
            batch: a.batch.clone(),
            selection: a.input.select.selection(),
            config,
            overwrite: true,
            source: a.input.select.source(),
            // The evaluation's negative controls also anchor (`anchor=negcon`) and fit
            // sphering (`method=sphering`).
            negcon: a.eval.negcon.clone(),
            anchor_label,
            model: None,
        };
        let progress = Arc::new(TerminalProgress::new(true));
        let started = Instant::now();
        let outcome = run_correct(&ctx, &request, progress.clone()).await?;
        let seconds = started.elapsed().as_secs_f64();
        let (_, evaluation) = evaluate_output(&ctx, &base, &output, &outcome, true).await?;
        // The label-free criterion of `--strength auto`, where it applies.
        // Harmony writes PCA coordinates: nothing to compare with the input's features.
        let features_out = request.config.output_space == OutputSpace::Features
            && request.config.method != balans_operators::Method::Harmony;
        let criterion = match &a.eval.negcon {
            Some(negcon) if features_out => {
                Some(score_correction(&request, &output, &outcome.roles.features, negcon).await?)
            }
            _ => None,
        };
        std::fs::remove_file(&output)?;
        rows.push((label, progress.summary(), seconds, evaluation, criterion));
    }
    print!("{}", tune_table(&baseline, &rows));
    if let Some(path) = &a.eval.json {
        let value = serde_json::json!({
            "input": baseline,
            "settings": rows.iter().map(|(label, summary, seconds, evaluation, criterion)| serde_json::json!({
                "setting": label,
                "landmarks": summary.as_ref().map(|s| s.landmarks),
                "correct_seconds": seconds,
                "auto_criterion": criterion,
                "evaluation": evaluation,
            })).collect::<Vec<_>>(),
        });
        write_bytes_atomic(
            path,
            serde_json::to_string_pretty(&value)
                .expect("json")
                .as_bytes(),
        )?;
        eprintln!("balans: wrote {}", path.display());
    }
    Ok(())
}

/// Parameters a `--grid` dimension may vary: every correction parameter.
const GRID_PARAMETERS: &str = balans_planner::parameters::PARAMETERS;

/// Sets one BALANS parameter from its `--grid` name and text value.
fn apply_grid_value(config: &mut BalansConfig, name: &str, value: &str) -> Result<()> {
    balans_planner::parameters::set_parameter(config, name, value).map_err(|e| {
        BalansError::InvalidArgument(format!(
            "--grid {name}={value}: {}",
            e.to_string().trim_start_matches("invalid argument: ")
        ))
    })
}

/// The settings of a grid: the cartesian product of its dimensions, each a list of
/// `(name, value)` pairs, in the order the dimensions were given (the last varies fastest).
fn grid_settings(grid: &[String]) -> Result<Vec<Vec<(String, String)>>> {
    let mut settings: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for dimension in grid {
        let (name, values) = dimension.split_once('=').ok_or_else(|| {
            BalansError::InvalidArgument(format!(
                "--grid takes NAME=V1,V2,... (NAME one of: {GRID_PARAMETERS}), not '{dimension}'"
            ))
        })?;
        let values: Vec<&str> = values
            .split(',')
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        if values.is_empty() {
            return Err(BalansError::InvalidArgument(format!(
                "--grid {name}= has no values"
            )));
        }
        settings = settings
            .into_iter()
            .flat_map(|setting| {
                values.iter().map(move |v| {
                    let mut next = setting.clone();
                    next.push((name.trim().to_string(), v.to_string()));
                    next
                })
            })
            .collect();
    }
    Ok(settings)
}

/// One `tune` setting: label, run summary, correction seconds, evaluation, and the
/// label-free criterion of `--strength auto` (with `--negcon`).
type TuneRow = (
    String,
    Option<RunSummary>,
    f64,
    Evaluation,
    Option<AnchorCriterion>,
);

/// A Markdown table: the input, then one row per setting.
fn tune_table(baseline: &Evaluation, rows: &[TuneRow]) -> String {
    const COLUMNS: [&str; 10] = [
        "overall",
        "batch_score",
        "bio_score",
        "ilisi",
        "kbet",
        "silhouette_batch",
        "nmi",
        "ari",
        "silhouette_label",
        "nonrep_map",
    ];
    let value = |e: &Evaluation, name: &str| {
        e.report
            .scores
            .rows()
            .into_iter()
            .find(|(n, _, _)| *n == name)
            .and_then(|(_, _, v)| v)
            .map_or_else(|| "-".to_string(), |v| format!("{v:.4}"))
    };
    let mut out = format!(
        "| setting | landmarks | correct (s) | auto criterion | {} |\n",
        COLUMNS.join(" | ")
    );
    out.push_str(&format!(
        "|---|---:|---:|---:|{}\n",
        "---:|".repeat(COLUMNS.len())
    ));
    let cells = |e: &Evaluation| {
        COLUMNS
            .iter()
            .map(|c| value(e, c))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    out.push_str(&format!(
        "| input (uncorrected) | - | - | - | {} |\n",
        cells(baseline)
    ));
    for (label, summary, seconds, evaluation, criterion) in rows {
        let criterion = criterion
            .as_ref()
            .map_or_else(|| "-".to_string(), |c| format!("{:.4}", c.score));
        let landmarks = summary
            .as_ref()
            .map_or_else(|| "-".to_string(), |s| s.landmarks.to_string());
        out.push_str(&format!(
            "| {label} | {landmarks} | {seconds:.2} | {criterion} | {} |\n",
            cells(evaluation)
        ));
    }
    out
}
