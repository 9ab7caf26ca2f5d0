//! Applying a trained model: load a model directory, check the table's features, standardise
//! and embed rows in chunks.

use std::path::Path;

use candle_core::Device;

use crate::abra::AbraModel;
use crate::cellpaintr::CellPainTrModel;
use crate::device::ComputeDevice;
use crate::error::{LearnedError, Result};
use crate::store::{Architecture, ModelCard, load};
use crate::train::{Learner, embed_rows};

/// A loaded network of either kind.
#[derive(Debug)]
enum Network {
    Abra(AbraModel),
    CellPainTr(CellPainTrModel),
}

impl Network {
    fn learner(&self) -> &dyn Learner {
        match self {
            Network::Abra(m) => m,
            Network::CellPainTr(m) => m,
        }
    }
}

/// A loaded model, ready to embed rows.
#[derive(Debug)]
pub struct Embedder {
    /// The model card.
    pub card: ModelCard,
    model: Network,
    device: Device,
}

impl Embedder {
    /// Loads a model directory written by `balans train`, to run on the CPU.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_on(dir, ComputeDevice::Cpu)
    }

    /// Loads a model directory to run on `device` (a model trained on either device loads
    /// on either).
    pub fn load_on(dir: &Path, device: ComputeDevice) -> Result<Self> {
        let device = device.open()?;
        let (card, tensors) = load(dir, &device)?;
        let features = card.features.len();
        let model =
            match &card.architecture {
                Architecture::Abra(config) => {
                    let m = AbraModel::from_tensors(&tensors, config.clone(), &device)?;
                    if m.input != features {
                        return Err(LearnedError::Model {
                            path: dir.display().to_string(),
                            message: format!(
                                "the weights take {} features but the card lists {features}",
                                m.input
                            ),
                        });
                    }
                    Network::Abra(m)
                }
                Architecture::CellPainTr(config) => Network::CellPainTr(
                    CellPainTrModel::from_tensors(&tensors, features, config.clone(), &device)?,
                ),
            };
        Ok(Self {
            card,
            model,
            device,
        })
    }

    /// Embedding width.
    pub fn width(&self) -> usize {
        self.card.architecture.embedding()
    }

    /// The model's feature names, in the order [`Embedder::embed`] expects them.
    pub fn features(&self) -> &[String] {
        &self.card.features
    }

    /// For a table with columns `available`, the column index of each model feature; an
    /// error lists the model's features the table lacks.
    pub fn match_features(&self, available: &[String]) -> Result<Vec<usize>> {
        let mut missing = Vec::new();
        let mut index = Vec::with_capacity(self.card.features.len());
        for name in &self.card.features {
            match available.iter().position(|a| a == name) {
                Some(i) => index.push(i),
                None => missing.push(name.as_str()),
            }
        }
        if !missing.is_empty() {
            let shown: Vec<&str> = missing.iter().take(5).copied().collect();
            return Err(LearnedError::BadInput(format!(
                "the table lacks {} of the model's {} features ({}{}); embed a table with the \
                 features the model was trained on (same preprocessing)",
                missing.len(),
                self.card.features.len(),
                shown.join(", "),
                if missing.len() > 5 { ", ..." } else { "" }
            )));
        }
        Ok(index)
    }

    /// Embeds `x`, row-major with the model's features in order; returns row-major
    /// `rows x width` L2-normalised embeddings. `sources` gives each row's source (batch)
    /// for models with a source token (CellPainTR): a source the model was not trained on,
    /// or `None`, gets the unknown-source token. ABRA ignores it.
    pub fn embed(&self, x: &[f32], sources: Option<&[String]>) -> Result<Vec<f32>> {
        let d = self.card.features.len();
        if !x.len().is_multiple_of(d) {
            return Err(LearnedError::BadInput(format!(
                "{} values are not whole rows of {d} features",
                x.len()
            )));
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(LearnedError::BadInput(format!(
                "feature '{}' has a non-finite value (row {})",
                self.card.features[i % d],
                i / d
            )));
        }
        let n = x.len() / d;
        let codes: Vec<u32> = match (&self.card.architecture, sources) {
            (Architecture::CellPainTr(config), Some(sources)) => {
                if sources.len() != n {
                    return Err(LearnedError::BadInput(
                        "one source per row is needed".into(),
                    ));
                }
                sources.iter().map(|s| config.source_index(s)).collect()
            }
            (Architecture::CellPainTr(config), None) => vec![config.sources.len() as u32; n],
            (Architecture::Abra(_), _) => vec![0; n],
        };
        let mut x = x.to_vec();
        self.card.standardizer.apply(&mut x);
        let rows: Vec<usize> = (0..n).collect();
        embed_rows(self.model.learner(), &x, d, &rows, &codes, &self.device)
    }

    /// Whether the model uses each row's source (CellPainTR's source token).
    pub fn uses_sources(&self) -> bool {
        matches!(self.card.architecture, Architecture::CellPainTr(_))
    }
}
