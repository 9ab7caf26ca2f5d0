//! The `correct` job: read a profile table, run BALANS (or ComBat), write corrected profiles
//! atomically.

use std::path::PathBuf;
use std::sync::Arc;

use balans_operators::exec::BalansSpec;
use balans_operators::{BalansConfig, Method, ProgressSink};
use balans_planner::{FIT_MASK_COLUMN, balans_plan};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::execute_stream;
use datafusion::prelude::SessionContext;

use crate::error::{BalansError, Result};
use crate::evaluate::negcon_predicate;
use crate::source::{
    ColumnRoles, FeatureSelection, ProfileTable, SourceOptions, register_profiles, resolve_columns,
};
use crate::writer::{WriteStats, check_output, write_parquet_atomic};

/// A correction request.
#[derive(Debug, Clone)]
pub struct CorrectRequest {
    /// Input location (path, directory, glob, `file://`, `s3://`, `https://`).
    pub input: String,
    /// Output Parquet file.
    pub output: PathBuf,
    /// Batch key columns.
    pub batch: Vec<String>,
    /// Feature selection.
    pub selection: FeatureSelection,
    /// BALANS parameters.
    pub config: BalansConfig,
    /// Replace an existing output file.
    pub overwrite: bool,
    /// Object-store options.
    pub source: SourceOptions,
    /// SQL predicate marking the negative controls (what sphering is fitted on; BALANS's
    /// anchors with `--anchor negcon`).
    pub negcon: Option<String>,
    /// Label column whose values shared by at least two batches are BALANS's anchors
    /// (`--anchor label`).
    pub anchor_label: Option<String>,
    /// Model directory of the model-embedding step (`--method embed`): when given, the
    /// model's embedding replaces the correction.
    pub model: Option<PathBuf>,
}

/// What a correction did.
#[derive(Debug, Clone)]
pub struct CorrectOutcome {
    /// The input table.
    pub table: ProfileTable,
    /// The column roles used.
    pub roles: ColumnRoles,
    /// What was written.
    pub written: WriteStats,
}

/// Runs BALANS on `request` in `ctx` (built with [`crate::session::build_session`]).
pub async fn run_correct(
    ctx: &SessionContext,
    request: &CorrectRequest,
    progress: Arc<dyn ProgressSink>,
) -> Result<CorrectOutcome> {
    request
        .config
        .validate()
        .map_err(|e| BalansError::InvalidArgument(e.to_string()))?;
    check_output(
        &request.output,
        request.overwrite,
        std::slice::from_ref(&request.input),
    )?;
    let table = register_profiles(ctx, &request.input, "profiles", &request.source).await?;
    check_output(&request.output, request.overwrite, &table.files)?;
    let corrected = correct_stream(ctx, &table, request, progress).await?;
    let written = write_parquet_atomic(corrected.stream, &request.output, corrected.metadata)
        .await
        .map_err(unwrap_operator_error)?;
    Ok(CorrectOutcome {
        table,
        roles: corrected.roles,
        written,
    })
}

/// A planned correction whose output has not been consumed yet (see [`correct_stream`]).
pub struct CorrectStream {
    /// The corrected rows, in input order; operator errors arrive wrapped by DataFusion
    /// (pass them through [`unwrap_operator_error`]).
    pub stream: SendableRecordBatchStream,
    /// The column roles used.
    pub roles: ColumnRoles,
    /// The key-value metadata `run_correct` writes into the Parquet footer.
    pub metadata: Vec<(String, String)>,
}

/// Plans the correction of `request` over `table`, a table already registered in `ctx`
/// (by [`register_profiles`] or as an in-memory table), and returns the output as a stream.
/// `request.output` and `request.overwrite` are not used; `request.input` only names the
/// input in the metadata. Dropping the stream cancels the job.
pub async fn correct_stream(
    ctx: &SessionContext,
    table: &ProfileTable,
    request: &CorrectRequest,
    progress: Arc<dyn ProgressSink>,
) -> Result<CorrectStream> {
    let (plan, roles) = correct_plan(ctx, table, request, progress).await?;
    let physical = ctx
        .state()
        .create_physical_plan(&plan)
        .await
        .map_err(map_planning_error)?;
    let stream = execute_stream(physical, ctx.task_ctx())?;
    let metadata: Vec<(String, String)> = vec![
        (
            "balans.method".to_string(),
            match &request.model {
                Some(_) => "embed".to_string(),
                None => request.config.method.to_string(),
            },
        ),
        (
            "balans.version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
        ("balans.parameters".to_string(), request.config.describe()),
        ("balans.seed".to_string(), request.config.seed.to_string()),
        ("balans.batch".to_string(), roles.batch.join(",")),
        (
            "balans.features".to_string(),
            roles.features.len().to_string(),
        ),
        ("balans.input".to_string(), request.input.clone()),
    ]
    .into_iter()
    .chain(
        request
            .model
            .iter()
            .map(|dir| ("balans.model".to_string(), dir.display().to_string())),
    )
    .collect();
    Ok(CorrectStream {
        stream,
        roles,
        metadata,
    })
}

/// The logical plan of `request` over `table` (registered in `ctx`): a `BalansNode` per pass
/// (or an `EmbedNode`) over the table's scan, and the column roles it uses.
pub async fn correct_plan(
    ctx: &SessionContext,
    table: &ProfileTable,
    request: &CorrectRequest,
    progress: Arc<dyn ProgressSink>,
) -> Result<(LogicalPlan, ColumnRoles)> {
    request
        .config
        .validate()
        .map_err(|e| BalansError::InvalidArgument(e.to_string()))?;
    let roles = resolve_columns(&table.schema, &request.selection, &request.batch)?;
    let mut df = ctx.table(table.table_name.as_str()).await?;
    let mut spec = BalansSpec::new(
        roles.features.clone(),
        roles.batch.clone(),
        request.config.clone(),
        progress,
    );
    let anchor = request.config.anchor;
    if request.config.method == Method::Sphering || anchor.negcon() {
        let predicate = request.negcon.as_deref().ok_or_else(|| {
            BalansError::InvalidArgument(if anchor.negcon() {
                "--anchor negcon estimates the batch offsets from the negative controls: give \
                 --negcon PREDICATE (e.g. \"Metadata_PertType = 'negcon'\")"
                    .into()
            } else {
                "--method sphering is fitted on negative controls: give --negcon PREDICATE \
                 (e.g. \"Metadata_PertType = 'negcon'\")"
                    .into()
            })
        })?;
        let mask = negcon_predicate(&df, predicate)?;
        df = df.with_column(FIT_MASK_COLUMN, mask)?;
        spec.fit_mask = Some(FIT_MASK_COLUMN.to_string());
    }
    if anchor.label() {
        spec.anchor_label = Some(request.anchor_label.clone().ok_or_else(|| {
            BalansError::InvalidArgument(
                "--anchor label needs --anchor-label COL (e.g. Metadata_Compound): rows whose \
                 value occurs in at least two batches are the anchors"
                    .into(),
            )
        })?);
    } else if request.anchor_label.is_some() {
        return Err(BalansError::InvalidArgument(
            "--anchor-label is used with --anchor label or --anchor both".into(),
        ));
    }
    let plan = match &request.model {
        Some(dir) => balans_planner::embed::embed_plan(df.logical_plan().clone(), dir)
            .map_err(map_planning_error)?,
        None => balans_plan(df.logical_plan().clone(), spec).map_err(map_planning_error)?,
    };
    Ok((plan, roles))
}

fn map_planning_error(e: datafusion::error::DataFusionError) -> BalansError {
    unwrap_operator_error(BalansError::DataFusion(e))
}

/// Turns operator errors wrapped by DataFusion back into clear engine errors.
pub fn unwrap_operator_error(e: BalansError) -> BalansError {
    use balans_operators::OperatorError;
    use datafusion::error::DataFusionError;
    fn find(e: &DataFusionError) -> Option<BalansError> {
        match e {
            DataFusionError::External(inner) => {
                inner.downcast_ref::<OperatorError>().map(|op| match op {
                    OperatorError::BadInput(m) => BalansError::BadInput(m.clone()),
                    OperatorError::InvalidParameter(m) => BalansError::InvalidArgument(m.clone()),
                    other => BalansError::BadInput(other.to_string()),
                })
            }
            DataFusionError::ResourcesExhausted(m) => {
                Some(BalansError::BadInput(format!("out of memory budget: {m}")))
            }
            DataFusionError::Context(_, inner) => find(inner),
            DataFusionError::Shared(inner) => find(inner),
            _ => None,
        }
    }
    match &e {
        BalansError::DataFusion(df) => find(df).unwrap_or(e),
        _ => e,
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::*;
    use crate::session::{SessionSettings, build_session};
    use crate::source::TableFormat;
    use balans_operators::NoProgress;
    use datafusion::datasource::MemTable;
    use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use futures::TryStreamExt;

    fn bbbc021() -> String {
        format!(
            "{}/../examples/data/bbbc021.parquet",
            env!("CARGO_MANIFEST_DIR")
        )
    }

    #[tokio::test]
    async fn in_memory_table_corrects_like_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let request = CorrectRequest {
            input: bbbc021(),
            output: dir.path().join("out.parquet"),
            batch: vec!["Metadata_Batch".into()],
            selection: FeatureSelection::default(),
            config: BalansConfig::default(),
            overwrite: false,
            source: SourceOptions::default(),
            negcon: None,
            anchor_label: None,
            model: None,
        };
        let ctx = build_session(&SessionSettings::default()).unwrap();
        run_correct(&ctx, &request, Arc::new(NoProgress))
            .await
            .unwrap();
        let from_file: Vec<_> =
            ParquetRecordBatchReaderBuilder::try_new(File::open(&request.output).unwrap())
                .unwrap()
                .build()
                .unwrap()
                .collect::<std::result::Result<_, _>>()
                .unwrap();

        let input: Vec<_> =
            ParquetRecordBatchReaderBuilder::try_new(File::open(bbbc021()).unwrap())
                .unwrap()
                .build()
                .unwrap()
                .collect::<std::result::Result<_, _>>()
                .unwrap();
        let schema = input[0].schema();
        let ctx = build_session(&SessionSettings::default()).unwrap();
        ctx.register_table(
            "memory",
            Arc::new(MemTable::try_new(schema.clone(), vec![input]).unwrap()),
        )
        .unwrap();
        let table = ProfileTable {
            table_name: "memory".into(),
            location: "<memory>".into(),
            format: TableFormat::ArrowIpc,
            files: Vec::new(),
            schema,
        };
        let corrected = correct_stream(&ctx, &table, &request, Arc::new(NoProgress))
            .await
            .unwrap();
        assert!(corrected.metadata.iter().any(|(k, _)| k == "balans.seed"));
        let batches: Vec<_> = corrected.stream.try_collect().await.unwrap();
        let concat = |b: &[datafusion::arrow::array::RecordBatch]| {
            datafusion::arrow::compute::concat_batches(&b[0].schema(), b).unwrap()
        };
        let (a, b) = (concat(&from_file), concat(&batches));
        assert_eq!(a.num_rows(), b.num_rows());
        assert_eq!(a.columns(), b.columns());
    }
}
