//! Sphering against pycytominer 1.7.1's ZCA-cor (`shared/golden/sphering/`, see its README):
//! fitted on the DMSO wells of the preprocessed BBBC021 table, epsilon 1e-2; W and the
//! whitened table to 1e-9 relative, fit parameters to 1e-10.

mod common;

use balans_operators::kernels::sphering::{SpheringAccumulator, SpheringMethod};
use common::{f64_col, feature_names, read, row_major, str_col};

#[test]
fn zca_cor_matches_pycytominer() {
    let input = read("golden/preprocess/final_mad_int_featselect.parquet");
    let features = feature_names(&input);
    let d = features.len();
    let n = input.num_rows();
    let x = row_major(&input, &features);
    let row = |i: usize| &x[i * d..(i + 1) * d];
    let negcon: Vec<bool> = str_col(&input, "Metadata_PertType")
        .iter()
        .map(|t| t == "negcon")
        .collect();
    let mut acc = SpheringAccumulator::new(d);
    for i in (0..n).filter(|&i| negcon[i]) {
        acc.add_rows(row(i));
    }
    assert_eq!(acc.count(), 330);
    let model = acc.fit(SpheringMethod::ZcaCor, 1e-2, &features).unwrap();

    let params = read("golden/sphering/fit_params.parquet");
    let (mean, sd) = (
        f64_col(&params, "negcon_mean"),
        f64_col(&params, "negcon_std_ddof0"),
    );
    let sv = f64_col(&params, "pycytominer_singular_value_desc");
    let close = |a: f64, b: f64, tol: f64| (a - b).abs() <= tol * b.abs().max(1.0);
    assert_eq!(str_col(&params, "feature"), features);
    for j in 0..d {
        assert!(close(model.mean[j], mean[j], 1e-12), "mean {j}");
        assert!(close(model.scale[j], sd[j], 1e-12), "std {j}");
        assert!(
            (model.singular_values[j] - sv[j]).abs() <= 1e-10 * sv[0],
            "singular value {j}: {} vs {}",
            model.singular_values[j],
            sv[j]
        );
    }
    let w = read("golden/sphering/W_pycytominer.parquet");
    assert_eq!(str_col(&w, "row_feature"), features);
    let mut worst_w = 0.0f64;
    for (c, name) in features.iter().enumerate() {
        for (r, want) in f64_col(&w, name).into_iter().enumerate() {
            worst_w = worst_w.max((model.w[r * d + c] - want).abs() / want.abs().max(1.0));
        }
    }
    assert!(worst_w <= 1e-9, "W: worst {worst_w:e}");
    let golden = read("golden/sphering/pycytominer_zca_cor_eps1e-2.parquet");
    let want: Vec<Vec<f64>> = features.iter().map(|f| f64_col(&golden, f)).collect();
    let mut out = vec![0.0; d];
    let mut worst = 0.0f64;
    for i in 0..n {
        model.apply_row(row(i), &mut out);
        for (o, col) in out.iter().zip(&want) {
            worst = worst.max((o - col[i]).abs() / col[i].abs().max(1.0));
        }
    }
    assert!(worst <= 1e-9, "Y: worst {worst:e}");
}
