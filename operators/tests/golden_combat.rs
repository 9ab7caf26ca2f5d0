//! ComBat against scanpy's `pp.combat` (`shared/golden/combat/`, see its README): parameters
//! to 1e-10 relative, corrected tables to 1e-8 (the same fixed-point iteration and stopping
//! rule, fed the same float64 inputs).

mod common;

use std::collections::BTreeMap;

use balans_operators::kernels::combat::{BatchMoments, ComBatModel, fit_combat};
use common::{f64_col, feature_names, i64_col, read, row_major, str_col};
use datafusion::arrow::array::RecordBatch;

/// Features (row-major f64), batch codes (sorted batch names, scanpy's order) and names.
fn load(rel: &str) -> (Vec<f64>, Vec<usize>, Vec<String>, Vec<String>, usize) {
    let b = read(rel);
    let features = feature_names(&b);
    let n = b.num_rows();
    let x = row_major(&b, &features);
    let keys = str_col(&b, "Metadata_Batch");
    let mut names: Vec<String> = keys.clone();
    names.sort();
    names.dedup();
    let batch = keys
        .iter()
        .map(|k| names.binary_search(k).unwrap())
        .collect();
    (x, batch, names, features, n)
}

fn fit(x: &[f64], batch: &[usize], names: &[String], d: usize) -> ComBatModel {
    let mut moments = BatchMoments::new(names.len(), d);
    for (row, &b) in x.chunks(d).zip(batch) {
        moments.add_row(b, row);
    }
    fit_combat(&moments, names).unwrap()
}

fn close(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= tol * want.abs().max(1.0)
}

fn check(tag: &str, input: &str) {
    let (x, batch, names, features, n) = load(input);
    let d = features.len();
    let model = fit(&x, &batch, &names, d);
    // Per feature.
    let pf = read(&format!(
        "golden/combat/{tag}_combat_params_per_feature.parquet"
    ));
    let fi: BTreeMap<String, usize> = features.iter().cloned().zip(0..).collect();
    let pf_names = str_col(&pf, "feature");
    for (name, (vp, gm)) in pf_names.iter().zip(
        f64_col(&pf, "var_pooled")
            .into_iter()
            .zip(f64_col(&pf, "grand_mean")),
    ) {
        let f = fi[name];
        assert!(
            close(model.var_pooled[f], vp, 1e-10),
            "{tag} {name} var_pooled"
        );
        assert!(
            close(model.grand_mean[f], gm, 1e-10),
            "{tag} {name} grand_mean"
        );
    }
    // Per batch and feature.
    let pb: RecordBatch = read(&format!(
        "golden/combat/{tag}_combat_params_per_batch.parquet"
    ));
    let (pb_batch, pb_feature) = (str_col(&pb, "batch"), str_col(&pb, "feature"));
    let n_batch = i64_col(&pb, "n_batch");
    let col = |c: &str| f64_col(&pb, c);
    let (gh, dh, gbar, t2, a, bp, gs, ds) = (
        col("gamma_hat"),
        col("delta_hat"),
        col("gamma_bar"),
        col("t2"),
        col("a_prior"),
        col("b_prior"),
        col("gamma_star"),
        col("delta_star"),
    );
    for r in 0..pb.num_rows() {
        let b = names.binary_search(&pb_batch[r]).unwrap();
        let f = fi[&pb_feature[r]];
        let e = &model.batches[b];
        let what = format!("{tag} {} {}", pb_batch[r], pb_feature[r]);
        assert_eq!(e.n as i64, n_batch[r], "{what}");
        for (got, want, name, tol) in [
            (e.gamma_hat[f], gh[r], "gamma_hat", 1e-10),
            (e.delta_hat[f], dh[r], "delta_hat", 1e-10),
            (e.gamma_bar, gbar[r], "gamma_bar", 1e-10),
            (e.t2, t2[r], "t2", 1e-10),
            (e.a_prior, a[r], "a", 1e-10),
            (e.b_prior, bp[r], "b", 1e-10),
            (e.gamma_star[f], gs[r], "gamma_star", 1e-8),
            (e.delta_star[f], ds[r], "delta_star", 1e-8),
        ] {
            assert!(close(got, want, tol), "{what} {name}: {got} vs {want}");
        }
    }
    // The corrected table.
    let golden = read(&format!("golden/combat/{tag}_combat.parquet"));
    let mut out = vec![0.0; d];
    let mut worst = 0.0f64;
    let cols: Vec<Vec<f64>> = features.iter().map(|f| f64_col(&golden, f)).collect();
    for i in 0..n {
        model.apply_row(batch[i], &x[i * d..(i + 1) * d], &mut out);
        for f in 0..d {
            let want = cols[f][i];
            worst = worst.max((out[f] - want).abs() / want.abs().max(1.0));
        }
    }
    assert!(
        worst <= 1e-8,
        "{tag}: worst corrected-value error {worst:e}"
    );
}

#[test]
fn combat_matches_scanpy_on_synthetic() {
    check(
        "synthetic",
        "data/synthetic/synthetic_n3000_d20_k10_b5_seed7.parquet",
    );
}

#[test]
fn combat_matches_scanpy_on_bbbc021() {
    check(
        "bbbc021",
        "golden/preprocess/final_mad_int_featselect.parquet",
    );
}
