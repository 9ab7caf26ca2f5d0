//! `balans train` and the model-embedding step (`correct --method embed`, SQL's
//! `correct(..., method => 'embed')` and `embed(v, 'dir')`) on the bundled BBBC021 table.

mod common;

use std::path::Path;

use common::{
    arg, assert_fails_with, assert_ok, assert_stdout_has, balans, column_names, correct, create_p,
    example_path, read, read_json, sql_to, stderr,
};

const FEW: &str =
    "Cells_AreaShape_Compactness,Cells_AreaShape_Eccentricity,Cells_AreaShape_FormFactor";

/// Trains a small ABRA on the example table into `dir`.
fn train(dir: &Path, extra: &[&str]) -> std::process::Output {
    let example = example_path();
    let mut args = vec![
        "train",
        "--model",
        "abra",
        "-i",
        example.as_str(),
        "-b",
        "Metadata_Batch",
    ];
    args.extend(["--label", "Metadata_Compound", "-o", arg(dir)]);
    args.extend([
        "--hidden",
        "32",
        "--embedding",
        "8",
        "--epochs",
        "3",
        "--seed",
        "4",
    ]);
    args.extend_from_slice(extra);
    // Not --quiet: the epoch lines are part of what is tested.
    std::process::Command::new(env!("CARGO_BIN_EXE_balans"))
        .args(&args)
        .output()
        .expect("run balans")
}

#[test]
fn train_then_embed_from_the_command_line_and_sql() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("abra");
    let o = train(&model, &[]);
    assert_ok(&o);
    let log = stderr(&o);
    assert!(
        log.contains("abra epoch   1/3") && log.contains("validation"),
        "{log}"
    );
    assert!(model.join("model.safetensors").exists());
    assert!(model.join("config.json").exists());
    assert!(!dir.path().join("abra.partial").exists());
    let card = read_json(&model.join("config.json"));
    assert_eq!(card["architecture"]["kind"], "abra");
    assert_eq!(card["batch_column"], "Metadata_Batch");
    assert_eq!(card["history"].as_array().unwrap().len(), 3);
    assert!(!card["split"]["validation"].as_array().unwrap().is_empty());

    // The same seed gives the same weights.
    let again = dir.path().join("again");
    assert!(train(&again, &[]).status.success());
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        std::fs::read(again.join("model.safetensors")).unwrap()
    );
    // An existing model directory needs --overwrite.
    assert_fails_with(&train(&model, &[]), "--overwrite");

    // correct --method embed: metadata, then E1..E8, every row, and the metric suite.
    let out = dir.path().join("embedded.parquet");
    let embed = ["--method", "embed", "--model", arg(&model)];
    let scores = [
        "--evaluate",
        "--label",
        "Metadata_MoA",
        "--skip",
        "kbet,classifier",
    ];
    let o = correct(&example_path(), &out, &[&embed[..], &scores].concat());
    assert_ok(&o);
    assert_stdout_has(&o, "overall");
    let table = read(&out);
    assert_eq!(table.num_rows(), 632);
    let names = column_names(&table);
    let embedding: Vec<&String> = names
        .iter()
        .filter(|n| !n.starts_with("Metadata_"))
        .collect();
    assert_eq!(
        embedding,
        (1..=8)
            .map(|i| format!("E{i}"))
            .collect::<Vec<_>>()
            .iter()
            .collect::<Vec<_>>()
    );

    // Over several scan partitions the rows keep the input's order (files in path order).
    let parts = dir.path().join("parts");
    let local = create_p(&example_path());
    for (i, range) in ["< 200", "BETWEEN 200 AND 399", ">= 400"]
        .iter()
        .enumerate()
    {
        let o = balans(&[
            "sql",
            &format!(
                "{local}; COPY (SELECT * EXCLUDE (rn) FROM (SELECT *, row_number() OVER () - 1 \
                 AS rn FROM p) WHERE rn {range}) TO '{}/part-{i}.parquet' STORED AS PARQUET",
                parts.display()
            ),
        ]);
        assert_ok(&o);
    }
    let split = dir.path().join("split.parquet");
    assert_ok(&correct(
        &parts,
        &split,
        &[&embed[..], &["--partitions", "3"]].concat(),
    ));
    let (whole, split) = (read(&out), read(&split));
    assert_eq!(whole.column(2), split.column(2), "Metadata_Well order");
    assert_eq!(whole, split);

    // SQL: the same relation, and EXPLAIN names the operator.
    let script = format!(
        "{}; SELECT count(*) AS n, count(DISTINCT E1) AS distinct_e1 FROM \
         correct((SELECT * FROM p), method => 'embed', model => '{}')",
        create_p(&example_path()),
        model.display()
    );
    let o = balans(&["sql", &script]);
    assert_ok(&o);
    assert_stdout_has(&o, "| 632 |");
    let script = format!(
        "{}; EXPLAIN SELECT * FROM correct((SELECT * FROM p), method => 'embed', model => '{}')",
        create_p(&example_path()),
        model.display()
    );
    assert_stdout_has(&balans(&["sql", &script]), "EmbedExec: model=");
}

#[test]
fn the_embed_function_takes_packed_vectors_in_model_order() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("few");
    assert_ok(&train(&model, &["--features", FEW]));
    // The vector function and the relation agree.
    let script = format!(
        "{create}; CREATE TABLE a AS SELECT Metadata_Plate, Metadata_Well, \
           embed(pack_features(Cells_AreaShape_Compactness, Cells_AreaShape_Eccentricity, \
           Cells_AreaShape_FormFactor), '{m}') AS v FROM p; \
         CREATE TABLE b AS SELECT * FROM correct((SELECT * FROM p), method => 'embed', \
           model => '{m}'); \
         SELECT count(*) AS n, max(abs(a.v[1] - b.E1) + abs(a.v[8] - b.E8)) < 1e-6 AS same \
           FROM a JOIN b ON a.Metadata_Plate = b.Metadata_Plate AND a.Metadata_Well = b.Metadata_Well",
        create = create_p(&example_path()),
        m = model.display()
    );
    let o = balans(&["sql", &script]);
    assert_ok(&o);
    assert_stdout_has(&o, "| 632 | true |");
    // A vector of the wrong width is a planning error naming the model's features.
    let script = format!(
        "{}; SELECT embed(pack_features(Cells_AreaShape_Compactness), '{}') FROM p",
        create_p(&example_path()),
        model.display()
    );
    assert_fails_with(&balans(&["sql", &script]), "the model takes 3 features");
}

#[test]
fn bad_models_and_tables_are_clear_errors_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("few");
    assert_ok(&train(&model, &["--features", FEW]));
    let out = dir.path().join("x.parquet");
    let embed = |input: &str, model: &Path| {
        correct(input, &out, &["--method", "embed", "--model", arg(model)])
    };
    // A table without the model's features.
    let other = dir.path().join("other.parquet");
    let script = format!(
        "{}; SELECT Metadata_Batch, Cells_AreaShape_Compactness FROM p",
        create_p(&example_path())
    );
    assert_ok(&sql_to(&script, &other));
    let o = embed(arg(&other), &model);
    assert_fails_with(&o, "lacks 2 of the model's 3 features");
    assert!(!out.exists());
    // Not a model directory.
    assert_fails_with(&embed(&example_path(), dir.path()), "config.json");
    // --method embed needs --model; --model needs --method embed.
    let o = correct(&example_path(), &out, &["--method", "embed"]);
    assert_fails_with(&o, "--model DIR");
    let o = correct(&example_path(), &out, &["--model", arg(&model)]);
    assert_fails_with(&o, "--method embed only");
    assert!(!out.exists());
    // Training on a single batch cannot validate on held-out batches.
    let one = dir.path().join("one.parquet");
    let script = format!(
        "{}; SELECT * FROM p WHERE Metadata_Batch = 'Week1'",
        create_p(&example_path())
    );
    assert_ok(&sql_to(&script, &one));
    let bad = dir.path().join("bad");
    let mut args = vec!["train", "-i", arg(&one), "-b", "Metadata_Batch"];
    args.extend(["--label", "Metadata_Compound", "-o", arg(&bad)]);
    assert_fails_with(&balans(&args), "at least two batches");
    assert!(!bad.exists() && !dir.path().join("bad.partial").exists());
}

#[test]
fn an_unknown_or_unbuilt_device_is_a_clear_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model");
    assert_fails_with(
        &train(&out, &["--device", "tpu"]),
        "use cpu, cuda or cuda:N",
    );
    if !balans_learned::ComputeDevice::CUDA_BUILT {
        assert_fails_with(&train(&out, &["--device", "cuda:0"]), "--features cuda");
    }
    assert!(!out.exists() && !dir.path().join("model.partial").exists());
    // The default device is the CPU, and naming it is the same run.
    assert_ok(&train(&out, &["--device", "cpu"]));
}
