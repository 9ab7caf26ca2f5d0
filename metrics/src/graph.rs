//! The UMAP fuzzy neighbour graph (scanpy's `method="umap"` connectivities), its connected
//! components, and scib's graph connectivity score.

use rayon::prelude::*;

use crate::error::{MetricsError, Result};
use crate::types::{CsrGraph, Neighbors};

/// Bisection steps of umap-learn's `smooth_knn_dist`.
const BANDWIDTH_ITERATIONS: usize = 64;
/// umap-learn's `SMOOTH_K_TOLERANCE`: stop when the membership sum is this close to the target.
const SMOOTH_K_TOLERANCE: f64 = 1e-5;
/// umap-learn's `MIN_K_DIST_SCALE`: lower bound of a bandwidth, relative to the mean distance.
const MIN_K_DIST_SCALE: f64 = 1e-3;

/// UMAP connectivities of a kNN graph, as scanpy's `pp.neighbors(method="umap")` computes them.
///
/// This is umap-learn's `fuzzy_simplicial_set` with `set_op_mix_ratio = 1` and
/// `local_connectivity = 1` on neighbour lists that include the row itself (scanpy passes the
/// `n_neighbors` columns with the row first, distance 0; `n_neighbors = nn.k`):
/// - `rho_i` = the smallest positive distance of row `i` (0 if none);
/// - `sigma_i` by 64-step bisection so that `sum_{j >= 1} exp(-max(d_ij - rho_i, 0) / sigma_i)`
///   (column 0, the row itself, is skipped as umap does) is within `1e-5` of `log2(k)`, then
///   bounded below by `1e-3` times the row's mean distance (the global mean if `rho_i = 0`);
/// - membership `p_ij` = 0 for the row itself, 1 where `d_ij - rho_i <= 0`, else
///   `exp(-(d_ij - rho_i) / sigma_i)`;
/// - fuzzy union `w = p + p^T - p o p^T`, explicit zeros removed.
///
/// Distances are cast to `f32` first and the memberships and the union are computed in `f32`
/// with umap's operation order (the bisection's sum in `f64`), so the weights equal scanpy's
/// float32 connectivities (on the golden data all but 4-8 of about 9,500 entries per data set
/// bit for bit, the rest within one `f32` ulp); they are returned widened to `f64`. The result is
/// symmetric, with sorted columns per row.
pub fn umap_connectivities(nn: &Neighbors) -> Result<CsrGraph> {
    validate_neighbors(nn)?;
    let (n, k) = (nn.n, nn.k);
    let distances: Vec<f32> = nn.distances.iter().map(|&d| d as f32).collect();
    let global_mean = mean_f32(&distances);
    let target = (k as f64).log2();

    // Directed memberships, one row per query, sorted by column (duplicates summed, zeros
    // dropped, as scipy's COO -> CSR conversion and `eliminate_zeros` do).
    let directed: Vec<Vec<(u32, f32)>> = (0..n)
        .into_par_iter()
        .map(|i| {
            let row_distances = &distances[i * k..(i + 1) * k];
            let (sigma, rho) = smooth_bandwidth(row_distances, target, global_mean);
            let mut entries: Vec<(u32, f32)> = nn
                .indices_of(i)
                .iter()
                .zip(row_distances)
                .map(|(&j, &d)| (j, membership(i, j, d, rho, sigma)))
                .collect();
            entries.sort_by_key(|&(j, _)| j);
            let mut merged: Vec<(u32, f32)> = Vec::with_capacity(entries.len());
            for (j, v) in entries {
                match merged.last_mut() {
                    Some(last) if last.0 == j => last.1 += v,
                    _ => merged.push((j, v)),
                }
            }
            merged.retain(|&(_, v)| v != 0.0);
            merged
        })
        .collect();

    // Transpose of the directed memberships.
    let mut transposed: Vec<Vec<(u32, f32)>> = vec![Vec::new(); n];
    for (i, row) in directed.iter().enumerate() {
        for &(j, v) in row {
            transposed[j as usize].push((u32::try_from(i).expect("n fits u32"), v));
        }
    }

    // Fuzzy union per row: merge the row of P and of P^T (both sorted by column).
    let rows: Vec<Vec<(u32, f32)>> = directed
        .par_iter()
        .zip(transposed.par_iter())
        .map(|(forward, backward)| {
            let mut out = Vec::with_capacity(forward.len() + backward.len());
            let (mut a, mut b) = (0, 0);
            while a < forward.len() || b < backward.len() {
                let col_a = forward.get(a).map_or(u32::MAX, |e| e.0);
                let col_b = backward.get(b).map_or(u32::MAX, |e| e.0);
                let (col, p, q) = if col_a == col_b {
                    a += 1;
                    b += 1;
                    (col_a, forward[a - 1].1, backward[b - 1].1)
                } else if col_a < col_b {
                    a += 1;
                    (col_a, forward[a - 1].1, 0.0)
                } else {
                    b += 1;
                    (col_b, 0.0, backward[b - 1].1)
                };
                let w = (p + q) - p * q;
                if w != 0.0 {
                    out.push((col, w));
                }
            }
            out
        })
        .collect();

    let mut graph = CsrGraph {
        n,
        indptr: Vec::with_capacity(n + 1),
        indices: Vec::new(),
        weights: Vec::new(),
    };
    graph.indptr.push(0);
    for row in rows {
        for (j, w) in row {
            graph.indices.push(j);
            graph.weights.push(f64::from(w));
        }
        graph.indptr.push(graph.indices.len());
    }
    Ok(graph)
}

/// Checks the shape, index range and distances of a neighbour list.
fn validate_neighbors(nn: &Neighbors) -> Result<()> {
    if nn.k == 0 {
        return Err(MetricsError::InvalidInput(
            "the neighbour lists are empty (k = 0)".into(),
        ));
    }
    if u32::try_from(nn.n).is_err() {
        return Err(MetricsError::InvalidInput(format!(
            "{} rows exceed the u32 index range",
            nn.n
        )));
    }
    let expected = nn.n.checked_mul(nn.k).ok_or_else(|| {
        MetricsError::InvalidInput(format!("n * k overflows ({} x {})", nn.n, nn.k))
    })?;
    if nn.indices.len() != expected || nn.distances.len() != expected {
        return Err(MetricsError::InvalidInput(format!(
            "neighbour arrays have {} indices and {} distances, expected n * k = {expected}",
            nn.indices.len(),
            nn.distances.len()
        )));
    }
    if let Some(&bad) = nn.indices.iter().find(|&&j| j as usize >= nn.n) {
        return Err(MetricsError::InvalidInput(format!(
            "neighbour index {bad} out of range for {} rows",
            nn.n
        )));
    }
    if let Some(&bad) = nn.distances.iter().find(|d| !d.is_finite() || **d < 0.0) {
        return Err(MetricsError::InvalidInput(format!(
            "neighbour distances must be finite and non-negative, found {bad}"
        )));
    }
    Ok(())
}

/// Mean of `f32` values, accumulated in `f64`.
fn mean_f32(values: &[f32]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.iter().map(|&v| f64::from(v)).sum::<f64>() / values.len() as f64
}

/// umap-learn's `smooth_knn_dist` for one row: returns `(sigma, rho)` in `f32`.
fn smooth_bandwidth(distances: &[f32], target: f64, global_mean: f64) -> (f32, f32) {
    // local_connectivity = 1: rho is the first positive distance (rows are sorted ascending).
    let rho = distances.iter().copied().find(|&d| d > 0.0).unwrap_or(0.0);
    let (mut lo, mut hi, mut mid) = (0.0_f32, f32::MAX, 1.0_f32);
    for _ in 0..BANDWIDTH_ITERATIONS {
        // The excess is an f32 difference; the sum is accumulated in f64 (this, not an f32
        // sum, is what reproduces scanpy's weights).
        let mut psum = 0.0_f64;
        for &d in &distances[1..] {
            let excess = d - rho;
            psum += if excess > 0.0 {
                (-(f64::from(excess) / f64::from(mid))).exp()
            } else {
                1.0
            };
        }
        if (psum - target).abs() < SMOOTH_K_TOLERANCE {
            break;
        }
        if psum > target {
            hi = mid;
            mid = (lo + hi) / 2.0;
        } else {
            lo = mid;
            if hi >= f32::MAX {
                mid *= 2.0;
            } else {
                mid = (lo + hi) / 2.0;
            }
        }
    }
    let mean = if rho > 0.0 {
        mean_f32(distances)
    } else {
        global_mean
    };
    let floor = MIN_K_DIST_SCALE * mean;
    let sigma = if f64::from(mid) < floor {
        floor as f32
    } else {
        mid
    };
    (sigma, rho)
}

/// umap-learn's `compute_membership_strengths` for one entry.
fn membership(row: usize, col: u32, distance: f32, rho: f32, sigma: f32) -> f32 {
    if col as usize == row {
        0.0
    } else if distance - rho <= 0.0 || sigma == 0.0 {
        1.0
    } else {
        // f32 argument, exponential rounded once to f32.
        (-f64::from((distance - rho) / sigma)).exp() as f32
    }
}

/// Connected components of a graph, treating every stored entry as an undirected edge (for
/// the symmetric graphs built here these are also the strongly connected components scipy's
/// `connected_components(connection="strong")` finds). Returns a component id per node,
/// numbered `0, 1, ...` in order of each component's smallest node.
pub fn connected_components(g: &CsrGraph) -> Vec<u32> {
    components_of(g.n, |i| g.row(i).0)
}

/// Component ids (numbered by smallest node) of the undirected graph whose row `i` has
/// neighbours `neighbors(i)`; columns may point anywhere in `0..n`.
pub(crate) fn components_of<'a>(n: usize, neighbors: impl Fn(usize) -> &'a [u32]) -> Vec<u32> {
    let mut parent: Vec<usize> = (0..n).collect();
    fn find(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    for i in 0..n {
        for &j in neighbors(i) {
            let (a, b) = (find(&mut parent, i), find(&mut parent, j as usize));
            if a != b {
                // Keep the smaller root so roots are each component's smallest node.
                let (small, large) = if a < b { (a, b) } else { (b, a) };
                parent[large] = small;
            }
        }
    }
    let mut id_of_root = vec![u32::MAX; n];
    let mut next = 0u32;
    (0..n)
        .map(|i| {
            let root = find(&mut parent, i);
            if id_of_root[root] == u32::MAX {
                id_of_root[root] = next;
                next += 1;
            }
            id_of_root[root]
        })
        .collect()
}

/// scib's graph connectivity: per label and overall.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphConnectivity {
    /// Per label code: fraction of the label's rows in the largest connected component of the
    /// subgraph restricted to that label (NaN for a label with no rows).
    pub per_label: Vec<f64>,
    /// Mean of `per_label` over the labels that have rows.
    pub score: f64,
}

/// scib's `graph_connectivity`: for each label, the subgraph of `g` induced by its rows, and
/// the fraction of those rows in its largest connected component; the score is the mean over
/// labels present. Every stored entry counts as an edge (see [`connected_components`]).
pub fn graph_connectivity(
    g: &CsrGraph,
    labels: &[u32],
    n_labels: usize,
) -> Result<GraphConnectivity> {
    if labels.len() != g.n {
        return Err(MetricsError::InvalidInput(format!(
            "{} labels for a graph of {} nodes",
            labels.len(),
            g.n
        )));
    }
    if g.indptr.len() != g.n + 1 || g.indptr.last() != Some(&g.nnz()) {
        return Err(MetricsError::InvalidInput(
            "graph indptr does not match its node and entry counts".into(),
        ));
    }
    if let Some(&bad) = labels.iter().find(|&&l| l as usize >= n_labels) {
        return Err(MetricsError::InvalidInput(format!(
            "label code {bad} out of range for {n_labels} labels"
        )));
    }
    if let Some(&bad) = g.indices.iter().find(|&&j| j as usize >= g.n) {
        return Err(MetricsError::InvalidInput(format!(
            "graph column {bad} out of range for {} nodes",
            g.n
        )));
    }
    // Components of the graph keeping only same-label edges = components of every label's
    // induced subgraph at once.
    let same_label: Vec<Vec<u32>> = (0..g.n)
        .map(|i| {
            g.row(i)
                .0
                .iter()
                .copied()
                .filter(|&j| labels[j as usize] == labels[i])
                .collect()
        })
        .collect();
    let components = components_of(g.n, |i| &same_label[i]);
    let mut component_size = vec![0usize; g.n];
    for &c in &components {
        component_size[c as usize] += 1;
    }
    let mut label_size = vec![0usize; n_labels];
    let mut largest = vec![0usize; n_labels];
    for (i, &label) in labels.iter().enumerate() {
        let label = label as usize;
        label_size[label] += 1;
        largest[label] = largest[label].max(component_size[components[i] as usize]);
    }
    let per_label: Vec<f64> = label_size
        .iter()
        .zip(&largest)
        .map(|(&size, &big)| {
            if size == 0 {
                f64::NAN
            } else {
                big as f64 / size as f64
            }
        })
        .collect();
    let present: Vec<f64> = per_label.iter().copied().filter(|v| !v.is_nan()).collect();
    let score = if present.is_empty() {
        f64::NAN
    } else {
        present.iter().sum::<f64>() / present.len() as f64
    };
    Ok(GraphConnectivity { per_label, score })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(n: usize, edges: &[(u32, u32)]) -> CsrGraph {
        let mut rows: Vec<Vec<u32>> = vec![Vec::new(); n];
        for &(a, b) in edges {
            rows[a as usize].push(b);
            rows[b as usize].push(a);
        }
        let mut g = CsrGraph {
            n,
            indptr: vec![0],
            ..Default::default()
        };
        for mut row in rows {
            row.sort_unstable();
            g.weights.extend(row.iter().map(|_| 1.0));
            g.indices.extend(row);
            g.indptr.push(g.indices.len());
        }
        g
    }

    #[test]
    fn components_are_numbered_by_smallest_node() {
        let g = graph(6, &[(4, 1), (2, 5), (1, 3)]);
        assert_eq!(connected_components(&g), vec![0, 1, 2, 1, 1, 2]);
    }

    #[test]
    fn graph_connectivity_counts_only_same_label_edges() {
        // Label 0 = {0, 1, 2}: 0-1 connected, 2 only through a label-1 node.
        // Label 1 = {3, 4}: connected. Label 2 is absent.
        let g = graph(5, &[(0, 1), (2, 3), (3, 4), (1, 3)]);
        let result = graph_connectivity(&g, &[0, 0, 0, 1, 1], 3).unwrap();
        assert_eq!(result.per_label[0], 2.0 / 3.0);
        assert_eq!(result.per_label[1], 1.0);
        assert!(result.per_label[2].is_nan());
        assert_eq!(result.score, (2.0 / 3.0 + 1.0) / 2.0);
        assert!(graph_connectivity(&g, &[0, 0, 0, 1], 3).is_err());
        assert!(graph_connectivity(&g, &[0, 0, 0, 1, 3], 3).is_err());
    }

    #[test]
    fn umap_memberships_follow_the_fuzzy_union() {
        // Three points on a line at 0, 1, 3; k = 2 (self + nearest other).
        let nn = Neighbors {
            n: 3,
            k: 2,
            indices: vec![0, 1, 1, 0, 2, 1],
            distances: vec![0.0, 1.0, 0.0, 1.0, 0.0, 2.0],
        };
        let g = umap_connectivities(&nn).unwrap();
        // Every nearest other neighbour sits at rho, so each directed membership is 1; the
        // union of 1 and 1 (or 1 and 0) is 1.
        assert_eq!(g.indptr, vec![0, 1, 3, 4]);
        assert_eq!(g.indices, vec![1, 0, 2, 1]);
        assert_eq!(g.weights, vec![1.0; 4]);
    }

    #[test]
    fn umap_bandwidth_reaches_the_target_sum() {
        let distances = [0.0_f32, 0.1, 0.2, 0.4, 0.8];
        let target = 5f64.log2();
        let (sigma, rho) = smooth_bandwidth(&distances, target, 0.3);
        assert_eq!(rho, 0.1);
        let psum: f64 = distances[1..]
            .iter()
            .map(|&d| (-(f64::from(d - rho).max(0.0)) / f64::from(sigma)).exp())
            .sum();
        assert!((psum - target).abs() < 1e-5, "{psum} vs {target}");
    }

    #[test]
    fn umap_rejects_malformed_neighbors() {
        let bad_index = Neighbors {
            n: 2,
            k: 1,
            indices: vec![0, 2],
            distances: vec![0.0, 0.0],
        };
        assert!(umap_connectivities(&bad_index).is_err());
        let bad_distance = Neighbors {
            n: 1,
            k: 1,
            indices: vec![0],
            distances: vec![f64::NAN],
        };
        assert!(umap_connectivities(&bad_distance).is_err());
    }
}
