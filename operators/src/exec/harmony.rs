//! `BalansHarmonyExec`: Harmony as one global step over the reduced coordinates of every
//! partition (`BalansReduceExec` wrote them), in global row order. Harmony's iterations need
//! every row's coordinates and cluster assignments at once, so its state is held in memory
//! (reserved in the pool); the write step emits the corrected coordinates per partition. The
//! table lists the objective after initialisation and after every iteration.

use std::sync::Arc;

use datafusion::arrow::array::{Float32Array, RecordBatch, UInt32Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::error::{OperatorError, Result};
use crate::exec::context::{CancelFlag, PassContext};
use crate::exec::step::{GlobalStep, GlobalStepExec};
use crate::kernels::harmony::{default_clusters, harmonize};

/// Stage name of the Harmony iterations.
pub const HARMONY_STAGE: &str = "harmony";

/// The Harmony step (see the module docs).
#[derive(Debug, Default, Clone, Copy)]
pub struct HarmonyStep;

/// The Harmony operator.
pub type BalansHarmonyExec = GlobalStepExec<HarmonyStep>;

impl GlobalStep for HarmonyStep {
    fn name(&self) -> &'static str {
        "BalansHarmonyExec"
    }

    fn stage(&self) -> &'static str {
        HARMONY_STAGE
    }

    fn describe(&self, ctx: &PassContext) -> String {
        let h = &ctx.spec.config.harmony;
        format!(
            "clusters={}, theta={}, sigma={}, max_iterations={}, seed={}",
            h.clusters.map_or("auto".to_string(), |c| c.to_string()),
            h.theta,
            h.sigma,
            h.max_iterations,
            ctx.spec.config.seed
        )
    }

    fn schema(&self, _ctx: &PassContext) -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("iteration", DataType::UInt32, false),
            Field::new("objective", DataType::Float32, false),
        ]))
    }

    fn merge(
        &self,
        ctx: &PassContext,
        _partials: Vec<RecordBatch>,
        cancel: &CancelFlag,
    ) -> Result<RecordBatch> {
        let profile = ctx.profile()?.clone();
        let rows = ctx.distance_rows()?;
        let (n, p) = (rows.n(), rows.p());
        let seed = u32::try_from(ctx.spec.config.seed).map_err(|_| {
            OperatorError::InvalidParameter("harmony's seed must fit in 32 bits".into())
        })?;
        let params = ctx.spec.config.harmony.params(seed);
        let clusters = params.clusters.unwrap_or_else(|| default_clusters(n));
        ctx.reserve(
            n * p * 4 * 2 + n * clusters * 4 * 3 + n * 8,
            "Harmony's state (2 x N x d coordinates, N x K assignments and distances)",
        )?;
        let mut z = Vec::with_capacity(n * p);
        for i in 0..n {
            z.extend_from_slice(rows.row(i));
        }
        let out = harmonize(
            &z,
            p,
            &profile.codes,
            profile.batch_keys.len(),
            &params,
            &|| cancel.is_cancelled(),
            &mut |iteration, objective| {
                ctx.stage_progress(HARMONY_STAGE, 1, Some(format!("objective {objective:.2}")));
                let _ = iteration;
            },
        )?;
        drop(z);
        ctx.with_summary(|s| {
            s.stop_reason = format!(
                "{} clusters, {} iterations ({})",
                out.clusters,
                out.iterations,
                if out.converged {
                    "converged"
                } else {
                    "iteration limit"
                }
            );
            s.coverage = 1.0;
            s.distance_dims = p;
        });
        let table = RecordBatch::try_new(
            self.schema(ctx),
            vec![
                Arc::new(UInt32Array::from(
                    (0..out.objectives.len() as u32).collect::<Vec<_>>(),
                )),
                Arc::new(Float32Array::from(out.objectives.clone())),
            ],
        )?;
        ctx.set_harmony(Arc::new(out.z_corr));
        Ok(table)
    }
}
