//! ABRA at the profile level (our reading of Chen et al.; see `shared/specs/learned.md`):
//! an MLP encoder with an L2-normalised embedding, batch-statistics uncertainty in the first
//! hidden layer chosen adversarially, an additive angular margin classifier over
//! perturbation labels, and a symmetric-KL alignment of clean and perturbed predictions.
//!
//! For a mini-batch whose rows come from batches `b`, the first hidden layer's
//! pre-activations `h` have per-batch means `μ_b` and standard deviations `σ_b`; across the
//! batches of the mini-batch these vary with standard deviations `Σ_μ`, `Σ_σ` (as in DSU,
//! Li et al. 2022). A perturbed activation is `γ_b (h − μ_b)/σ_b + β_b` with
//! `β_b = μ_b + ε₁ Σ_μ` and `γ_b = σ_b + ε₂ Σ_σ`. Instead of sampling `ε`, a few signed
//! gradient-ascent steps on the classifier loss choose it within `|ε| ≤ bound`; the model
//! is then trained on the clean and the perturbed activations.

use candle_core::{D, DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{LearnedError, Result};
use crate::init::{Initializer, linear};
use crate::losses::{arcface_loss, class_cosines, l2_normalize, symmetric_kl};

/// ABRA's architecture and loss settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AbraConfig {
    /// Width of the two hidden layers.
    pub hidden: usize,
    /// Embedding width.
    pub embedding: usize,
    /// ArcFace scale `s`.
    pub scale: f64,
    /// ArcFace additive angular margin `m` (radians).
    pub margin: f64,
    /// Weight of the clean/perturbed alignment term.
    pub alignment_weight: f64,
    /// Bound on the perturbation coefficients `|ε₁|, |ε₂|`.
    pub perturbation_bound: f64,
    /// Gradient-ascent steps that choose `ε`.
    pub adversarial_steps: usize,
    /// Step size of each ascent step.
    pub adversarial_step_size: f64,
}

impl Default for AbraConfig {
    fn default() -> Self {
        Self {
            hidden: 256,
            embedding: 64,
            scale: 16.0,
            margin: 0.3,
            alignment_weight: 1.0,
            perturbation_bound: 2.0,
            adversarial_steps: 2,
            adversarial_step_size: 0.5,
        }
    }
}

impl AbraConfig {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(LearnedError::InvalidArgument(m.to_string()));
        if self.hidden == 0 || self.embedding == 0 {
            return bad("abra: hidden and embedding widths must be at least 1");
        }
        if !(self.scale > 0.0 && self.scale.is_finite()) {
            return bad("abra: the ArcFace scale must be positive");
        }
        if !(0.0..std::f64::consts::FRAC_PI_2).contains(&self.margin) {
            return bad("abra: the angular margin must lie in [0, π/2)");
        }
        if !(self.alignment_weight >= 0.0 && self.perturbation_bound >= 0.0) {
            return bad("abra: alignment weight and perturbation bound must be >= 0");
        }
        Ok(())
    }
}

/// The trainable parameters.
#[derive(Debug)]
pub struct AbraModel {
    /// The settings.
    pub config: AbraConfig,
    /// Input features.
    pub input: usize,
    /// Perturbation classes of the classifier.
    pub classes: usize,
    w1: Var,
    b1: Var,
    w2: Var,
    b2: Var,
    w3: Var,
    b3: Var,
    centres: Var,
}

/// Per-batch statistics of hidden activations within a mini-batch.
struct BatchStatistics {
    groups: Tensor,
    mu: Tensor,
    sigma: Tensor,
    sd_mu: Tensor,
    sd_sigma: Tensor,
}

impl AbraModel {
    /// A freshly initialised model.
    pub fn new(
        input: usize,
        classes: usize,
        config: AbraConfig,
        init: &mut Initializer,
    ) -> Result<Self> {
        config.validate()?;
        if input == 0 || classes < 2 {
            return Err(LearnedError::BadInput(format!(
                "abra needs at least one feature and two label classes (got {input} features, \
                 {classes} classes)"
            )));
        }
        let (w1, b1) = init.linear(input, config.hidden)?;
        let (w2, b2) = init.linear(config.hidden, config.hidden)?;
        let (w3, b3) = init.linear(config.hidden, config.embedding)?;
        let centres = init.uniform(classes, config.embedding, 1.0)?;
        Ok(Self {
            config,
            input,
            classes,
            w1,
            b1,
            w2,
            b2,
            w3,
            b3,
            centres,
        })
    }

    /// Every parameter, for the optimiser.
    pub fn vars(&self) -> Vec<Var> {
        vec![
            self.w1.clone(),
            self.b1.clone(),
            self.w2.clone(),
            self.b2.clone(),
            self.w3.clone(),
            self.b3.clone(),
            self.centres.clone(),
        ]
    }

    /// Named tensors for saving.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        [
            ("encoder.0.weight", &self.w1),
            ("encoder.0.bias", &self.b1),
            ("encoder.1.weight", &self.w2),
            ("encoder.1.bias", &self.b2),
            ("encoder.2.weight", &self.w3),
            ("encoder.2.bias", &self.b3),
            ("arcface.centres", &self.centres),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v.as_tensor().clone()))
        .collect()
    }

    /// The model from saved tensors.
    pub fn from_tensors(
        tensors: &std::collections::HashMap<String, Tensor>,
        config: AbraConfig,
        device: &Device,
    ) -> Result<Self> {
        let get = |name: &str| -> Result<Var> {
            let t = tensors.get(name).ok_or_else(|| LearnedError::Model {
                path: "model.safetensors".into(),
                message: format!("tensor '{name}' is missing"),
            })?;
            Ok(Var::from_tensor(
                &t.to_device(device)?.to_dtype(DType::F32)?,
            )?)
        };
        let w1 = get("encoder.0.weight")?;
        let (hidden, input) = w1.as_tensor().dims2()?;
        let centres = get("arcface.centres")?;
        let (classes, embedding) = centres.as_tensor().dims2()?;
        if hidden != config.hidden || embedding != config.embedding {
            return Err(LearnedError::Model {
                path: "model.safetensors".into(),
                message: "tensor shapes do not match the configuration".into(),
            });
        }
        Ok(Self {
            config,
            input,
            classes,
            w1,
            b1: get("encoder.0.bias")?,
            w2: get("encoder.1.weight")?,
            b2: get("encoder.1.bias")?,
            w3: get("encoder.2.weight")?,
            b3: get("encoder.2.bias")?,
            centres,
        })
    }

    /// First hidden layer, before its activation.
    fn hidden(&self, x: &Tensor) -> Result<Tensor> {
        linear(x, &self.w1, &self.b1)
    }

    /// From first-layer pre-activations to the normalised embedding.
    fn head(&self, h: &Tensor) -> Result<Tensor> {
        let h = linear(&h.gelu_erf()?, &self.w2, &self.b2)?.gelu_erf()?;
        l2_normalize(&linear(&h, &self.w3, &self.b3)?, 1e-12)
    }

    /// The L2-normalised embedding of `x` (n x input), n x embedding.
    pub fn embed(&self, x: &Tensor) -> Result<Tensor> {
        self.head(&self.hidden(x)?)
    }

    /// Per-batch statistics of `h` for the mini-batch's batch codes `groups` (0..count).
    fn statistics(&self, h: &Tensor, groups: &[u32], count: usize) -> Result<BatchStatistics> {
        let n = groups.len();
        let device = h.device();
        let mut weights = vec![0f32; count * n];
        let mut sizes = vec![0usize; count];
        for &g in groups {
            sizes[g as usize] += 1;
        }
        for (i, &g) in groups.iter().enumerate() {
            weights[g as usize * n + i] = 1.0 / sizes[g as usize] as f32;
        }
        let averaging = Tensor::from_vec(weights, (count, n), device)?;
        let groups = Tensor::from_vec(groups.to_vec(), n, device)?;
        let mu = averaging.matmul(h)?;
        let centred = (h - mu.index_select(&groups, 0)?)?;
        let sigma = averaging
            .matmul(&centred.sqr()?)?
            .affine(1.0, 1e-6)?
            .sqrt()?;
        let spread = |t: &Tensor| -> Result<Tensor> {
            let mean = t.mean_keepdim(0)?;
            Ok(t.broadcast_sub(&mean)?
                .sqr()?
                .mean_keepdim(0)?
                .affine(1.0, 1e-6)?
                .sqrt()?)
        };
        let sd_mu = spread(&mu)?;
        let sd_sigma = spread(&sigma)?;
        Ok(BatchStatistics {
            groups,
            mu,
            sigma,
            sd_mu,
            sd_sigma,
        })
    }

    /// `γ (h − μ)/σ + β` with `β = μ + ε₁ Σ_μ`, `γ = σ + ε₂ Σ_σ`, per batch.
    fn perturb(h: &Tensor, s: &BatchStatistics, e1: &Tensor, e2: &Tensor) -> Result<Tensor> {
        let beta = (&s.mu + e1.broadcast_mul(&s.sd_mu)?)?;
        let gamma = (&s.sigma + e2.broadcast_mul(&s.sd_sigma)?)?;
        let rows = |t: &Tensor| t.index_select(&s.groups, 0);
        let normalised = ((h - rows(&s.mu)?)? / rows(&s.sigma)?)?;
        Ok(((normalised * rows(&gamma)?)? + rows(&beta)?)?)
    }

    /// ArcFace loss of an embedding against `labels`.
    fn classifier_loss(&self, embedding: &Tensor, labels: &Tensor) -> Result<Tensor> {
        arcface_loss(
            embedding,
            self.centres.as_tensor(),
            labels,
            self.config.scale,
            self.config.margin,
        )
    }

    /// One training objective on a mini-batch: returns the total loss and its parts
    /// (clean classifier, perturbed classifier, alignment). `groups` are the rows' batch
    /// codes renumbered 0..count; `noise` gives the starting `ε` (2 x count x hidden
    /// standard normal numbers). With one batch in the mini-batch the perturbation is the
    /// identity and only the clean loss counts.
    pub fn objective(
        &self,
        x: &Tensor,
        labels: &Tensor,
        groups: &[u32],
        count: usize,
        noise: &[f32],
    ) -> Result<(Tensor, [f64; 3])> {
        let h = self.hidden(x)?;
        let clean = self.head(&h)?;
        let clean_loss = self.classifier_loss(&clean, labels)?;
        if count < 2 || self.config.perturbation_bound == 0.0 {
            let value = clean_loss.to_scalar::<f32>()? as f64;
            return Ok((clean_loss, [value, 0.0, 0.0]));
        }
        let hidden = self.config.hidden;
        let bound = self.config.perturbation_bound;
        let device = x.device();
        let start = |k: usize| -> Result<Tensor> {
            Ok(Tensor::from_vec(
                noise[k * count * hidden..(k + 1) * count * hidden].to_vec(),
                (count, hidden),
                device,
            )?
            .clamp(-bound, bound)?)
        };
        let (mut e1, mut e2) = (start(0)?, start(1)?);
        // The adversarial search sees the statistics as constants.
        let h_fixed = h.detach();
        let fixed = self.statistics(&h_fixed, groups, count)?;
        for _ in 0..self.config.adversarial_steps {
            let v1 = Var::from_tensor(&e1)?;
            let v2 = Var::from_tensor(&e2)?;
            let perturbed = Self::perturb(&h_fixed, &fixed, v1.as_tensor(), v2.as_tensor())?;
            let loss = self.classifier_loss(&self.head(&perturbed)?, labels)?;
            let grads = loss.backward()?;
            let step = self.config.adversarial_step_size;
            let ascend = |e: &Tensor, v: &Var| -> Result<Tensor> {
                Ok(match grads.get(v.as_tensor()) {
                    Some(g) => (e + (g.sign()? * step)?)?.clamp(-bound, bound)?,
                    None => e.clone(),
                })
            };
            e1 = ascend(&e1, &v1)?;
            e2 = ascend(&e2, &v2)?;
        }
        let stats = self.statistics(&h, groups, count)?;
        let perturbed = self.head(&Self::perturb(&h, &stats, &e1, &e2)?)?;
        let perturbed_loss = self.classifier_loss(&perturbed, labels)?;
        let s = self.config.scale;
        let centres = self.centres.as_tensor();
        let alignment = symmetric_kl(
            &(class_cosines(&clean, centres)? * s)?,
            &(class_cosines(&perturbed, centres)? * s)?,
        )?;
        let total =
            ((&clean_loss + &perturbed_loss)? + (&alignment * self.config.alignment_weight)?)?;
        let parts = [
            clean_loss.to_scalar::<f32>()? as f64,
            perturbed_loss.to_scalar::<f32>()? as f64,
            alignment.to_scalar::<f32>()? as f64,
        ];
        Ok((total, parts))
    }

    /// Class scores (scaled cosines, no margin) of embeddings, n x classes.
    pub fn class_scores(&self, embedding: &Tensor) -> Result<Tensor> {
        Ok((class_cosines(embedding, self.centres.as_tensor())? * self.config.scale)?)
    }
}

/// Row-wise argmax of a score matrix.
pub fn argmax_rows(scores: &Tensor) -> Result<Vec<u32>> {
    Ok(scores.argmax(D::Minus1)?.to_vec1::<u32>()?)
}
