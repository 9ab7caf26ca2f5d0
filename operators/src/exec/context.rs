//! The state one correction pass shares between its operators.
//!
//! A pass is a chain of operators (see [`crate::exec::plan`]): the ingest spools every input
//! partition into memory-mapped Arrow IPC working files, then per-partition steps and global
//! steps alternate. The spooled rows are the pass's data: every later step reads them through
//! the mappings instead of re-running the input. Global steps put their products (the batch
//! profile, the PCA model, the landmarks, the fitted smoother, ...) here as well as emitting
//! them as small Arrow tables. The context also owns the pass's memory reservation, its working
//! files (deleted when the plan is dropped), progress reporting and the run summary.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::execution::TaskContext;
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryLimit, MemoryReservation};

use crate::error::{OperatorError, Result};
use crate::exec::spec::BalansSpec;
use crate::io::mmap_ipc::MappedIpcFile;
use crate::kernels::combat::ComBatModel;
use crate::kernels::landmark::{Landmark, RowBlocks};
use crate::kernels::pca::PcaModel;
use crate::kernels::sampling::StopReason;
use crate::kernels::smooth::FittedSmoother;
use crate::kernels::sphering::SpheringModel;
use crate::progress::{RunSummary, StageTiming};

/// A working file kept alive (and deleted on drop) by DataFusion's disk manager.
pub struct WorkFile {
    _guard: Arc<dyn datafusion::execution::SpillFile>,
    /// Where the file lives.
    pub path: PathBuf,
}

impl std::fmt::Debug for WorkFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkFile")
            .field("path", &self.path)
            .finish()
    }
}

/// One spooled input partition.
#[derive(Debug)]
pub struct SpoolPartition {
    /// Features as a mapped `FixedSizeList<f32, d>` matrix, rows in input order.
    pub features: MappedIpcFile,
    /// Every non-feature column, same rows.
    pub meta: MappedIpcFile,
    /// Rows kept (after `--nan drop-rows`).
    pub rows: usize,
    /// Rows dropped for non-finite features.
    pub dropped: usize,
    /// Batch key of each row, as an index into `keys`.
    pub local_codes: Vec<u32>,
    /// This partition's batch keys, in order of first appearance.
    pub keys: Vec<String>,
    /// Per feature: number of non-finite values seen.
    pub non_finite: Vec<usize>,
    /// Per feature: smallest and largest finite value after the NaN policy.
    pub min: Vec<f32>,
    /// See `min`.
    pub max: Vec<f32>,
    /// Rows marked by the fit-row column (sphering), when there is one.
    pub fit_mask: Option<Vec<bool>>,
    /// With an anchor label column: each row's label (index into `label_keys`; `u32::MAX` for
    /// null) and this partition's labels in order of first appearance.
    pub labels: Option<(Vec<u32>, Vec<String>)>,
    _files: [WorkFile; 2],
}

impl SpoolPartition {
    /// Assembles a spooled partition from its finished working files.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        features: WorkFile,
        meta: WorkFile,
        dropped: usize,
        local_codes: Vec<u32>,
        keys: Vec<String>,
        non_finite: Vec<usize>,
        min: Vec<f32>,
        max: Vec<f32>,
        fit_mask: Option<Vec<bool>>,
    ) -> Result<Self> {
        let features_map = MappedIpcFile::open(&features.path)?;
        let meta_map = MappedIpcFile::open(&meta.path)?;
        Ok(Self {
            rows: local_codes.len(),
            features: features_map,
            meta: meta_map,
            dropped,
            local_codes,
            keys,
            non_finite,
            min,
            max,
            fit_mask,
            labels: None,
            _files: [features, meta],
        })
    }

    /// Attaches the rows' anchor labels (see [`SpoolPartition::labels`]).
    pub fn with_labels(mut self, labels: Option<(Vec<u32>, Vec<String>)>) -> Self {
        self.labels = labels;
        self
    }
}

/// The reduced coordinates (PCA and/or L2 normalisation) of one partition.
#[derive(Debug)]
pub struct ReducedPartition {
    /// The mapped `n_i x p` matrix.
    pub z: MappedIpcFile,
    _file: WorkFile,
}

impl ReducedPartition {
    /// Maps a finished reduced-coordinates file.
    pub fn new(file: WorkFile) -> Result<Self> {
        Ok(Self {
            z: MappedIpcFile::open(&file.path)?,
            _file: file,
        })
    }
}

/// What the profile step learnt about the whole input.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Profile {
    /// Rows in all partitions.
    pub rows: usize,
    /// First global row of each partition.
    pub partition_start: Vec<usize>,
    /// Batch keys, sorted.
    pub batch_keys: Vec<String>,
    /// Rows per batch (same order).
    pub batch_sizes: Vec<usize>,
    /// Batch code (index into `batch_keys`) of every row, global row order.
    pub codes: Vec<u32>,
    /// Fit-row flag of every row (sphering), global row order.
    pub fit_mask: Option<Vec<bool>>,
    /// Anchored BALANS: whether each row is an anchor, global row order.
    pub anchors: Option<Vec<bool>>,
    /// Anchored BALANS: anchor rows per batch (same order as `batch_keys`).
    pub anchors_per_batch: Vec<usize>,
    /// Per feature: smallest finite value.
    pub min: Vec<f32>,
    /// Per feature: largest finite value.
    pub max: Vec<f32>,
}

impl Profile {
    /// Global rows of partition `i`.
    pub fn partition_rows(&self, i: usize) -> std::ops::Range<usize> {
        let start = self.partition_start[i];
        let end = self
            .partition_start
            .get(i + 1)
            .copied()
            .unwrap_or(self.rows);
        start..end
    }

    /// Per feature: the midpoint of the range (the shift of the Gram and moment sums).
    pub fn center(&self) -> Vec<f64> {
        self.min
            .iter()
            .zip(&self.max)
            .map(|(&lo, &hi)| {
                if lo <= hi {
                    (lo as f64 + hi as f64) / 2.0
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// Per feature: the largest distance of a value from [`Profile::center`].
    pub fn half_range(&self) -> Vec<f64> {
        self.min
            .iter()
            .zip(&self.max)
            .map(|(&lo, &hi)| {
                if lo <= hi {
                    ((hi as f64 - lo as f64) / 2.0) * (1.0 + 1e-12) + 1e-300
                } else {
                    1e-300
                }
            })
            .collect()
    }

    /// Per feature: the largest magnitude of a value.
    pub fn abs_max(&self) -> Vec<f64> {
        self.min
            .iter()
            .zip(&self.max)
            .map(|(&lo, &hi)| (lo.abs().max(hi.abs()) as f64) * (1.0 + 1e-12) + 1e-300)
            .collect()
    }
}

/// The landmarks of a pass and where they came from.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct LandmarkSet {
    /// Landmark rows in sampling order (`index` is into the batch-grouped sample).
    pub landmarks: Vec<Landmark>,
    /// Global row of each sample row, batch-grouped order.
    pub sample_rows: Vec<u64>,
    /// Batch offsets of the grouped sample.
    pub sample_offsets: Vec<usize>,
    /// Whether the sample is every row (then every row is covered, unless capped).
    pub all_rows: bool,
    /// Why sampling stopped.
    pub stop: StopReason,
    /// Landmarks needed for full coverage of the sample.
    pub steps_to_full_coverage: Option<usize>,
    /// Anchored BALANS: the landmarks with their per-batch scales measured on the anchor
    /// rows of the sample (same order, coordinates and thresholds as `landmarks`); the
    /// smoothing sums run over anchor rows with these.
    pub anchor_landmarks: Option<Vec<Landmark>>,
}

impl LandmarkSet {
    /// Batch of the landmark drawn at sample index `i`.
    pub fn sample_batch(&self, i: usize) -> usize {
        self.sample_offsets.partition_point(|&o| o <= i) - 1
    }
}

/// A stage's clock: started by its first participant, stopped by its last.
#[derive(Debug)]
struct StageClock {
    started: Instant,
    remaining: usize,
    done: u64,
}

/// Cancels a blocking computation when the future awaiting it is dropped, or when another
/// task of the pass failed (then it keeps that first failure, so every task reports the
/// cause instead of "cancelled", whichever error reaches the caller first).
#[derive(Debug, Default, Clone)]
pub struct CancelFlag {
    cancelled: Arc<AtomicBool>,
    cause: Arc<OnceLock<OperatorError>>,
}

impl CancelFlag {
    /// Whether cancellation was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Asks for cancellation.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release)
    }

    /// A task failed with `error`: keeps it as the cause (the first failure wins; a
    /// cancellation is no cause) and cancels the other tasks.
    pub fn fail(&self, error: &OperatorError) {
        if !matches!(error, OperatorError::Cancelled) {
            let _ = self.cause.set(error.replay());
        }
        self.cancel();
    }

    /// `error`, or the failure that cancelled the pass when `error` is only the cancellation
    /// it caused.
    pub fn explain(&self, error: OperatorError) -> OperatorError {
        match (error, self.cause.get()) {
            (OperatorError::Cancelled, Some(cause)) => cause.replay(),
            (error, _) => error,
        }
    }

    /// `Err(Cancelled)` once cancelled.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(OperatorError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// A guard that cancels when dropped (unless disarmed).
    pub fn guard(&self) -> CancelOnDrop {
        CancelOnDrop(Some(self.clone()))
    }
}

/// Cancels its flag on drop.
#[derive(Debug)]
pub struct CancelOnDrop(Option<CancelFlag>);

impl CancelOnDrop {
    /// The computation finished: dropping no longer cancels.
    pub fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(flag) = self.0.take() {
            flag.cancel();
        }
    }
}

/// Shared state of one correction pass (see the module docs).
#[derive(Debug)]
pub struct PassContext {
    /// The request.
    pub spec: BalansSpec,
    /// The pass's input schema.
    pub input_schema: SchemaRef,
    /// The pass's output schema.
    pub schema: SchemaRef,
    /// Input partitions.
    pub partitions: usize,
    task: OnceLock<Arc<TaskContext>>,
    reservation: Mutex<Option<MemoryReservation>>,
    peak_reserved: AtomicUsize,
    spool: Vec<OnceLock<Arc<SpoolPartition>>>,
    reduced: Vec<OnceLock<Arc<ReducedPartition>>>,
    profile: OnceLock<Arc<Profile>>,
    pca: OnceLock<Option<Arc<PcaModel>>>,
    landmarks: OnceLock<Arc<LandmarkSet>>,
    smoother: OnceLock<Arc<FittedSmoother>>,
    combat: OnceLock<Arc<ComBatModel>>,
    sphering: OnceLock<Arc<SpheringModel>>,
    harmony: OnceLock<Arc<Vec<f32>>>,
    stages: Mutex<HashMap<String, StageClock>>,
    summary: Mutex<RunSummary>,
    written: AtomicUsize,
    uncovered: AtomicUsize,
    nnz: AtomicUsize,
    /// A cluster task's context: it spools only the partitions its task reads (its own and
    /// the head of the next ones), so row views are windows of the global row order.
    task_window: bool,
    /// Set when a step fails or is cancelled: the other steps stop at their next check.
    pub abort: CancelFlag,
}

impl PassContext {
    /// A context for a pass over `partitions` input partitions of `input_schema`.
    pub fn new(
        spec: BalansSpec,
        input_schema: SchemaRef,
        schema: SchemaRef,
        partitions: usize,
    ) -> Self {
        let summary = RunSummary {
            method: spec.config.method.to_string(),
            partitions,
            ..RunSummary::default()
        };
        Self {
            spec,
            input_schema,
            schema,
            partitions,
            task: OnceLock::new(),
            reservation: Mutex::new(None),
            peak_reserved: AtomicUsize::new(0),
            spool: (0..partitions).map(|_| OnceLock::new()).collect(),
            reduced: (0..partitions).map(|_| OnceLock::new()).collect(),
            profile: OnceLock::new(),
            pca: OnceLock::new(),
            landmarks: OnceLock::new(),
            smoother: OnceLock::new(),
            combat: OnceLock::new(),
            sphering: OnceLock::new(),
            harmony: OnceLock::new(),
            stages: Mutex::new(HashMap::new()),
            summary: Mutex::new(summary),
            written: AtomicUsize::new(0),
            uncovered: AtomicUsize::new(0),
            nnz: AtomicUsize::new(0),
            task_window: false,
            abort: CancelFlag::default(),
        }
    }

    /// A context for one cluster task of a pass over `partitions` partitions: it holds the
    /// partitions the task spools and the global products it is given (see
    /// [`PassContext::import_products`]); row views start at its first spooled partition.
    pub fn for_task(
        spec: BalansSpec,
        input_schema: SchemaRef,
        schema: SchemaRef,
        partitions: usize,
    ) -> Self {
        Self {
            task_window: true,
            ..Self::new(spec, input_schema, schema, partitions)
        }
    }

    /// Binds the task context of the running query (first call wins).
    pub fn bind(&self, task: &Arc<TaskContext>) {
        let _ = self.task.set(task.clone());
    }

    fn task(&self) -> Result<&Arc<TaskContext>> {
        self.task.get().ok_or_else(|| {
            OperatorError::InvalidParameter("the correction pass has not started".into())
        })
    }

    /// Reserves `bytes` more in the session's memory pool for `what`, or fails with a message
    /// naming it.
    pub fn reserve(&self, bytes: usize, what: &str) -> Result<()> {
        let task = self.task()?;
        let pool = task.memory_pool().clone();
        let mut guard = self.reservation.lock().expect("reservation lock");
        let reservation = guard.get_or_insert_with(|| {
            MemoryConsumer::new(format!("Balans {}", self.spec.pass_label().trim())).register(&pool)
        });
        reservation.try_grow(bytes).map_err(|_| {
            let free = match pool.memory_limit() {
                MemoryLimit::Finite(limit) => human_bytes(limit.saturating_sub(pool.reserved())),
                _ => "less".to_string(),
            };
            OperatorError::MemoryLimit(format!(
                "{what} needs {} more but only {free} of the memory limit is free (raise --memory-limit)",
                human_bytes(bytes),
            ))
        })?;
        self.peak_reserved
            .fetch_max(pool.reserved(), Ordering::Relaxed);
        Ok(())
    }

    /// Returns `bytes` of an earlier reservation to the pool.
    pub fn release(&self, bytes: usize) {
        if let Some(r) = self.reservation.lock().expect("reservation lock").as_mut() {
            r.shrink(bytes.min(r.size()));
        }
    }

    /// Highest memory reserved in the pool while this pass ran.
    pub fn peak_reserved(&self) -> usize {
        self.peak_reserved.load(Ordering::Relaxed)
    }

    /// A new working file in the session's temporary directory.
    pub fn work_file(&self, what: &str) -> Result<WorkFile> {
        let guard = self
            .task()?
            .runtime_env()
            .disk_manager
            .create_tmp_file(what)?;
        let path = guard
            .path()
            .ok_or_else(|| {
                OperatorError::InvalidParameter("BALANS needs a local temporary directory".into())
            })?
            .to_path_buf();
        Ok(WorkFile {
            _guard: guard,
            path,
        })
    }

    fn stage_name(&self, stage: &str) -> String {
        format!("{}{stage}", self.spec.pass_label())
    }

    /// A participant of `stage` starts (the first one starts the clock and the progress bar);
    /// `participants` is how many will call [`PassContext::stage_end`].
    pub fn stage_begin(&self, stage: &str, participants: usize, total: Option<u64>) {
        let name = self.stage_name(stage);
        let mut stages = self.stages.lock().expect("stage lock");
        if !stages.contains_key(&name) {
            stages.insert(
                name.clone(),
                StageClock {
                    started: Instant::now(),
                    remaining: participants.max(1),
                    done: 0,
                },
            );
            self.spec.progress.stage_started(&name, total);
        }
    }

    /// Adds `done` units of work to `stage`'s progress.
    pub fn stage_progress(&self, stage: &str, done: u64, message: Option<String>) {
        let name = self.stage_name(stage);
        let mut stages = self.stages.lock().expect("stage lock");
        if let Some(clock) = stages.get_mut(&name) {
            clock.done += done;
            self.spec.progress.stage_progress(clock.done, message);
        }
    }

    /// A participant of `stage` is done; the last one records the stage's wall time.
    pub fn stage_end(&self, stage: &str) {
        let name = self.stage_name(stage);
        let mut stages = self.stages.lock().expect("stage lock");
        if let Some(clock) = stages.get_mut(&name) {
            clock.remaining = clock.remaining.saturating_sub(1);
            if clock.remaining == 0 {
                let seconds = clock.started.elapsed().as_secs_f64();
                self.summary
                    .lock()
                    .expect("summary lock")
                    .stages
                    .push(StageTiming {
                        stage: name.clone(),
                        seconds,
                    });
                self.spec.progress.stage_finished(&name);
            }
        }
    }

    /// Reports a warning and keeps it for the summary.
    pub fn warn(&self, message: String) {
        self.spec.progress.warn(&message);
        self.summary
            .lock()
            .expect("summary lock")
            .warnings
            .push(message);
    }

    /// Edits the run summary.
    pub fn with_summary<T>(&self, f: impl FnOnce(&mut RunSummary) -> T) -> T {
        f(&mut self.summary.lock().expect("summary lock"))
    }

    /// Records a spooled partition.
    pub fn set_spool(&self, i: usize, part: SpoolPartition) -> Result<()> {
        self.spool[i].set(Arc::new(part)).map_err(|_| {
            OperatorError::InvalidParameter(format!(
                "partition {i} of the correction was spooled twice (a correction plan runs once)"
            ))
        })
    }

    /// Spooled partition `i`.
    pub fn spool(&self, i: usize) -> Result<&Arc<SpoolPartition>> {
        self.spool[i]
            .get()
            .ok_or_else(|| missing("the spooled input"))
    }

    /// Records partition `i`'s reduced coordinates.
    pub fn set_reduced(&self, i: usize, part: ReducedPartition) {
        let _ = self.reduced[i].set(Arc::new(part));
    }

    /// The partitions row views cover: every partition, or in a task context the spooled run
    /// starting at its first spooled partition.
    fn row_partitions(&self) -> Result<std::ops::Range<usize>> {
        if !self.task_window {
            return Ok(0..self.partitions);
        }
        let first = (0..self.partitions)
            .find(|&i| self.spool[i].get().is_some())
            .ok_or_else(|| missing("the spooled input"))?;
        let end = (first..self.partitions)
            .find(|&i| self.spool[i].get().is_none())
            .unwrap_or(self.partitions);
        Ok(first..end)
    }

    /// Wraps `blocks` (rows of `parts`) as a view indexed by global row.
    fn row_view<'a>(
        &self,
        parts: std::ops::Range<usize>,
        blocks: Vec<&'a [f32]>,
        p: usize,
    ) -> Result<RowBlocks<'a>> {
        if !self.task_window {
            return Ok(RowBlocks::new(blocks, p));
        }
        let profile = self.profile()?;
        Ok(RowBlocks::window(
            profile.partition_start[parts.start],
            blocks,
            p,
            profile.rows,
        ))
    }

    /// The features of every row, global row order (in a task context: of its spooled rows).
    pub fn feature_rows(&self) -> Result<RowBlocks<'_>> {
        let d = self.spec.features.len();
        let parts = self.row_partitions()?;
        let mut blocks = Vec::new();
        for i in parts.clone() {
            let (_, b) = self.spool(i)?.features.matrix_blocks()?;
            blocks.extend(b);
        }
        self.row_view(parts, blocks, d)
    }

    /// The coordinates distances are computed on, global row order: the reduced files when the
    /// reduce step wrote them, else the features.
    pub fn distance_rows(&self) -> Result<RowBlocks<'_>> {
        let parts = self.row_partitions()?;
        if self.has_reduced() {
            let mut blocks = Vec::new();
            let mut p = 0;
            for r in &self.reduced[parts.clone()] {
                let part = r.get().ok_or_else(|| missing("the reduced coordinates"))?;
                let (width, b) = part.z.matrix_blocks()?;
                p = width;
                blocks.extend(b);
            }
            self.row_view(parts, blocks, p)
        } else {
            self.feature_rows()
        }
    }

    /// Whether the reduce step wrote coordinates of its own.
    pub fn has_reduced(&self) -> bool {
        self.reduced.iter().any(|r| r.get().is_some())
    }

    /// Whether partition `i` is spooled.
    pub fn is_spooled(&self, i: usize) -> bool {
        self.spool[i].get().is_some()
    }
}

macro_rules! product {
    ($set:ident, $get:ident, $field:ident, $ty:ty, $what:literal) => {
        impl PassContext {
            #[doc = concat!("Records ", $what, ".")]
            pub fn $set(&self, value: $ty) {
                let _ = self.$field.set(value);
            }

            #[doc = concat!(
                                                "",
                                                $what,
                                                " (an error if the step that makes it has not run)."
                                            )]
            pub fn $get(&self) -> Result<&$ty> {
                self.$field.get().ok_or_else(|| missing($what))
            }
        }
    };
}

product!(
    set_profile,
    profile,
    profile,
    Arc<Profile>,
    "the batch profile"
);
product!(set_pca, pca, pca, Option<Arc<PcaModel>>, "the PCA model");
product!(
    set_landmarks,
    landmarks,
    landmarks,
    Arc<LandmarkSet>,
    "the landmarks"
);
product!(
    set_smoother,
    smoother,
    smoother,
    Arc<FittedSmoother>,
    "the fitted smoother"
);
product!(
    set_combat,
    combat,
    combat,
    Arc<ComBatModel>,
    "the ComBat model"
);
product!(
    set_sphering,
    sphering,
    sphering,
    Arc<SpheringModel>,
    "the sphering model"
);
product!(
    set_harmony,
    harmony,
    harmony,
    Arc<Vec<f32>>,
    "the Harmony coordinates"
);

/// The global products of a pass, borrowed for [`PassContext::export_products`] (same field
/// order as [`OwnedProducts`]: bincode is positional).
#[derive(serde::Serialize)]
struct ProductsRef<'a> {
    profile: Option<&'a Profile>,
    pca: Option<Option<&'a PcaModel>>,
    landmarks: Option<&'a LandmarkSet>,
    smoother: Option<crate::kernels::smooth::SmootherParts>,
    combat: Option<&'a ComBatModel>,
    sphering: Option<&'a SpheringModel>,
}

/// See [`ProductsRef`].
#[derive(serde::Deserialize)]
struct OwnedProducts {
    profile: Option<Profile>,
    pca: Option<Option<PcaModel>>,
    landmarks: Option<LandmarkSet>,
    smoother: Option<crate::kernels::smooth::SmootherParts>,
    combat: Option<ComBatModel>,
    sphering: Option<SpheringModel>,
}

impl PassContext {
    /// The global products made so far (profile, PCA model, landmarks, fitted smoother,
    /// ComBat and sphering models) in an exact binary form: what one cluster stage hands the
    /// next. Harmony's coordinates are not among them (Harmony runs as one task).
    pub fn export_products(&self) -> Result<Vec<u8>> {
        let products = ProductsRef {
            profile: self.profile.get().map(|p| p.as_ref()),
            pca: self.pca.get().map(|p| p.as_deref()),
            landmarks: self.landmarks.get().map(|l| l.as_ref()),
            smoother: self.smoother.get().map(|s| s.to_parts()),
            combat: self.combat.get().map(|c| c.as_ref()),
            sphering: self.sphering.get().map(|s| s.as_ref()),
        };
        bincode::serialize(&products).map_err(|e| {
            OperatorError::InvalidParameter(format!("cannot encode the pass's products: {e}"))
        })
    }

    /// Records the products [`PassContext::export_products`] encoded.
    pub fn import_products(&self, bytes: &[u8]) -> Result<()> {
        let products: OwnedProducts = bincode::deserialize(bytes).map_err(|e| {
            OperatorError::InvalidParameter(format!("malformed products of a correction pass: {e}"))
        })?;
        if let Some(profile) = products.profile {
            self.set_profile(Arc::new(profile));
        }
        if let Some(pca) = products.pca {
            self.set_pca(pca.map(Arc::new));
        }
        if let Some(set) = products.landmarks {
            let set = Arc::new(set);
            if let Some(parts) = products.smoother {
                let search = crate::kernels::search::LandmarkSearch::new(&set.landmarks);
                self.set_smoother(Arc::new(FittedSmoother::from_parts(parts, search)));
            }
            self.set_landmarks(set);
        }
        if let Some(model) = products.combat {
            self.set_combat(Arc::new(model));
        }
        if let Some(model) = products.sphering {
            self.set_sphering(Arc::new(model));
        }
        Ok(())
    }
}

impl PassContext {
    /// Counts a written partition's rows, uncovered rows and entries; the last partition
    /// completes the summary and reports it.
    pub fn partition_written(&self, uncovered: usize, nnz: usize) {
        self.uncovered.fetch_add(uncovered, Ordering::Relaxed);
        self.nnz.fetch_add(nnz, Ordering::Relaxed);
        let done = self.written.fetch_add(1, Ordering::AcqRel) + 1;
        if done == self.partitions {
            // What stays in memory until the plan is dropped: the batch codes (per partition
            // and global, 4 bytes each per row); the working files are on disk.
            let rows = self.profile.get().map_or(0, |p| p.rows);
            if let Some(r) = self.reservation.lock().expect("reservation lock").as_mut() {
                r.shrink(r.size().saturating_sub(rows * 8));
            }
            let uncovered = self.uncovered.load(Ordering::Relaxed);
            if uncovered > 0 && self.landmarks.get().is_some_and(|l| l.all_rows) {
                self.warn(format!(
                    "{uncovered} rows are covered by no landmark and keep their input values (see {})",
                    crate::exec::spec::COVERED_COLUMN
                ));
            }
            let summary = self.with_summary(|s| {
                s.peak_reserved_bytes = self.peak_reserved();
                let uncovered = self.uncovered.load(Ordering::Relaxed);
                if s.rows > 0 {
                    s.uncovered = uncovered;
                    s.coverage = (s.rows - uncovered.min(s.rows)) as f64 / s.rows as f64;
                }
                if s.landmarks > 0 {
                    let nnz = self.nnz.load(Ordering::Relaxed);
                    s.nnz = nnz;
                    s.mean_kept_per_row = nnz as f64 / s.landmarks as f64;
                }
                s.clone()
            });
            self.spec.progress.finished(&summary);
        }
    }
}

fn missing(what: &str) -> OperatorError {
    OperatorError::InvalidParameter(format!(
        "{what} is not available: the correction's steps ran out of order"
    ))
}

/// `1.5 GiB` style sizes.
pub fn human_bytes(b: usize) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancelled_task_reports_the_failure_that_cancelled_it() {
        let flag = CancelFlag::default();
        assert!(matches!(
            flag.explain(OperatorError::Cancelled),
            OperatorError::Cancelled
        ));
        flag.fail(&OperatorError::Cancelled);
        assert!(flag.is_cancelled());
        assert!(matches!(
            flag.explain(OperatorError::Cancelled),
            OperatorError::Cancelled
        ));
        let other = flag.clone();
        other.fail(&OperatorError::MemoryLimit(
            "the landmark sample needs 3 MB".into(),
        ));
        other.fail(&OperatorError::BadInput("a later failure".into()));
        let reported = flag.explain(OperatorError::Cancelled);
        assert!(
            matches!(&reported, OperatorError::MemoryLimit(m) if m.contains("3 MB")),
            "{reported}"
        );
        // A task's own failure is kept as it is.
        assert!(matches!(
            flag.explain(OperatorError::BadInput("own".into())),
            OperatorError::BadInput(m) if m == "own"
        ));
    }
}
