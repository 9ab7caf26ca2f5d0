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
//! predictions are those of the exact optimum. Internally the features are centred and scaled
//! to unit variance as a change of variables (penalty carried over, so the optimum is
//! unchanged); this only conditions the solver.
//!
//! Every sum over rows is taken over fixed tiles of [`TILE_ROWS`] rows and combined in tile order,
//! so results do not depend on the number of threads.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::error::{MetricsError, Result};

/// Inverse regularisation strength, scikit-learn's default `C`.
pub const INVERSE_REGULARISATION: f64 = 1.0;
/// Convergence: largest absolute gradient component of the mean objective, with respect to the
/// standardised coefficients and the intercepts.
pub const GRADIENT_TOLERANCE: f64 = 1e-8;
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
    for k in 0..n_classes {
        let denominator = true_counts[k] + predicted_counts[k];
        if denominator > 0 {
            sum += (2 * true_positives[k]) as f64 / denominator as f64;
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
    check_finite(x, d)?;
    let mut fold_ids: Vec<u32> = folds.to_vec();
    fold_ids.sort_unstable();
    fold_ids.dedup();
    if fold_ids.len() < 2 {
        return Err(MetricsError::InvalidInput(format!(
            "cross-validation needs at least 2 folds, got {}",
            fold_ids.len()
        )));
    }

    let mut predicted = vec![0u32; n];
    let mut fold_f1_sum = 0.0;
    for &fold in &fold_ids {
        let train: Vec<usize> = (0..n).filter(|&i| folds[i] != fold).collect();
        let test: Vec<usize> = (0..n).filter(|&i| folds[i] == fold).collect();
        let train_classes: Vec<u32> = train.iter().map(|&i| classes[i]).collect();
        let model = LogisticRegression::fit(x, d, &train, &train_classes, n_classes)?;
        let fold_predictions = model.predict(x, &test);
        let fold_truth: Vec<u32> = test.iter().map(|&i| classes[i]).collect();
        fold_f1_sum += macro_f1(&fold_truth, &fold_predictions, n_classes);
        for (&i, &p) in test.iter().zip(&fold_predictions) {
            predicted[i] = p;
        }
    }
    let score = 1.0 - macro_f1(classes, &predicted, n_classes);
    let mean_over_folds = 1.0 - fold_f1_sum / fold_ids.len() as f64;
    Ok(ClassifierResult {
        predicted,
        score,
        mean_over_folds,
    })
}

/// Rejects rows with NaN / infinite values.
fn check_finite(x: &[f64], d: usize) -> Result<()> {
    let bad: Vec<usize> = x
        .chunks_exact(d)
        .enumerate()
        .filter(|(_, row)| row.iter().any(|v| !v.is_finite()))
        .map(|(i, _)| i)
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(MetricsError::NonFinite {
            count: bad.len(),
            rows: bad.into_iter().take(10).collect(),
        })
    }
}

/// A fitted L2-regularised logistic regression, in the standardised coordinates it was fitted in.
struct LogisticRegression {
    /// Class codes present in the training rows, ascending.
    labels: Vec<u32>,
    /// Feature count.
    d: usize,
    /// Training means of the features.
    means: Vec<f64>,
    /// Training standard deviations of the features (1 for constant features).
    scales: Vec<f64>,
    /// Coefficients of the standardised features then intercepts (see [`Objective`]).
    params: Vec<f64>,
}

impl LogisticRegression {
    /// Fits on the rows `rows` of `x` with classes `row_classes` (one per listed row).
    fn fit(
        x: &[f64],
        d: usize,
        rows: &[usize],
        row_classes: &[u32],
        n_classes: usize,
    ) -> Result<Self> {
        let mut present = vec![false; n_classes];
        for &c in row_classes {
            present[c as usize] = true;
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
        let mut index_of = vec![0u32; n_classes];
        for (i, &k) in labels.iter().enumerate() {
            index_of[k as usize] = i as u32;
        }
        let targets: Vec<u32> = row_classes.iter().map(|&c| index_of[c as usize]).collect();
        let (means, scales) = column_moments(x, d, rows);
        let standardised = standardise(x, d, rows, &means, &scales);
        let objective = Objective::new(
            &standardised,
            d,
            targets,
            labels.len(),
            &scales,
            INVERSE_REGULARISATION,
        );
        let params = minimize_lbfgs(&objective, vec![0.0; objective.n_params()])?;
        Ok(Self {
            labels,
            d,
            means,
            scales,
            params,
        })
    }

    /// Predicted class codes of the rows `rows` of `x`.
    fn predict(&self, x: &[f64], rows: &[usize]) -> Vec<u32> {
        let d = self.d;
        let outputs = output_count(self.labels.len());
        let (coefficients, intercepts) = self.params.split_at(d * outputs);
        let weights = MatRef::from_column_major_slice(coefficients, d, outputs);
        let tiles: Vec<Vec<u32>> = rows
            .par_chunks(TILE_ROWS)
            .map(|tile_rows| {
                let block = standardise(x, d, tile_rows, &self.means, &self.scales);
                let mut logits = vec![0.0; tile_rows.len() * outputs];
                matmul(
                    MatMut::from_row_major_slice_mut(&mut logits, tile_rows.len(), outputs),
                    Accum::Replace,
                    MatRef::from_row_major_slice(&block, tile_rows.len(), d),
                    weights,
                    1.0,
                    Par::Seq,
                );
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

/// The rows `rows` of `x`, centred and scaled, row-major.
fn standardise(x: &[f64], d: usize, rows: &[usize], means: &[f64], scales: &[f64]) -> Vec<f64> {
    let mut out = Vec::with_capacity(rows.len() * d);
    for &i in rows {
        out.extend(
            x[i * d..(i + 1) * d]
                .iter()
                .zip(means)
                .zip(scales)
                .map(|((&v, &m), &s)| (v - m) / s),
        );
    }
    out
}

/// scikit-learn's logistic-regression objective in standardised coordinates.
///
/// With standardised rows `z_i = (x_i - mean) / scale`, coefficients `V` (`d x m`, column-major,
/// one column per output) and intercepts `c` (`m`): `f = mean_i loss_i(z_i V + c) + λ/2 Σ_jk
/// (V_jk / scale_j)²`, `λ = 1 / (C n)`. In the original coordinates `W_jk = V_jk / scale_j` and
/// `b_k = c_k - Σ_j W_jk mean_j`, so `f` is scikit-learn's objective and the optima coincide.
/// `loss_i` is the softmax cross-entropy for `m > 1` outputs, the binomial log-loss for `m = 1`.
struct Objective<'a> {
    /// Standardised training rows, row-major `n x d`.
    rows: &'a [f64],
    /// Feature count.
    d: usize,
    /// Training row count.
    n: usize,
    /// Class index (into the training labels) of every row.
    targets: Vec<u32>,
    /// Outputs `m`.
    outputs: usize,
    /// Per-feature penalty weight `λ / scale_j²`.
    penalty: Vec<f64>,
}

/// Loss and gradient sums of one tile.
struct TileSums {
    loss: f64,
    coefficients: Vec<f64>,
    intercepts: Vec<f64>,
}

impl<'a> Objective<'a> {
    fn new(
        rows: &'a [f64],
        d: usize,
        targets: Vec<u32>,
        n_labels: usize,
        scales: &[f64],
        inverse_regularisation: f64,
    ) -> Self {
        let n = targets.len();
        let strength = 1.0 / (inverse_regularisation * n as f64);
        Self {
            rows,
            d,
            n,
            targets,
            outputs: output_count(n_labels),
            penalty: scales.iter().map(|s| strength / (s * s)).collect(),
        }
    }

    /// Number of parameters: `d x m` coefficients then `m` intercepts.
    fn n_params(&self) -> usize {
        (self.d + 1) * self.outputs
    }

    /// The objective at `params`; its gradient is written to `gradient`.
    fn value_gradient(&self, params: &[f64], gradient: &mut [f64]) -> f64 {
        let (d, m) = (self.d, self.outputs);
        let (coefficients, intercepts) = params.split_at(d * m);
        let weights = MatRef::from_column_major_slice(coefficients, d, m);
        let sums: Vec<TileSums> = self
            .rows
            .par_chunks(TILE_ROWS * d)
            .zip(self.targets.par_chunks(TILE_ROWS))
            .map(|(block, targets)| self.tile_sums(block, targets, weights, intercepts))
            .collect();
        let mut loss = 0.0;
        gradient.fill(0.0);
        for tile in &sums {
            loss += tile.loss;
            let (gc, gi) = gradient.split_at_mut(d * m);
            gc.iter_mut()
                .zip(&tile.coefficients)
                .for_each(|(g, t)| *g += t);
            gi.iter_mut()
                .zip(&tile.intercepts)
                .for_each(|(g, t)| *g += t);
        }
        let inverse_n = 1.0 / self.n as f64;
        loss *= inverse_n;
        gradient.iter_mut().for_each(|g| *g *= inverse_n);
        let mut penalty = 0.0;
        for k in 0..m {
            for j in 0..d {
                let v = coefficients[k * d + j];
                penalty += self.penalty[j] * v * v;
                gradient[k * d + j] += self.penalty[j] * v;
            }
        }
        loss + 0.5 * penalty
    }

    /// Unscaled loss sum and gradient sums over one tile of rows.
    fn tile_sums(
        &self,
        block: &[f64],
        targets: &[u32],
        weights: MatRef<'_, f64>,
        intercepts: &[f64],
    ) -> TileSums {
        let (d, m) = (self.d, self.outputs);
        let rows = targets.len();
        let lhs = MatRef::from_row_major_slice(block, rows, d);
        let mut logits = vec![0.0; rows * m];
        matmul(
            MatMut::from_row_major_slice_mut(&mut logits, rows, m),
            Accum::Replace,
            lhs,
            weights,
            1.0,
            Par::Seq,
        );
        let mut loss = 0.0;
        let mut intercept_sums = vec![0.0; m];
        // Each row of `logits` becomes the derivative of its loss with respect to the logits.
        for (z, &target) in logits.chunks_exact_mut(m).zip(targets) {
            let target = target as usize;
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
                let mut total = 0.0;
                let target_logit = z[target];
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
        let mut coefficient_sums = vec![0.0; d * m];
        matmul(
            MatMut::from_column_major_slice_mut(&mut coefficient_sums, d, m),
            Accum::Replace,
            lhs.transpose(),
            MatRef::from_row_major_slice(&logits, rows, m),
            1.0,
            Par::Seq,
        );
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
    let mut alphas = vec![0.0; HISTORY];
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
mod tests {
    use super::*;

    /// Deterministic pseudo-random data: `n x d` rows, classes with shifted means.
    fn toy(n: usize, d: usize, k: usize, shift: f64, seed: u64) -> (Vec<f64>, Vec<u32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let classes: Vec<u32> = (0..n).map(|i| (i % k) as u32).collect();
        let x = (0..n * d)
            .map(|idx| {
                let (i, j) = (idx / d, idx % d);
                let centre = if j % k == classes[i] as usize {
                    shift
                } else {
                    0.0
                };
                centre + rng.random_range(-1.0..1.0) * (1.0 + j as f64)
            })
            .collect();
        (x, classes)
    }

    fn objective_for<'a>(
        standardised: &'a [f64],
        d: usize,
        classes: &[u32],
        k: usize,
        scales: &[f64],
    ) -> Objective<'a> {
        Objective::new(standardised, d, classes.to_vec(), k, scales, 1.0)
    }

    fn check_gradient(k: usize) {
        let (n, d) = (2500, 4);
        let (x, classes) = toy(n, d, k, 1.5, 3);
        let rows: Vec<usize> = (0..n).collect();
        let (means, scales) = column_moments(&x, d, &rows);
        let standardised = standardise(&x, d, &rows, &means, &scales);
        let objective = objective_for(&standardised, d, &classes, k, &scales);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let params: Vec<f64> = (0..objective.n_params())
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
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
    fn objective_value_matches_direct_formula() {
        // Two rows, two features, three classes, hand-set parameters in standardised space.
        let standardised = [1.0, -1.0, -1.0, 1.0];
        let scales = [2.0, 0.5];
        let objective = objective_for(&standardised, 2, &[0, 2], 3, &scales);
        // V columns (per class) then intercepts.
        let params = [0.5, 0.0, 0.0, 1.0, -0.5, 0.5, 0.1, 0.2, 0.3];
        let mut gradient = vec![0.0; params.len()];
        let value = objective.value_gradient(&params, &mut gradient);
        let logits = |row: [f64; 2]| -> Vec<f64> {
            (0..3)
                .map(|k| row[0] * params[2 * k] + row[1] * params[2 * k + 1] + params[6 + k])
                .collect()
        };
        let loss = |z: Vec<f64>, t: usize| z.iter().map(|v| v.exp()).sum::<f64>().ln() - z[t];
        let data = loss(logits([1.0, -1.0]), 0) + loss(logits([-1.0, 1.0]), 2);
        let lambda = 1.0 / 2.0;
        let penalty: f64 = (0..3)
            .map(|k| (params[2 * k] / scales[0]).powi(2) + (params[2 * k + 1] / scales[1]).powi(2))
            .sum();
        let expected = data / 2.0 + 0.5 * lambda * penalty;
        assert!((value - expected).abs() < 1e-14, "{value} vs {expected}");
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
    fn fit_reaches_a_stationary_point_of_the_original_objective() {
        // Gradient of scikit-learn's objective in the original coordinates, at the solution.
        let (n, d, k) = (400, 3, 3);
        let (x, classes) = toy(n, d, k, 1.0, 5);
        let rows: Vec<usize> = (0..n).collect();
        let model = LogisticRegression::fit(&x, d, &rows, &classes, k).unwrap();
        let (v, c) = model.params.split_at(d * k);
        let w: Vec<f64> = (0..d * k).map(|i| v[i] / model.scales[i % d]).collect();
        let b: Vec<f64> = (0..k)
            .map(|kk| c[kk] - (0..d).map(|j| w[kk * d + j] * model.means[j]).sum::<f64>())
            .collect();
        let mut gw = vec![0.0; d * k];
        let mut gb = vec![0.0; k];
        for i in 0..n {
            let z: Vec<f64> = (0..k)
                .map(|kk| b[kk] + (0..d).map(|j| x[i * d + j] * w[kk * d + j]).sum::<f64>())
                .collect();
            let total: f64 = z.iter().map(|v| v.exp()).sum();
            for kk in 0..k {
                let r = z[kk].exp() / total - f64::from(u8::from(classes[i] as usize == kk));
                gb[kk] += r / n as f64;
                for j in 0..d {
                    gw[kk * d + j] += r * x[i * d + j] / n as f64;
                }
            }
        }
        for (g, wi) in gw.iter_mut().zip(&w) {
            *g += wi / n as f64;
        }
        assert!(max_abs(&gw) < 1e-7, "{gw:?}");
        assert!(max_abs(&gb) < 1e-7, "{gb:?}");
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
