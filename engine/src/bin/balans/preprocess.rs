//! `balans preprocess`: aggregate, normalise and select features as pycytominer does; its
//! options are documented in `balans preprocess --help`.

use std::path::PathBuf;
use std::time::Instant;

use balans_engine::preprocess::{
    Aggregation, PreprocessRequest, PreprocessSteps, SelectName, StepOptions, read_blocklist,
    run_preprocess,
};
use balans_engine::progress::peak_rss_bytes;
use balans_engine::writer::write_bytes_atomic;
use balans_engine::{BalansError, Result};
use balans_operators::kernels::preprocess::Normalization;
use clap::{Args, ValueEnum};

use crate::args::{ClusterArgs, InputArgs, SessionArgs};

#[derive(Args, Debug)]
pub struct PreprocessArgs {
    #[command(flatten)]
    input: InputArgs,
    /// Output Parquet file (written atomically; never over the input).
    #[arg(long, short)]
    output: PathBuf,
    /// A whole recipe (the individual steps below then must not be given, except --aggregate).
    #[arg(long, value_enum)]
    recipe: Option<RecipeArg>,
    /// Plate column: per-plate statistics and aggregation strata.
    #[arg(long)]
    plate: Option<String>,
    /// Well column (aggregation strata).
    #[arg(long)]
    well: Option<String>,
    /// SQL predicate marking the negative controls, e.g. "Metadata_PertType = 'negcon'".
    #[arg(long)]
    negcon: Option<String>,
    /// Aggregate rows to one per plate and well first (single-cell input).
    #[arg(long, value_enum)]
    aggregate: Option<AggregateArg>,
    /// Normalisation.
    #[arg(long, value_enum)]
    normalize: Option<NormalizeArg>,
    /// Where the normalisation is fitted and applied [default: plate with --plate, else all].
    #[arg(long, value_enum)]
    normalize_scope: Option<ScopeArg>,
    /// Fit the normalisation on all rows instead of the --negcon rows.
    #[arg(long)]
    normalize_on_all: bool,
    /// Epsilon of mad_robustize (pycytominer's default).
    #[arg(long, default_value_t = 1e-18)]
    mad_epsilon: f64,
    /// Rank inverse normal transform after normalising.
    #[arg(long)]
    rank_int: bool,
    /// Feature-selection operations, comma-separated, applied in order.
    #[arg(long, value_enum, value_delimiter = ',')]
    feature_select: Vec<SelectArg>,
    /// drop_na_columns: largest NaN fraction kept.
    #[arg(long, default_value_t = 0.05)]
    na_cutoff: f64,
    /// variance_threshold: smallest variance kept (exclusive).
    #[arg(long, default_value_t = 1e-6)]
    min_variance: f64,
    /// frequency_threshold: second-most-common / most-common value count cut.
    #[arg(long, default_value_t = 0.05)]
    freq_cut: f64,
    /// frequency_threshold: distinct values / rows cut.
    #[arg(long, default_value_t = 0.01)]
    unique_cut: f64,
    /// correlation_threshold: signed Pearson correlation above which one feature of a pair goes.
    #[arg(long, default_value_t = 0.9)]
    corr_threshold: f64,
    /// blocklist: a file of feature names, one per line (a first line "blocklist" is a header).
    #[arg(long)]
    blocklist: Option<PathBuf>,
    #[command(flatten)]
    session: SessionArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Replace an existing output file.
    #[arg(long)]
    overwrite: bool,
    /// Also write the run summary (kept and dropped features per step) as JSON.
    #[arg(long)]
    summary_json: Option<PathBuf>,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum RecipeArg {
    /// Arevalo et al. 2024: drop NaN/inf columns, variant features, per-plate MAD
    /// normalisation on the negative controls, rank INT, frequency and correlation thresholds.
    MadIntFeatselect,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum AggregateArg {
    Median,
    Mean,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum NormalizeArg {
    /// (x - mean) / std, population std (scikit-learn StandardScaler).
    Standardize,
    /// (x - median) / IQR (scikit-learn RobustScaler).
    Robustize,
    /// (x - median) / (1.4826 MAD + epsilon) (pycytominer mad_robustize).
    MadRobustize,
    /// (x - median) / MAD, unscaled, no epsilon (the recipe's form).
    Mad,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum ScopeArg {
    /// Per plate (needs --plate).
    Plate,
    /// The whole table.
    All,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
#[allow(clippy::enum_variant_names)]
enum SelectArg {
    DropNaColumns,
    VarianceThreshold,
    FrequencyThreshold,
    CorrelationThreshold,
    Blocklist,
}

pub async fn run(a: PreprocessArgs, quiet: bool) -> Result<()> {
    let started = Instant::now();
    let steps = preprocess_steps(&a)?;
    let ctx = a.cluster.session(&a.session.settings()?).await?;
    let request = PreprocessRequest {
        input: a.input.input.clone(),
        output: a.output.clone(),
        selection: a.input.select.selection(),
        plate: a.plate.clone(),
        well: a.well.clone(),
        negcon: a.negcon.clone(),
        steps,
        overwrite: a.overwrite,
        source: a.input.select.source(),
    };
    let log = |line: &str| {
        if !quiet {
            eprintln!("balans preprocess: {line}");
        }
    };
    let outcome = run_preprocess(&ctx, &request, &log).await?;
    let total = started.elapsed().as_secs_f64();
    eprintln!(
        "balans: wrote {} rows x {} features ({} in) to {}",
        outcome.rows,
        outcome.features.len(),
        outcome.input_features.len(),
        a.output.display()
    );
    if !quiet {
        let stages: Vec<String> = outcome
            .timings
            .iter()
            .map(|(name, seconds)| format!("{name} {seconds:.2} s"))
            .collect();
        eprintln!("  stages: {}", stages.join(", "));
        eprintln!(
            "  total {total:.2} s, peak memory {}",
            peak_rss_bytes().map_or("unknown".to_string(), |b| format!(
                "{:.1} MiB",
                b as f64 / (1u64 << 20) as f64
            ))
        );
    }
    if let Some(path) = &a.summary_json {
        let json = serde_json::to_vec_pretty(&outcome)
            .map_err(|e| BalansError::InvalidArgument(e.to_string()))?;
        write_bytes_atomic(path, &json)?;
    }
    Ok(())
}

fn preprocess_steps(a: &PreprocessArgs) -> Result<PreprocessSteps> {
    let options = StepOptions {
        recipe: matches!(a.recipe, Some(RecipeArg::MadIntFeatselect)),
        aggregate: a.aggregate.map(|g| match g {
            AggregateArg::Median => Aggregation::Median,
            AggregateArg::Mean => Aggregation::Mean,
        }),
        normalize: a.normalize.map(|m| match m {
            NormalizeArg::Standardize => Normalization::Standardize,
            NormalizeArg::Robustize => Normalization::Robustize,
            NormalizeArg::MadRobustize => Normalization::MadRobustize {
                epsilon: a.mad_epsilon,
            },
            NormalizeArg::Mad => Normalization::Mad,
        }),
        normalize_per_plate: a.normalize_scope.map(|s| matches!(s, ScopeArg::Plate)),
        normalize_on_all: a.normalize_on_all,
        mad_epsilon: a.mad_epsilon,
        rank_int: a.rank_int,
        feature_select: a
            .feature_select
            .iter()
            .map(|op| match op {
                SelectArg::DropNaColumns => SelectName::DropNaColumns,
                SelectArg::VarianceThreshold => SelectName::VarianceThreshold,
                SelectArg::FrequencyThreshold => SelectName::FrequencyThreshold,
                SelectArg::CorrelationThreshold => SelectName::CorrelationThreshold,
                SelectArg::Blocklist => SelectName::Blocklist,
            })
            .collect(),
        na_cutoff: a.na_cutoff,
        min_variance: a.min_variance,
        freq_cut: a.freq_cut,
        unique_cut: a.unique_cut,
        corr_threshold: a.corr_threshold,
        blocklist: a.blocklist.as_deref().map(read_blocklist).transpose()?,
    };
    options.steps(a.plate.is_some(), a.negcon.is_some())
}
