//! `BalansReduceExec`: the coordinates distances are computed on, per partition, and the
//! landmark sample.
//!
//! Every row is projected once onto the PCA axes (and/or L2-normalised for the cosine metric)
//! into a mapped working file, so the sampling, smoothing and write steps see the same bits
//! for a row. Rows of the landmark sample are emitted as `(row, batch, z)`: a stratified
//! uniform sample of about [`crate::config::BalansConfig::sample_rows`] rows, chosen per row by
//! a seeded hash of its global row number (so the sample does not depend on the partitioning);
//! every batch keeps at least `4 (k + 1)` rows, or all of its rows. With no sample size, or
//! fewer rows than it, every row is in the sample.

use std::sync::Arc;

use datafusion::arrow::array::{
    FixedSizeListArray, Float32Array, RecordBatch, UInt32Array, UInt64Array,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use rayon::prelude::*;

use crate::config::{Method, Metric};
use crate::error::Result;
use crate::exec::context::{CancelFlag, PassContext, Profile, ReducedPartition};
use crate::exec::step::{PartitionStep, PartitionStepExec};
use crate::io::mmap_ipc::MatrixWriter;
use crate::kernels::distance::l2_normalize_rows;
use crate::kernels::exact::{in_row_sample, rate_threshold};

/// Stage name of the reduce step.
pub const REDUCE_STAGE: &str = "reduce";

/// The reduce step (see the module docs).
#[derive(Debug, Default, Clone, Copy)]
pub struct ReduceStep;

/// The reduce operator.
pub type BalansReduceExec = PartitionStepExec<ReduceStep>;

/// Columns of the coordinates distances use in a pass (PCA components or features).
pub fn distance_dims(ctx: &PassContext) -> usize {
    let d = ctx.spec.features.len();
    ctx.spec.config.pca_components(d).unwrap_or(d)
}

/// Whether the reduce step writes coordinates of its own (PCA or cosine).
pub fn writes_coordinates(ctx: &PassContext) -> bool {
    let d = ctx.spec.features.len();
    ctx.spec.config.pca_components(d).is_some() || ctx.spec.config.metric == Metric::Cosine
}

/// Schema of the sample rows.
pub fn sample_schema(p: usize) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("row", DataType::UInt64, false),
        Field::new("batch", DataType::UInt32, false),
        Field::new(
            "z",
            DataType::FixedSizeList(
                Arc::new(Field::new("item", DataType::Float32, false)),
                p as i32,
            ),
            false,
        ),
    ]))
}

/// Per batch: the hash threshold of the landmark sample (`u64::MAX`: every row).
pub fn sample_thresholds(ctx: &PassContext, profile: &Profile) -> Vec<u64> {
    stratum_thresholds(ctx, profile, &profile.batch_sizes)
}

/// Per batch: the hash threshold of the anchor rows of the landmark sample. Anchors are kept
/// at the batch's rate, or more where that would leave fewer than `4 (k + 1)` anchors of the
/// batch in the sample (their per-batch scales are measured there).
pub fn anchor_sample_thresholds(ctx: &PassContext, profile: &Profile) -> Vec<u64> {
    stratum_thresholds(ctx, profile, &profile.anchors_per_batch)
}

fn stratum_thresholds(ctx: &PassContext, profile: &Profile, sizes: &[usize]) -> Vec<u64> {
    let cfg = &ctx.spec.config;
    let n = profile.rows;
    match cfg.sample_rows {
        Some(target) if n > target => sizes
            .iter()
            .zip(&profile.batch_sizes)
            .map(|(&size, &nb)| {
                let rate = (target as f64 / n as f64)
                    .max(cfg.min_sample_rows_per_batch() as f64 / nb.max(1) as f64)
                    .max(cfg.min_sample_rows_per_batch() as f64 / size.max(1) as f64);
                rate_threshold(rate)
            })
            .collect(),
        _ => vec![u64::MAX; sizes.len()],
    }
}

impl PartitionStep for ReduceStep {
    fn name(&self) -> &'static str {
        "BalansReduceExec"
    }

    fn stage(&self) -> &'static str {
        REDUCE_STAGE
    }

    fn merged_stage(&self) -> bool {
        false
    }

    fn describe(&self, ctx: &PassContext) -> String {
        let cfg = &ctx.spec.config;
        let space = match cfg.pca_components(ctx.spec.features.len()) {
            Some(p) => format!("pca={p}"),
            None => "pca=off".to_string(),
        };
        if cfg.method == Method::Balans {
            let sample = cfg.sample_rows.map_or("all".to_string(), |s| s.to_string());
            format!("{space}, metric={}, sample_rows={sample}", cfg.metric)
        } else {
            space
        }
    }

    fn schema(&self, ctx: &PassContext) -> SchemaRef {
        sample_schema(distance_dims(ctx))
    }

    fn run(&self, ctx: &PassContext, partition: usize, cancel: &CancelFlag) -> Result<RecordBatch> {
        let cfg = &ctx.spec.config;
        let d = ctx.spec.features.len();
        let profile = ctx.profile()?.clone();
        let model = match cfg.pca_components(d) {
            Some(_) => ctx.pca()?.clone(),
            None => None,
        };
        let p = model.as_ref().map_or(d, |m| m.p);
        let cosine = cfg.metric == Metric::Cosine;
        let spool = ctx.spool(partition)?.clone();
        let features = spool.features.row_blocks()?;
        let start = profile.partition_start[partition];
        let thresholds = sample_thresholds(ctx, &profile);
        let anchor_thresholds = anchor_sample_thresholds(ctx, &profile);
        let anchors = profile.anchors.as_deref();
        let sampling = cfg.method == Method::Balans;
        let mut writer = match writes_coordinates(ctx) {
            true => {
                let file = ctx.work_file("BALANS reduced rows")?;
                Some((MatrixWriter::create(&file.path, p)?, file))
            }
            false => None,
        };
        let (mut rows_out, mut codes_out, mut z_out) = (Vec::new(), Vec::new(), Vec::new());
        let n = features.n();
        let chunk = cfg.chunk_rows;
        let mut lo = 0;
        while lo < n {
            cancel.check()?;
            let hi = (lo + chunk).min(n);
            let mut x = Vec::with_capacity((hi - lo) * d);
            for i in lo..hi {
                x.extend_from_slice(features.row(i));
            }
            let mut z = match &model {
                Some(model) => {
                    let mut z = vec![0.0f32; (hi - lo) * p];
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
            if sampling {
                for (k, row) in z.chunks_exact(p.max(1)).enumerate() {
                    let g = start + lo + k;
                    let code = profile.codes[g] as usize;
                    let threshold = match anchors {
                        Some(a) if a[g] => anchor_thresholds[code],
                        _ => thresholds[code],
                    };
                    if in_row_sample(cfg.seed, g as u64, threshold) {
                        rows_out.push(g as u64);
                        codes_out.push(code as u32);
                        z_out.extend_from_slice(row);
                    }
                }
            }
            if let Some((w, _)) = writer.as_mut() {
                w.append(z)?;
            }
            ctx.stage_progress(REDUCE_STAGE, (hi - lo) as u64, None);
            lo = hi;
        }
        if let Some((w, file)) = writer {
            w.finish()?;
            ctx.set_reduced(partition, ReducedPartition::new(file)?);
        }
        ctx.reserve(z_out.len() * 4 + rows_out.len() * 12, "the landmark sample")?;
        let list = FixedSizeListArray::try_new(
            Arc::new(Field::new("item", DataType::Float32, false)),
            p as i32,
            Arc::new(Float32Array::from(z_out)),
            None,
        )?;
        Ok(RecordBatch::try_new(
            sample_schema(p),
            vec![
                Arc::new(UInt64Array::from(rows_out)),
                Arc::new(UInt32Array::from(codes_out)),
                Arc::new(list),
            ],
        )?)
    }
}
