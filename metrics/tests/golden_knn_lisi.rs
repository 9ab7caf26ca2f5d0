//! Exact kNN and LISI against the golden files (scanpy/sklearn 25-NN, scib-metrics `lisi_knn`),
//! plus hand-checked cases.
mod common;

use balans_metrics::knn::{DistanceTiles, exact_knn};
use balans_metrics::lisi::{clisi_score, ilisi_score, lisi};
use balans_metrics::{Codes, Distance, MetricsError, Neighbors};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random_matrix(n: usize, d: usize, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n * d)
        .map(|_| rng.random::<f64>() * 2.0 - 1.0)
        .collect()
}

fn brute_distance(a: &[f64], b: &[f64], distance: Distance) -> f64 {
    match distance {
        Distance::Euclidean => a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y) * (x - y))
            .sum::<f64>()
            .sqrt(),
        Distance::Cosine => {
            let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
            let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
            1.0 - dot / (na * nb)
        }
    }
}

/// Brute-force kNN: all distances, sorted by (distance, index).
fn brute_knn(x: &[f64], d: usize, k: usize, distance: Distance, exclude_self: bool) -> Neighbors {
    let n = x.len() / d;
    let mut indices = Vec::new();
    let mut distances = Vec::new();
    for i in 0..n {
        let mut all: Vec<(f64, u32)> = (0..n)
            .filter(|&j| !(exclude_self && j == i))
            .map(|j| {
                let dist = if i == j {
                    0.0
                } else {
                    brute_distance(&x[i * d..(i + 1) * d], &x[j * d..(j + 1) * d], distance)
                };
                (dist, j as u32)
            })
            .collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for &(dist, j) in &all[..k] {
            indices.push(j);
            distances.push(dist);
        }
    }
    Neighbors {
        n,
        k,
        indices,
        distances,
    }
}

fn assert_same_neighbours(got: &Neighbors, want: &Neighbors, tol: f64) {
    assert_eq!((got.n, got.k), (want.n, want.k));
    assert_eq!(got.indices, want.indices);
    for (a, b) in got.distances.iter().zip(&want.distances) {
        assert!((a - b).abs() <= tol, "distance {a} vs {b}");
    }
}

#[test]
fn knn_matches_brute_force_on_random_data_across_tile_sizes() {
    let (n, d) = (157, 13);
    let x = random_matrix(n, d, 11);
    for distance in [Distance::Euclidean, Distance::Cosine] {
        for exclude_self in [false, true] {
            let want = brute_knn(&x, d, 12, distance, exclude_self);
            let default = exact_knn(&x, d, 12, distance, exclude_self).unwrap();
            assert_same_neighbours(&default, &want, 1e-12);
            // Many small, ragged tiles exercise candidate pruning across tiles.
            let tiled = DistanceTiles::new(&x, d, distance)
                .unwrap()
                .with_blocks(10, 7)
                .knn(12, exclude_self)
                .unwrap();
            assert_same_neighbours(&tiled, &want, 1e-12);
            if !exclude_self {
                assert!((0..n).all(|i| default.indices_of(i)[0] == i as u32));
                assert!((0..n).all(|i| default.distances_of(i)[0] == 0.0));
            }
        }
    }
}

#[test]
fn knn_and_tiles_do_not_depend_on_the_thread_count() {
    let (n, d) = (300, 9);
    let x = random_matrix(n, d, 21);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let tiles = DistanceTiles::new(&x, d, Distance::Cosine)
                .unwrap()
                .with_blocks(32, 40);
            let sums = tiles.map_query_blocks(
                |queries| vec![0.0f64; queries.len()],
                |acc, tile| {
                    for q in tile.queries.clone() {
                        acc[q - tile.queries.start] += tile.row(q).iter().sum::<f64>();
                    }
                },
            );
            (
                tiles.knn(17, true).unwrap(),
                exact_knn(&x, d, 17, Distance::Euclidean, false).unwrap(),
                sums,
            )
        })
    };
    assert_eq!(run(1), run(3));
}

#[test]
fn knn_breaks_distance_ties_by_smaller_index() {
    // Points on a line: row 2 sits between 1 and 3 at equal distance; rows 0 and 4 duplicate.
    let x = [0.0, 1.0, 2.0, 3.0, 0.0];
    let nn = exact_knn(&x, 1, 3, Distance::Euclidean, true).unwrap();
    assert_eq!(nn.indices_of(2), &[1, 3, 0]);
    assert_eq!(nn.distances_of(2), &[1.0, 1.0, 2.0]);
    assert_eq!(nn.indices_of(0), &[4, 1, 2]);
    assert_eq!(nn.indices_of(4), &[0, 1, 2]);
    let with_self = exact_knn(&x, 1, 2, Distance::Euclidean, false).unwrap();
    assert_eq!(with_self.indices_of(4), &[0, 4]);
    assert_eq!(with_self.indices_of(0), &[0, 4]);
    // Cosine: rows 1 and 2 are parallel to row 0 (distance 0), row 3 is orthogonal.
    let y = [1.0, 0.0, 2.0, 0.0, 5.0, 0.0, 0.0, 1.0];
    let cos = exact_knn(&y, 2, 3, Distance::Cosine, true).unwrap();
    assert_eq!(cos.indices_of(0), &[1, 2, 3]);
    assert_eq!(cos.distances_of(0), &[0.0, 0.0, 1.0]);
}

#[test]
fn knn_rejects_bad_input() {
    let x = [1.0, 2.0, f64::NAN, 0.0, 3.0, f64::INFINITY, 1.0, 1.0];
    match exact_knn(&x, 2, 1, Distance::Euclidean, true) {
        Err(MetricsError::NonFinite { count, rows }) => {
            assert_eq!((count, rows), (2, vec![1, 2]));
        }
        other => panic!("expected NonFinite, got {other:?}"),
    }
    let zero_row = [1.0, 2.0, 0.0, 0.0, 3.0, 1.0];
    match exact_knn(&zero_row, 2, 1, Distance::Cosine, true) {
        Err(MetricsError::InvalidInput(msg)) => assert!(msg.contains("row 1"), "{msg}"),
        other => panic!("expected InvalidInput, got {other:?}"),
    }
    assert!(exact_knn(&zero_row, 2, 1, Distance::Euclidean, true).is_ok());
    let ok = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    for (k, exclude_self) in [(0, true), (3, true), (4, false)] {
        assert!(
            matches!(
                exact_knn(&ok, 2, k, Distance::Euclidean, exclude_self),
                Err(MetricsError::InvalidInput(_))
            ),
            "k = {k}"
        );
    }
    assert!(exact_knn(&ok, 2, 3, Distance::Euclidean, false).is_ok());
    assert!(matches!(
        exact_knn(&ok, 4, 1, Distance::Euclidean, true),
        Err(MetricsError::InvalidInput(_))
    ));
    assert!(matches!(
        exact_knn(&ok, 0, 1, Distance::Euclidean, true),
        Err(MetricsError::InvalidInput(_))
    ));
}

#[test]
fn distance_tiles_stream_every_pair_once() {
    let (n, d) = (75, 6);
    let x = random_matrix(n, d, 5);
    for distance in [Distance::Euclidean, Distance::Cosine] {
        let tiles = DistanceTiles::new(&x, d, distance)
            .unwrap()
            .with_blocks(16, 9);
        // Per query row: sum of distances and number of entries seen, in tile order.
        let blocks = tiles.map_query_blocks(
            |queries| vec![(0.0f64, 0usize); queries.len()],
            |acc, tile| {
                for q in tile.queries.clone() {
                    let row = tile.row(q);
                    assert_eq!(row.len(), tile.refs.len());
                    let slot = &mut acc[q - tile.queries.start];
                    slot.0 += row.iter().sum::<f64>();
                    slot.1 += row.len();
                    if tile.refs.contains(&q) {
                        assert_eq!(row[q - tile.refs.start], 0.0);
                    }
                }
            },
        );
        let per_row: Vec<(f64, usize)> = blocks.into_iter().flatten().collect();
        assert_eq!(per_row.len(), n);
        for (i, &(sum, count)) in per_row.iter().enumerate() {
            assert_eq!(count, n);
            let brute: f64 = (0..n)
                .filter(|&j| j != i)
                .map(|j| brute_distance(&x[i * d..(i + 1) * d], &x[j * d..(j + 1) * d], distance))
                .sum();
            assert!((sum - brute).abs() < 1e-10, "row {i}: {sum} vs {brute}");
            assert!(
                (tiles.pair_distance(i, (i + 1) % n)
                    - brute_distance(
                        &x[i * d..(i + 1) * d],
                        &x[((i + 1) % n) * d..((i + 1) % n + 1) * d],
                        distance
                    ))
                .abs()
                    < 1e-13
            );
        }
    }
}

#[test]
fn lisi_hand_checked_cases() {
    // Row 0's neighbours: 1 and 2 (equal distance, different categories) and itself (masked).
    let nn = Neighbors {
        n: 3,
        k: 3,
        indices: vec![0, 1, 2, 1, 0, 2, 2, 0, 1],
        distances: vec![0.0, 0.5, 0.5, 0.0, 0.5, 0.5, 0.0, 0.2, 0.9],
    };
    let codes = [0, 0, 1];
    let per_row = lisi(&nn, &codes, 2, 1.5).unwrap();
    // Two neighbours, equal weights, categories {0, 1}: 1 / (0.5^2 + 0.5^2).
    assert!((per_row[0] - 2.0).abs() < 1e-12);
    // Row 1: neighbours 0 (code 0) and 2 (code 1) at equal distance.
    assert!((per_row[1] - 2.0).abs() < 1e-12);
    // Row 2: neighbours 0 and 1 are both code 0.
    assert!((per_row[2] - 1.0).abs() < 1e-12);
    // Only itself as neighbour: the kernel vanishes, scib-metrics' sentinel -1.
    let lonely = Neighbors {
        n: 2,
        k: 1,
        indices: vec![0, 0],
        distances: vec![0.0, 0.3],
    };
    let per_row = lisi(&lonely, &[0, 1], 2, 30.0).unwrap();
    assert_eq!(per_row[0], -1.0);
    assert_eq!(per_row[1], 1.0);
    assert_eq!(ilisi_score(&[1.0, 3.0, f64::NAN, 2.0], 3), 0.5);
    assert_eq!(clisi_score(&[1.0, 3.0, f64::NAN, 2.0], 3), 0.5);
    assert!(ilisi_score(&[1.0], 1).is_nan());
    assert!(lisi(&nn, &[0, 0], 2, 30.0).is_err());
    assert!(lisi(&nn, &[0, 0, 2], 2, 30.0).is_err());
    assert!(lisi(&nn, &codes, 2, 0.0).is_err());
}

#[test]
fn golden_knn25_cosine_matches_scanpy_exactly() {
    for folder in common::FOLDERS {
        let emb = common::load(folder);
        let n = emb.cell_rows.len();
        let nn = exact_knn(&emb.cells, emb.d, 25, Distance::Cosine, false).unwrap();
        let golden = common::read_parquet(&common::golden(folder, "knn25_cosine.parquet"));
        let nn_cols: Vec<Vec<i64>> = (1..=24)
            .map(|c| common::col_i64(&golden, &format!("nn_{c}")))
            .collect();
        let dist_cols: Vec<Vec<f64>> = (1..=24)
            .map(|c| common::col_f64(&golden, &format!("dist_{c}")))
            .collect();
        assert_eq!(
            common::col_i64(&golden, "cell"),
            (0..n as i64).collect::<Vec<_>>()
        );
        let mut worst = 0.0f64;
        for i in 0..n {
            let others: Vec<(u32, f64)> = nn
                .indices_of(i)
                .iter()
                .zip(nn.distances_of(i))
                .filter(|&(&j, _)| j as usize != i)
                .map(|(&j, &dist)| (j, dist))
                .collect();
            assert_eq!(
                others.len(),
                24,
                "{folder} cell {i}: self not among its 25-NN"
            );
            for (c, &(j, dist)) in others.iter().enumerate() {
                assert_eq!(
                    i64::from(j),
                    nn_cols[c][i],
                    "{folder} cell {i} nn_{}",
                    c + 1
                );
                worst = worst.max((dist - dist_cols[c][i]).abs());
            }
        }
        assert!(worst <= 1e-12, "{folder}: distance error {worst:e}");
    }
}

#[test]
fn golden_lisi_matches_scib_metrics() {
    for folder in common::FOLDERS {
        let emb = common::load(folder);
        let nn = exact_knn(&emb.cells, emb.d, 90, Distance::Cosine, true).unwrap();
        let per_cell = common::read_parquet(&common::golden(folder, "per_cell.parquet"));
        let metrics = common::metrics_json(folder);
        let batches = Codes::from_strings(&emb.cell_batch);
        let labels = Codes::from_strings(&emb.cell_label);
        for (name, codes, column) in [("ilisi", &batches, "ilisi"), ("clisi", &labels, "clisi")] {
            let got = lisi(&nn, &codes.codes, codes.n_categories(), 30.0).unwrap();
            let want = common::col_f64(&per_cell, column);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| ((a - b) / b).abs())
                .fold(0.0f64, f64::max);
            assert!(
                worst <= 1e-4,
                "{folder} {name}: per-cell relative error {worst:e}"
            );
            let score = if name == "ilisi" {
                ilisi_score(&got, codes.n_categories())
            } else {
                clisi_score(&got, codes.n_categories())
            };
            let golden = metrics[name].as_f64().unwrap();
            assert!(
                (score - golden).abs() <= 1e-4,
                "{folder} {name}: {score} vs {golden}"
            );
        }
    }
}

/// User + system CPU seconds of this process (Linux `/proc`; NaN elsewhere).
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the command name; utime and stime are the 12th and 13th, in clock ticks.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Scale check (run with `--ignored --nocapture`): n x 300 (n = 20k, or `$BALANS_KNN_SCALE_N`),
/// k = 90, timed; a sample of rows checked against brute force.
#[test]
#[ignore]
fn knn_scale_by_300() {
    let n = std::env::var("BALANS_KNN_SCALE_N").map_or(20_000, |v| v.parse().unwrap());
    let (d, k) = (300, 90);
    let x = random_matrix(n, d, 3);
    for distance in [Distance::Cosine, Distance::Euclidean] {
        let (start, cpu_start) = (std::time::Instant::now(), process_cpu_seconds());
        let nn = exact_knn(&x, d, k, distance, true).unwrap();
        eprintln!(
            "{distance:?}: {n} x {d}, k = {k}: wall {:.2?}, process CPU {:.1} s",
            start.elapsed(),
            process_cpu_seconds() - cpu_start
        );
        for i in (0..n).step_by(997) {
            let mut all: Vec<(f64, u32)> = (0..n)
                .filter(|&j| j != i)
                .map(|j| {
                    let dist =
                        brute_distance(&x[i * d..(i + 1) * d], &x[j * d..(j + 1) * d], distance);
                    (dist, j as u32)
                })
                .collect();
            all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let want: Vec<u32> = all[..k].iter().map(|&(_, j)| j).collect();
            assert_eq!(nn.indices_of(i), &want[..], "row {i}");
        }
    }
}
