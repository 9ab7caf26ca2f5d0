//! Losses of the learned models, as functions of tensors: the additive angular margin
//! (ArcFace) classifier loss, the supervised contrastive loss (SupCon), and the symmetric
//! Kullback-Leibler divergence that aligns clean and perturbed predictions.

use candle_core::{D, DType, Tensor};
use candle_nn::ops::log_softmax;

use crate::error::Result;

/// Rows divided by their L2 norm (`eps` keeps a zero row finite).
pub fn l2_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.affine(1.0, eps)?;
    Ok(x.broadcast_div(&norm)?)
}

/// Mean cross-entropy of `logits` (n x classes) against integer `labels` (n, `u32`).
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let log_p = log_softmax(logits, D::Minus1)?;
    let picked = log_p.gather(&labels.unsqueeze(1)?, 1)?;
    Ok(picked.mean_all()?.neg()?)
}

/// Cosine of every embedding to every class centre: `normalize(emb) · normalize(W)ᵀ`
/// (n x classes). `emb` rows are expected normalised already.
pub fn class_cosines(embedding: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let w = l2_normalize(weight, 1e-12)?;
    Ok(embedding.matmul(&w.t()?)?)
}

/// The ArcFace logits of Deng et al. 2019: `s · cos(θ_y + m)` for the true class and
/// `s · cos θ_j` for the others, with the usual fallback `cos θ − m sin m` where `θ + m`
/// would pass π (so the target logit stays monotone in θ).
pub fn arcface_logits(
    cosines: &Tensor,
    labels: &Tensor,
    scale: f64,
    margin: f64,
) -> Result<Tensor> {
    let (n, classes) = cosines.dims2()?;
    let cos = cosines.clamp(-1.0 + 1e-7, 1.0 - 1e-7)?;
    let sin = cos.sqr()?.affine(-1.0, 1.0)?.sqrt()?;
    let phi = ((&cos * margin.cos())? - (&sin * margin.sin())?)?;
    let threshold = (std::f64::consts::PI - margin).cos();
    let fallback = cos.affine(1.0, -margin * margin.sin())?;
    let use_phi = cos.gt(threshold)?;
    let phi = use_phi.where_cond(&phi, &fallback)?;
    let one_hot = one_hot(labels, n, classes, cos.dtype())?;
    let mixed = ((&one_hot * &phi)? + (one_hot.affine(-1.0, 1.0)? * &cos)?)?;
    Ok((mixed * scale)?)
}

/// A (n x classes) one-hot matrix of `labels` (n, `u32`).
pub fn one_hot(labels: &Tensor, n: usize, classes: usize, dtype: DType) -> Result<Tensor> {
    let ones = Tensor::ones((n, 1), dtype, labels.device())?;
    let zeros = Tensor::zeros((n, classes), dtype, labels.device())?;
    Ok(zeros.scatter_add(&labels.unsqueeze(1)?, &ones, 1)?)
}

/// The ArcFace loss: cross-entropy of [`arcface_logits`].
pub fn arcface_loss(
    embedding: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    scale: f64,
    margin: f64,
) -> Result<Tensor> {
    let cos = class_cosines(embedding, weight)?;
    cross_entropy(&arcface_logits(&cos, labels, scale, margin)?, labels)
}

/// The supervised contrastive loss of Khosla et al. 2020 (`L_out`): for each anchor `i`
/// with at least one positive (same label, `j ≠ i`),
/// `−1/|P(i)| Σ_{p∈P(i)} log( exp(z_i·z_p/τ) / Σ_{a≠i} exp(z_i·z_a/τ) )`, averaged over those
/// anchors. `embedding` rows must be L2-normalised; `labels` are `u32`. Anchors without a
/// positive are left out; a batch without any positive pair gives 0.
pub fn supcon_loss(embedding: &Tensor, labels: &[u32], temperature: f64) -> Result<Tensor> {
    let n = labels.len();
    let device = embedding.device();
    let dtype = embedding.dtype();
    let similarity = (embedding.matmul(&embedding.t()?)? / temperature)?;
    // Masks: self (excluded from the denominator) and positives.
    let mut self_mask = vec![0f32; n * n];
    let mut positive = vec![0f32; n * n];
    let mut anchors = vec![0f32; n];
    let mut counts = vec![1f32; n];
    for i in 0..n {
        self_mask[i * n + i] = 1.0;
        let mut c = 0;
        for j in 0..n {
            if j != i && labels[j] == labels[i] {
                positive[i * n + j] = 1.0;
                c += 1;
            }
        }
        if c > 0 {
            anchors[i] = 1.0;
            counts[i] = c as f32;
        }
    }
    let anchor_count: f32 = anchors.iter().sum();
    if anchor_count == 0.0 {
        return Ok(Tensor::zeros((), dtype, device)?);
    }
    let self_mask = Tensor::from_vec(self_mask, (n, n), device)?.to_dtype(dtype)?;
    let positive = Tensor::from_vec(positive, (n, n), device)?.to_dtype(dtype)?;
    let anchors = Tensor::from_vec(anchors, n, device)?.to_dtype(dtype)?;
    let counts = Tensor::from_vec(counts, n, device)?.to_dtype(dtype)?;
    // Subtract a large number on the diagonal so exp(·) drops self from the denominator;
    // log-softmax over a ≠ i then gives the log ratio for every pair.
    let masked = (similarity - (self_mask * 1e9)?)?;
    let log_ratio = log_softmax(&masked, D::Minus1)?;
    let per_anchor = (log_ratio * positive)?.sum(D::Minus1)?.div(&counts)?;
    let total = (per_anchor * anchors)?.sum_all()?;
    Ok((total.neg()? / anchor_count as f64)?)
}

/// Mean over rows of `KL(p‖q) + KL(q‖p)` between the softmax distributions of two logit
/// matrices of the same shape.
pub fn symmetric_kl(logits_a: &Tensor, logits_b: &Tensor) -> Result<Tensor> {
    let log_p = log_softmax(logits_a, D::Minus1)?;
    let log_q = log_softmax(logits_b, D::Minus1)?;
    let p = log_p.exp()?;
    let q = log_q.exp()?;
    let diff = (&log_p - &log_q)?;
    let kl = ((p * &diff)? - (q * &diff)?)?.sum(D::Minus1)?;
    Ok(kl.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn tensor(rows: &[&[f32]]) -> Tensor {
        let d = rows[0].len();
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows.len(), d), &Device::Cpu).unwrap()
    }

    fn scalar(t: &Tensor) -> f64 {
        t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
    }

    #[test]
    fn arcface_matches_a_hand_computation() {
        // Two unit embeddings, two class centres (already unit), margin 0.5, scale 2.
        let (c, s) = (0.6f32, 0.8f32);
        let emb = tensor(&[&[s, c], &[c, s]]);
        let w = tensor(&[&[1.0, 0.0], &[0.0, 1.0]]);
        let labels = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
        let loss = scalar(&arcface_loss(&emb, &w, &labels, 2.0, 0.5).unwrap());
        // Row 0: cos to class 0 = 0.8 -> target logit 2cos(acos(0.8) + 0.5); other 2·0.6.
        let t0 = 2.0 * (0.8f64.acos() + 0.5).cos();
        let l0 = -(t0 - (t0.exp() + (2.0f64 * 0.6).exp()).ln());
        // Row 1: cos to class 1 = 0.8 -> θ = acos(0.8), target 2cos(θ+0.5); other 2·0.6.
        let t1 = 2.0 * (0.8f64.acos() + 0.5).cos();
        let o1: f64 = 2.0 * 0.6;
        let l1 = -(t1 - (t1.exp() + o1.exp()).ln());
        let expected = (l0 + l1) / 2.0;
        assert!((loss - expected).abs() < 1e-5, "{loss} vs {expected}");
    }

    #[test]
    fn arcface_falls_back_past_pi() {
        // cos θ = -0.99 with m = 0.5: θ + m > π, so the target logit is cos θ − m sin m.
        let cos = tensor(&[&[-0.99, 0.1]]);
        let labels = Tensor::new(&[0u32], &Device::Cpu).unwrap();
        let logits = arcface_logits(&cos, &labels, 1.0, 0.5).unwrap();
        let v = logits.to_vec2::<f32>().unwrap();
        assert!((v[0][0] as f64 - (-0.99 - 0.5 * 0.5f64.sin())).abs() < 1e-6);
        assert!((v[0][1] - 0.1).abs() < 1e-7);
    }

    #[test]
    fn supcon_matches_a_hand_computation() {
        // Three unit vectors in 2-D, labels [0, 0, 1], τ = 0.5.
        let s = std::f32::consts::FRAC_1_SQRT_2;
        let z = [[1.0f64, 0.0], [s as f64, s as f64], [0.0, 1.0]];
        let emb = tensor(&[&[1.0, 0.0], &[s, s], &[0.0, 1.0]]);
        let loss = scalar(&supcon_loss(&emb, &[0, 0, 1], 0.5).unwrap());
        let dot = |a: usize, b: usize| (z[a][0] * z[b][0] + z[a][1] * z[b][1]) / 0.5;
        // Anchor 0: positive 1, denominator over {1, 2}; anchor 1: positive 0, over {0, 2};
        // anchor 2 has no positive and is left out.
        let l0 = -(dot(0, 1) - (dot(0, 1).exp() + dot(0, 2).exp()).ln());
        let l1 = -(dot(1, 0) - (dot(1, 0).exp() + dot(1, 2).exp()).ln());
        let expected = (l0 + l1) / 2.0;
        assert!((loss - expected).abs() < 1e-5, "{loss} vs {expected}");
        // No positive pairs: zero.
        assert_eq!(scalar(&supcon_loss(&emb, &[0, 1, 2], 0.5).unwrap()), 0.0);
    }

    #[test]
    fn symmetric_kl_is_zero_for_equal_and_positive_otherwise() {
        let a = tensor(&[&[1.0, 2.0, 3.0]]);
        let b = tensor(&[&[3.0, 2.0, 1.0]]);
        assert!(scalar(&symmetric_kl(&a, &a).unwrap()).abs() < 1e-7);
        let p: Vec<f64> = [1.0f64, 2.0, 3.0].iter().map(|x| x.exp()).collect();
        let zp: f64 = p.iter().sum();
        let p: Vec<f64> = p.iter().map(|x| x / zp).collect();
        let q: Vec<f64> = p.iter().rev().copied().collect();
        let expected: f64 = (0..3).map(|i| (p[i] - q[i]) * (p[i] / q[i]).ln()).sum();
        let got = scalar(&symmetric_kl(&a, &b).unwrap());
        assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
    }
}
