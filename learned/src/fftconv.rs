//! The bidirectional long convolution of CellPainTR's Hyena operator by FFT, O(T log T) per
//! channel, as a candle custom operation with its backward pass.
//!
//! For tokens `v (B, T, d)` and filters `h (2T−1, d)` (offset −(T−1) first),
//! `y[b, t, c] = Σ_s h[t − s + T − 1, c] · v[b, s, c]`. With `z = h_c ∗ v_{b,c}` the full linear
//! convolution, `y[b, t, c] = z[t + T − 1]`. The gradients are convolutions too:
//! `∂L/∂v = ` the same operation with the filter reversed, and
//! `∂L/∂h[k, c] = Σ_b (g_{b,c} ∗ reverse(v_{b,c}))[k]`. Transforms are radix-2, in `f64`, one
//! channel per rayon task (each output is written by one task, so results do not depend on
//! the thread count).

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;

/// A radix-2 transform of one power-of-two size.
struct Fft {
    n: usize,
    cos: Vec<f64>,
    sin: Vec<f64>,
    reversed: Vec<usize>,
}

impl Fft {
    fn new(n: usize) -> Self {
        debug_assert!(n.is_power_of_two());
        let bits = n.trailing_zeros();
        let reversed = (0..n)
            .map(|i| {
                if bits == 0 {
                    0
                } else {
                    i.reverse_bits() >> (usize::BITS - bits)
                }
            })
            .collect();
        let angle = |k: usize| -2.0 * std::f64::consts::PI * k as f64 / n as f64;
        Self {
            n,
            cos: (0..n / 2).map(|k| angle(k).cos()).collect(),
            sin: (0..n / 2).map(|k| angle(k).sin()).collect(),
            reversed,
        }
    }

    /// In-place transform (`inverse`: conjugate twiddles and divide by n).
    fn transform(&self, re: &mut [f64], im: &mut [f64], inverse: bool) {
        let n = self.n;
        for i in 0..n {
            let j = self.reversed[i];
            if i < j {
                re.swap(i, j);
                im.swap(i, j);
            }
        }
        let sign = if inverse { -1.0 } else { 1.0 };
        let mut size = 2;
        while size <= n {
            let half = size / 2;
            let step = n / size;
            for start in (0..n).step_by(size) {
                for k in 0..half {
                    let (wr, wi) = (self.cos[k * step], sign * self.sin[k * step]);
                    let (a, b) = (start + k, start + k + half);
                    let tr = re[b] * wr - im[b] * wi;
                    let ti = re[b] * wi + im[b] * wr;
                    re[b] = re[a] - tr;
                    im[b] = im[a] - ti;
                    re[a] += tr;
                    im[a] += ti;
                }
            }
            size *= 2;
        }
        if inverse {
            let scale = 1.0 / n as f64;
            re.iter_mut().for_each(|v| *v *= scale);
            im.iter_mut().for_each(|v| *v *= scale);
        }
    }

    /// The spectrum of `values` zero-padded to n.
    fn spectrum(&self, values: impl Iterator<Item = f64>) -> (Vec<f64>, Vec<f64>) {
        let mut re = vec![0.0; self.n];
        for (slot, v) in re.iter_mut().zip(values) {
            *slot = v;
        }
        let mut im = vec![0.0; self.n];
        self.transform(&mut re, &mut im, false);
        (re, im)
    }
}

/// `out[b, i, c] = (f_c ∗ x_{b,c})[start + i]` for `i < out_len`: `x (B, T, d)`, filters
/// `f (F, d)` shared over `b`.
fn convolve_shared(
    x: &[f32],
    (batch, t, d): (usize, usize, usize),
    f: &[f32],
    taps: usize,
    start: usize,
    out_len: usize,
) -> Vec<f32> {
    let fft = Fft::new((t + taps - 1).next_power_of_two());
    let per_channel: Vec<Vec<f32>> = (0..d)
        .into_par_iter()
        .map(|c| {
            let (fr, fi) = fft.spectrum((0..taps).map(|k| f[k * d + c] as f64));
            let mut out = vec![0f32; batch * out_len];
            for b in 0..batch {
                let (mut re, mut im) = fft.spectrum((0..t).map(|s| x[(b * t + s) * d + c] as f64));
                for k in 0..fft.n {
                    let (a, bb) = (re[k], im[k]);
                    re[k] = a * fr[k] - bb * fi[k];
                    im[k] = a * fi[k] + bb * fr[k];
                }
                fft.transform(&mut re, &mut im, true);
                for i in 0..out_len {
                    out[b * out_len + i] = re[start + i] as f32;
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
    let fft = Fft::new(taps.next_power_of_two());
    let per_channel: Vec<Vec<f32>> = (0..d)
        .into_par_iter()
        .map(|c| {
            let mut sum_re = vec![0.0; fft.n];
            let mut sum_im = vec![0.0; fft.n];
            for b in 0..batch {
                let (gr, gi) = fft.spectrum((0..t).map(|s| g[(b * t + s) * d + c] as f64));
                let (vr, vi) =
                    fft.spectrum((0..t).map(|s| v[(b * t + (t - 1 - s)) * d + c] as f64));
                for k in 0..fft.n {
                    sum_re[k] += gr[k] * vr[k] - gi[k] * vi[k];
                    sum_im[k] += gr[k] * vi[k] + gi[k] * vr[k];
                }
            }
            fft.transform(&mut sum_re, &mut sum_im, true);
            sum_re[..taps].iter().map(|&v| v as f32).collect()
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

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let (start, end) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg(format!("long convolution: {what} must be contiguous"))
    })?;
    Ok(&s.as_slice::<f32>()?[start..end])
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
        let v = contiguous(s1, l1, "tokens")?;
        let h = contiguous(s2, l2, "filters")?;
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
        let g = contiguous(s1, l1, "gradient")?;
        let v = contiguous(s2, l2, "tokens")?;
        let out = filter_gradient(g, v, dims);
        Ok((CpuStorage::F32(out), Shape::from((2 * dims.1 - 1, dims.2))))
    }
}

/// `y[b, t, c] = Σ_s h[t − s + T − 1, c] · v[b, s, c]` by FFT, differentiable in `v` and `h`.
pub fn long_convolution(v: &Tensor, h: &Tensor) -> Result<Tensor> {
    Ok(v.contiguous()?
        .apply_op2(&h.contiguous()?, LongConvolution)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transform_inverts_and_matches_a_direct_dft() {
        let fft = Fft::new(8);
        let x: Vec<f64> = (0..8)
            .map(|i| (i as f64 * 0.7).sin() + 0.1 * i as f64)
            .collect();
        let (re, im) = fft.spectrum(x.iter().copied());
        for k in 0..8 {
            let (mut dr, mut di) = (0.0, 0.0);
            for (n, v) in x.iter().enumerate() {
                let a = -2.0 * std::f64::consts::PI * (k * n) as f64 / 8.0;
                dr += v * a.cos();
                di += v * a.sin();
            }
            assert!((re[k] - dr).abs() < 1e-12 && (im[k] - di).abs() < 1e-12);
        }
        let (mut r, mut i) = (re.clone(), im.clone());
        fft.transform(&mut r, &mut i, true);
        for (a, b) in r.iter().zip(&x) {
            assert!((a - b).abs() < 1e-12);
        }
    }
}
