//! Synthetic Cell Painting-like profiles with realistic, non-trivial batch effects.
//!
//! A Rust port of `shared/data/synthetic/synth.py`: the same generative model, parameters and
//! defaults, and the same output layout, but a different random number generator
//! ([`ChaCha8Rng`]), so the numbers are not bit-identical with the numpy generator; the
//! distributions are the same.
//!
//! # Generative model
//!
//! *Biology (batch independent).* A latent space of dimension `q = min(d, latent_dim)`; a
//! `d x q` loading matrix `W` with orthonormal columns; `k` compound clusters plus one
//! negative-control cluster (`DMSO`, centred at 0). Compound centres are
//! `mu_k = potency_k * N(0, sep^2 I_q)` with `potency_k ~ U[min_potency, 1]`; each cluster has an
//! anisotropic within-cluster scale vector `s_c = exp(N(0, 0.25^2))` per latent dimension. A
//! point of cluster `c` is `z = mu_c + s_c * eps`, `x = W z + noise * e`. The first
//! `positive_controls` compounds (`cpd_000`, ...) are positive controls: potency 1 (a clear
//! phenotype, as far from DMSO as any compound).
//!
//! *Batch effects (every batch gets them).* (1) density: the within-cluster deviation is
//! multiplied by `rho_b ~ U[0.6, 1.6]`; (2) rotation: `x <- x + U_b (R_b - I) U_b^T x` with
//! `U_b` a random orthonormal `d x max(2, d / 3)` basis and `R_b = exp(S)`, `S` skew-symmetric
//! with largest rotation angle `U[0.5, 1] * rot_angle`; (3) per-feature scaling
//! `exp(N(0, scale_sd^2))`; (4) optional warp `x_f <- x_f + w_f tanh(x_f)`,
//! `w_f ~ N(0, warp^2)`; (5) shift `N(0, (shift * sep)^2 I_d)`; plus a per-plate shift
//! `N(0, (plate_shift * sep)^2 I_d)` nested in the batch.
//!
//! *Composition.* DMSO is a fraction `control_frac` of every batch; the compound proportions of
//! a batch are `Dirichlet(dirichlet)` (`f64::INFINITY` = balanced); with `missing_frac = p` each
//! compound is dropped from each batch with probability `p`, but stays in at least
//! `min_batches` batches. Per-batch counts are exact (largest remainder), batch sizes differ by
//! at most one row.
//!
//! *Confounding (batches hold different biology).* With `unique_frac = u`,
//! `round(u * (k - positive_controls))` of the treatment compounds, chosen at random, occur in
//! exactly one batch each; their batches are dealt round-robin over a random order of the
//! batches, so every batch gets some (when there are at least as many as batches) and the
//! numbers per batch differ by at most one. The other treatments follow the `missing_frac` /
//! `min_batches` rule, and the positive controls (like DMSO) are in every batch. This mimics
//! JUMP-style screens, where sources share only the controls and a few compounds: a batch
//! effect is then confounded with biology, and a correction that simply aligns the batches
//! erases real signal. The batch effects themselves vary along the manifold (the rotation,
//! the per-feature scale and the optional `warp` act differently on different clusters).
//! [`SynthParams::confounded`] is a preset (`unique_frac` 0.8, 2 positive controls, `warp`
//! 0.3); [`SynthSummary::unique_batch`] and [`SynthSummary::pert_type`] give the ground truth.
//! When `unique_frac > 0` or `positive_controls > 0` the output gains a `Metadata_PertType`
//! column (`negcon` = DMSO, `poscon`, `trt`) after `Metadata_IsControl`; with both at 0 (the
//! default) the output is exactly that of the model without these options.
//!
//! # Layout and determinism
//!
//! The columns are `Metadata_Batch`, `Metadata_Plate`, `Metadata_Well`, `Metadata_Compound`,
//! `Metadata_IsControl` (DMSO), [`Metadata_PertType`,] then float32 features `f0..f{d-1}`.
//! Rows are ordered by batch, then plate; within a plate the compounds are in random order and
//! wells are drawn at random from the 384-well layout (so plate + well is not unique). All
//! randomness derives from [`SynthParams::seed`]: the model comes from one ChaCha8 stream, the
//! row layout of batch `b` (plate sizes, compound order, wells) from a sequential stream of its
//! own, and the features of row `i` of batch `b` from a fixed position (`i` times a fixed
//! number of words) of a per-batch feature stream. The data therefore do not depend on the
//! chunk size, and memory is proportional to the chunk size (plus `O(k + plates)`), not to `n`.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use datafusion::arrow::array::{ArrayRef, BooleanArray, Float32Array, StringBuilder};
use datafusion::arrow::buffer::BooleanBuffer;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::properties::WriterProperties;
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par, Side};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{BalansError, Result};

/// Row letters of a 384-well plate (16 rows x 24 columns).
const WELL_ROWS: &[u8] = b"ABCDEFGHIJKLMNOP";
/// Well columns of a 384-well plate.
const WELL_COLS: usize = 24;
/// Rows per feature tile (the unit of parallel work; does not change the data).
const TILE_ROWS: usize = 4096;
/// Largest Parquet row group written by [`write_parquet`].
const MAX_ROW_GROUP: usize = 1 << 20;
/// Smallest Parquet row group written by [`write_parquet`] (unless a batch is smaller).
const MIN_ROW_GROUP: usize = 1 << 16;
/// ChaCha stream of the model parameters.
const STREAM_MODEL: u64 = 0;
/// ChaCha stream family of the per-batch row layouts (`| batch`).
const STREAM_LAYOUT: u64 = 1 << 32;
/// ChaCha stream family of the per-batch feature draws (`| batch`).
const STREAM_FEATURES: u64 = 2 << 32;

/// Parameters of the synthetic generator; [`Default`] equals `synth.py`'s defaults.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SynthParams {
    /// Number of rows (profiles). Default 10,000.
    pub n: usize,
    /// Number of features `f0..f{d-1}`. Default 10.
    pub d: usize,
    /// Number of compound clusters (`cpd_000`..; DMSO is extra). Default 10.
    pub k: usize,
    /// Number of batches (`batch_00`..). Default 5.
    pub batches: usize,
    /// Seed of all randomness. Default 0.
    pub seed: u64,
    /// Latent dimension; the model uses `min(d, latent_dim)`. Default 16.
    pub latent_dim: usize,
    /// Standard deviation of the compound centres, in latent units. Default 3.0.
    pub sep: f64,
    /// A compound centre is `sep * U[min_potency, 1] * N(0, I)` (weak compounds sit near DMSO).
    /// Default 0.25.
    pub min_potency: f64,
    /// Isotropic feature noise standard deviation. Default 0.3.
    pub noise: f64,
    /// Batch shift standard deviation, in units of `sep`. Default 0.4.
    pub shift: f64,
    /// Standard deviation of the log per-feature batch scale. Default 0.2.
    pub scale_sd: f64,
    /// Largest angle (radians) of the batch subspace rotation. Default 0.6.
    pub rot_angle: f64,
    /// Standard deviation of the optional per-batch tanh warp (0 = off). Default 0.0.
    pub warp: f64,
    /// Plates per batch (`batch_0b_plate_0p`). Default 4.
    pub plates_per_batch: usize,
    /// Plate shift standard deviation, in units of `sep`. Default 0.05.
    pub plate_shift: f64,
    /// Fraction of DMSO rows in each batch. Default 0.1.
    pub control_frac: f64,
    /// Dirichlet concentration of the per-batch compound proportions;
    /// `f64::INFINITY` (the default) = balanced.
    pub dirichlet: f64,
    /// Probability that a compound is absent from a batch (unbalanced design). Default 0.0.
    pub missing_frac: f64,
    /// Each compound stays in at least `min(min_batches, batches)` batches. Default 2.
    pub min_batches: usize,
    /// Fraction of the treatment compounds (all but the positive controls) that occur in
    /// exactly one batch, `round(unique_frac * (k - positive_controls))` of them (confounded
    /// design). Default 0.0.
    pub unique_frac: f64,
    /// The first `positive_controls` compounds (`cpd_000`, ...) are positive controls: potency
    /// 1 and present in every batch. Must be `< k`. Default 0.
    pub positive_controls: usize,
}

impl Default for SynthParams {
    fn default() -> Self {
        Self {
            n: 10_000,
            d: 10,
            k: 10,
            batches: 5,
            seed: 0,
            latent_dim: 16,
            sep: 3.0,
            min_potency: 0.25,
            noise: 0.3,
            shift: 0.4,
            scale_sd: 0.2,
            rot_angle: 0.6,
            warp: 0.0,
            plates_per_batch: 4,
            plate_shift: 0.05,
            control_frac: 0.1,
            dirichlet: f64::INFINITY,
            missing_frac: 0.0,
            min_batches: 2,
            unique_frac: 0.0,
            positive_controls: 0,
        }
    }
}

impl SynthParams {
    /// The confounded preset on top of `self`: `unique_frac` 0.8, 2 positive controls (fewer
    /// when `k <= 2`) and `warp` 0.3 (batches hold mostly different compounds, as JUMP sources
    /// do, and the batch effect is non-linear).
    pub fn confounded(self) -> Self {
        Self {
            unique_frac: 0.8,
            positive_controls: 2.min(self.k.saturating_sub(1)),
            warp: 0.3,
            ..self
        }
    }

    /// Whether the output has a `Metadata_PertType` column.
    fn has_pert_type(&self) -> bool {
        self.unique_frac > 0.0 || self.positive_controls > 0
    }

    /// Checks the parameters; the error names the first offending one.
    fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(BalansError::InvalidArgument(format!("synth: {what}")));
        if self.d == 0 {
            return bad("d must be at least 1");
        }
        if self.k == 0 {
            return bad("k (compounds) must be at least 1");
        }
        if self.batches == 0 {
            return bad("batches must be at least 1");
        }
        if self.latent_dim == 0 {
            return bad("latent_dim must be at least 1");
        }
        if self.plates_per_batch == 0 {
            return bad("plates_per_batch must be at least 1");
        }
        let non_negative = [
            ("sep", self.sep),
            ("noise", self.noise),
            ("shift", self.shift),
            ("scale_sd", self.scale_sd),
            ("rot_angle", self.rot_angle),
            ("warp", self.warp),
            ("plate_shift", self.plate_shift),
        ];
        for (name, v) in non_negative {
            if !(v.is_finite() && v >= 0.0) {
                return bad(&format!("{name} must be finite and >= 0, got {v}"));
            }
        }
        let unit = [
            ("min_potency", self.min_potency),
            ("control_frac", self.control_frac),
            ("missing_frac", self.missing_frac),
            ("unique_frac", self.unique_frac),
        ];
        for (name, v) in unit {
            if !(0.0..=1.0).contains(&v) {
                return bad(&format!("{name} must be in [0, 1], got {v}"));
            }
        }
        if self.positive_controls >= self.k {
            return bad(&format!(
                "positive_controls must be < k (the number of compounds, {}), got {}",
                self.k, self.positive_controls
            ));
        }
        if self.dirichlet.is_nan() || self.dirichlet <= 0.0 {
            return bad(&format!(
                "dirichlet must be > 0 (inf = balanced), got {}",
                self.dirichlet
            ));
        }
        Ok(())
    }
}

/// A name and a row count (for [`SynthSummary`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamedCount {
    /// Batch or compound name.
    pub name: String,
    /// Number of rows.
    pub count: u64,
}

/// What the generator produced, plus ground truth about the model (JSON-serialisable).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SynthSummary {
    /// Output path (empty when the summary did not come from [`write_parquet`]).
    pub path: String,
    /// Number of rows.
    pub n: u64,
    /// Number of features.
    pub d: usize,
    /// Number of compounds (DMSO not included).
    pub k: usize,
    /// Number of batches.
    pub batches: usize,
    /// Seed.
    pub seed: u64,
    /// Wall time in seconds (0 when nothing was written).
    pub seconds: f64,
    /// Rows per batch, in batch order.
    pub batch_counts: Vec<NamedCount>,
    /// Rows per compound over all batches, DMSO first.
    pub compound_counts: Vec<NamedCount>,
    /// `present[b][k]`: whether compound `k` can occur in batch `b`.
    pub present: Vec<Vec<bool>>,
    /// Potency of each compound (its centre's scale relative to `sep`).
    pub potency: Vec<f64>,
    /// `unique_batch[k]`: the only batch compound `k` occurs in, when it was made unique to one
    /// batch by `unique_frac` (`None` for the others).
    pub unique_batch: Vec<Option<usize>>,
    /// Perturbation type of each compound: `poscon` or `trt` (DMSO, not listed, is `negcon`).
    pub pert_type: Vec<String>,
    /// Within-cluster density factor of each batch.
    pub density: Vec<f64>,
    /// Euclidean norm of each batch's shift vector.
    pub shift_norm: Vec<f64>,
    /// Median distance between the latent cluster centres (DMSO included).
    pub centre_dist_median: f64,
}

/// Per-batch effect, folded for fast generation.
struct BatchEffect {
    /// Within-cluster density factor `rho_b`.
    density: f64,
    /// `(q + d_noise) x d` matrix mapping a row `[z, e]` to the linear part of `x`:
    /// rows `0..q` are `(diag(a) M W)^T`, rows `q..` are `noise * (diag(a) M)^T`, with
    /// `M = I + U (R - I) U^T`.
    linear: Mat<f64>,
    /// Optional per-feature warp weights.
    warp: Option<Vec<f64>>,
    /// `plate_offset[p * d + j]` = batch shift + plate shift of feature `j` on plate `p`.
    plate_offset: Vec<f64>,
    /// Norm of the batch shift.
    shift_norm: f64,
}

/// The model, shared by all iterators.
struct Inner {
    params: SynthParams,
    q: usize,
    /// Latent cluster centres, `(k + 1) x q` row-major (DMSO = row 0 = 0).
    mu: Vec<f64>,
    /// Within-cluster scale vectors, `(k + 1) x q` row-major.
    spread: Vec<f64>,
    potency: Vec<f64>,
    effects: Vec<BatchEffect>,
    present: Vec<Vec<bool>>,
    /// The only batch of each compound made unique by `unique_frac`.
    unique_batch: Vec<Option<usize>>,
    /// Perturbation type per cluster (`negcon` for DMSO first).
    pert_names: Vec<String>,
    /// Rows per batch and cluster, `counts[b][c]` (cluster 0 = DMSO).
    counts: Vec<Vec<u64>>,
    schema: SchemaRef,
    base_rng: ChaCha8Rng,
    batch_names: Vec<String>,
    plate_names: Vec<Vec<String>>,
    compound_names: Vec<String>,
    well_names: Vec<String>,
}

impl Inner {
    /// Normal draws per row (`q`, plus `d` when there is noise).
    fn draws_per_row(&self) -> usize {
        self.q
            + if self.params.noise > 0.0 {
                self.params.d
            } else {
                0
            }
    }

    /// 32-bit ChaCha words consumed per row (one `u64` per normal draw).
    fn words_per_row(&self) -> u128 {
        2 * self.draws_per_row() as u128
    }

    fn rng(&self, stream: u64) -> ChaCha8Rng {
        let mut rng = self.base_rng.clone();
        rng.set_stream(stream);
        rng.set_word_pos(0);
        rng
    }
}

/// The synthetic data model, built once from [`SynthParams`]; cheap to clone.
#[derive(Clone)]
pub struct SynthModel {
    inner: Arc<Inner>,
}

impl fmt::Debug for SynthModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SynthModel")
            .field("params", &self.inner.params)
            .field("counts", &self.inner.counts)
            .finish_non_exhaustive()
    }
}

impl SynthModel {
    /// Draws the model (biology, batch effects, composition and exact per-batch counts).
    pub fn new(params: &SynthParams) -> Result<Self> {
        params.validate()?;
        let p = params;
        let (d, kk, nb) = (p.d, p.k, p.batches);
        let q = d.min(p.latent_dim);
        let base_rng = ChaCha8Rng::seed_from_u64(p.seed);
        let mut rng = base_rng.clone();
        rng.set_stream(STREAM_MODEL);

        // Biology.
        let w = orthonormal(&mut rng, d, q);
        let mut potency: Vec<f64> = (0..kk)
            .map(|_| uniform(&mut rng, p.min_potency, 1.0))
            .collect();
        // Positive controls: full potency (drawn anyway, so the stream does not depend on it).
        for v in &mut potency[..p.positive_controls] {
            *v = 1.0;
        }
        let mut mu = vec![0.0; (kk + 1) * q];
        for (c, pot) in potency.iter().enumerate() {
            for v in &mut mu[(c + 1) * q..(c + 2) * q] {
                *v = normal(&mut rng) * p.sep * pot;
            }
        }
        let spread: Vec<f64> = (0..(kk + 1) * q)
            .map(|_| (0.25 * normal(&mut rng)).exp())
            .collect();

        // Batch effects, then composition.
        let r_rot = d.min((d / 3).max(2));
        let effects = (0..nb)
            .map(|_| BatchEffect::draw(&mut rng, p, &w, r_rot))
            .collect::<Result<Vec<_>>>()?;
        let unique_batch = draw_unique(&mut rng, p);
        let present = draw_present(&mut rng, p, &unique_batch);
        let props: Vec<Vec<f64>> = present
            .iter()
            .map(|row| proportions(&mut rng, p, row))
            .collect();
        let counts = batch_counts(p.n as u64, &props);

        // Names and schema.
        let batch_names: Vec<String> = (0..nb).map(|b| format!("batch_{b:02}")).collect();
        let plate_names = batch_names
            .iter()
            .map(|bn| {
                (0..p.plates_per_batch)
                    .map(|pl| format!("{bn}_plate_{pl:02}"))
                    .collect()
            })
            .collect();
        let compound_names = std::iter::once("DMSO".to_string())
            .chain((0..kk).map(|c| format!("cpd_{c:03}")))
            .collect();
        let pert_names = std::iter::once("negcon".to_string())
            .chain((0..kk).map(|c| pert_type(p, c).to_string()))
            .collect();
        let well_names = WELL_ROWS
            .iter()
            .flat_map(|&r| (1..=WELL_COLS).map(move |c| format!("{}{c:02}", r as char)))
            .collect();
        let mut fields = vec![
            Field::new("Metadata_Batch", DataType::Utf8, true),
            Field::new("Metadata_Plate", DataType::Utf8, true),
            Field::new("Metadata_Well", DataType::Utf8, true),
            Field::new("Metadata_Compound", DataType::Utf8, true),
            Field::new("Metadata_IsControl", DataType::Boolean, true),
        ];
        if p.has_pert_type() {
            fields.push(Field::new("Metadata_PertType", DataType::Utf8, true));
        }
        fields.extend((0..d).map(|j| Field::new(format!("f{j}"), DataType::Float32, true)));
        let schema = Arc::new(Schema::new(fields));

        Ok(Self {
            inner: Arc::new(Inner {
                params: p.clone(),
                q,
                mu,
                spread,
                potency,
                effects,
                present,
                unique_batch,
                pert_names,
                counts,
                schema,
                base_rng,
                batch_names,
                plate_names,
                compound_names,
                well_names,
            }),
        })
    }

    /// The parameters the model was built from.
    pub fn params(&self) -> &SynthParams {
        &self.inner.params
    }

    /// The output schema: five `Metadata_*` columns (six with `Metadata_PertType`, see the
    /// module docs), then float32 features `f0..f{d-1}`.
    pub fn schema(&self) -> SchemaRef {
        self.inner.schema.clone()
    }

    /// Exact rows per batch and cluster: `counts()[b][c]`, cluster 0 = DMSO, cluster `1 + i` =
    /// `cpd_{i:03}`.
    pub fn counts(&self) -> &[Vec<u64>] {
        &self.inner.counts
    }

    /// Ground-truth summary of the model (`path` empty, `seconds` 0).
    pub fn summary(&self) -> SynthSummary {
        let inner = &*self.inner;
        let p = &inner.params;
        let batch_counts = inner
            .batch_names
            .iter()
            .zip(&inner.counts)
            .map(|(name, c)| NamedCount {
                name: name.clone(),
                count: c.iter().sum(),
            })
            .collect::<Vec<_>>();
        let compound_counts = inner
            .compound_names
            .iter()
            .enumerate()
            .map(|(c, name)| NamedCount {
                name: name.clone(),
                count: inner.counts.iter().map(|row| row[c]).sum(),
            })
            .collect();
        let q = inner.q;
        let mut dists = Vec::new();
        for i in 0..=p.k {
            for j in i + 1..=p.k {
                let (a, b) = (&inner.mu[i * q..(i + 1) * q], &inner.mu[j * q..(j + 1) * q]);
                dists.push(
                    a.iter()
                        .zip(b)
                        .map(|(x, y)| (x - y).powi(2))
                        .sum::<f64>()
                        .sqrt(),
                );
            }
        }
        SynthSummary {
            path: String::new(),
            n: batch_counts.iter().map(|c| c.count).sum(),
            d: p.d,
            k: p.k,
            batches: p.batches,
            seed: p.seed,
            seconds: 0.0,
            batch_counts,
            compound_counts,
            present: inner.present.clone(),
            potency: inner.potency.clone(),
            unique_batch: inner.unique_batch.clone(),
            pert_type: inner.pert_names[1..].to_vec(),
            density: inner.effects.iter().map(|e| e.density).collect(),
            shift_norm: inner.effects.iter().map(|e| e.shift_norm).collect(),
            centre_dist_median: median(&mut dists),
        }
    }

    /// Generates the rows in order, at most `chunk_rows` (at least 1) per [`RecordBatch`]; a
    /// record batch never spans two `Metadata_Batch` values. Memory is proportional to
    /// `chunk_rows`, and the concatenated data do not depend on `chunk_rows`.
    pub fn batches(&self, chunk_rows: usize) -> SynthBatches {
        SynthBatches {
            inner: self.inner.clone(),
            chunk_rows: chunk_rows.max(1),
            batch: 0,
            row: 0,
            layout: None,
        }
    }
}

/// Iterator over the generated record batches (see [`SynthModel::batches`]).
pub struct SynthBatches {
    inner: Arc<Inner>,
    chunk_rows: usize,
    /// Current batch.
    batch: usize,
    /// Next row within the current batch.
    row: u64,
    layout: Option<Layout>,
}

impl fmt::Debug for SynthBatches {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SynthBatches")
            .field("chunk_rows", &self.chunk_rows)
            .field("batch", &self.batch)
            .field("row", &self.row)
            .finish_non_exhaustive()
    }
}

/// Sequential row-layout state of one batch.
struct Layout {
    rng: ChaCha8Rng,
    /// Remaining rows per cluster (sampling without replacement = a uniform shuffle).
    remaining: Fenwick,
    /// End row (exclusive) of each plate.
    plate_end: Vec<u64>,
    /// Current plate.
    plate: usize,
}

impl SynthBatches {
    /// The next record batch and the index of the batch it belongs to (`None` at the end).
    fn next_chunk(&mut self) -> Option<Result<(usize, RecordBatch)>> {
        let inner = self.inner.clone();
        let p = &inner.params;
        loop {
            if self.batch >= p.batches {
                return None;
            }
            let b = self.batch;
            let nb: u64 = inner.counts[b].iter().sum();
            if self.row >= nb {
                self.batch += 1;
                self.row = 0;
                self.layout = None;
                continue;
            }
            let layout = self.layout.get_or_insert_with(|| {
                let mut rng = inner.rng(STREAM_LAYOUT | b as u64);
                // Plates are drawn uniformly per row, then rows are grouped by plate.
                let mut sizes = vec![0u64; p.plates_per_batch];
                for _ in 0..nb {
                    sizes[rng.random_range(0..p.plates_per_batch)] += 1;
                }
                let plate_end = sizes
                    .iter()
                    .scan(0, |acc, s| {
                        *acc += s;
                        Some(*acc)
                    })
                    .collect();
                Layout {
                    rng,
                    remaining: Fenwick::new(&inner.counts[b]),
                    plate_end,
                    plate: 0,
                }
            });
            let start = self.row;
            let len = (nb - start).min(self.chunk_rows as u64) as usize;
            let mut labels = Vec::with_capacity(len);
            let mut plates = Vec::with_capacity(len);
            let mut wells = Vec::with_capacity(len);
            for i in 0..len as u64 {
                while layout.plate_end[layout.plate] <= start + i {
                    layout.plate += 1;
                }
                let total = layout.remaining.total();
                let c = layout.remaining.take(layout.rng.random_range(0..total));
                labels.push(c as u32);
                plates.push(layout.plate as u32);
                wells.push(layout.rng.random_range(0..inner.well_names.len()) as u32);
            }
            self.row += len as u64;
            return Some(
                build_record_batch(&inner, b, start, &labels, &plates, &wells).map(|rb| (b, rb)),
            );
        }
    }
}

impl Iterator for SynthBatches {
    type Item = Result<RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_chunk().map(|r| r.map(|(_, rb)| rb))
    }
}

/// Builds one record batch of batch `b`, rows `start..start + labels.len()` of that batch.
fn build_record_batch(
    inner: &Inner,
    b: usize,
    start: u64,
    labels: &[u32],
    plates: &[u32],
    wells: &[u32],
) -> Result<RecordBatch> {
    let len = labels.len();
    let d = inner.params.d;
    let tiles: Vec<Vec<f32>> = (0..len.div_ceil(TILE_ROWS))
        .into_par_iter()
        .map(|t| {
            let lo = t * TILE_ROWS;
            let hi = (lo + TILE_ROWS).min(len);
            feature_tile(
                inner,
                b,
                start + lo as u64,
                &labels[lo..hi],
                &plates[lo..hi],
            )
        })
        .collect();

    let strings = |names: &[String], idx: &mut dyn Iterator<Item = usize>| -> ArrayRef {
        let avg = names.iter().map(String::len).max().unwrap_or(0);
        let mut builder = StringBuilder::with_capacity(len, len * avg);
        for i in idx {
            builder.append_value(&names[i]);
        }
        Arc::new(builder.finish())
    };
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(6 + d);
    columns.push(strings(
        &inner.batch_names[b..=b],
        &mut std::iter::repeat_n(0, len),
    ));
    columns.push(strings(
        &inner.plate_names[b],
        &mut plates.iter().map(|&v| v as usize),
    ));
    columns.push(strings(
        &inner.well_names,
        &mut wells.iter().map(|&v| v as usize),
    ));
    columns.push(strings(
        &inner.compound_names,
        &mut labels.iter().map(|&v| v as usize),
    ));
    columns.push(Arc::new(BooleanArray::new(
        BooleanBuffer::collect_bool(len, |i| labels[i] == 0),
        None,
    )));
    if inner.params.has_pert_type() {
        columns.push(strings(
            &inner.pert_names,
            &mut labels.iter().map(|&v| v as usize),
        ));
    }
    for j in 0..d {
        let mut col = Vec::with_capacity(len);
        for tile in &tiles {
            let rows = tile.len() / d;
            col.extend_from_slice(&tile[j * rows..(j + 1) * rows]);
        }
        columns.push(Arc::new(Float32Array::from(col)));
    }
    Ok(RecordBatch::try_new(inner.schema.clone(), columns)?)
}

/// Features of rows `start..start + labels.len()` of batch `b`, column-major (`rows x d`).
fn feature_tile(inner: &Inner, b: usize, start: u64, labels: &[u32], plates: &[u32]) -> Vec<f32> {
    let (q, d) = (inner.q, inner.params.d);
    let rows = labels.len();
    let m = inner.draws_per_row();
    let effect = &inner.effects[b];
    let mut rng = inner.rng(STREAM_FEATURES | b as u64);
    rng.set_word_pos(start as u128 * inner.words_per_row());

    // g = [z, e] per row (row-major rows x m)
    let mut g = vec![0.0f64; rows * m];
    for (row, &c) in g.chunks_exact_mut(m).zip(labels) {
        fill_normals(&mut rng, row);
        let c = c as usize;
        let (mu, sp) = (
            &inner.mu[c * q..(c + 1) * q],
            &inner.spread[c * q..(c + 1) * q],
        );
        for ((z, mu), sp) in row[..q].iter_mut().zip(mu).zip(sp) {
            *z = mu + effect.density * sp * *z;
        }
    }
    let mut x = Mat::<f64>::zeros(rows, d);
    matmul(
        x.as_mut(),
        Accum::Replace,
        MatRef::from_row_major_slice(&g, rows, m),
        effect.linear.as_ref(),
        1.0,
        Par::Seq,
    );
    let mut out = vec![0.0f32; rows * d];
    for (j, dst) in out.chunks_exact_mut(rows.max(1)).enumerate().take(d) {
        let src = x.col_as_slice(j);
        match &effect.warp {
            Some(w) => {
                for ((o, &v), &pl) in dst.iter_mut().zip(src).zip(plates) {
                    let v = v + w[j] * v.tanh();
                    *o = (v + effect.plate_offset[pl as usize * d + j]) as f32;
                }
            }
            None => {
                for ((o, &v), &pl) in dst.iter_mut().zip(src).zip(plates) {
                    *o = (v + effect.plate_offset[pl as usize * d + j]) as f32;
                }
            }
        }
    }
    out
}

/// Writes the synthetic table to `path` as zstd Parquet, atomically (a `.tmp` file next to it,
/// then a rename), generating `chunk_rows` rows at a time. Row groups never span two batches.
pub fn write_parquet(params: &SynthParams, path: &Path, chunk_rows: usize) -> Result<SynthSummary> {
    let t0 = Instant::now();
    let model = SynthModel::new(params)?;
    let out_err = |message: String| BalansError::Output {
        path: path.display().to_string(),
        message,
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| out_err("not a file path".into()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| out_err(e.to_string()))?;
    }
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(".tmp");
    let tmp: PathBuf = path.with_file_name(tmp_name);

    let written = (|| -> Result<u64> {
        let file = fs::File::create(&tmp).map_err(|e| out_err(e.to_string()))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_max_row_group_row_count(Some(chunk_rows.clamp(MIN_ROW_GROUP, MAX_ROW_GROUP)))
            .build();
        let mut writer = ArrowWriter::try_new(file, model.schema(), Some(props))?;
        let mut rows = 0u64;
        let mut current = None;
        let mut it = model.batches(chunk_rows);
        while let Some(next) = it.next_chunk() {
            let (b, rb) = next?;
            if current.is_some_and(|c| c != b) {
                writer.flush()?;
            }
            current = Some(b);
            rows += rb.num_rows() as u64;
            writer.write(&rb)?;
        }
        writer.close()?;
        Ok(rows)
    })();
    let written = match written {
        Ok(rows) => rows,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        out_err(e.to_string())
    })?;
    let mut summary = model.summary();
    summary.path = path.display().to_string();
    summary.n = written;
    summary.seconds = t0.elapsed().as_secs_f64();
    Ok(summary)
}

/// Writes the data set as a directory of Parquet files of `rows_per_file` rows each
/// (`part-00000.parquet`, ...; the same rows in the same order as [`write_parquet`]). The
/// directory is written under a temporary name and renamed when complete.
pub fn write_parquet_parts(
    params: &SynthParams,
    dir: &Path,
    rows_per_file: usize,
    chunk_rows: usize,
) -> Result<SynthSummary> {
    let t0 = Instant::now();
    let model = SynthModel::new(params)?;
    let out_err = |message: String| BalansError::Output {
        path: dir.display().to_string(),
        message,
    };
    if rows_per_file == 0 {
        return Err(BalansError::InvalidArgument(
            "rows per file must be at least 1".into(),
        ));
    }
    let mut tmp_name = dir
        .file_name()
        .ok_or_else(|| out_err("not a directory path".into()))?
        .to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.with_file_name(tmp_name);
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(|e| out_err(e.to_string()))?;
    let written = (|| -> Result<u64> {
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_max_row_group_row_count(Some(chunk_rows.clamp(MIN_ROW_GROUP, MAX_ROW_GROUP)))
            .build();
        let open = |part: usize| -> Result<ArrowWriter<fs::File>> {
            let file = fs::File::create(tmp.join(format!("part-{part:05}.parquet")))
                .map_err(|e| out_err(e.to_string()))?;
            Ok(ArrowWriter::try_new(
                file,
                model.schema(),
                Some(props.clone()),
            )?)
        };
        let (mut part, mut in_file, mut rows) = (0usize, 0usize, 0u64);
        let mut writer = open(part)?;
        let mut it = model.batches(chunk_rows.min(rows_per_file));
        while let Some(next) = it.next_chunk() {
            let (_, mut rb) = next?;
            while rb.num_rows() > 0 {
                if in_file == rows_per_file {
                    writer.close()?;
                    part += 1;
                    in_file = 0;
                    writer = open(part)?;
                }
                let take = (rows_per_file - in_file).min(rb.num_rows());
                writer.write(&rb.slice(0, take))?;
                rb = rb.slice(take, rb.num_rows() - take);
                in_file += take;
                rows += take as u64;
            }
        }
        writer.close()?;
        Ok(rows)
    })();
    let written = match written {
        Ok(rows) => rows,
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let _ = fs::remove_dir_all(dir);
    fs::rename(&tmp, dir).map_err(|e| out_err(e.to_string()))?;
    let mut summary = model.summary();
    summary.path = dir.display().to_string();
    summary.n = written;
    summary.seconds = t0.elapsed().as_secs_f64();
    Ok(summary)
}

impl BatchEffect {
    /// Draws the effect of one batch (`w`: the `d x q` loadings; `r_rot`: rotated dimensions).
    fn draw(rng: &mut ChaCha8Rng, p: &SynthParams, w: &Mat<f64>, r_rot: usize) -> Result<Self> {
        let (d, q) = (w.nrows(), w.ncols());
        let basis = orthonormal(rng, d, r_rot);
        let angle = uniform(rng, 0.5, 1.0) * p.rot_angle;
        let rot = random_rotation(rng, r_rot, angle)?;
        let density = uniform(rng, 0.6, 1.6);
        let scale: Vec<f64> = (0..d).map(|_| (p.scale_sd * normal(rng)).exp()).collect();
        let shift: Vec<f64> = (0..d).map(|_| normal(rng) * p.shift * p.sep).collect();
        let warp = (p.warp > 0.0).then(|| (0..d).map(|_| p.warp * normal(rng)).collect());
        let mut plate_offset = Vec::with_capacity(p.plates_per_batch * d);
        for _ in 0..p.plates_per_batch {
            for s in &shift {
                plate_offset.push(s + normal(rng) * p.plate_shift * p.sep);
            }
        }
        // L = diag(a) (I + U (R - I) U^T)
        let eye = |i: usize, j: usize| if i == j { 1.0 } else { 0.0 };
        let rmi = Mat::from_fn(r_rot, r_rot, |i, j| rot[(i, j)] - eye(i, j));
        let low_rank = basis.as_ref() * rmi.as_ref() * basis.transpose();
        let l = Mat::from_fn(d, d, |i, j| scale[i] * (low_rank[(i, j)] + eye(i, j)));
        let lw = l.as_ref() * w.as_ref(); // d x q
        let m = q + if p.noise > 0.0 { d } else { 0 };
        let linear = Mat::from_fn(m, d, |i, j| {
            if i < q {
                lw[(j, i)]
            } else {
                p.noise * l[(j, i - q)]
            }
        });
        Ok(Self {
            density,
            linear,
            warp,
            plate_offset,
            shift_norm: shift.iter().map(|v| v * v).sum::<f64>().sqrt(),
        })
    }
}

/// Perturbation type of compound `c` (0-based, DMSO excluded).
fn pert_type(p: &SynthParams, c: usize) -> &'static str {
    if c < p.positive_controls {
        "poscon"
    } else {
        "trt"
    }
}

/// The compounds made unique to one batch by `unique_frac`: `round(unique_frac * t)` of the
/// `t = k - positive_controls` treatments, chosen at random, dealt round-robin over a random
/// order of the batches. Draws nothing when there are none (the default).
fn draw_unique(rng: &mut ChaCha8Rng, p: &SynthParams) -> Vec<Option<usize>> {
    let mut unique = vec![None; p.k];
    let mut candidates: Vec<usize> = (p.positive_controls..p.k).collect();
    let count = ((p.unique_frac * candidates.len() as f64).round() as usize).min(candidates.len());
    if count == 0 {
        return unique;
    }
    // Partial Fisher-Yates: the first `count` candidates are a uniform random subset.
    for i in 0..count {
        let j = rng.random_range(i..candidates.len());
        candidates.swap(i, j);
    }
    let mut order: Vec<usize> = (0..p.batches).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    for (i, &c) in candidates[..count].iter().enumerate() {
        unique[c] = Some(order[i % p.batches]);
    }
    unique
}

/// `present[b][k]`: whether compound `k` may occur in batch `b`: positive controls everywhere,
/// a compound of `unique` in its batch only, the others by `missing_frac` and `min_batches`.
fn draw_present(rng: &mut ChaCha8Rng, p: &SynthParams, unique: &[Option<usize>]) -> Vec<Vec<bool>> {
    let mut present = vec![vec![true; p.k]; p.batches];
    if p.missing_frac > 0.0 {
        // Drawn for every (batch, compound), so the stream does not depend on the other options.
        for row in &mut present {
            for v in row.iter_mut() {
                *v = rng.random::<f64>() >= p.missing_frac;
            }
        }
    }
    for (b, row) in present.iter_mut().enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            if c < p.positive_controls {
                *v = true;
            } else if let Some(only) = unique[c] {
                *v = b == only;
            }
        }
    }
    if p.missing_frac > 0.0 {
        let need = p.min_batches.min(p.batches);
        for c in p.positive_controls..p.k {
            if unique[c].is_some() {
                continue;
            }
            while present.iter().filter(|row| row[c]).count() < need {
                present[rng.random_range(0..p.batches)][c] = true;
            }
        }
    }
    present
}

/// Cluster proportions of one batch (DMSO first) given the compounds present in it.
fn proportions(rng: &mut ChaCha8Rng, p: &SynthParams, present: &[bool]) -> Vec<f64> {
    let weights: Vec<f64> = if p.dirichlet.is_infinite() {
        present
            .iter()
            .map(|&on| if on { 1.0 } else { 0.0 })
            .collect()
    } else {
        // Dirichlet over all compounds (drawn in log space, so tiny concentrations do not
        // underflow), restricted to the present ones.
        let logs: Vec<f64> = (0..p.k)
            .map(|_| log_gamma_sample(rng, p.dirichlet))
            .collect();
        let top = logs
            .iter()
            .zip(present)
            .filter(|(_, on)| **on)
            .map(|(v, _)| *v)
            .fold(f64::NEG_INFINITY, f64::max);
        logs.iter()
            .zip(present)
            .map(|(v, &on)| if on { (v - top).exp() } else { 0.0 })
            .collect()
    };
    let total: f64 = weights.iter().sum();
    let mut props = vec![0.0; p.k + 1];
    if total > 0.0 {
        props[0] = p.control_frac;
        for (dst, w) in props[1..].iter_mut().zip(&weights) {
            *dst = w / total * (1.0 - p.control_frac);
        }
    } else {
        // No compound is present in this batch: it holds DMSO only.
        props[0] = 1.0;
    }
    props
}

/// Exact per-batch, per-cluster counts summing to `n` (batch sizes differ by at most one;
/// within a batch, largest remainder with ties to the lower cluster index).
fn batch_counts(n: u64, props: &[Vec<f64>]) -> Vec<Vec<u64>> {
    let nb = props.len() as u64;
    props
        .iter()
        .enumerate()
        .map(|(b, pr)| {
            let size = n / nb + u64::from((b as u64) < n % nb);
            let exact: Vec<f64> = pr.iter().map(|p| p * size as f64).collect();
            let mut c: Vec<u64> = exact.iter().map(|v| v.floor() as u64).collect();
            let rem = size.saturating_sub(c.iter().sum());
            if rem > 0 {
                let frac: Vec<f64> = exact
                    .iter()
                    .zip(&c)
                    .zip(pr)
                    .map(|((e, &f), &p)| if p == 0.0 { -1.0 } else { e - f as f64 })
                    .collect();
                let mut order: Vec<usize> = (0..pr.len()).collect();
                order.sort_by(|&a, &b| frac[b].total_cmp(&frac[a]));
                for &i in order.iter().take(rem as usize) {
                    c[i] += 1;
                }
            }
            c
        })
        .collect()
}

/// Fenwick tree of remaining counts, for drawing clusters without replacement in O(log k).
struct Fenwick {
    tree: Vec<u64>,
    total: u64,
}

impl Fenwick {
    fn new(counts: &[u64]) -> Self {
        let n = counts.len();
        let mut tree = vec![0u64; n + 1];
        for (i, &c) in counts.iter().enumerate() {
            let mut j = i + 1;
            while j <= n {
                tree[j] += c;
                j += j & j.wrapping_neg();
            }
        }
        Self {
            tree,
            total: counts.iter().sum(),
        }
    }

    fn total(&self) -> u64 {
        self.total
    }

    /// Removes and returns the item at rank `u < total` (items ordered by index).
    fn take(&mut self, mut u: u64) -> usize {
        let n = self.tree.len() - 1;
        let mut pos = 0;
        let mut step = n.checked_ilog2().map_or(0, |l| 1usize << l);
        while step > 0 {
            if pos + step <= n && self.tree[pos + step] <= u {
                pos += step;
                u -= self.tree[pos];
            }
            step >>= 1;
        }
        // `pos` (0-based) is the item; decrement its count.
        let mut j = pos + 1;
        while j <= n {
            self.tree[j] -= 1;
            j += j & j.wrapping_neg();
        }
        self.total -= 1;
        pos
    }
}

/// `[0, 1)` with 53 random bits.
#[inline]
fn unit(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Fills `out` with standard normal draws, one `u64` each (so the stream position of a row is
/// fixed): a random sign and the inverse normal CDF of a uniform in `(0, 1/2)` (Acklam's
/// rational approximation, relative error below 1.2e-9, far below float32 output precision).
#[inline]
fn fill_normals(rng: &mut ChaCha8Rng, out: &mut [f64]) {
    for v in out {
        let bits = rng.next_u64();
        // (k + 1/2) / 2^54 for a 53-bit k: uniform in (0, 1/2), never 0
        let p = ((bits & ((1 << 53) - 1)) as f64 + 0.5) * (1.0 / (1u64 << 54) as f64);
        let z = lower_normal_quantile(p);
        *v = if bits >> 63 == 0 { z } else { -z };
    }
}

/// Standard normal quantile for `p` in `(0, 1/2]` (Acklam; a non-positive value).
#[inline]
fn lower_normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    if p < 0.02425 {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// One standard normal draw.
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let mut v = [0.0];
    fill_normals(rng, &mut v);
    v[0]
}

/// `U[lo, hi)`.
fn uniform(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * unit(rng)
}

/// Logarithm of a `Gamma(alpha, 1)` draw (Marsaglia-Tsang; boosted for `alpha < 1`).
fn log_gamma_sample(rng: &mut ChaCha8Rng, alpha: f64) -> f64 {
    if alpha < 1.0 {
        let u = 1.0 - unit(rng);
        return log_gamma_sample(rng, alpha + 1.0) + u.ln() / alpha;
    }
    let dd = alpha - 1.0 / 3.0;
    let c = 1.0 / (9.0 * dd).sqrt();
    loop {
        let x = normal(rng);
        let v = 1.0 + c * x;
        if v <= 0.0 {
            continue;
        }
        let v = v * v * v;
        let u = 1.0 - unit(rng);
        if u.ln() < 0.5 * x * x + dd * (1.0 - v + v.ln()) {
            return dd.ln() + v.ln();
        }
    }
}

/// `d x q` matrix with orthonormal columns: QR of a Gaussian matrix with the signs fixed so
/// that `R` has a positive diagonal (a Haar-random frame).
fn orthonormal(rng: &mut ChaCha8Rng, d: usize, q: usize) -> Mat<f64> {
    let draws: Vec<f64> = (0..d * q).map(|_| normal(rng)).collect();
    let a = Mat::from_fn(d, q, |i, j| draws[i * q + j]);
    let qr = a.qr();
    let mut qm = qr.compute_thin_Q();
    let r = qr.thin_R();
    for j in 0..q {
        if r[(j, j)] < 0.0 {
            for i in 0..d {
                qm[(i, j)] = -qm[(i, j)];
            }
        }
    }
    qm
}

/// Orthogonal `r x r` matrix `exp(S)`, `S` a random skew-symmetric matrix scaled so that its
/// largest rotation angle (spectral radius) equals `angle`.
fn random_rotation(rng: &mut ChaCha8Rng, r: usize, angle: f64) -> Result<Mat<f64>> {
    let draws: Vec<f64> = (0..r * r).map(|_| normal(rng)).collect();
    let s = Mat::from_fn(r, r, |i, j| draws[i * r + j] - draws[j * r + i]);
    // The eigenvalues of S are +-i theta; those of S^T S are theta^2.
    let sts = s.transpose() * s.as_ref();
    let eig = sts
        .self_adjoint_eigenvalues(Side::Lower)
        .map_err(|e| BalansError::InvalidArgument(format!("synth: rotation generator: {e:?}")))?;
    let top = eig.iter().copied().fold(0.0f64, f64::max).sqrt();
    let factor = angle / top.max(1e-12);
    let s = Mat::from_fn(r, r, |i, j| s[(i, j)] * factor);
    Ok(expm(&s))
}

/// Matrix exponential by scaling and squaring with a Taylor series (for small matrices).
fn expm(a: &Mat<f64>) -> Mat<f64> {
    let n = a.nrows();
    let norm1 = (0..n)
        .map(|j| (0..n).map(|i| a[(i, j)].abs()).sum::<f64>())
        .fold(0.0f64, f64::max);
    let (mut squarings, mut scaled) = (0i32, norm1);
    while scaled > 0.25 && squarings < 60 {
        scaled *= 0.5;
        squarings += 1;
    }
    let scale = 0.5f64.powi(squarings);
    let a = Mat::from_fn(n, n, |i, j| a[(i, j)] * scale);
    let mut result = Mat::<f64>::identity(n, n);
    let mut term = Mat::<f64>::identity(n, n);
    // ||a|| <= 1/4: 18 terms are far below f64 precision.
    for k in 1..=18 {
        let next = term.as_ref() * a.as_ref();
        term = Mat::from_fn(n, n, |i, j| next[(i, j)] / k as f64);
        result = Mat::from_fn(n, n, |i, j| result[(i, j)] + term[(i, j)]);
    }
    for _ in 0..squarings {
        result = result.as_ref() * result.as_ref();
    }
    result
}

/// Median (the mean of the two middle values for an even count; 0 when empty).
fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::compute::concat_batches;
    use datafusion::arrow::datatypes::Float32Type;
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    use super::*;

    /// The README's test set: 3,000 x 20, 10 compounds, 5 batches, seed 7.
    fn readme_params() -> SynthParams {
        SynthParams {
            n: 3000,
            d: 20,
            k: 10,
            batches: 5,
            seed: 7,
            ..SynthParams::default()
        }
    }

    fn generate(params: &SynthParams, chunk_rows: usize) -> RecordBatch {
        let model = SynthModel::new(params).unwrap();
        let parts: Vec<RecordBatch> = model.batches(chunk_rows).map(|r| r.unwrap()).collect();
        concat_batches(&model.schema(), &parts).unwrap()
    }

    fn strings(rb: &RecordBatch, name: &str) -> Vec<String> {
        let col = rb.column_by_name(name).unwrap().as_string::<i32>();
        assert_eq!(col.null_count(), 0);
        col.iter().map(|v| v.unwrap().to_string()).collect()
    }

    /// Row-major `rows x d` features as f64.
    fn features(rb: &RecordBatch, d: usize) -> Vec<Vec<f64>> {
        let cols: Vec<_> = (0..d)
            .map(|j| {
                rb.column_by_name(&format!("f{j}"))
                    .unwrap()
                    .as_primitive::<Float32Type>()
                    .clone()
            })
            .collect();
        (0..rb.num_rows())
            .map(|i| cols.iter().map(|c| f64::from(c.value(i))).collect())
            .collect()
    }

    #[test]
    fn iterator_is_send_and_static() {
        fn check<T: Send + 'static>(_: &T) {}
        let model = SynthModel::new(&readme_params()).unwrap();
        let it = model.batches(100);
        drop(model);
        check(&it);
        assert_eq!(it.map(|rb| rb.unwrap().num_rows()).sum::<usize>(), 3000);
    }

    #[test]
    fn normal_sampler_is_standard_normal() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut z = vec![0.0; 1_000_000];
        fill_normals(&mut rng, &mut z);
        let n = z.len() as f64;
        let mean = z.iter().sum::<f64>() / n;
        let var = z.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        let kurt = z.iter().map(|v| (v - mean).powi(4)).sum::<f64>() / n / (var * var);
        assert!(mean.abs() < 0.005, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "variance {var}");
        assert!((kurt - 3.0).abs() < 0.05, "kurtosis {kurt}");
        // tail and central probabilities of N(0, 1)
        let frac = |pred: &dyn Fn(f64) -> bool| z.iter().filter(|v| pred(**v)).count() as f64 / n;
        assert!((frac(&|v| v < -1.959_964) - 0.025).abs() < 0.001);
        assert!((frac(&|v| v > 2.575_829) - 0.005).abs() < 0.0005);
        assert!((frac(&|v| v.abs() < 0.674_49) - 0.5).abs() < 0.002);
        // the quantile function itself
        assert!((lower_normal_quantile(0.025) + 1.959_963_985).abs() < 1e-8);
        assert!((lower_normal_quantile(1e-10) + 6.361_340_902).abs() < 1e-7);
        assert!((lower_normal_quantile(1e-3) + 3.090_232_306_168).abs() < 1e-8);
        assert!(lower_normal_quantile(0.5).abs() < 1e-15);
    }

    #[test]
    fn defaults_match_synth_py() {
        let p = SynthParams::default();
        assert_eq!((p.n, p.d, p.k, p.batches, p.seed), (10_000, 10, 10, 5, 0));
        assert_eq!(
            (p.latent_dim, p.plates_per_batch, p.min_batches),
            (16, 4, 2)
        );
        assert_eq!(
            (p.sep, p.min_potency, p.noise, p.shift),
            (3.0, 0.25, 0.3, 0.4)
        );
        assert_eq!(
            (p.scale_sd, p.rot_angle, p.warp, p.plate_shift),
            (0.2, 0.6, 0.0, 0.05)
        );
        assert_eq!((p.control_frac, p.missing_frac), (0.1, 0.0));
        assert!(p.dirichlet.is_infinite());
        assert_eq!((p.unique_frac, p.positive_controls), (0.0, 0));
    }

    /// FNV-1a hash of the schema (names and types) and of every string and boolean value,
    /// column by column (the metadata; the float features are left out because their last bits
    /// may depend on the CPU's matrix kernels).
    fn metadata_fingerprint(rb: &RecordBatch) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |bytes: &[u8]| {
            for &b in bytes {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        for f in rb.schema().fields() {
            eat(f.name().as_bytes());
            eat(format!("{}", f.data_type()).as_bytes());
        }
        for col in rb.columns() {
            match col.data_type() {
                DataType::Utf8 => {
                    for v in col.as_string::<i32>().iter() {
                        eat(v.unwrap().as_bytes());
                        eat(&[0]);
                    }
                }
                DataType::Boolean => {
                    for v in col.as_boolean().iter() {
                        eat(&[u8::from(v.unwrap())]);
                    }
                }
                _ => {}
            }
        }
        h
    }

    /// Values recorded from the generator before `unique_frac` and `positive_controls` existed:
    /// with both at their defaults the output must not change.
    #[test]
    fn defaults_unchanged_by_confounding_options() {
        let f = |rb: &RecordBatch, j: usize, i: usize| {
            rb.column_by_name(&format!("f{j}"))
                .unwrap()
                .as_primitive::<Float32Type>()
                .value(i)
        };
        let close = |got: f32, want: f32| {
            assert!(
                (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                "{got} vs {want}"
            );
        };

        // the README set: balanced, every compound everywhere
        let params = readme_params();
        let explicit = SynthParams {
            unique_frac: 0.0,
            positive_controls: 0,
            ..readme_params()
        };
        let rb = generate(&params, 777);
        assert_eq!(rb.num_columns(), 25);
        assert!(rb.column_by_name("Metadata_PertType").is_none());
        assert_eq!(metadata_fingerprint(&rb), 0xa7f9_ccee_a352_99e6);
        close(f(&rb, 0, 0), -0.685_680_27);
        close(f(&rb, 0, 1), 0.587_738_6);
        close(f(&rb, 0, 2), -2.101_705_6);
        close(f(&rb, 0, 2999), -3.063_577_4);
        close(f(&rb, 5, 100), 1.074_909_2);
        close(f(&rb, 5, 1500), 2.898_840_2);
        assert_eq!(generate(&explicit, 4096), rb);
        let summary = SynthModel::new(&params).unwrap().summary();
        assert_eq!(summary.potency[0], 0.476_439_384_946_430_57);
        assert_eq!(summary.potency[9], 0.640_158_192_488_337_9);
        assert_eq!(summary.density[4], 1.249_387_286_092_741_3);
        assert!(summary.unique_batch.iter().all(Option::is_none));
        assert!(summary.pert_type.iter().all(|t| t == "trt"));

        // missing compounds, a warp and Dirichlet proportions (the model stream is longer)
        let params = SynthParams {
            n: 2000,
            seed: 3,
            missing_frac: 0.5,
            warp: 0.3,
            dirichlet: 1.0,
            ..SynthParams::default()
        };
        let model = SynthModel::new(&params).unwrap();
        assert_eq!(
            model.counts()[1],
            vec![40, 78, 0, 191, 0, 0, 0, 0, 0, 76, 15]
        );
        assert_eq!(
            model.counts()[3],
            vec![40, 0, 0, 0, 23, 17, 0, 235, 0, 0, 85]
        );
        let rb = generate(&params, 777);
        assert_eq!(rb.num_columns(), 15);
        assert_eq!(metadata_fingerprint(&rb), 0x762d_2eac_dd51_41ae);
        close(f(&rb, 0, 0), 3.116_412);
        close(f(&rb, 0, 1), 3.456_605_2);
        close(f(&rb, 0, 2), 6.227_917_7);
        close(f(&rb, 0, 1999), -1.694_764_5);
        close(f(&rb, 5, 100), -0.854_075_9);
        close(f(&rb, 5, 1500), -3.413_962_6);
        let summary = model.summary();
        assert_eq!(summary.potency[0], 0.252_563_900_549_514);
        assert_eq!(summary.density[1], 1.599_987_572_916_519_2);
        assert_eq!(
            summary.present[3],
            vec![
                false, false, false, true, true, false, true, false, false, true
            ]
        );
    }

    /// Batches each compound occurs in, from the generated rows.
    fn batches_of_compounds(rb: &RecordBatch) -> BTreeMap<String, BTreeSet<String>> {
        let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (b, c) in strings(rb, "Metadata_Batch")
            .into_iter()
            .zip(strings(rb, "Metadata_Compound"))
        {
            seen.entry(c).or_default().insert(b);
        }
        seen
    }

    #[test]
    fn confounded_design_has_unique_compounds_and_shared_controls() {
        for (seed, missing_frac) in [(0, 0.0), (1, 0.0), (11, 0.0), (5, 0.3)] {
            let params = SynthParams {
                n: 5000,
                d: 6,
                k: 10,
                batches: 5,
                seed,
                unique_frac: 0.8,
                positive_controls: 2,
                missing_frac,
                ..SynthParams::default()
            };
            let model = SynthModel::new(&params).unwrap();
            let summary = model.summary();
            let rb = generate(&params, 999);
            let names: Vec<String> = rb
                .schema()
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect();
            assert_eq!(names.len(), 5 + 1 + 6);
            assert_eq!(names[4], "Metadata_IsControl");
            assert_eq!(names[5], "Metadata_PertType");
            assert_eq!(names[6], "f0");
            assert_eq!(rb.schema().field(5).data_type(), &DataType::Utf8);

            // exactly round(0.8 * 8) = 6 compounds occur in one batch only (from the rows)
            let seen = batches_of_compounds(&rb);
            assert_eq!(seen.len(), 11, "seed {seed}: {seen:?}");
            let single: Vec<&String> = seen
                .iter()
                .filter(|(_, bs)| bs.len() == 1)
                .map(|(c, _)| c)
                .collect();
            assert_eq!(single.len(), 6, "seed {seed}: {seen:?}");
            for c in ["DMSO", "cpd_000", "cpd_001"] {
                assert_eq!(seen[c].len(), 5, "seed {seed}: {c} in {:?}", seen[c]);
            }
            let mut per_batch = [0usize; 5];
            for (c, only) in summary.unique_batch.iter().enumerate() {
                let name = format!("cpd_{c:03}");
                match only {
                    Some(b) => {
                        assert!(c >= 2, "a positive control is never unique");
                        let want: BTreeSet<String> = [format!("batch_{b:02}")].into();
                        assert_eq!(seen[&name], want, "seed {seed}: {name}");
                        per_batch[*b] += 1;
                    }
                    None => {
                        let min = if missing_frac > 0.0 { 2 } else { 5 };
                        assert!(seen[&name].len() >= min, "seed {seed}: {name}");
                    }
                }
            }
            // 6 unique compounds over 5 batches: every batch gets one or two
            assert!(
                per_batch.iter().all(|&v| (1..=2).contains(&v)),
                "seed {seed}: {per_batch:?}"
            );
            assert_eq!(summary.pert_type[..2], ["poscon", "poscon"]);
            assert!(summary.pert_type[2..].iter().all(|t| t == "trt"));
            assert_eq!(summary.potency[..2], [1.0, 1.0]);

            // the PertType column matches the compound
            let pert = strings(&rb, "Metadata_PertType");
            let ctrl = rb.column(4).as_boolean();
            for (i, c) in strings(&rb, "Metadata_Compound").iter().enumerate() {
                let want = match c.as_str() {
                    "DMSO" => "negcon",
                    "cpd_000" | "cpd_001" => "poscon",
                    _ => "trt",
                };
                assert_eq!(pert[i], want, "row {i}: {c}");
                assert_eq!(ctrl.value(i), c == "DMSO");
            }
            // batch sizes and the DMSO fraction are kept
            for c in model.counts() {
                assert_eq!(c.iter().sum::<u64>(), 1000);
                assert_eq!(c[0], 100);
            }
        }

        // positive controls alone: the column appears, every compound stays everywhere
        let params = SynthParams {
            n: 2000,
            d: 4,
            positive_controls: 1,
            ..SynthParams::default()
        };
        let rb = generate(&params, 500);
        assert_eq!(rb.schema().field(5).name(), "Metadata_PertType");
        assert!(batches_of_compounds(&rb).values().all(|bs| bs.len() == 5));
        let pert: BTreeSet<String> = strings(&rb, "Metadata_PertType").into_iter().collect();
        assert_eq!(pert, ["negcon", "poscon", "trt"].map(String::from).into());
        // unique_frac 1: every treatment in one batch, the single positive control everywhere
        let params = SynthParams {
            unique_frac: 1.0,
            ..params
        };
        let seen = batches_of_compounds(&generate(&params, 500));
        assert_eq!(seen.values().filter(|bs| bs.len() == 1).count(), 9);
        assert_eq!(seen["cpd_000"].len(), 5);
    }

    #[test]
    fn confounded_preset() {
        let p = SynthParams::default().confounded();
        assert_eq!((p.unique_frac, p.positive_controls, p.warp), (0.8, 2, 0.3));
        assert_eq!(
            SynthParams {
                k: 2,
                ..SynthParams::default()
            }
            .confounded()
            .positive_controls,
            1
        );
        let model = SynthModel::new(&p).unwrap();
        let summary = model.summary();
        assert_eq!(
            summary.unique_batch.iter().filter(|b| b.is_some()).count(),
            6
        );
        assert!(model.schema().field_with_name("Metadata_PertType").is_ok());
    }

    #[test]
    fn confounding_options_are_validated() {
        let bad = [
            SynthParams {
                unique_frac: -0.1,
                ..SynthParams::default()
            },
            SynthParams {
                unique_frac: 1.5,
                ..SynthParams::default()
            },
            SynthParams {
                unique_frac: f64::NAN,
                ..SynthParams::default()
            },
            SynthParams {
                positive_controls: 10,
                ..SynthParams::default()
            },
            SynthParams {
                k: 3,
                positive_controls: 7,
                ..SynthParams::default()
            },
        ];
        for p in bad {
            let err = SynthModel::new(&p).unwrap_err();
            let BalansError::InvalidArgument(msg) = &err else {
                panic!("{p:?}: {err:?}");
            };
            assert!(
                msg.contains("unique_frac") || msg.contains("positive_controls"),
                "{msg}"
            );
        }
        // the edges are allowed
        for p in [
            SynthParams {
                unique_frac: 1.0,
                positive_controls: 9,
                ..SynthParams::default()
            },
            SynthParams {
                unique_frac: 0.0,
                ..SynthParams::default()
            },
        ] {
            SynthModel::new(&p).unwrap();
        }
    }

    #[test]
    fn schema_shape_and_layout() {
        let params = readme_params();
        let model = SynthModel::new(&params).unwrap();
        let schema = model.schema();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let mut expected = vec![
            "Metadata_Batch",
            "Metadata_Plate",
            "Metadata_Well",
            "Metadata_Compound",
            "Metadata_IsControl",
        ];
        let feats: Vec<String> = (0..20).map(|j| format!("f{j}")).collect();
        expected.extend(feats.iter().map(String::as_str));
        assert_eq!(names, expected);
        for f in &schema.fields()[..4] {
            assert_eq!(f.data_type(), &DataType::Utf8);
        }
        assert_eq!(schema.field(4).data_type(), &DataType::Boolean);
        for f in &schema.fields()[5..] {
            assert_eq!(f.data_type(), &DataType::Float32);
        }

        // every record batch holds one batch and at most chunk_rows rows
        for rb in model.batches(250) {
            let rb = rb.unwrap();
            assert!(rb.num_rows() <= 250 && rb.num_rows() > 0);
            assert_eq!(rb.schema(), schema);
            assert_eq!(
                strings(&rb, "Metadata_Batch")
                    .iter()
                    .collect::<BTreeSet<_>>()
                    .len(),
                1
            );
        }

        let rb = generate(&params, 1000);
        assert_eq!(rb.num_rows(), 3000);
        assert_eq!(rb.num_columns(), 25);
        let batch = strings(&rb, "Metadata_Batch");
        let plate = strings(&rb, "Metadata_Plate");
        let well = strings(&rb, "Metadata_Well");
        let cpd = strings(&rb, "Metadata_Compound");
        let ctrl = rb.column(4).as_boolean();
        assert!(batch.is_sorted(), "rows are ordered by batch");
        assert!(plate.is_sorted(), "rows are ordered by batch, then plate");
        let batches: BTreeSet<_> = batch.iter().cloned().collect();
        let expected: BTreeSet<String> = (0..5).map(|b| format!("batch_{b:02}")).collect();
        assert_eq!(batches, expected);
        let plates: BTreeSet<_> = plate.iter().cloned().collect();
        assert_eq!(plates.len(), 20, "4 plates in each of 5 batches");
        let well_set: BTreeSet<_> = well.iter().cloned().collect();
        for i in 0..rb.num_rows() {
            assert!(plate[i].starts_with(&format!("{}_plate_0", batch[i])));
            assert_eq!(ctrl.value(i), cpd[i] == "DMSO");
            let w = well[i].as_bytes();
            assert_eq!(w.len(), 3);
            assert!(WELL_ROWS.contains(&w[0]));
            let col: usize = well[i][1..].parse().unwrap();
            assert!((1..=24).contains(&col));
        }
        assert!(
            well_set.len() > 300,
            "wells are drawn from the 384-well layout"
        );
        assert!(well_set.contains("A01") && well_set.contains("P24"));
        let cpds: BTreeSet<_> = cpd.iter().cloned().collect();
        assert_eq!(cpds.len(), 11);
        assert!(cpds.contains("DMSO") && cpds.contains("cpd_000") && cpds.contains("cpd_009"));
        for x in features(&rb, 20).iter().flatten() {
            assert!(x.is_finite());
        }
        // compounds are shuffled within a plate, not sorted
        assert!(!cpd[..600].is_sorted());
    }

    #[test]
    fn balanced_composition_matches_readme() {
        let params = readme_params();
        let model = SynthModel::new(&params).unwrap();
        for c in model.counts() {
            assert_eq!(c.len(), 11);
            assert_eq!(c[0], 60);
            assert!(c[1..].iter().all(|&v| v == 54), "{c:?}");
        }
        let rb = generate(&params, 512);
        let mut counts: BTreeMap<(String, String), u64> = BTreeMap::new();
        for (b, c) in strings(&rb, "Metadata_Batch")
            .into_iter()
            .zip(strings(&rb, "Metadata_Compound"))
        {
            *counts.entry((b, c)).or_default() += 1;
        }
        assert_eq!(counts.len(), 55);
        for ((_, c), v) in &counts {
            assert_eq!(*v, if c == "DMSO" { 60 } else { 54 }, "{c}");
        }
        let summary = model.summary();
        assert_eq!(summary.n, 3000);
        assert!(summary.batch_counts.iter().all(|c| c.count == 600));
        assert_eq!(
            summary.compound_counts[0],
            NamedCount {
                name: "DMSO".into(),
                count: 300
            }
        );
        assert!(summary.compound_counts[1..].iter().all(|c| c.count == 270));
        // uneven n: batch sizes differ by at most one
        let model = SynthModel::new(&SynthParams { n: 3003, ..params }).unwrap();
        let sizes: Vec<u64> = model.counts().iter().map(|c| c.iter().sum()).collect();
        assert_eq!(sizes, vec![601, 601, 601, 600, 600]);
    }

    #[test]
    fn deterministic_and_independent_of_chunk_size() {
        // 2 batches of 10,000 rows: several feature tiles per batch
        let params = SynthParams {
            n: 20_000,
            d: 7,
            k: 6,
            batches: 2,
            seed: 11,
            noise: 0.3,
            warp: 0.5,
            ..SynthParams::default()
        };
        let reference = generate(&params, 1 << 20);
        assert_eq!(reference.num_rows(), 20_000);
        for chunk in [977, 4096, 5000, 9999] {
            assert_eq!(generate(&params, chunk), reference, "chunk {chunk}");
        }
        assert_eq!(
            generate(&params, 1 << 20),
            reference,
            "same seed, same data"
        );
        let other = generate(
            &SynthParams {
                seed: 12,
                ..params.clone()
            },
            1 << 20,
        );
        assert_ne!(features(&other, 7), features(&reference, 7));

        // odd number of normal draws per row (q + d = 3 + 3 + ... with noise off) and chunk 1
        let small = SynthParams {
            n: 300,
            d: 3,
            k: 4,
            batches: 3,
            noise: 0.0,
            ..SynthParams::default()
        };
        assert_eq!(generate(&small, 1), generate(&small, 1000));
    }

    /// Mean over features of the one-way ANOVA F statistic of the batch factor.
    fn batch_f_statistic(rb: &RecordBatch, d: usize) -> f64 {
        let x = features(rb, d);
        let batch = strings(rb, "Metadata_Batch");
        let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, b) in batch.iter().enumerate() {
            groups.entry(b).or_default().push(i);
        }
        let (n, nb) = (x.len() as f64, groups.len() as f64);
        let mut f_sum = 0.0;
        for j in 0..d {
            let grand = x.iter().map(|r| r[j]).sum::<f64>() / n;
            let (mut between, mut within) = (0.0, 0.0);
            for rows in groups.values() {
                let m = rows.iter().map(|&i| x[i][j]).sum::<f64>() / rows.len() as f64;
                between += rows.len() as f64 * (m - grand).powi(2);
                within += rows.iter().map(|&i| (x[i][j] - m).powi(2)).sum::<f64>();
            }
            f_sum += (between / (nb - 1.0)) / (within / (n - nb));
        }
        f_sum / d as f64
    }

    #[test]
    fn batch_effect_is_real() {
        let with = batch_f_statistic(&generate(&readme_params(), 4096), 20);
        let without = batch_f_statistic(
            &generate(
                &SynthParams {
                    shift: 0.0,
                    scale_sd: 0.0,
                    rot_angle: 0.0,
                    plate_shift: 0.0,
                    ..readme_params()
                },
                4096,
            ),
            20,
        );
        assert!(with > 20.0, "batch F statistic {with}");
        assert!(without < 3.0, "no batch effect, yet F statistic {without}");
    }

    /// Median distance between compound centroids over the pooled within-compound sd per
    /// feature, in the DMSO-free rows of `batch_00`.
    fn separation(rb: &RecordBatch, d: usize) -> f64 {
        let x = features(rb, d);
        let batch = strings(rb, "Metadata_Batch");
        let cpd = strings(rb, "Metadata_Compound");
        let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for i in 0..x.len() {
            if batch[i] == "batch_00" && cpd[i] != "DMSO" {
                groups.entry(&cpd[i]).or_default().push(i);
            }
        }
        let mut centroids = Vec::new();
        let (mut ss, mut rows) = (0.0, 0usize);
        for idx in groups.values() {
            let c: Vec<f64> = (0..d)
                .map(|j| idx.iter().map(|&i| x[i][j]).sum::<f64>() / idx.len() as f64)
                .collect();
            for &i in idx {
                ss += (0..d).map(|j| (x[i][j] - c[j]).powi(2)).sum::<f64>();
            }
            rows += idx.len();
            centroids.push(c);
        }
        let within_sd = (ss / (rows - groups.len()) as f64 / d as f64).sqrt();
        let mut dists = Vec::new();
        for a in 0..centroids.len() {
            for b in a + 1..centroids.len() {
                let dd: f64 = (0..d)
                    .map(|j| (centroids[a][j] - centroids[b][j]).powi(2))
                    .sum();
                dists.push(dd.sqrt());
            }
        }
        assert_eq!(centroids.len(), 10);
        median(&mut dists) / within_sd
    }

    #[test]
    fn compounds_are_separated() {
        let sep = separation(&generate(&readme_params(), 4096), 20);
        let none = separation(
            &generate(
                &SynthParams {
                    sep: 0.0,
                    ..readme_params()
                },
                4096,
            ),
            20,
        );
        assert!(sep > 4.0, "compound separation {sep}");
        assert!(none < 2.0, "sep = 0, yet separation {none}");
    }

    #[test]
    fn missing_frac_keeps_min_batches() {
        let params = SynthParams {
            n: 6000,
            d: 5,
            k: 20,
            batches: 6,
            seed: 3,
            missing_frac: 0.7,
            min_batches: 3,
            ..SynthParams::default()
        };
        let model = SynthModel::new(&params).unwrap();
        let rb = generate(&params, 700);
        let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (b, c) in strings(&rb, "Metadata_Batch")
            .into_iter()
            .zip(strings(&rb, "Metadata_Compound"))
        {
            seen.entry(c).or_default().insert(b);
        }
        assert_eq!(seen["DMSO"].len(), 6, "DMSO is in every batch");
        assert_eq!(seen.len(), 21);
        let mut absent = 0;
        for c in 0..20 {
            let name = format!("cpd_{c:03}");
            let in_batches = &seen[&name];
            assert!(in_batches.len() >= 3, "{name} in {in_batches:?}");
            absent += 6 - in_batches.len();
            for (b, row) in model.summary().present.iter().enumerate() {
                assert_eq!(
                    row[c],
                    in_batches.contains(&format!("batch_{b:02}")),
                    "{name}"
                );
            }
        }
        assert!(absent >= 20, "the design is unbalanced: {absent} absences");
        // batch sizes and the DMSO fraction are kept
        for c in model.counts() {
            assert_eq!(c.iter().sum::<u64>(), 1000);
            assert_eq!(c[0], 100);
        }
        // every compound dropped everywhere: batches hold DMSO only
        let empty = SynthParams {
            missing_frac: 1.0,
            min_batches: 0,
            ..params
        };
        for c in SynthModel::new(&empty).unwrap().counts() {
            assert_eq!(c[0], 1000);
            assert!(c[1..].iter().all(|&v| v == 0));
        }
    }

    #[test]
    fn dirichlet_composition() {
        let params = SynthParams {
            n: 5000,
            k: 8,
            dirichlet: 0.5,
            ..SynthParams::default()
        };
        let model = SynthModel::new(&params).unwrap();
        for c in model.counts() {
            assert_eq!(c.iter().sum::<u64>(), 1000);
            assert_eq!(c[0], 100);
            let (lo, hi) = (c[1..].iter().min().unwrap(), c[1..].iter().max().unwrap());
            assert!(hi - lo > 50, "unbalanced proportions expected: {c:?}");
        }
        // tiny concentrations must not underflow into an empty batch
        let model = SynthModel::new(&SynthParams {
            dirichlet: 1e-3,
            ..params
        })
        .unwrap();
        for c in model.counts() {
            assert_eq!(c.iter().sum::<u64>(), 1000);
            assert_eq!(c[0], 100);
        }
    }

    #[test]
    fn rotation_and_frame_are_orthonormal() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for (r, angle) in [(2, 0.3), (6, 0.6), (33, 0.45)] {
            let rot = random_rotation(&mut rng, r, angle).unwrap();
            let rtr = rot.transpose() * rot.as_ref();
            for i in 0..r {
                for j in 0..r {
                    let e = if i == j { 1.0 } else { 0.0 };
                    assert!((rtr[(i, j)] - e).abs() < 1e-12);
                }
            }
            // the largest rotation angle theta satisfies ||R - I||_2 = 2 sin(theta / 2)
            let rmi = Mat::from_fn(r, r, |i, j| rot[(i, j)] - if i == j { 1.0 } else { 0.0 });
            let g = rmi.transpose() * rmi.as_ref();
            let top = g.self_adjoint_eigenvalues(Side::Lower).unwrap();
            let norm = top.iter().copied().fold(0.0, f64::max).sqrt();
            assert!(
                (norm - 2.0 * (angle / 2.0).sin()).abs() < 1e-9,
                "r {r}: {norm}"
            );
        }
        let w = orthonormal(&mut rng, 20, 16);
        let wtw = w.transpose() * w.as_ref();
        for i in 0..16 {
            for j in 0..16 {
                let e = if i == j { 1.0 } else { 0.0 };
                assert!((wtw[(i, j)] - e).abs() < 1e-12);
            }
        }
        // d = 1: rotation of a 1-dimensional subspace is the identity
        let tiny = SynthParams {
            d: 1,
            n: 100,
            ..SynthParams::default()
        };
        assert_eq!(generate(&tiny, 64).num_rows(), 100);
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        let bad = [
            SynthParams {
                d: 0,
                ..SynthParams::default()
            },
            SynthParams {
                batches: 0,
                ..SynthParams::default()
            },
            SynthParams {
                control_frac: 1.5,
                ..SynthParams::default()
            },
            SynthParams {
                dirichlet: 0.0,
                ..SynthParams::default()
            },
            SynthParams {
                noise: f64::NAN,
                ..SynthParams::default()
            },
        ];
        for p in bad {
            assert!(
                matches!(SynthModel::new(&p), Err(BalansError::InvalidArgument(_))),
                "{p:?}"
            );
        }
    }

    #[test]
    fn write_parquet_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("synthetic.parquet");
        let params = readme_params();
        let summary = write_parquet(&params, &path, 1000).unwrap();
        assert_eq!(summary.n, 3000);
        assert_eq!(summary.d, 20);
        assert_eq!(summary.batch_counts.len(), 5);
        assert_eq!(summary.compound_counts.len(), 11);
        assert!(summary.seconds > 0.0);
        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(json["batch_counts"][0]["name"], "batch_00");
        assert_eq!(json["compound_counts"][0]["count"], 300);
        let leftovers: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            leftovers,
            vec![std::ffi::OsString::from("synthetic.parquet")]
        );

        let builder =
            ParquetRecordBatchReaderBuilder::try_new(fs::File::open(&path).unwrap()).unwrap();
        assert_eq!(
            builder.metadata().num_row_groups(),
            5,
            "one row group per batch"
        );
        let schema = builder.schema().clone();
        let parts: Vec<RecordBatch> = builder.build().unwrap().map(|r| r.unwrap()).collect();
        let back = concat_batches(&schema, &parts).unwrap();
        assert_eq!(back, generate(&params, 4096));
    }

    /// Throughput check (run with `--ignored --nocapture`, in release mode).
    #[test]
    #[ignore]
    fn throughput_5m_by_10() {
        let params = SynthParams {
            n: 5_000_000,
            ..SynthParams::default()
        };
        let t0 = Instant::now();
        let model = SynthModel::new(&params).unwrap();
        let mut rows = 0;
        for rb in model.batches(1 << 19) {
            rows += rb.unwrap().num_rows();
        }
        assert_eq!(rows, 5_000_000);
        eprintln!("5M x 10 generated in {:.2} s", t0.elapsed().as_secs_f64());
        let params = SynthParams {
            n: 100_000,
            d: 300,
            ..SynthParams::default()
        };
        let t0 = Instant::now();
        let rows: usize = SynthModel::new(&params)
            .unwrap()
            .batches(1 << 16)
            .map(|rb| rb.unwrap().num_rows())
            .sum();
        assert_eq!(rows, 100_000);
        eprintln!(
            "100k x 300 generated in {:.2} s",
            t0.elapsed().as_secs_f64()
        );
    }
}
