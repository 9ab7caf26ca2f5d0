//! Evaluation output shared by `evaluate`, `correct --evaluate` and `tune`: step messages,
//! checks of `--json` / `--report`, the score table and its files, and the evaluation of a
//! correction's output.

use std::sync::Arc;

use balans_engine::correct::CorrectOutcome;
use balans_engine::evaluate::{
    Evaluation, LoadedEmbedding, format_scores, format_timings, render_report,
};
use balans_engine::progress::peak_rss_bytes;
use balans_engine::source::{FeatureSelection, SourceOptions, register_profiles};
use balans_engine::writer::{check_output, write_bytes_atomic};
use balans_engine::{BalansError, EvaluateRequest, Result, run_evaluate};
use balans_operators::exec::COVERED_COLUMN;
use datafusion::prelude::SessionContext;

use crate::args::EvalArgs;

/// Prints each evaluation step to stderr (unless quiet).
pub fn step_printer(quiet: bool, what: &str) -> Arc<dyn Fn(&str) + Send + Sync> {
    let what = what.to_string();
    Arc::new(move |step: &str| {
        if !quiet {
            eprintln!("balans: evaluate {what}: {step}");
        }
    })
}

/// Checks the `--json` / `--report` outputs before any work is done.
pub fn check_eval_outputs(eval: &EvalArgs, overwrite: bool, inputs: &[String]) -> Result<()> {
    for path in [&eval.json, &eval.report].into_iter().flatten() {
        check_output(path, overwrite, inputs)?;
    }
    Ok(())
}

/// Prints the score table and writes the JSON and HTML outputs of one or two evaluations.
pub fn present_evaluations(
    eval: &EvalArgs,
    columns: &[(&str, &LoadedEmbedding, &Evaluation)],
    quiet: bool,
) -> Result<()> {
    let table: Vec<(&str, &Evaluation)> = columns.iter().map(|(n, _, e)| (*n, *e)).collect();
    print!("{}", format_scores(&table));
    if !quiet {
        for (name, _, evaluation) in columns {
            let total: f64 = evaluation.report.timings.iter().map(|t| t.seconds).sum();
            eprintln!("balans: evaluate {name}: {total:.2} s of metrics");
            eprint!("{}", format_timings(evaluation));
        }
        if let Some(peak) = peak_rss_bytes() {
            eprintln!(
                "balans: peak memory (RSS) {:.1} MiB",
                peak as f64 / (1024.0 * 1024.0)
            );
        }
    }
    if let Some(path) = &eval.json {
        let value = if columns.len() == 1 {
            serde_json::to_value(columns[0].2)
        } else {
            serde_json::to_value(
                columns
                    .iter()
                    .map(|(n, _, e)| (n.to_string(), *e))
                    .collect::<std::collections::BTreeMap<_, _>>(),
            )
        }
        .map_err(|e| BalansError::InvalidArgument(e.to_string()))?;
        let text = serde_json::to_string_pretty(&value).expect("json");
        write_bytes_atomic(path, text.as_bytes())?;
        eprintln!("balans: wrote {}", path.display());
    }
    if let Some(path) = &eval.report {
        let html = render_report(columns, eval.eval_seed)?;
        write_bytes_atomic(path, html.as_bytes())?;
        eprintln!("balans: wrote {}", path.display());
    }
    Ok(())
}

/// Evaluates a correction's output with the request made for its input: the output holds
/// the input's non-feature columns plus the corrected features.
pub async fn evaluate_output(
    ctx: &SessionContext,
    input_request: &EvaluateRequest,
    output: &std::path::Path,
    outcome: &CorrectOutcome,
    quiet: bool,
) -> Result<(LoadedEmbedding, Evaluation)> {
    let location = output.display().to_string();
    let table = register_profiles(
        ctx,
        &location,
        "eval_output_schema",
        &SourceOptions::default(),
    )
    .await?;
    let output_features: Vec<String> = table
        .schema
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .filter(|name| !outcome.roles.metadata.contains(name) && name != COVERED_COLUMN)
        .collect();
    let request = EvaluateRequest {
        input: location,
        selection: FeatureSelection {
            include: output_features,
            exclude: Vec::new(),
        },
        source: SourceOptions::default(),
        ..input_request.clone()
    };
    run_evaluate(ctx, &request, "eval_after", step_printer(quiet, "after")).await
}
