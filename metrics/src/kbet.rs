//! kBET per label, as scib-metrics 0.5.10 `kbet_per_label` computes it (diffusion-map
//! neighbourhoods + a chi-square test of each neighbourhood's batch composition).
//!
//! Per label (labels visited in code order, as `np.unique` visits them):
//! 1. the UMAP connectivities of the whole kNN (`nn`, the row itself included) are restricted
//!    to the label's rows; labels with fewer than 10 rows or a single batch are skipped (NaN);
//! 2. `k0 = clamp(floor(mean rows per batch / 4), 10, 70)` (and `k0 * rows < 2^31 - 1`);
//! 3. if the subgraph has several connected components, only components of at least `3 k0`
//!    rows are kept, provided they hold at least 75 % of the label's rows; otherwise the label
//!    scores 0 (100 % rejection);
//! 4. diffusion map of the (kept) subgraph: density-normalised symmetric transition matrix,
//!    its `c` eigenpairs of largest magnitude, each eigenvector scaled by `e / (1 - e)` (by 1
//!    for `e = 1`) with `e` the eigenvalue plus `1e-8`, in `f32` as scib-metrics does.
//!    `c = min(100, rows - 1, c of the previous diffused label)`: scib-metrics overwrites its
//!    `diffusion_n_comps` argument inside the label loop, so a small label lowers the number
//!    of components of every later label; this is mirrored;
//! 5. neighbourhood of each row = the row itself + its `k0` nearest rows (Euclidean) in the
//!    diffusion embedding. scib-metrics uses pynndescent (approximate); here the search is
//!    exact. When the (kept) subgraph has fewer than `k0 + 1` rows (only possible with exactly
//!    10 rows), pynndescent leaves the missing slots at index -1, which numpy reads as the
//!    last row: the neighbourhood is every row plus `k0 + 1 - rows` copies of the last row's
//!    batch, mirrored here;
//! 6. chi-square statistic of the neighbourhood's batch counts against the (kept) rows'
//!    batch frequencies times `k0 + 1`, with `batches - 1` degrees of freedom; a row is
//!    accepted when its p-value is at least `alpha`; the label's score is the acceptance
//!    rate ("1 - rejection rate"). The statistic and p-value are compared in `f32`, as JAX
//!    computes them.
//!
//! The overall score is the mean over labels that were not skipped.
//!
//! Eigen-decomposition: subgraphs of up to [`DENSE_EIGEN_MAX_ROWS`] rows use faer's exact dense
//! symmetric eigen-decomposition; larger ones use faer's restarted Lanczos (Krylov-Schur)
//! solver for the largest-magnitude eigenpairs of the sparse matrix (residuals below
//! `1e-10`), like scipy's `eigsh(which="LM")`, in `O(rows * c)` memory. The exact
//! neighbour search costs `O(rows^2 * c)` time per label (`O(rows)` memory per thread), which
//! dominates for labels of tens of thousands of rows.

use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack, StackReq};
use faer::linalg::evd::{ComputeEigenvectors, self_adjoint_evd, self_adjoint_evd_scratch};
use faer::matrix_free::LinOp;
use faer::matrix_free::eigen::{
    PartialEigenParams, partial_self_adjoint_eigen, partial_self_adjoint_eigen_scratch,
};
use faer::{Col, Mat, MatMut, MatRef, Par};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::error::{MetricsError, Result};
use crate::graph::{components_of, umap_connectivities};
use crate::types::{CsrGraph, Neighbors};

/// Largest subgraph (rows) whose diffusion map uses the exact dense eigen-decomposition.
pub const DENSE_EIGEN_MAX_ROWS: usize = 2048;
/// scib-metrics' default `diffusion_n_comps`.
const DIFFUSION_COMPONENTS: usize = 100;
/// Labels with fewer rows are skipped.
const MIN_LABEL_ROWS: usize = 10;
/// scib-metrics' `_EPS`, added to the eigenvalues before scaling.
const EIGENVALUE_EPS: f32 = 1e-8;
/// scib-metrics' bound on `k0 * rows`.
const SIZE_MAX: usize = (1 << 31) - 1;
/// Residual tolerance of the sparse eigen solver.
const LANCZOS_TOLERANCE: f64 = 1e-10;

/// kBET acceptance per label and overall.
#[derive(Debug, Clone, PartialEq)]
pub struct KbetResult {
    /// Per label code `0..=max code`: acceptance rate (NaN for labels skipped: absent, fewer
    /// than 10 rows, or a single batch).
    pub per_label: Vec<f64>,
    /// Mean of `per_label` over the labels that were not skipped (NaN if all were).
    pub score: f64,
}

/// scib-metrics' `kbet_per_label` (see the module documentation for every step).
///
/// `nn`: the kNN of all rows with the row itself first (scanpy's `n_neighbors` columns);
/// `batches`, `labels`: codes per row; `alpha`: significance level (scib-metrics: 0.05).
pub fn kbet_per_label(
    nn: &Neighbors,
    batches: &[u32],
    labels: &[u32],
    alpha: f64,
) -> Result<KbetResult> {
    if batches.len() != nn.n || labels.len() != nn.n {
        return Err(MetricsError::InvalidInput(format!(
            "{} batches and {} labels for {} rows",
            batches.len(),
            labels.len(),
            nn.n
        )));
    }
    if !(alpha > 0.0 && alpha < 1.0) {
        return Err(MetricsError::InvalidInput(format!(
            "alpha must lie in (0, 1), got {alpha}"
        )));
    }
    let graph = umap_connectivities(nn)?;
    let n_labels = labels.iter().max().map_or(0, |&l| l as usize + 1);
    if n_labels > nn.n {
        return Err(MetricsError::InvalidInput(format!(
            "label code {} exceeds the row count {}: codes must be dense",
            n_labels - 1,
            nn.n
        )));
    }
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); n_labels];
    for (i, &label) in labels.iter().enumerate() {
        members[label as usize].push(i);
    }

    // Cheap planning per label, then the component count carried over in label order.
    let mut plans: Vec<Plan> = members
        .par_iter()
        .map(|rows| plan_label(&graph, rows, batches))
        .collect();
    let mut components = DIFFUSION_COMPONENTS;
    for plan in &mut plans {
        if let Plan::Diffuse {
            rows, n_components, ..
        } = plan
        {
            components = components.min(rows.len() - 1);
            *n_components = components;
        }
    }

    let per_label: Vec<f64> = plans
        .par_iter()
        .map(|plan| match plan {
            Plan::Skip => Ok(f64::NAN),
            Plan::Reject => Ok(0.0),
            Plan::Diffuse {
                rows,
                k0,
                n_components,
            } => kbet_on_rows(&graph, rows, batches, *k0, *n_components, alpha),
        })
        .collect::<Result<_>>()?;
    let scored: Vec<f64> = per_label.iter().copied().filter(|v| !v.is_nan()).collect();
    let score = if scored.is_empty() {
        f64::NAN
    } else {
        scored.iter().sum::<f64>() / scored.len() as f64
    };
    Ok(KbetResult { per_label, score })
}

/// What to do with one label.
enum Plan {
    /// NaN: absent, too small, or a single batch.
    Skip,
    /// Score 0: too many rows in small components.
    Reject,
    /// Diffusion map + kBET on these rows (global indices, ascending).
    Diffuse {
        rows: Vec<usize>,
        k0: usize,
        n_components: usize,
    },
}

/// Steps 1-3 of the module documentation for the rows of one label.
fn plan_label(graph: &CsrGraph, rows: &[usize], batches: &[u32]) -> Plan {
    let n_obs = rows.len();
    let mut label_batches: Vec<u32> = rows.iter().map(|&i| batches[i]).collect();
    label_batches.sort_unstable();
    label_batches.dedup();
    let n_batches = label_batches.len();
    if n_obs < MIN_LABEL_ROWS || n_batches == 1 {
        return Plan::Skip;
    }
    let mut k0 = (n_obs / (4 * n_batches)).clamp(10, 70);
    if k0 * n_obs >= SIZE_MAX {
        k0 = SIZE_MAX / n_obs;
    }
    let sub = induced_subgraph(graph, rows);
    let component = components_of(n_obs, |i| &sub.indices[sub.indptr[i]..sub.indptr[i + 1]]);
    let n_components = component.iter().max().map_or(0, |&c| c as usize + 1);
    if n_components == 1 {
        return Plan::Diffuse {
            rows: rows.to_vec(),
            k0,
            n_components: 0,
        };
    }
    let mut size = vec![0usize; n_components];
    for &c in &component {
        size[c as usize] += 1;
    }
    let kept: Vec<usize> = rows
        .iter()
        .zip(&component)
        .filter(|&(_, &c)| size[c as usize] >= 3 * k0)
        .map(|(&i, _)| i)
        .collect();
    if 4 * kept.len() >= 3 * n_obs {
        Plan::Diffuse {
            rows: kept,
            k0,
            n_components: 0,
        }
    } else {
        Plan::Reject
    }
}

/// A square sparse matrix with `f32` values, rows in CSR form with sorted columns.
struct SubGraph {
    indptr: Vec<usize>,
    indices: Vec<u32>,
    values: Vec<f32>,
}

/// The subgraph of `graph` induced by `rows` (ascending), reindexed to `0..rows.len()`;
/// weights back in `f32` (umap's precision; the widening was exact).
fn induced_subgraph(graph: &CsrGraph, rows: &[usize]) -> SubGraph {
    let mut sub = SubGraph {
        indptr: Vec::with_capacity(rows.len() + 1),
        indices: Vec::new(),
        values: Vec::new(),
    };
    sub.indptr.push(0);
    for &i in rows {
        let (cols, weights) = graph.row(i);
        for (&j, &w) in cols.iter().zip(weights) {
            if let Ok(local) = rows.binary_search(&(j as usize)) {
                sub.indices
                    .push(u32::try_from(local).expect("rows fit u32"));
                sub.values.push(w as f32);
            }
        }
        sub.indptr.push(sub.indices.len());
    }
    sub
}

/// Steps 4-6 of the module documentation on the given rows.
fn kbet_on_rows(
    graph: &CsrGraph,
    rows: &[usize],
    batches: &[u32],
    k0: usize,
    n_components: usize,
    alpha: f64,
) -> Result<f64> {
    let sub = induced_subgraph(graph, rows);
    let transitions = symmetric_transitions(&sub);
    let embedding = diffusion_embedding(&transitions, rows.len(), n_components)?;
    let row_batches: Vec<u32> = rows.iter().map(|&i| batches[i]).collect();
    Ok(acceptance_rate(
        &embedding,
        n_components,
        &row_batches,
        k0,
        alpha,
    ))
}

/// scanpy's `_compute_transitions` (density normalisation, then `Z K Z`) in `f32` with
/// scipy's operation order, returned symmetrised (`(T + T^T) / 2`, in `f64`) on the same
/// sparsity pattern.
fn symmetric_transitions(sub: &SubGraph) -> SubGraph64 {
    let m = sub.indptr.len() - 1;
    let row = |i: usize| sub.indptr[i]..sub.indptr[i + 1];
    // Column sums, accumulated over rows in ascending order.
    let mut q = vec![0.0_f32; m];
    for i in 0..m {
        for e in row(i) {
            q[sub.indices[e] as usize] += sub.values[e];
        }
    }
    // A node whose weights underflow (f32 denormals from near-duplicate rows) would get an
    // infinite inverse and turn its entries into NaN; it is left isolated instead.
    let finite_or_zero = |v: f32| if v.is_finite() { v } else { 0.0 };
    let q_inv: Vec<f32> = q.iter().map(|&v| finite_or_zero(1.0 / v)).collect();
    let mut kernel = vec![0.0_f32; sub.values.len()];
    let mut z = vec![0.0_f32; m];
    for i in 0..m {
        for e in row(i) {
            let j = sub.indices[e] as usize;
            kernel[e] = finite_or_zero((q_inv[i] * sub.values[e]) * q_inv[j]);
            z[j] += kernel[e];
        }
    }
    let z_inv: Vec<f32> = z.iter().map(|&v| finite_or_zero(1.0 / v.sqrt())).collect();
    let mut transitions = vec![0.0_f32; sub.values.len()];
    for i in 0..m {
        for e in row(i) {
            let j = sub.indices[e] as usize;
            transitions[e] = (z_inv[i] * kernel[e]) * z_inv[j];
        }
    }
    let mut values = vec![0.0_f64; sub.values.len()];
    for i in 0..m {
        for e in row(i) {
            let j = sub.indices[e] as usize;
            let cols = &sub.indices[row(j)];
            let mirror = cols
                .binary_search(&u32::try_from(i).expect("rows fit u32"))
                .map_or(0.0, |p| transitions[sub.indptr[j] + p]);
            values[e] = (f64::from(transitions[e]) + f64::from(mirror)) / 2.0;
        }
    }
    SubGraph64 {
        n: m,
        indptr: sub.indptr.clone(),
        indices: sub.indices.clone(),
        values,
    }
}

/// A symmetric sparse matrix (CSR, `f64`), usable as a faer linear operator.
#[derive(Debug)]
struct SubGraph64 {
    n: usize,
    indptr: Vec<usize>,
    indices: Vec<u32>,
    values: Vec<f64>,
}

impl LinOp<f64> for SubGraph64 {
    fn apply_scratch(&self, _rhs_ncols: usize, _par: Par) -> StackReq {
        StackReq::EMPTY
    }

    fn nrows(&self) -> usize {
        self.n
    }

    fn ncols(&self) -> usize {
        self.n
    }

    fn apply(&self, out: MatMut<'_, f64>, rhs: MatRef<'_, f64>, _par: Par, _stack: &mut MemStack) {
        let mut out = out;
        for c in 0..rhs.ncols() {
            for i in 0..self.n {
                let range = self.indptr[i]..self.indptr[i + 1];
                out[(i, c)] = self.indices[range.clone()]
                    .iter()
                    .zip(&self.values[range])
                    .map(|(&j, &v)| v * rhs[(j as usize, c)])
                    .sum();
            }
        }
    }

    fn conj_apply(
        &self,
        out: MatMut<'_, f64>,
        rhs: MatRef<'_, f64>,
        par: Par,
        stack: &mut MemStack,
    ) {
        self.apply(out, rhs, par, stack);
    }
}

/// Diffusion-map embedding (`m x n_components`, row-major, values in `f32` precision): the
/// `n_components` eigenpairs of largest magnitude, each vector scaled as scib-metrics does.
fn diffusion_embedding(
    transitions: &SubGraph64,
    m: usize,
    n_components: usize,
) -> Result<Vec<f64>> {
    let (values, vectors) = if m <= DENSE_EIGEN_MAX_ROWS {
        dense_largest_magnitude(transitions, n_components)?
    } else {
        sparse_largest_magnitude(transitions, n_components)?
    };
    let scales: Vec<f32> = values
        .iter()
        .map(|&e| {
            let e = e as f32 + EIGENVALUE_EPS;
            if e == 1.0 { e } else { e / (1.0 - e) }
        })
        .collect();
    let mut embedding = vec![0.0; m * n_components];
    for (c, &scale) in scales.iter().enumerate() {
        for i in 0..m {
            embedding[i * n_components + c] = f64::from(vectors[(i, c)] as f32 * scale);
        }
    }
    Ok(embedding)
}

/// The `count` eigenpairs of largest magnitude, by the exact dense decomposition.
fn dense_largest_magnitude(matrix: &SubGraph64, count: usize) -> Result<(Vec<f64>, Mat<f64>)> {
    let m = matrix.n;
    let mut dense = Mat::<f64>::zeros(m, m);
    for i in 0..m {
        for e in matrix.indptr[i]..matrix.indptr[i + 1] {
            dense[(i, matrix.indices[e] as usize)] = matrix.values[e];
        }
    }
    let mut values = Diag::<f64>::zeros(m);
    let mut vectors = Mat::<f64>::zeros(m, m);
    let par = Par::Seq;
    let mut buffer = MemBuffer::new(self_adjoint_evd_scratch::<f64>(
        m,
        ComputeEigenvectors::Yes,
        par,
        Default::default(),
    ));
    self_adjoint_evd(
        dense.as_ref(),
        values.as_mut(),
        Some(vectors.as_mut()),
        par,
        MemStack::new(&mut buffer),
        Default::default(),
    )
    .map_err(|e| MetricsError::Numeric(format!("diffusion map eigen-decomposition: {e:?}")))?;
    let values = values.column_vector();
    let mut order: Vec<usize> = (0..m).collect();
    // Largest magnitude first; equal magnitudes: larger value first.
    order.sort_by(|&a, &b| {
        values[b]
            .abs()
            .total_cmp(&values[a].abs())
            .then(values[b].total_cmp(&values[a]))
    });
    order.truncate(count);
    let selected_values = order.iter().map(|&c| values[c]).collect();
    let selected_vectors = Mat::from_fn(m, count, |i, c| vectors[(i, order[c])]);
    Ok((selected_values, selected_vectors))
}

/// The `count` eigenpairs of largest magnitude, by faer's restarted Lanczos solver.
fn sparse_largest_magnitude(matrix: &SubGraph64, count: usize) -> Result<(Vec<f64>, Mat<f64>)> {
    let m = matrix.n;
    let par = Par::Seq;
    let params = PartialEigenParams::default();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let start = Col::<f64>::from_fn(m, |_| rng.random::<f64>() - 0.5);
    let mut vectors = Mat::<f64>::zeros(m, count);
    let mut values = vec![0.0; count];
    let mut buffer = MemBuffer::new(partial_self_adjoint_eigen_scratch::<f64>(
        matrix, count, par, params,
    ));
    let info = partial_self_adjoint_eigen(
        vectors.as_mut(),
        &mut values,
        matrix,
        start.as_ref(),
        LANCZOS_TOLERANCE,
        par,
        MemStack::new(&mut buffer),
        params,
    );
    if info.n_converged_eigen < count {
        return Err(MetricsError::Numeric(format!(
            "diffusion map: {} of {count} eigenpairs converged ({m} rows)",
            info.n_converged_eigen
        )));
    }
    Ok((values, vectors))
}

/// kBET acceptance rate on the diffusion embedding (steps 5-6).
fn acceptance_rate(
    embedding: &[f64],
    dims: usize,
    row_batches: &[u32],
    k0: usize,
    alpha: f64,
) -> f64 {
    let m = row_batches.len();
    let mut categories = row_batches.to_vec();
    categories.sort_unstable();
    categories.dedup();
    let code = |b: u32| categories.binary_search(&b).expect("batch present");
    let n_batches = categories.len();
    let mut frequency = vec![0usize; n_batches];
    for &b in row_batches {
        frequency[code(b)] += 1;
    }
    let neighbourhood = k0 + 1;
    let expected: Vec<f32> = frequency
        .iter()
        .map(|&c| (c as f32 / m as f32) * neighbourhood as f32)
        .collect();
    let dof = (n_batches - 1) as f64;
    let alpha32 = alpha as f32;
    let padding_batch = code(row_batches[m - 1]);

    let accepted: usize = (0..m)
        .into_par_iter()
        .map(|i| {
            let mut counts = vec![0u32; n_batches];
            counts[code(row_batches[i])] += 1;
            for j in nearest_others(embedding, dims, i, k0) {
                counts[code(row_batches[j])] += 1;
            }
            let found = 1 + k0.min(m - 1);
            counts[padding_batch] += u32::try_from(neighbourhood - found).expect("small");
            let statistic: f32 = counts
                .iter()
                .zip(&expected)
                .map(|(&o, &e)| {
                    let diff = o as f32 - e;
                    diff * diff / e
                })
                .sum();
            let p_value =
                1.0_f32 - regularized_gamma_p(dof / 2.0, f64::from(statistic / 2.0)) as f32;
            usize::from(p_value >= alpha32)
        })
        .sum();
    accepted as f64 / m as f64
}

/// The `k` rows nearest to row `i` (Euclidean, ties by index), excluding `i` itself; all other
/// rows if there are fewer than `k`.
fn nearest_others(embedding: &[f64], dims: usize, i: usize, k: usize) -> Vec<usize> {
    let m = embedding.len() / dims.max(1);
    let query = &embedding[i * dims..(i + 1) * dims];
    let mut candidates: Vec<(f64, usize)> = (0..m)
        .filter(|&j| j != i)
        .map(|j| {
            let other = &embedding[j * dims..(j + 1) * dims];
            let d2: f64 = query
                .iter()
                .zip(other)
                .map(|(a, b)| (a - b) * (a - b))
                .sum();
            (d2, j)
        })
        .collect();
    let order = |a: &(f64, usize), b: &(f64, usize)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
    if candidates.len() > k {
        candidates.select_nth_unstable_by(k, order);
        candidates.truncate(k);
    }
    candidates.into_iter().map(|(_, j)| j).collect()
}

/// Natural log of the gamma function for `x > 0` (Lanczos approximation, g = 7, 9 terms;
/// relative error about 1e-15).
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const COEFFICIENTS: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Gamma(x) Gamma(1 - x) = pi / sin(pi x).
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = COEFFICIENTS[0];
    for (k, &c) in COEFFICIENTS.iter().enumerate().skip(1) {
        sum += c / (x + k as f64);
    }
    let t = x + G + 0.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// Regularized lower incomplete gamma `P(a, x) = gamma(a, x) / Gamma(a)` for `a > 0`, `x >= 0`
/// (series for `x < a + 1`, continued fraction otherwise, as in Numerical Recipes). NaN for
/// invalid arguments.
pub fn regularized_gamma_p(a: f64, x: f64) -> f64 {
    if a.is_nan() || a <= 0.0 || x.is_nan() || x < 0.0 {
        return f64::NAN;
    }
    if x == 0.0 {
        return 0.0;
    }
    if x.is_infinite() {
        return 1.0;
    }
    if x < a + 1.0 {
        gamma_series(a, x)
    } else {
        1.0 - gamma_continued_fraction(a, x)
    }
}

/// Regularized upper incomplete gamma `Q(a, x) = 1 - P(a, x)`, computed without cancellation
/// (see [`regularized_gamma_p`]).
pub fn regularized_gamma_q(a: f64, x: f64) -> f64 {
    if a.is_nan() || a <= 0.0 || x.is_nan() || x < 0.0 {
        return f64::NAN;
    }
    if x == 0.0 {
        return 1.0;
    }
    if x.is_infinite() {
        return 0.0;
    }
    if x < a + 1.0 {
        1.0 - gamma_series(a, x)
    } else {
        gamma_continued_fraction(a, x)
    }
}

/// Chi-square survival function `P(X >= statistic)` with `dof` degrees of freedom.
pub fn chi2_sf(statistic: f64, dof: f64) -> f64 {
    regularized_gamma_q(dof / 2.0, statistic / 2.0)
}

/// `exp(-x + a ln x - ln Gamma(a))`, the common prefactor of the gamma expansions.
fn gamma_prefactor(a: f64, x: f64) -> f64 {
    (-x + a * x.ln() - ln_gamma(a)).exp()
}

/// Series `P(a, x) = prefactor * sum_n x^n / (a (a + 1) ... (a + n))`, for `x < a + 1`.
fn gamma_series(a: f64, x: f64) -> f64 {
    let mut denominator = a;
    let mut term = 1.0 / a;
    let mut sum = term;
    for _ in 0..100_000 {
        denominator += 1.0;
        term *= x / denominator;
        sum += term;
        if term.abs() < sum.abs() * f64::EPSILON {
            break;
        }
    }
    sum * gamma_prefactor(a, x)
}

/// Continued fraction for `Q(a, x)` (modified Lentz), for `x >= a + 1`.
fn gamma_continued_fraction(a: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let mut b = x + 1.0 - a;
    let mut c = 1.0 / TINY;
    let mut d = 1.0 / b;
    let mut h = d;
    for i in 1..100_000 {
        let i = f64::from(i);
        let an = -i * (i - a);
        b += 2.0;
        d = an * d + b;
        if d.abs() < TINY {
            d = TINY;
        }
        c = b + an / c;
        if c.abs() < TINY {
            c = TINY;
        }
        d = 1.0 / d;
        let delta = d * c;
        h *= delta;
        if (delta - 1.0).abs() < f64::EPSILON {
            break;
        }
    }
    gamma_prefactor(a, x) * h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn underflowing_weights_leave_a_node_isolated_not_nan() {
        // Nodes 0-1 are an ordinary pair; node 2's weights are f32 denormals (what
        // near-duplicate rows produce), so its inverse column sum overflows.
        let tiny = 1e-44_f32;
        let sub = SubGraph {
            indptr: vec![0, 2, 4, 6],
            indices: vec![1, 2, 0, 2, 0, 1],
            values: vec![0.5, tiny, 0.5, tiny, tiny, tiny],
        };
        let t = symmetric_transitions(&sub);
        assert!(t.values.iter().all(|v| v.is_finite()), "{:?}", t.values);
        assert!(t.values[0] > 0.0);
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * b.abs().max(1e-300)
    }

    #[test]
    fn ln_gamma_matches_known_values() {
        let pi = std::f64::consts::PI;
        assert!(close(ln_gamma(0.5), 0.5 * pi.ln(), 1e-14));
        assert!(close(ln_gamma(1.0).exp(), 1.0, 1e-14));
        assert!(close(ln_gamma(10.0), 362_880f64.ln(), 1e-14));
        assert!(close(ln_gamma(0.1), 2.252_712_651_734_206, 1e-14));
        assert!(close(ln_gamma(100.5), 361.435_540_467_777_57, 1e-14));
    }

    #[test]
    fn incomplete_gamma_matches_closed_forms() {
        for &x in &[0.01, 0.5, 1.0, 3.0, 10.0, 50.0] {
            // Q(1, x) = exp(-x); P(3, x) = 1 - exp(-x)(1 + x + x^2 / 2).
            assert!(close(regularized_gamma_q(1.0, x), (-x).exp(), 1e-13), "{x}");
            let p3 = 1.0 - (-x).exp() * (1.0 + x + x * x / 2.0);
            // The closed form cancels for small x: compare absolutely.
            assert!((regularized_gamma_p(3.0, x) - p3).abs() < 1e-14, "{x}");
        }
        assert_eq!(regularized_gamma_p(2.0, 0.0), 0.0);
        assert_eq!(regularized_gamma_q(2.0, f64::INFINITY), 0.0);
        assert!(regularized_gamma_p(0.0, 1.0).is_nan());
        assert!(regularized_gamma_q(1.0, -1.0).is_nan());
    }

    #[test]
    fn incomplete_gamma_matches_scipy() {
        // scipy.special.gammaincc / gammainc.
        assert!(close(
            regularized_gamma_q(0.5, 2.0),
            0.045_500_263_896_358_57,
            1e-13
        ));
        assert!(close(
            regularized_gamma_q(100.0, 100.0),
            0.486_701_201_720_851_35,
            1e-12
        ));
        assert!(close(
            regularized_gamma_p(4.5, 2.0),
            0.088_587_473_168_320_83,
            1e-12
        ));
        assert!(close(
            regularized_gamma_q(2.5, 30.0),
            1.215_456_977_718_300_7e-11,
            1e-10
        ));
    }

    #[test]
    fn chi2_critical_values_give_alpha() {
        // scipy.stats.chi2.ppf(0.95, dof).
        for &(dof, critical) in &[
            (1.0, 3.841_458_820_694_124),
            (2.0, 5.991_464_547_107_979),
            (4.0, 9.487_729_036_781_154),
            (9.0, 16.918_977_604_620_448),
        ] {
            assert!(close(chi2_sf(critical, dof), 0.05, 1e-12), "dof {dof}");
        }
    }

    /// Two well-separated rings of 20 rows; each ring is one label mixing two batches.
    fn ring_neighbors(n_per_ring: usize, k: usize) -> Neighbors {
        let n = 2 * n_per_ring;
        let mut indices = Vec::with_capacity(n * k);
        let mut distances = Vec::with_capacity(n * k);
        for i in 0..n {
            let ring = i / n_per_ring;
            let pos = i % n_per_ring;
            let mut others: Vec<(f64, usize)> = (0..n_per_ring)
                .map(|p| {
                    let gap = pos.abs_diff(p).min(n_per_ring - pos.abs_diff(p));
                    (gap as f64 * 0.01, ring * n_per_ring + p)
                })
                .collect();
            others.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            for &(d, j) in others.iter().take(k) {
                indices.push(u32::try_from(j).unwrap());
                distances.push(d);
            }
        }
        Neighbors {
            n,
            k,
            indices,
            distances,
        }
    }

    #[test]
    fn well_mixed_batches_are_accepted_and_separated_ones_rejected() {
        let nn = ring_neighbors(40, 12);
        let labels: Vec<u32> = (0..80).map(|i| u32::from(i >= 40)).collect();
        // Label 0 alternates batches along its ring (well mixed); label 1 has one batch per
        // half-ring (segregated).
        let batches: Vec<u32> = (0..80)
            .map(|i| {
                if i < 40 {
                    (i % 2) as u32
                } else {
                    u32::from(i >= 60)
                }
            })
            .collect();
        let result = kbet_per_label(&nn, &batches, &labels, 0.05).unwrap();
        assert!(result.per_label[0] > 0.9, "{:?}", result.per_label);
        assert!(result.per_label[1] < 0.5, "{:?}", result.per_label);
        assert_eq!(
            result.score,
            (result.per_label[0] + result.per_label[1]) / 2.0
        );
    }

    #[test]
    fn small_or_single_batch_labels_are_skipped() {
        let nn = ring_neighbors(40, 12);
        let labels: Vec<u32> = (0..80).map(|i| if i < 40 { 0 } else { 2 }).collect();
        let batches: Vec<u32> = (0..80)
            .map(|i| if i < 40 { 0 } else { (i % 2) as u32 })
            .collect();
        let result = kbet_per_label(&nn, &batches, &labels, 0.05).unwrap();
        assert!(result.per_label[0].is_nan()); // one batch
        assert!(result.per_label[1].is_nan()); // absent
        assert!(!result.per_label[2].is_nan());
        assert_eq!(result.score, result.per_label[2]);
        assert!(kbet_per_label(&nn, &batches[..79], &labels, 0.05).is_err());
        assert!(kbet_per_label(&nn, &batches, &labels, 1.5).is_err());
    }

    #[test]
    fn sparse_and_dense_eigen_solvers_agree() {
        let nn = ring_neighbors(300, 10);
        let graph = umap_connectivities(&nn).unwrap();
        let rows: Vec<usize> = (0..300).collect();
        let transitions = symmetric_transitions(&induced_subgraph(&graph, &rows));
        let (dense_values, dense_vectors) = dense_largest_magnitude(&transitions, 20).unwrap();
        let (sparse_values, sparse_vectors) = sparse_largest_magnitude(&transitions, 20).unwrap();
        for c in 0..20 {
            assert!((dense_values[c] - sparse_values[c]).abs() < 1e-9, "{c}");
        }
        // The top eigenvalue is simple (1); its vector agrees up to sign.
        let dot: f64 = (0..300)
            .map(|i| dense_vectors[(i, 0)] * sparse_vectors[(i, 0)])
            .sum();
        assert!((dot.abs() - 1.0).abs() < 1e-8, "{dot}");
    }
}
