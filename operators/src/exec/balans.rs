//! `BalansExec`: the BALANS correction as one multi-pass physical operator.
//!
//! Input: one partition of profile rows (metadata columns plus numeric feature columns).
//! Output: the same rows in the same order, features replaced by their corrected values.
//!
//! ```text
//! input stream ──► ingest: features → features.arrow (input order, f32, mmap later)
//!                           metadata → meta.arrow; batch codes; NaN/constant checks; PCA Gram
//!              ──► reduce: (x - mean) V^T → reduced.arrow, gathered by batch → grouped.arrow
//!              ──► sample: adaptive landmark loop over the mapped grouped matrix
//!              ──► smooth pass 1: Y = A_S X streamed over features.arrow (m x d in RAM)
//!              ──► smooth pass 2: X_hat rows, joined with meta.arrow, emitted in input order
//! ```
//!
//! Only O(n) scalars per point (batch codes, permutation, sampling weights), the PCA state,
//! the landmark descriptors and `Y` (m x d) live on the heap, reserved in the session's memory
//! pool; the feature matrix lives in memory-mapped working files that are deleted when the
//! stream ends, fails or is dropped.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Float32Array, RecordBatch};
use datafusion::arrow::compute::{cast, filter_record_batch};
use datafusion::arrow::datatypes::{DataType, Field, Float32Type, Schema, SchemaRef};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryLimit, MemoryReservation};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::stream::RecordBatchReceiverStream;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, Distribution, ExecutionPlan, Partitioning, PlanProperties,
};
use futures::StreamExt;
use rayon::prelude::*;

use crate::config::{BalansConfig, Method, Metric, NanPolicy, OutputSpace};
use crate::error::{OperatorError, Result};
use crate::io::mmap_ipc::{BatchWriter, MappedIpcFile, MatrixWriter};
use crate::kernels::combat::{BatchMoments, fit_combat};
use crate::kernels::distance::l2_normalize_rows;
use crate::kernels::elbow::ElbowParams;
use crate::kernels::harmony::{default_clusters, harmonize};
use crate::kernels::landmark::{RowBlocks, SamplingParams, sample_landmarks};
use crate::kernels::pca::{GramAccumulator, PcaModel};
use crate::kernels::smooth::{PointRef, SmoothAccumulator};
use crate::kernels::sphering::SpheringAccumulator;
use crate::progress::{ProgressSink, RunSummary, StageTiming};

/// Name of the column that marks points no landmark covers (present when a cap can stop
/// sampling before full coverage).
pub const COVERED_COLUMN: &str = "Metadata_balans_covered";

/// What to correct and how.
#[derive(Debug, Clone)]
pub struct BalansSpec {
    /// Feature columns, in input order.
    pub features: Vec<String>,
    /// Batch key columns (combined into one key).
    pub batch: Vec<String>,
    /// Parameters.
    pub config: BalansConfig,
    /// Progress and summary receiver.
    pub progress: Arc<dyn ProgressSink>,
    /// Which of the `config.iterations` passes this operator runs (1-based); planners chain
    /// one operator per pass, each correcting the previous pass's output.
    pub pass: usize,
    /// Boolean input column marking the rows a method is fitted on (sphering: the negative
    /// controls); it is not passed to the output.
    pub fit_mask: Option<String>,
}

impl BalansSpec {
    /// A spec for the first pass.
    pub fn new(
        features: Vec<String>,
        batch: Vec<String>,
        config: BalansConfig,
        progress: Arc<dyn ProgressSink>,
    ) -> Self {
        Self {
            features,
            batch,
            config,
            progress,
            pass: 1,
            fit_mask: None,
        }
    }

    /// Whether this pass is the last one.
    pub fn is_last_pass(&self) -> bool {
        self.pass >= self.config.passes()
    }

    /// Output space of this pass: features for every pass but the last.
    pub fn output_space(&self) -> OutputSpace {
        if self.config.method == Method::Harmony {
            // Harmony corrects the PCA coordinates (or the features when PCA is off).
            return match self.config.pca_components(self.features.len()) {
                Some(_) => OutputSpace::Pca,
                None => OutputSpace::Features,
            };
        }
        if self.is_last_pass() {
            self.config.output_space
        } else {
            OutputSpace::Features
        }
    }

    /// `pass i/N ` when the correction runs several passes (prefix of stage names).
    pub fn pass_label(&self) -> String {
        if self.config.passes() > 1 {
            format!("pass {}/{} ", self.pass, self.config.passes())
        } else {
            String::new()
        }
    }

    fn emits_covered_column(&self) -> bool {
        self.config.method == Method::Balans
            && (self.config.max_landmarks.is_some() || self.config.tau < self.config.block)
    }
}

/// The output schema of a BALANS correction over `input`.
pub fn balans_output_schema(input: &Schema, spec: &BalansSpec) -> Result<SchemaRef> {
    for name in spec.features.iter().chain(&spec.batch) {
        if input.index_of(name).is_err() {
            return Err(OperatorError::BadInput(format!(
                "column '{name}' is not in the input"
            )));
        }
    }
    if let Some(mask) = &spec.fit_mask {
        match input.field_with_name(mask) {
            Ok(f) if f.data_type() == &DataType::Boolean => {}
            _ => {
                return Err(OperatorError::BadInput(format!(
                    "the fit-row column '{mask}' must be a boolean column of the input"
                )));
            }
        }
    }
    let is_feature = |f: &Field| spec.features.iter().any(|n| n == f.name());
    let is_mask = |f: &Field| spec.fit_mask.as_deref() == Some(f.name().as_str());
    let mut fields: Vec<Field> = Vec::new();
    match spec.output_space() {
        OutputSpace::Features => {
            for f in input.fields().iter().filter(|f| !is_mask(f)) {
                if is_feature(f) {
                    fields.push(Field::new(f.name(), DataType::Float32, false));
                } else {
                    fields.push(f.as_ref().clone());
                }
            }
        }
        OutputSpace::Pca => {
            let p = spec
                .config
                .pca_components(spec.features.len())
                .ok_or_else(|| {
                    OperatorError::InvalidParameter(
                        "--output-space pca needs PCA (set --pca N)".into(),
                    )
                })?;
            fields.extend(
                input
                    .fields()
                    .iter()
                    .filter(|f| !is_feature(f) && !is_mask(f))
                    .map(|f| f.as_ref().clone()),
            );
            fields.extend((1..=p).map(|c| Field::new(format!("PC{c}"), DataType::Float32, false)));
        }
    }
    // An earlier pass's covered column is overwritten in place by this pass's.
    if spec.emits_covered_column() && input.index_of(COVERED_COLUMN).is_err() {
        fields.push(Field::new(COVERED_COLUMN, DataType::Boolean, false));
    }
    Ok(Arc::new(Schema::new_with_metadata(
        fields,
        input.metadata().clone(),
    )))
}

/// The BALANS correction operator (single input partition, single output partition).
#[derive(Debug)]
pub struct BalansExec {
    input: Arc<dyn ExecutionPlan>,
    spec: BalansSpec,
    schema: SchemaRef,
    cache: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl BalansExec {
    /// Creates the operator over `input`.
    pub fn try_new(input: Arc<dyn ExecutionPlan>, spec: BalansSpec) -> Result<Self> {
        spec.config.validate()?;
        if spec.features.is_empty() {
            return Err(OperatorError::BadInput("no feature columns".into()));
        }
        if spec.batch.is_empty() {
            return Err(OperatorError::BadInput("no batch column".into()));
        }
        let schema = balans_output_schema(&input.schema(), &spec)?;
        let cache = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        ));
        Ok(Self {
            input,
            spec,
            schema,
            cache,
            metrics: ExecutionPlanMetricsSet::new(),
        })
    }

    /// The correction request.
    pub fn spec(&self) -> &BalansSpec {
        &self.spec
    }

    /// The input plan.
    pub fn input(&self) -> &Arc<dyn ExecutionPlan> {
        &self.input
    }
}

impl DisplayAs for BalansExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        match t {
            DisplayFormatType::TreeRender => write!(
                f,
                "features={}\nbatch={}",
                self.spec.features.len(),
                self.spec.batch.join(",")
            ),
            _ => write!(
                f,
                "BalansExec: {}features={}, batch=[{}], {}",
                self.spec.pass_label(),
                self.spec.features.len(),
                self.spec.batch.join(", "),
                self.spec.config.describe()
            ),
        }
    }
}

impl ExecutionPlan for BalansExec {
    fn name(&self) -> &str {
        "BalansExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.cache
    }

    fn required_input_distribution(&self) -> Vec<Distribution> {
        vec![Distribution::SinglePartition]
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![false]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DFResult<TreeNodeRecursion>,
    ) -> DFResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        if children.len() != 1 {
            return Err(DataFusionError::Internal(
                "BalansExec takes one child".into(),
            ));
        }
        Ok(Arc::new(BalansExec::try_new(
            children.swap_remove(0),
            self.spec.clone(),
        )?))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DFResult<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "BalansExec has one partition, got {partition}"
            )));
        }
        let input = self.input.execute(0, context.clone())?;
        let mut builder = RecordBatchReceiverStream::builder(self.schema.clone(), 2);
        let tx = builder.tx();
        let spec = self.spec.clone();
        let schema = self.schema.clone();
        let handle = tokio::runtime::Handle::current();
        builder.spawn_blocking(move || {
            let run = Run::new(spec, schema, context, tx.clone(), handle);
            match run.and_then(|r| r.execute(input)) {
                Ok(()) | Err(OperatorError::Cancelled) => Ok(()),
                Err(e) => Err(e.into()),
            }
        });
        Ok(builder.build())
    }
}

/// State of one execution.
struct Run {
    spec: BalansSpec,
    schema: SchemaRef,
    context: Arc<TaskContext>,
    tx: tokio::sync::mpsc::Sender<DFResult<RecordBatch>>,
    handle: tokio::runtime::Handle,
    reservation: MemoryReservation,
    summary: RunSummary,
    stage_start: Instant,
}

/// A working file kept alive (and deleted on drop) by DataFusion's disk manager.
struct WorkFile {
    _guard: Arc<dyn datafusion::execution::SpillFile>,
    path: PathBuf,
}

/// What the ingest pass produced.
struct Ingested {
    features: WorkFile,
    meta: WorkFile,
    batch_codes: Vec<u32>,
    batch_keys: Vec<String>,
    gram: Option<GramAccumulator>,
}

impl Run {
    fn new(
        spec: BalansSpec,
        schema: SchemaRef,
        context: Arc<TaskContext>,
        tx: tokio::sync::mpsc::Sender<DFResult<RecordBatch>>,
        handle: tokio::runtime::Handle,
    ) -> Result<Self> {
        let reservation = MemoryConsumer::new("BalansExec").register(context.memory_pool());
        let method = spec.config.method.to_string();
        Ok(Self {
            spec,
            schema,
            context,
            tx,
            handle,
            reservation,
            summary: RunSummary {
                method,
                ..RunSummary::default()
            },
            stage_start: Instant::now(),
        })
    }

    fn cancelled(&self) -> bool {
        self.tx.is_closed()
    }

    fn check_cancel(&self) -> Result<()> {
        if self.cancelled() {
            Err(OperatorError::Cancelled)
        } else {
            Ok(())
        }
    }

    fn start_stage(&mut self, name: &str, total: Option<u64>) {
        self.stage_start = Instant::now();
        let name = format!("{}{name}", self.spec.pass_label());
        self.spec.progress.stage_started(&name, total);
    }

    fn end_stage(&mut self, name: &str) {
        let name = format!("{}{name}", self.spec.pass_label());
        self.summary.stages.push(StageTiming {
            stage: name.clone(),
            seconds: self.stage_start.elapsed().as_secs_f64(),
        });
        self.spec.progress.stage_finished(&name);
    }

    fn warn(&mut self, message: String) {
        self.spec.progress.warn(&message);
        self.summary.warnings.push(message);
    }

    fn reserve(&mut self, bytes: usize, what: &str) -> Result<()> {
        let pool = self.context.memory_pool().clone();
        self.reservation.try_grow(bytes).map_err(|_| {
            let free = match pool.memory_limit() {
                MemoryLimit::Finite(limit) => human_bytes(limit.saturating_sub(pool.reserved())),
                _ => "less".to_string(),
            };
            OperatorError::MemoryLimit(format!(
                "{what} needs {} more but only {free} of the memory limit is free (raise --memory-limit)",
                human_bytes(bytes),
            ))
        })
    }

    fn work_file(&self, what: &str) -> Result<WorkFile> {
        let guard = self
            .context
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

    fn execute(mut self, input: SendableRecordBatchStream) -> Result<()> {
        let d = self.spec.features.len();
        let pca_p = match self.spec.config.method {
            Method::Balans | Method::Harmony => self.spec.config.pca_components(d),
            Method::ComBat | Method::Sphering => None,
        };
        let ing = self.ingest(input, pca_p)?;
        let n = ing.batch_codes.len();

        // Batches sorted by key; offsets of the batch-grouped order.
        let mut order: Vec<usize> = (0..ing.batch_keys.len()).collect();
        order.sort_by(|&a, &b| ing.batch_keys[a].cmp(&ing.batch_keys[b]));
        let mut remap = vec![0u32; order.len()];
        for (new, &old) in order.iter().enumerate() {
            remap[old] = new as u32;
        }
        let codes: Vec<u32> = ing.batch_codes.iter().map(|&c| remap[c as usize]).collect();
        drop(ing.batch_codes);
        let keys: Vec<String> = order.iter().map(|&o| ing.batch_keys[o].clone()).collect();
        let mut sizes = vec![0usize; keys.len()];
        codes.iter().for_each(|&c| sizes[c as usize] += 1);
        self.summary.batches = keys.iter().cloned().zip(sizes.iter().copied()).collect();
        match self.spec.config.method {
            Method::ComBat => return self.run_combat(&ing.features, &ing.meta, &codes, &keys),
            Method::Sphering => return self.run_sphering(&ing.features, &ing.meta, n),
            Method::Harmony => {
                let inputs = (&ing.features, &ing.meta, ing.gram.as_ref());
                return self.run_harmony(inputs, pca_p, &codes, keys.len());
            }
            Method::Balans => {}
        }
        let k = self.spec.config.k;
        for (key, &size) in keys.iter().zip(&sizes) {
            if size <= k {
                self.warn(format!(
                    "batch '{key}' has {size} rows, fewer than k + 1 = {}: k is clipped to {} for it",
                    k + 1,
                    size.saturating_sub(1)
                ));
            }
        }
        let mut offsets = vec![0usize];
        for &s in &sizes {
            offsets.push(offsets.last().unwrap() + s);
        }
        // grouped position -> input row, and input row -> grouped position.
        let mut grouped: Vec<u32> = (0..n as u32).collect();
        grouped.sort_by_key(|&i| codes[i as usize]);
        let mut position = vec![0u32; n];
        for (g, &i) in grouped.iter().enumerate() {
            position[i as usize] = g as u32;
        }

        // PCA fit and reduced matrices.
        let model = self.fit_pca(pca_p, ing.gram.as_ref())?;

        self.start_stage("reduce", Some(n as u64));
        let features = MappedIpcFile::open(&ing.features.path)?;
        let feature_blocks = features.row_blocks()?;
        let needs_reduced_input = model.is_some() || self.spec.config.metric == Metric::Cosine;
        let reduced_input = if needs_reduced_input {
            let file = self.work_file("BALANS reduced rows")?;
            self.write_reduced(&feature_blocks, model.as_ref(), &file)?;
            Some((MappedIpcFile::open(&file.path)?, file))
        } else {
            None
        };
        let reduced_blocks = match &reduced_input {
            Some((f, _)) => f.row_blocks()?,
            None => feature_blocks.clone(),
        };
        let p = reduced_blocks.p();
        self.summary.distance_dims = p;
        let grouped_file = self.work_file("BALANS batch-grouped rows")?;
        {
            let mut w = MatrixWriter::create(&grouped_file.path, p)?;
            let chunk = self.spec.config.chunk_rows;
            for (c, idx) in grouped.chunks(chunk).enumerate() {
                self.check_cancel()?;
                let mut rows = Vec::with_capacity(idx.len() * p);
                for &i in idx {
                    rows.extend_from_slice(reduced_blocks.row(i as usize));
                }
                w.append(rows)?;
                self.spec
                    .progress
                    .stage_progress(((c + 1) * chunk).min(n) as u64, None);
            }
            w.finish()?;
        }
        let grouped_map = MappedIpcFile::open(&grouped_file.path)?;
        let z = grouped_map.row_blocks()?;
        self.end_stage("reduce");

        // Sampling loop.
        let cfg = self.spec.config.clone();
        self.reserve(
            n * 8 * 3 + n + 64 * 1024,
            "the landmark sampler (3 x f64 + 1 byte per row)",
        )?;
        let max_landmarks = cfg.max_landmarks.unwrap_or(usize::MAX);
        self.start_stage("sample", Some(n as u64));
        let params = SamplingParams {
            k: cfg.k,
            block: cfg.block,
            tau: cfg.tau,
            max_landmarks,
            seed: cfg.seed,
            elbow: ElbowParams {
                rule: cfg.elbow,
                a_min: cfg.a_min,
                bins: cfg.bins,
                r_min: cfg.r_min(),
                min_threshold: cfg.min_threshold(),
            },
        };
        let progress = self.spec.progress.clone();
        let tx = self.tx.clone();
        let sampling = sample_landmarks(
            &z,
            &offsets,
            &params,
            None,
            &|| tx.is_closed(),
            &mut |m, covered| {
                progress.stage_progress(covered as u64, Some(format!("{m} landmarks")));
            },
        )?;
        let m = sampling.landmarks.len();
        self.summary.landmarks = m;
        self.summary.distinct_landmarks = {
            let mut idx: Vec<usize> = sampling.landmarks.iter().map(|l| l.index).collect();
            idx.sort_unstable();
            idx.dedup();
            idx.len()
        };
        self.summary.nnz = sampling.nnz();
        self.summary.mean_kept_per_row = sampling.nnz() as f64 / m.max(1) as f64;
        self.summary.stop_reason = sampling.stop.to_string();
        self.summary.steps_to_full_coverage = sampling.steps_to_full_coverage;
        self.end_stage("sample");

        // Smoothing pass 1: Y = A_S X over the output-space matrix, streamed in input order.
        let x_blocks = match self.spec.output_space() {
            OutputSpace::Features => feature_blocks.clone(),
            OutputSpace::Pca => match &reduced_input {
                Some((f, _)) => f.row_blocks()?,
                None => {
                    return Err(OperatorError::InvalidParameter(
                        "--output-space pca needs PCA".into(),
                    ));
                }
            },
        };
        let dx = x_blocks.p();
        let groups = if cfg.variant.per_batch() {
            offsets.len() - 1
        } else {
            1
        };
        self.reserve(
            SmoothAccumulator::size_bytes(m, dx, groups) * 2
                + m * m * 8 * (cfg.estimator == crate::config::Estimator::Nystrom) as usize,
            "Y = A_S X (landmarks x output columns)",
        )?;
        self.start_stage("smooth", Some(n as u64));
        let landmarks = sampling.landmarks;
        drop(sampling.covered);
        let point = |i: usize| -> PointRef<'_> { (z.row(position[i] as usize), codes[i] as usize) };
        let mut acc = SmoothAccumulator::new(&landmarks, dx, cfg.variant);
        let chunk = cfg.chunk_rows;
        let mut done = 0usize;
        while done < n {
            self.check_cancel()?;
            let end = (done + chunk).min(n);
            let points: Vec<PointRef<'_>> = (done..end).map(point).collect();
            let x = gather_rows(&x_blocks, done, end);
            acc.add_chunk(&landmarks, &points, &x);
            done = end;
            self.spec.progress.stage_progress(done as u64, None);
        }
        let grouped_ref = &grouped;
        let fitted = acc.finish(&cfg.smooth_options(), &landmarks, |g| {
            codes[grouped_ref[g] as usize] as usize
        });
        self.end_stage("smooth");

        // Smoothing pass 2: corrected rows joined with the metadata, in input order.
        let mut uncovered = 0usize;
        self.write_pass(&ing.meta, n, dx, |start, stop| {
            let points: Vec<PointRef<'_>> = (start..stop).map(point).collect();
            let x = gather_rows(&x_blocks, start, stop);
            let mut out = vec![0.0f32; x.len()];
            let mut covered = vec![false; stop - start];
            let (unc, _) = fitted.apply_chunk(&landmarks, &points, &x, &mut out, &mut covered);
            uncovered += unc;
            (out, covered)
        })?;
        self.summary.uncovered = uncovered;
        self.summary.coverage = (n - uncovered) as f64 / n as f64;
        self.summary.rows = n;
        if uncovered > 0 {
            self.warn(format!("{uncovered} rows are covered by no landmark and keep their input values (see {COVERED_COLUMN})"));
        }
        self.spec.progress.finished(&self.summary);
        Ok(())
    }

    /// ComBat over the ingested working files: one pass for the per-batch moments (input
    /// order), the empirical-Bayes fit, one pass writing the corrected rows.
    fn run_combat(
        &mut self,
        features: &WorkFile,
        meta: &WorkFile,
        codes: &[u32],
        keys: &[String],
    ) -> Result<()> {
        let n = codes.len();
        let d = self.spec.features.len();
        let chunk = self.spec.config.chunk_rows;
        self.reserve(
            keys.len() * (d * 2 + 1) * 8 * 2,
            "ComBat's per-batch moments and estimates (batches x features)",
        )?;
        self.start_stage("fit", Some(n as u64));
        let features = MappedIpcFile::open(&features.path)?;
        let blocks = features.row_blocks()?;
        let mut moments = BatchMoments::new(keys.len(), d);
        let mut row64 = vec![0.0f64; d];
        let mut done = 0usize;
        while done < n {
            self.check_cancel()?;
            let end = (done + chunk).min(n);
            for (i, &code) in codes.iter().enumerate().take(end).skip(done) {
                row64
                    .iter_mut()
                    .zip(blocks.row(i))
                    .for_each(|(o, &v)| *o = f64::from(v));
                moments.add_row(code as usize, &row64);
            }
            done = end;
            self.spec.progress.stage_progress(done as u64, None);
        }
        let model = fit_combat(&moments, keys)?;
        self.end_stage("fit");

        self.write_rows(&blocks, meta, |start, rows, out| {
            for (r, (row, o)) in rows
                .chunks(d.max(1))
                .zip(out.chunks_mut(d.max(1)))
                .enumerate()
            {
                model.apply_row(codes[start + r] as usize, row, o);
            }
        })?;
        self.summary.stop_reason = format!("{} batches, empirical Bayes", keys.len());
        self.finish_linear(n, d)
    }

    /// Sphering over the ingested working files: one pass over the fit rows (the
    /// `fit_mask` column, in input order), the fit, one pass writing the whitened rows.
    fn run_sphering(&mut self, features: &WorkFile, meta: &WorkFile, n: usize) -> Result<()> {
        let d = self.spec.features.len();
        let mask = self.spec.fit_mask.clone().ok_or_else(|| {
            OperatorError::InvalidParameter(
                "sphering is fitted on negative controls: give --negcon PREDICATE".into(),
            )
        })?;
        self.reserve(
            SpheringAccumulator::size_bytes(d) * 2 + d * d * 8,
            "the sphering state (features x features)",
        )?;
        self.start_stage("fit", Some(n as u64));
        let features = MappedIpcFile::open(&features.path)?;
        let blocks = features.row_blocks()?;
        let meta_map = MappedIpcFile::open(&meta.path)?;
        let mask_idx = meta_map.schema().index_of(&mask)?;
        let mut acc = SpheringAccumulator::new(d);
        let mut row = 0usize;
        let mut fit_rows: Vec<f64> = Vec::new();
        for mb in meta_map.batches() {
            self.check_cancel()?;
            let flags = mb.column(mask_idx).as_boolean();
            for r in 0..mb.num_rows() {
                if flags.is_valid(r) && flags.value(r) {
                    fit_rows.extend(blocks.row(row + r).iter().map(|&v| f64::from(v)));
                }
            }
            acc.add_rows(&fit_rows);
            fit_rows.clear();
            row += mb.num_rows();
            self.spec.progress.stage_progress(row as u64, None);
        }
        let cfg = &self.spec.config;
        let model = acc.fit(cfg.sphering, cfg.epsilon, &self.spec.features)?;
        self.end_stage("fit");
        self.write_rows(&blocks, meta, |_, rows, out| model.apply_rows(rows, out))?;
        self.summary.stop_reason = format!("{} negative-control rows", model.n);
        self.finish_linear(n, d)
    }

    /// The "pca" stage: the top `pca_p` axes from the ingest's Gram state (none without PCA).
    fn fit_pca(
        &mut self,
        pca_p: Option<usize>,
        gram: Option<&GramAccumulator>,
    ) -> Result<Option<PcaModel>> {
        self.start_stage("pca", None);
        let model = match (pca_p, gram) {
            (Some(p), Some(g)) => Some(g.finish(p)),
            _ => None,
        };
        self.summary.pca_components = model.as_ref().map_or(0, |m| m.p);
        self.end_stage("pca");
        self.check_cancel()?;
        Ok(model)
    }

    /// Harmony over the PCA coordinates (or the features): PCA fit, the reduced rows, the
    /// Harmony iterations in memory (the embedding and the `N x K` assignments and
    /// distances are reserved), one pass writing the corrected coordinates.
    fn run_harmony(
        &mut self,
        (features, meta, gram): (&WorkFile, &WorkFile, Option<&GramAccumulator>),
        pca_p: Option<usize>,
        codes: &[u32],
        n_batches: usize,
    ) -> Result<()> {
        let n = codes.len();
        let model = self.fit_pca(pca_p, gram)?;

        self.start_stage("reduce", Some(n as u64));
        let features = MappedIpcFile::open(&features.path)?;
        let feature_blocks = features.row_blocks()?;
        let reduced = self.work_file("Harmony input coordinates")?;
        self.write_reduced(&feature_blocks, model.as_ref(), &reduced)?;
        let reduced_map = MappedIpcFile::open(&reduced.path)?;
        let z_blocks = reduced_map.row_blocks()?;
        let p = z_blocks.p();
        self.end_stage("reduce");

        let seed = u32::try_from(self.spec.config.seed).map_err(|_| {
            OperatorError::InvalidParameter("harmony's seed must fit in 32 bits".into())
        })?;
        let params = self.spec.config.harmony.params(seed);
        let clusters = params.clusters.unwrap_or_else(|| default_clusters(n));
        self.reserve(
            n * p * 4 * 2 + n * clusters * 4 * 3 + n * 8,
            "Harmony's state (2 x N x d coordinates, N x K assignments and distances)",
        )?;
        let z = gather_rows(&z_blocks, 0, n);
        self.start_stage("harmony", Some(params.max_iter_harmony as u64));
        let progress = self.spec.progress.clone();
        let tx = self.tx.clone();
        let out = harmonize(
            &z,
            p,
            codes,
            n_batches,
            &params,
            &|| tx.is_closed(),
            &mut |iteration, objective| {
                progress
                    .stage_progress(iteration as u64, Some(format!("objective {objective:.2}")));
            },
        )?;
        drop(z);
        self.end_stage("harmony");
        self.summary.stop_reason = format!(
            "{} clusters, {} iterations ({})",
            out.clusters,
            out.iterations,
            if out.converged {
                "converged"
            } else {
                "iteration limit"
            }
        );
        let corrected = out.z_corr;
        self.write_pass(meta, n, p, |start, stop| {
            (
                corrected[start * p..stop * p].to_vec(),
                vec![true; stop - start],
            )
        })?;
        self.finish_linear(n, p)
    }

    /// The write pass of the per-row methods: `apply(first row, chunk rows as f64, out)` for
    /// every chunk of rows (row-major) in input order.
    fn write_rows(
        &mut self,
        blocks: &RowBlocks<'_>,
        meta: &WorkFile,
        apply: impl Fn(usize, &[f64], &mut [f64]),
    ) -> Result<()> {
        let d = self.spec.features.len();
        self.write_pass(meta, blocks.n(), d, |start, stop| {
            let rows64: Vec<f64> = (start..stop)
                .flat_map(|i| blocks.row(i).iter().map(|&v| f64::from(v)))
                .collect();
            let mut out64 = vec![0.0f64; rows64.len()];
            apply(start, &rows64, &mut out64);
            let out = out64.iter().map(|&v| v as f32).collect();
            (out, vec![true; stop - start])
        })
    }

    /// The write stage every method ends with: for each chunk of rows `[start, stop)` in input
    /// order, `produce` gives the `dx` output values per row and the covered flags; they are
    /// joined with the metadata rows and sent downstream.
    fn write_pass(
        &mut self,
        meta: &WorkFile,
        n: usize,
        dx: usize,
        mut produce: impl FnMut(usize, usize) -> (Vec<f32>, Vec<bool>),
    ) -> Result<()> {
        let chunk = self.spec.config.chunk_rows;
        self.start_stage("write", Some(n as u64));
        let meta = MappedIpcFile::open(&meta.path)?;
        let plan = self.output_columns(meta.schema())?;
        let mut row = 0usize;
        for mb in meta.batches() {
            let end = row + mb.num_rows();
            let mut start = row;
            while start < end {
                self.check_cancel()?;
                let stop = (start + chunk).min(end);
                let (out, covered) = produce(start, stop);
                let meta_slice = mb.slice(start - row, stop - start);
                let batch = self.assemble(&plan, &meta_slice, &out, dx, covered)?;
                if self.tx.blocking_send(Ok(batch)).is_err() {
                    return Err(OperatorError::Cancelled);
                }
                start = stop;
                self.spec.progress.stage_progress(start as u64, None);
            }
            row = end;
        }
        self.end_stage("write");
        Ok(())
    }

    /// Completes the summary of a per-row method and reports it.
    fn finish_linear(&mut self, n: usize, d: usize) -> Result<()> {
        self.summary.rows = n;
        self.summary.coverage = 1.0;
        self.summary.distance_dims = d;
        self.spec.progress.finished(&self.summary);
        Ok(())
    }

    /// Streams the input once: writes the working files and collects batch codes, PCA state
    /// and data checks.
    fn ingest(
        &mut self,
        mut input: SendableRecordBatchStream,
        pca_p: Option<usize>,
    ) -> Result<Ingested> {
        self.start_stage("ingest", None);
        let in_schema = input.schema();
        let d = self.spec.features.len();
        let feature_idx: Vec<usize> = self
            .spec
            .features
            .iter()
            .map(|f| in_schema.index_of(f))
            .collect::<std::result::Result<_, _>>()?;
        let batch_idx: Vec<usize> = self
            .spec
            .batch
            .iter()
            .map(|f| in_schema.index_of(f))
            .collect::<std::result::Result<_, _>>()?;
        let meta_idx: Vec<usize> = (0..in_schema.fields().len())
            .filter(|i| !feature_idx.contains(i))
            .collect();
        let meta_schema = Arc::new(in_schema.project(&meta_idx)?);
        let features = self.work_file("BALANS features")?;
        let meta = self.work_file("BALANS metadata")?;
        let mut fw = MatrixWriter::create(&features.path, d)?;
        let mut mw = BatchWriter::create(&meta.path, &meta_schema)?;
        let mut codes: Vec<u32> = Vec::new();
        let mut key_index: HashMap<String, u32> = HashMap::new();
        let mut keys: Vec<String> = Vec::new();
        let mut non_finite = vec![0usize; d];
        let mut min = vec![f32::INFINITY; d];
        let mut max = vec![f32::NEG_INFINITY; d];
        let mut gram: Option<GramAccumulator> = None;
        if pca_p.is_some() {
            self.reserve(
                GramAccumulator::size_bytes(d),
                "the PCA state (features x features)",
            )?;
        }
        let policy = self.spec.config.nan;
        let mut dropped = 0usize;
        let mut rows_seen = 0usize;
        loop {
            // Wait for the next input batch, or for the consumer to go away: a chained
            // earlier pass stops as soon as this one is cancelled.
            let tx = self.tx.clone();
            let next = self.handle.block_on(async {
                tokio::select! {
                    batch = input.next() => Some(batch),
                    _ = tx.closed() => None,
                }
            });
            let Some(Some(batch)) = next else {
                if next.is_none() {
                    return Err(OperatorError::Cancelled);
                }
                break;
            };
            self.check_cancel()?;
            let batch = batch?;
            let r = batch.num_rows();
            if r == 0 {
                continue;
            }
            // Row-major f32 features, non-finite bookkeeping.
            let mut rows = vec![0.0f32; r * d];
            let mut bad_row = vec![false; r];
            for (f, &ci) in feature_idx.iter().enumerate() {
                let col = cast(batch.column(ci), &DataType::Float32)?;
                let col = col.as_primitive::<Float32Type>();
                for (i, v) in col.iter().enumerate() {
                    let v = v.unwrap_or(f32::NAN);
                    if !v.is_finite() {
                        non_finite[f] += 1;
                        bad_row[i] = true;
                    }
                    rows[i * d + f] = v;
                }
            }
            let (batch, rows) = match policy {
                NanPolicy::DropRows if bad_row.iter().any(|&b| b) => {
                    let keep: BooleanArray = bad_row.iter().map(|&b| Some(!b)).collect();
                    dropped += bad_row.iter().filter(|&&b| b).count();
                    let kept_rows: Vec<f32> = rows
                        .chunks_exact(d)
                        .zip(&bad_row)
                        .filter(|(_, b)| !**b)
                        .flat_map(|(r, _)| r.iter().copied())
                        .collect();
                    (filter_record_batch(&batch, &keep)?, kept_rows)
                }
                NanPolicy::Zero => {
                    let mut rows = rows;
                    rows.iter_mut()
                        .filter(|v| !v.is_finite())
                        .for_each(|v| *v = 0.0);
                    (batch, rows)
                }
                _ => (batch, rows),
            };
            let r = batch.num_rows();
            if r == 0 {
                continue;
            }
            for row in rows.chunks_exact(d) {
                for (f, &v) in row.iter().enumerate() {
                    if v.is_finite() {
                        min[f] = min[f].min(v);
                        max[f] = max[f].max(v);
                    }
                }
            }
            // Batch keys.
            let key_cols: Vec<ArrayRef> = batch_idx
                .iter()
                .map(|&i| cast(batch.column(i), &DataType::Utf8))
                .collect::<std::result::Result<_, _>>()?;
            let mut key = String::new();
            for i in 0..r {
                key.clear();
                for (c, col) in key_cols.iter().enumerate() {
                    if c > 0 {
                        key.push('/');
                    }
                    let s = col.as_string::<i32>();
                    if s.is_null(i) {
                        key.push_str("NULL")
                    } else {
                        key.push_str(s.value(i))
                    }
                }
                let code = match key_index.get(&key) {
                    Some(&c) => c,
                    None => {
                        let c = keys.len() as u32;
                        key_index.insert(key.clone(), c);
                        keys.push(key.clone());
                        c
                    }
                };
                codes.push(code);
            }
            if pca_p.is_some() {
                let g = gram.get_or_insert_with(|| {
                    GramAccumulator::new(rows[..d].iter().map(|&v| v as f64).collect())
                });
                for part in rows.chunks(1024 * d) {
                    g.update(part);
                }
            }
            self.reserve(r * 4, "batch codes")?;
            fw.append(rows)?;
            mw.write(&batch.project(&meta_idx)?)?;
            rows_seen += r;
            self.spec.progress.stage_progress(rows_seen as u64, None);
        }
        fw.finish()?;
        mw.finish()?;
        self.summary.dropped_rows = dropped;
        self.summary.features = d;
        let bad: Vec<(String, usize)> = self
            .spec
            .features
            .iter()
            .cloned()
            .zip(non_finite.iter().copied())
            .filter(|(_, c)| *c > 0)
            .collect();
        if policy == NanPolicy::Error && !bad.is_empty() {
            let shown: Vec<String> = bad
                .iter()
                .take(10)
                .map(|(n, c)| format!("{n} ({c})"))
                .collect();
            return Err(OperatorError::BadInput(format!(
                "{} feature column(s) hold NaN, infinite or null values: {}{}; choose --nan drop-rows or --nan zero, or exclude the columns",
                bad.len(),
                shown.join(", "),
                if bad.len() > 10 { ", ..." } else { "" }
            )));
        }
        if rows_seen == 0 {
            return Err(OperatorError::BadInput(if dropped > 0 {
                format!("every row ({dropped}) has a non-finite feature; nothing left to correct")
            } else {
                "the input has no rows".to_string()
            }));
        }
        if keys.len() < 2 && self.spec.config.method != Method::Sphering {
            return Err(OperatorError::BadInput(format!(
                "only one batch ('{}') in column(s) {}: batch correction needs at least two batches",
                keys[0],
                self.spec.batch.join(", ")
            )));
        }
        let constant: Vec<String> = self
            .spec
            .features
            .iter()
            .enumerate()
            .filter(|&(f, _)| min[f] >= max[f])
            .map(|(_, n)| n.clone())
            .collect();
        if constant.len() == d {
            return Err(OperatorError::BadInput(
                "every feature column is constant: there is nothing to correct".into(),
            ));
        }
        if !constant.is_empty() {
            let shown: Vec<&str> = constant.iter().take(5).map(|s| s.as_str()).collect();
            self.warn(format!(
                "{} constant feature column(s) pass through unchanged: {}{}",
                constant.len(),
                shown.join(", "),
                if constant.len() > 5 { ", ..." } else { "" }
            ));
        }
        self.summary.constant_features = constant;
        self.end_stage("ingest");
        Ok(Ingested {
            features,
            meta,
            batch_codes: codes,
            batch_keys: keys,
            gram,
        })
    }

    /// Writes the reduced rows (PCA projection and/or L2 normalisation) in input order.
    fn write_reduced(
        &mut self,
        features: &RowBlocks<'_>,
        model: Option<&PcaModel>,
        file: &WorkFile,
    ) -> Result<()> {
        let d = features.p();
        let p = model.map_or(d, |m| m.p);
        let cosine = self.spec.config.metric == Metric::Cosine;
        let mut w = MatrixWriter::create(&file.path, p)?;
        let n = features.n();
        let chunk = self.spec.config.chunk_rows;
        let mut start = 0;
        while start < n {
            self.check_cancel()?;
            let end = (start + chunk).min(n);
            let x = gather_rows(features, start, end);
            let mut z = match model {
                Some(model) => {
                    let mut z = vec![0.0f32; (end - start) * p];
                    z.par_chunks_mut(p * 256)
                        .zip(x.par_chunks(d * 256))
                        .for_each(|(zo, xi)| model.project(xi, zo));
                    z
                }
                None => x,
            };
            if cosine {
                l2_normalize_rows(&mut z, p);
            }
            w.append(z)?;
            start = end;
        }
        w.finish()?;
        Ok(())
    }

    /// Where each output column comes from, in output-schema order.
    fn output_columns(&self, meta_schema: &Schema) -> Result<Vec<OutputColumn>> {
        let mut next_value = 0usize;
        self.schema
            .fields()
            .iter()
            .map(|field| {
                let name = field.name().as_str();
                if name == COVERED_COLUMN && self.spec.emits_covered_column() {
                    return Ok(OutputColumn::Covered);
                }
                let value = match self.spec.output_space() {
                    OutputSpace::Features => self.spec.features.iter().position(|f| f == name),
                    OutputSpace::Pca if meta_schema.index_of(name).is_err() => {
                        next_value += 1;
                        Some(next_value - 1)
                    }
                    OutputSpace::Pca => None,
                };
                Ok(match value {
                    Some(f) => OutputColumn::Value(f),
                    None => OutputColumn::Meta(meta_schema.index_of(name)?),
                })
            })
            .collect()
    }

    /// Builds one output batch from metadata rows and corrected values.
    fn assemble(
        &self,
        plan: &[OutputColumn],
        meta: &RecordBatch,
        values: &[f32],
        d: usize,
        covered: Vec<bool>,
    ) -> Result<RecordBatch> {
        let r = meta.num_rows();
        let columns: Vec<ArrayRef> = plan
            .iter()
            .map(|c| -> ArrayRef {
                match *c {
                    OutputColumn::Covered => Arc::new(BooleanArray::from(covered.clone())),
                    OutputColumn::Meta(i) => meta.column(i).clone(),
                    OutputColumn::Value(f) => Arc::new(Float32Array::from(
                        (0..r).map(|i| values[i * d + f]).collect::<Vec<f32>>(),
                    )),
                }
            })
            .collect();
        Ok(RecordBatch::try_new(self.schema.clone(), columns)?)
    }
}

/// The source of one output column.
#[derive(Debug, Clone, Copy)]
enum OutputColumn {
    /// A metadata column (index in the metadata working file).
    Meta(usize),
    /// Corrected value column `f`.
    Value(usize),
    /// The coverage flag.
    Covered,
}

/// Copies rows `start..end` of a blocked matrix into one row-major vector.
fn gather_rows(blocks: &RowBlocks<'_>, start: usize, end: usize) -> Vec<f32> {
    let p = blocks.p();
    let mut out = Vec::with_capacity((end - start) * p);
    for i in start..end {
        out.extend_from_slice(blocks.row(i));
    }
    out
}

fn human_bytes(b: usize) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}
