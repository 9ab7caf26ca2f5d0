//! Training: mini-batch AdamW with gradient clipping, a validation metric on held-out
//! batches after every epoch, checkpoints of the best epoch and early stopping.
//!
//! The validation metric is *cross-batch nearest-neighbour balanced accuracy*: each row of a
//! held-out batch is embedded and matched (cosine) to its nearest training row, which by
//! construction comes from another batch; a row scores when its neighbour has the same label,
//! and the score is the mean over labels of their rows' hit rates, so that the negative
//! controls (often half the wells) do not dominate it. Rows whose label the training batches
//! lack are left out. It rewards exactly
//! what the model is for: biology that carries over to batches it has not seen.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use rand::seq::SliceRandom;

use candle_core::Var;

use crate::abra::{AbraConfig, AbraModel};
use crate::cellpaintr::{CellPainTrConfig, CellPainTrModel};
use crate::data::{BatchSplit, Profiles, Standardizer};
use crate::device::ComputeDevice;
use crate::error::{LearnedError, Result};
use crate::init::Initializer;
use crate::store::{Architecture, EpochRecord, FORMAT, ModelCard, save};

/// Name of the validation metric in the model card.
pub const VALIDATION_METRIC: &str = "cross_batch_nn_balanced_accuracy";

/// Optimisation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    /// Largest number of epochs.
    pub epochs: usize,
    /// Rows per mini-batch.
    pub batch_size: usize,
    /// AdamW learning rate.
    pub learning_rate: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Largest global gradient norm (0 = no clipping).
    pub clip_norm: f64,
    /// Stop after this many epochs without a better validation metric.
    pub patience: usize,
    /// Seed of initialisation, the batch split and sampling.
    pub seed: u64,
    /// Batches held out for validation (default: a fifth).
    pub validation_batches: Option<usize>,
    /// Batch column name (recorded in the card).
    pub batch_column: String,
    /// Label column name (recorded in the card).
    pub label_column: String,
    /// Where to train.
    pub device: ComputeDevice,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            epochs: 30,
            batch_size: 128,
            learning_rate: 1e-3,
            weight_decay: 0.0,
            clip_norm: 1.0,
            patience: 5,
            seed: 0,
            validation_batches: None,
            batch_column: String::new(),
            label_column: String::new(),
            device: ComputeDevice::Cpu,
        }
    }
}

/// What a training run did.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// The card of the saved (best) checkpoint.
    pub card: ModelCard,
    /// Whether training stopped early.
    pub stopped_early: bool,
}

/// One mini-batch, as the models see it.
pub(crate) struct MiniBatch {
    /// Standardised values (B, d).
    pub x: Tensor,
    /// The rows' values before standardisation, row-major (masking never hides exact zeros).
    pub raw: Vec<f32>,
    /// Label codes (B) as a tensor and as numbers.
    pub labels: Tensor,
    pub label_codes: Vec<u32>,
    /// Batch codes renumbered 0..group_count within the mini-batch.
    pub groups: Vec<u32>,
    pub group_count: usize,
    /// Source-token indices (B).
    pub sources: Vec<u32>,
}

/// How a stage draws its mini-batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sampling {
    /// Shuffled across all training batches.
    Mixed,
    /// Each mini-batch from one batch (source).
    WithinSource,
}

/// A training stage.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stage {
    pub name: &'static str,
    pub sampling: Sampling,
    pub supervised: bool,
}

/// What the training loop needs from a model.
pub(crate) trait Learner {
    fn vars(&self) -> Vec<Var>;
    fn tensors(&self) -> Vec<(String, Tensor)>;
    fn width(&self) -> usize;
    fn embed(&self, x: &Tensor, sources: &Tensor) -> Result<Tensor>;
    fn loss(
        &self,
        batch: &MiniBatch,
        stage: Stage,
        init: &mut Initializer,
    ) -> Result<(Tensor, Vec<f64>)>;
}

impl Learner for AbraModel {
    fn vars(&self) -> Vec<Var> {
        AbraModel::vars(self)
    }
    fn tensors(&self) -> Vec<(String, Tensor)> {
        AbraModel::tensors(self)
    }
    fn width(&self) -> usize {
        self.config.embedding
    }
    fn embed(&self, x: &Tensor, _sources: &Tensor) -> Result<Tensor> {
        AbraModel::embed(self, x)
    }
    fn loss(
        &self,
        batch: &MiniBatch,
        _stage: Stage,
        init: &mut Initializer,
    ) -> Result<(Tensor, Vec<f64>)> {
        let noise = init.normal(2 * batch.group_count * self.config.hidden);
        let (loss, parts) = self.objective(
            &batch.x,
            &batch.labels,
            &batch.groups,
            batch.group_count,
            &noise,
        )?;
        Ok((loss, parts.to_vec()))
    }
}

impl Learner for CellPainTrModel {
    fn vars(&self) -> Vec<Var> {
        CellPainTrModel::vars(self)
    }
    fn tensors(&self) -> Vec<(String, Tensor)> {
        CellPainTrModel::tensors(self)
    }
    fn width(&self) -> usize {
        self.config.d_model
    }
    fn embed(&self, x: &Tensor, sources: &Tensor) -> Result<Tensor> {
        CellPainTrModel::embed(self, x, sources)
    }
    fn loss(
        &self,
        batch: &MiniBatch,
        stage: Stage,
        init: &mut Initializer,
    ) -> Result<(Tensor, Vec<f64>)> {
        use rand::Rng;
        let (rows, l) = batch.x.dims2()?;
        let (lo, hi) = self.config.mask_rate;
        let rate = lo + (hi - lo) * init.rng().random::<f64>();
        let mask = crate::cellpaintr::draw_mask(&batch.raw, rate, init.rng());
        let mask = Tensor::from_vec(mask, (rows, l), batch.x.device())?;
        // Source dropout: a tenth of the rows see the unknown-source token, which is what
        // unseen sources get at inference.
        let unknown = self.config.sources.len() as u32;
        let sources: Vec<u32> = batch
            .sources
            .iter()
            .map(|&s| {
                if init.rng().random::<f64>() < 0.1 {
                    unknown
                } else {
                    s
                }
            })
            .collect();
        let sources = Tensor::from_vec(sources, rows, batch.x.device())?;
        let labels = stage.supervised.then_some(batch.label_codes.as_slice());
        let (loss, parts) = self.objective(&batch.x, &mask, &sources, labels)?;
        Ok((loss, parts.to_vec()))
    }
}

/// Embeds `rows` of a standardised row-major matrix in chunks.
pub(crate) fn embed_rows(
    model: &dyn Learner,
    x: &[f32],
    d: usize,
    rows: &[usize],
    sources: &[u32],
    device: &Device,
) -> Result<Vec<f32>> {
    let e = model.width();
    let mut out = Vec::with_capacity(rows.len() * e);
    // 256 rows at a time: CellPainTR holds rows x tokens x MLP-width activations.
    for chunk in rows.chunks(256) {
        let block: Vec<f32> = chunk
            .iter()
            .flat_map(|&r| x[r * d..(r + 1) * d].iter().copied())
            .collect();
        let t = Tensor::from_vec(block, (chunk.len(), d), device)?;
        let s = Tensor::from_vec(
            chunk.iter().map(|&r| sources[r]).collect::<Vec<u32>>(),
            chunk.len(),
            device,
        )?;
        out.extend(model.embed(&t, &s)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// Cross-batch nearest-neighbour balanced accuracy (see the module docs): the mean over the
/// query's labels of the fraction of that label's rows whose nearest reference row (largest
/// dot product) has the same label. Queries labelled `u32::MAX` (unknown to the reference)
/// are left out; with no query left the score is 0.
pub fn nearest_neighbour_accuracy(
    query: &[f32],
    query_labels: &[u32],
    reference: &[f32],
    reference_labels: &[u32],
    e: usize,
) -> f64 {
    let mut per_label: std::collections::BTreeMap<u32, (usize, usize)> =
        std::collections::BTreeMap::new();
    for (q, &label) in query.chunks(e).zip(query_labels) {
        if label == u32::MAX {
            continue;
        }
        let mut best = (f32::NEG_INFINITY, u32::MAX);
        for (r, &rl) in reference.chunks(e).zip(reference_labels) {
            let s: f32 = q.iter().zip(r).map(|(a, b)| a * b).sum();
            if s > best.0 {
                best = (s, rl);
            }
        }
        let entry = per_label.entry(label).or_default();
        entry.0 += usize::from(best.1 == label);
        entry.1 += 1;
    }
    if per_label.is_empty() {
        return 0.0;
    }
    per_label
        .values()
        .map(|(hits, count)| *hits as f64 / *count as f64)
        .sum::<f64>()
        / per_label.len() as f64
}

/// Scales every gradient so that their global L2 norm is at most `max_norm`.
fn clip_gradients(
    grads: &mut candle_core::backprop::GradStore,
    vars: &[candle_core::Var],
    max_norm: f64,
) -> Result<()> {
    if max_norm <= 0.0 {
        return Ok(());
    }
    let mut total = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    let norm = total.sqrt();
    if norm > max_norm {
        let factor = max_norm / (norm + 1e-6);
        for v in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * factor)?);
            }
        }
    }
    Ok(())
}

/// Trains ABRA on `profiles` and writes the best checkpoint to `output` (a directory).
/// `progress` receives every epoch; setting `cancel` stops between mini-batches.
pub fn train_abra(
    profiles: &Profiles,
    config: AbraConfig,
    options: &TrainOptions,
    output: &Path,
    progress: &mut dyn FnMut(&EpochRecord),
    cancel: &AtomicBool,
) -> Result<TrainOutcome> {
    config.validate()?;
    let prepared = Prepared::new(profiles, options)?;
    let mut init = Initializer::new(options.seed, &options.device.open()?);
    let model = AbraModel::new(
        profiles.width(),
        prepared.vocabulary.len(),
        config.clone(),
        &mut init,
    )?;
    let stages = [Stage {
        name: "abra",
        sampling: Sampling::Mixed,
        supervised: true,
    }];
    run_stages(
        &model,
        Architecture::Abra(config),
        &stages,
        prepared,
        profiles,
        options,
        output,
        init,
        progress,
        cancel,
    )
}

/// Trains CellPainTR's three stages (masked morphology; intra-source and inter-source
/// supervised contrastive), each for up to `options.epochs` epochs with early stopping, and
/// writes the best checkpoint to `output`. The training batches are the sources.
pub fn train_cellpaintr(
    profiles: &Profiles,
    mut config: CellPainTrConfig,
    options: &TrainOptions,
    output: &Path,
    progress: &mut dyn FnMut(&EpochRecord),
    cancel: &AtomicBool,
) -> Result<TrainOutcome> {
    let prepared = Prepared::new(profiles, options)?;
    config.sources = prepared.split.training.clone();
    config.validate()?;
    let mut init = Initializer::new(options.seed, &options.device.open()?);
    let model = CellPainTrModel::new(profiles.width(), config.clone(), &mut init)?;
    let stages = [
        Stage {
            name: "masked",
            sampling: Sampling::Mixed,
            supervised: false,
        },
        Stage {
            name: "intra-source",
            sampling: Sampling::WithinSource,
            supervised: true,
        },
        Stage {
            name: "inter-source",
            sampling: Sampling::Mixed,
            supervised: true,
        },
    ];
    run_stages(
        &model,
        Architecture::CellPainTr(config),
        &stages,
        prepared,
        profiles,
        options,
        output,
        init,
        progress,
        cancel,
    )
}

/// The data as the loop uses it: split, vocabulary, codes and standardised values.
struct Prepared {
    split: BatchSplit,
    vocabulary: Vec<String>,
    labels: Vec<u32>,
    batch_code: Vec<u32>,
    training_rows: Vec<usize>,
    validation_rows: Vec<usize>,
    standardizer: Standardizer,
    x: Vec<f32>,
}

impl Prepared {
    fn new(profiles: &Profiles, options: &TrainOptions) -> Result<Self> {
        profiles.validate()?;
        if options.epochs == 0 || options.batch_size < 2 {
            return Err(LearnedError::InvalidArgument(
                "train: at least one epoch and mini-batches of at least 2 rows".into(),
            ));
        }
        if !(options.learning_rate > 0.0 && options.learning_rate.is_finite()) {
            return Err(LearnedError::InvalidArgument(
                "train: the learning rate must be positive".into(),
            ));
        }
        let (n, d) = (profiles.rows(), profiles.width());
        let split =
            BatchSplit::choose(&profiles.batches, options.validation_batches, options.seed)?;
        let is_validation = |b: &String| split.validation.binary_search(b).is_ok();
        let training_rows: Vec<usize> = (0..n)
            .filter(|&i| !is_validation(&profiles.batches[i]))
            .collect();
        let validation_rows: Vec<usize> = (0..n)
            .filter(|&i| is_validation(&profiles.batches[i]))
            .collect();
        let mut vocabulary: Vec<String> = training_rows
            .iter()
            .map(|&i| profiles.labels[i].clone())
            .collect();
        vocabulary.sort();
        vocabulary.dedup();
        if vocabulary.len() < 2 {
            return Err(LearnedError::BadInput(format!(
                "the training batches have {} label value(s); training needs at least two",
                vocabulary.len()
            )));
        }
        let labels: Vec<u32> = profiles
            .labels
            .iter()
            .map(|l| {
                vocabulary
                    .binary_search(l)
                    .map(|c| c as u32)
                    .unwrap_or(u32::MAX)
            })
            .collect();
        // Training batches get codes 0..; validation batches the unknown code (= count).
        let unknown = split.training.len() as u32;
        let batch_code: Vec<u32> = profiles
            .batches
            .iter()
            .map(|b| {
                split
                    .training
                    .binary_search(b)
                    .map(|c| c as u32)
                    .unwrap_or(unknown)
            })
            .collect();
        let standardizer = Standardizer::fit(&profiles.x, d, &training_rows);
        let mut x = profiles.x.clone();
        standardizer.apply(&mut x);
        Ok(Self {
            split,
            vocabulary,
            labels,
            batch_code,
            training_rows,
            validation_rows,
            standardizer,
            x,
        })
    }

    /// The mini-batches of one epoch.
    fn epoch(&self, sampling: Sampling, size: usize, init: &mut Initializer) -> Vec<Vec<usize>> {
        let mut order = self.training_rows.clone();
        order.shuffle(init.rng());
        let mut batches: Vec<Vec<usize>> = match sampling {
            Sampling::Mixed => order.chunks(size).map(<[usize]>::to_vec).collect(),
            Sampling::WithinSource => {
                let mut by_source: std::collections::BTreeMap<u32, Vec<usize>> =
                    std::collections::BTreeMap::new();
                for r in order {
                    by_source.entry(self.batch_code[r]).or_default().push(r);
                }
                by_source
                    .values()
                    .flat_map(|rows| rows.chunks(size).map(<[usize]>::to_vec))
                    .collect()
            }
        };
        batches.retain(|b| b.len() >= 2);
        batches.shuffle(init.rng());
        batches
    }

    fn mini_batch(
        &self,
        rows: &[usize],
        profiles: &Profiles,
        device: &Device,
    ) -> Result<MiniBatch> {
        let d = profiles.width();
        let block: Vec<f32> = rows
            .iter()
            .flat_map(|&r| self.x[r * d..(r + 1) * d].iter().copied())
            .collect();
        let raw: Vec<f32> = rows
            .iter()
            .flat_map(|&r| profiles.x[r * d..(r + 1) * d].iter().copied())
            .collect();
        let label_codes: Vec<u32> = rows.iter().map(|&r| self.labels[r]).collect();
        let mut present: Vec<u32> = rows.iter().map(|&r| self.batch_code[r]).collect();
        present.sort_unstable();
        present.dedup();
        let groups = rows
            .iter()
            .map(|&r| present.binary_search(&self.batch_code[r]).expect("present") as u32)
            .collect();
        Ok(MiniBatch {
            x: Tensor::from_vec(block, (rows.len(), d), device)?,
            raw,
            labels: Tensor::from_vec(label_codes.clone(), rows.len(), device)?,
            label_codes,
            groups,
            group_count: present.len(),
            sources: rows.iter().map(|&r| self.batch_code[r]).collect(),
        })
    }
}

#[allow(clippy::too_many_arguments)]
fn run_stages(
    model: &dyn Learner,
    architecture: Architecture,
    stages: &[Stage],
    prepared: Prepared,
    profiles: &Profiles,
    options: &TrainOptions,
    output: &Path,
    mut init: Initializer,
    progress: &mut dyn FnMut(&EpochRecord),
    cancel: &AtomicBool,
) -> Result<TrainOutcome> {
    let device = init.device().clone();
    let d = profiles.width();
    let vars = model.vars();
    let mut optimiser = AdamW::new(
        vars.clone(),
        ParamsAdamW {
            lr: options.learning_rate,
            weight_decay: options.weight_decay,
            ..ParamsAdamW::default()
        },
    )?;
    let mut card = ModelCard {
        format: FORMAT.to_string(),
        architecture,
        features: profiles.features.clone(),
        standardizer: prepared.standardizer.clone(),
        labels: prepared.vocabulary.clone(),
        batch_column: options.batch_column.clone(),
        label_column: options.label_column.clone(),
        split: prepared.split.clone(),
        seed: options.seed,
        best_epoch: 0,
        best_validation: f64::NEG_INFINITY,
        validation_metric: VALIDATION_METRIC.to_string(),
        history: Vec::new(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let validation_labels: Vec<u32> = prepared
        .validation_rows
        .iter()
        .map(|&i| prepared.labels[i])
        .collect();
    let training_labels: Vec<u32> = prepared
        .training_rows
        .iter()
        .map(|&i| prepared.labels[i])
        .collect();
    let mut stopped_early = false;
    let mut epoch = 0usize;
    for stage in stages {
        let mut since_best = 0usize;
        for _ in 0..options.epochs {
            epoch += 1;
            let started = Instant::now();
            let mut sums: Vec<f64> = Vec::new();
            let mut steps = 0usize;
            for rows in prepared.epoch(stage.sampling, options.batch_size, &mut init) {
                if cancel.load(Ordering::Relaxed) {
                    return Err(LearnedError::Cancelled);
                }
                let batch = prepared.mini_batch(&rows, profiles, &device)?;
                let (loss, parts) = model.loss(&batch, *stage, &mut init)?;
                let mut grads = loss.backward()?;
                clip_gradients(&mut grads, &vars, options.clip_norm)?;
                optimiser.step(&grads)?;
                if sums.is_empty() {
                    sums = vec![0.0; parts.len() + 1];
                }
                sums[0] += loss.to_scalar::<f32>()? as f64;
                for (s, p) in sums[1..].iter_mut().zip(&parts) {
                    *s += p;
                }
                steps += 1;
            }
            let steps_f = steps.max(1) as f64;
            let reference = embed_rows(
                model,
                &prepared.x,
                d,
                &prepared.training_rows,
                &prepared.batch_code,
                &device,
            )?;
            let query = embed_rows(
                model,
                &prepared.x,
                d,
                &prepared.validation_rows,
                &prepared.batch_code,
                &device,
            )?;
            let validation = nearest_neighbour_accuracy(
                &query,
                &validation_labels,
                &reference,
                &training_labels,
                model.width(),
            );
            let record = EpochRecord {
                epoch,
                stage: stage.name.to_string(),
                loss: sums.first().copied().unwrap_or(0.0) / steps_f,
                parts: sums.iter().skip(1).map(|s| s / steps_f).collect(),
                validation,
                seconds: started.elapsed().as_secs_f64(),
            };
            if !record.loss.is_finite() {
                return Err(LearnedError::BadInput(format!(
                    "the loss became {} in epoch {epoch}: lower the learning rate",
                    record.loss
                )));
            }
            card.history.push(record.clone());
            progress(&record);
            if validation > card.best_validation {
                card.best_validation = validation;
                card.best_epoch = epoch;
                since_best = 0;
                save(output, &card, &model.tensors())?;
            } else {
                since_best += 1;
                // The history grows even when the weights stay: rewrite the card only.
                save_card_only(output, &card)?;
                if since_best >= options.patience {
                    stopped_early = true;
                    break;
                }
            }
        }
    }
    Ok(TrainOutcome {
        card,
        stopped_early,
    })
}

fn save_card_only(dir: &Path, card: &ModelCard) -> Result<()> {
    let path = dir.join(crate::store::CARD_FILE);
    let tmp = dir.join(format!(".{}.tmp", crate::store::CARD_FILE));
    let text = serde_json::to_string_pretty(card).map_err(|e| LearnedError::Model {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| LearnedError::Model {
            path: path.display().to_string(),
            message: e.to_string(),
        })
}
