//! The operator chain of a correction.
//!
//! One pass over an input with `P` partitions is planned as (bottom to top):
//!
//! ```text
//! BalansIngestExec (P) ─► CoalescePartitionsExec ─► BalansProfileExec (global)
//!   BALANS:    [BalansGramExec (P) ─► BalansPcaExec] ─► BalansReduceExec (P)
//!              ─► BalansLandmarkExec ─► BalansSmoothPartialExec (P) ─► BalansSmoothExec
//!   Harmony:   [BalansGramExec ─► BalansPcaExec] ─► BalansReduceExec (P) ─► BalansHarmonyExec
//!   ComBat:    BalansMomentsExec (P) ─► BalansComBatExec
//!   sphering:  BalansSpheringPartialExec (P) ─► BalansSpheringExec
//! ─► BalansApplyExec (P)
//! ```
//!
//! with a `CoalescePartitionsExec` below every global step. All operators of a pass share one
//! [`PassContext`]. Passes chain: the next pass ingests the previous pass's `BalansApplyExec`
//! partitions. The last pass is topped by [`OrderedConcatExec`], so the output keeps the input
//! row order.

use std::sync::Arc;

use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::ExecutionPlanProperties;
use datafusion::physical_plan::coalesce_partitions::CoalescePartitionsExec;

use crate::config::Method;
use crate::error::{OperatorError, Result};
use crate::exec::apply::BalansApplyExec;
use crate::exec::combat::{BalansComBatExec, BalansMomentsExec, ComBatFitStep, MomentsStep};
use crate::exec::concat::OrderedConcatExec;
use crate::exec::context::PassContext;
use crate::exec::harmony::{BalansHarmonyExec, HarmonyStep};
use crate::exec::ingest::BalansIngestExec;
use crate::exec::landmarks::{BalansLandmarkExec, LandmarkStep};
use crate::exec::pca::{BalansGramExec, BalansPcaExec, GramStep, PcaFitStep};
use crate::exec::profile::{BalansProfileExec, ProfileStep};
use crate::exec::reduce::{BalansReduceExec, ReduceStep};
use crate::exec::smooth::{
    BalansSmoothExec, BalansSmoothPartialExec, SmoothMergeStep, SmoothPartialStep,
};
use crate::exec::spec::{BalansSpec, balans_output_schema};
use crate::exec::sphering::{
    BalansSpheringExec, BalansSpheringPartialExec, SpheringFitStep, SpheringPartialStep,
};

fn coalesce(plan: Arc<dyn ExecutionPlan>) -> Arc<dyn ExecutionPlan> {
    Arc::new(CoalescePartitionsExec::new(plan))
}

/// Plans one pass of `spec` over `input`; the result has `input`'s partitions (rows of each
/// partition in input order).
pub fn correction_pass(
    input: Arc<dyn ExecutionPlan>,
    spec: BalansSpec,
) -> Result<Arc<dyn ExecutionPlan>> {
    spec.config.validate()?;
    if spec.features.is_empty() {
        return Err(OperatorError::BadInput("no feature columns".into()));
    }
    if spec.batch.is_empty() {
        return Err(OperatorError::BadInput("no batch column".into()));
    }
    let input_schema = input.schema();
    let schema = balans_output_schema(&input_schema, &spec)?;
    let partitions = input.output_partitioning().partition_count().max(1);
    let d = spec.features.len();
    let method = spec.config.method;
    let with_pca = spec.config.pca_components(d).is_some();
    let ctx = Arc::new(PassContext::new(spec, input_schema, schema, partitions));
    let ingest: Arc<dyn ExecutionPlan> = Arc::new(BalansIngestExec::new(ctx.clone(), input));
    let mut global: Arc<dyn ExecutionPlan> = Arc::new(BalansProfileExec::new(
        ProfileStep,
        ctx.clone(),
        coalesce(ingest),
    ));
    match method {
        Method::Balans | Method::Harmony => {
            if with_pca {
                let gram = Arc::new(BalansGramExec::new(GramStep, ctx.clone(), global));
                global = Arc::new(BalansPcaExec::new(PcaFitStep, ctx.clone(), coalesce(gram)));
            }
            let reduce = Arc::new(BalansReduceExec::new(ReduceStep, ctx.clone(), global));
            if method == Method::Balans {
                let landmarks = Arc::new(BalansLandmarkExec::new(
                    LandmarkStep,
                    ctx.clone(),
                    coalesce(reduce),
                ));
                let partial = Arc::new(BalansSmoothPartialExec::new(
                    SmoothPartialStep,
                    ctx.clone(),
                    landmarks,
                ));
                global = Arc::new(BalansSmoothExec::new(
                    SmoothMergeStep,
                    ctx.clone(),
                    coalesce(partial),
                ));
            } else {
                global = Arc::new(BalansHarmonyExec::new(
                    HarmonyStep,
                    ctx.clone(),
                    coalesce(reduce),
                ));
            }
        }
        Method::ComBat => {
            let moments = Arc::new(BalansMomentsExec::new(MomentsStep, ctx.clone(), global));
            global = Arc::new(BalansComBatExec::new(
                ComBatFitStep,
                ctx.clone(),
                coalesce(moments),
            ));
        }
        Method::Sphering => {
            let partial = Arc::new(BalansSpheringPartialExec::new(
                SpheringPartialStep,
                ctx.clone(),
                global,
            ));
            global = Arc::new(BalansSpheringExec::new(
                SpheringFitStep,
                ctx.clone(),
                coalesce(partial),
            ));
        }
    }
    Ok(Arc::new(BalansApplyExec::new(ctx, global)))
}

/// Plans one pass and, when it is the last one, keeps the input order in one partition.
pub fn correction_node(
    input: Arc<dyn ExecutionPlan>,
    spec: BalansSpec,
) -> Result<Arc<dyn ExecutionPlan>> {
    let last = spec.is_last_pass();
    let pass = correction_pass(input, spec)?;
    Ok(if last {
        Arc::new(OrderedConcatExec::new(pass))
    } else {
        pass
    })
}

/// Plans every pass of `spec` over `input` (one [`correction_node`] per pass).
pub fn correction_plan(
    input: Arc<dyn ExecutionPlan>,
    spec: BalansSpec,
) -> Result<Arc<dyn ExecutionPlan>> {
    let mut plan = input;
    for pass in 1..=spec.config.passes().max(1) {
        plan = correction_node(
            plan,
            BalansSpec {
                pass,
                ..spec.clone()
            },
        )?;
    }
    Ok(plan)
}
