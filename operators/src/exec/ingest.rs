//! `BalansIngestExec`: spools each input partition into memory-mapped working files.
//!
//! Per input partition (all partitions run concurrently), the rows are read once: features are
//! cast to `f32` and written row-major to a matrix file, every other column to a metadata
//! file, in input order. On the way it applies the NaN policy, records per-feature
//! non-finite counts and finite ranges, the batch key of every row (a local dictionary) and
//! the fit-row flags. Every later step of the pass reads the mappings; the emitted batch is a
//! one-row partial `(partition, rows)` for the profile step.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray};
use datafusion::arrow::compute::{cast, filter_record_batch};
use datafusion::arrow::datatypes::{DataType, Float32Type};
use datafusion::error::{DataFusionError, Result as DFResult};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::ExecutionPlanProperties;
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::StreamExt;

use crate::config::NanPolicy;
use crate::error::{OperatorError, Result};
use crate::exec::common::{plan_properties, single_child};
use crate::exec::context::{CancelFlag, PassContext, SpoolPartition};
use crate::exec::step::{partial_batch, partial_schema, run_blocking};
use crate::io::mmap_ipc::{BatchWriter, MatrixWriter};

/// Stage name of the ingest (and of the profile step that closes it).
pub const INGEST_STAGE: &str = "ingest";

/// Spools the input partitions of a correction pass (see the module docs).
#[derive(Debug)]
pub struct BalansIngestExec {
    ctx: Arc<PassContext>,
    input: Arc<dyn ExecutionPlan>,
    cache: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl BalansIngestExec {
    /// Spools `input`'s partitions for the pass `ctx`.
    pub fn new(ctx: Arc<PassContext>, input: Arc<dyn ExecutionPlan>) -> Self {
        Self {
            cache: plan_properties(partial_schema(), ctx.partitions),
            ctx,
            input,
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }
}

impl DisplayAs for BalansIngestExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let spec = &self.ctx.spec;
        match t {
            DisplayFormatType::TreeRender => write!(f, "partitions={}", self.ctx.partitions),
            _ => write!(
                f,
                "BalansIngestExec: {}partitions={}, features={}, batch=[{}], {}",
                spec.pass_label(),
                self.ctx.partitions,
                spec.features.len(),
                spec.batch.join(", "),
                spec.config.describe()
            ),
        }
    }
}

impl ExecutionPlan for BalansIngestExec {
    fn name(&self) -> &str {
        "BalansIngestExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.cache
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

    crate::no_physical_expressions!();

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DFResult<Arc<dyn ExecutionPlan>> {
        let input = single_child("BalansIngestExec", children)?;
        if input.output_partitioning().partition_count() != self.ctx.partitions {
            return Err(DataFusionError::Internal(
                "BalansIngestExec's input changed its partitioning".into(),
            ));
        }
        Ok(Arc::new(Self::new(self.ctx.clone(), input)))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DFResult<SendableRecordBatchStream> {
        if partition >= self.ctx.partitions {
            return Err(DataFusionError::Internal(format!(
                "BalansIngestExec has {} partitions, got {partition}",
                self.ctx.partitions
            )));
        }
        self.ctx.bind(&context);
        let input = self.input.execute(partition, context)?;
        let ctx = self.ctx.clone();
        let handle = tokio::runtime::Handle::current();
        let fut = async move {
            let flag = ctx.abort.clone();
            let rows = run_blocking(flag, move || {
                ctx.stage_begin(INGEST_STAGE, ctx.partitions + 1, None);
                let out = spool_partition(&ctx, partition, input, &handle, None);
                if let Err(e) = &out {
                    ctx.abort.fail(e);
                }
                ctx.stage_end(INGEST_STAGE);
                out
            })
            .await?;
            Ok::<_, DataFusionError>(partial_batch(partition, rows, Vec::new())?)
        };
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            partial_schema(),
            futures::stream::once(fut),
        )))
    }
}

/// Waits for the next input batch, or gives up once the pass is aborted.
fn next_batch(
    input: &mut SendableRecordBatchStream,
    cancel: &CancelFlag,
    handle: &tokio::runtime::Handle,
) -> Result<Option<datafusion::arrow::array::RecordBatch>> {
    handle.block_on(async {
        loop {
            tokio::select! {
                batch = input.next() => return Ok(batch.transpose()?),
                _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {
                    cancel.check()?;
                }
            }
        }
    })
}

/// Streams input partition `i` into its working files and records it in `ctx`; with `limit`,
/// only its first `limit` kept rows (a cluster task reads the head of the next partitions so).
pub fn spool_partition(
    ctx: &PassContext,
    i: usize,
    mut input: SendableRecordBatchStream,
    handle: &tokio::runtime::Handle,
    limit: Option<usize>,
) -> Result<usize> {
    let spec = &ctx.spec;
    let in_schema = input.schema();
    let d = spec.features.len();
    let index = |name: &String| {
        in_schema
            .index_of(name)
            .map_err(|_| OperatorError::BadInput(format!("column '{name}' is not in the input")))
    };
    let feature_idx: Vec<usize> = spec.features.iter().map(index).collect::<Result<_>>()?;
    let batch_idx: Vec<usize> = spec.batch.iter().map(index).collect::<Result<_>>()?;
    let mask_idx = spec.fit_mask.as_ref().map(index).transpose()?;
    let label_idx = spec.anchor_label.as_ref().map(index).transpose()?;
    let mut labels: Option<(Vec<u32>, Vec<String>)> = label_idx.map(|_| (Vec::new(), Vec::new()));
    let mut label_index: HashMap<String, u32> = HashMap::new();
    let meta_idx: Vec<usize> = (0..in_schema.fields().len())
        .filter(|i| !feature_idx.contains(i))
        .collect();
    let meta_schema = Arc::new(in_schema.project(&meta_idx)?);
    let features = ctx.work_file("BALANS features")?;
    let meta = ctx.work_file("BALANS metadata")?;
    let mut fw = MatrixWriter::create(&features.path, d)?;
    let mut mw = BatchWriter::create(&meta.path, &meta_schema)?;
    let mut codes: Vec<u32> = Vec::new();
    let mut key_index: HashMap<String, u32> = HashMap::new();
    let mut keys: Vec<String> = Vec::new();
    let mut non_finite = vec![0usize; d];
    let mut min = vec![f32::INFINITY; d];
    let mut max = vec![f32::NEG_INFINITY; d];
    let mut fit_mask: Option<Vec<bool>> = mask_idx.map(|_| Vec::new());
    let policy = spec.config.nan;
    let mut dropped = 0usize;
    let cancel = ctx.abort.clone();
    let mut key = String::new();
    while limit.is_none_or(|l| codes.len() < l) {
        let Some(batch) = next_batch(&mut input, &cancel, handle)? else {
            break;
        };
        cancel.check()?;
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
            for (k, v) in col.iter().enumerate() {
                let v = v.unwrap_or(f32::NAN);
                if !v.is_finite() {
                    non_finite[f] += 1;
                    bad_row[k] = true;
                }
                rows[k * d + f] = v;
            }
        }
        let (batch, rows) = match policy {
            NanPolicy::DropRows if bad_row.iter().any(|&b| b) => {
                let keep: BooleanArray = bad_row.iter().map(|&b| Some(!b)).collect();
                dropped += bad_row.iter().filter(|&&b| b).count();
                let kept_rows: Vec<f32> = rows
                    .chunks_exact(d.max(1))
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
        let (batch, rows) = match limit {
            Some(l) if codes.len() + batch.num_rows() > l => {
                let left = l - codes.len();
                (batch.slice(0, left), rows[..left * d].to_vec())
            }
            _ => (batch, rows),
        };
        let r = batch.num_rows();
        if r == 0 {
            continue;
        }
        for row in rows.chunks_exact(d.max(1)) {
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
            .map(|&c| cast(batch.column(c), &DataType::Utf8))
            .collect::<std::result::Result<_, _>>()?;
        for k in 0..r {
            key.clear();
            for (c, col) in key_cols.iter().enumerate() {
                if c > 0 {
                    key.push('/');
                }
                let s = col.as_string::<i32>();
                if s.is_null(k) {
                    key.push_str("NULL")
                } else {
                    key.push_str(s.value(k))
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
        if let (Some(mask), Some(c)) = (fit_mask.as_mut(), mask_idx) {
            let flags = batch.column(c).as_boolean();
            mask.extend((0..r).map(|k| flags.is_valid(k) && flags.value(k)));
        }
        if let (Some((codes, keys)), Some(c)) = (labels.as_mut(), label_idx) {
            let col = cast(batch.column(c), &DataType::Utf8)?;
            let col = col.as_string::<i32>();
            for k in 0..r {
                if col.is_null(k) {
                    codes.push(u32::MAX);
                    continue;
                }
                let v = col.value(k);
                let code = match label_index.get(v) {
                    Some(&c) => c,
                    None => {
                        let c = keys.len() as u32;
                        label_index.insert(v.to_string(), c);
                        keys.push(v.to_string());
                        c
                    }
                };
                codes.push(code);
            }
        }
        ctx.reserve(
            r * (4 + fit_mask.is_some() as usize + 4 * labels.is_some() as usize),
            "batch codes (4 bytes per row)",
        )?;
        fw.append(rows)?;
        mw.write(&batch.project(&meta_idx)?)?;
        ctx.stage_progress(INGEST_STAGE, r as u64, None);
    }
    fw.finish()?;
    mw.finish()?;
    let rows = codes.len();
    ctx.set_spool(
        i,
        SpoolPartition::new(
            features, meta, dropped, codes, keys, non_finite, min, max, fit_mask,
        )?
        .with_labels(labels),
    )?;
    Ok(rows)
}
