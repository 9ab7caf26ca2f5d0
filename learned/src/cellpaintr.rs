//! CellPainTR (`shared/seeds/002`, reference configuration in `shared/specs/learned.md`): a
//! feature-token transformer with bidirectional Hyena mixing and a source-context token.
//!
//! Tokens: one CLS token, one token per feature (a shared `Linear(1, d)` of the value plus a
//! learned feature-name embedding; a learned mask vector replaces the value part where a
//! value is masked), and one source token (a learned embedding per training source, plus one
//! *unknown-source* row — the fallback for sources not seen in training, trained by
//! replacing the source with it on a tenth of the training rows).
//!
//! Each block is pre-norm residual: `x + Hyena(LN x)`, then `x + MLP(LN x)`. The Hyena
//! operator of order 2 projects to `(v, x₁, x₂)`, applies a short depthwise convolution
//! (kernel 3) along the tokens, then `v ← x₁ ⊙ (h₁ ∗ v)`, `v ← x₂ ⊙ (h₂ ∗ v)` and an output
//! projection. The long filters `h₁, h₂` are implicit: a small MLP with sine activations over
//! a 5-dimensional positional embedding of the offset, times an exponential decay in |offset|.
//! The convolution is bidirectional (offsets −(T−1)..T−1) and computed by FFT
//! ([`crate::fftconv`]), O(T log T) per channel, on the CPU; on a GPU it is the same
//! operation as a Toeplitz product ([`crate::fftconv::toeplitz_convolution`]), which is also
//! the reference the tests compare against.
//!
//! Losses: masked-value MSE through a regression head on the feature tokens (stage 1) plus
//! SupCon on the L2-normalised CLS embedding (stages 2 and 3).

use candle_core::{D, DType, Device, IndexOp, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{LearnedError, Result};
use crate::fftconv::long_convolution;
use crate::init::{Initializer, linear};
use crate::losses::{l2_normalize, supcon_loss};
use crate::shortconv::short_convolution;

/// CellPainTR's size and loss settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellPainTrConfig {
    /// Token width (the reference uses 256).
    pub d_model: usize,
    /// Residual blocks (the reference uses 4).
    pub layers: usize,
    /// MLP width of each block (the reference uses 4 × d_model).
    pub mlp: usize,
    /// Width of the implicit filter MLP.
    pub filter_hidden: usize,
    /// Smallest and largest mask rate, drawn per step.
    pub mask_rate: (f64, f64),
    /// SupCon temperature.
    pub temperature: f64,
    /// Weight of SupCon against the masked MSE in stages 2 and 3.
    pub supcon_weight: f64,
    /// Training sources (batch values) with a learned source token, sorted.
    pub sources: Vec<String>,
}

impl Default for CellPainTrConfig {
    fn default() -> Self {
        Self {
            d_model: 64,
            layers: 2,
            mlp: 256,
            filter_hidden: 64,
            mask_rate: (0.05, 0.4),
            temperature: 0.07,
            supcon_weight: 1.0,
            sources: Vec::new(),
        }
    }
}

impl CellPainTrConfig {
    /// Checks the ranges.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(LearnedError::InvalidArgument(m.to_string()));
        if self.d_model == 0 || self.layers == 0 || self.mlp == 0 || self.filter_hidden == 0 {
            return bad("cellpaintr: widths and layer count must be at least 1");
        }
        let (lo, hi) = self.mask_rate;
        if !(0.0 <= lo && lo <= hi && hi < 1.0) {
            return bad("cellpaintr: mask rates must satisfy 0 <= low <= high < 1");
        }
        if self.temperature.is_nan() || self.temperature <= 0.0 {
            return bad("cellpaintr: the temperature must be positive");
        }
        Ok(())
    }

    /// Index of a source's token; unseen sources get the unknown-source token.
    pub fn source_index(&self, source: &str) -> u32 {
        self.sources
            .binary_search_by(|s| s.as_str().cmp(source))
            .map(|i| i as u32)
            .unwrap_or(self.sources.len() as u32)
    }
}

/// The masking rule of stage 1: each value is hidden with probability `rate`, except values
/// that are exactly 0 (imputed or constant), which are never hidden. Returns 1 for hidden.
pub fn draw_mask(raw: &[f32], rate: f64, rng: &mut impl rand::Rng) -> Vec<f32> {
    raw.iter()
        .map(|&v| {
            let draw = rng.random::<f64>();
            f32::from(v != 0.0 && draw < rate)
        })
        .collect()
}

/// Layer-norm scale and shift.
#[derive(Debug)]
struct Norm {
    gamma: Var,
    beta: Var,
}

impl Norm {
    fn new(d: usize, device: &Device) -> Result<Self> {
        Ok(Self {
            gamma: Var::ones(d, DType::F32, device)?,
            beta: Var::zeros(d, DType::F32, device)?,
        })
    }

    /// Layer normalisation over the last axis, from differentiable primitives (candle's fused
    /// `layer_norm` has no backward pass).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
        let scale = centred
            .sqr()?
            .mean_keepdim(D::Minus1)?
            .affine(1.0, 1e-5)?
            .sqrt()?;
        Ok(centred
            .broadcast_div(&scale)?
            .broadcast_mul(self.gamma.as_tensor())?
            .broadcast_add(self.beta.as_tensor())?)
    }
}

/// One residual block.
#[derive(Debug)]
struct Block {
    norm1: Norm,
    in_w: Var,
    in_b: Var,
    short_w: Var,
    short_b: Var,
    filter: [(Var, Var); 3],
    out_w: Var,
    out_b: Var,
    norm2: Norm,
    mlp1: (Var, Var),
    mlp2: (Var, Var),
}

/// The model.
#[derive(Debug)]
pub struct CellPainTrModel {
    /// The settings.
    pub config: CellPainTrConfig,
    /// Input features.
    pub features: usize,
    value_w: Var,
    value_b: Var,
    feature_embedding: Var,
    mask_vector: Var,
    cls: Var,
    source_embedding: Var,
    blocks: Vec<Block>,
    final_norm: Norm,
    head_w: Var,
    head_b: Var,
}

/// A (rows, cols) 3-D batched matmul helper: `a (B, n, k) · w (m, k)ᵀ + b`.
fn dense(x: &Tensor, w: &Var, b: &Var) -> Result<Tensor> {
    let (batch, n, k) = x.dims3()?;
    let flat = x.reshape((batch * n, k))?;
    let y = linear(&flat, w, b)?;
    let m = y.dim(1)?;
    Ok(y.reshape((batch, n, m))?)
}

impl CellPainTrModel {
    /// A freshly initialised model for `features` inputs.
    pub fn new(features: usize, config: CellPainTrConfig, init: &mut Initializer) -> Result<Self> {
        config.validate()?;
        if features == 0 {
            return Err(LearnedError::BadInput(
                "cellpaintr needs at least one feature".into(),
            ));
        }
        let device = init.device().clone();
        let d = config.d_model;
        let (value_w, value_b) = {
            let (w, b) = init.linear(1, d)?;
            (Var::from_tensor(&w.as_tensor().reshape(d)?)?, b)
        };
        let feature_embedding = init.uniform(features, d, 0.02 * 3f64.sqrt())?;
        let mask_vector = Var::from_tensor(&init.uniform(1, d, 0.02)?.as_tensor().reshape(d)?)?;
        let cls = Var::from_tensor(&init.uniform(1, d, 0.02)?.as_tensor().reshape(d)?)?;
        let source_embedding = init.uniform(config.sources.len() + 1, d, 0.02)?;
        let mut blocks = Vec::new();
        for _ in 0..config.layers {
            let (in_w, in_b) = init.linear(d, 3 * d)?;
            let short_w = init.uniform(3 * d, 3, 1.0 / 3f64.sqrt())?;
            let short_b = Var::zeros(3 * d, DType::F32, &device)?;
            let h = config.filter_hidden;
            let filter = [
                init.linear(5, h)?,
                init.linear(h, h)?,
                init.linear(h, 2 * d)?,
            ];
            let (out_w, out_b) = init.linear(d, d)?;
            let mlp1 = init.linear(d, config.mlp)?;
            let mlp2 = init.linear(config.mlp, d)?;
            blocks.push(Block {
                norm1: Norm::new(d, &device)?,
                in_w,
                in_b,
                short_w,
                short_b,
                filter,
                out_w,
                out_b,
                norm2: Norm::new(d, &device)?,
                mlp1,
                mlp2,
            });
        }
        let (head_w, head_b) = init.linear(d, 1)?;
        Ok(Self {
            config,
            features,
            value_w,
            value_b,
            feature_embedding,
            mask_vector,
            cls,
            source_embedding,
            blocks,
            final_norm: Norm::new(d, &device)?,
            head_w,
            head_b,
        })
    }

    /// Named parameters, in a fixed order (saving, the optimiser).
    fn named(&self) -> Vec<(String, &Var)> {
        let mut out: Vec<(String, &Var)> = vec![
            ("tokens.value.weight".into(), &self.value_w),
            ("tokens.value.bias".into(), &self.value_b),
            ("tokens.feature_embedding".into(), &self.feature_embedding),
            ("tokens.mask".into(), &self.mask_vector),
            ("tokens.cls".into(), &self.cls),
            ("tokens.source_embedding".into(), &self.source_embedding),
        ];
        for (i, b) in self.blocks.iter().enumerate() {
            let p = format!("blocks.{i}");
            out.push((format!("{p}.norm1.gamma"), &b.norm1.gamma));
            out.push((format!("{p}.norm1.beta"), &b.norm1.beta));
            out.push((format!("{p}.hyena.in.weight"), &b.in_w));
            out.push((format!("{p}.hyena.in.bias"), &b.in_b));
            out.push((format!("{p}.hyena.short.weight"), &b.short_w));
            out.push((format!("{p}.hyena.short.bias"), &b.short_b));
            for (k, (w, bias)) in b.filter.iter().enumerate() {
                out.push((format!("{p}.hyena.filter.{k}.weight"), w));
                out.push((format!("{p}.hyena.filter.{k}.bias"), bias));
            }
            out.push((format!("{p}.hyena.out.weight"), &b.out_w));
            out.push((format!("{p}.hyena.out.bias"), &b.out_b));
            out.push((format!("{p}.norm2.gamma"), &b.norm2.gamma));
            out.push((format!("{p}.norm2.beta"), &b.norm2.beta));
            out.push((format!("{p}.mlp.0.weight"), &b.mlp1.0));
            out.push((format!("{p}.mlp.0.bias"), &b.mlp1.1));
            out.push((format!("{p}.mlp.1.weight"), &b.mlp2.0));
            out.push((format!("{p}.mlp.1.bias"), &b.mlp2.1));
        }
        out.push(("final_norm.gamma".into(), &self.final_norm.gamma));
        out.push(("final_norm.beta".into(), &self.final_norm.beta));
        out.push(("head.weight".into(), &self.head_w));
        out.push(("head.bias".into(), &self.head_b));
        out
    }

    /// Every parameter.
    pub fn vars(&self) -> Vec<Var> {
        self.named().into_iter().map(|(_, v)| v.clone()).collect()
    }

    /// Named tensors for saving.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.named()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect()
    }

    /// The model from saved tensors (shapes must match `config` and `features`).
    pub fn from_tensors(
        tensors: &std::collections::HashMap<String, Tensor>,
        features: usize,
        config: CellPainTrConfig,
        device: &Device,
    ) -> Result<Self> {
        let mut init = Initializer::new(0, device);
        let model = Self::new(features, config, &mut init)?;
        for (name, var) in model.named() {
            let t = tensors.get(&name).ok_or_else(|| LearnedError::Model {
                path: "model.safetensors".into(),
                message: format!("tensor '{name}' is missing"),
            })?;
            if t.dims() != var.as_tensor().dims() {
                return Err(LearnedError::Model {
                    path: "model.safetensors".into(),
                    message: format!(
                        "tensor '{name}' has shape {:?}, the configuration says {:?}",
                        t.dims(),
                        var.as_tensor().dims()
                    ),
                });
            }
            var.set(&t.to_device(device)?.to_dtype(DType::F32)?)?;
        }
        Ok(model)
    }

    /// The positional embedding of offsets −(T−1)..T−1 (2T−1 x 5): the scaled offset and two
    /// sine/cosine pairs.
    fn positions(t: usize, device: &Device) -> Result<Tensor> {
        let mut z = Vec::with_capacity((2 * t - 1) * 5);
        for o in 0..2 * t - 1 {
            let offset = o as f64 - (t as f64 - 1.0);
            let u = offset / t as f64;
            let a = std::f64::consts::PI * u;
            for v in [u, a.sin(), a.cos(), (2.0 * a).sin(), (2.0 * a).cos()] {
                z.push(v as f32);
            }
        }
        Ok(Tensor::from_vec(z, (2 * t - 1, 5), device)?)
    }

    /// The two implicit long filters of a block over offsets (2T−1 x 2d), decayed.
    fn filters(&self, block: &Block, t: usize, device: &Device) -> Result<Tensor> {
        let z = Self::positions(t, device)?;
        let [(w0, b0), (w1, b1), (w2, b2)] = &block.filter;
        let h = linear(&z, w0, b0)?.sin()?;
        let h = linear(&h, w1, b1)?.sin()?;
        let h = linear(&h, w2, b2)?;
        // Exponential decay in |offset| with rates spread over the channels.
        let channels = 2 * self.config.d_model;
        let mut decay = Vec::with_capacity((2 * t - 1) * channels);
        for o in 0..2 * t - 1 {
            let distance = (o as f64 - (t as f64 - 1.0)).abs() / t as f64;
            for c in 0..channels {
                let rate = 0.5 + 3.5 * c as f64 / channels.max(2) as f64;
                decay.push((-rate * distance).exp() as f32);
            }
        }
        let decay = Tensor::from_vec(decay, (2 * t - 1, channels), device)?;
        Ok((h * decay)?)
    }

    fn hyena(&self, block: &Block, x: &Tensor) -> Result<Tensor> {
        let (_, t, _) = x.dims3()?;
        let d = self.config.d_model;
        let u = dense(x, &block.in_w, &block.in_b)?;
        let u = short_convolution(&u, block.short_w.as_tensor())?
            .broadcast_add(block.short_b.as_tensor())?;
        let v = u.narrow(2, 0, d)?;
        let x1 = u.narrow(2, d, d)?;
        let x2 = u.narrow(2, 2 * d, d)?;
        let filters = self.filters(block, t, x.device())?;
        let v = (x1 * long_convolution(&v, &filters.narrow(1, 0, d)?)?)?;
        let v = (x2 * long_convolution(&v, &filters.narrow(1, d, d)?)?)?;
        dense(&v, &block.out_w, &block.out_b)
    }

    /// Token states after the encoder (B, T, d) for values `x (B, L)`, a mask (B, L; 1 =
    /// masked) and source indices (B).
    fn encode(&self, x: &Tensor, mask: Option<&Tensor>, sources: &Tensor) -> Result<Tensor> {
        let (batch, l) = x.dims2()?;
        let d = self.config.d_model;
        let values = x
            .unsqueeze(2)?
            .broadcast_mul(self.value_w.as_tensor())?
            .broadcast_add(self.value_b.as_tensor())?;
        let values = match mask {
            Some(m) => {
                let m = m.unsqueeze(2)?;
                let keep = m.affine(-1.0, 1.0)?;
                (values.broadcast_mul(&keep)? + m.broadcast_mul(self.mask_vector.as_tensor())?)?
            }
            None => values,
        };
        let tokens = values.broadcast_add(self.feature_embedding.as_tensor())?;
        let cls = self
            .cls
            .as_tensor()
            .reshape((1, 1, d))?
            .broadcast_as((batch, 1, d))?;
        let source = self
            .source_embedding
            .as_tensor()
            .index_select(sources, 0)?
            .reshape((batch, 1, d))?;
        let mut h = Tensor::cat(&[&cls, &tokens, &source], 1)?;
        debug_assert_eq!(h.dims3()?, (batch, l + 2, d));
        for block in &self.blocks {
            h = (&h + self.hyena(block, &block.norm1.forward(&h)?)?)?;
            let m = dense(&block.norm2.forward(&h)?, &block.mlp1.0, &block.mlp1.1)?.gelu_erf()?;
            h = (&h + dense(&m, &block.mlp2.0, &block.mlp2.1)?)?;
        }
        self.final_norm.forward(&h)
    }

    /// The L2-normalised CLS embedding (B, d) of values `x (B, L)` from `sources (B)`.
    pub fn embed(&self, x: &Tensor, sources: &Tensor) -> Result<Tensor> {
        let h = self.encode(x, None, sources)?;
        l2_normalize(&h.i((.., 0, ..))?, 1e-12)
    }

    /// Masked-value MSE and (when `labels` is given) SupCon on the CLS embedding; returns the
    /// total and its parts (MSE, SupCon). `mask` is 1 where a value is hidden.
    pub fn objective(
        &self,
        x: &Tensor,
        mask: &Tensor,
        sources: &Tensor,
        labels: Option<&[u32]>,
    ) -> Result<(Tensor, [f64; 2])> {
        let h = self.encode(x, Some(mask), sources)?;
        let l = self.features;
        let feature_states = h.narrow(1, 1, l)?;
        let predicted = dense(&feature_states, &self.head_w, &self.head_b)?.squeeze(D::Minus1)?;
        let masked = mask.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;
        let mse = ((predicted - x)?.sqr()? * mask)?
            .sum_all()?
            .affine(1.0 / masked, 0.0)?;
        let mse_value = mse.to_scalar::<f32>()? as f64;
        match labels {
            None => Ok((mse, [mse_value, 0.0])),
            Some(labels) => {
                let cls = l2_normalize(&h.i((.., 0, ..))?, 1e-12)?;
                let supcon = supcon_loss(&cls, labels, self.config.temperature)?;
                let supcon_value = supcon.to_scalar::<f32>()? as f64;
                let total = (mse + (supcon * self.config.supcon_weight)?)?;
                Ok((total, [mse_value, supcon_value]))
            }
        }
    }
}
