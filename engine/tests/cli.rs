//! End-to-end tests of the `balans` command: real data, determinism, bad input, memory limits
//! and interruption. Every failing run must leave no output and no temporary file behind.

mod common;

use common::{
    arg, assert_dir_holds, assert_fails_cleanly, assert_fails_with, assert_fails_writing_nothing,
    assert_ok, assert_stderr_has, assert_stdout_has, balans, balans_ok, column_names, correct,
    correct_args, create_p, example_path, f64_column, read, read_json, shared, stderr, synth,
    synthetic_path, write_parquet,
};

use std::fs::File;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use balans_operators::kernels::quality::{batch_mixing, knn_indices, label_purity};
use datafusion::arrow::array::{Array, ArrayRef, AsArray, Float64Array, RecordBatch, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Float64Type, Schema};
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

fn matrix(b: &RecordBatch, prefix: &str) -> (Vec<f32>, usize) {
    let cols: Vec<usize> = (0..b.num_columns())
        .filter(|&i| b.schema().field(i).name().starts_with(prefix))
        .collect();
    let d = cols.len();
    let mut x = vec![0.0f32; b.num_rows() * d];
    for (f, &c) in cols.iter().enumerate() {
        let col = cast(b.column(c), &DataType::Float64).unwrap();
        for (i, v) in col
            .as_primitive::<Float64Type>()
            .values()
            .iter()
            .enumerate()
        {
            x[i * d + f] = *v as f32;
        }
    }
    (x, d)
}

fn codes(b: &RecordBatch, name: &str) -> Vec<usize> {
    let col = cast(b.column_by_name(name).unwrap(), &DataType::Utf8).unwrap();
    let s = col.as_string::<i32>();
    let mut seen: Vec<String> = Vec::new();
    (0..s.len())
        .map(|i| match seen.iter().position(|v| v == s.value(i)) {
            Some(p) => p,
            None => {
                seen.push(s.value(i).to_string());
                seen.len() - 1
            }
        })
        .collect()
}

/// A small profile table: `batches` batches x `per` rows, 3 clusters, features f0..f{d-1}.
fn table(batches: usize, per: usize, d: usize) -> (Vec<String>, Vec<String>, Vec<Vec<f64>>) {
    let mut batch = Vec::new();
    let mut label = Vec::new();
    let mut cols = vec![Vec::new(); d];
    let mut state = 12345u64;
    let mut rnd = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 11) as f64 / (1u64 << 53) as f64) - 0.5
    };
    for b in 0..batches {
        for i in 0..per {
            batch.push(format!("B{b}"));
            label.push(format!("L{}", i % 3));
            for (f, col) in cols.iter_mut().enumerate() {
                col.push((i % 3) as f64 * 5.0 + b as f64 * 1.5 + rnd() + f as f64 * 0.1);
            }
        }
    }
    (batch, label, cols)
}

fn write_table(path: &Path, batch: &[String], label: &[String], cols: &[Vec<f64>]) {
    let mut fields = vec![
        Field::new("Metadata_Batch", DataType::Utf8, false),
        Field::new("Metadata_Label", DataType::Utf8, false),
    ];
    let mut arrays: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(batch.to_vec())),
        Arc::new(StringArray::from(label.to_vec())),
    ];
    for (f, c) in cols.iter().enumerate() {
        fields.push(Field::new(format!("f{f}"), DataType::Float64, true));
        arrays.push(Arc::new(Float64Array::from(c.clone())));
    }
    let rb = RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).unwrap();
    write_parquet(path, &rb);
}

fn small_table(dir: &Path, name: &str, batches: usize, per: usize) -> String {
    let (b, l, c) = table(batches, per, 4);
    let p = dir.join(name);
    write_table(&p, &b, &l, &c);
    p.display().to_string()
}

/// Runs `balans inspect TABLE -b Metadata_Batch --json`, which must succeed.
fn inspect(table: &str) -> Output {
    balans_ok(&["inspect", table, "-b", "Metadata_Batch", "--json"])
}

#[test]
fn synthetic_run_is_deterministic_across_thread_counts() {
    let dir = tempfile::tempdir().unwrap();
    let out1 = dir.path().join("t1.parquet");
    let out2 = dir.path().join("t2.parquet");
    let json = dir.path().join("summary.json");
    let input = synthetic_path();
    let seed_3_on = |threads: &str, out: &Path, extra: &[&str]| {
        let mut args = vec!["--threads", threads];
        args.extend(correct_args(Path::new(&input), out, &["--seed", "3"]));
        args.extend_from_slice(extra);
        balans_ok(&args);
    };
    seed_3_on("1", &out1, &["--summary-json", arg(&json)]);
    seed_3_on("2", &out2, &[]);
    assert_eq!(
        std::fs::read(&out1).unwrap(),
        std::fs::read(&out2).unwrap(),
        "same seed, different threads: same bytes"
    );
    let summary = read_json(&json);
    assert_eq!(summary["coverage"], 1.0);
    assert_eq!(summary["stop_reason"], "tau");
    assert_eq!(summary["rows"], 3000);
    let m = summary["landmarks"].as_u64().unwrap();
    assert!((50..=200).contains(&m), "m = {m}");
    // Two passes by default; the summary times the stages of both.
    let stages: Vec<&str> = summary["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    for stage in ["pass 1/2 sample", "pass 2/2 sample", "pass 2/2 write"] {
        assert!(stages.contains(&stage), "{stages:?}");
    }
    // Another seed gives another landmark sequence, hence other bytes.
    let out3 = dir.path().join("t3.parquet");
    assert_ok(&correct(&input, &out3, &["--seed", "4"]));
    assert_ne!(std::fs::read(&out1).unwrap(), std::fs::read(&out3).unwrap());
}

#[test]
fn anchored_correction_reports_its_anchors_and_needs_its_predicate() {
    let dir = tempfile::tempdir().unwrap();
    let input = synthetic_path();
    let out = dir.path().join("anchored.parquet");
    let json = dir.path().join("summary.json");
    let controls = ["--anchor", "negcon", "--negcon", "Metadata_IsControl"];
    let o = correct(
        &input,
        &out,
        &[&controls[..], &["--summary-json", arg(&json)]].concat(),
    );
    assert_ok(&o);
    let summary = read_json(&json);
    // The shared synthetic file has 10 % DMSO wells in each of its 5 batches.
    assert_eq!(summary["anchor_rows"], 300);
    let corrected = read(&out);
    let names = column_names(&corrected);
    assert!(
        names.iter().all(|n| !n.starts_with("__balans")),
        "{names:?}"
    );
    // Anchored on the controls only, the correction differs from the unanchored one.
    let plain = dir.path().join("plain.parquet");
    assert_ok(&correct(&input, &plain, &[]));
    assert_ne!(matrix(&corrected, "f").0, matrix(&read(&plain), "f").0);
    let none = dir.path().join("none.parquet");
    let held = ["anchored.parquet", "summary.json", "plain.parquet"];
    let o = correct(&input, &none, &["--anchor", "negcon"]);
    assert_fails_cleanly(o, dir.path(), &held, "give --negcon PREDICATE");
    let not_02 = "Metadata_IsControl AND Metadata_Batch <> 'batch_02'";
    let o = correct(&input, &none, &["--anchor", "negcon", "--negcon", not_02]);
    assert_fails_cleanly(o, dir.path(), &held, "no anchor rows in batch 'batch_02'");
}

#[test]
fn strength_auto_keeps_one_scored_candidate_and_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("confounded.parquet");
    synth(&input, &["--confounded", "--n", "1500", "--seed", "5"]);
    let out = dir.path().join("auto.parquet");
    let json = dir.path().join("summary.json");
    let negcon = "Metadata_PertType = 'negcon'";
    let label = ["--anchor-label", "Metadata_Compound"];
    let auto = [
        "--negcon",
        negcon,
        "--strength",
        "auto",
        "--summary-json",
        arg(&json),
    ];
    let o = correct(&input, &out, &[&label[..], &auto].concat());
    assert_ok(&o);
    assert_stderr_has(&o, "--strength auto chose strength");
    assert_dir_holds(
        dir.path(),
        &["confounded.parquet", "auto.parquet", "summary.json"],
    );
    let summary = read_json(&json);
    let candidates = summary["strength_auto"].as_array().unwrap();
    assert_eq!(candidates.len(), 6);
    let chosen: Vec<&serde_json::Value> =
        candidates.iter().filter(|c| c["chosen"] == true).collect();
    assert_eq!(chosen.len(), 1);
    let best = candidates
        .iter()
        .map(|c| c["criterion"]["score"].as_f64().unwrap())
        .fold(f64::NEG_INFINITY, f64::max);
    assert_eq!(chosen[0]["criterion"]["score"].as_f64().unwrap(), best);
    // The output is the chosen candidate: the same bytes as that setting run directly.
    let direct = dir.path().join("direct.parquet");
    let strength = chosen[0]["strength"].as_f64().unwrap().to_string();
    let passes = chosen[0]["passes"].as_u64().unwrap().to_string();
    let chosen_setting = ["--strength", &strength, "--iterations", &passes];
    assert_ok(&correct(
        &input,
        &direct,
        &[&label[..], &chosen_setting].concat(),
    ));
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&direct).unwrap()
    );
    std::fs::remove_file(&direct).unwrap();
    // It needs the controls it scores on, and chooses the passes itself.
    let other = dir.path().join("other.parquet");
    let o = correct(&input, &other, &["--strength", "auto"]);
    let held = ["confounded.parquet", "auto.parquet", "summary.json"];
    assert_fails_cleanly(o, dir.path(), &held, "give --negcon PREDICATE");
    let with_passes = [
        "--strength",
        "auto",
        "--negcon",
        negcon,
        "--iterations",
        "1",
    ];
    let o = correct(&input, &other, &with_passes);
    assert_fails_cleanly(o, dir.path(), &held, "leave out --iterations");
}

#[test]
fn hive_directory_input_gives_the_same_bytes_for_any_partition_count() {
    let dir = tempfile::tempdir().unwrap();
    // The synthetic table written by our own SQL, one directory per batch.
    let hive = dir.path().join("by_batch");
    let copy = format!(
        "{}; COPY (SELECT * FROM p) TO '{}' STORED AS PARQUET PARTITIONED BY (Metadata_Batch)",
        create_p(&synthetic_path()),
        hive.display()
    );
    balans_ok(&["sql", &copy]);
    assert!(hive.join("Metadata_Batch=batch_03").is_dir());
    // The partition column reads back: inspect and correct find the batch column.
    assert_stdout_has(&inspect(arg(&hive)), "batch_04");
    let mut outputs = Vec::new();
    for parts in ["1", "3", "7"] {
        let out = dir.path().join(format!("out{parts}.parquet"));
        // A landmark sample smaller than the table, so the row sample is exercised too.
        let o = correct(
            &hive,
            &out,
            &["--partitions", parts, "--sample-rows", "1000"],
        );
        assert_ok(&o);
        outputs.push(std::fs::read(&out).unwrap());
    }
    assert_eq!(outputs[0], outputs[1], "1 vs 3 partitions");
    assert_eq!(outputs[0], outputs[2], "1 vs 7 partitions");
    let out = read(&dir.path().join("out1.parquet"));
    assert_eq!(out.num_rows(), 3000);
    assert!(out.column_by_name("Metadata_Batch").is_some());
}

#[test]
fn synthetic_batches_mix_better_and_compounds_stay_apart() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("c.parquet");
    let input = synthetic_path();
    assert_ok(&correct(&input, &out, &[]));
    let before = read(Path::new(&input));
    let after = read(&out);
    // Same rows, same order, same metadata, same feature names.
    assert_eq!(before.num_rows(), after.num_rows());
    for name in [
        "Metadata_Batch",
        "Metadata_Plate",
        "Metadata_Well",
        "Metadata_Compound",
    ] {
        assert_eq!(
            before.column_by_name(name).unwrap().as_ref(),
            after.column_by_name(name).unwrap().as_ref(),
            "{name}"
        );
    }
    assert_eq!(column_names(&before), column_names(&after));
    let batch = codes(&before, "Metadata_Batch");
    let label = codes(&before, "Metadata_Compound");
    let (xb, d) = matrix(&before, "f");
    let (xa, _) = matrix(&after, "f");
    let (nb, na) = (knn_indices(&xb, d, 15), knn_indices(&xa, d, 15));
    let (mix_b, mix_a) = (batch_mixing(&nb, &batch), batch_mixing(&na, &batch));
    let (pur_b, pur_a) = (label_purity(&nb, &label), label_purity(&na, &label));
    eprintln!("mixing {mix_b:.3} -> {mix_a:.3}, label purity {pur_b:.3} -> {pur_a:.3}");
    assert!(
        mix_a > mix_b + 0.1,
        "batch mixing must improve: {mix_b} -> {mix_a}"
    );
    // Compounds stay apart: label purity does not drop (chance level is about 1/11).
    assert!(
        pur_a >= pur_b - 0.02 && pur_a > 0.5,
        "compounds must stay apart: purity {pur_b} -> {pur_a}"
    );
    // Key-value metadata records method, parameters and seed.
    let file = File::open(&out).unwrap();
    let meta = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .metadata()
        .clone();
    let kv = meta.file_metadata().key_value_metadata().unwrap();
    let get = |k: &str| kv.iter().find(|e| e.key == k).and_then(|e| e.value.clone());
    assert_eq!(get("balans.method").as_deref(), Some("balans"));
    assert_eq!(get("balans.seed").as_deref(), Some("0"));
    let parameters = get("balans.parameters").unwrap();
    assert!(
        parameters.contains("variant=residual") && parameters.contains("k=40"),
        "{parameters}"
    );
}

#[test]
fn bundled_example_runs_with_pca() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bbbc021_corrected.parquet");
    let (input, batch) = (example_path(), "Metadata_Batch");
    balans_ok(&[
        "correct",
        "--input",
        &input,
        "--batch",
        batch,
        "--output",
        arg(&out),
    ]);
    let after = read(&out);
    assert_eq!(after.num_rows(), 632);
    assert_eq!(after.num_columns(), 8 + 189);
    let (x, _) = matrix(&after, "Nuclei_");
    assert!(x.iter().all(|v| v.is_finite()));
}

#[test]
fn inspect_reports_schema_and_batches() {
    let o = inspect(&synthetic_path());
    assert_stdout_has(&o, "batch_04");
    assert_stdout_has(&o, "3000");
}

#[test]
fn missing_batch_column_and_no_features_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let input = small_table(dir.path(), "in.parquet", 3, 30);
    let out = dir.path().join("out.parquet");
    let by_plate = [
        "correct",
        "-i",
        &input,
        "-b",
        "Metadata_Plate",
        "-o",
        arg(&out),
    ];
    assert_fails_cleanly(
        balans(&by_plate),
        dir.path(),
        &["in.parquet"],
        "Metadata_Plate",
    );
    // Only metadata and a string column: no numeric features.
    let p = dir.path().join("nofeat.parquet");
    let rb = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("Metadata_Batch", DataType::Utf8, false),
            Field::new("name", DataType::Utf8, false),
        ])),
        vec![
            Arc::new(StringArray::from(vec!["a", "b"])),
            Arc::new(StringArray::from(vec!["x", "y"])),
        ],
    )
    .unwrap();
    write_parquet(&p, &rb);
    assert_fails_cleanly(
        correct(&p, &out, &[]),
        dir.path(),
        &["in.parquet", "nofeat.parquet"],
        "numeric",
    );
}

#[test]
fn non_finite_features_error_or_follow_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let (b, l, mut c) = table(3, 30, 4);
    c[2][5] = f64::NAN;
    c[3][7] = f64::INFINITY;
    let p = dir.path().join("nan.parquet");
    write_table(&p, &b, &l, &c);
    let out = dir.path().join("out.parquet");
    let (inp, outp) = (&p, &out);
    let o = correct(inp, outp, &["--k", "5"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("f2 (1)") && e.contains("f3 (1)") && e.contains("--nan"),
        "{e}"
    );
    assert_dir_holds(dir.path(), &["nan.parquet"]);
    assert_ok(&correct(inp, outp, &["--k", "5", "--nan", "drop-rows"]));
    assert_eq!(read(&out).num_rows(), 88);
    assert_ok(&correct(
        inp,
        outp,
        &["--k", "5", "--nan", "zero", "--overwrite"],
    ));
    assert_eq!(read(&out).num_rows(), 90);
}

#[test]
fn small_batch_clips_k_and_single_batch_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (mut b, l, c) = table(3, 30, 4);
    for v in b.iter_mut().take(4) {
        *v = "tiny".into();
    }
    let p = dir.path().join("small.parquet");
    write_table(&p, &b, &l, &c);
    let out = dir.path().join("out.parquet");
    let o = correct(&p, &out, &[]);
    assert_ok(&o);
    assert_stderr_has(&o, "'tiny' has 4 rows");
    assert_stderr_has(&o, "clipped");
    let single = small_table(dir.path(), "single.parquet", 1, 40);
    let out2 = dir.path().join("out2.parquet");
    assert_fails_cleanly(
        correct(&single, &out2, &[]),
        dir.path(),
        &["small.parquet", "out.parquet", "single.parquet"],
        "only one batch",
    );
}

#[test]
fn constant_features_pass_through_and_all_constant_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (b, l, mut c) = table(3, 30, 4);
    c[1].iter_mut().for_each(|v| *v = 7.0);
    let p = dir.path().join("const.parquet");
    write_table(&p, &b, &l, &c);
    let out = dir.path().join("out.parquet");
    let o = correct(&p, &out, &["--k", "5"]);
    assert_ok(&o);
    assert_stderr_has(&o, "constant feature");
    let after = read(&out);
    let f1 = after
        .column_by_name("f1")
        .unwrap()
        .as_primitive::<datafusion::arrow::datatypes::Float32Type>()
        .clone();
    assert!(f1.values().iter().all(|&v| (v - 7.0).abs() < 1e-5));
    c.iter_mut()
        .for_each(|col| col.iter_mut().for_each(|v| *v = 1.0));
    let p2 = dir.path().join("allconst.parquet");
    write_table(&p2, &b, &l, &c);
    let out2 = dir.path().join("out2.parquet");
    assert_fails_cleanly(
        correct(&p2, &out2, &[]),
        dir.path(),
        &["const.parquet", "out.parquet", "allconst.parquet"],
        "constant",
    );
}

#[test]
fn empty_and_corrupt_files_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (b, l, c) = table(3, 0, 4);
    let empty = dir.path().join("empty.parquet");
    write_table(&empty, &b, &l, &c);
    let out = dir.path().join("out.parquet");
    assert_fails_cleanly(
        correct(&empty, &out, &[]),
        dir.path(),
        &["empty.parquet"],
        "no rows",
    );
    let corrupt = dir.path().join("corrupt.parquet");
    std::fs::write(&corrupt, b"PAR1 this is not really parquet PAR1").unwrap();
    assert_fails_cleanly(
        correct(&corrupt, &out, &[]),
        dir.path(),
        &["empty.parquet", "corrupt.parquet"],
        "corrupt.parquet",
    );
    let zero = dir.path().join("zero.parquet");
    std::fs::write(&zero, b"").unwrap();
    assert_fails_cleanly(
        correct(&zero, &out, &[]),
        dir.path(),
        &["empty.parquet", "corrupt.parquet", "zero.parquet"],
        "zero.parquet",
    );
}

#[test]
fn unreachable_object_store_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.parquet");
    let t = Instant::now();
    let input = "s3://no-such-bucket/profiles/plate.parquet";
    let o = correct(input, &out, &["--s3-endpoint", "http://127.0.0.1:9"]);
    assert!(!o.status.success());
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    assert_stderr_has(&o, "s3://no-such-bucket");
    assert_dir_holds(dir.path(), &[]);
}

#[test]
fn existing_output_and_input_are_protected() {
    let dir = tempfile::tempdir().unwrap();
    let input = small_table(dir.path(), "in.parquet", 3, 30);
    let out = dir.path().join("out.parquet");
    std::fs::write(&out, b"keep me").unwrap();
    assert_fails_with(&correct(&input, &out, &[]), "--overwrite");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    let o = correct(&input, &input, &["--overwrite"]);
    assert_fails_with(&o, "never writes over its input");
    assert_ok(&correct(&input, &out, &["--overwrite"]));
    assert_eq!(read(&out).num_rows(), 90);
    assert_dir_holds(dir.path(), &["in.parquet", "out.parquet"]);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o644,
        "the result is an ordinary file, not a private temp file"
    );
}

#[test]
fn runs_under_a_memory_limit_below_the_input_size() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("big.parquet");
    // 100k rows x 40 features = 16 MB as float32 (32 MB as float64 in the file).
    synth(&input, &["--n", "100000", "--d", "40", "--seed", "1"]);
    let out = dir.path().join("out.parquet");
    let tmp = dir.path().join("work");
    let limit = |mb: &'static str| ["--memory-limit", mb, "--temp-dir", arg(&tmp)];
    assert_ok(&correct(
        &input,
        &out,
        &[&limit("8MB")[..], &["--pca", "10"]].concat(),
    ));
    assert_eq!(read(&out).num_rows(), 100_000);
    // A limit that cannot hold the sampler's per-row state fails with a clear message.
    let out2 = dir.path().join("out2.parquet");
    let o = correct(&input, &out2, &limit("1MB"));
    assert_fails_writing_nothing(&o, "memory limit", &out2);
    assert_dir_holds(&tmp, &[]);
}

#[test]
fn interrupt_removes_partial_output_and_working_files() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("big.parquet");
    synth(&input, &["--n", "400000", "--d", "10", "--seed", "2"]);
    let out = dir.path().join("out.parquet");
    let tmp = dir.path().join("work");
    let slow = ["--temp-dir", arg(&tmp), "--tau", "100000", "--block", "5"];
    let child = Command::new(env!("CARGO_BIN_EXE_balans"))
        .arg("--quiet")
        .args(correct_args(&input, &out, &slow))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(!out.exists());
    assert_dir_holds(dir.path(), &["big.parquet", "work"]);
    assert_dir_holds(&tmp, &[]);
}

#[test]
fn every_option_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let input = synthetic_path();
    let run = |name: &str, extra: &[&str]| -> RecordBatch {
        let out = dir.path().join(format!("{name}.parquet"));
        let o = correct(&input, &out, extra);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        read(&out)
    };
    let nystrom = run("nystrom", &["--estimator", "nystrom", "--variant", "paper"]);
    let (x, _) = matrix(&nystrom, "f");
    assert!(x.iter().all(|v| v.is_finite()));
    let pca = run("pca", &["--output-space", "pca", "--pca", "5"]);
    let names = column_names(&pca);
    assert_eq!(
        &names[names.len() - 5..],
        &["PC1", "PC2", "PC3", "PC4", "PC5"]
    );
    assert!(!names.iter().any(|n| n == "f0"));
    for (name, extra) in [
        ("cosine", vec!["--metric", "cosine"]),
        ("maxgap", vec!["--elbow", "max-gap"]),
        ("sorted", vec!["--elbow", "kneedle-sorted"]),
        ("loggap", vec!["--elbow", "max-log-gap"]),
        ("paper", vec!["--variant", "paper"]),
        ("balanced", vec!["--variant", "balanced"]),
        ("nofloor", vec!["--batch-knn-floor", "false"]),
    ] {
        assert_eq!(run(name, &extra).num_rows(), 3000);
    }
    // A landmark cap can stop before full coverage: the covered column says which rows moved.
    // One pass: with several, an uncovered row keeps the previous pass's value.
    let capped = run("capped", &["--max-landmarks", "3", "--iterations", "1"]);
    let covered = capped
        .column_by_name("Metadata_balans_covered")
        .unwrap()
        .as_boolean()
        .clone();
    let n_uncovered = (0..covered.len()).filter(|&i| !covered.value(i)).count();
    assert!(n_uncovered > 0, "3 landmarks cannot cover 3000 rows");
    let before = read(Path::new(&input));
    let (xb, d) = matrix(&before, "f");
    let (xc, _) = matrix(&capped, "f");
    for i in (0..covered.len()).filter(|&i| !covered.value(i)) {
        assert_eq!(
            &xb[i * d..(i + 1) * d],
            &xc[i * d..(i + 1) * d],
            "uncovered row {i} keeps its input"
        );
    }
    // Bad parameter values are rejected before any work.
    let (x, y) = (dir.path().join("x.parquet"), dir.path().join("y.parquet"));
    let o = correct(&input, &x, &["--estimator", "nystrom"]);
    assert_fails_with(&o, "--variant paper");
    assert_fails_with(&correct(&input, &x, &["--k", "0"]), "k must be at least 1");
    let o = correct(&input, &y, &["--output-space", "pca", "--pca", "off"]);
    assert_fails_with(&o, "needs PCA");
}

/// Largest `|a - b| / max(1, |b|)` over the feature columns of two tables, which must have
/// the same columns in the same order.
fn worst_feature_error(ours: &Path, golden: &Path) -> f64 {
    let (ours, golden) = (read(ours), read(golden));
    assert_eq!(
        column_names(&ours),
        column_names(&golden),
        "same columns, no helper column"
    );
    let mut worst = 0.0f64;
    for name in column_names(&golden)
        .iter()
        .filter(|n| !n.starts_with("Metadata_"))
    {
        for (a, b) in f64_column(&ours, name)
            .iter()
            .zip(f64_column(&golden, name))
        {
            worst = worst.max((a - b).abs() / b.abs().max(1.0));
        }
    }
    worst
}

/// `--method combat` reproduces scanpy's ComBat (golden/combat) through the whole engine, to
/// the float32 precision of the working files; a batch of one row is a clear error.
#[test]
fn combat_method_matches_scanpy_and_rejects_a_one_row_batch() {
    let dir = tempfile::tempdir().unwrap();
    let input = shared().join("golden/preprocess/final_mad_int_featselect.parquet");
    let out = dir.path().join("combat.parquet");
    let o = correct(&input, &out, &["--method", "combat"]);
    assert_ok(&o);
    assert_stderr_has(&o, "empirical Bayes");
    let golden = shared().join("golden/combat/bbbc021_combat.parquet");
    let worst = worst_feature_error(&out, &golden);
    assert!(worst < 1e-6, "worst relative error {worst:e}");
    // One row in batch B2: ComBat cannot estimate its variance.
    let (mut batch, mut label, mut cols) = table(2, 20, 4);
    batch.push("B2".into());
    label.push("L0".into());
    cols.iter_mut().for_each(|c| c.push(0.5));
    let small = dir.path().join("one_row_batch.parquet");
    write_table(&small, &batch, &label, &cols);
    let target = dir.path().join("x.parquet");
    let o = correct(&small, &target, &["--method", "combat"]);
    assert_fails_writing_nothing(&o, "batch 'B2' has 1 row(s)", &target);
}

/// `--method sphering` reproduces pycytominer's ZCA-cor fitted on the DMSO wells
/// (golden/sphering) to the float32 precision of the working files; without controls it fails
/// clearly and writes nothing.
#[test]
fn sphering_method_matches_pycytominer_and_needs_controls() {
    let dir = tempfile::tempdir().unwrap();
    let input = shared().join("golden/preprocess/final_mad_int_featselect.parquet");
    let out = dir.path().join("sphered.parquet");
    let negcon = "Metadata_PertType = 'negcon'";
    let args = [
        "--method",
        "sphering",
        "--negcon",
        negcon,
        "--epsilon",
        "1e-2",
    ];
    let o = correct(&input, &out, &args);
    assert_ok(&o);
    assert_stderr_has(&o, "330 negative-control rows");
    let golden = shared().join("golden/sphering/pycytominer_zca_cor_eps1e-2.parquet");
    let worst = worst_feature_error(&out, &golden);
    // float32 inputs through a whitening with condition number 3.4e4
    assert!(worst < 2e-5, "worst relative error {worst:e}");
    for (extra, needle) in [
        (vec!["--method", "sphering"], "give --negcon"),
        (
            vec![
                "--method",
                "sphering",
                "--negcon",
                "Metadata_PertType = 'none'",
            ],
            "0 row(s) matched",
        ),
    ] {
        let target = dir.path().join("x.parquet");
        let o = correct(&input, &target, &extra);
        assert_fails_writing_nothing(&o, needle, &target);
    }
}

/// `--method harmony` on the preprocessed BBBC021 table: the engine's PCA (float32 working
/// files, float64 Gram) feeds the harmonypy port, and the result matches harmonypy's output
/// (golden/harmony, from exact float64 PCs) to float32 rounding of the PCs, because the
/// random start picks the same cells (measured: 4.1e-5). The PCA's sign rule is the golden's
/// (largest loading positive), so the columns compare directly.
#[test]
fn harmony_method_matches_harmonypy() {
    let dir = tempfile::tempdir().unwrap();
    let input = shared().join("golden/preprocess/final_mad_int_featselect.parquet");
    let out = dir.path().join("harmony.parquet");
    let o = correct(&input, &out, &["--method", "harmony", "--pca", "50"]);
    assert_ok(&o);
    assert_stderr_has(&o, "21 clusters");
    let ours = read(&out);
    let golden = read(&shared().join("golden/harmony/bbbc021_harmony.parquet"));
    assert_eq!(ours.num_rows(), golden.num_rows());
    assert!(ours.column_by_name("PC50").is_some() && ours.column_by_name("PC51").is_none());
    let mut worst = 0.0f64;
    for i in 0..50 {
        let (a, b) = (
            f64_column(&ours, &format!("PC{}", i + 1)),
            f64_column(&golden, &format!("harmony_{i}")),
        );
        for (x, y) in a.iter().zip(&b) {
            worst = worst.max((x - y).abs());
        }
    }
    eprintln!("harmony through the engine: max |diff| {worst:e}");
    assert!(worst < 1e-3, "max |diff| {worst:e}");
}
