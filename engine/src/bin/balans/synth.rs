//! `balans synth`: generate the synthetic Cell Painting-like benchmark data set; its options
//! are documented in `balans synth --help`.

use std::path::PathBuf;

use balans_engine::Result;
use clap::Args;

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Rows.
    #[arg(long, default_value_t = 3000)]
    n: usize,
    /// Features.
    #[arg(long, default_value_t = 20)]
    d: usize,
    /// Compounds.
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// Batches.
    #[arg(long, default_value_t = 5)]
    batches: usize,
    /// Seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Batch shift standard deviation, in units of the compound separation.
    #[arg(long, default_value_t = 0.4)]
    shift: f64,
    /// Fraction of DMSO (negative control) rows in each batch.
    #[arg(long, default_value_t = 0.1)]
    control_frac: f64,
    /// Probability that a compound is absent from a batch (the compounds that are not unique to
    /// one batch stay in at least 2 batches).
    #[arg(long, default_value_t = 0.0)]
    missing_frac: f64,
    /// Standard deviation of the per-batch, per-feature tanh warp (a non-linear batch effect;
    /// 0 = off). [default: 0, 0.3 with --confounded]
    #[arg(long)]
    warp: Option<f64>,
    /// Fraction of the treatment compounds that occur in exactly one batch (a confounded
    /// design); adds a Metadata_PertType column when > 0. [default: 0, 0.8 with --confounded]
    #[arg(long)]
    unique_frac: Option<f64>,
    /// The first N compounds (cpd_000, ...) are positive controls: potency 1, in every batch
    /// (must be < --k); adds a Metadata_PertType column when > 0. [default: 0, 2 with
    /// --confounded]
    #[arg(long)]
    positive_controls: Option<usize>,
    /// Confounded preset, as in JUMP (batches share only the controls and a few compounds):
    /// --unique-frac 0.8 --positive-controls 2 --warp 0.3 (explicit flags override it).
    #[arg(long)]
    confounded: bool,
    /// Output Parquet file.
    #[arg(long, short)]
    output: PathBuf,
}

pub fn run(a: SynthArgs) -> Result<()> {
    let mut params = balans_engine::synth::SynthParams {
        n: a.n,
        d: a.d,
        k: a.k,
        batches: a.batches,
        seed: a.seed,
        shift: a.shift,
        control_frac: a.control_frac,
        missing_frac: a.missing_frac,
        ..Default::default()
    };
    if a.confounded {
        params = params.confounded();
    }
    params.warp = a.warp.unwrap_or(params.warp);
    params.unique_frac = a.unique_frac.unwrap_or(params.unique_frac);
    params.positive_controls = a.positive_controls.unwrap_or(params.positive_controls);
    let summary = balans_engine::synth::write_parquet(&params, &a.output, 65_536)?;
    eprintln!(
        "balans: wrote {} rows x {} features to {} ({:.2} s)",
        summary.n,
        summary.d,
        a.output.display(),
        summary.seconds
    );
    Ok(())
}
