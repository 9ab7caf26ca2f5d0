//! `balans preprocess` against pycytominer 1.7.1 and the Arevalo et al. recipe
//! (`shared/golden/preprocess/`, see its README), and its bad-input behaviour.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{
    arg, assert_fails_writing_nothing, assert_ok, assert_stderr_has, balans, read, read_json,
    shared, sql_to,
};
use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type};

const NEGCON: &str = "Metadata_PertType = 'negcon'";

/// Per-plate steps with the DMSO wells as controls.
const PER_PLATE: [&str; 4] = ["--plate", "Metadata_Plate", "--negcon", NEGCON];

/// The Arevalo et al. recipe per plate, with the controls `negcon`.
fn recipe(negcon: &str) -> [&str; 6] {
    [
        "--recipe",
        "mad-int-featselect",
        "--plate",
        "Metadata_Plate",
        "--negcon",
        negcon,
    ]
}

fn raw() -> String {
    shared()
        .join("data/bbbc021/bbbc021_well_raw.parquet")
        .display()
        .to_string()
}

/// Feature columns (non-`Metadata_`) by name, as f64, in schema order.
fn features(b: &RecordBatch) -> Vec<(String, Vec<f64>)> {
    b.schema()
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| !f.name().starts_with("Metadata_"))
        .map(|(i, f)| {
            let c = cast(b.column(i), &DataType::Float64).unwrap();
            (
                f.name().clone(),
                c.as_primitive::<Float64Type>().values().to_vec(),
            )
        })
        .collect()
}

fn metadata_names(b: &RecordBatch) -> Vec<String> {
    b.schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .filter(|n| n.starts_with("Metadata_"))
        .collect()
}

/// Largest `|a − b| / max(1, |b|)` over same-named feature columns; panics if the names differ.
fn worst_relative(ours: &Path, golden: &str) -> f64 {
    let (a, b) = (read(ours), read(&shared().join(golden)));
    assert_eq!(metadata_names(&a), metadata_names(&b));
    let (fa, fb) = (features(&a), features(&b));
    let names = |f: &[(String, Vec<f64>)]| f.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&fa), names(&fb), "same features in the same order");
    let mut worst = 0.0f64;
    for ((_, x), (_, y)) in fa.iter().zip(&fb) {
        for (p, q) in x.iter().zip(y) {
            worst = worst.max((p - q).abs() / q.abs().max(1.0));
        }
    }
    worst
}

/// Runs `balans preprocess -i INPUT -o OUTPUT EXTRA...`.
fn preprocess_from(input: &str, output: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["preprocess", "-i", input, "-o", arg(output)];
    args.extend_from_slice(extra);
    balans(&args)
}

/// Runs `balans preprocess` on the raw BBBC021 well table.
fn preprocess(output: &Path, extra: &[&str]) -> std::process::Output {
    preprocess_from(&raw(), output, extra)
}

/// The recipe reproduces the golden table: the same variant features, the same
/// per-plate MAD and rank-INT values (1e-12), and 248 features after the correlation rule.
/// After the rank INT, features with the same rank order are identical columns, so their
/// |correlation| sums tie exactly; pycytominer then keeps whichever numpy's unstable sort puts
/// first, Balans the earlier column. The kept sets may therefore differ only by swapping
/// identical columns: every kept feature must equal a golden kept feature (to 1e-12).
#[test]
fn mad_int_featselect_recipe_matches_the_golden_table() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("recipe.parquet");
    let summary = dir.path().join("summary.json");
    let with_summary = [&recipe(NEGCON)[..], &["--summary-json", arg(&summary)]].concat();
    assert_ok(&preprocess(&out, &with_summary));
    let golden = read_json(&shared().join("golden/preprocess/features.json"));
    let ours = read_json(&summary);
    let dropped: BTreeMap<String, serde_json::Value> = ours["dropped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["step"].as_str().unwrap().to_string(),
                d["features"].clone(),
            )
        })
        .collect();
    assert_eq!(
        dropped["variant features"],
        golden["dropped_step3_not_variant"]
    );
    assert_eq!(
        dropped["frequency_threshold"],
        golden["dropped_step6a_frequency_threshold"]
    );
    assert_eq!(
        dropped["correlation_threshold"].as_array().unwrap().len(),
        229
    );

    let (a, b) = (
        read(&out),
        read(&shared().join("golden/preprocess/final_mad_int_featselect.parquet")),
    );
    assert_eq!(metadata_names(&a), metadata_names(&b));
    assert_eq!(a.num_rows(), 632);
    let (fa, fb) = (features(&a), features(&b));
    assert_eq!(fa.len(), 248);
    let golden_by_name: BTreeMap<&str, &Vec<f64>> =
        fb.iter().map(|(n, v)| (n.as_str(), v)).collect();
    let mut swapped = 0;
    for (name, values) in &fa {
        match golden_by_name.get(name.as_str()) {
            Some(expected) => {
                let worst = values
                    .iter()
                    .zip(expected.iter())
                    .map(|(p, q)| (p - q).abs())
                    .fold(0.0, f64::max);
                assert!(worst <= 1e-12, "{name}: {worst:e}");
            }
            None => {
                swapped += 1;
                assert!(
                    fb.iter()
                        .any(|(_, v)| v.iter().zip(values).all(|(p, q)| (p - q).abs() <= 1e-12)),
                    "{name} is kept by Balans only and equals no golden column"
                );
            }
        }
    }
    eprintln!("features kept in place of an identical column: {swapped}");
    assert!(swapped <= 3);
}

#[test]
fn mad_robustize_per_plate_matches_pycytominer() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mad.parquet");
    let o = preprocess(
        &out,
        &[&["--normalize", "mad-robustize"][..], &PER_PLATE].concat(),
    );
    assert_ok(&o);
    let worst = worst_relative(
        &out,
        "golden/preprocess/pycytominer_mad_robustize_per_plate.parquet",
    );
    assert!(worst <= 1e-12, "{worst:e}");
}

#[test]
fn standardize_matches_pycytominer() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("std.parquet");
    assert_ok(&preprocess(&out, &["--normalize", "standardize"]));
    let worst = worst_relative(&out, "golden/preprocess/pycytominer_standardize.parquet");
    assert!(worst <= 1e-12, "{worst:e}");
}

#[test]
fn a_plate_without_controls_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.parquet");
    let predicate = "Metadata_PertType = 'negcon' AND Metadata_Plate <> 'Week1_22123'";
    let o = preprocess(&out, &recipe(predicate));
    assert_fails_writing_nothing(&o, "plate 'Week1_22123'", &out);
    assert_stderr_has(&o, "no negative-control");
}

/// A CSV table: plates P1/P2, wells, controls, features a (NaN on plate P2 only), b, c.
fn small_csv(dir: &Path) -> String {
    let mut text = String::from("Metadata_Plate,Metadata_Well,Metadata_PertType,a,b,c\n");
    let rows = [
        ("P1", "A01", "negcon", "1.0", "10", "5"),
        ("P1", "A01", "negcon", "3.0", "14", "6"),
        ("P1", "A02", "trt", "2.0", "11", "9"),
        ("P1", "A02", "trt", "8.0", "", "7"),
        ("P1", "A02", "trt", "4.0", "13", "8"),
        ("P2", "A01", "negcon", "", "20", "5"),
        ("P2", "A01", "negcon", "", "22", "7"),
        ("P2", "A02", "trt", "", "25", "1"),
    ];
    for r in rows {
        text.push_str(&format!(
            "{},{},{},{},{},{}\n",
            r.0, r.1, r.2, r.3, r.4, r.5
        ));
    }
    let path = dir.join("cells.csv");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn aggregation_takes_medians_and_means_per_plate_and_well() {
    let dir = tempfile::tempdir().unwrap();
    let input = small_csv(dir.path());
    for (how, a02_p1, b_a02_p1) in [("median", 4.0, 12.0), ("mean", 14.0 / 3.0, 12.0)] {
        let out = dir.path().join(format!("{how}.parquet"));
        let per_well = ["--plate", "Metadata_Plate", "--well", "Metadata_Well"];
        assert_ok(&preprocess_from(
            &input,
            &out,
            &[&["--aggregate", how][..], &per_well].concat(),
        ));
        let b = read(&out);
        assert_eq!(b.num_rows(), 4, "one row per plate and well");
        let f: BTreeMap<String, Vec<f64>> = features(&b).into_iter().collect();
        // Rows sorted by plate, well: P1/A01, P1/A02, P2/A01, P2/A02.
        assert_eq!(f["a"][0], 2.0);
        assert!((f["a"][1] - a02_p1).abs() < 1e-12, "{how}: {}", f["a"][1]);
        // NaN (an empty CSV field) is ignored; an all-missing group stays NaN.
        assert_eq!(f["b"][1], b_a02_p1);
        assert!(f["a"][2].is_nan() && f["a"][3].is_nan());
        let plates = b.column_by_name("Metadata_PertType").unwrap();
        assert_eq!(
            plates.len(),
            4,
            "other metadata kept (smallest value per well)"
        );
    }
}

#[test]
fn a_feature_nan_on_one_plate_is_dropped_by_the_recipe_and_named_by_normalize() {
    let dir = tempfile::tempdir().unwrap();
    let input = small_csv(dir.path());
    let out = dir.path().join("norm.parquet");
    let normalize = [&PER_PLATE[..], &["--normalize", "mad-robustize"]].concat();
    let o = preprocess_from(&input, &out, &normalize);
    assert_fails_writing_nothing(&o, "feature 'a'", &out);
    assert_stderr_has(&o, "plate 'P2'");
    // drop_na_columns (NaN fraction above 0.05) drops a and b, keeps c.
    let drop_na = [&PER_PLATE[..], &["--feature-select", "drop-na-columns"]].concat();
    assert_ok(&preprocess_from(&input, &out, &drop_na));
    let names: Vec<String> = features(&read(&out)).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, vec!["c".to_string()]);
}

#[test]
fn option_conflicts_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.parquet");
    for (extra, needle) in [
        (vec![], "nothing to do"),
        (
            vec!["--recipe", "mad-int-featselect", "--rank-int"],
            "the recipe runs its own steps",
        ),
        (
            vec!["--recipe", "mad-int-featselect", "--negcon", NEGCON],
            "--plate",
        ),
        (
            vec![
                "--recipe",
                "mad-int-featselect",
                "--plate",
                "Metadata_Plate",
            ],
            "--negcon",
        ),
        (
            vec!["--aggregate", "median", "--plate", "Metadata_Plate"],
            "--well",
        ),
        (vec!["--feature-select", "blocklist"], "--blocklist"),
        (vec!["--rank-int", "--freq-cut", "2"], "--freq-cut"),
    ] {
        assert_fails_writing_nothing(&preprocess(&out, &extra), needle, &out);
    }
}

/// `preprocess((SELECT ...), ...)` in `balans sql` writes exactly the table of `balans
/// preprocess` (the job runs while the statement is planned, on the command's runtime).
#[test]
fn the_sql_relation_writes_the_same_table_as_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let (job, sql) = (
        dir.path().join("job.parquet"),
        dir.path().join("sql.parquet"),
    );
    assert_ok(&preprocess(&job, &recipe(NEGCON)));
    let script = format!(
        "CREATE EXTERNAL TABLE raw STORED AS PARQUET LOCATION '{}'; \
         SELECT * FROM preprocess((SELECT * FROM raw), recipe => 'mad_int_featselect', \
         plate => 'Metadata_Plate', negcon => 'Metadata_PertType = ''negcon''')",
        raw()
    );
    assert_ok(&sql_to(&script, &sql));
    let (a, b) = (read(&job), read(&sql));
    assert_eq!(a.schema().fields().len(), b.schema().fields().len());
    assert_eq!(a.num_rows(), 632);
    for (field, column) in a.schema().fields().iter().zip(a.columns()) {
        let other = b
            .column_by_name(field.name())
            .unwrap_or_else(|| panic!("{} missing from the SQL output", field.name()));
        assert_eq!(column.as_ref(), other.as_ref(), "{}", field.name());
    }
}
