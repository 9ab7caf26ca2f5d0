//! The short depthwise convolution of CellPainTR's Hyena operator (kernel 3 along the tokens,
//! zero padding) as one candle custom operation with its backward pass.
//!
//! `y[b, t, c] = w[c, 0]·u[b, t−1, c] + w[c, 1]·u[b, t, c] + w[c, 2]·u[b, t+1, c]`. Built from
//! candle's primitives ([`short_convolution_reference`]) it took a seventh of a CellPainTR
//! training step: two shifted copies, strided broadcasts of weight columns and reductions over
//! the leading axes in the backward pass. Here one pass does the forward, the input gradient is
//! the same operation with the kernel reversed, and the weight gradient one pass of sums.
//! Outputs are written per batch row (forward) or summed in a fixed order (weight gradient), so
//! results do not depend on the thread count. On devices other than the CPU the reference is
//! used.

use candle_core::{CpuStorage, CustomOp2, IndexOp, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::custom_op::f32_slice;
use crate::error::Result;

/// `y (B, T, C)` from `u (B, T, C)` and `w (C, 3)`.
fn forward(u: &[f32], w: &[f32], (batch, t, c): (usize, usize, usize)) -> Vec<f32> {
    let mut y = vec![0f32; batch * t * c];
    y.par_chunks_mut(t * c)
        .zip(u.par_chunks(t * c))
        .take(batch)
        .for_each(|(y, u)| {
            for s in 0..t {
                let row = &mut y[s * c..(s + 1) * c];
                let here = &u[s * c..(s + 1) * c];
                for ((out, &x), k) in row.iter_mut().zip(here).zip(w.chunks_exact(3)) {
                    *out = k[1] * x;
                }
                if s > 0 {
                    let before = &u[(s - 1) * c..s * c];
                    for ((out, &x), k) in row.iter_mut().zip(before).zip(w.chunks_exact(3)) {
                        *out += k[0] * x;
                    }
                }
                if s + 1 < t {
                    let after = &u[(s + 1) * c..(s + 2) * c];
                    for ((out, &x), k) in row.iter_mut().zip(after).zip(w.chunks_exact(3)) {
                        *out += k[2] * x;
                    }
                }
            }
        });
    y
}

/// `∂L/∂w (C, 3)`: `Σ_{b,t} g[b, t, c]·u[b, t−1+k, c]`, summed in `f64` in row order.
fn weight_gradient(g: &[f32], u: &[f32], (batch, t, c): (usize, usize, usize)) -> Vec<f32> {
    let mut sums = vec![0f64; c * 3];
    for b in 0..batch {
        for s in 0..t {
            let at = (b * t + s) * c;
            let grad = &g[at..at + c];
            for k in 0..3 {
                let Some(source) = (s + k).checked_sub(1).filter(|&r| r < t) else {
                    continue;
                };
                let from = (b * t + source) * c;
                for (ch, (&gv, &uv)) in grad.iter().zip(&u[from..from + c]).enumerate() {
                    sums[ch * 3 + k] += gv as f64 * uv as f64;
                }
            }
        }
    }
    sums.into_iter().map(|v| v as f32).collect()
}

/// The forward operation: `u (B, T, C)`, `w (C, 3)` → `y (B, T, C)`.
struct ShortConvolution;

impl CustomOp2 for ShortConvolution {
    fn name(&self) -> &'static str {
        "hyena-short-convolution"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l1.shape().dims3()?;
        if l2.shape().dims2()? != (dims.2, 3) {
            return Err(candle_core::Error::Msg(format!(
                "short convolution: weights {:?} do not fit tokens {:?}",
                l2.shape(),
                l1.shape()
            )));
        }
        let u = f32_slice(self.name(), "tokens", s1, l1)?;
        let w = f32_slice(self.name(), "weights", s2, l2)?;
        Ok((CpuStorage::F32(forward(u, w, dims)), l1.shape().clone()))
    }

    fn bwd(
        &self,
        u: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        // ∂L/∂u[t] = w0·g[t+1] + w1·g[t] + w2·g[t−1]: the same operation, kernel reversed.
        let reversed = Tensor::cat(&[w.i((.., 2..3))?, w.i((.., 1..2))?, w.i((.., 0..1))?], 1)?
            .contiguous()?;
        let grad_u = grad.apply_op2_no_bwd(&reversed, &ShortConvolution)?;
        let grad_w = grad.apply_op2_no_bwd(&u.contiguous()?, &ShortWeightGradient)?;
        Ok((Some(grad_u), Some(grad_w)))
    }
}

/// The weight gradient: `g (B, T, C)`, `u (B, T, C)` → `(C, 3)`.
struct ShortWeightGradient;

impl CustomOp2 for ShortWeightGradient {
    fn name(&self) -> &'static str {
        "hyena-short-convolution-weight-gradient"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l1.shape().dims3()?;
        let g = f32_slice(self.name(), "gradient", s1, l1)?;
        let u = f32_slice(self.name(), "tokens", s2, l2)?;
        Ok((
            CpuStorage::F32(weight_gradient(g, u, dims)),
            Shape::from((dims.2, 3)),
        ))
    }
}

/// Depthwise convolution with kernel 3 along the tokens (zero padding) of `u (B, T, C)` with
/// weights `w (C, 3)` (`w[c, 0]` multiplies the previous token), differentiable in both: one
/// custom operation on the CPU, [`short_convolution_reference`] elsewhere.
pub fn short_convolution(u: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !u.device().is_cpu() {
        return short_convolution_reference(u, w);
    }
    Ok(u.contiguous()?
        .apply_op2(&w.contiguous()?, ShortConvolution)?)
}

/// The same convolution from candle's differentiable primitives (shifted copies times weight
/// columns): runs on any device; the tests' reference.
pub fn short_convolution_reference(u: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (batch, t, c) = u.dims3()?;
    if t == 1 {
        return Ok(u.broadcast_mul(&w.i((.., 1))?)?);
    }
    let zeros = Tensor::zeros((batch, 1, c), u.dtype(), u.device())?;
    let previous = Tensor::cat(&[&zeros, &u.narrow(1, 0, t - 1)?], 1)?;
    let next = Tensor::cat(&[&u.narrow(1, 1, t - 1)?, &zeros], 1)?;
    Ok(
        ((previous.broadcast_mul(&w.i((.., 0))?)? + u.broadcast_mul(&w.i((.., 1))?)?)?
            + next.broadcast_mul(&w.i((.., 2))?)?)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn values(n: usize, phase: f32) -> Vec<f32> {
        (0..n).map(|i| ((i as f32) * 0.73 + phase).sin()).collect()
    }

    #[test]
    fn values_and_gradients_match_the_reference() {
        let device = Device::Cpu;
        for (batch, t, c) in [(2, 5, 3), (1, 1, 4), (3, 2, 1)] {
            let u = Var::from_vec(values(batch * t * c, 0.1), (batch, t, c), &device).unwrap();
            let w = Var::from_vec(values(c * 3, 1.7), (c, 3), &device).unwrap();
            // A non-uniform weighting of the outputs, so every gradient entry differs.
            let weights =
                Tensor::from_vec(values(batch * t * c, 2.9), (batch, t, c), &device).unwrap();
            let run = |f: fn(&Tensor, &Tensor) -> Result<Tensor>| {
                let y = f(u.as_tensor(), w.as_tensor()).unwrap();
                let grads = (&y * &weights)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                (
                    flat(&y),
                    flat(grads.get(u.as_tensor()).unwrap()),
                    flat(grads.get(w.as_tensor()).unwrap()),
                )
            };
            let fast = run(short_convolution);
            let reference = run(short_convolution_reference);
            for (a, b) in [
                (&fast.0, &reference.0),
                (&fast.1, &reference.1),
                (&fast.2, &reference.2),
            ] {
                assert_eq!(a.len(), b.len());
                for (x, y) in a.iter().zip(b) {
                    assert!((x - y).abs() < 1e-5, "{batch}x{t}x{c}: {x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn mismatched_weights_are_an_error() {
        let device = Device::Cpu;
        let u = Tensor::zeros((1, 4, 3), candle_core::DType::F32, &device).unwrap();
        let w = Tensor::zeros((2, 3), candle_core::DType::F32, &device).unwrap();
        assert!(short_convolution(&u, &w).is_err());
    }
}
