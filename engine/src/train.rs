//! The `train` job: read a profile table, train a learned model ([`balans_learned`]) with
//! batches held out for validation, and leave the best checkpoint in a model directory.
//!
//! Checkpoints are written to `<output>.partial/` while training runs (so an interrupted run
//! leaves its best epoch there) and the directory is renamed to `<output>` when training
//! ends; a failed run removes it and leaves no model behind.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use balans_learned::{
    AbraConfig, CellPainTrConfig, EpochRecord, Profiles, TrainOptions, TrainOutcome, train_abra,
    train_cellpaintr,
};
use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float32Type};
use datafusion::prelude::{SessionContext, ident};
use futures::StreamExt;

use crate::error::{BalansError, Result};
use crate::source::{FeatureSelection, SourceOptions, register_profiles, resolve_columns};

/// The learned models `balans train` builds.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSpec {
    /// ABRA with its settings.
    Abra(AbraConfig),
    /// CellPainTR with its settings (the sources are the training batches).
    CellPainTr(CellPainTrConfig),
}

/// A training request.
#[derive(Debug, Clone)]
pub struct TrainRequest {
    /// Input location.
    pub input: String,
    /// Model directory to create.
    pub output: PathBuf,
    /// Batch column (validation batches are held out whole).
    pub batch: String,
    /// Label column (perturbation, compound or MoA).
    pub label: String,
    /// Feature columns.
    pub selection: FeatureSelection,
    /// Object-store options.
    pub source: SourceOptions,
    /// The model.
    pub model: ModelSpec,
    /// Optimisation settings.
    pub options: TrainOptions,
    /// Replace an existing model directory.
    pub overwrite: bool,
}

/// Reads the features (as `f32`), batch and label of every row.
pub async fn read_profiles(
    ctx: &SessionContext,
    input: &str,
    batch: &str,
    label: &str,
    selection: &FeatureSelection,
    source: &SourceOptions,
) -> Result<Profiles> {
    let table = register_profiles(ctx, input, "training_profiles", source).await?;
    let keys = vec![batch.to_string(), label.to_string()];
    let roles = resolve_columns(&table.schema, selection, &keys)?;
    let features = roles.features;
    let mut columns = vec![ident(batch), ident(label)];
    columns.extend(features.iter().map(ident));
    let df = ctx.table("training_profiles").await?.select(columns)?;
    let mut stream = df.execute_stream().await?;
    let mut profiles = Profiles {
        x: Vec::new(),
        features: features.clone(),
        batches: Vec::new(),
        labels: Vec::new(),
    };
    let d = features.len();
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        let n = batch.num_rows();
        for (target, c) in [(&mut profiles.batches, 0), (&mut profiles.labels, 1)] {
            let text = cast(batch.column(c), &DataType::Utf8)?;
            let text = text.as_string::<i32>();
            target.extend((0..n).map(|i| {
                if text.is_null(i) {
                    "null".to_string()
                } else {
                    text.value(i).to_string()
                }
            }));
        }
        let start = profiles.x.len();
        profiles.x.resize(start + n * d, 0.0);
        for j in 0..d {
            let values = cast(batch.column(2 + j), &DataType::Float32)?;
            let values = values.as_primitive::<Float32Type>();
            for i in 0..n {
                profiles.x[start + i * d + j] = if values.is_null(i) {
                    f32::NAN
                } else {
                    values.value(i)
                };
            }
        }
    }
    if profiles.batches.is_empty() {
        return Err(BalansError::BadInput("the input has no rows".into()));
    }
    Ok(profiles)
}

fn partial_dir(output: &Path) -> PathBuf {
    let mut name = output
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "model".into());
    name.push(".partial");
    output.with_file_name(name)
}

/// Trains the requested model; `progress` receives every epoch (on the training thread) and
/// `cancel` stops training between mini-batches.
pub async fn run_train(
    ctx: &SessionContext,
    request: &TrainRequest,
    progress: Box<dyn FnMut(&EpochRecord) + Send>,
    cancel: Arc<AtomicBool>,
) -> Result<TrainOutcome> {
    // An unusable device fails before any data is read.
    request.options.device.open()?;
    let output = &request.output;
    if output.exists() {
        let empty = output.is_dir()
            && std::fs::read_dir(output)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
        if !empty && !request.overwrite {
            return Err(BalansError::InvalidArgument(format!(
                "{} exists; give --overwrite to replace it",
                output.display()
            )));
        }
        if !output.is_dir() {
            return Err(BalansError::InvalidArgument(format!(
                "{} is a file; the model output is a directory",
                output.display()
            )));
        }
    }
    let input_path = Path::new(&request.input);
    if input_path.exists()
        && let (Ok(a), Ok(b)) = (
            input_path.canonicalize(),
            output.canonicalize().or_else(|_| {
                output
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."))
                    .canonicalize()
                    .map(|p| p.join(output.file_name().unwrap_or_default()))
            }),
        )
        && (a == b || a.starts_with(&b))
    {
        return Err(BalansError::InvalidArgument(
            "the model directory must not be (or contain) the input".into(),
        ));
    }
    let profiles = read_profiles(
        ctx,
        &request.input,
        &request.batch,
        &request.label,
        &request.selection,
        &request.source,
    )
    .await?;
    let partial = partial_dir(output);
    if partial.exists() {
        std::fs::remove_dir_all(&partial)?;
    }
    let model = request.model.clone();
    let options = request.options.clone();
    let target = partial.clone();
    let mut progress = progress;
    let result = tokio::task::spawn_blocking(move || match model {
        ModelSpec::Abra(config) => train_abra(
            &profiles,
            config,
            &options,
            &target,
            &mut *progress,
            &cancel,
        ),
        ModelSpec::CellPainTr(config) => train_cellpaintr(
            &profiles,
            config,
            &options,
            &target,
            &mut *progress,
            &cancel,
        ),
    })
    .await
    .map_err(|e| BalansError::BadInput(format!("training stopped: {e}")))?;
    match result {
        Ok(outcome) => {
            if output.exists() {
                std::fs::remove_dir_all(output)?;
            }
            std::fs::rename(&partial, output)?;
            Ok(outcome)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            Err(e.into())
        }
    }
}
