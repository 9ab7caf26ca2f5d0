//! `BalansProfileExec`: the global step after the ingest.
//!
//! It reads what every spooled partition recorded and checks the input as a whole: no rows,
//! one batch only, non-finite values under `--nan error`, constant features (a warning; all
//! constant is an error). It fixes the batch codes (keys sorted, so codes do not depend on
//! which partition saw a key first), the global row order (partitions in order) and every
//! feature's finite range. Its table lists the batches and their sizes.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{RecordBatch, StringArray, UInt64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::config::{Method, NanPolicy};
use crate::error::{OperatorError, Result};
use crate::exec::context::{CancelFlag, PassContext, Profile, SpoolPartition};
use crate::exec::ingest::INGEST_STAGE;
use crate::exec::step::{GlobalStep, GlobalStepExec};

/// The profile step (see the module docs).
#[derive(Debug, Default, Clone, Copy)]
pub struct ProfileStep;

/// The profile operator.
pub type BalansProfileExec = GlobalStepExec<ProfileStep>;

fn profile_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("batch", DataType::Utf8, false),
        Field::new("rows", DataType::UInt64, false),
    ]))
}

impl GlobalStep for ProfileStep {
    fn name(&self) -> &'static str {
        "BalansProfileExec"
    }

    fn stage(&self) -> &'static str {
        INGEST_STAGE
    }

    fn describe(&self, ctx: &PassContext) -> String {
        format!("batch=[{}]", ctx.spec.batch.join(", "))
    }

    fn schema(&self, _ctx: &PassContext) -> SchemaRef {
        profile_schema()
    }

    fn merge(
        &self,
        ctx: &PassContext,
        _partials: Vec<RecordBatch>,
        cancel: &CancelFlag,
    ) -> Result<RecordBatch> {
        cancel.check()?;
        let profile = build_profile(ctx)?;
        let table = RecordBatch::try_new(
            profile_schema(),
            vec![
                Arc::new(StringArray::from(profile.batch_keys.clone())),
                Arc::new(UInt64Array::from(
                    profile
                        .batch_sizes
                        .iter()
                        .map(|&s| s as u64)
                        .collect::<Vec<_>>(),
                )),
            ],
        )?;
        ctx.set_profile(Arc::new(profile));
        Ok(table)
    }
}

/// What the profile step needs of one spooled partition; a cluster's ingest tasks send it as
/// their partial (see [`PartitionRecordRef::to_bytes`]).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct PartitionRecordRef<'a> {
    /// Rows kept.
    pub rows: usize,
    /// Rows dropped for non-finite features.
    pub dropped: usize,
    /// Batch key of each row (index into `keys`).
    pub local_codes: &'a [u32],
    /// The partition's batch keys in order of first appearance.
    pub keys: &'a [String],
    /// Per feature: non-finite values seen.
    pub non_finite: &'a [usize],
    /// Per feature: smallest finite value.
    pub min: &'a [f32],
    /// Per feature: largest finite value.
    pub max: &'a [f32],
    /// Fit-row flags.
    pub fit_mask: Option<&'a [bool]>,
    /// Anchor labels of the rows and the partition's labels.
    pub labels: Option<(&'a [u32], &'a [String])>,
}

impl<'a> PartitionRecordRef<'a> {
    /// The record of a spooled partition.
    pub fn of_spool(p: &'a SpoolPartition) -> Self {
        Self {
            rows: p.rows,
            dropped: p.dropped,
            local_codes: &p.local_codes,
            keys: &p.keys,
            non_finite: &p.non_finite,
            min: &p.min,
            max: &p.max,
            fit_mask: p.fit_mask.as_deref(),
            labels: p.labels.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
        }
    }

    /// The record in an exact binary form ([`PartitionRecord::from_bytes`] reads it).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        bincode::serialize(self).map_err(|e| {
            OperatorError::InvalidParameter(format!("cannot encode a partition record: {e}"))
        })
    }
}

/// An owned [`PartitionRecordRef`] (same fields, same binary form).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct PartitionRecord {
    rows: usize,
    dropped: usize,
    local_codes: Vec<u32>,
    keys: Vec<String>,
    non_finite: Vec<usize>,
    min: Vec<f32>,
    max: Vec<f32>,
    fit_mask: Option<Vec<bool>>,
    labels: Option<(Vec<u32>, Vec<String>)>,
}

impl PartitionRecord {
    /// Reads what [`PartitionRecordRef::to_bytes`] wrote.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        bincode::deserialize(bytes).map_err(|e| {
            OperatorError::InvalidParameter(format!("malformed partition record: {e}"))
        })
    }

    /// The borrowed view.
    pub fn view(&self) -> PartitionRecordRef<'_> {
        PartitionRecordRef {
            rows: self.rows,
            dropped: self.dropped,
            local_codes: &self.local_codes,
            keys: &self.keys,
            non_finite: &self.non_finite,
            min: &self.min,
            max: &self.max,
            fit_mask: self.fit_mask.as_deref(),
            labels: self
                .labels
                .as_ref()
                .map(|(c, k)| (c.as_slice(), k.as_slice())),
        }
    }
}

/// Merges the spooled partitions' records into the pass's [`Profile`].
fn build_profile(ctx: &PassContext) -> Result<Profile> {
    let spools: Vec<_> = (0..ctx.partitions)
        .map(|i| ctx.spool(i).cloned())
        .collect::<Result<_>>()?;
    let parts: Vec<PartitionRecordRef<'_>> = spools
        .iter()
        .map(|p| PartitionRecordRef::of_spool(p))
        .collect();
    profile_from_records(ctx, &parts)
}

/// Merges partition records (in partition order) into the pass's [`Profile`].
pub fn profile_from_records(
    ctx: &PassContext,
    parts: &[PartitionRecordRef<'_>],
) -> Result<Profile> {
    let spec = &ctx.spec;
    let d = spec.features.len();
    let mut non_finite = vec![0usize; d];
    let mut min = vec![f32::INFINITY; d];
    let mut max = vec![f32::NEG_INFINITY; d];
    let mut dropped = 0;
    let mut all_keys: Vec<String> = Vec::new();
    for p in parts {
        for f in 0..d {
            non_finite[f] += p.non_finite[f];
            min[f] = min[f].min(p.min[f]);
            max[f] = max[f].max(p.max[f]);
        }
        dropped += p.dropped;
        all_keys.extend(p.keys.iter().cloned());
    }
    all_keys.sort();
    all_keys.dedup();
    let rows: usize = parts.iter().map(|p| p.rows).sum();
    let bad: Vec<(String, usize)> = spec
        .features
        .iter()
        .cloned()
        .zip(non_finite.iter().copied())
        .filter(|(_, c)| *c > 0)
        .collect();
    if spec.config.nan == NanPolicy::Error && !bad.is_empty() {
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
    if rows == 0 {
        return Err(OperatorError::BadInput(if dropped > 0 {
            format!("every row ({dropped}) has a non-finite feature; nothing left to correct")
        } else {
            "the input has no rows".to_string()
        }));
    }
    if all_keys.len() < 2 && spec.config.method != Method::Sphering {
        return Err(OperatorError::BadInput(format!(
            "only one batch ('{}') in column(s) {}: batch correction needs at least two batches",
            all_keys[0],
            spec.batch.join(", ")
        )));
    }
    let constant: Vec<String> = spec
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
        ctx.warn(format!(
            "{} constant feature column(s) pass through unchanged: {}{}",
            constant.len(),
            shown.join(", "),
            if constant.len() > 5 { ", ..." } else { "" }
        ));
    }
    let code_of: HashMap<&str, u32> = all_keys
        .iter()
        .enumerate()
        .map(|(c, k)| (k.as_str(), c as u32))
        .collect();
    ctx.reserve(rows * 4, "the batch code of every row")?;
    let mut codes = Vec::with_capacity(rows);
    let mut partition_start = Vec::with_capacity(parts.len());
    let mut batch_sizes = vec![0usize; all_keys.len()];
    let with_mask = spec.fit_mask.is_some();
    let mut fit_mask = with_mask.then(|| Vec::with_capacity(rows));
    for p in parts {
        partition_start.push(codes.len());
        let remap: Vec<u32> = p.keys.iter().map(|k| code_of[k.as_str()]).collect();
        for &c in p.local_codes {
            let g = remap[c as usize];
            batch_sizes[g as usize] += 1;
            codes.push(g);
        }
        if let (Some(all), Some(mask)) = (fit_mask.as_mut(), p.fit_mask) {
            all.extend_from_slice(mask);
        }
    }
    let anchors = anchor_flags(ctx, parts, &codes, &all_keys, fit_mask.as_deref())?;
    ctx.with_summary(|s| {
        s.rows = rows;
        s.dropped_rows = dropped;
        s.features = d;
        s.batches = all_keys
            .iter()
            .cloned()
            .zip(batch_sizes.iter().copied())
            .collect();
        s.constant_features = constant.clone();
    });
    Ok(Profile {
        rows,
        partition_start,
        batch_keys: all_keys,
        batch_sizes,
        codes,
        fit_mask,
        anchors: anchors.as_ref().map(|a| a.flags.clone()),
        anchors_per_batch: anchors.map_or_else(Vec::new, |a| a.per_batch),
        min,
        max,
    })
}

/// The anchor rows of an anchored BALANS pass.
struct Anchors {
    flags: Vec<bool>,
    per_batch: Vec<usize>,
}

/// Marks the anchor rows: the fit-row column's rows, and rows whose anchor label occurs in at
/// least two batches. Every batch must hold anchors (its offset is estimated from them).
fn anchor_flags(
    ctx: &PassContext,
    parts: &[PartitionRecordRef<'_>],
    codes: &[u32],
    batch_keys: &[String],
    fit_mask: Option<&[bool]>,
) -> Result<Option<Anchors>> {
    let spec = &ctx.spec;
    if !spec.anchored() {
        return Ok(None);
    }
    let rows = codes.len();
    ctx.reserve(rows, "the anchor flag of every row")?;
    let mut flags = match fit_mask {
        Some(mask) => mask.to_vec(),
        None => vec![false; rows],
    };
    let (mut shared, mut single) = (0usize, 0usize);
    if spec.anchor_label.is_some() {
        // Global label ids, first batch seen and whether a second batch holds the label.
        let mut id_of: HashMap<&str, usize> = HashMap::new();
        let mut first_batch: Vec<u32> = Vec::new();
        let mut multi: Vec<bool> = Vec::new();
        let mut global_ids: Vec<Vec<usize>> = Vec::with_capacity(parts.len());
        let mut start = 0usize;
        for p in parts {
            let (local, keys) = p.labels.ok_or_else(|| {
                OperatorError::InvalidParameter("anchor labels were not recorded".into())
            })?;
            let ids: Vec<usize> = keys
                .iter()
                .map(|k| {
                    let next = id_of.len();
                    *id_of.entry(k.as_str()).or_insert(next)
                })
                .collect();
            first_batch.resize(id_of.len(), u32::MAX);
            multi.resize(id_of.len(), false);
            for (r, &c) in local.iter().enumerate() {
                if c == u32::MAX {
                    continue;
                }
                let id = ids[c as usize];
                let b = codes[start + r];
                if first_batch[id] == u32::MAX {
                    first_batch[id] = b;
                } else if first_batch[id] != b {
                    multi[id] = true;
                }
            }
            start += local.len();
            global_ids.push(ids);
        }
        shared = multi.iter().filter(|&&m| m).count();
        single = multi.len() - shared;
        let mut g = 0usize;
        for (p, ids) in parts.iter().zip(&global_ids) {
            let (local, _) = p.labels.expect("checked above");
            for &c in local {
                if c != u32::MAX && multi[ids[c as usize]] {
                    flags[g] = true;
                }
                g += 1;
            }
        }
        if single > 0 {
            ctx.warn(format!(
                "{single} value(s) of anchor label '{}' occur in one batch only and are not anchors",
                spec.anchor_label.as_deref().unwrap_or_default()
            ));
        }
    }
    let mut per_batch = vec![0usize; batch_keys.len()];
    for (&f, &b) in flags.iter().zip(codes) {
        per_batch[b as usize] += f as usize;
    }
    let empty: Vec<&str> = per_batch
        .iter()
        .zip(batch_keys)
        .filter(|(c, _)| **c == 0)
        .map(|(_, k)| k.as_str())
        .collect();
    if !empty.is_empty() {
        let what = match (&spec.fit_mask, &spec.anchor_label) {
            (Some(_), Some(l)) => format!("the anchor predicate and the shared values of '{l}'"),
            (Some(_), None) => "the anchor predicate".to_string(),
            (None, Some(l)) => format!("the values of '{l}' shared with another batch"),
            (None, None) => unreachable!("anchored"),
        };
        return Err(OperatorError::BadInput(format!(
            "no anchor rows in batch {}: {what} match nothing there, and every batch needs \
             anchors to estimate its offset",
            empty
                .iter()
                .map(|k| format!("'{k}'"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let total: usize = per_batch.iter().sum();
    ctx.with_summary(|s| {
        s.anchor_rows = total;
        s.anchor_labels_shared = shared;
        s.anchor_labels_single_batch = single;
    });
    Ok(Some(Anchors { flags, per_batch }))
}
