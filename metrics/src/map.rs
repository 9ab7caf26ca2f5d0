//! Mean average precision (mAP) as copairs 0.5.5 computes it, with the pair rules of
//! Arevalo et al. 2024 (`metrics/map.py`): phenotypic activity against negative controls
//! ("negcon") and phenotypic consistency against other labels ("nonrep").
//!
//! Per query profile, its positive and negative partners are ranked by cosine similarity,
//! descending, and the average precision (AP) is the mean over positives of the precision at
//! each positive's rank. As in copairs, the similarities are rounded to `f32` and ranked by the
//! `f32` key `1 - similarity`; on equal keys positives come before negatives (copairs' stable
//! `lexsort` over the positive pairs listed first). The cosine itself is computed like numpy
//! (rows divided by their norms, products summed with numpy's pairwise summation), so the
//! `f32` rounding, and hence the ties, are the same as copairs'.
//!
//! Similarities come from blocked matrix products, never an `n x n` matrix: per label, its
//! rows against themselves (positives); per plate, tiles of its queries against its candidate
//! rows (negatives). A product within the dot-product error bound of an `f32` rounding
//! boundary is recomputed in numpy's order, so the keys are those of the scalar computation to
//! the bit. Tiles run in parallel and are combined by query, so the result does not depend on
//! the thread count.
//!
//! Significance: for every distinct `(n_pos, n_total)` configuration, `null_size` random
//! rankings give null APs; the null mAP of a label is, sample by sample, the mean over its
//! queries of the null AP of the query's configuration (queries with the same configuration
//! share one null sample, as in copairs). `p = (#{null mAP > mAP} + 1) / (null_size + 1)`,
//! q-values by Benjamini-Hochberg (statsmodels `fdr_bh`). The random stream is ChaCha8, one
//! stream per configuration, so p-values differ from copairs' (numpy PCG64) by sampling noise
//! only (|dp| of order `sqrt(p (1 - p) / null_size)`).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{MetricsError, Result, ensure_finite_rows};

/// Integer-coded metadata of every row of the table (negative controls included).
#[derive(Debug, Clone, Copy)]
pub struct MapMetadata<'a> {
    /// Label of each row (compound, MoA, ...); negative-control rows may share one code.
    pub labels: &'a [u32],
    /// Plate of each row.
    pub plates: &'a [u32],
    /// Well position name of each row (equal codes = same well name, on any plate).
    pub wells: &'a [u32],
    /// Whether each row is a negative control.
    pub is_negcon: &'a [bool],
}

/// Average precision of one query profile (copairs' `average_precision` row).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct QueryAp {
    /// Row of the query in the input table.
    pub row: usize,
    /// Number of positive pairs of the query.
    pub n_pos: usize,
    /// Number of positive plus negative pairs of the query.
    pub n_total: usize,
    /// Average precision; NaN when the query has no positive pair. A query with positives but
    /// no negatives gets 1, as in copairs.
    pub average_precision: f64,
}

/// Per-query APs of one mAP flavour, with what the caller may want to warn about.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApOutput {
    /// One entry per query row, in row order (negative-control rows are never queries).
    pub queries: Vec<QueryAp>,
    /// Label codes occurring in a single row of the table; those rows were dropped.
    pub single_replicate_labels: Vec<u32>,
    /// Plate codes holding a query without any negative pair (negcon: a plate without
    /// negative controls; nonrep: a plate with a single label). Their queries get AP 1 when
    /// they have positives, exactly as copairs does.
    pub plates_without_negatives: Vec<u32>,
}

/// mAP and significance of one label (copairs' `mean_average_precision` row).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LabelMap {
    /// Label code.
    pub label: u32,
    /// Number of queries of the label with an AP (at least one positive pair).
    pub n_profiles: usize,
    /// Mean AP over those queries.
    pub mean_average_precision: f64,
    /// `(#{null mAP > mAP} + 1) / (null_size + 1)`.
    pub p_value: f64,
    /// Benjamini-Hochberg q-value over all labels.
    pub corrected_p_value: f64,
    /// `p_value < threshold`.
    pub below_p: bool,
    /// `corrected_p_value < threshold`.
    pub below_corrected_p: bool,
}

/// Aggregate of a per-label mAP table, as Arevalo et al. report it (labels with NaN dropped).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MapSummary {
    /// Mean over labels of the mAP.
    pub mean_map: f64,
    /// Fraction of labels with `p < threshold`.
    pub fraction_below_p: f64,
    /// Fraction of labels with `q < threshold`.
    pub fraction_below_corrected_p: f64,
    /// Number of labels aggregated.
    pub n_groups: usize,
    /// Number of query profiles behind them (sum of `n_profiles`).
    pub n_profiles: usize,
    /// Number of labels skipped because they occur in a single row.
    pub n_single_replicate_labels: usize,
}

/// Which pair rules to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PairRules {
    /// Positives: same label, different well name. Negatives: negative controls on the same plate.
    Negcon,
    /// Negative controls removed. Positives: same label. Negatives: other labels on the same plate.
    Nonrep,
}

/// Phenotypic activity APs: for every non-control row, positives are the rows with the same
/// label in a different well name (a same-name well on another plate is not a positive),
/// negatives are the negative-control rows on the same plate. Rows whose label occurs once in
/// the whole table are dropped first (Arevalo's rule; a lone negative control included).
///
/// `x` is row-major `n x d` with `n = meta.labels.len()`. Errors on inconsistent lengths,
/// non-finite or all-zero rows among those used, or when the table has no positive or no
/// negative pair at all (copairs' `UnpairedException`).
pub fn average_precision_negcon(x: &[f64], d: usize, meta: &MapMetadata) -> Result<ApOutput> {
    average_precision_with(x, d, meta, PairRules::Negcon)
}

/// Phenotypic consistency APs: negative-control rows are removed; positives are the rows with
/// the same label (any well, any plate), negatives the rows of other labels on the same plate.
/// Rows whose label occurs once in the whole table are dropped first. Inputs and errors as
/// [`average_precision_negcon`].
pub fn average_precision_nonrep(x: &[f64], d: usize, meta: &MapMetadata) -> Result<ApOutput> {
    average_precision_with(x, d, meta, PairRules::Nonrep)
}

fn average_precision_with(
    x: &[f64],
    d: usize,
    meta: &MapMetadata,
    rules: PairRules,
) -> Result<ApOutput> {
    let n = meta.labels.len();
    validate_inputs(x, d, meta)?;

    let mut label_counts: BTreeMap<u32, usize> = BTreeMap::new();
    for &label in meta.labels {
        *label_counts.entry(label).or_default() += 1;
    }
    let single_replicate_labels: Vec<u32> = label_counts
        .iter()
        .filter(|&(_, &count)| count == 1)
        .map(|(&label, _)| label)
        .collect();
    let kept = |row: usize| label_counts[&meta.labels[row]] > 1;
    let is_query = |row: usize| kept(row) && !meta.is_negcon[row];
    let is_negative_candidate = |row: usize| match rules {
        PairRules::Negcon => kept(row) && meta.is_negcon[row],
        PairRules::Nonrep => is_query(row),
    };

    let queries: Vec<usize> = (0..n).filter(|&row| is_query(row)).collect();
    let used: Vec<usize> = (0..n)
        .filter(|&row| is_query(row) || is_negative_candidate(row))
        .collect();
    // Storage order: by plate, the plate's negative candidates first, so that every plate's
    // candidates and every plate's queries are contiguous slot ranges.
    let mut storage_order = used.clone();
    storage_order.sort_unstable_by_key(|&row| (meta.plates[row], !is_negative_candidate(row), row));
    let unit = UnitRows::new(x, d, n, &used, storage_order)?;

    let mut query_index = vec![usize::MAX; n];
    for (index, &row) in queries.iter().enumerate() {
        query_index[row] = index;
    }
    let mut rows_by_label: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for &row in &queries {
        rows_by_label.entry(meta.labels[row]).or_default().push(row);
    }

    // Positive keys of every query, label block by label block.
    let is_positive = |query: usize, other: usize| {
        other != query && (rules == PairRules::Nonrep || meta.wells[other] != meta.wells[query])
    };
    let label_blocks: Vec<Vec<(usize, Vec<f32>)>> = rows_by_label
        .values()
        .collect::<Vec<_>>()
        .par_iter()
        .map(|rows| {
            let block = unit.gather(rows);
            let right = MatRef::from_row_major_slice(&block, rows.len(), d);
            let mut scratch = KeyScratch::default();
            let mut out = Vec::with_capacity(rows.len());
            for (tile_index, tile_rows) in rows.chunks(TILE_ROWS).enumerate() {
                let start = tile_index * TILE_ROWS * d;
                let left = MatRef::from_row_major_slice(
                    &block[start..start + tile_rows.len() * d],
                    tile_rows.len(),
                    d,
                );
                let keys = unit.rank_keys(tile_rows, left, rows, right, &mut scratch);
                for (&query, query_keys) in tile_rows.iter().zip(keys.chunks_exact(rows.len())) {
                    let mut positives: Vec<f32> = rows
                        .iter()
                        .zip(query_keys)
                        .filter(|&(&other, _)| is_positive(query, other))
                        .map(|(_, &key)| key)
                        .collect();
                    positives.sort_unstable_by(f32::total_cmp);
                    out.push((query_index[query], positives));
                }
            }
            out
        })
        .collect();
    let mut positive_keys: Vec<Vec<f32>> = vec![Vec::new(); queries.len()];
    for (index, keys) in label_blocks.into_iter().flatten() {
        positive_keys[index] = keys;
    }

    // Negative keys plate block by plate block, tiles of queries against the plate's candidates.
    let plate_tasks = unit.plate_tiles(meta.plates, is_query, is_negative_candidate);
    let tile_results: Vec<Vec<(usize, QueryAp, usize)>> = plate_tasks
        .par_iter()
        .map(|task| {
            let candidates = &unit.rows[task.candidates.clone()];
            let tile = &unit.rows[task.queries.clone()];
            let mut scratch = KeyScratch::default();
            let keys = unit.rank_keys(
                tile,
                unit.slab(task.queries.clone()),
                candidates,
                unit.slab(task.candidates.clone()),
                &mut scratch,
            );
            let mut below_counts = Vec::new();
            let mut out = Vec::with_capacity(tile.len());
            for (i, &query) in tile.iter().enumerate() {
                let index = query_index[query];
                let positives = &positive_keys[index];
                let query_keys = &keys[i * candidates.len()..(i + 1) * candidates.len()];
                let negatives = candidates
                    .iter()
                    .zip(query_keys)
                    .filter(|&(&other, _)| {
                        rules == PairRules::Negcon || meta.labels[other] != meta.labels[query]
                    })
                    .map(|(_, &key)| key);
                let (average_precision, n_neg) =
                    average_precision_of_keys(positives, negatives, &mut below_counts);
                let ap = QueryAp {
                    row: query,
                    n_pos: positives.len(),
                    n_total: positives.len() + n_neg,
                    average_precision,
                };
                out.push((index, ap, n_neg));
            }
            out
        })
        .collect();
    let mut results: Vec<(QueryAp, usize)> = queries
        .iter()
        .map(|&row| {
            let placeholder = QueryAp {
                row,
                n_pos: 0,
                n_total: 0,
                average_precision: f64::NAN,
            };
            (placeholder, 0)
        })
        .collect();
    for (index, ap, n_neg) in tile_results.into_iter().flatten() {
        results[index] = (ap, n_neg);
    }

    if results.iter().all(|(ap, _)| ap.n_pos == 0) {
        return Err(MetricsError::InvalidInput(
            "unable to find positive pairs: no label has two rows that qualify as replicates"
                .into(),
        ));
    }
    if results.iter().all(|&(_, n_neg)| n_neg == 0) {
        return Err(MetricsError::InvalidInput(match rules {
            PairRules::Negcon => {
                "unable to find negative pairs: no negative-control row shares a plate with a query"
                    .into()
            }
            PairRules::Nonrep => {
                "unable to find negative pairs: no plate holds two different labels".into()
            }
        }));
    }
    let plates_without_negatives: BTreeSet<u32> = results
        .iter()
        .filter(|&&(_, n_neg)| n_neg == 0)
        .map(|(ap, _)| meta.plates[ap.row])
        .collect();
    Ok(ApOutput {
        queries: results.into_iter().map(|(ap, _)| ap).collect(),
        single_replicate_labels,
        plates_without_negatives: plates_without_negatives.into_iter().collect(),
    })
}

fn validate_inputs(x: &[f64], d: usize, meta: &MapMetadata) -> Result<()> {
    let n = meta.labels.len();
    if d == 0 {
        return Err(MetricsError::InvalidInput(
            "the embedding needs at least one feature".into(),
        ));
    }
    if x.len() != n * d {
        return Err(MetricsError::InvalidInput(format!(
            "the embedding has {} values, expected {n} rows x {d} features",
            x.len()
        )));
    }
    for (name, len) in [
        ("plates", meta.plates.len()),
        ("wells", meta.wells.len()),
        ("is_negcon", meta.is_negcon.len()),
    ] {
        if len != n {
            return Err(MetricsError::InvalidInput(format!(
                "metadata `{name}` has {len} rows, `labels` has {n}"
            )));
        }
    }
    Ok(())
}

/// Query rows per tile of a similarity block (a tile of 256 queries against 10,000 candidates
/// holds 20 MB of products).
const TILE_ROWS: usize = 256;

/// A tile of consecutive queries of one plate, with the slot range of the plate's candidates.
struct PlateTile {
    queries: Range<usize>,
    candidates: Range<usize>,
}

/// Reusable buffers of [`UnitRows::rank_keys`].
#[derive(Default)]
struct KeyScratch {
    products: Vec<f64>,
    keys: Vec<f32>,
}

/// Unit-norm copies of the rows in use, computed as numpy does (`x / norm(x)`), stored in a
/// caller-chosen order of slots.
struct UnitRows {
    d: usize,
    /// Slot of each input row in `values` (`usize::MAX` when unused).
    slot: Vec<usize>,
    /// Input row of each slot.
    rows: Vec<usize>,
    values: Vec<f64>,
    /// Bound on the difference between two summation orders of a dot product of two rows.
    dot_error_bound: f64,
}

impl UnitRows {
    /// `used` lists the rows in use in ascending order (the order errors are reported in);
    /// `storage_order` is the same rows in the order of their slots.
    fn new(
        x: &[f64],
        d: usize,
        n: usize,
        used: &[usize],
        storage_order: Vec<usize>,
    ) -> Result<Self> {
        ensure_finite_rows(x, d, used.iter().copied())?;
        let mut slot = vec![usize::MAX; n];
        for (k, &row) in storage_order.iter().enumerate() {
            slot[row] = k;
        }
        let mut values = vec![0.0; used.len() * d];
        for &row in used {
            let features = &x[row * d..(row + 1) * d];
            let norm = numpy_pairwise_dot(features, features).sqrt();
            if norm == 0.0 {
                return Err(MetricsError::InvalidInput(format!(
                    "row {row} is all zeros: its cosine similarity is undefined"
                )));
            }
            let k = slot[row];
            for (o, &v) in values[k * d..(k + 1) * d].iter_mut().zip(features) {
                *o = v / norm;
            }
        }
        // Any summation order of a d-term dot product of (nearly) unit vectors is within
        // gamma_d = d u / (1 - d u) (u = 2^-53) of the exact value, fused multiply-adds or not;
        // two orders differ by at most twice that, about d * f64::EPSILON. Twice it again for
        // safety, plus the rows' own deviation from unit norm.
        let terms = d as f64 + 2.0;
        let dot_error_bound = 2.0 * terms * f64::EPSILON;
        Ok(Self {
            d,
            slot,
            rows: storage_order,
            values,
            dot_error_bound,
        })
    }

    fn row(&self, row: usize) -> &[f64] {
        let k = self.slot[row];
        &self.values[k * self.d..(k + 1) * self.d]
    }

    /// The rows of a slot range as a row-major matrix view.
    fn slab(&self, slots: Range<usize>) -> MatRef<'_, f64> {
        let count = slots.len();
        MatRef::from_row_major_slice(
            &self.values[slots.start * self.d..slots.end * self.d],
            count,
            self.d,
        )
    }

    /// Row-major copy of the given rows.
    fn gather(&self, rows: &[usize]) -> Vec<f64> {
        let mut out = Vec::with_capacity(rows.len() * self.d);
        for &row in rows {
            out.extend_from_slice(self.row(row));
        }
        out
    }

    /// Tiles of at most [`TILE_ROWS`] queries per plate, each with its plate's candidate slots.
    /// Requires the storage order to group each plate's candidates, and each plate's queries,
    /// into contiguous slot ranges.
    fn plate_tiles(
        &self,
        plates: &[u32],
        is_query: impl Fn(usize) -> bool,
        is_candidate: impl Fn(usize) -> bool,
    ) -> Vec<PlateTile> {
        let mut tiles = Vec::new();
        let mut start = 0;
        while start < self.rows.len() {
            let plate = plates[self.rows[start]];
            let end = start
                + self.rows[start..]
                    .iter()
                    .take_while(|&&row| plates[row] == plate)
                    .count();
            let slots_where = |keep: &dyn Fn(usize) -> bool| -> Range<usize> {
                let first = (start..end).find(|&k| keep(self.rows[k])).unwrap_or(end);
                let last = (first..end)
                    .rfind(|&k| keep(self.rows[k]))
                    .map_or(first, |k| k + 1);
                debug_assert!((first..last).all(|k| keep(self.rows[k])));
                first..last
            };
            let candidates = slots_where(&is_candidate);
            let queries = slots_where(&is_query);
            let mut tile_start = queries.start;
            while tile_start < queries.end {
                let tile_end = (tile_start + TILE_ROWS).min(queries.end);
                tiles.push(PlateTile {
                    queries: tile_start..tile_end,
                    candidates: candidates.clone(),
                });
                tile_start = tile_end;
            }
            start = end;
        }
        tiles
    }

    /// Ranking keys of every pair `(left_rows[i], right_rows[j])`, row-major. The similarities
    /// come from one matrix product; where a product lies so close to a rounding boundary of
    /// `f32` that numpy's summation order could round it the other way, the pair is recomputed
    /// with [`numpy_pairwise_dot`], so every key equals [`UnitRows::rank_key`] to the bit.
    fn rank_keys<'s>(
        &self,
        left_rows: &[usize],
        left: MatRef<'_, f64>,
        right_rows: &[usize],
        right: MatRef<'_, f64>,
        scratch: &'s mut KeyScratch,
    ) -> &'s [f32] {
        let (m, k) = (left_rows.len(), right_rows.len());
        scratch.keys.clear();
        if m == 0 || k == 0 {
            return &scratch.keys;
        }
        scratch.products.clear();
        scratch.products.resize(m * k, 0.0);
        matmul(
            MatMut::from_row_major_slice_mut(&mut scratch.products, m, k),
            Accum::Replace,
            left,
            right.transpose(),
            1.0,
            Par::Seq,
        );
        crate::simd::clear_upper_simd_state();
        for (&a, products) in left_rows.iter().zip(scratch.products.chunks_exact(k)) {
            for (&b, &similarity) in right_rows.iter().zip(products) {
                let key = match rounded_if_unambiguous(similarity, self.dot_error_bound) {
                    Some(rounded) => 1.0 - rounded,
                    None => self.rank_key(a, b),
                };
                scratch.keys.push(key);
            }
        }
        &scratch.keys
    }

    /// copairs' ranking key: `1 - cosine` in `f32`, the similarity rounded to `f32` first.
    fn rank_key(&self, a: usize, b: usize) -> f32 {
        let (u, v) = (self.row(a), self.row(b));
        // Rounding to f32 is copairs' own storage precision.
        let similarity = numpy_pairwise_dot(u, v) as f32;
        1.0 - similarity
    }
}

/// `similarity` rounded to `f32`, or `None` when some value within `error_bound` of it rounds
/// differently (rounding is monotone, so checking both ends of the interval suffices).
fn rounded_if_unambiguous(similarity: f64, error_bound: f64) -> Option<f32> {
    let rounded = similarity as f32;
    let low = (similarity - error_bound) as f32;
    let high = (similarity + error_bound) as f32;
    (low == rounded && high == rounded).then_some(rounded)
}

/// `sum(u * v)` in numpy's pairwise summation order (blocks of at most 128 terms summed with
/// eight accumulators), so the result agrees with numpy's to the last bit.
fn numpy_pairwise_dot(u: &[f64], v: &[f64]) -> f64 {
    let n = u.len();
    if n < 8 {
        u.iter().zip(v).fold(0.0, |sum, (a, b)| sum + a * b)
    } else if n <= 128 {
        let full = n - n % 8;
        let (u_blocks, u_tail) = u.split_at(full);
        let (v_blocks, v_tail) = v.split_at(full);
        let mut acc = [0.0; 8];
        for (bu, bv) in u_blocks.chunks_exact(8).zip(v_blocks.chunks_exact(8)) {
            for ((sum, a), b) in acc.iter_mut().zip(bu).zip(bv) {
                *sum += a * b;
            }
        }
        let head =
            ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        u_tail
            .iter()
            .zip(v_tail)
            .fold(head, |sum, (a, b)| sum + a * b)
    } else {
        let half = n / 2 - (n / 2) % 8;
        numpy_pairwise_dot(&u[..half], &v[..half]) + numpy_pairwise_dot(&u[half..], &v[half..])
    }
}

/// Sorts `(key, is_positive)` by key, positives first on ties, and returns the AP (NaN without
/// positives): copairs' ranking, the reference for [`average_precision_of_keys`].
#[cfg(test)]
fn average_precision_of_ranking(ranked: &mut [(f32, bool)], n_pos: usize) -> f64 {
    if n_pos == 0 {
        return f64::NAN;
    }
    ranked.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)));
    let mut hits = 0usize;
    let mut precision_sum = 0.0;
    for (rank, &(_, positive)) in ranked.iter().enumerate() {
        if positive {
            hits += 1;
            precision_sum += hits as f64 / (rank + 1) as f64;
        }
    }
    precision_sum / n_pos as f64
}

/// AP of one query from its positive keys (sorted ascending) and its negative keys, with the
/// ranking of [`average_precision_of_ranking`] (ascending key, positives first on equal keys)
/// but without sorting the negatives: the `j`-th positive (0-based) ranks at
/// `j + 1 + #{negatives with a smaller key}`. Returns the AP (NaN without positives) and the
/// number of negatives; `below_counts` is scratch.
fn average_precision_of_keys(
    positives: &[f32],
    negatives: impl Iterator<Item = f32>,
    below_counts: &mut Vec<usize>,
) -> (f64, usize) {
    // below_counts[t]: negatives ranked just before the t-th positive (t = n_pos: after all).
    below_counts.clear();
    below_counts.resize(positives.len() + 1, 0);
    let mut n_neg = 0;
    for key in negatives {
        let t = positives.partition_point(|p| p.total_cmp(&key).is_le());
        below_counts[t] += 1;
        n_neg += 1;
    }
    if positives.is_empty() {
        return (f64::NAN, n_neg);
    }
    let mut negatives_before = 0usize;
    let mut precision_sum = 0.0;
    for (j, &count) in below_counts[..positives.len()].iter().enumerate() {
        negatives_before += count;
        let hits = j + 1;
        precision_sum += hits as f64 / (hits + negatives_before) as f64;
    }
    (precision_sum / positives.len() as f64, n_neg)
}

/// Null APs of one configuration: `null_size` rankings with `n_pos` positives placed uniformly
/// at random among `n_total` positions. Seeded by `seed` and the configuration alone.
fn null_average_precisions(n_pos: u32, n_total: u32, null_size: usize, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream((u64::from(n_pos) << 32) | u64::from(n_total));
    let (n_pos, n_total) = (n_pos as usize, n_total as usize);
    // Draw the smaller side (Floyd's algorithm), then read the ranking off the marks.
    let n_negative = n_total - n_pos;
    let (n_marked, marks_positives) = if n_pos <= n_negative {
        (n_pos, true)
    } else {
        (n_negative, false)
    };
    let mut marked = vec![false; n_total];
    (0..null_size)
        .map(|_| {
            for j in n_total - n_marked..n_total {
                let t = rng.random_range(0..=j);
                let pick = if marked[t] { j } else { t };
                marked[pick] = true;
            }
            let mut hits = 0usize;
            let mut precision_sum = 0.0;
            for (position, mark) in marked.iter_mut().enumerate() {
                if *mark == marks_positives {
                    hits += 1;
                    precision_sum += hits as f64 / (position + 1) as f64;
                }
                *mark = false;
            }
            precision_sum / n_pos as f64
        })
        .collect()
}

/// Mean average precision per label with permutation p-values (copairs'
/// `mean_average_precision`). `labels` is indexed by [`QueryAp::row`] (pass the table's label
/// column, or any other grouping of the rows). Queries without a positive pair or with a NaN
/// AP are ignored; labels are returned in ascending code order.
///
/// Each distinct `(n_pos, n_total)` configuration gets `null_size` null APs (cached once,
/// `null_size` values each); a label's null mAP is the mean over its queries of their
/// configuration's null AP, sample by sample, and
/// `p = (#{null mAP > mAP} + 1) / (null_size + 1)`. q-values: [`benjamini_hochberg`].
pub fn mean_average_precision(
    ap: &[QueryAp],
    labels: &[u32],
    null_size: usize,
    threshold: f64,
    seed: u64,
) -> Result<Vec<LabelMap>> {
    if null_size == 0 {
        return Err(MetricsError::InvalidInput(
            "null_size must be at least 1".into(),
        ));
    }
    if !threshold.is_finite() {
        return Err(MetricsError::InvalidInput(format!(
            "threshold must be finite, got {threshold}"
        )));
    }
    let mut queries_by_label: BTreeMap<u32, Vec<&QueryAp>> = BTreeMap::new();
    let mut configurations: BTreeSet<(u32, u32)> = BTreeSet::new();
    for query in ap {
        let label = *labels.get(query.row).ok_or_else(|| {
            MetricsError::InvalidInput(format!(
                "query row {} is outside the {} labels given",
                query.row,
                labels.len()
            ))
        })?;
        if query.n_pos == 0 || query.average_precision.is_nan() {
            continue;
        }
        if query.n_total < query.n_pos {
            return Err(MetricsError::InvalidInput(format!(
                "query row {} has more positive pairs ({}) than pairs ({})",
                query.row, query.n_pos, query.n_total
            )));
        }
        let configuration = match (u32::try_from(query.n_pos), u32::try_from(query.n_total)) {
            (Ok(n_pos), Ok(n_total)) => (n_pos, n_total),
            _ => {
                return Err(MetricsError::InvalidInput(format!(
                    "query row {} has more than 2^32 pairs",
                    query.row
                )));
            }
        };
        configurations.insert(configuration);
        queries_by_label.entry(label).or_default().push(query);
    }
    let configurations: Vec<(u32, u32)> = configurations.into_iter().collect();
    let null_by_configuration: Vec<Vec<f64>> = configurations
        .par_iter()
        .map(|&(n_pos, n_total)| null_average_precisions(n_pos, n_total, null_size, seed))
        .collect();
    let configuration_index = |query: &QueryAp| -> usize {
        // Both counts were checked to fit in u32 above.
        let key = (query.n_pos as u32, query.n_total as u32);
        configurations
            .binary_search(&key)
            .expect("every configuration was collected")
    };

    let groups: Vec<(u32, Vec<&QueryAp>)> = queries_by_label.into_iter().collect();
    let scored: Vec<(u32, usize, f64, f64)> = groups
        .par_iter()
        .map(|(label, queries)| {
            let m = queries.len();
            let map = queries.iter().map(|q| q.average_precision).sum::<f64>() / m as f64;
            let mut weights: BTreeMap<usize, f64> = BTreeMap::new();
            for query in queries {
                *weights.entry(configuration_index(query)).or_default() += 1.0;
            }
            let mut null_sum = vec![0.0; null_size];
            for (&c, &count) in &weights {
                for (acc, &v) in null_sum.iter_mut().zip(&null_by_configuration[c]) {
                    *acc += count * v;
                }
            }
            let above = null_sum.iter().filter(|&&sum| sum / m as f64 > map).count();
            let p_value = (above + 1) as f64 / (null_size + 1) as f64;
            (*label, m, map, p_value)
        })
        .collect();

    let p_values: Vec<f64> = scored.iter().map(|s| s.3).collect();
    let q_values = benjamini_hochberg(&p_values);
    Ok(scored
        .into_iter()
        .zip(q_values)
        .map(|((label, n_profiles, map, p_value), q_value)| LabelMap {
            label,
            n_profiles,
            mean_average_precision: map,
            p_value,
            corrected_p_value: q_value,
            below_p: p_value < threshold,
            below_corrected_p: q_value < threshold,
        })
        .collect())
}

/// Benjamini-Hochberg adjusted p-values (statsmodels `multipletests(method="fdr_bh")`):
/// `q_(i) = min_{j >= i} p_(j) m / j` over the ascending p-values, capped at 1, in input order.
/// NaN p-values are left out of `m` and get NaN.
pub fn benjamini_hochberg(p_values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..p_values.len())
        .filter(|&i| !p_values[i].is_nan())
        .collect();
    order.sort_by(|&a, &b| p_values[a].total_cmp(&p_values[b]));
    let m = order.len() as f64;
    let mut q_values = vec![f64::NAN; p_values.len()];
    let mut running_min = f64::INFINITY;
    for (rank, &i) in order.iter().enumerate().rev() {
        let raw = p_values[i] / ((rank + 1) as f64 / m);
        running_min = running_min.min(raw);
        q_values[i] = running_min.min(1.0);
    }
    q_values
}

/// Mean mAP and the fractions of significant labels over the labels whose mAP, p and q are
/// all finite (Arevalo's `dropna`); `n_single_replicate_labels` is carried through for the
/// report (e.g. `ApOutput::single_replicate_labels.len()`). Empty input gives NaN fractions.
pub fn summarize_map(per_label: &[LabelMap], n_single_replicate_labels: usize) -> MapSummary {
    let valid: Vec<&LabelMap> = per_label
        .iter()
        .filter(|l| {
            l.mean_average_precision.is_finite()
                && l.p_value.is_finite()
                && l.corrected_p_value.is_finite()
        })
        .collect();
    let n = valid.len() as f64;
    let fraction =
        |pred: fn(&LabelMap) -> bool| valid.iter().filter(|l| pred(l)).count() as f64 / n;
    MapSummary {
        mean_map: valid.iter().map(|l| l.mean_average_precision).sum::<f64>() / n,
        fraction_below_p: fraction(|l| l.below_p),
        fraction_below_corrected_p: fraction(|l| l.below_corrected_p),
        n_groups: valid.len(),
        n_profiles: valid.iter().map(|l| l.n_profiles).sum(),
        n_single_replicate_labels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_rows(rng: &mut ChaCha8Rng, n: usize, d: usize) -> Vec<f64> {
        (0..n * d).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// Rows `2k` and `2k + 1` have a cosine within rounding of the midpoint between two adjacent
    /// `f32` values, where the summation order can decide the rounding.
    fn near_midpoint_pairs(rng: &mut ChaCha8Rng, pairs: usize, d: usize) -> Vec<f64> {
        let mut x = Vec::with_capacity(2 * pairs * d);
        for _ in 0..pairs {
            let lower: f32 = rng.random_range(-0.9..0.9);
            let target = (f64::from(lower) + f64::from(lower.next_up())) / 2.0;
            let u = random_rows(rng, 1, d);
            let u_norm = u.iter().map(|v| v * v).sum::<f64>().sqrt();
            let u: Vec<f64> = u.iter().map(|v| v / u_norm).collect();
            let w = random_rows(rng, 1, d);
            let along = u.iter().zip(&w).map(|(a, b)| a * b).sum::<f64>();
            let w: Vec<f64> = w.iter().zip(&u).map(|(b, a)| b - along * a).collect();
            let w_norm = w.iter().map(|v| v * v).sum::<f64>().sqrt();
            let across = (1.0 - target * target).sqrt();
            x.extend_from_slice(&u);
            x.extend(
                u.iter()
                    .zip(&w)
                    .map(|(a, b)| target * a + across * b / w_norm),
            );
        }
        x
    }

    #[test]
    fn matrix_product_keys_equal_scalar_keys_to_the_bit() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let d = 300;
        let mut x = near_midpoint_pairs(&mut rng, 400, d);
        x.extend(random_rows(&mut rng, 200, d));
        let n = x.len() / d;
        let rows: Vec<usize> = (0..n).collect();
        let unit = UnitRows::new(&x, d, n, &rows, rows.clone()).unwrap();
        let all = unit.slab(0..n);
        let mut scratch = KeyScratch::default();
        let keys = unit
            .rank_keys(&rows, all, &rows, all, &mut scratch)
            .to_vec();
        let mut raw_product_disagreements = 0;
        for a in 0..n {
            for b in 0..n {
                let scalar = unit.rank_key(a, b);
                assert_eq!(
                    keys[a * n + b].to_bits(),
                    scalar.to_bits(),
                    "pair ({a}, {b})"
                );
                let product: f64 = unit
                    .row(a)
                    .iter()
                    .zip(unit.row(b))
                    .map(|(u, v)| u * v)
                    .sum();
                if (1.0 - product as f32).to_bits() != scalar.to_bits() {
                    raw_product_disagreements += 1;
                }
            }
        }
        // The constructed pairs do straddle rounding boundaries: without the recomputation,
        // another summation order would change some keys.
        assert!(raw_product_disagreements > 0);
    }

    /// The per-query APs as the scalar reference computes them (every pair with
    /// `numpy_pairwise_dot`, full sort).
    fn reference_aps(x: &[f64], d: usize, meta: &MapMetadata, rules: PairRules) -> Vec<f64> {
        let n = meta.labels.len();
        let rows: Vec<usize> = (0..n).collect();
        let unit = UnitRows::new(x, d, n, &rows, rows.clone()).unwrap();
        let count = |label: u32| meta.labels.iter().filter(|&&l| l == label).count();
        let is_query = |r: usize| count(meta.labels[r]) > 1 && !meta.is_negcon[r];
        let is_candidate = |r: usize| match rules {
            PairRules::Negcon => count(meta.labels[r]) > 1 && meta.is_negcon[r],
            PairRules::Nonrep => is_query(r),
        };
        (0..n)
            .filter(|&q| is_query(q))
            .map(|q| {
                let mut ranked = Vec::new();
                for o in (0..n).filter(|&o| is_query(o) && o != q) {
                    let wells_ok = rules == PairRules::Nonrep || meta.wells[o] != meta.wells[q];
                    if meta.labels[o] == meta.labels[q] && wells_ok {
                        ranked.push((unit.rank_key(q, o), true));
                    }
                }
                let n_pos = ranked.len();
                for o in (0..n).filter(|&o| is_candidate(o) && meta.plates[o] == meta.plates[q]) {
                    if rules == PairRules::Negcon || meta.labels[o] != meta.labels[q] {
                        ranked.push((unit.rank_key(q, o), false));
                    }
                }
                average_precision_of_ranking(&mut ranked, n_pos)
            })
            .collect()
    }

    #[test]
    fn blocked_aps_equal_scalar_reference_to_the_bit() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (n, d) = (700, 150);
        let mut x = random_rows(&mut rng, n, d);
        // Exact duplicates (tied keys) and near-midpoint pairs on the same plate.
        x[..40 * d].copy_from_slice(&near_midpoint_pairs(&mut rng, 20, d));
        x.copy_within(100 * d..101 * d, 137 * d);
        let labels: Vec<u32> = (0..n).map(|i| (i % 37) as u32).collect();
        let plates: Vec<u32> = (0..n).map(|i| (i / 100) as u32).collect();
        let wells: Vec<u32> = (0..n).map(|i| (i % 24) as u32).collect();
        let is_negcon: Vec<bool> = labels.iter().map(|&l| l == 36).collect();
        let meta = MapMetadata {
            labels: &labels,
            plates: &plates,
            wells: &wells,
            is_negcon: &is_negcon,
        };
        for rules in [PairRules::Negcon, PairRules::Nonrep] {
            let fast = average_precision_with(&x, d, &meta, rules).unwrap();
            let reference = reference_aps(&x, d, &meta, rules);
            assert_eq!(fast.queries.len(), reference.len());
            for (q, r) in fast.queries.iter().zip(&reference) {
                assert_eq!(
                    q.average_precision.to_bits(),
                    r.to_bits(),
                    "{rules:?} row {}",
                    q.row
                );
            }
        }
    }
}
