//! `BalansLandmarkExec`: the global sampling step.
//!
//! Its input is the landmark sample of every partition (`BalansReduceExec`'s rows). It orders
//! the sample by batch and global row, then runs the adaptive sampling loop (per-batch k-th
//! neighbour scales, elbow thresholds, coverage) over it, and emits the landmark descriptors
//! as a small table: sampling order, global row, batch, threshold, kept entries in the sample,
//! per-batch scales and coordinates. The smoothing and write steps recompute every entry of
//! `A_S` from these descriptors.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, AsArray, FixedSizeListArray, Float32Array, Float64Array, ListArray, RecordBatch,
    UInt32Array, UInt64Array,
};
use datafusion::arrow::buffer::OffsetBuffer;
use datafusion::arrow::datatypes::{
    DataType, Field, Float32Type, Schema, SchemaRef, UInt32Type, UInt64Type,
};

use crate::error::{OperatorError, Result};
use crate::exec::context::{CancelFlag, LandmarkSet, PassContext};
use crate::exec::reduce::distance_dims;
use crate::exec::step::{GlobalStep, GlobalStepExec};
use crate::kernels::elbow::ElbowParams;
use crate::kernels::landmark::{
    Landmark, RowBlocks, SamplingParams, anchor_landmarks, sample_landmarks,
};

/// Stage name of the sampling step.
pub const SAMPLE_STAGE: &str = "sample";

/// The landmark sampling step (see the module docs).
#[derive(Debug, Default, Clone, Copy)]
pub struct LandmarkStep;

/// The landmark sampling operator.
pub type BalansLandmarkExec = GlobalStepExec<LandmarkStep>;

/// Schema of the landmark table for `p` coordinates (`sigma2` holds one scale per batch).
pub fn landmark_schema(p: usize) -> SchemaRef {
    let list = |t: DataType, n: usize| {
        DataType::FixedSizeList(Arc::new(Field::new("item", t, false)), n as i32)
    };
    Arc::new(Schema::new(vec![
        Field::new("landmark", DataType::UInt32, false),
        Field::new("row", DataType::UInt64, false),
        Field::new("batch", DataType::UInt32, false),
        Field::new("threshold", DataType::Float64, false),
        Field::new("kept", DataType::UInt64, false),
        Field::new(
            "sigma2",
            DataType::List(Arc::new(Field::new("item", DataType::Float64, false))),
            false,
        ),
        Field::new("coords", list(DataType::Float32, p), false),
    ]))
}

/// The landmark table of `set` (`batches` batches per landmark).
pub fn landmark_table(set: &LandmarkSet, p: usize, batches: usize) -> Result<RecordBatch> {
    let lms = &set.landmarks;
    let list = |values: Arc<dyn Array>, t: DataType, n: usize| {
        FixedSizeListArray::try_new(
            Arc::new(Field::new("item", t, false)),
            n as i32,
            values,
            None,
        )
    };
    let sigma2: Vec<f64> = lms
        .iter()
        .flat_map(|l| l.scales.iter().map(|s| s.sigma2))
        .collect();
    let coords: Vec<f32> = lms.iter().flat_map(|l| l.coords.iter().copied()).collect();
    Ok(RecordBatch::try_new(
        landmark_schema(p),
        vec![
            Arc::new(UInt32Array::from((0..lms.len() as u32).collect::<Vec<_>>())),
            Arc::new(UInt64Array::from(
                lms.iter()
                    .map(|l| set.sample_rows[l.index])
                    .collect::<Vec<_>>(),
            )),
            Arc::new(UInt32Array::from(
                lms.iter()
                    .map(|l| set.sample_batch(l.index) as u32)
                    .collect::<Vec<_>>(),
            )),
            Arc::new(Float64Array::from(
                lms.iter().map(|l| l.threshold).collect::<Vec<_>>(),
            )),
            Arc::new(UInt64Array::from(
                lms.iter().map(|l| l.kept as u64).collect::<Vec<_>>(),
            )),
            Arc::new(ListArray::try_new(
                Arc::new(Field::new("item", DataType::Float64, false)),
                OffsetBuffer::from_lengths(std::iter::repeat_n(batches, lms.len())),
                Arc::new(Float64Array::from(sigma2)),
                None,
            )?),
            Arc::new(list(
                Arc::new(Float32Array::from(coords)),
                DataType::Float32,
                p,
            )?),
        ],
    )?)
}

/// The sample rows `(global row, batch, z)` of every partition, sorted by batch and row.
fn gather_sample(partials: &[RecordBatch], p: usize) -> Result<Vec<(u32, u64, Vec<f32>)>> {
    let mut rows = Vec::new();
    for b in partials {
        let row = b.column(0).as_primitive::<UInt64Type>();
        let batch = b.column(1).as_primitive::<UInt32Type>();
        let z = b.column(2).as_fixed_size_list();
        let values = z.values().as_primitive::<Float32Type>().values();
        for r in 0..b.num_rows() {
            rows.push((
                batch.value(r),
                row.value(r),
                values[r * p..(r + 1) * p].to_vec(),
            ));
        }
    }
    rows.sort_by_key(|&(b, r, _)| (b, r));
    Ok(rows)
}

impl GlobalStep for LandmarkStep {
    fn name(&self) -> &'static str {
        "BalansLandmarkExec"
    }

    fn stage(&self) -> &'static str {
        SAMPLE_STAGE
    }

    fn describe(&self, ctx: &PassContext) -> String {
        let c = &ctx.spec.config;
        format!(
            "k={}, tau={}, block={}, elbow={}, max_landmarks={}",
            c.k,
            c.tau,
            c.block,
            c.elbow,
            c.max_landmarks
                .map_or("none".to_string(), |m| m.to_string())
        )
    }

    fn schema(&self, ctx: &PassContext) -> SchemaRef {
        landmark_schema(distance_dims(ctx))
    }

    fn merge(
        &self,
        ctx: &PassContext,
        partials: Vec<RecordBatch>,
        cancel: &CancelFlag,
    ) -> Result<RecordBatch> {
        let cfg = ctx.spec.config.clone();
        let profile = ctx.profile()?.clone();
        let p = distance_dims(ctx);
        let batches = profile.batch_keys.len();
        let sample = gather_sample(&partials, p)?;
        drop(partials);
        let s = sample.len();
        let mut offsets = vec![0usize; batches + 1];
        for &(b, _, _) in &sample {
            offsets[b as usize + 1] += 1;
        }
        for b in 0..batches {
            offsets[b + 1] += offsets[b];
            let size = offsets[b + 1] - offsets[b];
            if size <= cfg.k {
                ctx.warn(format!(
                    "batch '{}' has {size} rows, fewer than k + 1 = {}: k is clipped to {} for it",
                    profile.batch_keys[b],
                    cfg.k + 1,
                    size.saturating_sub(1)
                ));
            }
        }
        let sampler_bytes = s * 8 * 3 + s + s * (p * 4 + 8) + 64 * 1024;
        ctx.reserve(
            sampler_bytes,
            "the landmark sampler (coordinates, 3 x f64 + 1 byte per sample row)",
        )?;
        let z: Vec<f32> = sample.iter().flat_map(|r| r.2.iter().copied()).collect();
        let sample_rows: Vec<u64> = sample.iter().map(|r| r.1).collect();
        drop(sample);
        let blocks = RowBlocks::new(vec![&z], p);
        let params = SamplingParams {
            k: cfg.k,
            block: cfg.block,
            tau: cfg.tau,
            max_landmarks: cfg.max_landmarks.unwrap_or(usize::MAX),
            seed: cfg.seed,
            elbow: ElbowParams {
                rule: cfg.elbow,
                a_min: cfg.a_min,
                bins: cfg.bins,
                r_min: cfg.r_min(),
                min_threshold: cfg.min_threshold(),
            },
        };
        let progress = ctx;
        let result = sample_landmarks(
            &blocks,
            &offsets,
            &params,
            None,
            &|| cancel.is_cancelled(),
            &mut |m, _covered| {
                progress.stage_progress(SAMPLE_STAGE, 1, Some(format!("{m} landmarks")));
            },
        )?;
        let anchor_landmarks = match profile.anchors.as_deref() {
            Some(flags) => {
                cancel.check()?;
                let in_sample: Vec<bool> = sample_rows.iter().map(|&r| flags[r as usize]).collect();
                Some(anchor_landmarks(
                    &blocks,
                    &offsets,
                    &in_sample,
                    &result.landmarks,
                    cfg.k,
                ))
            }
            None => None,
        };
        // The sampler's state and the sample rows (reserved by the reduce step) are gone.
        drop(blocks);
        drop(z);
        ctx.release(sampler_bytes + s * (p * 4 + 12));
        if result.landmarks.is_empty() {
            return Err(OperatorError::BadInput("no landmarks were sampled".into()));
        }
        let all_rows = s == profile.rows;
        let landmarks: Vec<Landmark> = result.landmarks;
        ctx.with_summary(|sm| {
            sm.landmarks = landmarks.len();
            sm.distinct_landmarks = {
                let mut idx: Vec<usize> = landmarks.iter().map(|l| l.index).collect();
                idx.sort_unstable();
                idx.dedup();
                idx.len()
            };
            sm.stop_reason = result.stop.to_string();
            sm.steps_to_full_coverage = result.steps_to_full_coverage;
            sm.sample_rows = s;
            sm.distance_dims = p;
        });
        let set = LandmarkSet {
            landmarks,
            sample_rows,
            sample_offsets: offsets,
            all_rows,
            stop: result.stop,
            steps_to_full_coverage: result.steps_to_full_coverage,
            anchor_landmarks,
        };
        let table = landmark_table(&set, p, batches)?;
        ctx.set_landmarks(Arc::new(set));
        Ok(table)
    }
}
