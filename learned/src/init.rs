//! Seeded parameter initialisation (the same numbers on every machine and thread count).

use candle_core::{Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::Result;

/// A seeded source of initial weights.
#[derive(Debug)]
pub struct Initializer {
    rng: ChaCha8Rng,
    device: Device,
}

impl Initializer {
    /// Weights drawn from `seed`, placed on `device`.
    pub fn new(seed: u64, device: &Device) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            device: device.clone(),
        }
    }

    /// A `(rows, cols)` matrix uniform in `[-bound, bound]`.
    pub fn uniform(&mut self, rows: usize, cols: usize, bound: f64) -> Result<Var> {
        let values: Vec<f32> = (0..rows * cols)
            .map(|_| ((self.rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
            .collect();
        Ok(Var::from_tensor(&Tensor::from_vec(
            values,
            (rows, cols),
            &self.device,
        )?)?)
    }

    /// A linear layer's weight `(out, in)` and bias `(out)`, uniform in `±1/√in` (PyTorch's
    /// default for `nn.Linear`).
    pub fn linear(&mut self, input: usize, output: usize) -> Result<(Var, Var)> {
        let bound = 1.0 / (input.max(1) as f64).sqrt();
        let weight = self.uniform(output, input, bound)?;
        let bias = self.uniform(1, output, bound)?;
        Ok((
            weight,
            Var::from_tensor(&bias.as_tensor().reshape(output)?)?,
        ))
    }

    /// Standard normal numbers (Box-Muller), as f32.
    pub fn normal(&mut self, count: usize) -> Vec<f32> {
        (0..count)
            .map(|_| {
                let u1: f64 = self.rng.random::<f64>().max(1e-300);
                let u2: f64 = self.rng.random();
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
            })
            .collect()
    }

    /// The device the weights are placed on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The generator, for sampling during training.
    pub fn rng(&mut self) -> &mut ChaCha8Rng {
        &mut self.rng
    }
}

/// `x · Wᵀ + b` for a `(n, in)` input.
pub fn linear(x: &Tensor, weight: &Var, bias: &Var) -> Result<Tensor> {
    Ok(x.matmul(&weight.as_tensor().t()?)?
        .broadcast_add(bias.as_tensor())?)
}
