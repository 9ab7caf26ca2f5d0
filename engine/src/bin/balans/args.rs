//! Argument groups shared by several commands: the input and its column selection, the
//! session's memory options and the metric-suite options (`balans evaluate --help`).

use std::path::PathBuf;

use balans_engine::session::{SessionSettings, parse_bytes};
use balans_engine::source::{FeatureSelection, SourceOptions};
use balans_engine::{BalansError, EvaluateRequest, Result};
use balans_metrics::suite::{EvalOptions, MetricSelection};
use clap::{Args, ValueEnum};
use datafusion::prelude::SessionContext;

#[derive(Args, Debug, Clone)]
pub struct InputArgs {
    /// Input: a Parquet / Arrow IPC / CSV(.gz) file, a directory, a glob, or a file://,
    /// s3:// or https:// URL.
    #[arg(long, short)]
    pub input: String,
    #[command(flatten)]
    pub select: SelectionArgs,
}

/// Column selection and object-store options shared by the commands that read a table.
#[derive(Args, Debug, Clone)]
pub struct SelectionArgs {
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
    pub fn selection(&self) -> FeatureSelection {
        FeatureSelection {
            include: self.features.clone(),
            exclude: self.exclude.clone(),
        }
    }

    pub fn source(&self) -> SourceOptions {
        SourceOptions {
            s3_endpoint: self.s3_endpoint.clone(),
            ..SourceOptions::default()
        }
    }
}

/// Memory and working-file options of the commands that run a session.
#[derive(Args, Debug, Clone)]
pub struct SessionArgs {
    /// Memory limit, e.g. 2GB (DataFusion pool and the operators' reservations).
    #[arg(long)]
    memory_limit: Option<String>,
    /// Directory for temporary working files.
    #[arg(long)]
    temp_dir: Option<PathBuf>,
}

impl SessionArgs {
    pub fn settings(&self) -> Result<SessionSettings> {
        Ok(SessionSettings {
            memory_limit: self.memory_limit.as_deref().map(parse_bytes).transpose()?,
            temp_dir: self.temp_dir.clone(),
            ..SessionSettings::default()
        })
    }
}

/// Metric-suite options shared by `evaluate` and `correct --evaluate`.
#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// Biological label column (perturbation, compound or MoA).
    #[arg(long)]
    pub label: Option<String>,
    /// SQL predicate marking negative-control rows, e.g. "Metadata_PertType = 'negcon'".
    #[arg(long)]
    pub negcon: Option<String>,
    /// Plate column (default: Metadata_Plate when present); mAP negatives come from the same plate.
    #[arg(long)]
    pub plate: Option<String>,
    /// Well column (default: Metadata_Well when present); negcon-mAP positives differ in well.
    #[arg(long)]
    pub well: Option<String>,
    /// Metric families to leave out: silhouette, graph, kbet, lisi, map, classifier.
    #[arg(long, value_delimiter = ',', value_enum)]
    pub skip: Vec<MetricFamily>,
    /// Neighbours of the kNN graph, the row itself included.
    #[arg(long, default_value_t = 25)]
    pub neighbors: usize,
    /// Neighbours for LISI (the row itself excluded).
    #[arg(long, default_value_t = 90)]
    pub lisi_neighbors: usize,
    /// LISI perplexity.
    #[arg(long, default_value_t = 30.0)]
    pub perplexity: f64,
    /// Leiden resolution.
    #[arg(long, default_value_t = 1.0)]
    pub resolution: f64,
    /// NMI / ARI by scib-metrics' protocol: Leiden at resolutions 0.2-2.0, best NMI (labelled
    /// in the output; the reference benchmark uses resolution 1).
    #[arg(long)]
    pub resolution_sweep: bool,
    /// Leiden runs from consecutive seeds; the partition of highest modularity is kept.
    #[arg(long, default_value_t = 3)]
    pub leiden_restarts: usize,
    /// Size of the mAP null distribution.
    #[arg(long, default_value_t = 10_000)]
    pub null_size: usize,
    /// Folds of the batch classifier's cross-validation.
    #[arg(long, default_value_t = 5)]
    pub folds: usize,
    /// Evaluate the clustering and mixing metrics on at most N random cells (mAP uses all rows).
    #[arg(long, value_name = "N")]
    pub subsample: Option<usize>,
    /// Seed of Leiden, the folds, the mAP null and subsampling.
    #[arg(long = "eval-seed", default_value_t = 0)]
    pub eval_seed: u64,
    /// Write the evaluation as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a self-contained HTML report (figures embedded) to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum MetricFamily {
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
    pub fn request(&self, input: &InputArgs, batch: &[String]) -> Result<EvaluateRequest> {
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

/// Where a command runs: here, or on a cluster.
#[derive(Args, Debug, Clone, Default)]
pub struct ClusterArgs {
    /// Run the plan on a Balans cluster (`balans cluster scheduler`), e.g.
    /// df://127.0.0.1:50050. The output is written here, atomically, as without it; an
    /// unreachable scheduler is an error, never a silent local run.
    #[arg(long, value_name = "df://HOST:PORT")]
    pub scheduler: Option<String>,
    /// Compression of the cluster's shuffle files (Ballista's default: lz4). `none` saves
    /// CPU when executors share a machine or a fast network.
    #[arg(long, value_enum, requires = "scheduler")]
    pub shuffle_compression: Option<ShuffleCompression>,
}

/// Codecs of Ballista's shuffle files.
#[derive(Copy, Clone, Debug, ValueEnum)]
pub enum ShuffleCompression {
    Lz4,
    Zstd,
    None,
}

impl ClusterArgs {
    /// The session of a command: local, or connected to the cluster.
    pub async fn session(&self, settings: &SessionSettings) -> Result<SessionContext> {
        let ctx = balans_engine::session::open_session(settings, self.scheduler.as_deref()).await?;
        if let Some(codec) = self.shuffle_compression {
            let name = format!("{codec:?}").to_lowercase();
            ctx.sql(&format!(
                "SET ballista.shuffle.compression.codec = '{name}'"
            ))
            .await?;
        }
        Ok(ctx)
    }
}
