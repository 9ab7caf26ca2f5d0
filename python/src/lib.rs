//! # balans-python
//!
//! The native module `balans._balans` of the `balans` Python package (built with maturin):
//! the engine's jobs (`correct`, `evaluate`, `preprocess`, `train`, `inspect`, `sql`) with
//! the CLI's option names. Tables cross the boundary through the Arrow PyCapsule C stream
//! interface ([`arrow`]); jobs run off the GIL with Ctrl-C checks ([`runtime`]). The typed,
//! documented API users call is `python/python/balans/__init__.py`.

mod arrow;
mod error;
mod options;
mod runtime;

use std::path::PathBuf;
use std::sync::Arc;

use balans_engine::correct::{CorrectRequest, correct_stream};
use balans_engine::evaluate::{EvaluateRequest, render_report, run_evaluate};
use balans_engine::preprocess::{
    Aggregation, PreprocessRequest, SelectName, StepOptions, read_blocklist, run_preprocess,
};
use balans_engine::session::{SessionSettings, build_session, parse_bytes};
use balans_engine::source::{
    FeatureSelection, ProfileTable, SourceOptions, TableFormat, inspect as inspect_table,
    register_profiles,
};
use balans_engine::train::{ModelSpec, TrainRequest, run_train};
use balans_engine::writer::write_bytes_atomic;
use balans_metrics::suite::{EvalOptions, MetricSelection};
use balans_operators::config::{HarmonyOptions, Metric};
use balans_operators::kernels::preprocess::Normalization;
use balans_operators::{
    Anchor, BalansConfig, ElbowRule, Estimator, NanPolicy, OutputSpace, SpheringMethod, Variant,
};
use datafusion::arrow::array::{RecordBatch, RecordBatchReader};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::datasource::MemTable;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::prelude::SessionContext;
use futures::TryStreamExt;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use crate::arrow::{ArrowStream, import_stream};
use crate::error::{Error, Result};
use crate::options::Options;
use crate::runtime::{Event, EventQueue, run_job};

/// Name under which an in-memory input is registered in the job's session.
const MEMORY_TABLE: &str = "profiles";

/// A job's input: a location the engine reads itself, or Arrow batches from Python.
enum Input {
    /// A path or URL (local, glob, directory, `file://`, `s3://`, `https://`).
    Location(String),
    /// Batches imported through the C stream interface (not copied).
    Memory(SchemaRef, Vec<RecordBatch>),
}

impl Input {
    /// `data`: a `str` / `os.PathLike` location, or an object with `__arrow_c_stream__`.
    fn from_py(data: &Bound<'_, PyAny>) -> PyResult<Self> {
        if data.is_instance_of::<PyString>() {
            return Ok(Input::Location(data.extract()?));
        }
        if data.hasattr("__fspath__")? {
            return Ok(Input::Location(data.call_method0("__fspath__")?.extract()?));
        }
        if data.hasattr("__arrow_c_stream__")? {
            let (schema, batches) = import_stream(data)?;
            return Ok(Input::Memory(schema, batches));
        }
        Err(Error::invalid(format!(
            "data must be a path or URL, or a table with the Arrow C stream interface \
             (pyarrow, polars, pandas via balans), not {}",
            data.get_type().name()?
        ))
        .into())
    }

    /// How the input is named in metadata and reports: its location, or `<memory>`.
    fn name(&self) -> String {
        match self {
            Input::Location(location) => location.clone(),
            Input::Memory(..) => "<memory>".to_string(),
        }
    }

    /// The location the engine can open: for in-memory batches an Arrow IPC file written
    /// (streamed, one batch at a time) into `spool`.
    fn location(&self, spool: &tempfile::TempDir) -> Result<String> {
        match self {
            Input::Location(location) => Ok(location.clone()),
            Input::Memory(schema, batches) => {
                let path = spool.path().join("input.arrow");
                let file = std::fs::File::create(&path).map_err(balans_engine::BalansError::Io)?;
                let mut writer = datafusion::arrow::ipc::writer::FileWriter::try_new(
                    std::io::BufWriter::new(file),
                    schema,
                )?;
                for batch in batches {
                    writer.write(batch)?;
                }
                writer.finish()?;
                Ok(path.display().to_string())
            }
        }
    }

    /// Registers the input as table `name` in `ctx`: in-memory batches as a memory table
    /// over the same buffers, a location through the engine's sources.
    async fn register(
        self,
        ctx: &SessionContext,
        name: &str,
        source: &SourceOptions,
    ) -> Result<ProfileTable> {
        match self {
            Input::Location(location) => Ok(register_profiles(ctx, &location, name, source).await?),
            Input::Memory(schema, batches) => {
                if batches.iter().all(|b| b.num_rows() == 0) {
                    return Err(balans_engine::BalansError::BadInput(
                        "the input table has no rows".into(),
                    )
                    .into());
                }
                ctx.register_table(
                    name,
                    Arc::new(MemTable::try_new(schema.clone(), vec![batches])?),
                )?;
                Ok(ProfileTable {
                    table_name: name.to_string(),
                    location: "<memory>".into(),
                    format: TableFormat::ArrowIpc,
                    files: Vec::new(),
                    schema,
                })
            }
        }
    }
}

/// Session settings from `memory_limit=` (`"2GB"` or bytes) and `temp_dir=`.
fn session_settings(options: &Options<'_>, source: &SourceOptions) -> PyResult<SessionSettings> {
    Ok(SessionSettings {
        memory_limit: options
            .text("memory_limit")?
            .as_deref()
            .map(parse_bytes)
            .transpose()
            .map_err(Error::from)?,
        temp_dir: options.get::<PathBuf>("temp_dir")?,
        source: source.clone(),
        ..SessionSettings::default()
    })
}

fn source_options(options: &Options<'_>) -> PyResult<SourceOptions> {
    Ok(SourceOptions {
        s3_endpoint: options.get("s3_endpoint")?,
        ..SourceOptions::default()
    })
}

fn selection(options: &Options<'_>) -> PyResult<FeatureSelection> {
    Ok(FeatureSelection {
        include: options.list("features")?,
        exclude: options.list("exclude")?,
    })
}

/// Reads a Parquet file the engine wrote back into batches.
fn read_parquet(path: &std::path::Path) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let file = std::fs::File::open(path).map_err(balans_engine::BalansError::Io)?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(balans_engine::BalansError::from)?
        .build()
        .map_err(balans_engine::BalansError::from)?;
    let schema = reader.schema();
    let batches = reader.collect::<std::result::Result<Vec<_>, _>>()?;
    Ok((schema, batches))
}

/// Adds key-value metadata (what the CLI writes into the Parquet footer) to `schema`.
fn with_metadata(schema: &SchemaRef, metadata: Vec<(String, String)>) -> SchemaRef {
    let mut map = schema.metadata().clone();
    map.extend(metadata);
    Arc::new(schema.as_ref().clone().with_metadata(map))
}

fn rebind(batches: Vec<RecordBatch>, schema: &SchemaRef) -> Result<Vec<RecordBatch>> {
    batches
        .into_iter()
        .map(|b| RecordBatch::try_new(schema.clone(), b.columns().to_vec()).map_err(Error::from))
        .collect()
}

/// The BALANS configuration of `correct`'s options (the CLI's `correct_config`).
fn correct_config(options: &Options<'_>, method: usize) -> PyResult<BalansConfig> {
    let variant = match options.choice("variant", &["residual", "balanced", "paper"])? {
        Some(1) => Variant::Balanced,
        Some(2) => Variant::Paper,
        _ => Variant::Residual,
    };
    let base = BalansConfig::for_variant(variant);
    let anchor_label: Option<String> = options.get("anchor_label")?;
    let anchor = match options.choice("anchor", &["none", "negcon", "label", "both"])? {
        Some(0) => Anchor::None,
        Some(1) => Anchor::Negcon,
        Some(2) => Anchor::Label,
        Some(_) => Anchor::Both,
        None if anchor_label.is_some() => Anchor::Label,
        None => Anchor::None,
    };
    options.dict_put_back("anchor_label", anchor_label)?;
    let strength = match options.text("strength")?.as_deref().map(str::trim) {
        None | Some("auto") => base.strength,
        Some(text) => text.parse().map_err(|_| {
            Error::invalid(format!(
                "--strength takes a number in (0, 1] or 'auto', not '{text}'"
            ))
        })?,
    };
    let config = BalansConfig {
        method: match method {
            1 => balans_operators::Method::ComBat,
            2 => balans_operators::Method::Sphering,
            3 => balans_operators::Method::Harmony,
            _ => balans_operators::Method::Balans,
        },
        harmony: HarmonyOptions {
            clusters: options.get("clusters")?,
            theta: options.get("theta")?.unwrap_or(2.0),
            sigma: options.get("sigma")?.unwrap_or(0.1),
            max_iterations: options.get("harmony_iterations")?.unwrap_or(10),
        },
        sphering: match options.choice("sphering", &["zca", "zca-cor"])? {
            Some(0) => SpheringMethod::Zca,
            _ => SpheringMethod::ZcaCor,
        },
        epsilon: options.get("epsilon")?.unwrap_or(1e-6),
        k: options.get("k")?.unwrap_or(base.k),
        tau: options.get("tau")?.unwrap_or(base.tau),
        block: options.get("block")?.unwrap_or(base.block),
        pca: match options.text("pca")? {
            Some(text) => balans_planner::parameters::pca_setting(&text).map_err(Error::from)?,
            None => base.pca,
        },
        elbow: match options.choice(
            "elbow",
            &["kneedle", "kneedle-sorted", "max-gap", "max-log-gap"],
        )? {
            Some(0) => ElbowRule::Kneedle,
            Some(1) => ElbowRule::KneedleSorted,
            Some(2) => ElbowRule::MaxGap,
            Some(_) => ElbowRule::MaxLogGap,
            None => base.elbow,
        },
        batch_knn_floor: options
            .get("batch_knn_floor")?
            .unwrap_or(base.batch_knn_floor),
        strength,
        iterations: options.get("iterations")?.unwrap_or(base.iterations),
        estimator: match options.choice("estimator", &["smooth", "nystrom"])? {
            Some(0) => Estimator::Smooth,
            Some(_) => Estimator::Nystrom,
            None => base.estimator,
        },
        output_space: match options.choice("output_space", &["features", "pca"])? {
            Some(1) => OutputSpace::Pca,
            _ => OutputSpace::Features,
        },
        metric: match options.choice("metric", &["euclidean", "cosine"])? {
            Some(0) => Metric::Euclidean,
            Some(_) => Metric::Cosine,
            None => base.metric,
        },
        seed: options.get("seed")?.unwrap_or(0),
        max_landmarks: options.get("max_landmarks")?,
        sample_rows: match options.text("sample_rows")?.as_deref().map(str::trim) {
            None => base.sample_rows,
            Some("all") => None,
            Some(text) => Some(text.parse().map_err(|_| {
                Error::invalid(format!(
                    "--sample-rows takes a number of rows or 'all', not '{text}'"
                ))
            })?),
        },
        nan: match options.choice("nan", &["error", "drop-rows", "zero"])? {
            Some(1) => NanPolicy::DropRows,
            Some(2) => NanPolicy::Zero,
            _ => NanPolicy::Error,
        },
        anchor,
        ..base
    };
    config
        .validate()
        .map_err(|e| Error::invalid(e.to_string()))?;
    Ok(config)
}

/// `balans.correct`: see `balans.correct`'s docstring. Returns the corrected table as an
/// [`ArrowStream`].
#[pyfunction]
#[pyo3(signature = (data, batch, method="balans", options=None, callback=None))]
fn correct(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    batch: Vec<String>,
    method: &str,
    options: Option<&Bound<'_, PyDict>>,
    callback: Option<Bound<'_, PyAny>>,
) -> PyResult<ArrowStream> {
    let options = Options::new(py, options)?;
    options.dict_put_back("method", Some(method.to_string()))?;
    let method = options
        .choice(
            "method",
            &["balans", "combat", "sphering", "harmony", "embed"],
        )?
        .unwrap_or(0);
    let auto = matches!(
        options.peek_text("strength")?.as_deref().map(str::trim),
        Some("auto")
    );
    if auto && options.peek_text("iterations")?.is_some() {
        return Err(Error::invalid(
            "--strength auto chooses the passes too: leave out --iterations",
        )
        .into());
    }
    let config = correct_config(&options, method)?;
    let model: Option<PathBuf> = options.get("model")?;
    let model = match (method, model) {
        (4, Some(dir)) => Some(dir),
        (4, None) => {
            return Err(Error::invalid(
                "--method embed needs --model DIR (a directory written by `balans train`)",
            )
            .into());
        }
        (_, Some(_)) => {
            return Err(Error::invalid("--model applies to --method embed only").into());
        }
        (_, None) => None,
    };
    let source = SourceOptions {
        scan_partitions: options
            .get::<usize>("partitions")?
            .unwrap_or_else(rayon::current_num_threads)
            .max(1),
        ..source_options(&options)?
    };
    let settings = session_settings(&options, &source)?;
    let request = CorrectRequest {
        input: String::new(),
        output: PathBuf::new(),
        batch,
        selection: selection(&options)?,
        config,
        overwrite: true,
        source,
        negcon: options.get("negcon")?,
        anchor_label: options.get("anchor_label")?,
        model,
    };
    options.finish("correct")?;
    let input = Input::from_py(data)?;
    let queue = Arc::new(EventQueue::default());
    let sink = queue.clone();
    let events = queue.clone();
    let (schema, batches) = run_job(py, queue, callback, async move {
        let ctx = build_session(&settings)?;
        if auto {
            // `--strength auto` runs six corrections and keeps the best as a file.
            let spool = tempfile::tempdir().map_err(balans_engine::BalansError::Io)?;
            let request = CorrectRequest {
                input: input.location(&spool)?,
                output: spool.path().join("corrected.parquet"),
                ..request
            };
            balans_engine::auto::run_correct_auto(&ctx, &request, true).await?;
            return read_parquet(&request.output);
        }
        let label = input.name();
        let table = input.register(&ctx, MEMORY_TABLE, &request.source).await?;
        let request = CorrectRequest {
            input: label,
            ..request
        };
        let corrected = correct_stream(&ctx, &table, &request, sink).await?;
        let schema = with_metadata(&corrected.stream.schema(), corrected.metadata);
        let batches: Vec<RecordBatch> = corrected.stream.try_collect().await?;
        Ok((schema.clone(), rebind(batches, &schema)?))
    })?;
    // The run summary the CLI prints (and writes with --summary-json), as JSON metadata.
    let (schema, batches) = match events
        .summary()
        .and_then(|summary| serde_json::to_string(&summary).ok())
    {
        Some(json) => {
            let schema = with_metadata(&schema, vec![("balans.summary".to_string(), json)]);
            let batches = rebind(batches, &schema)?;
            (schema, batches)
        }
        None => (schema, batches),
    };
    Ok(ArrowStream::new(schema, batches))
}

/// The metric-suite options of `evaluate` (the CLI's `EvalArgs`).
fn eval_options(options: &Options<'_>) -> PyResult<EvalOptions> {
    let mut metrics = MetricSelection::default();
    for family in options.list("skip")? {
        match family.trim().to_ascii_lowercase().as_str() {
            "silhouette" => metrics.silhouette = false,
            "graph" => metrics.graph = false,
            "kbet" => metrics.kbet = false,
            "lisi" => metrics.lisi = false,
            "map" => metrics.map = false,
            "classifier" => metrics.classifier = false,
            other => {
                return Err(Error::invalid(format!(
                    "invalid value '{other}' for skip= (--skip): possible values: silhouette, \
                     graph, kbet, lisi, map, classifier"
                ))
                .into());
            }
        }
    }
    Ok(EvalOptions {
        n_neighbors: options.get("neighbors")?.unwrap_or(25),
        lisi_neighbors: options.get("lisi_neighbors")?.unwrap_or(90),
        perplexity: options.get("perplexity")?.unwrap_or(30.0),
        resolution: options.get("resolution")?.unwrap_or(1.0),
        leiden_restarts: options.get("leiden_restarts")?.unwrap_or(3),
        resolution_sweep: options.get("resolution_sweep")?.unwrap_or(false),
        seed: options.get("eval_seed")?.unwrap_or(0),
        null_size: options.get("null_size")?.unwrap_or(10_000),
        cv_folds: options.get("folds")?.unwrap_or(5),
        subsample: options.get("subsample")?,
        metrics,
        ..EvalOptions::default()
    })
}

/// `balans.evaluate`: returns the evaluation as JSON text (the CLI's `--json`).
#[pyfunction]
#[pyo3(signature = (data, batch, label, options=None, callback=None))]
fn evaluate(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    batch: Vec<String>,
    label: String,
    options: Option<&Bound<'_, PyDict>>,
    callback: Option<Bound<'_, PyAny>>,
) -> PyResult<String> {
    let options = Options::new(py, options)?;
    let source = source_options(&options)?;
    let eval = eval_options(&options)?;
    let report: Option<PathBuf> = options.get("report")?;
    let overwrite = options.get("overwrite")?.unwrap_or(false);
    let request = EvaluateRequest {
        input: String::new(),
        batch,
        label,
        negcon: options.get("negcon")?,
        plate: options.get("plate")?,
        well: options.get("well")?,
        selection: selection(&options)?,
        options: eval,
        source: source.clone(),
    };
    let settings = session_settings(&options, &source)?;
    options.finish("evaluate")?;
    if let Some(path) = &report {
        balans_engine::writer::check_output(path, overwrite, &[]).map_err(Error::from)?;
    }
    let input = Input::from_py(data)?;
    let queue = Arc::new(EventQueue::default());
    let steps = queue.clone();
    run_job(py, queue, callback, async move {
        let spool = tempfile::tempdir().map_err(balans_engine::BalansError::Io)?;
        let request = EvaluateRequest {
            input: input.location(&spool)?,
            ..request
        };
        let ctx = build_session(&settings)?;
        let on_step = Arc::new(move |step: &str| steps.push(Event::Step(step.to_string())));
        let (loaded, mut evaluation) = run_evaluate(&ctx, &request, "profiles", on_step).await?;
        evaluation.input = input.name();
        if let Some(path) = &report {
            let html = render_report(&[("value", &loaded, &evaluation)], request.options.seed)?;
            write_bytes_atomic(path, html.as_bytes())?;
        }
        serde_json::to_string(&evaluation).map_err(|e| Error::invalid(e.to_string()))
    })
}

/// `balans.preprocess`: returns the preprocessed table and the run's outcome as JSON.
#[pyfunction]
#[pyo3(signature = (data, options=None, callback=None))]
fn preprocess(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    options: Option<&Bound<'_, PyDict>>,
    callback: Option<Bound<'_, PyAny>>,
) -> PyResult<(ArrowStream, String)> {
    let options = Options::new(py, options)?;
    let recipe = options.choice("recipe", &["mad-int-featselect"])?.is_some();
    let normalize = options.choice(
        "normalize",
        &["standardize", "robustize", "mad-robustize", "mad"],
    )?;
    let mad_epsilon: f64 = options.get("mad_epsilon")?.unwrap_or(1e-18);
    let select_names = [
        "drop-na-columns",
        "variance-threshold",
        "frequency-threshold",
        "correlation-threshold",
        "blocklist",
    ];
    let mut feature_select = Vec::new();
    for name in options.list("feature_select")? {
        let wanted = name.trim().to_ascii_lowercase().replace('_', "-");
        feature_select.push(match select_names.iter().position(|c| *c == wanted) {
            Some(0) => SelectName::DropNaColumns,
            Some(1) => SelectName::VarianceThreshold,
            Some(2) => SelectName::FrequencyThreshold,
            Some(3) => SelectName::CorrelationThreshold,
            Some(_) => SelectName::Blocklist,
            None => {
                return Err(Error::invalid(format!(
                    "invalid value '{name}' for feature_select= (--feature-select): possible \
                     values: {}",
                    select_names.join(", ")
                ))
                .into());
            }
        });
    }
    let plate: Option<String> = options.get("plate")?;
    let negcon: Option<String> = options.get("negcon")?;
    let step_options = StepOptions {
        recipe,
        aggregate: match options.choice("aggregate", &["median", "mean"])? {
            Some(0) => Some(Aggregation::Median),
            Some(_) => Some(Aggregation::Mean),
            None => None,
        },
        normalize: normalize.map(|m| match m {
            0 => Normalization::Standardize,
            1 => Normalization::Robustize,
            2 => Normalization::MadRobustize {
                epsilon: mad_epsilon,
            },
            _ => Normalization::Mad,
        }),
        normalize_per_plate: options
            .choice("normalize_scope", &["plate", "all"])?
            .map(|s| s == 0),
        normalize_on_all: options.get("normalize_on_all")?.unwrap_or(false),
        mad_epsilon,
        rank_int: options.get("rank_int")?.unwrap_or(false),
        feature_select,
        na_cutoff: options.get("na_cutoff")?.unwrap_or(0.05),
        min_variance: options.get("min_variance")?.unwrap_or(1e-6),
        freq_cut: options.get("freq_cut")?.unwrap_or(0.05),
        unique_cut: options.get("unique_cut")?.unwrap_or(0.01),
        corr_threshold: options.get("corr_threshold")?.unwrap_or(0.9),
        blocklist: options
            .get::<PathBuf>("blocklist")?
            .as_deref()
            .map(read_blocklist)
            .transpose()
            .map_err(Error::from)?,
    };
    let steps = step_options
        .steps(plate.is_some(), negcon.is_some())
        .map_err(Error::from)?;
    let source = source_options(&options)?;
    let request = PreprocessRequest {
        input: String::new(),
        output: PathBuf::new(),
        selection: selection(&options)?,
        plate,
        well: options.get("well")?,
        negcon,
        steps,
        overwrite: true,
        source: source.clone(),
    };
    let settings = session_settings(&options, &source)?;
    options.finish("preprocess")?;
    let input = Input::from_py(data)?;
    let queue = Arc::new(EventQueue::default());
    let steps = queue.clone();
    let (schema, batches, outcome) = run_job(py, queue, callback, async move {
        let spool = tempfile::tempdir().map_err(balans_engine::BalansError::Io)?;
        let request = PreprocessRequest {
            input: input.location(&spool)?,
            output: spool.path().join("preprocessed.parquet"),
            ..request
        };
        let ctx = build_session(&settings)?;
        let log = move |line: &str| steps.push(Event::Step(line.to_string()));
        let outcome = run_preprocess(&ctx, &request, &log).await?;
        let (schema, batches) = read_parquet(&request.output)?;
        let outcome = serde_json::to_string(&outcome).map_err(|e| Error::invalid(e.to_string()))?;
        Ok((schema, batches, outcome))
    })?;
    Ok((ArrowStream::new(schema, batches), outcome))
}

/// `balans.train`: trains a model into `output` and returns its card as JSON.
#[pyfunction]
#[pyo3(signature = (data, batch, label, output, model="abra", options=None, callback=None))]
#[allow(clippy::too_many_arguments)]
fn train(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    batch: String,
    label: String,
    output: PathBuf,
    model: &str,
    options: Option<&Bound<'_, PyDict>>,
    callback: Option<Bound<'_, PyAny>>,
) -> PyResult<String> {
    let options = Options::new(py, options)?;
    options.dict_put_back("model", Some(model.to_string()))?;
    let epochs: usize = options.get("epochs")?.unwrap_or(30);
    let model = match options.choice("model", &["abra", "cellpaintr"])? {
        Some(1) => {
            let d_model = options.get("d_model")?.unwrap_or(64);
            ModelSpec::CellPainTr(balans_learned::CellPainTrConfig {
                d_model,
                layers: options.get("layers")?.unwrap_or(2),
                mlp: options.get::<usize>("mlp")?.unwrap_or(4 * d_model),
                temperature: options.get("temperature")?.unwrap_or(0.07),
                ..balans_learned::CellPainTrConfig::default()
            })
        }
        _ => ModelSpec::Abra(balans_learned::AbraConfig {
            hidden: options.get("hidden")?.unwrap_or(256),
            embedding: options.get("embedding")?.unwrap_or(64),
            scale: options.get("scale")?.unwrap_or(16.0),
            margin: options.get("margin")?.unwrap_or(0.3),
            alignment_weight: options.get("alignment_weight")?.unwrap_or(1.0),
            perturbation_bound: options.get("perturbation_bound")?.unwrap_or(2.0),
            adversarial_steps: options.get("adversarial_steps")?.unwrap_or(2),
            ..balans_learned::AbraConfig::default()
        }),
    };
    let device: balans_learned::ComputeDevice = options
        .text("device")?
        .unwrap_or_else(|| "cpu".into())
        .parse()
        .map_err(|e: balans_learned::LearnedError| {
            Error::from(balans_engine::BalansError::from(e))
        })?;
    let source = source_options(&options)?;
    let request = TrainRequest {
        input: String::new(),
        output,
        batch: batch.clone(),
        label: label.clone(),
        selection: selection(&options)?,
        source: source.clone(),
        model,
        options: balans_learned::TrainOptions {
            epochs,
            batch_size: options.get("batch_size")?.unwrap_or(128),
            learning_rate: options.get("lr")?.unwrap_or(1e-3),
            weight_decay: options.get("weight_decay")?.unwrap_or(0.0),
            patience: options.get("patience")?.unwrap_or(5),
            seed: options.get("seed")?.unwrap_or(0),
            validation_batches: options.get("validation_batches")?,
            batch_column: batch,
            label_column: label,
            device,
            ..balans_learned::TrainOptions::default()
        },
        overwrite: options.get("overwrite")?.unwrap_or(false),
    };
    let settings = session_settings(&options, &source)?;
    options.finish("train")?;
    let input = Input::from_py(data)?;
    let queue = Arc::new(EventQueue::default());
    let epochs_seen = queue.clone();
    let cancel_job = queue.cancel_flag();
    run_job(py, queue, callback, async move {
        let spool = tempfile::tempdir().map_err(balans_engine::BalansError::Io)?;
        let request = TrainRequest {
            input: input.location(&spool)?,
            ..request
        };
        let ctx = build_session(&settings)?;
        let progress = Box::new(move |e: &balans_learned::EpochRecord| {
            epochs_seen.push(Event::Step(format!(
                "{} epoch {} loss {:.4} validation {:.4}",
                e.stage, e.epoch, e.loss, e.validation
            )));
        });
        let outcome = run_train(&ctx, &request, progress, cancel_job).await?;
        serde_json::to_string(&outcome.card).map_err(|e| Error::invalid(e.to_string()))
    })
}

/// `balans.inspect`: the inspection report as JSON (the CLI's `inspect --json`).
#[pyfunction]
#[pyo3(signature = (data, batch=Vec::new(), options=None))]
fn inspect(
    py: Python<'_>,
    data: &Bound<'_, PyAny>,
    batch: Vec<String>,
    options: Option<&Bound<'_, PyDict>>,
) -> PyResult<String> {
    let options = Options::new(py, options)?;
    let source = source_options(&options)?;
    let selection = selection(&options)?;
    options.finish("inspect")?;
    let input = Input::from_py(data)?;
    let queue = Arc::new(EventQueue::default());
    run_job(py, queue, None, async move {
        let ctx = build_session(&SessionSettings::default())?;
        let table = input.register(&ctx, MEMORY_TABLE, &source).await?;
        let report = inspect_table(&ctx, &table, &selection, &batch).await?;
        serde_json::to_string(&report).map_err(|e| Error::invalid(e.to_string()))
    })
}

/// `balans.sql`: runs `query` (statements separated by semicolons) with `tables` registered
/// by name and returns the last statement's result.
#[pyfunction]
#[pyo3(signature = (query, tables=None, options=None))]
fn sql(
    py: Python<'_>,
    query: String,
    tables: Option<&Bound<'_, PyDict>>,
    options: Option<&Bound<'_, PyDict>>,
) -> PyResult<ArrowStream> {
    let options = Options::new(py, options)?;
    let source = source_options(&options)?;
    let settings = session_settings(&options, &source)?;
    options.finish("sql")?;
    let mut inputs = Vec::new();
    if let Some(tables) = tables {
        for (name, data) in tables.iter() {
            inputs.push((name.extract::<String>()?, Input::from_py(&data)?));
        }
    }
    let queue = Arc::new(EventQueue::default());
    let (schema, batches) = run_job(py, queue, None, async move {
        let ctx = build_session(&settings)?;
        for (name, input) in inputs {
            input.register(&ctx, &name, &source).await?;
        }
        Ok(balans_engine::sql::run_sql(&ctx, &query).await?)
    })?;
    Ok(ArrowStream::new(schema, batches))
}

/// The native module of the `balans` package.
#[pymodule]
fn _balans(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<ArrowStream>()?;
    m.add_function(wrap_pyfunction!(correct, m)?)?;
    m.add_function(wrap_pyfunction!(evaluate, m)?)?;
    m.add_function(wrap_pyfunction!(preprocess, m)?)?;
    m.add_function(wrap_pyfunction!(train, m)?)?;
    m.add_function(wrap_pyfunction!(inspect, m)?)?;
    m.add_function(wrap_pyfunction!(sql, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
