//! The bidirectional long convolution of CellPainTR's Hyena operator by FFT, O(T log T) per
//! channel, as a candle custom operation with its backward pass.
//!
//! For tokens `v (B, T, d)` and filters `h (2T−1, d)` (offset −(T−1) first),
//! `y[b, t, c] = Σ_s h[t − s + T − 1, c] · v[b, s, c]`. With `z = h_c ∗ v_{b,c}` the full linear
//! convolution, `y[b, t, c] = z[t + T − 1]`. The gradients are convolutions too:
//! `∂L/∂v = ` the same operation with the filter reversed, and
//! `∂L/∂h[k, c] = Σ_b (g_{b,c} ∗ reverse(v_{b,c}))[k]`. Transforms are real FFTs
//! (`realfft`) in `f64`, one channel per rayon task (each output is written by one task, so results do not depend on
//! the thread count).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;
use realfft::num_complex::Complex;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};

use crate::custom_op::f32_slice;
use crate::error::Result;

/// The smallest even length `≥ n` whose prime factors are 2, 3 and 5: the sizes the FFT
/// library transforms fastest.
fn transform_size(n: usize) -> usize {
    let mut size = n.max(2);
    loop {
        let mut rest = size;
        for p in [2, 3, 5] {
            while rest.is_multiple_of(p) {
                rest /= p;
            }
        }
        if rest == 1 && size.is_multiple_of(2) {
            return size;
        }
        size += 1;
    }
}

/// A forward and an inverse real transform of one length, with per-task buffers.
struct Transforms {
    n: usize,
    forward: Arc<dyn RealToComplex<f64>>,
    inverse: Arc<dyn ComplexToReal<f64>>,
}

/// One task's working memory.
struct Buffers {
    real: Vec<f64>,
    scratch: Vec<Complex<f64>>,
}

impl Transforms {
    fn new(n: usize) -> Self {
        let mut planner = RealFftPlanner::<f64>::new();
        Self {
            n,
            forward: planner.plan_fft_forward(n),
            inverse: planner.plan_fft_inverse(n),
        }
    }

    fn buffers(&self) -> Buffers {
        let scratch = self
            .forward
            .get_scratch_len()
            .max(self.inverse.get_scratch_len());
        Buffers {
            real: vec![0.0; self.n],
            scratch: vec![Complex::default(); scratch],
        }
    }

    /// A zeroed spectrum (n/2 + 1 bins).
    fn empty_spectrum(&self) -> Vec<Complex<f64>> {
        vec![Complex::default(); self.n / 2 + 1]
    }

    /// The spectrum of `values` zero-padded to n, into `out`.
    fn spectrum(
        &self,
        values: impl Iterator<Item = f64>,
        buffers: &mut Buffers,
        out: &mut [Complex<f64>],
    ) {
        buffers.real.fill(0.0);
        for (slot, v) in buffers.real.iter_mut().zip(values) {
            *slot = v;
        }
        self.forward
            .process_with_scratch(&mut buffers.real, out, &mut buffers.scratch)
            .expect("buffer lengths come from the plan");
    }

    /// The real signal of `spectrum` (overwritten), scaled by 1/n, into `buffers.real`.
    fn signal(&self, spectrum: &mut [Complex<f64>], buffers: &mut Buffers) {
        // Products of real spectra are real at 0 and n/2 up to rounding; make them exact.
        let last = spectrum.len() - 1;
        spectrum[0].im = 0.0;
        spectrum[last].im = 0.0;
        self.inverse
            .process_with_scratch(spectrum, &mut buffers.real, &mut buffers.scratch)
            .expect("buffer lengths come from the plan");
        let scale = 1.0 / self.n as f64;
        buffers.real.iter_mut().for_each(|v| *v *= scale);
    }
}

/// `out[b, i, c] = (f_c ∗ x_{b,c})[start + i]` for `i < out_len`: `x (B, T, d)`, filters
/// `f (F, d)` shared over `b`. The transform length only has to keep the wanted window free
/// of wrap-around: `n ≥ start + out_len` and `n ≥ (T + F − 1) − start`.
fn convolve_shared(
    x: &[f32],
    (batch, t, d): (usize, usize, usize),
    f: &[f32],
    taps: usize,
    start: usize,
    out_len: usize,
) -> Vec<f32> {
    let full = t + taps - 1;
    let transforms = Transforms::new(transform_size((start + out_len).max(full - start)));
    let per_channel: Vec<Vec<f32>> = (0..d)
        .into_par_iter()
        .map(|c| {
            let mut buffers = transforms.buffers();
            let mut filter = transforms.empty_spectrum();
            transforms.spectrum(
                (0..taps).map(|k| f[k * d + c] as f64),
                &mut buffers,
                &mut filter,
            );
            let mut spectrum = transforms.empty_spectrum();
            let mut out = vec![0f32; batch * out_len];
            for b in 0..batch {
                transforms.spectrum(
                    (0..t).map(|s| x[(b * t + s) * d + c] as f64),
                    &mut buffers,
                    &mut spectrum,
                );
                for (z, w) in spectrum.iter_mut().zip(&filter) {
                    *z *= w;
                }
                transforms.signal(&mut spectrum, &mut buffers);
                for (slot, v) in out[b * out_len..(b + 1) * out_len]
                    .iter_mut()
                    .zip(&buffers.real[start..start + out_len])
                {
                    *slot = *v as f32;
                }
            }
            out
        })
        .collect();
    let mut y = vec![0f32; batch * out_len * d];
    for (c, values) in per_channel.iter().enumerate() {
        for b in 0..batch {
            for i in 0..out_len {
                y[(b * out_len + i) * d + c] = values[b * out_len + i];
            }
        }
    }
    y
}

/// `out[k, c] = Σ_b (g_{b,c} ∗ reverse(v_{b,c}))[k]` for `k < 2T − 1`: the filter gradient.
fn filter_gradient(g: &[f32], v: &[f32], (batch, t, d): (usize, usize, usize)) -> Vec<f32> {
    let taps = 2 * t - 1;
    let transforms = Transforms::new(transform_size(taps));
    let per_channel: Vec<Vec<f32>> = (0..d)
        .into_par_iter()
        .map(|c| {
            let mut buffers = transforms.buffers();
            let mut sum = transforms.empty_spectrum();
            let mut gs = transforms.empty_spectrum();
            let mut vs = transforms.empty_spectrum();
            for b in 0..batch {
                transforms.spectrum(
                    (0..t).map(|s| g[(b * t + s) * d + c] as f64),
                    &mut buffers,
                    &mut gs,
                );
                transforms.spectrum(
                    (0..t).map(|s| v[(b * t + (t - 1 - s)) * d + c] as f64),
                    &mut buffers,
                    &mut vs,
                );
                for ((acc, a), w) in sum.iter_mut().zip(&gs).zip(&vs) {
                    *acc += a * w;
                }
            }
            transforms.signal(&mut sum, &mut buffers);
            buffers.real[..taps].iter().map(|&v| v as f32).collect()
        })
        .collect();
    let mut out = vec![0f32; taps * d];
    for (c, values) in per_channel.iter().enumerate() {
        for (k, v) in values.iter().enumerate() {
            out[k * d + c] = *v;
        }
    }
    out
}

/// The forward operation: `v (B, T, d)`, `h (2T−1, d)` → `y (B, T, d)`.
struct LongConvolution;

impl CustomOp2 for LongConvolution {
    fn name(&self) -> &'static str {
        "hyena-long-convolution"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (batch, t, d) = l1.shape().dims3()?;
        let (taps, d2) = l2.shape().dims2()?;
        if taps != 2 * t - 1 || d2 != d {
            return Err(candle_core::Error::Msg(format!(
                "long convolution: filters {:?} do not fit tokens {:?}",
                l2.shape(),
                l1.shape()
            )));
        }
        let v = f32_slice(self.name(), "tokens", s1, l1)?;
        let h = f32_slice(self.name(), "filters", s2, l2)?;
        let y = convolve_shared(v, (batch, t, d), h, taps, t - 1, t);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        v: &Tensor,
        h: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let taps = h.dim(0)?;
        let reverse: Vec<u32> = (0..taps as u32).rev().collect();
        let reverse = Tensor::from_vec(reverse, taps, h.device())?;
        let h_reversed = h.contiguous()?.index_select(&reverse, 0)?;
        let grad = grad.contiguous()?;
        let grad_v = grad.apply_op2_no_bwd(&h_reversed, &LongConvolution)?;
        let grad_h = grad.apply_op2_no_bwd(&v.contiguous()?, &FilterGradient)?;
        Ok((Some(grad_v), Some(grad_h)))
    }
}

/// The filter gradient: `g (B, T, d)`, `v (B, T, d)` → `(2T−1, d)`.
struct FilterGradient;

impl CustomOp2 for FilterGradient {
    fn name(&self) -> &'static str {
        "hyena-long-convolution-filter-gradient"
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
        let v = f32_slice(self.name(), "tokens", s2, l2)?;
        let out = filter_gradient(g, v, dims);
        Ok((CpuStorage::F32(out), Shape::from((2 * dims.1 - 1, dims.2))))
    }
}

/// `y[b, t, c] = Σ_s h[t − s + T − 1, c] · v[b, s, c]`, differentiable in `v` and `h`: by FFT
/// on the CPU, as the Toeplitz product [`toeplitz_convolution`] on other devices (the FFT op
/// has no GPU kernel; the product is a batched matmul, which GPUs do well).
pub fn long_convolution(v: &Tensor, h: &Tensor) -> Result<Tensor> {
    if !v.device().is_cpu() {
        return toeplitz_convolution(v, h);
    }
    Ok(v.contiguous()?
        .apply_op2(&h.contiguous()?, LongConvolution)?)
}

/// The same bidirectional long convolution `y[b, t, c] = Σ_s h[t − s + T − 1, c] · v[b, s, c]`
/// for `v (B, T, d)` and `h (2T−1, d)` (offset −(T−1) first), as one Toeplitz matrix per
/// channel times the tokens: O(T²·d) and built from candle's own differentiable ops, so it
/// runs on any device. The tests use it as the reference for the FFT form.
pub fn toeplitz_convolution(v: &Tensor, h: &Tensor) -> Result<Tensor> {
    let (batch, t, d) = v.dims3()?;
    let idx: Vec<u32> = (0..t)
        .flat_map(|row| (0..t).map(move |col| (row + t - 1 - col) as u32))
        .collect();
    let idx = Tensor::from_vec(idx, t * t, v.device())?;
    let toeplitz = h
        .contiguous()?
        .index_select(&idx, 0)?
        .reshape((t, t, d))?
        .permute((2, 0, 1))?;
    let vt = v.permute((2, 1, 0))?.contiguous()?; // (d, T, B)
    let y = toeplitz.contiguous()?.matmul(&vt)?; // (d, T, B)
    Ok(y.permute((2, 1, 0))?.reshape((batch, t, d))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transform_sizes_are_even_and_5_smooth() {
        assert_eq!(transform_size(1), 2);
        assert_eq!(transform_size(7), 8);
        assert_eq!(transform_size(499), 500);
        assert_eq!(transform_size(1001), 1024);
        assert_eq!(transform_size(961), 972);
    }

    #[test]
    fn the_shared_convolution_is_the_direct_sum_at_every_window() {
        // x (B 2, T 5, d 2), filters (F 4, d 2); every window start and length.
        let (batch, t, d, taps) = (2, 5, 2, 4);
        let x: Vec<f32> = (0..batch * t * d)
            .map(|i| ((i as f32) * 0.37).sin())
            .collect();
        let f: Vec<f32> = (0..taps * d).map(|i| ((i as f32) * 0.91).cos()).collect();
        let full = t + taps - 1;
        for start in 0..full {
            for out_len in 1..=full - start {
                let y = convolve_shared(&x, (batch, t, d), &f, taps, start, out_len);
                for b in 0..batch {
                    for i in 0..out_len {
                        for c in 0..d {
                            let k = start + i;
                            let direct: f32 = (0..t)
                                .filter(|&s| k >= s && k - s < taps)
                                .map(|s| f[(k - s) * d + c] * x[(b * t + s) * d + c])
                                .sum();
                            let got = y[(b * out_len + i) * d + c];
                            assert!(
                                (got - direct).abs() < 1e-5,
                                "{start} {out_len}: {got} {direct}"
                            );
                        }
                    }
                }
            }
        }
    }
}
