//! Seeded Leiden community detection (Traag, Waltman & van Eck 2019) maximising the
//! Reichardt-Bornholdt configuration-model quality (modularity with a resolution parameter)
//! on a weighted undirected graph, following leidenalg's `Optimiser` as scanpy calls it
//! (`RBConfigurationVertexPartition`, `n_iterations = -1`).
//!
//! One pass (leidenalg's `optimise_partition`) repeats, on ever coarser aggregate graphs:
//! 1. **fast local moving**: nodes in random order in a queue; each moves to the neighbouring
//!    community (or an empty one) with the largest quality gain, if that gain exceeds
//!    `1e-12` times the node's degree (leidenalg: `10 * f64::EPSILON` absolute; the relative
//!    threshold keeps rounding noise from ever counting as a gain, whatever the weight scale);
//!    when a node moves, its neighbours outside the new community are queued again;
//! 2. **refinement** (leidenalg's default `merge_nodes_constrained` with random neighbour
//!    communities): starting from singletons, each node still alone in its refined community,
//!    in random order, draws one of the `k` distinct refined communities among its neighbours
//!    in the same (unrefined) community with probability `1/(k + 1)` each (so it stays put with
//!    probability `1/(k + 1)`), and joins it if the quality gain is `>= 0`. This is leidenalg's
//!    randomisation; the paper's `theta`-weighted choice is not used;
//! 3. **aggregation** of the refined communities into nodes, initially placed in their
//!    unrefined community.
//!
//! It stops aggregating when the aggregate graph no longer shrinks or every community is one
//! node. Passes repeat until a pass improves nothing (`n_iterations = -1`). Clusters are then
//! numbered by decreasing size, ties by smallest member node. The random stream (ChaCha8
//! seeded with `seed`) differs from leidenalg's Mersenne twister, so partitions are not
//! identical to leidenalg's, only of the same quality; results are deterministic for a seed.
//!
//! Quality of a partition: `sum_c (I_c - resolution * K_c^2 / (2m))`, with `I_c` the weight
//! inside community `c` (both directions of each edge), `K_c` its total degree and `2m` the total
//! weight: `2m` times the modularity of [`crate::cluster::modularity`].

use std::collections::VecDeque;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{MetricsError, Result};
use crate::types::CsrGraph;

/// Smallest quality gain, relative to the moving node's degree, that counts as an improvement
/// in local moving.
const MIN_RELATIVE_GAIN: f64 = 1e-12;

/// A weighted symmetric graph at one aggregation level, with node degrees kept from level 0.
struct Level {
    n: usize,
    indptr: Vec<usize>,
    indices: Vec<u32>,
    weights: Vec<f64>,
    /// Total degree of the original nodes each node stands for.
    degree: Vec<f64>,
}

impl Level {
    fn from_csr(g: &CsrGraph) -> Self {
        let degree = (0..g.n).map(|i| g.row(i).1.iter().sum()).collect();
        Self {
            n: g.n,
            indptr: g.indptr.clone(),
            indices: g.indices.clone(),
            weights: g.weights.clone(),
            degree,
        }
    }

    fn row(&self, v: usize) -> (&[u32], &[f64]) {
        let range = self.indptr[v]..self.indptr[v + 1];
        (&self.indices[range.clone()], &self.weights[range])
    }

    /// The graph whose nodes are the `n_groups` groups of `group` (dense ids), with summed
    /// weights; the weight inside a group becomes a self-loop.
    fn collapse(&self, group: &[u32], n_groups: usize) -> Level {
        let mut start = vec![0usize; n_groups + 1];
        for &c in group {
            start[c as usize + 1] += 1;
        }
        for c in 0..n_groups {
            start[c + 1] += start[c];
        }
        let mut fill = start.clone();
        let mut members = vec![0u32; self.n];
        for (v, &c) in group.iter().enumerate() {
            members[fill[c as usize]] = v as u32;
            fill[c as usize] += 1;
        }
        let mut accumulated = vec![0.0f64; n_groups];
        let mut seen = vec![false; n_groups];
        let mut touched: Vec<u32> = Vec::new();
        let mut indptr = Vec::with_capacity(n_groups + 1);
        indptr.push(0);
        let mut indices = Vec::new();
        let mut weights = Vec::new();
        let mut degree = vec![0.0; n_groups];
        for c in 0..n_groups {
            for &v in &members[start[c]..start[c + 1]] {
                degree[c] += self.degree[v as usize];
                let (cols, ws) = self.row(v as usize);
                for (&u, &w) in cols.iter().zip(ws) {
                    let target = group[u as usize];
                    if !seen[target as usize] {
                        seen[target as usize] = true;
                        touched.push(target);
                    }
                    accumulated[target as usize] += w;
                }
            }
            touched.sort_unstable();
            for &target in &touched {
                indices.push(target);
                weights.push(accumulated[target as usize]);
                accumulated[target as usize] = 0.0;
                seen[target as usize] = false;
            }
            touched.clear();
            indptr.push(indices.len());
        }
        Level {
            n: n_groups,
            indptr,
            indices,
            weights,
            degree,
        }
    }
}

/// Scratch space that sums a node's edge weights per neighbouring community.
struct NeighbourWeights {
    weight: Vec<f64>,
    seen: Vec<bool>,
    communities: Vec<u32>,
}

impl NeighbourWeights {
    fn new(n: usize) -> Self {
        Self {
            weight: vec![0.0; n],
            seen: vec![false; n],
            communities: Vec::new(),
        }
    }

    fn add(&mut self, community: u32, w: f64) {
        let c = community as usize;
        if !self.seen[c] {
            self.seen[c] = true;
            self.communities.push(community);
        }
        self.weight[c] += w;
    }

    fn weight_to(&self, community: u32) -> f64 {
        self.weight[community as usize]
    }

    fn clear(&mut self) {
        for &c in &self.communities {
            self.weight[c as usize] = 0.0;
            self.seen[c as usize] = false;
        }
        self.communities.clear();
    }
}

/// Renumbers `membership` to dense ids in order of first appearance; returns the count.
fn renumber_dense(membership: &mut [u32]) -> usize {
    let mut new_id = vec![u32::MAX; membership.len()];
    let mut next = 0u32;
    for c in membership.iter_mut() {
        let slot = &mut new_id[*c as usize];
        if *slot == u32::MAX {
            *slot = next;
            next += 1;
        }
        *c = *slot;
    }
    next as usize
}

/// Fast local moving on `level`; `membership` holds dense ids `< level.n` and is renumbered
/// densely on return. Returns the total quality gain (in half units, see [`gain`]).
fn move_nodes(level: &Level, membership: &mut [u32], scale: f64, rng: &mut ChaCha8Rng) -> f64 {
    let n = level.n;
    let mut community_degree = vec![0.0; n];
    let mut community_size = vec![0u32; n];
    for (v, &c) in membership.iter().enumerate() {
        community_degree[c as usize] += level.degree[v];
        community_size[c as usize] += 1;
    }
    let mut empty: Vec<u32> = (0..n as u32)
        .rev()
        .filter(|&c| community_size[c as usize] == 0)
        .collect();
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.shuffle(rng);
    let mut queue: VecDeque<u32> = order.into();
    let mut stable = vec![false; n];
    let mut neighbours = NeighbourWeights::new(n);
    let mut total_gain = 0.0;
    while let Some(v) = queue.pop_front() {
        let v = v as usize;
        let current = membership[v];
        let k_v = level.degree[v];
        let (cols, ws) = level.row(v);
        for (&u, &w) in cols.iter().zip(ws) {
            if u as usize != v {
                neighbours.add(membership[u as usize], w);
            }
        }
        let w_current = neighbours.weight_to(current);
        let degree_rest = community_degree[current as usize] - k_v;
        let mut best = current;
        let mut best_gain = MIN_RELATIVE_GAIN * k_v;
        for &c in &neighbours.communities {
            if c == current {
                continue;
            }
            let g = gain(
                neighbours.weight_to(c),
                w_current,
                k_v,
                community_degree[c as usize],
                degree_rest,
                scale,
            );
            if g > best_gain {
                best = c;
                best_gain = g;
            }
        }
        if community_size[current as usize] > 1
            && let Some(&e) = empty.last()
        {
            let g = gain(0.0, w_current, k_v, 0.0, degree_rest, scale);
            if g > best_gain {
                best = e;
                best_gain = g;
            }
        }
        neighbours.clear();
        stable[v] = true;
        if best == current {
            continue;
        }
        total_gain += best_gain;
        if community_size[best as usize] == 0 {
            empty.pop();
        }
        community_degree[current as usize] -= k_v;
        community_size[current as usize] -= 1;
        community_degree[best as usize] += k_v;
        community_size[best as usize] += 1;
        if community_size[current as usize] == 0 {
            community_degree[current as usize] = 0.0;
            empty.push(current);
        }
        membership[v] = best;
        for &u in cols {
            let u = u as usize;
            if stable[u] && membership[u] != best {
                stable[u] = false;
                queue.push_back(u as u32);
            }
        }
    }
    renumber_dense(membership);
    total_gain
}

/// Half the quality gain of moving a node of degree `k_v` from its community (whose other
/// members weigh `degree_rest` and receive `w_from` of its edge weight) to a community of
/// degree `degree_to` receiving `w_to`; `scale = resolution / 2m`.
fn gain(w_to: f64, w_from: f64, k_v: f64, degree_to: f64, degree_rest: f64, scale: f64) -> f64 {
    w_to - w_from - scale * k_v * (degree_to - degree_rest)
}

/// Leiden refinement of `partition` on `level`: returns a dense sub-partition and its size.
fn refine(level: &Level, partition: &[u32], scale: f64, rng: &mut ChaCha8Rng) -> (Vec<u32>, usize) {
    let n = level.n;
    let mut refined: Vec<u32> = (0..n as u32).collect();
    let mut refined_degree = level.degree.clone();
    let mut refined_size = vec![1u32; n];
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.shuffle(rng);
    let mut neighbours = NeighbourWeights::new(n);
    for &v in &order {
        let v = v as usize;
        let current = refined[v];
        if refined_size[current as usize] != 1 {
            continue;
        }
        let (cols, ws) = level.row(v);
        for (&u, &w) in cols.iter().zip(ws) {
            let u = u as usize;
            if u != v && partition[u] == partition[v] {
                neighbours.add(refined[u], w);
            }
        }
        let k = neighbours.communities.len();
        if k > 0 && rng.random_range(0..=k) > 0 {
            let target = neighbours.communities[rng.random_range(0..k)];
            let k_v = level.degree[v];
            let g = gain(
                neighbours.weight_to(target),
                0.0,
                k_v,
                refined_degree[target as usize],
                0.0,
                scale,
            );
            if g >= 0.0 {
                refined_degree[current as usize] = 0.0;
                refined_size[current as usize] = 0;
                refined_degree[target as usize] += k_v;
                refined_size[target as usize] += 1;
                refined[v] = target;
            }
        }
        neighbours.clear();
    }
    let count = renumber_dense(&mut refined);
    (refined, count)
}

/// One leidenalg `optimise_partition` pass, starting from `membership` (dense ids on the
/// original nodes), which it updates. Returns the quality gain of its local-moving phases.
fn optimise_pass(base: &Level, membership: &mut [u32], scale: f64, rng: &mut ChaCha8Rng) -> f64 {
    let mut aggregated: Option<Level> = None;
    let mut partition: Vec<u32> = membership.to_vec();
    renumber_dense(&mut partition);
    // Node of the current aggregate graph holding each original node.
    let mut node_of: Vec<u32> = (0..base.n as u32).collect();
    let mut total_gain = 0.0;
    loop {
        let level = aggregated.as_ref().unwrap_or(base);
        total_gain += move_nodes(level, &mut partition, scale, rng);
        let n_communities = partition.iter().max().map_or(0, |&c| c as usize + 1);
        for (original, node) in membership.iter_mut().zip(&node_of) {
            *original = partition[*node as usize];
        }
        let (refined, n_refined) = refine(level, &partition, scale, rng);
        for node in node_of.iter_mut() {
            *node = refined[*node as usize];
        }
        let mut next_partition = vec![0u32; n_refined];
        for (v, &r) in refined.iter().enumerate() {
            next_partition[r as usize] = partition[v];
        }
        let aggregate_further = n_refined < level.n && level.n > n_communities;
        let next_level = level.collapse(&refined, n_refined);
        aggregated = Some(next_level);
        partition = next_partition;
        if !aggregate_further {
            return total_gain;
        }
    }
}

/// Checks that `g` is a well-formed symmetric graph with finite non-negative weights.
fn validate(g: &CsrGraph) -> Result<()> {
    let invalid = |msg: String| Err(MetricsError::InvalidInput(msg));
    if g.indptr.len() != g.n + 1 || g.indptr[0] != 0 {
        return invalid(format!(
            "graph indptr has {} entries for {} nodes",
            g.indptr.len(),
            g.n
        ));
    }
    if g.indptr.windows(2).any(|w| w[0] > w[1]) || g.indptr[g.n] != g.indices.len() {
        return invalid("graph indptr is not a non-decreasing offset array".to_string());
    }
    if g.weights.len() != g.indices.len() {
        return invalid("graph has different numbers of indices and weights".to_string());
    }
    if u32::try_from(g.n).is_err() {
        return invalid(format!(
            "graph has {} nodes, at most 2^32 - 1 supported",
            g.n
        ));
    }
    if let Some(&j) = g.indices.iter().find(|&&j| j as usize >= g.n) {
        return invalid(format!(
            "graph column index {j} out of range for {} nodes",
            g.n
        ));
    }
    if let Some(&w) = g.weights.iter().find(|w| !w.is_finite() || **w < 0.0) {
        return invalid(format!("graph weight {w} is negative or not finite"));
    }
    // Symmetry: compare each entry with the transposed entry (rows may be unsorted).
    let mut entries: Vec<(u32, u32, f64)> = Vec::with_capacity(g.nnz());
    let mut transposed: Vec<(u32, u32, f64)> = Vec::with_capacity(g.nnz());
    for i in 0..g.n {
        let (cols, ws) = g.row(i);
        for (&j, &w) in cols.iter().zip(ws) {
            entries.push((i as u32, j, w));
            transposed.push((j, i as u32, w));
        }
    }
    let by_position = |a: &(u32, u32, f64), b: &(u32, u32, f64)| (a.0, a.1).cmp(&(b.0, b.1));
    entries.sort_unstable_by(by_position);
    transposed.sort_unstable_by(by_position);
    for (a, b) in entries.iter().zip(&transposed) {
        let tolerance = 1e-12 * a.2.abs().max(b.2.abs());
        if (a.0, a.1) != (b.0, b.1) || (a.2 - b.2).abs() > tolerance {
            return invalid(format!(
                "graph is not symmetric: entry ({}, {}) has no matching ({}, {})",
                a.0, a.1, a.1, a.0
            ));
        }
    }
    Ok(())
}

/// Numbers clusters by decreasing size, ties by smallest member (leidenalg's final order).
fn renumber_by_size(membership: &[u32]) -> Vec<u32> {
    let n_clusters = membership.iter().max().map_or(0, |&c| c as usize + 1);
    let mut size = vec![0usize; n_clusters];
    let mut first = vec![usize::MAX; n_clusters];
    for (v, &c) in membership.iter().enumerate() {
        size[c as usize] += 1;
        first[c as usize] = first[c as usize].min(v);
    }
    let mut clusters: Vec<usize> = (0..n_clusters).filter(|&c| size[c] > 0).collect();
    clusters.sort_unstable_by_key(|&c| (std::cmp::Reverse(size[c]), first[c]));
    let mut new_id = vec![0u32; n_clusters];
    for (rank, &c) in clusters.iter().enumerate() {
        new_id[c] = rank as u32;
    }
    membership.iter().map(|&c| new_id[c as usize]).collect()
}

/// Leiden clusters of the weighted undirected graph `g` (symmetric CSR: both directions of
/// each edge stored; self-loops allowed) maximising RB-configuration modularity at
/// `resolution`, as `leidenalg.find_partition(g, RBConfigurationVertexPartition,
/// resolution_parameter=resolution, n_iterations=-1, seed=seed)` computes it (see the module
/// documentation for the exact procedure and how it differs). Returns one cluster id per
/// node, `0..n_clusters`, numbered by decreasing cluster size (ties by smallest member).
/// Deterministic for a given `seed`.
///
/// Errors on a malformed or asymmetric graph, negative or non-finite weights, or a negative or
/// non-finite resolution.
pub fn leiden(g: &CsrGraph, resolution: f64, seed: u64) -> Result<Vec<u32>> {
    if !resolution.is_finite() || resolution < 0.0 {
        return Err(MetricsError::InvalidInput(format!(
            "resolution must be finite and non-negative, got {resolution}"
        )));
    }
    validate(g)?;
    let base = Level::from_csr(g);
    let two_m: f64 = base.degree.iter().sum();
    let scale = if two_m > 0.0 { resolution / two_m } else { 0.0 };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut membership: Vec<u32> = (0..g.n as u32).collect();
    // n_iterations = -1: passes until one improves nothing. Every move gains more than its
    // rounding error while the quality is bounded, so this terminates.
    while optimise_pass(&base, &mut membership, scale, &mut rng) > 0.0 {}
    Ok(renumber_by_size(&membership))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::modularity;

    fn graph_from_edges(n: usize, edges: &[(usize, usize, f64)]) -> CsrGraph {
        let mut rows: Vec<Vec<(u32, f64)>> = vec![Vec::new(); n];
        for &(i, j, w) in edges {
            rows[i].push((j as u32, w));
            if i != j {
                rows[j].push((i as u32, w));
            }
        }
        let mut g = CsrGraph {
            n,
            indptr: vec![0],
            ..Default::default()
        };
        for row in &mut rows {
            row.sort_by_key(|e| e.0);
            g.indices.extend(row.iter().map(|e| e.0));
            g.weights.extend(row.iter().map(|e| e.1));
            g.indptr.push(g.indices.len());
        }
        g
    }

    /// `cliques` cliques of `size` nodes, clique c joined to clique c+1 by one weak edge.
    fn ring_of_cliques(cliques: usize, size: usize) -> CsrGraph {
        let mut edges = Vec::new();
        for c in 0..cliques {
            for a in 0..size {
                for b in a + 1..size {
                    edges.push((c * size + a, c * size + b, 1.0));
                }
            }
            let next = (c + 1) % cliques;
            edges.push((c * size, next * size + 1, 0.1));
        }
        graph_from_edges(cliques * size, &edges)
    }

    #[test]
    fn finds_planted_cliques_numbered_by_size() {
        let g = ring_of_cliques(6, 5);
        for seed in 0..5 {
            let clusters = leiden(&g, 1.0, seed).unwrap();
            for c in 0..6 {
                let ids: Vec<u32> = clusters[c * 5..(c + 1) * 5].to_vec();
                assert!(
                    ids.iter().all(|&x| x == ids[0]),
                    "seed {seed}: {clusters:?}"
                );
            }
            // Equal sizes: numbered by smallest member, i.e. in clique order.
            let expected: Vec<u32> = (0..30).map(|v| (v / 5) as u32).collect();
            assert_eq!(clusters, expected, "seed {seed}");
        }
    }

    #[test]
    fn low_resolution_merges_everything() {
        let g = ring_of_cliques(4, 4);
        let clusters = leiden(&g, 0.0, 1).unwrap();
        assert!(clusters.iter().all(|&c| c == 0), "{clusters:?}");
    }

    #[test]
    fn sizes_order_and_isolated_nodes() {
        // A 4-clique, a 3-clique and an isolated node.
        let mut edges = Vec::new();
        for (a, b) in [
            (3, 4),
            (3, 5),
            (3, 6),
            (4, 5),
            (4, 6),
            (5, 6),
            (0, 1),
            (0, 2),
            (1, 2),
        ] {
            edges.push((a, b, 1.0));
        }
        let g = graph_from_edges(8, &edges);
        let clusters = leiden(&g, 1.0, 7).unwrap();
        assert_eq!(clusters, vec![1, 1, 1, 0, 0, 0, 0, 2]);
    }

    #[test]
    fn not_worse_than_planted_partition_on_random_graph() {
        // Planted partition: 200 nodes, 8 groups, dense inside, sparse across.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let n = 200;
        let mut edges = Vec::new();
        for i in 0..n {
            for j in i + 1..n {
                let p = if i % 8 == j % 8 { 0.3 } else { 0.02 };
                if rng.random::<f64>() < p {
                    edges.push((i, j, 0.5 + rng.random::<f64>()));
                }
            }
        }
        let g = graph_from_edges(n, &edges);
        let planted: Vec<u32> = (0..n as u32).map(|i| i % 8).collect();
        let clusters = leiden(&g, 1.0, 0).unwrap();
        assert!(modularity(&g, &clusters, 1.0) >= modularity(&g, &planted, 1.0) - 1e-12);
        assert_eq!(clusters, leiden(&g, 1.0, 0).unwrap());
    }

    #[test]
    fn rejects_bad_graphs() {
        let asymmetric = CsrGraph {
            n: 2,
            indptr: vec![0, 1, 1],
            indices: vec![1],
            weights: vec![1.0],
        };
        assert!(leiden(&asymmetric, 1.0, 0).is_err());
        let negative = graph_from_edges(2, &[(0, 1, -1.0)]);
        assert!(leiden(&negative, 1.0, 0).is_err());
        let good = graph_from_edges(2, &[(0, 1, 1.0)]);
        assert!(leiden(&good, f64::NAN, 0).is_err());
        assert!(leiden(&good, 1.0, 0).is_ok());
    }
}
