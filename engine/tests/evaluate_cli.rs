//! End-to-end tests of `balans evaluate` and `balans correct --evaluate`: parity with the
//! reference benchmark's values on a golden embedding, the JSON and HTML outputs, and bad input.

mod common;

use common::{
    arg, assert_fails_with, assert_ok, assert_stderr_has, assert_stdout_has, balans, correct,
    example_path, read_json, shared, stderr, stdout, synthetic_path, write_parquet,
};

use std::path::Path;
use std::process::Output;

use datafusion::arrow::array::{Float64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};

/// Runs `balans COMMAND -i INPUT -b Metadata_Batch --label LABEL EXTRA...`.
fn labelled(command: &str, input: &str, label: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        command,
        "-i",
        input,
        "-b",
        "Metadata_Batch",
        "--label",
        label,
    ];
    args.extend_from_slice(extra);
    balans(&args)
}

/// `ours[name]` is within `tol` of `golden[name]`.
fn assert_close(ours: &serde_json::Value, golden: &serde_json::Value, name: &str, tol: f64) {
    let a = ours[name].as_f64().unwrap();
    let b = golden[name].as_f64().unwrap();
    assert!((a - b).abs() <= tol, "{name}: {a} vs golden {b}");
}

const NEGCON: &str = "Metadata_PertType = 'negcon'";

#[test]
fn evaluate_matches_the_reference_benchmark_on_a_golden_embedding() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("eval.json");
    let input = shared().join("golden/combat/bbbc021_combat.parquet");
    let extra = ["--negcon", NEGCON, "--json", arg(&out)];
    let o = labelled("evaluate", arg(&input), "Metadata_MoA", &extra);
    assert_ok(&o);
    assert_stdout_has(&o, "overall");
    let ours = read_json(&out);
    let golden = read_json(&shared().join("golden/metrics/bbbc021_combat/metrics.json"));
    let scores = &ours["report"]["scores"];
    for (name, tol) in [
        ("silhouette_label", 1e-10),
        ("silhouette_batch", 1e-10),
        ("graph_connectivity", 1e-12),
        ("ilisi", 1e-4),
        ("clisi", 1e-4),
        ("kbet", 0.02),
        ("negcon_map", 1e-12),
        ("nonrep_map", 1e-12),
        ("nmi", 0.03),
        ("ari", 0.03),
        ("overall", 0.02),
    ] {
        assert_close(scores, &golden, name, tol);
    }
    assert_eq!(ours["report"]["n_cells"], 302);
    assert_eq!(ours["report"]["n_negcon"], 330);
    assert_eq!(ours["plate"], "Metadata_Plate");
}

#[test]
fn correct_with_evaluate_prints_before_and_after_and_writes_a_report() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("corrected.parquet");
    let report = dir.path().join("report.html");
    let summary = dir.path().join("eval.json");
    let scoring = ["--evaluate", "--label", "Metadata_MoA", "--negcon", NEGCON];
    let outputs = [
        "--null-size",
        "1000",
        "--report",
        arg(&report),
        "--json",
        arg(&summary),
    ];
    let o = correct(&example_path(), &output, &[&scoring[..], &outputs].concat());
    assert_ok(&o);
    let stdout = stdout(&o);
    let header = stdout.lines().next().unwrap();
    assert!(
        header.contains("before") && header.contains("after"),
        "{stdout}"
    );
    let values = read_json(&summary);
    for column in ["before", "after"] {
        let overall = values[column]["report"]["scores"]["overall"]
            .as_f64()
            .unwrap();
        assert!((0.0..=1.0).contains(&overall), "{column}: {overall}");
    }
    let html = std::fs::read_to_string(&report).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") || html.starts_with("<!doctype html>"));
    assert!(
        html.matches("data:image/png;base64,").count() >= 4,
        "figures missing"
    );
    assert!(html.contains("silhouette_batch") || html.contains("Silhouette batch"));
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "external resource"
    );
}

fn write_table(
    path: &Path,
    columns: Vec<(
        &str,
        DataType,
        std::sync::Arc<dyn datafusion::arrow::array::Array>,
    )>,
) {
    let schema = std::sync::Arc::new(Schema::new(
        columns
            .iter()
            .map(|(n, t, _)| Field::new(*n, t.clone(), true))
            .collect::<Vec<_>>(),
    ));
    let batch =
        RecordBatch::try_new(schema, columns.into_iter().map(|(_, _, a)| a).collect()).unwrap();
    write_parquet(path, &batch);
}

/// 4 plates x 2 batches; labels A, B, C with replicates on every plate, D once; DMSO on plates
/// p0..p2 only. Feature values: label signal plus a small deterministic jitter.
fn small_table(path: &Path, nan_row: Option<usize>, with_plate: bool) {
    let mut plates = Vec::new();
    let mut batches = Vec::new();
    let mut wells = Vec::new();
    let mut labels = Vec::new();
    let mut kinds = Vec::new();
    let mut f = vec![Vec::new(), Vec::new(), Vec::new()];
    let mut row = 0usize;
    for plate in 0..4 {
        let mut entries: Vec<&str> = vec!["A", "A", "B", "B", "C", "C"];
        if plate < 3 {
            entries.extend(["DMSO", "DMSO", "DMSO"]);
        }
        if plate == 0 {
            entries.push("D");
        }
        for (w, label) in entries.into_iter().enumerate() {
            plates.push(format!("p{plate}"));
            batches.push(format!("b{}", plate % 2));
            wells.push(format!("w{w}"));
            labels.push(label.to_string());
            kinds.push(if label == "DMSO" { "negcon" } else { "trt" }.to_string());
            let signal = match label {
                "A" => [1.0, 0.0, 0.0],
                "B" => [0.0, 1.0, 0.0],
                "C" => [0.0, 0.0, 1.0],
                "D" => [1.0, 1.0, 0.0],
                _ => [0.3, 0.3, 0.3],
            };
            for (j, col) in f.iter_mut().enumerate() {
                let jitter = ((row * 7 + j * 13) % 11) as f64 * 0.01;
                col.push(signal[j] + jitter + 0.1 * (plate % 2) as f64);
            }
            row += 1;
        }
    }
    if let Some(r) = nan_row {
        f[1][r] = f64::NAN;
    }
    let strings = |v: Vec<String>| std::sync::Arc::new(StringArray::from(v)) as _;
    let floats = |v: Vec<f64>| std::sync::Arc::new(Float64Array::from(v)) as _;
    let mut columns = vec![
        ("Metadata_Batch", DataType::Utf8, strings(batches)),
        ("Metadata_Well", DataType::Utf8, strings(wells)),
        ("Metadata_Label", DataType::Utf8, strings(labels)),
        ("Metadata_PertType", DataType::Utf8, strings(kinds)),
    ];
    if with_plate {
        columns.push(("Metadata_Plate", DataType::Utf8, strings(plates)));
    }
    let [f0, f1, f2] = <[Vec<f64>; 3]>::try_from(f).unwrap();
    columns.push(("f0", DataType::Float64, floats(f0)));
    columns.push(("f1", DataType::Float64, floats(f1)));
    columns.push(("f2", DataType::Float64, floats(f2)));
    write_table(path, columns);
}

/// Runs `balans evaluate` on a small table with the controls `negcon` and small neighbourhoods.
fn evaluate_small_with(path: &Path, negcon: &str, extra: &[&str]) -> Output {
    let small = [
        "--neighbors",
        "5",
        "--lisi-neighbors",
        "10",
        "--perplexity",
        "3",
    ];
    let args = [&["--negcon", negcon][..], &small, extra].concat();
    labelled("evaluate", arg(path), "Metadata_Label", &args)
}

/// As `evaluate_small_with` with the DMSO controls and a null distribution of 200.
fn evaluate_small(path: &Path, extra: &[&str]) -> Output {
    evaluate_small_with(path, NEGCON, &[&["--null-size", "200"][..], extra].concat())
}

#[test]
fn single_replicates_and_plates_without_controls_are_skipped_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("small.parquet");
    small_table(&path, None, true);
    let out = dir.path().join("eval.json");
    let o = evaluate_small(&path, &["--json", arg(&out)]);
    assert_ok(&o);
    let stdout = stdout(&o);
    assert!(stdout.contains("single replicate"), "{stdout}");
    assert!(
        stdout.contains("p3"),
        "plate without controls not named: {stdout}"
    );
    let v = read_json(&out);
    let significance = &v["report"]["negcon_significance"];
    assert_eq!(significance["n_single_replicate_labels"], 1);
    assert!(v["report"]["scores"]["negcon_map"].as_f64().is_some());
}

#[test]
fn nan_rows_missing_plate_and_bad_predicates_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let nan = dir.path().join("nan.parquet");
    small_table(&nan, Some(4), true);
    let o = evaluate_small(&nan, &[]);
    assert_fails_with(&o, "NaN");
    assert_stderr_has(&o, "rows 4");

    let no_plate = dir.path().join("noplate.parquet");
    small_table(&no_plate, None, false);
    assert_fails_with(&evaluate_small(&no_plate, &[]), "--plate");
    // Without mAP the plate is not needed.
    assert_ok(&evaluate_small(&no_plate, &["--skip", "map"]));

    let o = labelled("evaluate", arg(&nan), "Metadata_Nope", &[]);
    assert_fails_with(&o, "Metadata_Nope");

    let path = dir.path().join("ok.parquet");
    small_table(&path, None, true);
    for (predicate, needle) in [
        ("Metadata_Nope = 'x'", "--negcon"),
        ("Metadata_PertType = 'nothing'", "matches no row"),
        ("Metadata_Batch", "boolean"),
    ] {
        let o = evaluate_small_with(&path, predicate, &[]);
        let stderr = stderr(&o);
        assert!(!o.status.success(), "{predicate}");
        assert!(stderr.contains(needle), "{predicate}: {stderr}");
    }
}

#[test]
fn existing_outputs_are_protected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ok.parquet");
    small_table(&path, None, true);
    let out = dir.path().join("eval.json");
    std::fs::write(&out, "keep").unwrap();
    assert_fails_with(
        &evaluate_small(&path, &["--json", arg(&out)]),
        "--overwrite",
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "keep");
    let o = evaluate_small(&path, &["--json", arg(&path), "--overwrite"]);
    assert_fails_with(&o, "input");
}

fn evaluate_synthetic_like(input: &str, json_out: &Path) -> serde_json::Value {
    let extra = ["--negcon", "Metadata_IsControl", "--json", arg(json_out)];
    assert_ok(&labelled("evaluate", input, "Metadata_Compound", &extra));
    read_json(json_out)["report"]["scores"].clone()
}

/// The reference BALANS run's output, scored by us, against the reference's own scores.
#[test]
fn reference_balans_output_scores_as_the_reference_scored_it() {
    let dir = tempfile::tempdir().unwrap();
    let input = shared().join("golden/balans/full_run_seed0.parquet");
    let ours = evaluate_synthetic_like(arg(&input), &dir.path().join("e.json"));
    let golden = read_json(&shared().join("golden/balans/metrics_full_run_seed0/metrics.json"));
    for (name, tol) in [
        ("silhouette_label", 1e-10),
        ("silhouette_batch", 1e-10),
        ("ilisi", 1e-4),
        ("clisi", 1e-4),
        ("negcon_map", 1e-12),
        ("nonrep_map", 1e-12),
        // The smoothing duplicates 13 cells; for 12 of them scanpy lists a duplicate before the
        // cell itself, we list the cell first (distance exactly 0): the 25-NN graph differs a
        // little for those cells.
        ("graph_connectivity", 0.01),
        ("kbet", 0.02),
        ("nmi", 0.03),
        ("ari", 0.03),
        ("batch_score", 0.02),
        ("bio_score", 0.02),
        ("overall", 0.02),
    ] {
        assert_close(&ours, &golden, name, tol);
    }
}

/// An independent seeded BALANS run (the paper's variant) scores within 0.03 of the reference run's aggregates
/// (golden/balans README, "Suggested tolerances"), and far above the uncorrected input.
#[test]
fn balans_run_matches_the_reference_runs_aggregates() {
    let dir = tempfile::tempdir().unwrap();
    let synthetic = synthetic_path();
    let corrected = dir.path().join("corrected.parquet");
    assert_ok(&correct(&synthetic, &corrected, &["--variant", "paper"]));
    let ours = evaluate_synthetic_like(arg(&corrected), &dir.path().join("e.json"));
    let golden = read_json(&shared().join("golden/balans/metrics_full_run_seed0/metrics.json"));
    for name in ["batch_score", "bio_score", "overall"] {
        assert_close(&ours, &golden, name, 0.03);
    }
    let raw = read_json(&shared().join("golden/metrics/synthetic_raw/metrics.json"));
    assert!(ours["overall"].as_f64().unwrap() > raw["overall"].as_f64().unwrap() + 0.1);
}

#[test]
fn tune_scores_every_setting_of_a_grid() {
    let dir = tempfile::tempdir().unwrap();
    let synthetic = synthetic_path();
    let out = dir.path().join("tune.json");
    let grid = ["--grid", "elbow=kneedle,max-gap", "--grid", "k=10"];
    let quick = [
        "--null-size",
        "200",
        "--skip",
        "classifier",
        "--json",
        arg(&out),
    ];
    let extra = [&["--negcon", "Metadata_IsControl"][..], &grid, &quick].concat();
    let o = labelled("tune", &synthetic, "Metadata_Compound", &extra);
    assert_ok(&o);
    let stdout = stdout(&o);
    assert!(stdout.contains("| input (uncorrected) |"), "{stdout}");
    assert!(stdout.contains("| elbow=kneedle k=10 |"), "{stdout}");
    assert!(stdout.contains("| elbow=max-gap k=10 |"), "{stdout}");
    let v = read_json(&out);
    let settings = v["settings"].as_array().unwrap();
    assert_eq!(settings.len(), 2);
    let raw = v["input"]["report"]["scores"]["overall"].as_f64().unwrap();
    let kneedle = settings[0]["evaluation"]["report"]["scores"]["overall"]
        .as_f64()
        .unwrap();
    assert!(kneedle > raw, "BALANS {kneedle} vs uncorrected {raw}");
    assert!(settings[0]["landmarks"].as_u64().unwrap() > 0);
    // No temporary outputs are left beside anything.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    for (grid, needle) in [
        ("alpha=1", "unknown parameter 'alpha'"),
        ("k", "NAME=V1,V2"),
        ("elbow=sideways", "--grid elbow=sideways"),
    ] {
        let o = labelled("tune", &synthetic, "Metadata_Compound", &["--grid", grid]);
        assert!(!o.status.success(), "{grid}");
        assert!(stderr(&o).contains(needle), "{grid}: {}", stderr(&o));
    }
}
