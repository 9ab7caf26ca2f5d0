//! Agreement between two clusterings (NMI, ARI, as scikit-learn computes them) and the
//! modularity of a partition of a weighted graph.

use crate::error::{MetricsError, Result};
use crate::types::CsrGraph;

/// Maps arbitrary `u32` ids to dense codes `0..k` (in increasing id order); returns the codes and `k`.
pub(crate) fn dense_codes(ids: &[u32]) -> (Vec<u32>, usize) {
    let mut distinct = ids.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    let codes = ids
        .iter()
        .map(|id| {
            let code = distinct
                .binary_search(id)
                .expect("id is among the distinct ids");
            u32::try_from(code).expect("fewer than 2^32 distinct ids")
        })
        .collect();
    (codes, distinct.len())
}

/// The contingency table of two labelings: row sums, column sums and the non-zero cells
/// `(row, col, count)` in row-major order.
struct Contingency {
    n: u64,
    row_sums: Vec<u64>,
    col_sums: Vec<u64>,
    cells: Vec<(u32, u32, u64)>,
}

fn contingency(a: &[u32], b: &[u32]) -> Result<Contingency> {
    if a.len() != b.len() {
        return Err(MetricsError::InvalidInput(format!(
            "the two labelings have different lengths ({} and {})",
            a.len(),
            b.len()
        )));
    }
    if a.is_empty() {
        return Err(MetricsError::InvalidInput(
            "the labelings are empty".to_string(),
        ));
    }
    let (codes_a, k_a) = dense_codes(a);
    let (codes_b, k_b) = dense_codes(b);
    let mut row_sums = vec![0u64; k_a];
    let mut col_sums = vec![0u64; k_b];
    let mut pairs: Vec<(u32, u32)> = codes_a.iter().copied().zip(codes_b).collect();
    for &(i, j) in &pairs {
        row_sums[i as usize] += 1;
        col_sums[j as usize] += 1;
    }
    pairs.sort_unstable();
    let mut cells: Vec<(u32, u32, u64)> = Vec::new();
    for (i, j) in pairs {
        match cells.last_mut() {
            Some(last) if last.0 == i && last.1 == j => last.2 += 1,
            _ => cells.push((i, j, 1)),
        }
    }
    Ok(Contingency {
        n: a.len() as u64,
        row_sums,
        col_sums,
        cells,
    })
}

/// Shannon entropy (natural log) of a labeling given its class sizes.
fn entropy(sizes: &[u64]) -> f64 {
    if sizes.len() <= 1 {
        return 0.0;
    }
    let total = sizes.iter().sum::<u64>() as f64;
    let log_total = total.ln();
    -sizes
        .iter()
        .map(|&s| {
            let s = s as f64;
            (s / total) * (s.ln() - log_total)
        })
        .sum::<f64>()
}

/// Normalized mutual information of two labelings, as scikit-learn's
/// `normalized_mutual_info_score(a, b, average_method="arithmetic")`: `MI / mean(H(a), H(b))`
/// (natural logs). Both labelings with a single class give 1; otherwise a zero mutual
/// information (e.g. one side has a single class) gives 0. Label values are arbitrary ids.
///
/// Errors if the lengths differ or the labelings are empty.
pub fn nmi(a: &[u32], b: &[u32]) -> Result<f64> {
    let table = contingency(a, b)?;
    if table.row_sums.len() == 1 && table.col_sums.len() == 1 {
        return Ok(1.0);
    }
    if table.row_sums.len() == 1 || table.col_sums.len() == 1 {
        return Ok(0.0);
    }
    let n = table.n as f64;
    let log_n = n.ln();
    let mut mi = 0.0;
    for &(i, j, count) in &table.cells {
        let p = count as f64 / n;
        // u64 product of two counts <= n: exact while n^2 < 2^64.
        let outer = (table.row_sums[i as usize] * table.col_sums[j as usize]) as f64;
        let term = p * ((count as f64).ln() - log_n) + p * (-outer.ln() + log_n + log_n);
        if term.abs() >= f64::EPSILON {
            mi += term;
        }
    }
    let mi = mi.max(0.0);
    if mi == 0.0 {
        return Ok(0.0);
    }
    let normalizer = 0.5 * (entropy(&table.row_sums) + entropy(&table.col_sums));
    Ok(mi / normalizer)
}

/// Adjusted Rand index of two labelings, as scikit-learn's `adjusted_rand_score(a, b)`
/// (pair-counting form, exact integer counts). Returns 1 when no pair is split differently
/// by the two labelings (including the trivial cases: one class each, or all singletons).
///
/// Errors if the lengths differ or the labelings are empty.
pub fn ari(a: &[u32], b: &[u32]) -> Result<f64> {
    let table = contingency(a, b)?;
    let n = i128::from(table.n);
    let sum_squares: i128 = table
        .cells
        .iter()
        .map(|&(_, _, c)| i128::from(c) * i128::from(c))
        .sum();
    // Ordered pairs together in both / in b only / in a only / in neither.
    let together_both = sum_squares - n;
    let together_b_only: i128 = table
        .cells
        .iter()
        .map(|&(_, j, c)| i128::from(c) * i128::from(table.col_sums[j as usize]))
        .sum::<i128>()
        - sum_squares;
    let together_a_only: i128 = table
        .cells
        .iter()
        .map(|&(i, _, c)| i128::from(c) * i128::from(table.row_sums[i as usize]))
        .sum::<i128>()
        - sum_squares;
    let apart_both = n * n - together_b_only - together_a_only - sum_squares;
    let (tp, fp, fn_, tn) = (together_both, together_b_only, together_a_only, apart_both);
    if fn_ == 0 && fp == 0 {
        return Ok(1.0);
    }
    let numerator = (tp * tn - fn_ * fp) as f64;
    let denominator = ((tp + fn_) * (fn_ + tn) + (tp + fp) * (fp + tn)) as f64;
    Ok(2.0 * numerator / denominator)
}

/// Modularity of a partition of a weighted undirected graph with a resolution parameter
/// (Reichardt-Bornholdt configuration model / Newman modularity, as igraph and leidenalg's
/// `RBConfigurationVertexPartition` normalise it):
/// `Q = 1/(2m) * sum_ij (A_ij - resolution * k_i k_j / (2m)) * [c_i == c_j]`, where `A` is the
/// symmetric weight matrix stored in `g` (both directions of each edge), `k_i` its row sums and
/// `2m` their total. Cluster ids are arbitrary. Returns NaN for a graph without weight.
///
/// # Panics
/// If `clusters.len() != g.n` or a column index is out of range.
pub fn modularity(g: &CsrGraph, clusters: &[u32], resolution: f64) -> f64 {
    assert_eq!(
        clusters.len(),
        g.n,
        "modularity: one cluster id per node is required"
    );
    let (codes, k) = dense_codes(clusters);
    let mut cluster_degree = vec![0.0; k];
    let mut internal = 0.0;
    let mut two_m = 0.0;
    for (i, &ci) in codes.iter().enumerate() {
        let (cols, weights) = g.row(i);
        for (&j, &w) in cols.iter().zip(weights) {
            two_m += w;
            cluster_degree[ci as usize] += w;
            if codes[j as usize] == ci {
                internal += w;
            }
        }
    }
    if two_m == 0.0 {
        return f64::NAN;
    }
    let expected: f64 = cluster_degree.iter().map(|d| d * d).sum::<f64>() / two_m;
    (internal - resolution * expected) / two_m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ari_matches_scikit_learn_doc_examples() {
        assert_eq!(ari(&[0, 0, 1, 1], &[0, 0, 1, 1]).unwrap(), 1.0);
        assert_eq!(ari(&[0, 0, 1, 1], &[1, 1, 0, 0]).unwrap(), 1.0);
        assert!(
            (ari(&[0, 0, 1, 2], &[0, 0, 1, 1]).unwrap() - 0.571_428_571_428_571_4).abs() < 1e-15
        );
        assert!(
            (ari(&[0, 0, 1, 1], &[0, 0, 1, 2]).unwrap() - 0.571_428_571_428_571_4).abs() < 1e-15
        );
        assert_eq!(ari(&[0, 0, 0, 0], &[0, 1, 2, 3]).unwrap(), 0.0);
        assert_eq!(ari(&[0, 0, 1, 1], &[0, 1, 0, 1]).unwrap(), -0.5);
        // Trivial cases: a single class each, all singletons each.
        assert_eq!(ari(&[3, 3, 3], &[7, 7, 7]).unwrap(), 1.0);
        assert_eq!(ari(&[0, 1, 2], &[5, 4, 3]).unwrap(), 1.0);
    }

    #[test]
    fn nmi_edge_cases_and_known_value() {
        assert_eq!(nmi(&[0, 0, 1, 1], &[1, 1, 0, 0]).unwrap(), 1.0);
        assert_eq!(nmi(&[0, 0, 0, 0], &[0, 1, 2, 3]).unwrap(), 0.0);
        assert_eq!(nmi(&[2, 2, 2], &[9, 9, 9]).unwrap(), 1.0);
        assert_eq!(nmi(&[0, 0, 1, 1], &[0, 1, 0, 1]).unwrap(), 0.0);
        // a = [0,0,0,1,1,1], b = [0,0,1,1,2,2]: MI = (2/3) ln 2, H(a) = ln 2, H(b) = ln 3.
        let expected = (2.0 / 3.0) * 2f64.ln() / (0.5 * (2f64.ln() + 3f64.ln()));
        let got = nmi(&[0, 0, 0, 1, 1, 1], &[0, 0, 1, 1, 2, 2]).unwrap();
        assert!((got - expected).abs() < 1e-15, "{got} vs {expected}");
        assert!((got - 0.515_803_742_979_388_8).abs() < 1e-15, "{got}");
    }

    #[test]
    fn bad_input_is_rejected() {
        assert!(nmi(&[0, 1], &[0]).is_err());
        assert!(ari(&[], &[]).is_err());
    }

    #[test]
    fn modularity_of_two_triangles() {
        // Two triangles joined by one edge (2-3), unit weights: m = 7.
        let edges = [(0, 1), (1, 2), (0, 2), (3, 4), (4, 5), (3, 5), (2, 3)];
        let mut adj = vec![Vec::new(); 6];
        for &(i, j) in &edges {
            adj[i].push(j as u32);
            adj[j].push(i as u32);
        }
        let mut g = CsrGraph {
            n: 6,
            indptr: vec![0],
            ..Default::default()
        };
        for row in &mut adj {
            row.sort_unstable();
            g.indices.extend_from_slice(row);
            g.weights.extend(row.iter().map(|_| 1.0));
            g.indptr.push(g.indices.len());
        }
        // Each side: 3 internal edges, degree sum 7. Q = 2 * (3/7 - (7/14)^2).
        let q = modularity(&g, &[0, 0, 0, 1, 1, 1], 1.0);
        assert!((q - 2.0 * (3.0 / 7.0 - 0.25)).abs() < 1e-15, "{q}");
        let q_half = modularity(&g, &[5, 5, 5, 9, 9, 9], 0.5);
        assert!(
            (q_half - 2.0 * (3.0 / 7.0 - 0.125)).abs() < 1e-15,
            "{q_half}"
        );
        // One cluster at resolution 1: 1 - 1 = 0.
        assert!(modularity(&g, &[0; 6], 1.0).abs() < 1e-15);
    }
}
