//! `balans train` and the model-embedding step (`correct --method embed`, SQL's
//! `correct(..., method => 'embed')` and `embed(v, 'dir')`) on the bundled BBBC021 table.

mod common;

use std::path::Path;

use common::{balans, example_path, read, stderr, stdout};

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
        "--label",
        "Metadata_Compound",
        "-o",
        dir.to_str().unwrap(),
        "--hidden",
        "32",
        "--embedding",
        "8",
        "--epochs",
        "3",
        "--seed",
        "4",
    ];
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
    assert!(o.status.success(), "{}", stderr(&o));
    let log = stderr(&o);
    assert!(
        log.contains("abra epoch   1/3") && log.contains("validation"),
        "{log}"
    );
    assert!(model.join("model.safetensors").exists());
    assert!(model.join("config.json").exists());
    assert!(!dir.path().join("abra.partial").exists());
    let card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
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
    let o = train(&model, &[]);
    assert!(!o.status.success() && stderr(&o).contains("--overwrite"));

    // correct --method embed: metadata, then E1..E8, every row, and the metric suite.
    let out = dir.path().join("embedded.parquet");
    let o = balans(&[
        "correct",
        "-i",
        &example_path(),
        "-b",
        "Metadata_Batch",
        "-o",
        out.to_str().unwrap(),
        "--method",
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--evaluate",
        "--label",
        "Metadata_MoA",
        "--skip",
        "kbet,classifier",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("overall"), "{}", stdout(&o));
    let table = read(&out);
    assert_eq!(table.num_rows(), 632);
    let names: Vec<String> = table
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
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

    // SQL: the same relation, and EXPLAIN names the operator.
    let script = format!(
        "CREATE EXTERNAL TABLE p STORED AS PARQUET LOCATION '{}'; \
         SELECT count(*) AS n, count(DISTINCT E1) AS distinct_e1 FROM correct((SELECT * FROM p), \
         method => 'embed', model => '{}')",
        example_path(),
        model.display()
    );
    let o = balans(&["sql", &script]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("| 632 |"), "{}", stdout(&o));
    let script = format!(
        "CREATE EXTERNAL TABLE p STORED AS PARQUET LOCATION '{}'; EXPLAIN SELECT * FROM \
         correct((SELECT * FROM p), method => 'embed', model => '{}')",
        example_path(),
        model.display()
    );
    let o = balans(&["sql", &script]);
    assert!(stdout(&o).contains("EmbedExec: model="), "{}", stdout(&o));
}

#[test]
fn the_embed_function_takes_packed_vectors_in_model_order() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("few");
    let o = train(&model, &["--features", FEW]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The vector function and the relation agree.
    let script = format!(
        "CREATE EXTERNAL TABLE p STORED AS PARQUET LOCATION '{example}'; \
         CREATE TABLE a AS SELECT Metadata_Plate, Metadata_Well, \
           embed(pack_features(Cells_AreaShape_Compactness, Cells_AreaShape_Eccentricity, \
           Cells_AreaShape_FormFactor), '{m}') AS v FROM p; \
         CREATE TABLE b AS SELECT * FROM correct((SELECT * FROM p), method => 'embed', \
           model => '{m}'); \
         SELECT count(*) AS n, max(abs(a.v[1] - b.E1) + abs(a.v[8] - b.E8)) < 1e-6 AS same \
           FROM a JOIN b ON a.Metadata_Plate = b.Metadata_Plate AND a.Metadata_Well = b.Metadata_Well",
        example = example_path(),
        m = model.display()
    );
    let o = balans(&["sql", &script]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("| 632 | true |"), "{}", stdout(&o));
    // A vector of the wrong width is a planning error naming the model's features.
    let script = format!(
        "CREATE EXTERNAL TABLE p STORED AS PARQUET LOCATION '{}'; \
         SELECT embed(pack_features(Cells_AreaShape_Compactness), '{}') FROM p",
        example_path(),
        model.display()
    );
    let o = balans(&["sql", &script]);
    assert!(
        !o.status.success() && stderr(&o).contains("the model takes 3 features"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_models_and_tables_are_clear_errors_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("few");
    assert!(train(&model, &["--features", FEW]).status.success());
    let out = dir.path().join("x.parquet");
    let embed = |input: &str, model: &Path| {
        balans(&[
            "correct",
            "-i",
            input,
            "-b",
            "Metadata_Batch",
            "-o",
            out.to_str().unwrap(),
            "--method",
            "embed",
            "--model",
            model.to_str().unwrap(),
        ])
    };
    // A table without the model's features.
    let other = dir.path().join("other.parquet");
    let script = format!(
        "CREATE EXTERNAL TABLE p STORED AS PARQUET LOCATION '{}'; \
         SELECT Metadata_Batch, Cells_AreaShape_Compactness FROM p",
        example_path()
    );
    assert!(
        balans(&["sql", &script, "--output", other.to_str().unwrap()])
            .status
            .success()
    );
    let o = embed(other.to_str().unwrap(), &model);
    assert!(
        !o.status.success() && stderr(&o).contains("lacks 2 of the model's 3 features"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
    // Not a model directory.
    let o = embed(&example_path(), dir.path());
    assert!(
        !o.status.success() && stderr(&o).contains("config.json"),
        "{}",
        stderr(&o)
    );
    // --method embed needs --model; --model needs --method embed.
    let o = balans(&[
        "correct",
        "-i",
        &example_path(),
        "-b",
        "Metadata_Batch",
        "-o",
        out.to_str().unwrap(),
        "--method",
        "embed",
    ]);
    assert!(!o.status.success() && stderr(&o).contains("--model DIR"));
    let o = balans(&[
        "correct",
        "-i",
        &example_path(),
        "-b",
        "Metadata_Batch",
        "-o",
        out.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
    ]);
    assert!(!o.status.success() && stderr(&o).contains("--method embed only"));
    assert!(!out.exists());
    // Training on a single batch cannot validate on held-out batches.
    let one = dir.path().join("one.parquet");
    let script = format!(
        "CREATE EXTERNAL TABLE p STORED AS PARQUET LOCATION '{}'; \
         SELECT * FROM p WHERE Metadata_Batch = 'Week1'",
        example_path()
    );
    assert!(
        balans(&["sql", &script, "--output", one.to_str().unwrap()])
            .status
            .success()
    );
    let bad = dir.path().join("bad");
    let o = balans(&[
        "train",
        "-i",
        one.to_str().unwrap(),
        "-b",
        "Metadata_Batch",
        "--label",
        "Metadata_Compound",
        "-o",
        bad.to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("at least two batches"),
        "{}",
        stderr(&o)
    );
    assert!(!bad.exists() && !dir.path().join("bad.partial").exists());
}

#[test]
fn an_unknown_or_unbuilt_device_is_a_clear_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("model");
    let o = train(&out, &["--device", "tpu"]);
    assert!(
        !o.status.success() && stderr(&o).contains("use cpu, cuda or cuda:N"),
        "{}",
        stderr(&o)
    );
    if !balans_learned::ComputeDevice::CUDA_BUILT {
        let o = train(&out, &["--device", "cuda:0"]);
        assert!(
            !o.status.success() && stderr(&o).contains("--features cuda"),
            "{}",
            stderr(&o)
        );
    }
    assert!(!out.exists() && !dir.path().join("model.partial").exists());
    // The default device is the CPU, and naming it is the same run.
    let o = train(&out, &["--device", "cpu"]);
    assert!(o.status.success(), "{}", stderr(&o));
}
