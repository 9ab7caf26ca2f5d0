//! Harmony against harmonypy 2.1.0 (`shared/golden/harmony/`, see its README): fed the same
//! principal components and seed, the port reproduces harmonypy's random start (its
//! Mersenne Twister, libstdc++'s distributions and shuffle), clusters and corrections in the
//! same float32 arithmetic, and gives the same iterations and the same output. Measured:
//! bit-identical on both data sets; the tolerance leaves room for another libm's `expf`/`logf`.

mod common;

use balans_operators::kernels::harmony::{HarmonyParams, default_clusters, harmonize};
use common::{f64_col, read, str_col};

/// Cell-major f32 PCs, batch codes in sorted label order, and harmonypy's output.
fn load(tag: &str, p: usize) -> (Vec<f32>, Vec<u32>, usize, Vec<f64>) {
    let pcs = read(&format!("golden/harmony/{tag}_pcs{p}.parquet"));
    let out = read(&format!("golden/harmony/{tag}_harmony.parquet"));
    let n = pcs.num_rows();
    let columns: Vec<Vec<f64>> = (1..=p).map(|i| f64_col(&pcs, &format!("PC{i}"))).collect();
    let z: Vec<f32> = (0..n)
        .flat_map(|j| columns.iter().map(move |c| c[j] as f32))
        .collect();
    let expected_columns: Vec<Vec<f64>> = (0..p)
        .map(|i| f64_col(&out, &format!("harmony_{i}")))
        .collect();
    let expected: Vec<f64> = (0..n)
        .flat_map(|j| expected_columns.iter().map(move |c| c[j]))
        .collect();
    let keys = str_col(&pcs, "Metadata_Batch");
    let mut names = keys.clone();
    names.sort();
    names.dedup();
    let batch = keys
        .iter()
        .map(|k| names.binary_search(k).unwrap() as u32)
        .collect();
    (z, batch, names.len(), expected)
}

fn check(tag: &str, p: usize, clusters: usize, iterations: usize, tolerance: f64) {
    let (z, batch, nb, expected) = load(tag, p);
    assert_eq!(default_clusters(batch.len()), clusters);
    let out = harmonize(
        &z,
        p,
        &batch,
        nb,
        &HarmonyParams::default(),
        &|| false,
        &mut |_, _| {},
    )
    .unwrap();
    let rms = (expected.iter().map(|v| v * v).sum::<f64>() / expected.len() as f64).sqrt();
    let worst = out
        .z_corr
        .iter()
        .zip(&expected)
        .map(|(&a, &b)| (f64::from(a) - b).abs())
        .fold(0.0, f64::max);
    eprintln!(
        "{tag}: {} iterations, objectives {:?}, max |diff| {worst:.3e} (output RMS {rms:.3})",
        out.iterations, out.objectives
    );
    assert_eq!(
        out.iterations, iterations,
        "{tag}: harmonypy converged after {iterations}"
    );
    assert!(
        worst <= tolerance,
        "{tag}: max |diff| {worst:e} > {tolerance:e}"
    );
}

#[test]
fn synthetic_matches_harmonypy_element_wise() {
    check("synthetic", 20, 100, 9, 1e-5);
}

#[test]
fn bbbc021_matches_harmonypy_element_wise() {
    check("bbbc021", 50, 21, 6, 1e-5);
}
