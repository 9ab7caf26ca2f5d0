//! Training data: a profile matrix with batch and label per row, its standardisation, and
//! the split of whole batches into training and validation.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{LearnedError, Result};

/// Profiles to learn from: `n` rows of `d` features (row-major), with each row's batch and
/// perturbation label.
#[derive(Debug, Clone)]
pub struct Profiles {
    /// Feature values, row-major `n x d`.
    pub x: Vec<f32>,
    /// Feature names, in column order.
    pub features: Vec<String>,
    /// Batch of each row.
    pub batches: Vec<String>,
    /// Label of each row.
    pub labels: Vec<String>,
}

impl Profiles {
    /// Rows.
    pub fn rows(&self) -> usize {
        self.batches.len()
    }

    /// Features.
    pub fn width(&self) -> usize {
        self.features.len()
    }

    /// Checks shapes and values: every value finite (the error names the feature).
    pub fn validate(&self) -> Result<()> {
        let (n, d) = (self.rows(), self.width());
        if n == 0 || d == 0 {
            return Err(LearnedError::BadInput(format!(
                "nothing to learn from: {n} rows x {d} features"
            )));
        }
        if self.x.len() != n * d || self.labels.len() != n {
            return Err(LearnedError::BadInput(
                "values, batches and labels disagree in length".into(),
            ));
        }
        if let Some(i) = self.x.iter().position(|v| !v.is_finite()) {
            return Err(LearnedError::BadInput(format!(
                "feature '{}' has a non-finite value (row {}): impute or drop it first \
                 (e.g. balans preprocess --feature-select drop-na-columns)",
                self.features[i % d],
                i / d
            )));
        }
        Ok(())
    }
}

/// Per-feature centring and scaling fitted on the training rows and stored with the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Standardizer {
    /// Mean of each feature.
    pub mean: Vec<f32>,
    /// Standard deviation of each feature (1 where it is zero).
    pub scale: Vec<f32>,
}

impl Standardizer {
    /// Fits on the rows `rows` of a row-major `x` with `d` columns (in f64).
    pub fn fit(x: &[f32], d: usize, rows: &[usize]) -> Self {
        let n = rows.len().max(1) as f64;
        let mut mean = vec![0f64; d];
        for &r in rows {
            for (m, v) in mean.iter_mut().zip(&x[r * d..(r + 1) * d]) {
                *m += *v as f64;
            }
        }
        mean.iter_mut().for_each(|m| *m /= n);
        let mut var = vec![0f64; d];
        for &r in rows {
            for ((s, v), m) in var.iter_mut().zip(&x[r * d..(r + 1) * d]).zip(&mean) {
                *s += (*v as f64 - m).powi(2);
            }
        }
        let scale = var
            .iter()
            .map(|s| {
                let sd = (s / n).sqrt();
                if sd > 1e-12 { sd as f32 } else { 1.0 }
            })
            .collect();
        Self {
            mean: mean.iter().map(|&m| m as f32).collect(),
            scale,
        }
    }

    /// Standardises a row-major block in place.
    pub fn apply(&self, x: &mut [f32]) {
        let d = self.mean.len();
        for row in x.chunks_mut(d) {
            for ((v, m), s) in row.iter_mut().zip(&self.mean).zip(&self.scale) {
                *v = (*v - m) / s;
            }
        }
    }
}

/// Which batches train and which validate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchSplit {
    /// Training batches, sorted.
    pub training: Vec<String>,
    /// Held-out validation batches, sorted.
    pub validation: Vec<String>,
}

impl BatchSplit {
    /// Holds out `count` whole batches (default: a fifth, at least one) chosen by `seed`.
    pub fn choose(batches: &[String], count: Option<usize>, seed: u64) -> Result<Self> {
        let mut names: Vec<String> = batches.to_vec();
        names.sort();
        names.dedup();
        if names.len() < 2 {
            return Err(LearnedError::BadInput(format!(
                "training needs at least two batches (one is held out for validation and early \
                 stopping); the batch column has {} value(s)",
                names.len()
            )));
        }
        let count = count.unwrap_or_else(|| (names.len() as f64 * 0.2).round().max(1.0) as usize);
        if count == 0 || count >= names.len() {
            return Err(LearnedError::InvalidArgument(format!(
                "hold out between 1 and {} of the {} batches for validation, not {count}",
                names.len() - 1,
                names.len()
            )));
        }
        let mut order = names.clone();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_ba7c));
        let mut validation: Vec<String> = order[..count].to_vec();
        validation.sort();
        let training = names
            .into_iter()
            .filter(|b| !validation.contains(b))
            .collect();
        Ok(Self {
            training,
            validation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standardizer_centres_and_scales_and_keeps_constants() {
        let x = vec![1.0, 5.0, 3.0, 5.0];
        let s = Standardizer::fit(&x, 2, &[0, 1]);
        assert_eq!(s.mean, vec![2.0, 5.0]);
        assert_eq!(s.scale, vec![1.0, 1.0]);
        let mut y = x.clone();
        s.apply(&mut y);
        assert_eq!(y, vec![-1.0, 0.0, 1.0, 0.0]);
    }

    #[test]
    fn split_holds_out_whole_batches_deterministically() {
        let batches: Vec<String> = ["a", "b", "c", "d", "e", "a"].map(String::from).to_vec();
        let s = BatchSplit::choose(&batches, None, 7).unwrap();
        assert_eq!(s.validation.len(), 1);
        assert_eq!(s.training.len(), 4);
        assert_eq!(s, BatchSplit::choose(&batches, None, 7).unwrap());
        assert!(BatchSplit::choose(&batches, Some(5), 7).is_err());
        let one = vec!["a".to_string(); 3];
        let e = BatchSplit::choose(&one, None, 0).unwrap_err().to_string();
        assert!(e.contains("at least two batches"), "{e}");
    }

    #[test]
    fn non_finite_values_are_named() {
        let p = Profiles {
            x: vec![1.0, f32::NAN],
            features: vec!["a".into(), "b".into()],
            batches: vec!["x".into()],
            labels: vec!["l".into()],
        };
        assert!(p.validate().unwrap_err().to_string().contains("'b'"));
    }
}
