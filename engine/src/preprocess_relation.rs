//! The preprocessing job ([`crate::preprocess`]) as the planner's [`PreprocessRunner`]: what
//! `preprocess((SELECT ...), ...)` in SQL runs while it is planned (see
//! [`balans_planner::preprocess`]).

use std::future::Future;
use std::sync::Arc;

use balans_operators::exec::preprocess::PlannedTable;
use balans_planner::columns::{FeatureSelection, resolve_columns};
use balans_planner::preprocess::PreprocessRunner;
use balans_planner::relation::take_named;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::plan_datafusion_err;
use datafusion::error::Result;
use datafusion::execution::{SendableRecordBatchStream, SessionState};
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::DataFrame;

use crate::preprocess::{FrameSpec, PreprocessSteps, Preprocessed, StepOptions, preprocess_frame};

/// The engine's preprocessing job, run while planning.
#[derive(Debug, Default, Clone, Copy)]
pub struct PreprocessJob;

impl PreprocessRunner for PreprocessJob {
    fn run(
        &self,
        state: SessionState,
        input: LogicalPlan,
        named: Vec<(String, String)>,
        selection: FeatureSelection,
        negcon: Option<String>,
    ) -> Result<(Arc<dyn PlannedTable>, String)> {
        run_preprocess_relation(state, input, named, selection, negcon)
    }
}

impl PlannedTable for Preprocessed {
    fn schema(&self) -> Result<SchemaRef, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Preprocessed::schema(self)?)
    }

    fn stream(
        &self,
    ) -> Result<SendableRecordBatchStream, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Preprocessed::stream(self)?)
    }
}

/// Runs `future` to completion from synchronous planning code: on the current runtime when it
/// has worker threads to spare, else on a runtime of its own on a scoped thread.
fn run_now<T: Send>(future: impl Future<Output = T> + Send) -> Result<T> {
    use tokio::runtime::{Builder, Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
            Ok(tokio::task::block_in_place(|| handle.block_on(future)))
        }
        _ => std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime = Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                        .map_err(|e| {
                            plan_datafusion_err!("preprocess: cannot start a runtime: {e}")
                        })?;
                    Ok(runtime.block_on(future))
                })
                .join()
                .map_err(|_| plan_datafusion_err!("preprocess: the planning thread panicked"))?
        }),
    }
}

/// Runs `preprocess((SELECT ...), ...)` on `input`: parses the named arguments, resolves the
/// feature columns, runs the job and returns its result with the `EXPLAIN` description.
fn run_preprocess_relation(
    state: SessionState,
    input: LogicalPlan,
    mut named: Vec<(String, String)>,
    selection: FeatureSelection,
    negcon: Option<String>,
) -> Result<(Arc<dyn PlannedTable>, String)> {
    let plate = take_named(&mut named, "plate");
    let well = take_named(&mut named, "well");
    let mut options = StepOptions::default();
    for (key, value) in &named {
        options
            .set(key, value)
            .map_err(|e| plan_datafusion_err!("preprocess: {e}"))?;
    }
    let steps = options
        .steps(plate.is_some(), negcon.is_some())
        .map_err(|e| plan_datafusion_err!("preprocess: {e}"))?;
    let schema = input.schema().as_arrow().clone();
    let keys: Vec<String> = plate
        .iter()
        .chain(well.iter().filter(|_| steps.aggregate.is_some()))
        .cloned()
        .collect();
    let features = resolve_columns(&schema, &selection, &keys)
        .map_err(|e| plan_datafusion_err!("preprocess: {e}"))?
        .features;
    let spec = FrameSpec {
        features,
        plate,
        well,
        negcon,
        steps,
    };
    spec.check()
        .map_err(|e| plan_datafusion_err!("preprocess: {e}"))?;
    let frame = DataFrame::new(state, input);
    let result = run_now(async { preprocess_frame(frame, &spec, &|_| {}).await })?
        .map_err(|e| plan_datafusion_err!("preprocess: {e}"))?;
    let description = describe(&spec, &result);
    Ok((Arc::new(result), description))
}

fn describe(spec: &FrameSpec, result: &Preprocessed) -> String {
    let outcome = &result.outcome;
    let recipe = PreprocessSteps {
        aggregate: spec.steps.aggregate,
        ..PreprocessSteps::mad_int_featselect()
    };
    let steps = if spec.steps == recipe {
        spec.steps
            .aggregate
            .map(|a| format!("aggregate {a:?}; ").to_lowercase())
            .unwrap_or_default()
            + "recipe mad_int_featselect"
    } else {
        spec.steps.describe().join("; ")
    };
    format!(
        "{steps} | {} rows, {} -> {} features",
        outcome.rows,
        outcome.input_features.len(),
        outcome.features.len()
    )
}
