//! The whole suite against the reference benchmark's values (golden README, "Results").
//!
//! Components computed exactly as the reference are held to its tolerances; the stochastic ones
//! (Leiden, our own CV folds and null RNG) to the README's tolerances for another implementation.
mod common;

use balans_metrics::Codes;
use balans_metrics::suite::{EvalInput, EvalOptions, evaluate};

/// The categorical columns of a golden table, encoded.
struct GoldenCodes {
    batch: Codes,
    label: Codes,
    plate: Codes,
    well: Codes,
}

impl GoldenCodes {
    fn of(g: &common::GoldenEmbedding) -> Self {
        Self {
            batch: Codes::from_strings(&g.batch),
            label: Codes::from_strings(&g.label),
            plate: Codes::from_strings(&g.plate),
            well: Codes::from_strings(&g.well),
        }
    }

    /// The suite's input: every row of `g`, plates and wells included.
    fn input<'a>(&'a self, g: &'a common::GoldenEmbedding) -> EvalInput<'a> {
        EvalInput {
            x: &g.all,
            d: g.d,
            batch: &self.batch,
            label: &self.label,
            is_negcon: &g.is_negcon,
            plate: Some(&self.plate),
            well: Some(&self.well),
        }
    }
}

fn check_folder(folder: &'static str) {
    let g = common::load(folder);
    let codes = GoldenCodes::of(&g);
    let input = codes.input(&g);
    let report = evaluate(&input, &EvalOptions::default(), &|_| {}).unwrap();
    let golden = common::metrics_json(folder);
    let expect = |name: &str| golden[name].as_f64().unwrap();
    let s = &report.scores;
    let close = |name: &str, value: Option<f64>, tol: f64| {
        let value = value.unwrap_or_else(|| panic!("{folder}: {name} missing"));
        let want = expect(name);
        assert!(
            (value - want).abs() <= tol,
            "{folder}: {name} = {value}, golden {want} (tolerance {tol})"
        );
    };
    assert_eq!(report.n_cells, expect("n_cells") as usize, "{folder}");
    assert_eq!(report.n_labels, expect("n_labels") as usize, "{folder}");
    assert_eq!(report.n_batches, expect("n_batches") as usize, "{folder}");
    close("silhouette_label", s.silhouette_label, 1e-10);
    close("silhouette_batch", s.silhouette_batch, 1e-10);
    close("ilisi", s.ilisi, 1e-4);
    close("clisi", s.clisi, 1e-4);
    close("graph_connectivity", s.graph_connectivity, 1e-12);
    close("kbet", s.kbet, 0.02);
    close("negcon_map", s.negcon_map, 1e-12);
    close("nonrep_map", s.nonrep_map, 1e-12);
    close("nmi", s.nmi, 0.03);
    close("ari", s.ari, 0.03);
    close("batch_classifier", s.batch_classifier, 0.03);
    close("batch_score", s.batch_score, 0.02);
    close("bio_score", s.bio_score, 0.02);
    close("overall", s.overall, 0.02);
    assert_eq!(report.batch_components, 4, "{folder}");
    assert_eq!(report.bio_components, 6, "{folder}");
    assert!(report.subsampled.is_none());
}

#[test]
fn suite_matches_bbbc021_preprocessed() {
    check_folder("bbbc021_preprocessed");
}

#[test]
fn suite_matches_bbbc021_combat() {
    check_folder("bbbc021_combat");
}

#[test]
fn suite_matches_bbbc021_harmony() {
    check_folder("bbbc021_harmony");
}

#[test]
fn suite_matches_synthetic_raw() {
    check_folder("synthetic_raw");
}

#[test]
fn suite_matches_synthetic_combat() {
    check_folder("synthetic_combat");
}

#[test]
fn suite_matches_synthetic_harmony() {
    check_folder("synthetic_harmony");
}

#[test]
fn suite_is_deterministic_and_reports_subsampling() {
    let g = common::load("synthetic_raw");
    let codes = GoldenCodes::of(&g);
    let input = codes.input(&g);
    let options = EvalOptions {
        subsample: Some(1000),
        null_size: 1000,
        ..EvalOptions::default()
    };
    let a = evaluate(&input, &options, &|_| {}).unwrap();
    let b = evaluate(&input, &options, &|_| {}).unwrap();
    assert_eq!(a.scores, b.scores);
    assert_eq!(a.n_cells, 1000);
    assert_eq!(a.n_cells_total, 2700);
    assert!(a.subsampled.as_deref().unwrap().contains("1000 of 2700"));
}

#[test]
fn nan_rows_are_named() {
    let g = common::load("synthetic_raw");
    let mut x = g.all.clone();
    x[5 * g.d + 3] = f64::NAN;
    x[17 * g.d] = f64::INFINITY;
    let batch = Codes::from_strings(&g.batch);
    let label = Codes::from_strings(&g.label);
    let input = EvalInput {
        x: &x,
        d: g.d,
        batch: &batch,
        label: &label,
        is_negcon: &g.is_negcon,
        plate: None,
        well: None,
    };
    match evaluate(&input, &EvalOptions::default(), &|_| {}) {
        Err(balans_metrics::MetricsError::NonFinite { count, rows }) => {
            assert_eq!(count, 2);
            assert_eq!(rows, vec![5, 17]);
        }
        other => panic!("expected a NonFinite error, got {other:?}"),
    }
}

#[test]
fn resolution_sweep_is_labelled_and_never_worse_in_nmi() {
    let g = common::load("bbbc021_combat");
    let codes = GoldenCodes::of(&g);
    let input = codes.input(&g);
    let mut options = EvalOptions::default();
    options.metrics.map = false;
    options.metrics.classifier = false;
    let fixed = evaluate(&input, &options, &|_| {}).unwrap();
    options.resolution_sweep = true;
    let swept = evaluate(&input, &options, &|_| {}).unwrap();
    assert!(swept.scores.nmi.unwrap() >= fixed.scores.nmi.unwrap() - 1e-12);
    assert!(
        swept
            .warnings
            .iter()
            .any(|w| w.contains("resolution sweep"))
    );
    let r = swept.leiden_resolution.unwrap();
    assert!((0.19..=2.01).contains(&r), "{r}");
    assert_eq!(fixed.leiden_resolution, Some(1.0));
}
