//! UMAP connectivities, graph connectivity and kBET against the golden files
//! (`shared/golden/metrics/<folder>/`).
mod common;

use balans_metrics::graph::{graph_connectivity, umap_connectivities};
use balans_metrics::kbet::kbet_per_label;
use balans_metrics::{Codes, Neighbors};

/// The golden 25-NN (`knn25_cosine.parquet`: 24 other neighbours) with the row itself
/// prepended at distance 0, as scanpy passes it to umap (k = 25).
fn golden_neighbors(folder: &str) -> Neighbors {
    let table = common::read_parquet(&common::golden(folder, "knn25_cosine.parquet"));
    let cells = common::col_i64(&table, "cell");
    let others: Vec<Vec<i64>> = (1..=24)
        .map(|c| common::col_i64(&table, &format!("nn_{c}")))
        .collect();
    let distances: Vec<Vec<f64>> = (1..=24)
        .map(|c| common::col_f64(&table, &format!("dist_{c}")))
        .collect();
    let n = cells.len();
    let k = 25;
    let mut nn = Neighbors {
        n,
        k,
        indices: Vec::with_capacity(n * k),
        distances: Vec::with_capacity(n * k),
    };
    for (i, &cell) in cells.iter().enumerate() {
        assert_eq!(cell, i as i64);
        nn.indices.push(i as u32);
        nn.distances.push(0.0);
        for c in 0..24 {
            nn.indices.push(u32::try_from(others[c][i]).unwrap());
            nn.distances.push(distances[c][i]);
        }
    }
    nn
}

/// Label and batch codes of the cells (codes in sorted name order, as `np.unique` orders
/// labels), and the golden `per_label.parquet` rows matched to the label codes.
struct CellCodes {
    labels: Codes,
    batches: Codes,
}

fn cell_codes(folder: &str) -> CellCodes {
    let per_cell = common::read_parquet(&common::golden(folder, "per_cell.parquet"));
    CellCodes {
        labels: Codes::from_strings(&common::col_str(&per_cell, "label")),
        batches: Codes::from_strings(&common::col_str(&per_cell, "batch")),
    }
}

/// A `per_label.parquet` column, reordered by label code.
fn per_label_column(folder: &str, labels: &Codes, column: &str) -> Vec<f64> {
    let table = common::read_parquet(&common::golden(folder, "per_label.parquet"));
    let names = common::col_str(&table, "label");
    let values = common::col_f64(&table, column);
    labels
        .names
        .iter()
        .map(|name| {
            let row = names.iter().position(|n| n == name).unwrap();
            values[row]
        })
        .collect()
}

#[test]
fn umap_connectivities_match_scanpy() {
    for folder in ["bbbc021_preprocessed", "bbbc021_combat", "bbbc021_harmony"] {
        let graph = umap_connectivities(&golden_neighbors(folder)).unwrap();
        let coo = common::read_parquet(&common::golden(folder, "connectivities_umap.parquet"));
        let (gi, gj, gw) = (
            common::col_i64(&coo, "i"),
            common::col_i64(&coo, "j"),
            common::col_f64(&coo, "weight"),
        );
        assert_eq!(graph.nnz(), gi.len(), "{folder}: entry count");
        let mut worst = 0.0_f64;
        let mut differing = 0;
        let mut e = 0;
        for i in 0..graph.n {
            let (cols, weights) = graph.row(i);
            for (&j, &w) in cols.iter().zip(weights) {
                assert_eq!(
                    (gi[e], gj[e]),
                    (i as i64, i64::from(j)),
                    "{folder}: entry {e}"
                );
                worst = worst.max((w - gw[e]).abs());
                differing += usize::from(w != gw[e]);
                e += 1;
            }
        }
        assert!(worst <= 1e-5, "{folder}: max weight difference {worst}");
        // float32 reproduction: all but a handful of entries are bit-identical.
        assert!(
            differing * 100 <= graph.nnz(),
            "{folder}: {differing} entries differ"
        );
        eprintln!(
            "{folder}: {} entries, {differing} not bit-identical, max |dw| = {worst:e}",
            graph.nnz()
        );
    }
}

#[test]
fn graph_connectivity_matches_scib() {
    for folder in common::FOLDERS {
        let codes = cell_codes(folder);
        let graph = umap_connectivities(&golden_neighbors(folder)).unwrap();
        let result =
            graph_connectivity(&graph, &codes.labels.codes, codes.labels.n_categories()).unwrap();
        let expected = per_label_column(folder, &codes.labels, "graph_connectivity");
        assert_eq!(result.per_label, expected, "{folder}");
        let score = common::metrics_json(folder)["graph_connectivity"]
            .as_f64()
            .unwrap();
        assert!(
            (result.score - score).abs() < 1e-12,
            "{folder}: {} vs {score}",
            result.score
        );
    }
}

#[test]
fn kbet_matches_scib_metrics() {
    for folder in common::FOLDERS {
        let codes = cell_codes(folder);
        let nn = golden_neighbors(folder);
        let result = kbet_per_label(&nn, &codes.batches.codes, &codes.labels.codes, 0.05).unwrap();
        let expected = per_label_column(folder, &codes.labels, "kbet");
        for (c, (&got, &want)) in result.per_label.iter().zip(&expected).enumerate() {
            let name = &codes.labels.names[c];
            assert_eq!(
                got.is_nan(),
                want.is_nan(),
                "{folder} / {name}: {got} vs {want}"
            );
            if !want.is_nan() {
                assert!(
                    (got - want).abs() <= 0.02,
                    "{folder} / {name}: {got} vs {want}"
                );
            }
        }
        let score = common::metrics_json(folder)["kbet"].as_f64().unwrap();
        eprintln!("{folder}: kBET {} vs {score}", result.score);
        assert!(
            (result.score - score).abs() <= 0.02,
            "{folder}: {} vs {score}",
            result.score
        );
    }
}
