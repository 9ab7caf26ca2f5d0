//! The engine used as a library: plans show the Balans operator, real data sets correct
//! end to end with PCA, and the output keeps every input row.

use std::sync::Arc;

use balans_engine::source::{FeatureSelection, SourceOptions, register_profiles, resolve_columns};
use balans_engine::{CorrectRequest, SessionSettings, build_session, run_correct};
use balans_operators::exec::BalansSpec;
use balans_operators::{BalansConfig, NoProgress};
use balans_planner::balans_plan;
use balans_tests::shared_dir;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

#[tokio::test]
async fn explain_shows_the_balans_operator() {
    let ctx = build_session(&SessionSettings::default()).unwrap();
    let path = shared_dir().join("data/synthetic/synthetic_n3000_d20_k10_b5_seed7.parquet");
    let table = register_profiles(
        &ctx,
        path.to_str().unwrap(),
        "profiles",
        &SourceOptions::default(),
    )
    .await
    .unwrap();
    let roles = resolve_columns(
        &table.schema,
        &FeatureSelection::default(),
        &["Metadata_Batch".to_string()],
    )
    .unwrap();
    assert_eq!(roles.features.len(), 20);
    let df = ctx.table("profiles").await.unwrap();
    let spec = BalansSpec::new(
        roles.features.clone(),
        roles.batch.clone(),
        BalansConfig::paper(),
        Arc::new(NoProgress),
    );
    let plan = balans_plan(df.logical_plan().clone(), spec).unwrap();
    let logical = format!("{}", plan.display_indent());
    assert!(
        logical.contains("Balans: features=20, batch=[Metadata_Batch], variant=paper iterations=1")
            && logical.contains(" k=10 "),
        "{logical}"
    );
    let physical = ctx.state().create_physical_plan(&plan).await.unwrap();
    let shown = format!(
        "{}",
        datafusion::physical_plan::displayable(physical.as_ref()).indent(false)
    );
    // One operator per step, each showing its partitions.
    for step in [
        "OrderedConcatExec: partitions=1 in order",
        "BalansApplyExec: partitions=1, method=balans",
        "BalansSmoothExec: global, variant=paper",
        "BalansSmoothPartialExec: partitions=1",
        "BalansLandmarkExec: global, k=10",
        "BalansReduceExec: partitions=1, pca=off",
        "BalansProfileExec: global",
        "BalansIngestExec: partitions=1, features=20",
    ] {
        assert!(shown.contains(step), "{step}: {shown}");
    }
    // The default runs two passes: two chained operators, the second over the first.
    let spec = BalansSpec::new(
        roles.features,
        roles.batch,
        BalansConfig::default(),
        Arc::new(NoProgress),
    );
    let plan = balans_plan(df.logical_plan().clone(), spec).unwrap();
    let physical = ctx.state().create_physical_plan(&plan).await.unwrap();
    let shown = format!(
        "{}",
        datafusion::physical_plan::displayable(physical.as_ref()).indent(false)
    );
    let second = shown.find("BalansApplyExec: pass 2/2").expect(&shown);
    let first = shown.find("BalansApplyExec: pass 1/2").expect(&shown);
    assert!(second < first, "the last pass is the plan's root: {shown}");
}

#[tokio::test]
async fn varchamp_corrects_with_pca_under_a_memory_limit() {
    let ctx = build_session(&SessionSettings {
        memory_limit: Some(256 << 20),
        ..Default::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("varchamp.parquet");
    let request = CorrectRequest {
        input: shared_dir()
            .join("data/varchamp/varchamp_b20_b21_well.parquet")
            .display()
            .to_string(),
        output: output.clone(),
        batch: vec!["Metadata_Batch".into()],
        selection: FeatureSelection::default(),
        config: BalansConfig::default(),
        overwrite: false,
        source: SourceOptions::default(),
        negcon: None,
        anchor_label: None,
        model: None,
    };
    let outcome = run_correct(&ctx, &request, Arc::new(NoProgress))
        .await
        .unwrap();
    assert_eq!(outcome.written.rows, 2248);
    // Metadata_Count_Cells and Metadata_TechRep are numeric but metadata: not corrected.
    assert!(
        !outcome
            .roles
            .features
            .iter()
            .any(|f| f.starts_with("Metadata_"))
    );
    let file = std::fs::File::open(&output).unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
    assert_eq!(reader.metadata().file_metadata().num_rows(), 2248);
    let kv = reader
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .unwrap()
        .clone();
    let params = kv
        .iter()
        .find(|e| e.key == "balans.parameters")
        .unwrap()
        .value
        .clone()
        .unwrap();
    assert!(params.contains("pca=auto"), "{params}");
}
