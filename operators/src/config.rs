//! Parameters of a BALANS run (see `shared/specs/balans.md` for every default).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{OperatorError, Result};
pub use crate::kernels::sphering::SpheringMethod;

/// How the sparsification threshold of one affinity row is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Serialize, Deserialize)]
pub enum ElbowRule {
    /// Kneedle on a fine histogram of scaled distances (the default; what the reference uses).
    Kneedle,
    /// Kneedle on the fully sorted candidate affinities (exact form of the histogram rule).
    KneedleSorted,
    /// Largest drop between consecutive sorted affinities.
    MaxGap,
    /// Largest drop between consecutive sorted log-affinities.
    MaxLogGap,
}

impl ElbowRule {
    /// Parses a rule name as used on the command line.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "kneedle" => Self::Kneedle,
            "kneedle-sorted" => Self::KneedleSorted,
            "max-gap" => Self::MaxGap,
            "max-log-gap" => Self::MaxLogGap,
            other => {
                return Err(OperatorError::InvalidParameter(format!(
                    "unknown elbow rule '{other}' (kneedle, kneedle-sorted, max-gap, max-log-gap)"
                )));
            }
        })
    }
}

impl fmt::Display for ElbowRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Kneedle => "kneedle",
            Self::KneedleSorted => "kneedle-sorted",
            Self::MaxGap => "max-gap",
            Self::MaxLogGap => "max-log-gap",
        })
    }
}

/// Which estimator turns the landmark rows into corrected values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Serialize, Deserialize)]
pub enum Estimator {
    /// `X_hat = Q^T (P X)` with row-normalised `P` and column-normalised `Q` (default).
    Smooth,
    /// `X_hat = A_S^T pinv(A_SS) A_S X`.
    Nystrom,
}

impl fmt::Display for Estimator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Smooth => "smooth",
            Self::Nystrom => "nystrom",
        })
    }
}

/// Which correction method an operator runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Default, Serialize, Deserialize)]
pub enum Method {
    /// BALANS (every other field of [`BalansConfig`] applies).
    #[default]
    Balans,
    /// ComBat, parametric empirical Bayes as scanpy's `pp.combat` (only `nan` and
    /// `chunk_rows` apply).
    ComBat,
    /// Sphering (ZCA / ZCA-cor whitening) fitted on negative controls, as pycytominer
    /// (`sphering`, `epsilon`, `nan` and `chunk_rows` apply).
    Sphering,
    /// Harmony as harmonypy 2.1.0, on the PCA coordinates (`harmony`, `pca`, `seed`, `nan`
    /// and `chunk_rows` apply).
    Harmony,
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Balans => "balans",
            Self::ComBat => "combat",
            Self::Sphering => "sphering",
            Self::Harmony => "harmony",
        })
    }
}

/// How the landmark rows turn into corrected values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Serialize, Deserialize)]
pub enum Variant {
    /// The paper's reading: `X_hat = Q^T P X`, every output a convex combination of the
    /// landmarks' local averages (over-smooths real data; kept to reproduce the paper).
    Paper,
    /// `X_hat = Q^T Y_bal`: each landmark's local average is the mean over batches of its
    /// per-batch local averages, so every batch contributes equally.
    Balanced,
    /// `X_out = X + Q_b^T (Y_bal - Y_b)`: only each point's batch-specific local mean is
    /// replaced by the batch-balanced one; within-neighbourhood variation survives.
    Residual,
}

impl Variant {
    /// Parses a variant name as used on the command line.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "paper" => Self::Paper,
            "balanced" => Self::Balanced,
            "residual" => Self::Residual,
            other => {
                return Err(OperatorError::InvalidParameter(format!(
                    "unknown BALANS variant '{other}' (paper, balanced, residual)"
                )));
            }
        })
    }

    /// Whether the smoothing keeps one local average per landmark and batch.
    pub fn per_batch(&self) -> bool {
        !matches!(self, Self::Paper)
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Paper => "paper",
            Self::Balanced => "balanced",
            Self::Residual => "residual",
        })
    }
}

/// Which matrix is smoothed and written out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Serialize, Deserialize)]
pub enum OutputSpace {
    /// The input features, under their input names (default).
    Features,
    /// The PCA coordinates, as columns `PC1..PCp`.
    Pca,
}

impl fmt::Display for OutputSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Features => "features",
            Self::Pca => "pca",
        })
    }
}

/// Which rows BALANS estimates the batch offsets from (every row is corrected).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Default, Serialize, Deserialize)]
pub enum Anchor {
    /// Every row (the unanchored residual correction).
    #[default]
    None,
    /// The negative controls (the `negcon` predicate's rows).
    Negcon,
    /// Rows whose anchor-label value occurs in at least two batches.
    Label,
    /// Both: negative controls and shared labels.
    Both,
}

impl Anchor {
    /// Whether the negative controls are anchors.
    pub fn negcon(self) -> bool {
        matches!(self, Self::Negcon | Self::Both)
    }

    /// Whether shared labels are anchors.
    pub fn label(self) -> bool {
        matches!(self, Self::Label | Self::Both)
    }
}

impl fmt::Display for Anchor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Negcon => "negcon",
            Self::Label => "label",
            Self::Both => "both",
        })
    }
}

/// Distance used for the affinities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Serialize, Deserialize)]
pub enum Metric {
    /// Squared Euclidean distance (default).
    Euclidean,
    /// Squared Euclidean distance between L2-normalised rows.
    Cosine,
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Euclidean => "euclidean",
            Self::Cosine => "cosine",
        })
    }
}

/// What to do with NaN or infinite feature values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Serialize, Deserialize)]
pub enum NanPolicy {
    /// Fail, naming the affected columns (default).
    Error,
    /// Drop every row with a non-finite feature (the row is absent from the output).
    DropRows,
    /// Replace non-finite values by zero.
    Zero,
}

impl fmt::Display for NanPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Error => "error",
            Self::DropRows => "drop-rows",
            Self::Zero => "zero",
        })
    }
}

/// Whether and how far to reduce the features with PCA before computing distances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Serialize, Deserialize)]
pub enum PcaSetting {
    /// 50 components when there are more than 50 features, none otherwise.
    Auto,
    /// No PCA: distances on the (centred) features.
    Off,
    /// This many components (clipped to the number of features).
    Components(usize),
}

impl PcaSetting {
    /// Number of components used for `d` features, or `None` for no PCA.
    pub fn components(&self, d: usize) -> Option<usize> {
        match *self {
            Self::Auto if d > 50 => Some(50),
            Self::Auto | Self::Off => None,
            Self::Components(0) => None,
            Self::Components(p) => Some(p.min(d)),
        }
    }
}

impl fmt::Display for PcaSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Off => f.write_str("off"),
            Self::Components(p) => write!(f, "{p}"),
        }
    }
}

/// Most passes a configuration may ask for.
pub const MAX_ITERATIONS: usize = 16;

/// Elbow threshold that keeps every point with scaled distance 1, i.e. the `k` nearest of
/// each batch (their scaled distances are at most 1 by the definition of the local scale).
pub const BATCH_KNN_FLOOR: f64 = 1.0 + 1e-9;

/// Harmony's parameters (harmonypy's defaults; see [`crate::kernels::harmony`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HarmonyOptions {
    /// Number of clusters (`None`: `min(round(N / 30), 100)`).
    pub clusters: Option<usize>,
    /// Diversity penalty θ (2).
    pub theta: f64,
    /// Soft k-means width σ (0.1).
    pub sigma: f64,
    /// Most iterations (10).
    pub max_iterations: usize,
}

impl Default for HarmonyOptions {
    fn default() -> Self {
        Self {
            clusters: None,
            theta: 2.0,
            sigma: 0.1,
            max_iterations: 10,
        }
    }
}

impl HarmonyOptions {
    /// The kernel's parameters with this seed.
    pub fn params(&self, seed: u32) -> crate::kernels::harmony::HarmonyParams {
        crate::kernels::harmony::HarmonyParams {
            clusters: self.clusters,
            theta: self.theta as f32,
            sigma: self.sigma as f32,
            max_iter_harmony: self.max_iterations,
            seed,
            ..Default::default()
        }
    }
}

/// All parameters of one BALANS run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BalansConfig {
    /// Correction method (BALANS unless another is asked for).
    pub method: Method,
    /// Whitening of the sphering method.
    pub sphering: SpheringMethod,
    /// Sphering's regulariser, added to the singular values (pycytominer's default 1e-6).
    pub epsilon: f64,
    /// Harmony's parameters.
    pub harmony: HarmonyOptions,
    /// Neighbour rank for the per-batch local scale (default 40; the paper reading uses 10).
    pub k: usize,
    /// Stop after this many consecutive landmarks that cover no new point (default 50).
    pub tau: usize,
    /// Block length `J` of the sampling weights (default 20).
    pub block: usize,
    /// PCA before distances.
    pub pca: PcaSetting,
    /// Sparsification rule.
    pub elbow: ElbowRule,
    /// Estimator of the corrected values.
    pub estimator: Estimator,
    /// How landmark rows become corrected values.
    pub variant: Variant,
    /// Keep, in every landmark row, at least the `k` nearest points of each batch (the
    /// threshold on scaled distances is raised to just above 1).
    pub batch_knn_floor: bool,
    /// Fraction of the correction applied, in (0, 1]: `X + strength (X_corrected - X)`.
    pub strength: f64,
    /// Passes: each pass re-runs BALANS (scales, landmarks, smoothing) on the previous
    /// pass's output, so neighbourhoods found across batches improve as batches align.
    pub iterations: usize,
    /// Output space.
    pub output_space: OutputSpace,
    /// Distance.
    pub metric: Metric,
    /// Seed of the landmark sampler.
    pub seed: u64,
    /// Cap on the number of landmarks.
    pub max_landmarks: Option<usize>,
    /// Handling of non-finite features.
    pub nan: NanPolicy,
    /// Smallest affinity that is a candidate for a kept entry (default 1e-8).
    pub a_min: f64,
    /// Histogram bins of the kneedle rule (default 4096).
    pub bins: usize,
    /// Rows per chunk in the streaming passes and working files.
    pub chunk_rows: usize,
    /// Landmarks are sampled from a stratified uniform sample of about this many rows (every
    /// batch keeps at least `4 (k + 1)` rows or all of its rows); the smoothing passes still
    /// stream every row. `None`: sample from all rows.
    pub sample_rows: Option<usize>,
    /// Rows per leaf of the order-independent reductions (see `kernels::exact`).
    pub leaf_rows: usize,
    /// Rows the batch offsets are estimated from (residual variant; the predicate and the
    /// label column come with the request).
    pub anchor: Anchor,
}

/// Default of [`BalansConfig::sample_rows`].
pub const DEFAULT_SAMPLE_ROWS: usize = 20_000;

impl Default for BalansConfig {
    fn default() -> Self {
        Self {
            method: Method::Balans,
            sphering: SpheringMethod::ZcaCor,
            epsilon: 1e-6,
            harmony: HarmonyOptions::default(),
            k: 40,
            tau: 50,
            block: 20,
            pca: PcaSetting::Auto,
            elbow: ElbowRule::Kneedle,
            estimator: Estimator::Smooth,
            variant: Variant::Residual,
            batch_knn_floor: true,
            strength: 1.0,
            iterations: 2,
            output_space: OutputSpace::Features,
            metric: Metric::Euclidean,
            seed: 0,
            max_landmarks: None,
            nan: NanPolicy::Error,
            a_min: 1e-8,
            bins: 4096,
            chunk_rows: 8192,
            sample_rows: Some(DEFAULT_SAMPLE_ROWS),
            leaf_rows: 65_536,
            anchor: Anchor::None,
        }
    }
}

impl Eq for BalansConfig {}

impl std::hash::Hash for BalansConfig {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.method.hash(state);
        self.sphering.hash(state);
        self.epsilon.to_bits().hash(state);
        self.harmony.clusters.hash(state);
        self.harmony.theta.to_bits().hash(state);
        self.harmony.sigma.to_bits().hash(state);
        self.harmony.max_iterations.hash(state);
        self.k.hash(state);
        self.tau.hash(state);
        self.block.hash(state);
        self.pca.hash(state);
        self.elbow.hash(state);
        self.estimator.hash(state);
        self.variant.hash(state);
        self.batch_knn_floor.hash(state);
        self.strength.to_bits().hash(state);
        self.iterations.hash(state);
        self.output_space.hash(state);
        self.metric.hash(state);
        self.seed.hash(state);
        self.max_landmarks.hash(state);
        self.nan.hash(state);
        self.a_min.to_bits().hash(state);
        self.bins.hash(state);
        self.chunk_rows.hash(state);
        self.sample_rows.hash(state);
        self.leaf_rows.hash(state);
        self.anchor.hash(state);
    }
}

impl PartialOrd for BalansConfig {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        self.describe().partial_cmp(&other.describe())
    }
}

impl BalansConfig {
    /// Checks parameter ranges.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(OperatorError::InvalidParameter(m.to_string()));
        if self.method != Method::Balans && self.output_space != OutputSpace::Features {
            return bad("--output-space pca applies to BALANS only");
        }
        if !(self.epsilon >= 0.0 && self.epsilon.is_finite()) {
            return bad("epsilon must be a finite number >= 0");
        }
        if self.k == 0 {
            return bad("k must be at least 1");
        }
        let h = &self.harmony;
        if !(h.theta >= 0.0 && h.theta.is_finite()) {
            return bad("harmony theta must be a finite number >= 0");
        }
        if !(h.sigma > 0.0 && h.sigma.is_finite()) {
            return bad("harmony sigma must be a finite number > 0");
        }
        if h.max_iterations == 0 {
            return bad("harmony iterations must be at least 1");
        }
        if h.clusters == Some(0) {
            return bad("harmony clusters must be at least 1");
        }
        if self.method == Method::Harmony && self.seed > u64::from(u32::MAX) {
            return bad("harmony's seed is a 32-bit Mersenne Twister seed: at most 4294967295");
        }
        if self.tau == 0 {
            return bad("tau must be at least 1");
        }
        if self.block == 0 {
            return bad("block (J) must be at least 1");
        }
        if !(self.a_min > 0.0 && self.a_min < 1.0) {
            return bad("a_min must lie in (0, 1)");
        }
        if self.bins < 2 {
            return bad("bins must be at least 2");
        }
        if self.chunk_rows == 0 {
            return bad("chunk_rows must be at least 1");
        }
        if self.leaf_rows == 0 {
            return bad("leaf_rows must be at least 1");
        }
        if self.anchor != Anchor::None
            && (self.method != Method::Balans || self.variant != Variant::Residual)
        {
            return bad(
                "anchors (--anchor) apply to BALANS's residual variant: the offsets it estimates \
                 from them are what that variant applies",
            );
        }
        if self.sample_rows == Some(0) {
            return bad("sample-rows must be at least 1 (or 'all')");
        }
        if self.max_landmarks == Some(0) {
            return bad("max-landmarks must be at least 1");
        }
        if !(self.strength > 0.0 && self.strength <= 1.0) {
            return bad("strength must lie in (0, 1]");
        }
        if !(1..=MAX_ITERATIONS).contains(&self.iterations) {
            return Err(OperatorError::InvalidParameter(format!(
                "iterations must lie in 1..={MAX_ITERATIONS}"
            )));
        }
        if self.estimator == Estimator::Nystrom && self.variant != Variant::Paper {
            return bad(
                "the nystrom estimator applies to the paper variant only (--variant paper)",
            );
        }
        Ok(())
    }

    /// The paper's reading of BALANS (`shared/specs/balans.md`): smoothing form, no
    /// per-batch floor; every other parameter as in [`BalansConfig::default`].
    pub fn paper() -> Self {
        Self {
            variant: Variant::Paper,
            batch_knn_floor: false,
            iterations: 1,
            k: 10,
            ..Self::default()
        }
    }

    /// The defaults of `variant` ([`BalansConfig::paper`] for the paper, else the defaults
    /// with that variant).
    pub fn for_variant(variant: Variant) -> Self {
        match variant {
            Variant::Paper => Self::paper(),
            v => Self {
                variant: v,
                ..Self::default()
            },
        }
    }

    /// The options of the smoothing passes.
    pub fn smooth_options(&self) -> crate::kernels::smooth::SmoothOptions {
        crate::kernels::smooth::SmoothOptions {
            estimator: self.estimator,
            variant: self.variant,
            strength: self.strength,
            nearest_fallback: false,
        }
    }

    /// PCA components used for `d` features, or `None` for none. Harmony always works on
    /// centred PCA coordinates: `auto` means `min(50, d)` for it.
    pub fn pca_components(&self, d: usize) -> Option<usize> {
        match (self.method, self.pca) {
            (Method::Harmony, PcaSetting::Auto) => Some(d.min(50)),
            (_, setting) => setting.components(d),
        }
    }

    /// Operators a correction chains: `iterations` for BALANS, one for ComBat.
    pub fn passes(&self) -> usize {
        match self.method {
            Method::Balans => self.iterations,
            Method::ComBat | Method::Sphering | Method::Harmony => 1,
        }
    }

    /// Smallest elbow threshold this configuration allows (see `batch_knn_floor`).
    pub fn min_threshold(&self) -> f64 {
        if self.batch_knn_floor {
            BATCH_KNN_FLOOR
        } else {
            0.0
        }
    }

    /// Rows every batch keeps in the landmark sample (when it has that many).
    pub fn min_sample_rows_per_batch(&self) -> usize {
        4 * (self.k + 1)
    }

    /// Minimum number of kept entries per landmark row (self included): `k + 1`.
    pub fn r_min(&self) -> usize {
        self.k + 1
    }

    /// One-line description (used in EXPLAIN and the output's key-value metadata).
    pub fn describe(&self) -> String {
        match self.method {
            Method::ComBat => return format!("method=combat nan={}", self.nan),
            Method::Sphering => {
                return format!(
                    "method=sphering sphering={} epsilon={} nan={}",
                    self.sphering, self.epsilon, self.nan
                );
            }
            Method::Harmony => {
                let h = &self.harmony;
                return format!(
                    "method=harmony pca={} clusters={} theta={} sigma={} max_iterations={} seed={} nan={}",
                    self.pca,
                    h.clusters
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "auto".into()),
                    h.theta,
                    h.sigma,
                    h.max_iterations,
                    self.seed,
                    self.nan
                );
            }
            Method::Balans => {}
        }
        let anchor = match self.anchor {
            Anchor::None => String::new(),
            a => format!(" anchor={a}"),
        };
        format!(
            "variant={} iterations={} batch_knn_floor={} strength={} k={} tau={} block={} pca={} elbow={} estimator={} output_space={} metric={} seed={} max_landmarks={} sample_rows={} nan={} a_min={} bins={}{anchor}",
            self.variant,
            self.iterations,
            self.batch_knn_floor,
            self.strength,
            self.k,
            self.tau,
            self.block,
            self.pca,
            self.elbow,
            self.estimator,
            self.output_space,
            self.metric,
            self.seed,
            self.max_landmarks
                .map(|m| m.to_string())
                .unwrap_or_else(|| "none".into()),
            self.sample_rows
                .map(|m| m.to_string())
                .unwrap_or_else(|| "all".into()),
            self.nan,
            self.a_min,
            self.bins
        )
    }
}
