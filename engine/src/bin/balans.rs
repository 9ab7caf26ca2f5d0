//! `balans`: batch correction of Cell Painting profiles from the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use balans_engine::auto::{run_correct_auto, score_correction};
use balans_engine::correct::CorrectOutcome;
use balans_engine::evaluate::{
    Evaluation, LoadedEmbedding, format_scores, format_timings, render_report,
};
use balans_engine::preprocess::{
    Aggregation, PreprocessRequest, PreprocessSteps, SelectName, StepOptions, read_blocklist,
    run_preprocess,
};
use balans_engine::progress::{TerminalProgress, format_summary, peak_rss_bytes};
use balans_engine::session::{SessionSettings, build_session, parse_bytes};
use balans_engine::source::{FeatureSelection, SourceOptions, inspect, register_profiles};
use balans_engine::writer::{check_output, write_bytes_atomic};
use balans_engine::{
    BalansError, CorrectRequest, EvaluateRequest, Result, run_correct, run_evaluate,
};
use balans_metrics::suite::{EvalOptions, MetricSelection};
use balans_operators::RunSummary;
use balans_operators::config::{Metric, PcaSetting};
use balans_operators::exec::COVERED_COLUMN;
use balans_operators::kernels::preprocess::Normalization;
use balans_operators::kernels::quality::AnchorCriterion;
use balans_operators::{
    Anchor, BalansConfig, ElbowRule, Estimator, NanPolicy, OutputSpace, Variant,
};
use clap::{Args, Parser, Subcommand, ValueEnum};
use datafusion::prelude::SessionContext;

#[derive(Parser, Debug)]
#[command(
    name = "balans",
    version,
    about = "Out-of-core batch correction of Cell Painting profiles"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Worker threads (default: all cores). Results do not depend on it.
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Hide progress bars.
    #[arg(long, short, global = true)]
    quiet: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Batch-correct a profile table and write corrected profiles as Parquet.
    Correct(Box<CorrectArgs>),
    /// Train a learned batch-robust embedding (ABRA) with batches held out for validation,
    /// and save it as a model directory for `correct --method embed` and SQL's embed(...).
    Train(Box<TrainArgs>),
    /// Run SQL statements (separated by semicolons) with Balans' functions registered; print
    /// the last result as a table or write it as Parquet.
    Sql(SqlArgs),
    /// Aggregate, normalise and select features as pycytominer does (or run the
    /// mad_int_featselect recipe) and write the preprocessed profiles as Parquet.
    Preprocess(Box<PreprocessArgs>),
    /// Score batch mixing and biology preservation of an embedding (scib metrics + mAP).
    Evaluate(EvaluateArgs),
    /// Print the detected schema, batches and data problems of a profile table.
    Inspect(InspectArgs),
    /// Run BALANS over a grid of its parameters and score every setting with the metric suite.
    Tune(TuneArgs),
    /// Generate the synthetic Cell Painting-like benchmark data set.
    Synth(SynthArgs),
    /// Run the synthetic scalability benchmark and print a Markdown table.
    Bench(BenchArgs),
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Workloads: N (with --d features) or NxD, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "10000,100000,1000000,5000000,100000x300"
    )]
    sizes: Vec<String>,
    /// Features for workloads given as N.
    #[arg(long, default_value_t = 10)]
    d: usize,
    /// Directory for the generated data (kept between runs; default: a temporary directory).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Also write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write each data set as a directory of Parquet files of this many rows each.
    #[arg(long)]
    rows_per_file: Option<usize>,
    /// Also time our Harmony (`correct --method harmony`) on the same files.
    #[arg(long)]
    harmony: bool,
    /// Also time harmonypy 2.1 on the same files with this Python (which has harmonypy,
    /// numpy, pandas and pyarrow; see bench/peers/harmonypy_bench.py).
    #[arg(long)]
    harmonypy: Option<PathBuf>,
    /// Extra options passed to the BALANS runs of `balans correct`.
    #[arg(last = true)]
    extra: Vec<String>,
}

#[derive(Args, Debug, Clone)]
struct InputArgs {
    /// Input: a Parquet / Arrow IPC / CSV(.gz) file, a directory, a glob, or a file://,
    /// s3:// or https:// URL.
    #[arg(long, short)]
    input: String,
    #[command(flatten)]
    select: SelectionArgs,
}

/// Column selection and object-store options shared by the commands that read a table.
#[derive(Args, Debug, Clone)]
struct SelectionArgs {
    /// Feature columns to use (names or regexes; default: every numeric non-Metadata_ column).
    #[arg(long, value_delimiter = ',')]
    features: Vec<String>,
    /// Feature columns to leave out (names or regexes).
    #[arg(long, value_delimiter = ',')]
    exclude: Vec<String>,
    /// S3 endpoint override (e.g. http://127.0.0.1:8333); also AWS_ENDPOINT_URL.
    #[arg(long)]
    s3_endpoint: Option<String>,
}

impl SelectionArgs {
    fn selection(&self) -> FeatureSelection {
        FeatureSelection {
            include: self.features.clone(),
            exclude: self.exclude.clone(),
        }
    }

    fn source(&self) -> SourceOptions {
        SourceOptions {
            s3_endpoint: self.s3_endpoint.clone(),
            ..SourceOptions::default()
        }
    }
}

/// Memory and working-file options of the commands that run a session.
#[derive(Args, Debug, Clone)]
struct SessionArgs {
    /// Memory limit, e.g. 2GB (DataFusion pool and the operators' reservations).
    #[arg(long)]
    memory_limit: Option<String>,
    /// Directory for temporary working files.
    #[arg(long)]
    temp_dir: Option<PathBuf>,
}

impl SessionArgs {
    fn settings(&self) -> Result<SessionSettings> {
        Ok(SessionSettings {
            memory_limit: self.memory_limit.as_deref().map(parse_bytes).transpose()?,
            temp_dir: self.temp_dir.clone(),
            ..SessionSettings::default()
        })
    }
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

#[derive(Args, Debug)]
struct CorrectArgs {
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
enum ModelArg {
    /// ABRA: MLP encoder, adversarial batch-statistics perturbation, ArcFace, alignment.
    Abra,
    /// CellPainTR: feature-token Hyena transformer with a source token; masked, then
    /// intra-source and inter-source supervised contrastive training (--epochs per stage).
    Cellpaintr,
}

#[derive(Args, Debug)]
struct TrainArgs {
    #[command(flatten)]
    input: InputArgs,
    /// The model to train.
    #[arg(long, value_enum, default_value = "abra")]
    model: ModelArg,
    /// Batch column: validation holds out whole batches.
    #[arg(long, short)]
    batch: String,
    /// Label column the classifier learns (perturbation, compound or MoA).
    #[arg(long)]
    label: String,
    /// Model directory to write (model.safetensors + config.json).
    #[arg(long, short)]
    output: PathBuf,
    /// Largest number of epochs.
    #[arg(long, default_value_t = 30)]
    epochs: usize,
    /// Rows per mini-batch.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Stop after this many epochs without a better validation score.
    #[arg(long, default_value_t = 5)]
    patience: usize,
    /// Batches held out for validation [default: a fifth, at least one].
    #[arg(long)]
    validation_batches: Option<usize>,
    /// Seed of initialisation, the validation split and sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Hidden width.
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// Embedding width.
    #[arg(long, default_value_t = 64)]
    embedding: usize,
    /// ArcFace scale s.
    #[arg(long, default_value_t = 16.0)]
    scale: f64,
    /// ArcFace additive angular margin (radians).
    #[arg(long, default_value_t = 0.3)]
    margin: f64,
    /// Weight of the clean/perturbed alignment term.
    #[arg(long, default_value_t = 1.0)]
    alignment_weight: f64,
    /// Bound of the batch-statistics perturbation coefficients (0 turns it off).
    #[arg(long, default_value_t = 2.0)]
    perturbation_bound: f64,
    /// Gradient-ascent steps that choose the perturbation.
    #[arg(long, default_value_t = 2)]
    adversarial_steps: usize,
    /// CellPainTR token width (the reference model uses 256).
    #[arg(long, default_value_t = 64)]
    d_model: usize,
    /// CellPainTR residual blocks (the reference model uses 4).
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// CellPainTR MLP width [default: 4 x --d-model].
    #[arg(long)]
    mlp: Option<usize>,
    /// CellPainTR SupCon temperature.
    #[arg(long, default_value_t = 0.07)]
    temperature: f64,
    /// Where to train: cpu, cuda or cuda:N (CUDA needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    device: balans_learned::ComputeDevice,
    #[command(flatten)]
    session: SessionArgs,
    /// Replace an existing model directory.
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args, Debug)]
struct SqlArgs {
    /// The statements, e.g. "CREATE EXTERNAL TABLE p STORED AS PARQUET LOCATION 'x.parquet';
    /// SELECT count(*) FROM p". Without statements (and --file), they are read from standard
    /// input: an interactive shell on a terminal, with a history file.
    query: Option<String>,
    /// Read the statements from this file instead.
    #[arg(long, short)]
    file: Option<PathBuf>,
    /// Write the last statement's result to this Parquet file instead of printing it.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Replace an existing output file.
    #[arg(long)]
    overwrite: bool,
    /// Print at most this many rows of the result.
    #[arg(long, default_value_t = 50)]
    max_rows: usize,
    /// S3 endpoint for s3:// locations (e.g. http://127.0.0.1:8333); also AWS_ENDPOINT_URL.
    #[arg(long)]
    s3_endpoint: Option<String>,
    #[command(flatten)]
    session: SessionArgs,
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

#[derive(Args, Debug)]
struct PreprocessArgs {
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
    /// Replace an existing output file.
    #[arg(long)]
    overwrite: bool,
    /// Also write the run summary (kept and dropped features per step) as JSON.
    #[arg(long)]
    summary_json: Option<PathBuf>,
}

/// Metric-suite options shared by `evaluate` and `correct --evaluate`.
#[derive(Args, Debug, Clone)]
struct EvalArgs {
    /// Biological label column (perturbation, compound or MoA).
    #[arg(long)]
    label: Option<String>,
    /// SQL predicate marking negative-control rows, e.g. "Metadata_PertType = 'negcon'".
    #[arg(long)]
    negcon: Option<String>,
    /// Plate column (default: Metadata_Plate when present); mAP negatives come from the same plate.
    #[arg(long)]
    plate: Option<String>,
    /// Well column (default: Metadata_Well when present); negcon-mAP positives differ in well.
    #[arg(long)]
    well: Option<String>,
    /// Metric families to leave out: silhouette, graph, kbet, lisi, map, classifier.
    #[arg(long, value_delimiter = ',', value_enum)]
    skip: Vec<MetricFamily>,
    /// Neighbours of the kNN graph, the row itself included.
    #[arg(long, default_value_t = 25)]
    neighbors: usize,
    /// Neighbours for LISI (the row itself excluded).
    #[arg(long, default_value_t = 90)]
    lisi_neighbors: usize,
    /// LISI perplexity.
    #[arg(long, default_value_t = 30.0)]
    perplexity: f64,
    /// Leiden resolution.
    #[arg(long, default_value_t = 1.0)]
    resolution: f64,
    /// NMI / ARI by scib-metrics' protocol: Leiden at resolutions 0.2-2.0, best NMI (labelled
    /// in the output; the reference benchmark uses resolution 1).
    #[arg(long)]
    resolution_sweep: bool,
    /// Leiden runs from consecutive seeds; the partition of highest modularity is kept.
    #[arg(long, default_value_t = 3)]
    leiden_restarts: usize,
    /// Size of the mAP null distribution.
    #[arg(long, default_value_t = 10_000)]
    null_size: usize,
    /// Folds of the batch classifier's cross-validation.
    #[arg(long, default_value_t = 5)]
    folds: usize,
    /// Evaluate the clustering and mixing metrics on at most N random cells (mAP uses all rows).
    #[arg(long, value_name = "N")]
    subsample: Option<usize>,
    /// Seed of Leiden, the folds, the mAP null and subsampling.
    #[arg(long = "eval-seed", default_value_t = 0)]
    eval_seed: u64,
    /// Write the evaluation as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a self-contained HTML report (figures embedded) to this file.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum MetricFamily {
    Silhouette,
    Graph,
    Kbet,
    Lisi,
    Map,
    Classifier,
}

impl EvalArgs {
    fn options(&self) -> EvalOptions {
        let mut metrics = MetricSelection::default();
        for family in &self.skip {
            match family {
                MetricFamily::Silhouette => metrics.silhouette = false,
                MetricFamily::Graph => metrics.graph = false,
                MetricFamily::Kbet => metrics.kbet = false,
                MetricFamily::Lisi => metrics.lisi = false,
                MetricFamily::Map => metrics.map = false,
                MetricFamily::Classifier => metrics.classifier = false,
            }
        }
        EvalOptions {
            n_neighbors: self.neighbors,
            lisi_neighbors: self.lisi_neighbors,
            perplexity: self.perplexity,
            resolution: self.resolution,
            leiden_restarts: self.leiden_restarts,
            resolution_sweep: self.resolution_sweep,
            seed: self.eval_seed,
            null_size: self.null_size,
            cv_folds: self.folds,
            subsample: self.subsample,
            metrics,
            ..EvalOptions::default()
        }
    }

    /// The evaluation of the table `input` names, with batch key `batch`.
    fn request(&self, input: &InputArgs, batch: &[String]) -> Result<EvaluateRequest> {
        let label = self.label.clone().ok_or_else(|| {
            BalansError::InvalidArgument(
                "the evaluation needs --label COL (the biological label, e.g. Metadata_MoA)".into(),
            )
        })?;
        Ok(EvaluateRequest {
            input: input.input.clone(),
            batch: batch.to_vec(),
            label,
            negcon: self.negcon.clone(),
            plate: self.plate.clone(),
            well: self.well.clone(),
            selection: input.select.selection(),
            options: self.options(),
            source: input.select.source(),
        })
    }
}

#[derive(Args, Debug)]
struct EvaluateArgs {
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
}

#[derive(Args, Debug)]
struct TuneArgs {
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

#[derive(Args, Debug)]
struct InspectArgs {
    /// Input: a file, directory, glob, or file://, s3://, https:// URL (or use --input).
    #[arg(value_name = "PATH_OR_URL")]
    location: Option<String>,
    /// Input, as for `correct`.
    #[arg(long = "input", short = 'i', conflicts_with = "location")]
    input: Option<String>,
    #[command(flatten)]
    select: SelectionArgs,
    /// Batch key column(s) whose sizes to report.
    #[arg(long, short, value_delimiter = ',')]
    batch: Vec<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct SynthArgs {
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

fn pca_setting(text: &str) -> Result<PcaSetting> {
    balans_engine::parameters::pca_setting(text)
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

/// Parameters a `--grid` dimension may vary: every correction parameter.
const GRID_PARAMETERS: &str = balans_engine::parameters::PARAMETERS;

/// Sets one BALANS parameter from its `--grid` name and text value.
fn apply_grid_value(config: &mut BalansConfig, name: &str, value: &str) -> Result<()> {
    balans_engine::parameters::set_parameter(config, name, value).map_err(|e| {
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

async fn correct(a: CorrectArgs, quiet: bool) -> Result<()> {
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
    let ctx = build_session(&a.session.settings()?)?;
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
    let auto = a.strength.as_deref().map(str::trim) == Some("auto");
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

/// Prints each evaluation step to stderr (unless quiet).
fn step_printer(quiet: bool, what: &str) -> Arc<dyn Fn(&str) + Send + Sync> {
    let what = what.to_string();
    Arc::new(move |step: &str| {
        if !quiet {
            eprintln!("balans: evaluate {what}: {step}");
        }
    })
}

/// Checks the `--json` / `--report` outputs before any work is done.
fn check_eval_outputs(eval: &EvalArgs, overwrite: bool, inputs: &[String]) -> Result<()> {
    for path in [&eval.json, &eval.report].into_iter().flatten() {
        check_output(path, overwrite, inputs)?;
    }
    Ok(())
}

/// Prints the score table and writes the JSON and HTML outputs of one or two evaluations.
fn present_evaluations(
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

async fn run_evaluate_command(a: EvaluateArgs, quiet: bool) -> Result<()> {
    let mut inputs = vec![a.input.input.clone()];
    inputs.extend(a.compare.clone());
    check_eval_outputs(&a.eval, a.overwrite, &inputs)?;
    let request = a.eval.request(&a.input, &a.batch)?;
    let ctx = build_session(&SessionSettings::default())?;
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

/// Evaluates a correction's output with the request made for its input: the output holds
/// the input's non-feature columns plus the corrected features.
async fn evaluate_output(
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

/// Most settings one `tune` run takes (each is a full correction plus an evaluation).
const MAX_GRID_SETTINGS: usize = 256;

async fn run_tune(a: TuneArgs, quiet: bool) -> Result<()> {
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

/// A Markdown table: the input, then one row per setting.
/// One `tune` setting: label, run summary, correction seconds, evaluation, and the
/// label-free criterion of `--strength auto` (with `--negcon`).
type TuneRow = (
    String,
    Option<RunSummary>,
    f64,
    Evaluation,
    Option<AnchorCriterion>,
);

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

async fn run_inspect(a: InspectArgs) -> Result<()> {
    let location = a.location.or(a.input).ok_or_else(|| {
        BalansError::InvalidArgument("inspect needs a location: balans inspect PATH_OR_URL".into())
    })?;
    let ctx = build_session(&SessionSettings::default())?;
    let table = register_profiles(&ctx, &location, "profiles", &a.select.source()).await?;
    let report = inspect(&ctx, &table, &a.select.selection(), &a.batch).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report).expect("json"));
    } else {
        print!("{report}");
    }
    Ok(())
}

fn run_synth(a: SynthArgs) -> Result<()> {
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

fn run_bench(a: BenchArgs, threads: usize) -> Result<()> {
    use balans_engine::bench::{BenchOptions, Workload, markdown_table, run_bench};
    let workloads: Vec<Workload> = a
        .sizes
        .iter()
        .map(|s| Workload::parse(s, a.d))
        .collect::<Result<_>>()?;
    let tmp = tempfile::tempdir()?;
    let dir = a
        .data_dir
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let opts = BenchOptions {
        exe: std::env::current_exe()?,
        threads,
        dir,
        extra: a.extra.clone(),
        rows_per_file: a.rows_per_file,
        harmony: a.harmony,
        harmonypy: a.harmonypy.clone(),
    };
    let rows = run_bench(&workloads, &opts)?;
    println!("{}", markdown_table(&rows));
    if let Some(path) = a.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows).expect("json"))?;
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

async fn run_train_command(a: TrainArgs, quiet: bool) -> Result<()> {
    use balans_engine::train::{ModelSpec, TrainRequest, run_train};
    let started = Instant::now();
    let ctx = build_session(&a.session.settings()?)?;
    let model = match a.model {
        ModelArg::Abra => ModelSpec::Abra(balans_learned::AbraConfig {
            hidden: a.hidden,
            embedding: a.embedding,
            scale: a.scale,
            margin: a.margin,
            alignment_weight: a.alignment_weight,
            perturbation_bound: a.perturbation_bound,
            adversarial_steps: a.adversarial_steps,
            ..balans_learned::AbraConfig::default()
        }),
        ModelArg::Cellpaintr => ModelSpec::CellPainTr(balans_learned::CellPainTrConfig {
            d_model: a.d_model,
            layers: a.layers,
            mlp: a.mlp.unwrap_or(4 * a.d_model),
            temperature: a.temperature,
            ..balans_learned::CellPainTrConfig::default()
        }),
    };
    let request = TrainRequest {
        input: a.input.input.clone(),
        output: a.output.clone(),
        batch: a.batch.clone(),
        label: a.label.clone(),
        selection: a.input.select.selection(),
        source: a.input.select.source(),
        model,
        options: balans_learned::TrainOptions {
            epochs: a.epochs,
            batch_size: a.batch_size,
            learning_rate: a.lr,
            weight_decay: a.weight_decay,
            patience: a.patience,
            seed: a.seed,
            validation_batches: a.validation_batches,
            batch_column: a.batch.clone(),
            label_column: a.label.clone(),
            device: a.device,
            ..balans_learned::TrainOptions::default()
        },
        overwrite: a.overwrite,
    };
    // Epochs are numbered on through the stages (CellPainTR has three).
    let epochs = a.epochs
        * match a.model {
            ModelArg::Abra => 1,
            ModelArg::Cellpaintr => 3,
        };
    let best = std::sync::Arc::new(std::sync::Mutex::new(f64::NEG_INFINITY));
    let best_seen = best.clone();
    let progress = Box::new(move |e: &balans_learned::EpochRecord| {
        let mut best = best_seen.lock().expect("best");
        let marker = if e.validation > *best {
            *best = e.validation;
            "  *"
        } else {
            ""
        };
        if !quiet {
            let parts: Vec<String> = e.parts.iter().map(|p| format!("{p:.3}")).collect();
            eprintln!(
                "balans train: {} epoch {:>3}/{epochs}  loss {:.4} ({})  validation {:.4}  {:.1} s{marker}",
                e.stage,
                e.epoch,
                e.loss,
                parts.join(" / "),
                e.validation,
                e.seconds
            );
        }
    });
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let outcome = run_train(&ctx, &request, progress, cancel).await?;
    let card = &outcome.card;
    eprintln!(
        "balans: wrote {} ({} features -> {} dims, {} labels); best epoch {} of {}{} with \
         {} {:.4} on held-out batches [{}]",
        a.output.display(),
        card.features.len(),
        card.architecture.embedding(),
        card.labels.len(),
        card.best_epoch,
        card.history.len(),
        if outcome.stopped_early {
            " (stopped early)"
        } else {
            ""
        },
        card.validation_metric,
        card.best_validation,
        card.split.validation.join(", ")
    );
    eprintln!(
        "balans: trained in {:.1} s{}",
        started.elapsed().as_secs_f64(),
        peak_rss_bytes()
            .map(|p| format!(
                ", peak memory (RSS) {:.1} MiB",
                p as f64 / (1024.0 * 1024.0)
            ))
            .unwrap_or_default()
    );
    Ok(())
}

async fn run_preprocess_command(a: PreprocessArgs, quiet: bool) -> Result<()> {
    let started = Instant::now();
    let steps = preprocess_steps(&a)?;
    let ctx = build_session(&a.session.settings()?)?;
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

/// Prints the first `max_rows` rows of a result as a table, with a row count.
fn print_result(
    schema: datafusion::arrow::datatypes::SchemaRef,
    batches: &[datafusion::arrow::array::RecordBatch],
    max_rows: usize,
) -> Result<()> {
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let mut shown = Vec::new();
    let mut left = max_rows;
    for b in batches {
        if left == 0 {
            break;
        }
        let take = b.num_rows().min(left);
        shown.push(b.slice(0, take));
        left -= take;
    }
    if shown.is_empty() {
        shown.push(datafusion::arrow::array::RecordBatch::new_empty(schema));
    }
    println!(
        "{}",
        datafusion::arrow::util::pretty::pretty_format_batches(&shown)?
    );
    if rows > max_rows {
        println!("({rows} rows, first {max_rows} shown; --max-rows or --output for more)");
    } else {
        println!("({rows} row{})", if rows == 1 { "" } else { "s" });
    }
    Ok(())
}

/// The session of `balans sql`: the memory options and the S3 endpoint.
fn sql_session(a: &SqlArgs) -> Result<SessionContext> {
    build_session(&SessionSettings {
        source: SourceOptions {
            s3_endpoint: a.s3_endpoint.clone(),
            ..SourceOptions::default()
        },
        ..a.session.settings()?
    })
}

/// The file the shell appends its statements to.
fn history_path() -> Option<PathBuf> {
    std::env::var_os("BALANS_HISTORY")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".balans_history")))
}

/// `balans sql` without statements: read them from standard input, one result per statement.
/// On a terminal it is a shell: a prompt, line editing with history recall
/// ([`balans_engine::line_editor`]), a history file (`$BALANS_HISTORY` or
/// `~/.balans_history`) listed by `\history`, and `\q`, `exit` or Ctrl-D to end; an error is
/// printed and the session goes on, and Ctrl-C abandons the statement being typed.
async fn run_sql_shell(a: &SqlArgs) -> Result<()> {
    use balans_engine::line_editor::{Outcome, read_line};
    use std::io::{BufRead, IsTerminal, Write};
    let ctx = sql_session(a)?;
    let interactive = std::io::stdin().is_terminal() && std::io::stderr().is_terminal();
    let history_file = history_path();
    // Earlier statements, oldest first, for recall with the arrow keys.
    let mut history: Vec<String> = history_file
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|text| text.lines().map(str::to_string).collect())
        .unwrap_or_default();
    if interactive {
        eprintln!(
            "balans sql: end statements with ';'; arrows edit and recall, \\history lists \
             earlier statements, \\q quits"
        );
    }
    let mut pending = String::new();
    let mut failures = 0usize;
    // Piped input is read through one lock; the line editor takes its own per line.
    let mut lines = (!interactive).then(|| std::io::stdin().lock().lines());
    loop {
        let line = if interactive {
            let prompt = if pending.trim().is_empty() {
                "balans> "
            } else {
                "   ...> "
            };
            match read_line(prompt, &history, &mut std::io::stderr())? {
                Outcome::Done(line) => line,
                Outcome::Interrupted => {
                    pending.clear();
                    continue;
                }
                Outcome::EndOfInput | Outcome::Editing => break,
            }
        } else {
            match lines.as_mut().and_then(|l| l.next()) {
                Some(line) => line?,
                None => break,
            }
        };
        let command = line.trim();
        if pending.trim().is_empty() {
            match command {
                "\\q" | "exit" | "quit" => break,
                "\\history" => {
                    for entry in &history {
                        println!("{entry}");
                    }
                    continue;
                }
                _ => {}
            }
        }
        pending.push_str(&line);
        pending.push('\n');
        if !pending.trim_end().ends_with(';') {
            continue;
        }
        for statement in balans_engine::sql::split_statements(&pending) {
            let entry = format!("{};", statement.replace('\n', " "));
            // The history file is best effort: a read-only home does not stop the shell.
            if let Some(Ok(mut file)) = history_file.as_ref().map(|path| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
            }) {
                let _ = writeln!(file, "{entry}");
            }
            history.push(entry);
            match balans_engine::sql::run_sql(&ctx, &statement).await {
                Ok((schema, batches)) => print_result(schema, &batches, a.max_rows)?,
                Err(e) => {
                    failures += 1;
                    eprintln!("balans: error: {e}");
                }
            }
        }
        pending.clear();
    }
    if !pending.trim().is_empty() {
        return Err(BalansError::InvalidArgument(
            "the input ended inside a statement (missing ';')".into(),
        ));
    }
    if failures > 0 && !interactive {
        return Err(BalansError::InvalidArgument(format!(
            "{failures} statement(s) failed"
        )));
    }
    Ok(())
}

async fn run_sql_command(a: SqlArgs) -> Result<()> {
    let script = match (&a.query, &a.file) {
        (Some(q), None) => q.clone(),
        (None, Some(path)) => std::fs::read_to_string(path).map_err(|e| {
            BalansError::InvalidArgument(format!("cannot read {}: {e}", path.display()))
        })?,
        (Some(_), Some(_)) => {
            return Err(BalansError::InvalidArgument(
                "give the statements either as an argument or with --file, not both".into(),
            ));
        }
        (None, None) => {
            if a.output.is_some() {
                return Err(BalansError::InvalidArgument(
                    "--output needs the statements as an argument or with --file".into(),
                ));
            }
            return run_sql_shell(&a).await;
        }
    };
    let ctx = sql_session(&a)?;
    match &a.output {
        Some(path) => {
            let written =
                balans_engine::sql::run_sql_to_file(&ctx, &script, path, a.overwrite).await?;
            eprintln!("balans: wrote {} rows to {}", written.rows, path.display());
        }
        None => {
            let (schema, batches) = balans_engine::sql::run_sql(&ctx, &script).await?;
            print_result(schema, &batches, a.max_rows)?;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = cli
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    if let Err(e) = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
    {
        eprintln!("balans: cannot start {threads} threads: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("balans: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let quiet = cli.quiet;
    let result = runtime.block_on(async move {
        let job = async move {
            match cli.command {
                Command::Correct(a) => correct(*a, quiet).await,
                Command::Train(a) => run_train_command(*a, quiet).await,
                Command::Preprocess(a) => run_preprocess_command(*a, quiet).await,
                Command::Sql(a) => run_sql_command(a).await,
                Command::Evaluate(a) => run_evaluate_command(a, quiet).await,
                Command::Inspect(a) => run_inspect(a).await,
                Command::Tune(a) => run_tune(a, quiet).await,
                Command::Synth(a) => run_synth(a),
                Command::Bench(a) => run_bench(a, threads),
            }
        };
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            r = job => Some(r),
            _ = tokio::signal::ctrl_c() => None,
            _ = terminate => None,
        }
    });
    // Waits for blocking workers to notice cancellation and delete their working files.
    runtime.shutdown_timeout(std::time::Duration::from_secs(10));
    match result {
        Some(Ok(())) => ExitCode::SUCCESS,
        Some(Err(e)) => {
            eprintln!("balans: error: {e}");
            ExitCode::from(1)
        }
        None => {
            eprintln!("balans: interrupted; no output written, temporary files removed");
            ExitCode::from(130)
        }
    }
}
