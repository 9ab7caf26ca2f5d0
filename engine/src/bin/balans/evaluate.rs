//! `balans evaluate`: score batch mixing and biology preservation of an embedding; its
//! options are documented in `balans evaluate --help` (the metric options in `args::EvalArgs`).

use balans_engine::evaluate::{Evaluation, LoadedEmbedding};
use balans_engine::session::SessionSettings;
use balans_engine::{EvaluateRequest, Result, run_evaluate};
use clap::Args;

use crate::args::{ClusterArgs, EvalArgs, InputArgs};
use crate::output::{check_eval_outputs, present_evaluations, step_printer};

#[derive(Args, Debug)]
pub struct EvaluateArgs {
    #[command(flatten)]
    input: InputArgs,
    /// Batch key column(s), comma-separated.
    #[arg(long, short, value_delimiter = ',', required = true)]
    batch: Vec<String>,
    /// A second table (e.g. the uncorrected profiles) to evaluate with the same columns and
    /// show side by side as "before".
    #[arg(long)]
    compare: Option<String>,
    /// Replace existing --json / --report files.
    #[arg(long)]
    overwrite: bool,
    #[command(flatten)]
    eval: EvalArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
}

pub async fn run(a: EvaluateArgs, quiet: bool) -> Result<()> {
    let mut inputs = vec![a.input.input.clone()];
    inputs.extend(a.compare.clone());
    check_eval_outputs(&a.eval, a.overwrite, &inputs)?;
    let request = a.eval.request(&a.input, &a.batch)?;
    let ctx = a.cluster.session(&SessionSettings::default()).await?;
    let before = match &a.compare {
        Some(baseline) => {
            let baseline_request = EvaluateRequest {
                input: baseline.clone(),
                ..request.clone()
            };
            Some(
                run_evaluate(
                    &ctx,
                    &baseline_request,
                    "baseline",
                    step_printer(quiet, "before"),
                )
                .await?,
            )
        }
        None => None,
    };
    let what = if before.is_some() { "after" } else { "" };
    let after = run_evaluate(&ctx, &request, "profiles", step_printer(quiet, what)).await?;
    let mut columns: Vec<(&str, &LoadedEmbedding, &Evaluation)> = Vec::new();
    if let Some((loaded, evaluation)) = &before {
        columns.push(("before", loaded, evaluation));
        columns.push(("after", &after.0, &after.1));
    } else {
        columns.push(("value", &after.0, &after.1));
    }
    present_evaluations(&a.eval, &columns, quiet)
}
