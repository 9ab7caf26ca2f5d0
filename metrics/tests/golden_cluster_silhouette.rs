//! Silhouettes, NMI/ARI and Leiden against the golden values of `shared/golden/metrics/`.

mod common;

use balans_metrics::cluster::{ari, modularity, nmi};
use balans_metrics::leiden::leiden;
use balans_metrics::silhouette::{silhouette_batch, silhouette_label, silhouette_samples};
use balans_metrics::{Codes, CsrGraph, Distance};

/// Asserts `|a - b| <= tol`, with NaN matching only NaN.
fn assert_close(what: &str, got: f64, expected: f64, tol: f64) {
    if expected.is_nan() {
        assert!(got.is_nan(), "{what}: got {got}, expected NaN");
    } else {
        assert!(
            (got - expected).abs() <= tol,
            "{what}: got {got}, expected {expected} (diff {:e})",
            (got - expected).abs()
        );
    }
}

fn metric(folder: &str, key: &str) -> f64 {
    common::metrics_json(folder)[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{folder}: no {key}"))
}

#[test]
fn silhouettes_match_golden() {
    for folder in common::FOLDERS {
        let emb = common::load(folder);
        let labels = Codes::from_strings(&emb.cell_label);
        let batches = Codes::from_strings(&emb.cell_batch);
        let per_cell = common::read_parquet(&common::golden(folder, "per_cell.parquet"));
        let per_label = common::read_parquet(&common::golden(folder, "per_label.parquet"));
        let n = emb.cell_rows.len();
        assert_eq!(per_cell.num_rows(), n);
        assert_eq!(common::col_str(&per_cell, "label"), emb.cell_label);

        let s = silhouette_samples(&emb.cells, emb.d, &labels.codes, Distance::Cosine).unwrap();
        let golden_s = common::col_f64(&per_cell, "silhouette_label_sample");
        for (i, (&got, &expected)) in s.iter().zip(&golden_s).enumerate() {
            assert_close(
                &format!("{folder} cell {i} silhouette"),
                got,
                expected,
                1e-10,
            );
        }
        let label_score =
            silhouette_label(&emb.cells, emb.d, &labels.codes, Distance::Cosine).unwrap();
        assert_close(
            &format!("{folder} silhouette_label"),
            label_score,
            metric(folder, "silhouette_label"),
            1e-10,
        );

        let batch = silhouette_batch(
            &emb.cells,
            emb.d,
            &batches.codes,
            &labels.codes,
            Distance::Cosine,
        )
        .unwrap();
        assert_close(
            &format!("{folder} silhouette_batch"),
            batch.score,
            metric(folder, "silhouette_batch"),
            1e-10,
        );
        let golden_rows = common::col_f64(&per_cell, "silhouette_batch_sample");
        for (i, (&got, &expected)) in batch.per_row.iter().zip(&golden_rows).enumerate() {
            assert_close(
                &format!("{folder} cell {i} silhouette_batch"),
                got,
                expected,
                1e-10,
            );
        }
        let golden_labels = common::col_str(&per_label, "label");
        assert_eq!(golden_labels, labels.names, "{folder}: per_label order");
        let golden_per_label = common::col_f64(&per_label, "silhouette_batch");
        assert_eq!(batch.per_label.len(), golden_per_label.len());
        for (name, (&got, &expected)) in labels
            .names
            .iter()
            .zip(batch.per_label.iter().zip(&golden_per_label))
        {
            assert_close(&format!("{folder} label {name}"), got, expected, 1e-10);
        }
    }
}

#[test]
fn nmi_ari_of_golden_leiden_match() {
    for folder in common::FOLDERS {
        let per_cell = common::read_parquet(&common::golden(folder, "per_cell.parquet"));
        let labels = Codes::from_strings(&common::col_str(&per_cell, "label")).codes;
        let clusters: Vec<u32> = common::col_i64(&per_cell, "leiden")
            .iter()
            .map(|&c| u32::try_from(c).unwrap())
            .collect();
        let got_nmi = nmi(&labels, &clusters).unwrap();
        let got_ari = ari(&labels, &clusters).unwrap();
        assert_close(
            &format!("{folder} nmi"),
            got_nmi,
            metric(folder, "nmi"),
            1e-12,
        );
        assert_close(
            &format!("{folder} ari"),
            got_ari,
            metric(folder, "ari"),
            1e-12,
        );
        // Both scores are symmetric in their arguments.
        assert_close(
            "nmi symmetry",
            nmi(&clusters, &labels).unwrap(),
            got_nmi,
            1e-12,
        );
        assert_close(
            "ari symmetry",
            ari(&clusters, &labels).unwrap(),
            got_ari,
            1e-12,
        );
    }
}

/// The golden UMAP connectivities (COO, symmetric, sorted by (i, j)) as a CSR graph.
fn golden_graph(folder: &str, n: usize) -> CsrGraph {
    let coo = common::read_parquet(&common::golden(folder, "connectivities_umap.parquet"));
    let i = common::col_i64(&coo, "i");
    let j = common::col_i64(&coo, "j");
    let weights = common::col_f64(&coo, "weight");
    let mut indptr = vec![0usize; n + 1];
    for &row in &i {
        indptr[usize::try_from(row).unwrap() + 1] += 1;
    }
    for r in 0..n {
        indptr[r + 1] += indptr[r];
    }
    assert!(i.windows(2).all(|w| w[0] <= w[1]), "COO sorted by row");
    CsrGraph {
        n,
        indptr,
        indices: j.iter().map(|&c| u32::try_from(c).unwrap()).collect(),
        weights,
    }
}

const BBBC021: [&str; 3] = ["bbbc021_preprocessed", "bbbc021_combat", "bbbc021_harmony"];

#[test]
fn leiden_on_golden_graphs_matches_reference_quality() {
    let mut failures = Vec::new();
    for folder in BBBC021 {
        let per_cell = common::read_parquet(&common::golden(folder, "per_cell.parquet"));
        let labels = Codes::from_strings(&common::col_str(&per_cell, "label")).codes;
        let golden_clusters: Vec<u32> = common::col_i64(&per_cell, "leiden")
            .iter()
            .map(|&c| u32::try_from(c).unwrap())
            .collect();
        let g = golden_graph(folder, labels.len());
        let golden_q = modularity(&g, &golden_clusters, 1.0);
        let golden_nmi = metric(folder, "nmi");
        let golden_ari = metric(folder, "ari");
        for seed in 0..5 {
            let clusters = leiden(&g, 1.0, seed).unwrap();
            let q = modularity(&g, &clusters, 1.0);
            let got_nmi = nmi(&labels, &clusters).unwrap();
            let got_ari = ari(&labels, &clusters).unwrap();
            let n_clusters = clusters.iter().max().unwrap() + 1;
            println!(
                "{folder} seed {seed}: Q {q:.5} (golden {golden_q:.5}), {n_clusters} clusters, \
                 NMI {got_nmi:.4} (golden {golden_nmi:.4}), ARI {got_ari:.4} (golden {golden_ari:.4})"
            );
            if q < golden_q - 0.01 {
                failures.push(format!(
                    "{folder} seed {seed}: modularity {q} < {golden_q} - 0.01"
                ));
            }
            if (got_nmi - golden_nmi).abs() > 0.03 {
                failures.push(format!(
                    "{folder} seed {seed}: NMI {got_nmi} vs {golden_nmi}"
                ));
            }
            if (got_ari - golden_ari).abs() > 0.03 {
                failures.push(format!(
                    "{folder} seed {seed}: ARI {got_ari} vs {golden_ari}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn leiden_is_deterministic_for_a_seed() {
    let folder = BBBC021[0];
    let per_cell = common::read_parquet(&common::golden(folder, "per_cell.parquet"));
    let g = golden_graph(folder, per_cell.num_rows());
    let first = leiden(&g, 1.0, 42).unwrap();
    assert_eq!(first, leiden(&g, 1.0, 42).unwrap());
    // Numbered by decreasing size.
    let mut sizes = vec![0usize; *first.iter().max().unwrap() as usize + 1];
    for &c in &first {
        sizes[c as usize] += 1;
    }
    assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "{sizes:?}");
}
