//! Tests of the 2-D layouts: UMAP on a kNN graph of separated blobs, PCA against a hand-computed
//! example.

use std::collections::BTreeMap;
use std::time::Instant;

use balans_metrics::layout::{pca_2d, umap_layout};
use balans_metrics::{CsrGraph, MetricsError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Row-major points of `n_blobs` Gaussian blobs in `d` dimensions (unit noise, centres 20 apart
/// along distinct axes), with each point's blob.
fn blobs(n_blobs: usize, per_blob: usize, d: usize, seed: u64) -> (Vec<f64>, Vec<usize>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut x = Vec::with_capacity(n_blobs * per_blob * d);
    let mut label = Vec::with_capacity(n_blobs * per_blob);
    for blob in 0..n_blobs {
        for _ in 0..per_blob {
            for c in 0..d {
                // Sum of 4 uniforms: a bell-shaped noise with variance 4/3.
                let noise: f64 = (0..4).map(|_| rng.random_range(-1.0..1.0)).sum();
                let centre = if c == blob % d { 20.0 } else { 0.0 };
                x.push(centre + noise);
            }
            label.push(blob);
        }
    }
    (x, label)
}

/// Brute-force `k` nearest neighbours (Euclidean, self excluded): `(index, distance)` per row.
fn knn(x: &[f64], d: usize, k: usize) -> Vec<Vec<(usize, f64)>> {
    let n = x.len() / d;
    (0..n)
        .map(|i| {
            let mut all: Vec<(usize, f64)> = (0..n)
                .filter(|&j| j != i)
                .map(|j| {
                    let dist2: f64 = (0..d).map(|c| (x[i * d + c] - x[j * d + c]).powi(2)).sum();
                    (j, dist2.sqrt())
                })
                .collect();
            all.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
            all.truncate(k);
            all
        })
        .collect()
}

/// A UMAP-like fuzzy graph: `exp(-(d - rho) / sigma)` per directed kNN edge (rho the nearest
/// distance, sigma the mean excess), symmetrised by fuzzy union `a + b - ab`.
fn fuzzy_knn_graph(x: &[f64], d: usize, k: usize) -> CsrGraph {
    let n = x.len() / d;
    let mut entries: BTreeMap<(usize, usize), (f64, f64)> = BTreeMap::new();
    for (i, neighbours) in knn(x, d, k).into_iter().enumerate() {
        let rho = neighbours[0].1;
        let sigma = neighbours.iter().map(|(_, dist)| dist - rho).sum::<f64>() / k as f64 + 1e-6;
        for (j, dist) in neighbours {
            let w = (-(dist - rho) / sigma).exp();
            entries.entry((i, j)).or_default().0 = w;
            entries.entry((j, i)).or_default().1 = w;
        }
    }
    let mut graph = CsrGraph {
        n,
        indptr: vec![0; n + 1],
        indices: Vec::new(),
        weights: Vec::new(),
    };
    for (&(i, j), &(forward, backward)) in &entries {
        graph.indptr[i + 1] += 1;
        graph.indices.push(j as u32);
        graph.weights.push(forward + backward - forward * backward);
    }
    for i in 0..n {
        graph.indptr[i + 1] += graph.indptr[i];
    }
    graph
}

/// Fraction of each point's `k` nearest 2-D neighbours that share its label.
fn knn_purity(layout: &[[f64; 2]], label: &[usize], k: usize) -> f64 {
    let flat: Vec<f64> = layout.iter().flatten().copied().collect();
    let neighbours = knn(&flat, 2, k);
    let same: usize = neighbours
        .iter()
        .enumerate()
        .map(|(i, nn)| nn.iter().filter(|(j, _)| label[*j] == label[i]).count())
        .sum();
    same as f64 / (layout.len() * k) as f64
}

#[test]
fn umap_keeps_separated_blobs_separated() {
    let (x, label) = blobs(4, 60, 8, 7);
    let graph = fuzzy_knn_graph(&x, 8, 10);
    let layout = umap_layout(&graph, 200, 42).unwrap();
    assert_eq!(layout.len(), 240);
    assert!(layout.iter().flatten().all(|v| v.is_finite()));
    let purity = knn_purity(&layout, &label, 10);
    assert!(purity > 0.98, "2-D kNN purity {purity}");

    // Each blob's centroid lies farther from the others than the blob's own spread.
    let centroid = |b: usize| {
        let members: Vec<&[f64; 2]> = layout
            .iter()
            .zip(&label)
            .filter(|(_, l)| **l == b)
            .map(|(p, _)| p)
            .collect();
        let m = members.len() as f64;
        let c = [
            members.iter().map(|p| p[0]).sum::<f64>() / m,
            members.iter().map(|p| p[1]).sum::<f64>() / m,
        ];
        let spread = members
            .iter()
            .map(|p| ((p[0] - c[0]).powi(2) + (p[1] - c[1]).powi(2)).sqrt())
            .fold(0.0, f64::max);
        (c, spread)
    };
    let stats: Vec<([f64; 2], f64)> = (0..4).map(centroid).collect();
    for a in 0..4 {
        for b in a + 1..4 {
            let gap = ((stats[a].0[0] - stats[b].0[0]).powi(2)
                + (stats[a].0[1] - stats[b].0[1]).powi(2))
            .sqrt();
            assert!(
                gap > stats[a].1.max(stats[b].1),
                "blobs {a} and {b}: centroid gap {gap}, spreads {} {}",
                stats[a].1,
                stats[b].1
            );
        }
    }
}

#[test]
fn umap_is_deterministic_per_seed() {
    let (x, _) = blobs(3, 40, 5, 3);
    let graph = fuzzy_knn_graph(&x, 5, 8);
    let bits = |layout: Vec<[f64; 2]>| -> Vec<u64> {
        layout.iter().flatten().map(|v| v.to_bits()).collect()
    };
    let first = bits(umap_layout(&graph, 100, 11).unwrap());
    let again = bits(umap_layout(&graph, 100, 11).unwrap());
    let other_seed = bits(umap_layout(&graph, 100, 12).unwrap());
    assert_eq!(first, again);
    assert_ne!(first, other_seed);
}

#[test]
fn umap_handles_a_two_node_graph() {
    let graph = CsrGraph {
        n: 2,
        indptr: vec![0, 1, 2],
        indices: vec![1, 0],
        weights: vec![1.0, 1.0],
    };
    let layout = umap_layout(&graph, 50, 0).unwrap();
    assert!(layout.iter().flatten().all(|v| v.is_finite()));
}

#[test]
fn umap_rejects_bad_graphs() {
    let good = CsrGraph {
        n: 3,
        indptr: vec![0, 1, 2, 2],
        indices: vec![1, 0],
        weights: vec![0.5, 0.5],
    };
    assert!(umap_layout(&good, 10, 0).is_ok());
    assert!(matches!(
        umap_layout(&good, 0, 0),
        Err(MetricsError::InvalidInput(_))
    ));
    let cases = [
        CsrGraph {
            n: 1,
            indptr: vec![0, 0],
            ..Default::default()
        },
        CsrGraph {
            indptr: vec![0, 1, 2],
            ..good.clone()
        },
        CsrGraph {
            indices: vec![1, 3],
            ..good.clone()
        },
        CsrGraph {
            weights: vec![0.5, -0.5],
            ..good.clone()
        },
        CsrGraph {
            weights: vec![0.5, f64::NAN],
            ..good.clone()
        },
        CsrGraph {
            weights: vec![0.0, 0.0],
            ..good.clone()
        },
        CsrGraph {
            indptr: vec![0, 2, 1, 2],
            ..good.clone()
        },
    ];
    for (case, graph) in cases.iter().enumerate() {
        assert!(
            matches!(
                umap_layout(graph, 10, 0),
                Err(MetricsError::InvalidInput(_))
            ),
            "case {case} accepted"
        );
    }
}

/// Timing at the target scale (100k nodes, 25 neighbours, 200 epochs); run with `--ignored`.
#[test]
#[ignore]
fn umap_timing_100k() {
    let n = 100_000;
    let k = 25;
    let cluster = 1000;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut entries: BTreeMap<(u32, u32), f64> = BTreeMap::new();
    for i in 0..n {
        let base = i / cluster * cluster;
        for rank in 0..k {
            let j = base + rng.random_range(0..cluster);
            if j != i {
                // UMAP-like membership strengths: exp decay with the neighbour's rank, fuzzy union.
                let w = (-(rank as f64) / 4.1).exp();
                for key in [(i as u32, j as u32), (j as u32, i as u32)] {
                    let e = entries.entry(key).or_insert(0.0);
                    *e = *e + w - *e * w;
                }
            }
        }
    }
    let mut graph = CsrGraph {
        n,
        indptr: vec![0; n + 1],
        ..Default::default()
    };
    for (&(i, j), &w) in &entries {
        graph.indptr[i as usize + 1] += 1;
        graph.indices.push(j);
        graph.weights.push(w);
    }
    for i in 0..n {
        graph.indptr[i + 1] += graph.indptr[i];
    }
    let start = Instant::now();
    let layout = umap_layout(&graph, 200, 0).unwrap();
    println!(
        "umap_layout: {n} nodes, {} stored entries, 200 epochs: {:.1} s",
        graph.nnz(),
        start.elapsed().as_secs_f64()
    );
    assert_eq!(layout.len(), n);
}

#[test]
fn pca_matches_a_hand_computed_example() {
    // x = mean + s1 * v1 + s2 * v2 with orthonormal v1, v2 and centred, orthogonal s1, s2.
    let mean = [1.0, 2.0, 3.0];
    let v1 = [0.6, 0.8, 0.0];
    let v2 = [-0.8, 0.6, 0.0];
    let s1 = [2.0, -2.0, 0.0, 0.0];
    let s2 = [0.0, 0.0, 1.0, -1.0];
    let x: Vec<f64> = (0..4)
        .flat_map(|i| (0..3).map(move |c| mean[c] + s1[i] * v1[c] + s2[i] * v2[c]))
        .collect();
    let scores = pca_2d(&x, 3).unwrap();
    // PC1 = v1 (largest loading 0.8 already positive); PC2 = -v2 (its largest loading -0.8 is
    // flipped to positive), so the second scores are -s2.
    for i in 0..4 {
        assert!((scores[i][0] - s1[i]).abs() < 1e-12, "{scores:?}");
        assert!((scores[i][1] + s2[i]).abs() < 1e-12, "{scores:?}");
    }
}

#[test]
fn pca_is_deterministic_and_blocked_over_many_rows() {
    let (x, label) = blobs(3, 1500, 6, 5);
    let first = pca_2d(&x, 6).unwrap();
    let again = pca_2d(&x, 6).unwrap();
    assert_eq!(first, again);
    assert_eq!(first.len(), 4500);
    // The two leading components separate the three blobs.
    assert!(
        knn_purity(
            &first[..1500 * 3]
                .iter()
                .step_by(15)
                .copied()
                .collect::<Vec<_>>(),
            &label.iter().step_by(15).copied().collect::<Vec<_>>(),
            5
        ) > 0.99
    );
    // Scores are centred.
    let mean0: f64 = first.iter().map(|p| p[0]).sum::<f64>() / 4500.0;
    assert!(mean0.abs() < 1e-9);
}

#[test]
fn pca_rejects_bad_input() {
    assert!(matches!(
        pca_2d(&[1.0, 2.0, 3.0], 1),
        Err(MetricsError::InvalidInput(_))
    ));
    assert!(matches!(
        pca_2d(&[1.0, 2.0, 3.0], 2),
        Err(MetricsError::InvalidInput(_))
    ));
    assert!(matches!(
        pca_2d(&[1.0, 2.0], 2),
        Err(MetricsError::InvalidInput(_))
    ));
    assert!(matches!(
        pca_2d(&[1.0, 2.0, f64::NAN, 0.0, 1.0, 1.0], 2),
        Err(MetricsError::NonFinite { count: 1, .. })
    ));
}
