//! A model directory: `model.safetensors` (the weights) and `config.json` (the model card:
//! kind, architecture, feature names in order, standardisation, label vocabulary, training
//! batches and history). Files are written to temporary names and renamed, so a directory
//! always holds a complete checkpoint.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::abra::AbraConfig;
use crate::cellpaintr::CellPainTrConfig;
use crate::data::{BatchSplit, Standardizer};
use crate::error::{LearnedError, Result};

/// Format tag of `config.json`.
pub const FORMAT: &str = "balans-learned/1";
/// The weights file in a model directory.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// The model card in a model directory.
pub const CARD_FILE: &str = "config.json";

/// One epoch of training, as recorded in the card and printed as progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// Epoch number, from 1 (counting on through the stages).
    pub epoch: usize,
    /// Training stage (ABRA: `abra`; CellPainTR: `masked`, `intra-source`, `inter-source`).
    #[serde(default)]
    pub stage: String,
    /// Mean total loss over the epoch's mini-batches.
    pub loss: f64,
    /// Mean loss parts (ABRA: clean ArcFace, perturbed ArcFace, alignment; CellPainTR:
    /// masked MSE, SupCon).
    pub parts: Vec<f64>,
    /// Validation metric (higher is better).
    pub validation: f64,
    /// Seconds the epoch took.
    pub seconds: f64,
}

/// The architecture of a saved model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Architecture {
    /// ABRA's MLP encoder.
    Abra(AbraConfig),
    /// CellPainTR's feature-token Hyena transformer.
    #[serde(rename = "cellpaintr")]
    CellPainTr(CellPainTrConfig),
}

impl Architecture {
    /// The model's name (`abra`).
    pub fn name(&self) -> &'static str {
        match self {
            Architecture::Abra(_) => "abra",
            Architecture::CellPainTr(_) => "cellpaintr",
        }
    }

    /// Embedding width.
    pub fn embedding(&self) -> usize {
        match self {
            Architecture::Abra(c) => c.embedding,
            Architecture::CellPainTr(c) => c.d_model,
        }
    }
}

/// What `config.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    /// [`FORMAT`].
    pub format: String,
    /// Architecture and its settings.
    pub architecture: Architecture,
    /// Input feature names, in the order the weights expect.
    pub features: Vec<String>,
    /// Standardisation fitted on the training rows.
    pub standardizer: Standardizer,
    /// Label vocabulary of the classifier (index = class).
    pub labels: Vec<String>,
    /// Batch and label columns the model was trained with.
    pub batch_column: String,
    /// Label column.
    pub label_column: String,
    /// Training and validation batches.
    pub split: BatchSplit,
    /// Seed of initialisation and sampling.
    pub seed: u64,
    /// The epoch whose weights are saved.
    pub best_epoch: usize,
    /// Its validation metric.
    pub best_validation: f64,
    /// Name of the validation metric.
    pub validation_metric: String,
    /// Every epoch run so far.
    pub history: Vec<EpochRecord>,
    /// Balans version that wrote the model.
    pub version: String,
}

fn model_error(path: &Path, message: impl std::fmt::Display) -> LearnedError {
    LearnedError::Model {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// Writes a checkpoint into `dir` (created if needed): weights, then the card, each through
/// a temporary file and a rename.
pub fn save(dir: &Path, card: &ModelCard, tensors: &[(String, Tensor)]) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| model_error(dir, e))?;
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    let weights_tmp = dir.join(format!(".{WEIGHTS_FILE}.tmp"));
    candle_core::safetensors::save(&map, &weights_tmp)?;
    std::fs::rename(&weights_tmp, dir.join(WEIGHTS_FILE)).map_err(|e| model_error(dir, e))?;
    let card_tmp = dir.join(format!(".{CARD_FILE}.tmp"));
    let text = serde_json::to_string_pretty(card).map_err(|e| model_error(dir, e))?;
    std::fs::write(&card_tmp, text).map_err(|e| model_error(dir, e))?;
    std::fs::rename(&card_tmp, dir.join(CARD_FILE)).map_err(|e| model_error(dir, e))?;
    Ok(())
}

/// Reads a model directory's card and weights.
pub fn load(dir: &Path, device: &Device) -> Result<(ModelCard, HashMap<String, Tensor>)> {
    let card_path = dir.join(CARD_FILE);
    let text = std::fs::read_to_string(&card_path).map_err(|e| {
        model_error(
            dir,
            format!("cannot read {CARD_FILE} ({e}); is this a directory written by balans train?"),
        )
    })?;
    let card: ModelCard =
        serde_json::from_str(&text).map_err(|e| model_error(&card_path, format!("{e}")))?;
    if card.format != FORMAT {
        return Err(model_error(
            &card_path,
            format!("format '{}' is not '{FORMAT}'", card.format),
        ));
    }
    let weights = dir.join(WEIGHTS_FILE);
    let tensors =
        candle_core::safetensors::load(&weights, device).map_err(|e| model_error(&weights, e))?;
    Ok((card, tensors))
}
