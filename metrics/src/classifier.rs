//! Batch classifier: `1 - macro F1` of a logistic regression predicting the batch of each row
//! from its embedding, out-of-fold over a stratified k-fold split (Arevalo et al. 2024, as
//! `sklearn.model_selection.cross_val_predict(LogisticRegression(max_iter=1000), X, batch,
//! cv=StratifiedKFold(5, shuffle=True))`).
//!
//! The model is scikit-learn 1.9's `LogisticRegression` with its defaults: L2 penalty with
//! `C = 1`, an unpenalised intercept, no feature scaling, the multinomial (softmax) loss when the
//! training fold holds more than two classes and the binomial loss (one coefficient vector, the
//! larger class code positive) when it holds two. The objective is scikit-learn's
//! `mean_i loss_i + ||W||² / (2 C n)` (the same optimum as `C Σ_i loss_i + ||W||² / 2`). It is
//! strictly convex in the coefficients, and it is solved here to convergence (L-BFGS, gradient
//! max-norm below [`GRADIENT_TOLERANCE`]) instead of scikit-learn's loose `tol = 1e-4`, so the
//! predictions are the optimum's, not those of wherever a solver happened to stop (on the golden
//! data they equal scikit-learn's own at `tol = 1e-12`). The solver works in standardised and whitened
//! coordinates, an invertible change of variables with the penalty carried over (so the optimum
//! is unchanged) that only conditions the problem.
//!
//! Every sum over rows is taken over fixed tiles of [`TILE_ROWS`] rows and combined in tile order,
//! so results do not depend on the number of threads.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::error::{MetricsError, Result, ensure_finite};

/// Inverse regularisation strength, scikit-learn's default `C`.
pub const INVERSE_REGULARISATION: f64 = 1.0;
/// Convergence: largest absolute gradient component of the mean objective, with respect to the
/// solver's (standardised, whitened) coefficients and the intercepts.
pub const GRADIENT_TOLERANCE: f64 = 1e-7;
/// L-BFGS iteration limit; exceeding it is a [`MetricsError::Numeric`] error.
pub const MAX_ITERATIONS: usize = 20_000;
/// Rows per tile of the loss / gradient sums (fixed, for thread-count-independent results).
pub const TILE_ROWS: usize = 1024;
/// L-BFGS memory (correction pairs kept), scikit-learn's / scipy's default.
const HISTORY: usize = 10;
/// Line search: sufficient decrease (Armijo) constant.
const ARMIJO: f64 = 1e-4;
/// Line search: curvature (strong Wolfe) constant.
const CURVATURE: f64 = 0.9;
/// Line search: evaluations per search before giving up.
const MAX_LINE_SEARCH: usize = 60;

/// Out-of-fold predictions and scores of [`batch_classifier`].
#[derive(Debug, Clone, PartialEq)]
pub struct ClassifierResult {
    /// Predicted class of every row, from the model fitted without that row's fold.
    pub predicted: Vec<u32>,
    /// `1 - macro F1` of the pooled out-of-fold predictions (the reported metric).
    pub score: f64,
    /// `1 - mean over folds of the macro F1` of each fold's test rows.
    pub mean_over_folds: f64,
}

/// Assigns each row to one of `n_splits` folds, stratified by class, shuffled with `seed`.
///
/// scikit-learn's `StratifiedKFold(shuffle=True)` rule with our own random stream (ChaCha8): the
/// classes are taken in order of first appearance; the number of rows of each class in each fold
/// comes from dealing the class-sorted rows round-robin over the folds (so every class is spread
/// as evenly as possible and fold sizes differ by at most one); then each class's fold labels are
/// shuffled and given to its rows in row order. A class with fewer rows than `n_splits` is allowed
/// (scikit-learn only warns): it is absent from some test folds. It is an error, as in
/// scikit-learn, when every class has fewer than `n_splits` rows, when `n_splits < 2` or when
/// there are fewer rows than folds.
pub fn stratified_folds(classes: &[u32], n_splits: usize, seed: u64) -> Result<Vec<u32>> {
    let n = classes.len();
    if n_splits < 2 {
        return Err(MetricsError::InvalidInput(format!(
            "stratified folds need n_splits >= 2, got {n_splits}"
        )));
    }
    if n_splits > n {
        return Err(MetricsError::InvalidInput(format!(
            "cannot split {n} rows into {n_splits} folds"
        )));
    }
    let n_folds = u32::try_from(n_splits)
        .map_err(|_| MetricsError::InvalidInput(format!("too many folds: {n_splits}")))?;

    // Classes in order of first appearance, and each row's position in that order.
    let mut order_of_code: Vec<Option<usize>> = Vec::new();
    let mut counts: Vec<usize> = Vec::new();
    let mut encoded = Vec::with_capacity(n);
    for &code in classes {
        let code = code as usize;
        if code >= order_of_code.len() {
            order_of_code.resize(code + 1, None);
        }
        let position = *order_of_code[code].get_or_insert_with(|| {
            counts.push(0);
            counts.len() - 1
        });
        counts[position] += 1;
        encoded.push(position);
    }
    if counts.iter().all(|&c| c < n_splits) {
        return Err(MetricsError::InvalidInput(format!(
            "n_splits = {n_splits} is larger than the number of rows of every class"
        )));
    }

    // Round-robin allocation over the class-sorted rows: class k occupies positions
    // start_k .. start_k + count_k, and position p goes to fold p mod n_splits.
    let mut start = 0;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut folds_of_class: Vec<Vec<u32>> = Vec::with_capacity(counts.len());
    for &count in &counts {
        let mut labels: Vec<u32> = Vec::with_capacity(count);
        for fold in 0..n_folds {
            let fold_index = fold as usize;
            let first = start + (fold_index + n_splits - start % n_splits) % n_splits;
            let end = start + count;
            let members = if first < end {
                (end - first).div_ceil(n_splits)
            } else {
                0
            };
            labels.extend(std::iter::repeat_n(fold, members));
        }
        for i in (1..labels.len()).rev() {
            let j = rng.random_range(0..=i);
            labels.swap(i, j);
        }
        folds_of_class.push(labels);
        start += count;
    }
    let mut next = vec![0usize; counts.len()];
    Ok(encoded
        .iter()
        .map(|&k| {
            let fold = folds_of_class[k][next[k]];
            next[k] += 1;
            fold
        })
        .collect())
}

/// Macro-averaged F1 score with scikit-learn's semantics (`f1_score(average="macro")`).
///
/// The classes averaged over are those present in `truth` or in `predicted`; per class
/// `F1 = 2 TP / (2 TP + FP + FN)`, which is never `0 / 0` for such a class, so scikit-learn's
/// `zero_division` never applies. Returns NaN for empty inputs (scikit-learn raises).
///
/// # Panics
/// If the slices differ in length or a label is `>= n_classes`.
pub fn macro_f1(truth: &[u32], predicted: &[u32], n_classes: usize) -> f64 {
    assert_eq!(
        truth.len(),
        predicted.len(),
        "macro_f1: truth and predictions differ in length"
    );
    let mut true_positives = vec![0usize; n_classes];
    let mut true_counts = vec![0usize; n_classes];
    let mut predicted_counts = vec![0usize; n_classes];
    for (&t, &p) in truth.iter().zip(predicted) {
        let (t, p) = (t as usize, p as usize);
        assert!(
            t < n_classes && p < n_classes,
            "macro_f1: label {} out of range 0..{n_classes}",
            t.max(p)
        );
        true_counts[t] += 1;
        predicted_counts[p] += 1;
        if t == p {
            true_positives[t] += 1;
        }
    }
    let mut sum = 0.0;
    let mut present = 0usize;
    for ((&tp, &true_count), &predicted_count) in true_positives
        .iter()
        .zip(&true_counts)
        .zip(&predicted_counts)
    {
        let denominator = true_count + predicted_count;
        if denominator > 0 {
            sum += (2 * tp) as f64 / denominator as f64;
            present += 1;
        }
    }
    if present == 0 {
        f64::NAN
    } else {
        sum / present as f64
    }
}

/// The batch classifier metric: out-of-fold logistic-regression predictions of `classes` from
/// the rows of `x` (`n x d`, row-major), with the given fold of every row.
///
/// For each fold id present in `folds` (ascending), the model is fitted on the other folds'
/// rows (classes present there, the multinomial loss for more than two, binomial for two) and
/// predicts that fold's rows; ties between classes go to the smaller class code, like
/// scikit-learn's `argmax` over its sorted labels. `score` is `1 - macro F1` of the pooled
/// predictions, `mean_over_folds` is `1 - mean` of each fold's macro F1 (both [`macro_f1`]).
/// Each fold's solver starts from the previous fold's solution (same optimum, fewer
/// iterations).
///
/// Errors: shape mismatches, a class code `>= n_classes`, non-finite values, fewer than two
/// folds, a training set with a single class, or a solver failure.
pub fn batch_classifier(
    x: &[f64],
    d: usize,
    classes: &[u32],
    n_classes: usize,
    folds: &[u32],
) -> Result<ClassifierResult> {
    let n = classes.len();
    if d == 0 {
        return Err(MetricsError::InvalidInput(
            "the embedding has no features (d = 0)".into(),
        ));
    }
    if x.len() != n * d {
        return Err(MetricsError::InvalidInput(format!(
            "embedding has {} values, expected {n} rows x {d} features",
            x.len()
        )));
    }
    if folds.len() != n {
        return Err(MetricsError::InvalidInput(format!(
            "{} fold ids for {n} rows",
            folds.len()
        )));
    }
    if let Some(&bad) = classes.iter().find(|&&c| c as usize >= n_classes) {
        return Err(MetricsError::InvalidInput(format!(
            "class code {bad} out of range 0..{n_classes}"
        )));
    }
    ensure_finite(x, d)?;
    let mut fold_ids: Vec<u32> = folds.to_vec();
    fold_ids.sort_unstable();
    fold_ids.dedup();
    if fold_ids.len() < 2 {
        return Err(MetricsError::InvalidInput(format!(
            "cross-validation needs at least 2 folds, got {}",
            fold_ids.len()
        )));
    }

    // Rows grouped by fold (stable), so each training set is two contiguous blocks.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| folds[i]);
    let sorted_classes: Vec<u32> = order.iter().map(|&i| classes[i]).collect();
    let coordinates = Coordinates::new(x, d, &order);

    let mut predicted = vec![0u32; n];
    let mut fold_f1_sum = 0.0;
    let mut previous: Option<Model> = None;
    let mut block_start = 0;
    for &fold in &fold_ids {
        let block_end = block_start + folds.iter().filter(|&&f| f == fold).count();
        let train = [0..block_start, block_end..n];
        let model = Model::fit(
            &coordinates,
            &sorted_classes,
            &train,
            n_classes,
            previous.as_ref(),
        )?;
        let fold_predictions = model.predict(&coordinates, block_start..block_end);
        let fold_truth = &sorted_classes[block_start..block_end];
        fold_f1_sum += macro_f1(fold_truth, &fold_predictions, n_classes);
        for (&i, &p) in order[block_start..block_end].iter().zip(&fold_predictions) {
            predicted[i] = p;
        }
        previous = Some(model);
        block_start = block_end;
    }
    let score = 1.0 - macro_f1(classes, &predicted, n_classes);
    let mean_over_folds = 1.0 - fold_f1_sum / fold_ids.len() as f64;
    Ok(ClassifierResult {
        predicted,
        score,
        mean_over_folds,
    })
}

/// The solver's coordinates: an invertible affine change of variables of the features, shared
/// by all folds. It conditions the problem and leaves the optimum unchanged, because the
/// penalty is carried over and the (unpenalised) intercept absorbs the shift.
///
/// Rows are standardised (`s = (x - mean) / scale`, all rows) and then whitened, `z = s T` with
/// `T = L^-T` and `L Lᵀ = corr + δ λ diag(1 / scale²)`, an approximation of the Hessian of the
/// objective in standardised coordinates (`corr` the correlation matrix, `λ = 1 / (C n)`,
/// `δ` = [`WHITENING_CURVATURE`]⁻¹). Coefficients `V` on `z` are `W = diag(1/scale) T V` on `x`.
/// If the Cholesky factorisation fails numerically, `T` is the identity (standardising only).
struct Coordinates {
    /// Feature count.
    d: usize,
    /// Rows in fold order, transformed, row-major `n x d`.
    rows: Vec<f64>,
    /// `1 / scale²` per feature.
    inverse_variance: Vec<f64>,
    /// `T`, row-major `d x d` (upper triangular).
    transform: Vec<f64>,
}

/// Curvature assumed for the loss when building the whitening transform.
const WHITENING_CURVATURE: f64 = 1.0 / 16.0;
/// Rows per task of the correlation sums.
const CORRELATION_ROWS: usize = 16 * TILE_ROWS;

impl Coordinates {
    /// Transforms the rows `order` of `x` (all rows, in that order).
    fn new(x: &[f64], d: usize, order: &[usize]) -> Self {
        let n = order.len();
        let (means, scales) = column_moments(x, d, order);
        let mut rows = vec![0.0; n * d];
        rows.par_chunks_mut(TILE_ROWS * d)
            .zip(order.par_chunks(TILE_ROWS))
            .for_each(|(out, tile)| {
                for (row, &i) in out.chunks_exact_mut(d).zip(tile) {
                    for (((o, &v), &m), &s) in
                        row.iter_mut().zip(&x[i * d..]).zip(&means).zip(&scales)
                    {
                        *o = (v - m) / s;
                    }
                }
            });
        let inverse_variance: Vec<f64> = scales.iter().map(|s| 1.0 / (s * s)).collect();
        let mut hessian = correlation(&rows, d);
        let strength = 1.0 / (INVERSE_REGULARISATION * n as f64);
        for (j, &inverse) in inverse_variance.iter().enumerate() {
            hessian[j * d + j] += strength * inverse / WHITENING_CURVATURE;
        }
        let transform = match cholesky(&mut hessian, d) {
            Some(()) => inverse_transpose_lower(&hessian, d),
            None => identity(d),
        };
        let transform_ref = MatRef::from_row_major_slice(&transform, d, d);
        rows.par_chunks_mut(TILE_ROWS * d).for_each(|tile| {
            let count = tile.len() / d;
            let standardised = tile.to_vec();
            matmul(
                MatMut::from_row_major_slice_mut(tile, count, d),
                Accum::Replace,
                MatRef::from_row_major_slice(&standardised, count, d),
                transform_ref,
                1.0,
                Par::Seq,
            );
            crate::simd::clear_upper_simd_state();
        });
        Self {
            d,
            rows,
            inverse_variance,
            transform,
        }
    }
}

/// Means and standard deviations (population) of the features over `rows`; constant features
/// get scale 1.
fn column_moments(x: &[f64], d: usize, rows: &[usize]) -> (Vec<f64>, Vec<f64>) {
    let count = rows.len() as f64;
    let mut means = vec![0.0; d];
    for &i in rows {
        for (m, &v) in means.iter_mut().zip(&x[i * d..(i + 1) * d]) {
            *m += v;
        }
    }
    means.iter_mut().for_each(|m| *m /= count);
    let mut variances = vec![0.0; d];
    for &i in rows {
        for ((s, &v), &m) in variances.iter_mut().zip(&x[i * d..(i + 1) * d]).zip(&means) {
            *s += (v - m) * (v - m);
        }
    }
    let scales = variances
        .into_iter()
        .map(|s| {
            let sd = (s / count).sqrt();
            if sd > 0.0 { sd } else { 1.0 }
        })
        .collect();
    (means, scales)
}

/// `rowsᵀ rows / n` of row-major `n x d` rows, summed over fixed chunks in order.
fn correlation(rows: &[f64], d: usize) -> Vec<f64> {
    let n = rows.len() / d;
    let partials: Vec<Vec<f64>> = rows
        .par_chunks(CORRELATION_ROWS * d)
        .map(|chunk| {
            let count = chunk.len() / d;
            let block = MatRef::from_row_major_slice(chunk, count, d);
            let mut product = vec![0.0; d * d];
            matmul(
                MatMut::from_row_major_slice_mut(&mut product, d, d),
                Accum::Replace,
                block.transpose(),
                block,
                1.0,
                Par::Seq,
            );
            crate::simd::clear_upper_simd_state();
            product
        })
        .collect();
    let mut total = vec![0.0; d * d];
    for partial in &partials {
        total.iter_mut().zip(partial).for_each(|(t, p)| *t += p);
    }
    let inverse_n = 1.0 / n as f64;
    total.iter_mut().for_each(|t| *t *= inverse_n);
    total
}

/// In-place lower Cholesky factor of a symmetric row-major `d x d` matrix (upper part zeroed);
/// `None` if a pivot is not positive.
fn cholesky(a: &mut [f64], d: usize) -> Option<()> {
    for j in 0..d {
        let pivot = a[j * d + j] - dot(&a[j * d..j * d + j], &a[j * d..j * d + j]);
        if !(pivot > 0.0 && pivot.is_finite()) {
            return None;
        }
        let root = pivot.sqrt();
        a[j * d + j] = root;
        for i in j + 1..d {
            let (upper, lower) = a.split_at_mut(i * d);
            let value = lower[j] - dot(&upper[j * d..j * d + j], &lower[..j]);
            lower[j] = value / root;
        }
        for i in 0..j {
            a[i * d + j] = 0.0;
        }
    }
    Some(())
}

/// `L^-T` (row-major, upper triangular) of a row-major lower-triangular `L`.
fn inverse_transpose_lower(lower: &[f64], d: usize) -> Vec<f64> {
    // Column c of L^-1 by forward substitution; it is row c of L^-T.
    let mut result = vec![0.0; d * d];
    for c in 0..d {
        let row = &mut result[c * d..(c + 1) * d];
        for i in c..d {
            let mut value = if i == c { 1.0 } else { 0.0 };
            for k in c..i {
                value -= lower[i * d + k] * row[k];
            }
            row[i] = value / lower[i * d + i];
        }
    }
    result
}

fn identity(d: usize) -> Vec<f64> {
    let mut result = vec![0.0; d * d];
    for j in 0..d {
        result[j * d + j] = 1.0;
    }
    result
}

/// A fitted model in [`Coordinates`]: coefficients `V` (`d x m`, column-major) then
/// intercepts `c` (`m`), `m` = [`output_count`] of its classes.
struct Model {
    /// Class codes present in the training rows, ascending.
    labels: Vec<u32>,
    /// Coefficients then intercepts.
    params: Vec<f64>,
}

impl Model {
    /// Fits on the blocks `train` of the coordinates' rows (`classes` in the same row order),
    /// starting the solver from `warm` (another fold's model) where its classes match, else zero.
    fn fit(
        coordinates: &Coordinates,
        classes: &[u32],
        train: &[std::ops::Range<usize>],
        n_classes: usize,
        warm: Option<&Self>,
    ) -> Result<Self> {
        let mut present = vec![false; n_classes];
        for range in train {
            for &c in &classes[range.clone()] {
                present[c as usize] = true;
            }
        }
        let labels: Vec<u32> = (0..n_classes)
            .filter(|&k| present[k])
            .map(|k| k as u32)
            .collect();
        if labels.len() < 2 {
            return Err(MetricsError::InvalidInput(format!(
                "a training fold holds {} class(es); logistic regression needs at least 2",
                labels.len()
            )));
        }
        let objective = Objective::new(coordinates, classes, train, &labels, n_classes);
        let start = match warm {
            Some(other) => other.transfer(&labels, coordinates.d),
            None => vec![0.0; objective.n_params()],
        };
        let params = minimize_lbfgs(&objective, start)?;
        Ok(Self { labels, params })
    }

    /// This model's parameters for another class set: the columns of shared classes, zero
    /// elsewhere (all zero when either model is binomial and the class sets differ).
    fn transfer(&self, labels: &[u32], d: usize) -> Vec<f64> {
        let outputs = output_count(labels.len());
        let own_outputs = output_count(self.labels.len());
        let mut params = vec![0.0; (d + 1) * outputs];
        let binomial = outputs == 1 || own_outputs == 1;
        if binomial && labels != self.labels {
            return params;
        }
        for (k, label) in labels.iter().enumerate().take(outputs) {
            let own = if binomial {
                0
            } else {
                match self.labels.binary_search(label) {
                    Ok(own) => own,
                    Err(_) => continue,
                }
            };
            params[k * d..(k + 1) * d].copy_from_slice(&self.params[own * d..(own + 1) * d]);
            params[d * outputs + k] = self.params[d * own_outputs + own];
        }
        params
    }

    /// Predicted class codes of the coordinates' rows `rows`.
    fn predict(&self, coordinates: &Coordinates, rows: std::ops::Range<usize>) -> Vec<u32> {
        let d = coordinates.d;
        let outputs = output_count(self.labels.len());
        let (coefficients, intercepts) = self.params.split_at(d * outputs);
        let weights = MatRef::from_column_major_slice(coefficients, d, outputs);
        let block = &coordinates.rows[rows.start * d..rows.end * d];
        let tiles: Vec<Vec<u32>> = block
            .par_chunks(TILE_ROWS * d)
            .map(|tile| {
                let count = tile.len() / d;
                let mut logits = vec![0.0; count * outputs];
                matmul(
                    MatMut::from_row_major_slice_mut(&mut logits, count, outputs),
                    Accum::Replace,
                    MatRef::from_row_major_slice(tile, count, d),
                    weights,
                    1.0,
                    Par::Seq,
                );
                crate::simd::clear_upper_simd_state();
                logits
                    .chunks_exact(outputs)
                    .map(|z| {
                        let best = if outputs == 1 {
                            usize::from(z[0] + intercepts[0] > 0.0)
                        } else {
                            let mut best = 0;
                            let mut best_value = f64::NEG_INFINITY;
                            for (k, (&zk, &bk)) in z.iter().zip(intercepts).enumerate() {
                                if zk + bk > best_value {
                                    best = k;
                                    best_value = zk + bk;
                                }
                            }
                            best
                        };
                        self.labels[best]
                    })
                    .collect()
            })
            .collect();
        tiles.concat()
    }
}

/// Number of linear outputs: one for the binomial model, one per class otherwise.
fn output_count(n_labels: usize) -> usize {
    if n_labels == 2 { 1 } else { n_labels }
}

/// scikit-learn's logistic-regression objective over the training rows, in [`Coordinates`].
///
/// `f = mean_i loss_i(z_i V + c) + λ/2 Σ_jk W_jk²` with `W = diag(1/scale) T V` the
/// coefficients on the original features and `λ = 1 / (C n_train)`; `loss_i` is the softmax
/// cross-entropy for `m > 1` outputs, the binomial log-loss (larger class positive) for `m = 1`.
struct Objective<'a> {
    coordinates: &'a Coordinates,
    /// Class code of every row (coordinates' row order).
    classes: &'a [u32],
    /// Output index of every class code (meaningful for the training classes).
    output_of_class: Vec<u32>,
    /// Row ranges of the tiles, in order.
    tiles: Vec<std::ops::Range<usize>>,
    /// Training row count.
    n: usize,
    /// Outputs `m`.
    outputs: usize,
    /// `λ`.
    strength: f64,
}

/// Loss and gradient sums of one tile.
struct TileSums {
    loss: f64,
    coefficients: Vec<f64>,
    intercepts: Vec<f64>,
}

impl<'a> Objective<'a> {
    fn new(
        coordinates: &'a Coordinates,
        classes: &'a [u32],
        train: &[std::ops::Range<usize>],
        labels: &[u32],
        n_classes: usize,
    ) -> Self {
        let mut output_of_class = vec![0u32; n_classes];
        for (i, &k) in labels.iter().enumerate() {
            output_of_class[k as usize] = i as u32;
        }
        let tiles: Vec<std::ops::Range<usize>> = train
            .iter()
            .flat_map(|range| {
                (range.start..range.end)
                    .step_by(TILE_ROWS)
                    .map(move |s| s..(s + TILE_ROWS).min(range.end))
            })
            .collect();
        let n: usize = train.iter().map(|r| r.len()).sum();
        Self {
            coordinates,
            classes,
            output_of_class,
            tiles,
            n,
            outputs: output_count(labels.len()),
            strength: 1.0 / (INVERSE_REGULARISATION * n as f64),
        }
    }

    /// Number of parameters: `d x m` coefficients then `m` intercepts.
    fn n_params(&self) -> usize {
        (self.coordinates.d + 1) * self.outputs
    }

    /// The objective at `params`; its gradient is written to `gradient`.
    fn value_gradient(&self, params: &[f64], gradient: &mut [f64]) -> f64 {
        let (d, m) = (self.coordinates.d, self.outputs);
        let (coefficients, intercepts) = params.split_at(d * m);
        let weights = MatRef::from_column_major_slice(coefficients, d, m);
        let sums: Vec<TileSums> = self
            .tiles
            .par_iter()
            .map(|tile| self.tile_sums(tile.clone(), weights, intercepts))
            .collect();
        let mut loss = 0.0;
        gradient.fill(0.0);
        let (coefficient_gradient, intercept_gradient) = gradient.split_at_mut(d * m);
        for tile in &sums {
            loss += tile.loss;
            coefficient_gradient
                .iter_mut()
                .zip(&tile.coefficients)
                .for_each(|(g, t)| *g += t);
            intercept_gradient
                .iter_mut()
                .zip(&tile.intercepts)
                .for_each(|(g, t)| *g += t);
        }
        let inverse_n = 1.0 / self.n as f64;
        loss *= inverse_n;
        gradient.iter_mut().for_each(|g| *g *= inverse_n);

        // Penalty λ/2 Σ (T V)_jk² / scale_j², gradient Tᵀ (λ (T V) / scale²).
        let transform = MatRef::from_row_major_slice(&self.coordinates.transform, d, d);
        let mut standardised = vec![0.0; d * m];
        matmul(
            MatMut::from_column_major_slice_mut(&mut standardised, d, m),
            Accum::Replace,
            transform,
            weights,
            1.0,
            Par::Seq,
        );
        crate::simd::clear_upper_simd_state();
        let mut penalty = 0.0;
        for column in standardised.chunks_exact_mut(d) {
            for (w, &inverse_variance) in column.iter_mut().zip(&self.coordinates.inverse_variance)
            {
                let scaled = self.strength * inverse_variance * *w;
                penalty += scaled * *w;
                *w = scaled;
            }
        }
        matmul(
            MatMut::from_column_major_slice_mut(&mut gradient[..d * m], d, m),
            Accum::Add,
            transform.transpose(),
            MatRef::from_column_major_slice(&standardised, d, m),
            1.0,
            Par::Seq,
        );
        crate::simd::clear_upper_simd_state();
        loss + 0.5 * penalty
    }

    /// Unscaled loss sum and gradient sums over one tile of rows.
    fn tile_sums(
        &self,
        tile: std::ops::Range<usize>,
        weights: MatRef<'_, f64>,
        intercepts: &[f64],
    ) -> TileSums {
        let (d, m) = (self.coordinates.d, self.outputs);
        let count = tile.len();
        let lhs = MatRef::from_row_major_slice(
            &self.coordinates.rows[tile.start * d..tile.end * d],
            count,
            d,
        );
        let mut logits = vec![0.0; count * m];
        matmul(
            MatMut::from_row_major_slice_mut(&mut logits, count, m),
            Accum::Replace,
            lhs,
            weights,
            1.0,
            Par::Seq,
        );
        crate::simd::clear_upper_simd_state();
        let mut loss = 0.0;
        let mut intercept_sums = vec![0.0; m];
        // Each row of `logits` becomes the derivative of its loss with respect to the logits.
        for (z, &class) in logits.chunks_exact_mut(m).zip(&self.classes[tile]) {
            let target = self.output_of_class[class as usize] as usize;
            if m == 1 {
                let t = z[0] + intercepts[0];
                let y = if target == 1 { 1.0 } else { 0.0 };
                // log(1 + e^t) - y t, and its derivative sigmoid(t) - y, without overflow.
                loss += t.max(0.0) + (-t.abs()).exp().ln_1p() - y * t;
                z[0] = if t >= 0.0 {
                    1.0 / (1.0 + (-t).exp())
                } else {
                    let e = t.exp();
                    e / (1.0 + e)
                } - y;
            } else {
                let mut top = f64::NEG_INFINITY;
                for (zk, &bk) in z.iter_mut().zip(intercepts) {
                    *zk += bk;
                    top = top.max(*zk);
                }
                let target_logit = z[target];
                let mut total = 0.0;
                for zk in z.iter_mut() {
                    *zk = (*zk - top).exp();
                    total += *zk;
                }
                loss += top + total.ln() - target_logit;
                let inverse_total = 1.0 / total;
                z.iter_mut().for_each(|zk| *zk *= inverse_total);
                z[target] -= 1.0;
            }
            intercept_sums
                .iter_mut()
                .zip(z.iter())
                .for_each(|(s, &g)| *s += g);
        }
        // Coefficient gradient (d x m, column-major) written as its transpose, G^T Z (m x d,
        // row-major): the same memory, and the faster product shape.
        let mut coefficient_sums = vec![0.0; d * m];
        matmul(
            MatMut::from_row_major_slice_mut(&mut coefficient_sums, m, d),
            Accum::Replace,
            MatRef::from_row_major_slice(&logits, count, m).transpose(),
            lhs,
            1.0,
            Par::Seq,
        );
        crate::simd::clear_upper_simd_state();
        TileSums {
            loss,
            coefficients: coefficient_sums,
            intercepts: intercept_sums,
        }
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn max_abs(a: &[f64]) -> f64 {
    a.iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// One L-BFGS correction pair.
struct Correction {
    step: Vec<f64>,
    gradient_change: Vec<f64>,
    inverse_curvature: f64,
}

/// L-BFGS from `start` until the gradient max-norm is at most [`GRADIENT_TOLERANCE`].
fn minimize_lbfgs(objective: &Objective<'_>, start: Vec<f64>) -> Result<Vec<f64>> {
    let p = start.len();
    let mut point = start;
    let mut gradient = vec![0.0; p];
    let mut value = objective.value_gradient(&point, &mut gradient);
    let mut history: std::collections::VecDeque<Correction> =
        std::collections::VecDeque::with_capacity(HISTORY);
    let mut direction = vec![0.0; p];
    let mut alphas = [0.0; HISTORY];
    for _ in 0..MAX_ITERATIONS {
        if max_abs(&gradient) <= GRADIENT_TOLERANCE {
            return Ok(point);
        }
        // Two-loop recursion: direction = -H gradient.
        direction.copy_from_slice(&gradient);
        for (alpha, c) in alphas.iter_mut().zip(history.iter().rev()) {
            *alpha = c.inverse_curvature * dot(&c.step, &direction);
            direction
                .iter_mut()
                .zip(&c.gradient_change)
                .for_each(|(q, y)| *q -= *alpha * y);
        }
        if let Some(last) = history.back() {
            let gamma =
                1.0 / (last.inverse_curvature * dot(&last.gradient_change, &last.gradient_change));
            direction.iter_mut().for_each(|q| *q *= gamma);
        }
        for (alpha, c) in alphas.iter().take(history.len()).rev().zip(history.iter()) {
            let beta = c.inverse_curvature * dot(&c.gradient_change, &direction);
            direction
                .iter_mut()
                .zip(&c.step)
                .for_each(|(r, s)| *r += (alpha - beta) * s);
        }
        direction.iter_mut().for_each(|q| *q = -*q);
        let mut slope = dot(&direction, &gradient);
        if slope >= 0.0 || slope.is_nan() {
            history.clear();
            direction
                .iter_mut()
                .zip(&gradient)
                .for_each(|(q, g)| *q = -g);
            slope = dot(&direction, &gradient);
        }
        let initial_step = if history.is_empty() {
            1.0 / dot(&direction, &direction).sqrt()
        } else {
            1.0
        };
        let found = line_search(objective, &point, value, slope, &direction, initial_step)
            .ok_or_else(|| {
                MetricsError::Numeric(format!(
                    "logistic regression: line search failed (gradient max-norm {:.3e})",
                    max_abs(&gradient)
                ))
            })?;
        let step: Vec<f64> = found.point.iter().zip(&point).map(|(a, b)| a - b).collect();
        let gradient_change: Vec<f64> = found
            .gradient
            .iter()
            .zip(&gradient)
            .map(|(a, b)| a - b)
            .collect();
        let curvature = dot(&step, &gradient_change);
        if curvature > f64::EPSILON * dot(&gradient_change, &gradient_change) {
            if history.len() == HISTORY {
                history.pop_front();
            }
            history.push_back(Correction {
                step,
                gradient_change,
                inverse_curvature: 1.0 / curvature,
            });
        }
        point = found.point;
        gradient = found.gradient;
        value = found.value;
    }
    Err(MetricsError::Numeric(format!(
        "logistic regression did not converge in {MAX_ITERATIONS} L-BFGS iterations \
         (gradient max-norm {:.3e} > {GRADIENT_TOLERANCE:e})",
        max_abs(&gradient)
    )))
}

/// An accepted line-search point.
struct LinePoint {
    point: Vec<f64>,
    gradient: Vec<f64>,
    value: f64,
}

/// Line search along `direction` (a descent direction with slope `slope < 0`) for a convex
/// objective: accepts a step whose directional derivative `φ'` satisfies the strong Wolfe
/// curvature condition `|φ'| <= CURVATURE |slope|` and which either still descends (`φ' <= 0`,
/// which by convexity implies a decrease) or passes the Armijo test. Steps are bracketed on the
/// sign of `φ'` (a convex function's derivative is increasing) and refined by safeguarded secant
/// steps on `φ'`, so the search does not depend on function differences, which are at rounding
/// level near the optimum.
fn line_search(
    objective: &Objective<'_>,
    point: &[f64],
    value: f64,
    slope: f64,
    direction: &[f64],
    initial_step: f64,
) -> Option<LinePoint> {
    let mut low = (0.0, slope);
    let mut high: Option<(f64, f64)> = None;
    let mut step = initial_step;
    let mut best_descent: Option<LinePoint> = None;
    for _ in 0..MAX_LINE_SEARCH {
        let trial: Vec<f64> = point
            .iter()
            .zip(direction)
            .map(|(x, q)| x + step * q)
            .collect();
        let mut gradient = vec![0.0; trial.len()];
        let trial_value = objective.value_gradient(&trial, &mut gradient);
        let trial_slope = dot(&gradient, direction);
        let flat_enough = trial_slope.abs() <= CURVATURE * slope.abs();
        let armijo = trial_value <= value + ARMIJO * step * slope;
        if flat_enough && (trial_slope <= 0.0 || armijo) {
            return Some(LinePoint {
                point: trial,
                gradient,
                value: trial_value,
            });
        }
        if trial_slope < 0.0 {
            low = (step, trial_slope);
            best_descent = Some(LinePoint {
                point: trial,
                gradient,
                value: trial_value,
            });
        } else {
            high = Some((step, trial_slope));
        }
        step = match high {
            None => 4.0 * step,
            Some((high_step, high_slope)) => {
                let (low_step, low_slope) = low;
                let width = high_step - low_step;
                if width <= f64::EPSILON * high_step {
                    break;
                }
                let secant = low_step - low_slope * width / (high_slope - low_slope);
                secant.clamp(low_step + 0.1 * width, high_step - 0.1 * width)
            }
        };
    }
    best_descent
}

#[cfg(test)]
// Training sets are given as lists of row ranges; tests often use a single range.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random data: `n x d` rows of classes `i % k`, with correlated
    /// features of different scales; class `c` shifted by `shift` in feature `c % d`.
    fn toy(n: usize, d: usize, k: usize, shift: f64, seed: u64) -> (Vec<f64>, Vec<u32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let classes: Vec<u32> = (0..n).map(|i| (i % k) as u32).collect();
        let mut x = Vec::with_capacity(n * d);
        for &class in &classes {
            let common: f64 = rng.random_range(-1.0..1.0);
            for j in 0..d {
                let centre = if j == class as usize % d { shift } else { 0.0 };
                let noise: f64 = rng.random_range(-1.0..1.0);
                x.push((centre + noise + 0.8 * common) * (1.0 + j as f64) + 3.0 * j as f64);
            }
        }
        (x, classes)
    }

    /// Coordinates of all rows in order, one training block, every class.
    fn setup(x: &[f64], d: usize) -> Coordinates {
        let order: Vec<usize> = (0..x.len() / d).collect();
        Coordinates::new(x, d, &order)
    }

    /// `V, c` in coordinates -> `W` (`d x m`, column-major) and `b` on the original features.
    fn original_parameters(
        x: &[f64],
        d: usize,
        coordinates: &Coordinates,
        params: &[f64],
    ) -> (Vec<f64>, Vec<f64>) {
        let order: Vec<usize> = (0..x.len() / d).collect();
        let (means, scales) = column_moments(x, d, &order);
        let m = params.len() / (d + 1);
        let mut w = vec![0.0; d * m];
        for k in 0..m {
            for j in 0..d {
                let standardised: f64 = (0..d)
                    .map(|l| coordinates.transform[j * d + l] * params[k * d + l])
                    .sum();
                w[k * d + j] = standardised / scales[j];
            }
        }
        let b = (0..m)
            .map(|k| params[d * m + k] - (0..d).map(|j| w[k * d + j] * means[j]).sum::<f64>())
            .collect();
        (w, b)
    }

    /// scikit-learn's objective `mean loss + ||W||² / (2 n)` and its gradient, directly on `x`.
    fn direct_objective(
        x: &[f64],
        d: usize,
        classes: &[u32],
        w: &[f64],
        b: &[f64],
    ) -> (f64, Vec<f64>, Vec<f64>) {
        let n = classes.len();
        let m = b.len();
        let (mut loss, mut gw, mut gb) = (0.0, vec![0.0; d * m], vec![0.0; m]);
        for i in 0..n {
            let z: Vec<f64> = (0..m)
                .map(|k| b[k] + (0..d).map(|j| x[i * d + j] * w[k * d + j]).sum::<f64>())
                .collect();
            let residual: Vec<f64> = if m == 1 {
                let y = f64::from(classes[i]);
                loss += (1.0 + z[0].exp()).ln() - y * z[0];
                vec![1.0 / (1.0 + (-z[0]).exp()) - y]
            } else {
                let total: f64 = z.iter().map(|v| v.exp()).sum();
                loss += total.ln() - z[classes[i] as usize];
                (0..m)
                    .map(|k| z[k].exp() / total - f64::from(u8::from(classes[i] as usize == k)))
                    .collect()
            };
            for k in 0..m {
                gb[k] += residual[k] / n as f64;
                for j in 0..d {
                    gw[k * d + j] += residual[k] * x[i * d + j] / n as f64;
                }
            }
        }
        let penalty: f64 = w.iter().map(|v| v * v).sum::<f64>() / (2.0 * n as f64);
        for (g, v) in gw.iter_mut().zip(w) {
            *g += v / n as f64;
        }
        (loss / n as f64 + penalty, gw, gb)
    }

    fn random_params(count: usize, seed: u64) -> Vec<f64> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..count).map(|_| rng.random_range(-0.5..0.5)).collect()
    }

    fn check_gradient(k: usize) {
        let (n, d) = (2000, 4);
        let (x, classes) = toy(n, d, k, 1.5, 3);
        let coordinates = setup(&x, d);
        let labels: Vec<u32> = (0..k as u32).collect();
        let objective = Objective::new(&coordinates, &classes, &[0..n], &labels, k);
        let params = random_params(objective.n_params(), 9);
        let mut gradient = vec![0.0; params.len()];
        objective.value_gradient(&params, &mut gradient);
        let mut scratch = vec![0.0; params.len()];
        for i in 0..params.len() {
            let h = 1e-6;
            let mut plus = params.clone();
            plus[i] += h;
            let mut minus = params.clone();
            minus[i] -= h;
            let numeric = (objective.value_gradient(&plus, &mut scratch)
                - objective.value_gradient(&minus, &mut scratch))
                / (2.0 * h);
            assert!(
                (numeric - gradient[i]).abs() < 1e-7,
                "k = {k}, parameter {i}: analytic {} vs numeric {numeric}",
                gradient[i]
            );
        }
    }

    #[test]
    fn gradient_matches_finite_differences_multinomial() {
        check_gradient(4);
    }

    #[test]
    fn gradient_matches_finite_differences_binomial() {
        check_gradient(2);
    }

    #[test]
    fn objective_is_sklearns_in_original_coordinates() {
        for k in [2, 3] {
            let (n, d) = (300, 5);
            let (x, classes) = toy(n, d, k, 1.0, 4);
            let coordinates = setup(&x, d);
            let labels: Vec<u32> = (0..k as u32).collect();
            let objective = Objective::new(&coordinates, &classes, &[0..n], &labels, k);
            let params = random_params(objective.n_params(), 2);
            let mut gradient = vec![0.0; params.len()];
            let value = objective.value_gradient(&params, &mut gradient);
            let (w, b) = original_parameters(&x, d, &coordinates, &params);
            let (expected, _, _) = direct_objective(&x, d, &classes, &w, &b);
            assert!(
                (value - expected).abs() < 1e-12 * expected.abs(),
                "{value} vs {expected}"
            );
        }
    }

    #[test]
    fn fit_reaches_a_stationary_point_of_the_original_objective() {
        // scikit-learn's gradient at the solution, in the original coordinates, relative to
        // its value at the (zero) starting point.
        for k in [2, 3] {
            let (n, d) = (400, 3);
            let (x, classes) = toy(n, d, k, 1.0, 5);
            let coordinates = setup(&x, d);
            let model = Model::fit(&coordinates, &classes, &[0..n], k, None).unwrap();
            let (w, b) = original_parameters(&x, d, &coordinates, &model.params);
            let (_, gw, gb) = direct_objective(&x, d, &classes, &w, &b);
            let m = b.len();
            let (_, gw0, gb0) = direct_objective(&x, d, &classes, &vec![0.0; d * m], &vec![0.0; m]);
            let initial = max_abs(&gw0).max(max_abs(&gb0));
            assert!(
                max_abs(&gw) < 1e-6 * initial,
                "k = {k}: {gw:?} (initial {initial})"
            );
            assert!(
                max_abs(&gb) < 1e-6 * initial,
                "k = {k}: {gb:?} (initial {initial})"
            );
        }
    }

    #[test]
    fn warm_start_reaches_the_same_predictions() {
        let (n, d, k) = (500, 4, 3);
        let (x, classes) = toy(n, d, k, 0.7, 6);
        let coordinates = setup(&x, d);
        let cold = Model::fit(&coordinates, &classes, &[0..400], k, None).unwrap();
        let other = Model::fit(&coordinates, &classes, &[100..n], k, None).unwrap();
        let warm = Model::fit(&coordinates, &classes, &[0..400], k, Some(&other)).unwrap();
        assert_eq!(
            cold.predict(&coordinates, 400..n),
            warm.predict(&coordinates, 400..n)
        );
        let difference = cold
            .params
            .iter()
            .zip(&warm.params)
            .map(|(a, b)| (a - b).abs());
        assert!(difference.fold(0.0, f64::max) < 1e-5);
    }

    #[test]
    fn separable_data_is_classified_perfectly() {
        let (n, d, k) = (600, 5, 3);
        let (x, classes) = toy(n, d, k, 25.0, 1);
        let folds = stratified_folds(&classes, 5, 7).unwrap();
        let result = batch_classifier(&x, d, &classes, k, &folds).unwrap();
        assert_eq!(result.predicted, classes);
        assert_eq!(result.score, 0.0);
        assert_eq!(result.mean_over_folds, 0.0);
    }

    #[test]
    fn separable_binary_data_is_classified_perfectly() {
        let (n, d) = (300, 3);
        let (x, classes) = toy(n, d, 2, 20.0, 2);
        let folds = stratified_folds(&classes, 3, 1).unwrap();
        let result = batch_classifier(&x, d, &classes, 2, &folds).unwrap();
        assert_eq!(result.predicted, classes);
        assert_eq!(result.score, 0.0);
    }

    #[test]
    fn cholesky_and_inverse_transpose() {
        let mut a = vec![4.0, 2.0, 2.0, 2.0, 5.0, 3.0, 2.0, 3.0, 6.0];
        cholesky(&mut a, 3).unwrap();
        let expected = [2.0, 0.0, 0.0, 1.0, 2.0, 0.0, 1.0, 1.0, 2.0];
        assert!(
            a.iter().zip(&expected).all(|(x, y)| (x - y).abs() < 1e-15),
            "{a:?}"
        );
        let t = inverse_transpose_lower(&a, 3);
        // L^T T = I.
        for i in 0..3 {
            for j in 0..3 {
                let value: f64 = (0..3).map(|l| a[l * 3 + i] * t[l * 3 + j]).sum();
                assert!((value - f64::from(u8::from(i == j))).abs() < 1e-15);
            }
        }
        assert!(cholesky(&mut [1.0, 2.0, 2.0, 1.0], 2).is_none());
    }

    #[test]
    fn macro_f1_matches_hand_computation() {
        // Class 0: TP 2, FP 1, FN 0 -> 4/5. Class 1: TP 1, FP 0, FN 2 -> 2/4.
        // Class 2: only predicted (FP 1) -> 0. Class 3 absent everywhere -> not averaged.
        let truth = [0, 0, 1, 1, 1];
        let predicted = [0, 0, 0, 1, 2];
        let expected = (0.8 + 0.5 + 0.0) / 3.0;
        assert!((macro_f1(&truth, &predicted, 4) - expected).abs() < 1e-15);
        assert_eq!(macro_f1(&truth, &truth, 4), 1.0);
        assert!(macro_f1(&[], &[], 2).is_nan());
    }

    #[test]
    fn stratified_folds_spread_classes_evenly() {
        let classes: Vec<u32> = (0..103u32)
            .map(|i| [2, 0, 2, 1, 2][i as usize % 5])
            .collect();
        let folds = stratified_folds(&classes, 5, 42).unwrap();
        let mut table = [[0usize; 5]; 3];
        for (&c, &f) in classes.iter().zip(&folds) {
            table[c as usize][f as usize] += 1;
        }
        for row in &table {
            let (min, max) = (row.iter().min().unwrap(), row.iter().max().unwrap());
            assert!(max - min <= 1, "{table:?}");
        }
        let sizes: Vec<usize> = (0..5).map(|f| table.iter().map(|r| r[f]).sum()).collect();
        assert!(
            sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
            "{sizes:?}"
        );
    }

    #[test]
    fn stratified_folds_follow_the_round_robin_allocation() {
        // First-appearance order: class 5 (3 rows), then class 1 (4 rows). Dealing the sorted
        // positions over 3 folds: class 5 at positions 0, 1, 2 -> folds {0, 1, 2}; class 1 at
        // positions 3, 4, 5, 6 -> folds {0, 1, 2, 0}.
        let classes = [5, 1, 5, 1, 1, 5, 1];
        let folds = stratified_folds(&classes, 3, 0).unwrap();
        let mut of_5: Vec<u32> = (0..7)
            .filter(|&i| classes[i] == 5)
            .map(|i| folds[i])
            .collect();
        let mut of_1: Vec<u32> = (0..7)
            .filter(|&i| classes[i] == 1)
            .map(|i| folds[i])
            .collect();
        of_5.sort_unstable();
        of_1.sort_unstable();
        assert_eq!(of_5, [0, 1, 2]);
        assert_eq!(of_1, [0, 0, 1, 2]);
    }

    #[test]
    fn stratified_folds_are_seeded() {
        let classes: Vec<u32> = (0..500u32).map(|i| i % 7).collect();
        let a = stratified_folds(&classes, 5, 1).unwrap();
        assert_eq!(a, stratified_folds(&classes, 5, 1).unwrap());
        assert_ne!(a, stratified_folds(&classes, 5, 2).unwrap());
    }

    #[test]
    fn stratified_folds_reject_what_sklearn_rejects() {
        assert!(stratified_folds(&[0, 0, 1, 1], 1, 0).is_err());
        assert!(stratified_folds(&[0, 0, 1, 1], 5, 0).is_err());
        // Every class smaller than n_splits: error; only some: allowed.
        assert!(stratified_folds(&[0, 0, 1, 1, 2, 2], 3, 0).is_err());
        let folds = stratified_folds(&[0, 0, 0, 1, 1], 3, 0).unwrap();
        assert_eq!(folds.len(), 5);
    }

    #[test]
    fn batch_classifier_rejects_bad_input() {
        let x = [0.0, 1.0, 2.0, f64::NAN];
        assert!(matches!(
            batch_classifier(&x, 1, &[0, 1, 0, 1], 2, &[0, 0, 1, 1]),
            Err(MetricsError::NonFinite { count: 1, .. })
        ));
        let x = [0.0, 1.0, 2.0, 3.0];
        assert!(batch_classifier(&x, 1, &[0, 1, 0, 1], 2, &[0, 0, 0, 0]).is_err());
        assert!(batch_classifier(&x, 1, &[0, 1, 0, 2], 2, &[0, 1, 0, 1]).is_err());
        assert!(batch_classifier(&x, 2, &[0, 1, 0, 1], 2, &[0, 1, 0, 1]).is_err());
        // Training fold with a single class.
        assert!(batch_classifier(&x, 1, &[0, 0, 1, 1], 2, &[0, 0, 1, 1]).is_err());
    }
}
