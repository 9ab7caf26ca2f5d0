//! The `preprocess` job: well aggregation, pycytominer-compatible normalisation and feature
//! selection, and the `mad_int_featselect` recipe of Arevalo et al. 2024.
//!
//! The table is read once (through DataFusion; aggregation is a grouped query) into a
//! column-major `f64` working file that is memory-mapped: feature `j` is one contiguous
//! column, so every step is a pass over columns (per-plate statistics, ranks, the Gram matrix
//! of the correlation rule) and memory holds one column at a time, not the table. The
//! metadata goes to an Arrow IPC working file. The steps run in a fixed order — aggregate,
//! drop non-finite columns, variant features, normalise, rank inverse normal transform,
//! feature selection — and the result is written atomically, metadata first in input order,
//! kept features as `Float64`.
//!
//! Feature selection changes the schema, so preprocessing is a job rather than a streaming
//! operator: its output columns are known only after the data has been seen.

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use balans_operators::io::mmap_ipc::{BatchWriter, MappedIpcFile};
use balans_operators::kernels::preprocess::{
    Normalization, correlation_exclusions, fails_frequency, fit_scaling, frequency_stats,
    is_variant, mad, median_in_place, nan_fraction, nan_variance, pearson_correlation,
    rank_inverse_normal,
};
use datafusion::arrow::array::{Array, ArrayRef, AsArray, Float64Array, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef};
use datafusion::execution::SpillFile;
use datafusion::functions_aggregate::expr_fn::{avg, median, min};
use datafusion::logical_expr::{Expr, ExprSchemable, when};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::prelude::{SessionContext, ident, lit};
use datafusion::scalar::ScalarValue;
use futures::StreamExt;
use memmap2::MmapMut;
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{BalansError, Result};
use crate::evaluate::negcon_predicate;
use crate::source::{FeatureSelection, SourceOptions, register_profiles, resolve_columns};
use crate::writer::{WriteStats, check_output, write_parquet_atomic};

/// Column the engine adds to carry the `negcon` predicate's value.
const NEGCON_COLUMN: &str = "__balans_negcon";

/// How single-cell rows are aggregated to wells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Mean per plate and well (NaN ignored).
    Mean,
    /// Median per plate and well (NaN ignored; pycytominer's default).
    Median,
}

/// A normalisation step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormalizeStep {
    /// Centre and scale.
    pub method: Normalization,
    /// Fit and apply per plate (else on the whole table).
    pub per_plate: bool,
    /// Fit on the negative controls (else on all rows).
    pub on_negcon: bool,
}

/// A feature-selection operation (pycytominer `feature_select`, in the order given).
#[derive(Debug, Clone, PartialEq)]
pub enum SelectOp {
    /// Drop features with a NaN fraction above the cutoff (`drop_na_columns`, 0.05).
    DropNaColumns {
        /// Largest NaN fraction kept.
        cutoff: f64,
    },
    /// Drop features whose variance is not above the minimum (`variance_threshold`, 1e-6).
    VarianceThreshold {
        /// Smallest variance kept (exclusive).
        min_variance: f64,
    },
    /// Drop repetitive features (`frequency_threshold`: 0.05 and 0.01).
    FrequencyThreshold {
        /// Second-most-common over most-common value count below which a feature goes.
        freq_cut: f64,
        /// Distinct values over rows below which a feature goes.
        unique_cut: f64,
    },
    /// Drop one feature of every pair correlated above the threshold (`correlation_threshold`,
    /// Pearson, 0.9).
    CorrelationThreshold {
        /// Signed Pearson correlation above which a pair is redundant.
        threshold: f64,
    },
    /// Drop the named features (`blocklist`).
    Blocklist(Vec<String>),
}

impl SelectOp {
    /// pycytominer's name of the operation.
    pub fn name(&self) -> &'static str {
        match self {
            SelectOp::DropNaColumns { .. } => "drop_na_columns",
            SelectOp::VarianceThreshold { .. } => "variance_threshold",
            SelectOp::FrequencyThreshold { .. } => "frequency_threshold",
            SelectOp::CorrelationThreshold { .. } => "correlation_threshold",
            SelectOp::Blocklist(_) => "blocklist",
        }
    }
}

/// The steps of a preprocessing run, applied in this field order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PreprocessSteps {
    /// Aggregate rows to one per plate and well first.
    pub aggregate: Option<Aggregation>,
    /// Drop every feature with a NaN or infinite value.
    pub drop_nonfinite: bool,
    /// Keep only features whose negative-control MAD is non-zero and above 1e-3 of the
    /// median on every plate (Arevalo et al.'s variant features).
    pub variant_features: bool,
    /// Normalise.
    pub normalize: Option<NormalizeStep>,
    /// Rank inverse normal transform per feature over all rows.
    pub rank_int: bool,
    /// Feature selection, in order.
    pub select: Vec<SelectOp>,
}

impl PreprocessSteps {
    /// The `mad_int_featselect` recipe (`shared/specs/metrics.md`): drop non-finite columns,
    /// variant features, per-plate MAD normalisation on the negative controls (unscaled, no
    /// epsilon), rank INT, then frequency (0.05 / 0.01) and correlation (0.9) thresholds.
    pub fn mad_int_featselect() -> Self {
        Self {
            aggregate: None,
            drop_nonfinite: true,
            variant_features: true,
            normalize: Some(NormalizeStep {
                method: Normalization::Mad,
                per_plate: true,
                on_negcon: true,
            }),
            rank_int: true,
            select: vec![
                SelectOp::FrequencyThreshold {
                    freq_cut: 0.05,
                    unique_cut: 0.01,
                },
                SelectOp::CorrelationThreshold { threshold: 0.9 },
            ],
        }
    }

    /// Whether any step needs the plate column.
    fn needs_plate(&self) -> bool {
        self.aggregate.is_some()
            || self.variant_features
            || self.normalize.is_some_and(|n| n.per_plate)
    }

    /// Whether any step needs the negative controls.
    fn needs_negcon(&self) -> bool {
        self.variant_features || self.normalize.is_some_and(|n| n.on_negcon)
    }

    /// One line per step (the run summary and the output's metadata).
    pub fn describe(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some(a) = self.aggregate {
            lines.push(format!("aggregate {a:?} per plate and well").to_lowercase());
        }
        if self.drop_nonfinite {
            lines.push("drop features with NaN/inf".into());
        }
        if self.variant_features {
            lines.push("variant features (negcon |MAD/median| > 1e-3 on every plate)".into());
        }
        if let Some(n) = self.normalize {
            lines.push(format!(
                "normalize {} {} fitted on {}",
                n.method.name(),
                if n.per_plate { "per plate" } else { "globally" },
                if n.on_negcon {
                    "negcon rows"
                } else {
                    "all rows"
                }
            ));
        }
        if self.rank_int {
            lines.push("rank inverse normal transform".into());
        }
        for op in &self.select {
            lines.push(format!("feature_select {}", op.name()));
        }
        lines
    }
}

/// The named feature-selection operations (`feature_select` in SQL, `--feature-select`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectName {
    /// `drop_na_columns`.
    DropNaColumns,
    /// `variance_threshold`.
    VarianceThreshold,
    /// `frequency_threshold`.
    FrequencyThreshold,
    /// `correlation_threshold`.
    CorrelationThreshold,
    /// `blocklist`.
    Blocklist,
}

impl SelectName {
    /// Parses pycytominer's operation name (`-` and `_` alike).
    pub fn parse(text: &str) -> Result<Self> {
        match text.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "drop_na_columns" => Ok(Self::DropNaColumns),
            "variance_threshold" => Ok(Self::VarianceThreshold),
            "frequency_threshold" => Ok(Self::FrequencyThreshold),
            "correlation_threshold" => Ok(Self::CorrelationThreshold),
            "blocklist" => Ok(Self::Blocklist),
            other => Err(BalansError::InvalidArgument(format!(
                "unknown feature_select operation '{other}' (one of: drop_na_columns, \
                 variance_threshold, frequency_threshold, correlation_threshold, blocklist)"
            ))),
        }
    }
}

/// The user's preprocessing choices, before they become [`PreprocessSteps`]: the one place
/// that checks them, shared by `balans preprocess` and SQL's `preprocess(...)`.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOptions {
    /// Run the `mad_int_featselect` recipe (then only `aggregate` combines with it).
    pub recipe: bool,
    /// Aggregate rows to one per plate and well first.
    pub aggregate: Option<Aggregation>,
    /// Normalisation (`MadRobustize`'s epsilon is replaced by `mad_epsilon`).
    pub normalize: Option<Normalization>,
    /// Normalise per plate (`Some(true)`), globally (`Some(false)`), or per plate when there
    /// is a plate column (`None`).
    pub normalize_per_plate: Option<bool>,
    /// Fit the normalisation on all rows, not the negative controls.
    pub normalize_on_all: bool,
    /// Epsilon of `mad_robustize`.
    pub mad_epsilon: f64,
    /// Rank inverse normal transform after normalising.
    pub rank_int: bool,
    /// Feature-selection operations, in order.
    pub feature_select: Vec<SelectName>,
    /// `drop_na_columns` cutoff.
    pub na_cutoff: f64,
    /// `variance_threshold` minimum.
    pub min_variance: f64,
    /// `frequency_threshold` cuts.
    pub freq_cut: f64,
    /// `frequency_threshold` distinct-value cut.
    pub unique_cut: f64,
    /// `correlation_threshold` threshold.
    pub corr_threshold: f64,
    /// `blocklist` feature names.
    pub blocklist: Option<Vec<String>>,
}

impl Default for StepOptions {
    fn default() -> Self {
        Self {
            recipe: false,
            aggregate: None,
            normalize: None,
            normalize_per_plate: None,
            normalize_on_all: false,
            mad_epsilon: 1e-18,
            rank_int: false,
            feature_select: Vec::new(),
            na_cutoff: 0.05,
            min_variance: 1e-6,
            freq_cut: 0.05,
            unique_cut: 0.01,
            corr_threshold: 0.9,
            blocklist: None,
        }
    }
}

/// Reads a blocklist file: one feature name per line (a first line `blocklist` is a header,
/// as in pycytominer's bundled list).
pub fn read_blocklist(path: &std::path::Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        BalansError::InvalidArgument(format!("cannot read blocklist {}: {e}", path.display()))
    })?;
    Ok(text
        .lines()
        .map(str::trim)
        .enumerate()
        .filter(|(i, l)| !(l.is_empty() || (*i == 0 && *l == "blocklist")))
        .map(|(_, l)| l.to_string())
        .collect())
}

fn parse_number(key: &str, value: &str) -> Result<f64> {
    value
        .trim()
        .parse()
        .map_err(|_| BalansError::InvalidArgument(format!("{key} => '{value}': expected a number")))
}

fn parse_flag(key: &str, value: &str) -> Result<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(BalansError::InvalidArgument(format!(
            "{key} => '{value}': expected true or false"
        ))),
    }
}

impl StepOptions {
    /// The names [`StepOptions::set`] accepts.
    pub const NAMES: &'static [&'static str] = &[
        "recipe",
        "aggregate",
        "normalize",
        "normalize_scope",
        "normalize_on_all",
        "mad_epsilon",
        "rank_int",
        "feature_select",
        "na_cutoff",
        "min_variance",
        "freq_cut",
        "unique_cut",
        "corr_threshold",
        "blocklist",
        "blocklist_file",
    ];

    /// Sets one option by its SQL name (`recipe => 'mad_int_featselect'`,
    /// `feature_select => 'variance_threshold,correlation_threshold'`, `blocklist => 'a,b'`,
    /// `blocklist_file => 'path'`, ...).
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let lower = value.trim().to_ascii_lowercase().replace('-', "_");
        match key {
            "recipe" => match lower.as_str() {
                "mad_int_featselect" => self.recipe = true,
                _ => {
                    return Err(BalansError::InvalidArgument(format!(
                        "unknown recipe '{value}' (one of: mad_int_featselect)"
                    )));
                }
            },
            "aggregate" => {
                self.aggregate = Some(match lower.as_str() {
                    "median" => Aggregation::Median,
                    "mean" => Aggregation::Mean,
                    _ => {
                        return Err(BalansError::InvalidArgument(format!(
                            "aggregate => '{value}': one of median, mean"
                        )));
                    }
                })
            }
            "normalize" => {
                self.normalize = Some(match lower.as_str() {
                    "standardize" => Normalization::Standardize,
                    "robustize" => Normalization::Robustize,
                    "mad_robustize" => Normalization::MadRobustize { epsilon: 0.0 },
                    "mad" => Normalization::Mad,
                    _ => {
                        return Err(BalansError::InvalidArgument(format!(
                            "normalize => '{value}': one of standardize, robustize, \
                             mad_robustize, mad"
                        )));
                    }
                })
            }
            "normalize_scope" => {
                self.normalize_per_plate = Some(match lower.as_str() {
                    "plate" => true,
                    "all" => false,
                    _ => {
                        return Err(BalansError::InvalidArgument(format!(
                            "normalize_scope => '{value}': one of plate, all"
                        )));
                    }
                })
            }
            "normalize_on_all" => self.normalize_on_all = parse_flag(key, value)?,
            "mad_epsilon" => self.mad_epsilon = parse_number(key, value)?,
            "rank_int" => self.rank_int = parse_flag(key, value)?,
            "feature_select" => {
                self.feature_select = value
                    .split(',')
                    .filter(|s| !s.trim().is_empty())
                    .map(SelectName::parse)
                    .collect::<Result<_>>()?
            }
            "na_cutoff" => self.na_cutoff = parse_number(key, value)?,
            "min_variance" => self.min_variance = parse_number(key, value)?,
            "freq_cut" => self.freq_cut = parse_number(key, value)?,
            "unique_cut" => self.unique_cut = parse_number(key, value)?,
            "corr_threshold" => self.corr_threshold = parse_number(key, value)?,
            "blocklist" => {
                self.blocklist = Some(
                    value
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect(),
                )
            }
            "blocklist_file" => {
                self.blocklist = Some(read_blocklist(std::path::Path::new(value.trim()))?)
            }
            other => {
                return Err(BalansError::InvalidArgument(format!(
                    "unknown parameter '{other}' (one of: {}, plate, well, negcon, features, \
                     exclude)",
                    Self::NAMES.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// The steps these options describe; `has_plate` / `has_negcon` say whether a plate column
    /// and a negative-control predicate were given.
    pub fn steps(&self, has_plate: bool, has_negcon: bool) -> Result<PreprocessSteps> {
        let individual =
            self.normalize.is_some() || self.rank_int || !self.feature_select.is_empty();
        let mut steps = if self.recipe {
            if individual {
                return Err(BalansError::InvalidArgument(
                    "the recipe runs its own steps: leave out normalize, rank_int and \
                     feature_select (only aggregate combines with a recipe)"
                        .into(),
                ));
            }
            PreprocessSteps::mad_int_featselect()
        } else {
            if !individual && self.aggregate.is_none() {
                return Err(BalansError::InvalidArgument(
                    "nothing to do: give the recipe mad_int_featselect or at least one of \
                     aggregate, normalize, rank_int, feature_select"
                        .into(),
                ));
            }
            let mut select = Vec::new();
            for op in &self.feature_select {
                select.push(match op {
                    SelectName::DropNaColumns => SelectOp::DropNaColumns {
                        cutoff: self.na_cutoff,
                    },
                    SelectName::VarianceThreshold => SelectOp::VarianceThreshold {
                        min_variance: self.min_variance,
                    },
                    SelectName::FrequencyThreshold => SelectOp::FrequencyThreshold {
                        freq_cut: self.freq_cut,
                        unique_cut: self.unique_cut,
                    },
                    SelectName::CorrelationThreshold => SelectOp::CorrelationThreshold {
                        threshold: self.corr_threshold,
                    },
                    SelectName::Blocklist => {
                        SelectOp::Blocklist(self.blocklist.clone().ok_or_else(|| {
                            BalansError::InvalidArgument(
                                "feature selection 'blocklist' needs the list: --blocklist FILE, \
                                 or blocklist => 'a,b' / blocklist_file => 'FILE' in SQL"
                                    .into(),
                            )
                        })?)
                    }
                });
            }
            PreprocessSteps {
                aggregate: None,
                drop_nonfinite: false,
                variant_features: false,
                normalize: self.normalize.map(|method| NormalizeStep {
                    method: match method {
                        Normalization::MadRobustize { .. } => Normalization::MadRobustize {
                            epsilon: self.mad_epsilon,
                        },
                        other => other,
                    },
                    per_plate: self.normalize_per_plate.unwrap_or(has_plate),
                    on_negcon: has_negcon && !self.normalize_on_all,
                }),
                rank_int: self.rank_int,
                select,
            }
        };
        steps.aggregate = self.aggregate;
        for (name, value) in [
            ("na_cutoff (--na-cutoff)", self.na_cutoff),
            ("freq_cut (--freq-cut)", self.freq_cut),
            ("unique_cut (--unique-cut)", self.unique_cut),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(BalansError::InvalidArgument(format!(
                    "{name} must lie in [0, 1], not {value}"
                )));
            }
        }
        if !(-1.0..=1.0).contains(&self.corr_threshold) {
            return Err(BalansError::InvalidArgument(format!(
                "corr_threshold (--corr-threshold) must lie in [-1, 1], not {}",
                self.corr_threshold
            )));
        }
        if !(self.mad_epsilon >= 0.0 && self.mad_epsilon.is_finite()) {
            return Err(BalansError::InvalidArgument(
                "mad_epsilon (--mad-epsilon) must be a finite number >= 0".into(),
            ));
        }
        Ok(steps)
    }
}

/// A preprocessing request.
#[derive(Debug, Clone)]
pub struct PreprocessRequest {
    /// Input location.
    pub input: String,
    /// Output Parquet file.
    pub output: PathBuf,
    /// Feature columns.
    pub selection: FeatureSelection,
    /// Plate column (per-plate statistics, aggregation).
    pub plate: Option<String>,
    /// Well column (aggregation).
    pub well: Option<String>,
    /// SQL predicate marking the negative controls.
    pub negcon: Option<String>,
    /// The steps.
    pub steps: PreprocessSteps,
    /// Replace an existing output file.
    pub overwrite: bool,
    /// Object-store options.
    pub source: SourceOptions,
}

/// Features one step removed.
#[derive(Debug, Clone, Serialize)]
pub struct DroppedFeatures {
    /// The step.
    pub step: String,
    /// Removed features, in input order.
    pub features: Vec<String>,
}

/// What a preprocessing run did.
#[derive(Debug, Clone, Serialize)]
pub struct PreprocessOutcome {
    /// Rows written.
    pub rows: usize,
    /// Plates seen (0 without a plate column).
    pub plates: usize,
    /// Negative-control rows.
    pub negcon_rows: usize,
    /// Input features, in input order.
    pub input_features: Vec<String>,
    /// Kept features, in input order.
    pub features: Vec<String>,
    /// What each step removed.
    pub dropped: Vec<DroppedFeatures>,
    /// Seconds per stage.
    pub timings: Vec<(String, f64)>,
    /// Rows and batches written.
    #[serde(skip)]
    pub written: Option<WriteStats>,
}

/// The column-major feature matrix in a memory-mapped working file.
struct ColumnFile {
    map: MmapMut,
    n: usize,
    d: usize,
    _file: Arc<dyn SpillFile>,
}

impl ColumnFile {
    fn data(&self) -> &[f64] {
        // SAFETY: the mapping is page-aligned, `n * d * 8` bytes long, and only ever holds f64.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr() as *const f64, self.n * self.d) }
    }

    fn data_mut(&mut self) -> &mut [f64] {
        // SAFETY: as in `data`, and `&mut self` guarantees exclusive access.
        unsafe {
            std::slice::from_raw_parts_mut(self.map.as_mut_ptr() as *mut f64, self.n * self.d)
        }
    }

    fn column(&self, j: usize) -> &[f64] {
        &self.data()[j * self.n..(j + 1) * self.n]
    }
}

/// Everything the steps work on.
struct Table {
    columns: ColumnFile,
    meta: MappedIpcFile,
    _meta_file: Arc<dyn SpillFile>,
    /// Plate code per row (0 without plates); names in sorted order.
    plate: Vec<u32>,
    plate_names: Vec<String>,
    /// Negative-control flag per row.
    negcon: Vec<bool>,
}

/// What to preprocess in a DataFrame: its feature columns, the roles of other columns and
/// the steps.
#[derive(Debug, Clone)]
pub struct FrameSpec {
    /// Feature columns (numeric), in input order.
    pub features: Vec<String>,
    /// Plate column (per-plate statistics, aggregation).
    pub plate: Option<String>,
    /// Well column (aggregation).
    pub well: Option<String>,
    /// SQL predicate marking the negative controls.
    pub negcon: Option<String>,
    /// The steps.
    pub steps: PreprocessSteps,
}

impl FrameSpec {
    /// Checks that the steps have the columns and predicate they need.
    pub fn check(&self) -> Result<()> {
        let steps = &self.steps;
        if steps.needs_plate() && self.plate.is_none() {
            return Err(BalansError::InvalidArgument(
                "these steps work per plate: give the plate column (--plate COLUMN, or \
             plate => 'COLUMN' in SQL; e.g. Metadata_Plate)"
                    .into(),
            ));
        }
        if steps.needs_negcon() && self.negcon.is_none() {
            return Err(BalansError::InvalidArgument(
                "these steps are fitted on negative controls: give the predicate (--negcon \
             PREDICATE, or negcon => 'PREDICATE' in SQL; e.g. Metadata_PertType = 'negcon')"
                    .into(),
            ));
        }
        if steps.aggregate.is_some() && self.well.is_none() {
            return Err(BalansError::InvalidArgument(
                "aggregation groups by plate and well: give the well column (--well COLUMN, or \
             well => 'COLUMN' in SQL; e.g. Metadata_Well)"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// A preprocessed table held in memory-mapped working files (deleted when dropped), ready
/// to be streamed any number of times.
pub struct Preprocessed {
    table: Arc<Table>,
    kept: Vec<bool>,
    /// What the run did (`written` is `None`).
    pub outcome: PreprocessOutcome,
}

impl std::fmt::Debug for Preprocessed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Preprocessed")
            .field("rows", &self.outcome.rows)
            .field("features", &self.outcome.features.len())
            .finish()
    }
}

impl Preprocessed {
    /// The output rows: metadata columns in input order, then the kept features as `Float64`.
    pub fn stream(&self) -> Result<datafusion::execution::SendableRecordBatchStream> {
        output_stream(self.table.clone(), &self.outcome.input_features, &self.kept)
    }

    /// The schema of [`Preprocessed::stream`].
    pub fn schema(&self) -> Result<SchemaRef> {
        Ok(self.stream()?.schema())
    }
}

/// Runs the steps of `spec` over the rows of `df`: reads them once into the working files
/// (aggregating first when asked) and transforms them there. `log` receives one line per
/// stage.
pub async fn preprocess_frame(
    df: datafusion::prelude::DataFrame,
    spec: &FrameSpec,
    log: &(dyn Fn(&str) + Sync),
) -> Result<Preprocessed> {
    spec.check()?;
    let steps = &spec.steps;
    let features = spec.features.clone();
    if features.is_empty() {
        return Err(BalansError::BadInput("there are no feature columns".into()));
    }
    let input_schema = df.schema().as_arrow().clone();
    for name in features
        .iter()
        .chain(spec.plate.iter())
        .chain(spec.well.iter())
    {
        if input_schema.index_of(name).is_err() {
            return Err(BalansError::BadInput(format!(
                "column '{name}' is not in the input"
            )));
        }
    }
    let disk = df.task_ctx().runtime_env().disk_manager.clone();
    let mut timings: Vec<(String, f64)> = Vec::new();
    let mut df = df;
    if let Some(aggregation) = steps.aggregate {
        let started = Instant::now();
        let plate = spec.plate.as_deref().expect("checked above");
        let well = spec.well.as_deref().expect("checked above");
        let group = vec![ident(plate), ident(well)];
        let mut aggregates = Vec::new();
        for field in input_schema.fields() {
            let name = field.name();
            if name != plate && name != well && !features.contains(name) {
                aggregates.push(min(ident(name)).alias(name));
            }
        }
        for name in &features {
            let value = ident(name).cast_to(&DataType::Float64, df.schema())?;
            let not_nan = when(
                datafusion::functions::math::expr_fn::isnan(value.clone()),
                lit(ScalarValue::Float64(None)),
            )
            .otherwise(value)?;
            aggregates.push(
                match aggregation {
                    Aggregation::Mean => avg(not_nan),
                    Aggregation::Median => median(not_nan),
                }
                .alias(name),
            );
        }
        let order: Vec<Expr> = input_schema
            .fields()
            .iter()
            .map(|f| ident(f.name()))
            .collect();
        df = df
            .aggregate(group, aggregates)?
            .sort(vec![
                ident(plate).sort(true, false),
                ident(well).sort(true, false),
            ])?
            .select(order)?;
        timings.push(("aggregate (plan)".into(), started.elapsed().as_secs_f64()));
        log(&format!("aggregate: {aggregation:?} per plate and well").to_lowercase());
    }
    if let Some(predicate) = &spec.negcon {
        let mask = negcon_predicate(&df, predicate)?;
        df = df.with_column(NEGCON_COLUMN, mask)?;
    }

    let started = Instant::now();
    let n = df.clone().count().await?;
    if n == 0 {
        return Err(BalansError::BadInput("the input has no rows".into()));
    }
    let loaded = ingest(&disk, df, &features, spec.plate.as_deref(), n).await?;
    timings.push(("read".into(), started.elapsed().as_secs_f64()));
    log(&format!(
        "read {n} rows x {} features{}",
        features.len(),
        if loaded.plate_names.len() > 1 {
            format!(", {} plates", loaded.plate_names.len())
        } else {
            String::new()
        }
    ));

    let steps = steps.clone();
    let plate_column = spec.plate.clone();
    let log_lines: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let lines = log_lines.clone();
    let names = features.clone();
    let (table, kept, dropped, step_timings) = tokio::task::spawn_blocking(move || {
        let mut table = loaded;
        let mut kept = vec![true; names.len()];
        let mut dropped = Vec::new();
        let mut timings = Vec::new();
        let result = apply_steps(
            &mut table,
            &names,
            &steps,
            plate_column.as_deref(),
            &mut kept,
            &mut dropped,
            &mut timings,
            &|line: &str| lines.lock().unwrap().push(line.to_string()),
        );
        result.map(|()| (table, kept, dropped, timings))
    })
    .await
    .map_err(|e| BalansError::BadInput(format!("preprocessing stopped: {e}")))??;
    for line in log_lines.lock().unwrap().iter() {
        log(line);
    }
    timings.extend(step_timings);

    let kept_names: Vec<String> = features
        .iter()
        .zip(&kept)
        .filter(|(_, k)| **k)
        .map(|(f, _)| f.clone())
        .collect();
    if kept_names.is_empty() {
        return Err(BalansError::BadInput(
            "every feature was removed; nothing to write (see the steps above)".into(),
        ));
    }
    let outcome = PreprocessOutcome {
        rows: n,
        plates: if spec.plate.is_some() {
            table.plate_names.len()
        } else {
            0
        },
        negcon_rows: table.negcon.iter().filter(|&&b| b).count(),
        input_features: features,
        features: kept_names,
        dropped,
        timings,
        written: None,
    };
    Ok(Preprocessed {
        table: Arc::new(table),
        kept,
        outcome,
    })
}

/// Runs a preprocessing request in `ctx`; `log` receives one line per stage.
pub async fn run_preprocess(
    ctx: &SessionContext,
    request: &PreprocessRequest,
    log: &(dyn Fn(&str) + Sync),
) -> Result<PreprocessOutcome> {
    let mut spec = FrameSpec {
        features: Vec::new(),
        plate: request.plate.clone(),
        well: request.well.clone(),
        negcon: request.negcon.clone(),
        steps: request.steps.clone(),
    };
    spec.check()?;
    check_output(
        &request.output,
        request.overwrite,
        std::slice::from_ref(&request.input),
    )?;
    let table = register_profiles(ctx, &request.input, "profiles", &request.source).await?;
    check_output(&request.output, request.overwrite, &table.files)?;
    let keys: Vec<String> = request
        .plate
        .iter()
        .chain(
            request
                .well
                .iter()
                .filter(|_| request.steps.aggregate.is_some()),
        )
        .cloned()
        .collect();
    spec.features = resolve_columns(&table.schema, &request.selection, &keys)?.features;
    let df = ctx.table("profiles").await?;
    let preprocessed = preprocess_frame(df, &spec, log).await?;
    let started = Instant::now();
    let outcome = &preprocessed.outcome;
    let metadata = vec![
        ("balans.method".to_string(), "preprocess".to_string()),
        (
            "balans.version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
        (
            "balans.preprocess".to_string(),
            serde_json::to_string(&serde_json::json!({
                "steps": request.steps.describe(),
                "input_features": outcome.input_features.len(),
                "features": outcome.features.len(),
                "dropped": outcome.dropped,
            }))
            .unwrap_or_default(),
        ),
        ("balans.input".to_string(), request.input.clone()),
    ];
    let written = write_parquet_atomic(preprocessed.stream()?, &request.output, metadata).await?;
    let mut outcome = preprocessed.outcome.clone();
    outcome
        .timings
        .push(("write".into(), started.elapsed().as_secs_f64()));
    outcome.written = Some(written);
    Ok(outcome)
}

/// Reads the query result into the column-major working file and the metadata file.
async fn ingest(
    disk: &Arc<datafusion::execution::disk_manager::DiskManager>,
    df: datafusion::prelude::DataFrame,
    features: &[String],
    plate: Option<&str>,
    n: usize,
) -> Result<Table> {
    let d = features.len();
    let column_file = disk.create_tmp_file("preprocess feature columns")?;
    let meta_file = disk.create_tmp_file("preprocess metadata")?;
    let local = |f: &Arc<dyn SpillFile>| -> Result<PathBuf> {
        f.path().map(|p| p.to_path_buf()).ok_or_else(|| {
            BalansError::InvalidArgument("preprocessing needs a local temporary directory".into())
        })
    };
    let column_path = local(&column_file)?;
    let meta_path = local(&meta_file)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&column_path)?;
    file.set_len((n * d * 8).max(8) as u64)?;
    // SAFETY: the working file is private to this run and not resized while mapped.
    let map = unsafe { MmapMut::map_mut(&file)? };
    let mut columns = ColumnFile {
        map,
        n,
        d,
        _file: column_file,
    };

    let schema = df.schema().as_arrow().clone();
    let feature_idx: Vec<usize> = features
        .iter()
        .map(|f| schema.index_of(f))
        .collect::<std::result::Result<_, _>>()?;
    let meta_idx: Vec<usize> = (0..schema.fields().len())
        .filter(|i| !feature_idx.contains(i) && schema.field(*i).name() != NEGCON_COLUMN)
        .collect();
    let meta_schema = Arc::new(schema.project(&meta_idx)?);
    let plate_idx = plate.map(|p| schema.index_of(p)).transpose()?;
    let negcon_idx = schema.index_of(NEGCON_COLUMN).ok();
    let mut writer = BatchWriter::create(&meta_path, &meta_schema)
        .map_err(|e| BalansError::BadInput(e.to_string()))?;
    let mut plate_codes: Vec<u32> = Vec::with_capacity(n);
    let mut plate_index: HashMap<String, u32> = HashMap::new();
    let mut plate_keys: Vec<String> = Vec::new();
    let mut negcon: Vec<bool> = Vec::with_capacity(n);
    let mut row = 0usize;
    let mut stream = df.execute_stream().await?;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        let len = batch.num_rows();
        if row + len > n {
            return Err(BalansError::BadInput(
                "the input changed while it was read (more rows than counted)".into(),
            ));
        }
        writer
            .write(&batch.project(&meta_idx)?)
            .map_err(|e| BalansError::BadInput(e.to_string()))?;
        let data = columns.data_mut();
        for (j, &idx) in feature_idx.iter().enumerate() {
            let values = cast(batch.column(idx), &DataType::Float64)?;
            let values = values.as_primitive::<Float64Type>();
            let out = &mut data[j * n + row..j * n + row + len];
            for (i, o) in out.iter_mut().enumerate() {
                *o = if values.is_null(i) {
                    f64::NAN
                } else {
                    values.value(i)
                };
            }
        }
        match plate_idx {
            Some(idx) => {
                let keys = cast(batch.column(idx), &DataType::Utf8)?;
                let keys = keys.as_string::<i32>();
                for i in 0..len {
                    let key = if keys.is_null(i) {
                        "null"
                    } else {
                        keys.value(i)
                    };
                    let next = plate_keys.len() as u32;
                    let code = *plate_index.entry(key.to_string()).or_insert_with(|| {
                        plate_keys.push(key.to_string());
                        next
                    });
                    plate_codes.push(code);
                }
            }
            None => plate_codes.extend(std::iter::repeat_n(0, len)),
        }
        match negcon_idx {
            Some(idx) => {
                let flags = batch.column(idx).as_boolean();
                negcon.extend((0..len).map(|i| flags.is_valid(i) && flags.value(i)));
            }
            None => negcon.extend(std::iter::repeat_n(false, len)),
        }
        row += len;
    }
    writer
        .finish()
        .map_err(|e| BalansError::BadInput(e.to_string()))?;
    if row != n {
        return Err(BalansError::BadInput(format!(
            "the input changed while it was read ({row} rows, {n} counted)"
        )));
    }
    if plate_keys.is_empty() {
        plate_keys.push(String::new());
    }
    // Plates in sorted order, so messages and statistics do not depend on the row order.
    let mut order: Vec<usize> = (0..plate_keys.len()).collect();
    order.sort_by(|&a, &b| plate_keys[a].cmp(&plate_keys[b]));
    let mut remap = vec![0u32; order.len()];
    for (new, &old) in order.iter().enumerate() {
        remap[old] = new as u32;
    }
    let plate = plate_codes.iter().map(|&c| remap[c as usize]).collect();
    let plate_names = order.iter().map(|&o| plate_keys[o].clone()).collect();
    let meta = MappedIpcFile::open(&meta_path).map_err(|e| BalansError::BadInput(e.to_string()))?;
    Ok(Table {
        columns,
        meta,
        _meta_file: meta_file,
        plate,
        plate_names,
        negcon,
    })
}

/// Runs the steps over the kept features, in place.
#[allow(clippy::too_many_arguments)]
fn apply_steps(
    table: &mut Table,
    names: &[String],
    steps: &PreprocessSteps,
    plate_column: Option<&str>,
    kept: &mut [bool],
    dropped: &mut Vec<DroppedFeatures>,
    timings: &mut Vec<(String, f64)>,
    log: &dyn Fn(&str),
) -> Result<()> {
    let n = table.columns.n;
    let plates = table.plate_names.len();
    let mut plate_rows: Vec<Vec<usize>> = vec![Vec::new(); plates];
    for (i, &p) in table.plate.iter().enumerate() {
        plate_rows[p as usize].push(i);
    }
    let record_drop =
        |step: &str, kept: &mut [bool], flags: Vec<bool>, dropped: &mut Vec<DroppedFeatures>| {
            let mut removed = Vec::new();
            for (j, gone) in flags.into_iter().enumerate() {
                if gone && kept[j] {
                    kept[j] = false;
                    removed.push(names[j].clone());
                }
            }
            let left = kept.iter().filter(|&&k| k).count();
            log(&format!(
                "{step}: dropped {} feature(s), {left} left{}",
                removed.len(),
                preview(&removed)
            ));
            dropped.push(DroppedFeatures {
                step: step.to_string(),
                features: removed,
            });
        };
    let kept_indices =
        |kept: &[bool]| -> Vec<usize> { (0..kept.len()).filter(|&j| kept[j]).collect::<Vec<_>>() };

    if steps.drop_nonfinite {
        let started = Instant::now();
        let columns = &table.columns;
        let flags: Vec<bool> = (0..names.len())
            .into_par_iter()
            .map(|j| columns.column(j).iter().any(|v| !v.is_finite()))
            .collect();
        record_drop("drop non-finite columns", kept, flags, dropped);
        timings.push(("drop non-finite".into(), started.elapsed().as_secs_f64()));
    }

    if steps.needs_negcon() {
        for (p, rows) in plate_rows.iter().enumerate() {
            let controls = rows.iter().filter(|&&i| table.negcon[i]).count();
            let per_plate = steps.variant_features || steps.normalize.is_some_and(|s| s.per_plate);
            if controls == 0 && per_plate {
                return Err(BalansError::BadInput(format!(
                    "plate '{}' (column {}) has no negative-control rows: per-plate statistics \
                     are fitted on them (check --negcon, or drop the plate)",
                    table.plate_names[p],
                    plate_column.unwrap_or("plate")
                )));
            }
        }
        if !table.negcon.iter().any(|&b| b) {
            return Err(BalansError::BadInput(
                "no row matches the --negcon predicate".into(),
            ));
        }
    }

    if steps.variant_features {
        let started = Instant::now();
        let columns = &table.columns;
        let negcon = &table.negcon;
        let flags: Vec<bool> = (0..names.len())
            .into_par_iter()
            .map(|j| {
                if !kept[j] {
                    return false;
                }
                let column = columns.column(j);
                let mut scratch = Vec::new();
                plate_rows.iter().any(|rows| {
                    let mut values: Vec<f64> = rows
                        .iter()
                        .filter(|&&i| negcon[i])
                        .map(|&i| column[i])
                        .filter(|v| v.is_finite())
                        .collect();
                    if values.is_empty() {
                        return true;
                    }
                    let median = median_in_place(&mut values);
                    let spread = mad(&values, median, &mut scratch);
                    !is_variant(median, spread)
                })
            })
            .collect();
        record_drop("variant features", kept, flags, dropped);
        timings.push(("variant features".into(), started.elapsed().as_secs_f64()));
    }

    if let Some(step) = steps.normalize {
        let started = Instant::now();
        let groups: Vec<Vec<usize>> = if step.per_plate {
            plate_rows.clone()
        } else {
            vec![(0..n).collect()]
        };
        let negcon = table.negcon.clone();
        let plate_names = table.plate_names.clone();
        let data = table.columns.data_mut();
        let failures: Vec<String> = data
            .par_chunks_mut(n)
            .enumerate()
            .filter(|(j, _)| kept[*j])
            .filter_map(|(j, column)| {
                for (g, rows) in groups.iter().enumerate() {
                    let mut fit: Vec<f64> = rows
                        .iter()
                        .filter(|&&i| !step.on_negcon || negcon[i])
                        .map(|&i| column[i])
                        .filter(|v| v.is_finite())
                        .collect();
                    let Some(scaling) = fit_scaling(&mut fit, step.method) else {
                        return Some(if step.per_plate {
                            format!(
                                "feature '{}' has no finite {} value on plate '{}'",
                                names[j],
                                if step.on_negcon {
                                    "negative-control"
                                } else {
                                    ""
                                },
                                plate_names[g]
                            )
                        } else {
                            format!("feature '{}' has no finite value to fit on", names[j])
                        });
                    };
                    for &i in rows {
                        let v = column[i];
                        if v.is_finite() {
                            column[i] = scaling.apply(v);
                        }
                    }
                }
                None
            })
            .collect();
        if let Some(first) = failures.first() {
            return Err(BalansError::BadInput(format!(
                "cannot normalise: {first}{} (drop such features first, e.g. --feature-select \
                 drop_na_columns, or use --recipe mad_int_featselect, which drops them)",
                if failures.len() > 1 {
                    format!(" and {} more", failures.len() - 1)
                } else {
                    String::new()
                }
            )));
        }
        log(&format!(
            "normalize: {} {}",
            step.method.name(),
            if step.per_plate {
                format!("per plate ({plates} plates)")
            } else {
                "on the whole table".to_string()
            }
        ));
        timings.push(("normalize".into(), started.elapsed().as_secs_f64()));
    }

    if steps.rank_int {
        let started = Instant::now();
        let data = table.columns.data_mut();
        let bad: Vec<usize> = data
            .par_chunks_mut(n)
            .enumerate()
            .filter(|(j, _)| kept[*j])
            .filter_map(|(j, column)| {
                if column.iter().any(|v| !v.is_finite()) {
                    return Some(j);
                }
                rank_inverse_normal(column);
                None
            })
            .collect();
        if let Some(&j) = bad.first() {
            return Err(BalansError::BadInput(format!(
                "the rank inverse normal transform needs finite values, but feature '{}' has \
                 NaN or inf{}",
                names[j],
                if bad.len() > 1 {
                    format!(" (and {} more features)", bad.len() - 1)
                } else {
                    String::new()
                }
            )));
        }
        log("rank inverse normal transform");
        timings.push(("rank INT".into(), started.elapsed().as_secs_f64()));
    }

    for op in &steps.select {
        let started = Instant::now();
        let columns = &table.columns;
        let flags: Vec<bool> = match op {
            SelectOp::DropNaColumns { cutoff } => (0..names.len())
                .into_par_iter()
                .map(|j| kept[j] && nan_fraction(columns.column(j)) > *cutoff)
                .collect(),
            SelectOp::VarianceThreshold { min_variance } => (0..names.len())
                .into_par_iter()
                .map(|j| {
                    // Kept only if the variance is above the minimum (a NaN variance fails).
                    let variance = nan_variance(columns.column(j));
                    kept[j] && (variance.is_nan() || variance <= *min_variance)
                })
                .collect(),
            SelectOp::FrequencyThreshold {
                freq_cut,
                unique_cut,
            } => (0..names.len())
                .into_par_iter()
                .map(|j| {
                    let mut scratch = Vec::new();
                    kept[j]
                        && fails_frequency(
                            frequency_stats(columns.column(j), &mut scratch),
                            *freq_cut,
                            *unique_cut,
                        )
                })
                .collect(),
            SelectOp::CorrelationThreshold { threshold } => {
                let idx = kept_indices(kept);
                if let Some(&j) = idx
                    .iter()
                    .find(|&&j| columns.column(j).iter().any(|v| !v.is_finite()))
                {
                    return Err(BalansError::BadInput(format!(
                        "correlation_threshold needs finite values, but feature '{}' has NaN \
                         or inf (run drop_na_columns first)",
                        names[j]
                    )));
                }
                let corr = pearson_correlation(columns.data(), n, &idx, 4096);
                let gone = correlation_exclusions(&corr, *threshold);
                let mut flags = vec![false; names.len()];
                for (&j, g) in idx.iter().zip(gone) {
                    flags[j] = g;
                }
                flags
            }
            SelectOp::Blocklist(list) => names.iter().map(|f| list.contains(f)).collect(),
        };
        record_drop(op.name(), kept, flags, dropped);
        timings.push((op.name().to_string(), started.elapsed().as_secs_f64()));
    }
    Ok(())
}

fn preview(names: &[String]) -> String {
    if names.is_empty() {
        return String::new();
    }
    let shown: Vec<&str> = names.iter().take(5).map(|s| s.as_str()).collect();
    format!(
        " ({}{})",
        shown.join(", "),
        if names.len() > 5 { ", ..." } else { "" }
    )
}

/// The output rows: metadata batches joined with the kept feature columns, in input column
/// order, built one metadata batch at a time from the mapped files.
fn output_stream(
    table: Arc<Table>,
    features: &[String],
    kept: &[bool],
) -> Result<datafusion::execution::SendableRecordBatchStream> {
    let meta_schema = table.meta.schema().clone();
    let kept_features: BTreeMap<String, usize> = features
        .iter()
        .enumerate()
        .filter(|(j, _)| kept[*j])
        .map(|(j, f)| (f.clone(), j))
        .collect();
    // Metadata columns first (in input order), then the kept features in input order: the
    // layout pycytominer writes and every profile table in this field uses.
    let input_order: Vec<String> = meta_schema
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .chain(
            features
                .iter()
                .filter(|f| kept_features.contains_key(*f))
                .cloned(),
        )
        .collect();
    enum Source {
        Meta(usize),
        Feature(usize),
    }
    let mut fields: Vec<Field> = Vec::new();
    let mut sources: Vec<Source> = Vec::new();
    for name in &input_order {
        if let Ok(i) = meta_schema.index_of(name) {
            fields.push(meta_schema.field(i).clone());
            sources.push(Source::Meta(i));
        } else {
            fields.push(Field::new(name, DataType::Float64, false));
            sources.push(Source::Feature(kept_features[name]));
        }
    }
    let schema: SchemaRef = Arc::new(Schema::new(fields));
    let out_schema = schema.clone();
    let n_batches = table.meta.batches().len();
    let batches = (0..n_batches).scan(0usize, move |row, b| {
        let meta = &table.meta.batches()[b];
        let len = meta.num_rows();
        let start = *row;
        *row += len;
        let columns: Vec<ArrayRef> = sources
            .iter()
            .map(|s| match s {
                Source::Meta(i) => meta.column(*i).clone(),
                Source::Feature(j) => Arc::new(Float64Array::from(
                    table.columns.column(*j)[start..start + len].to_vec(),
                )) as ArrayRef,
            })
            .collect();
        Some(
            RecordBatch::try_new(out_schema.clone(), columns)
                .map_err(datafusion::error::DataFusionError::from),
        )
    });
    Ok(Box::pin(RecordBatchStreamAdapter::new(
        schema,
        futures::stream::iter(batches),
    )))
}
