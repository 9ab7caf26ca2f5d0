//! Distributed execution on Apache DataFusion Ballista (cargo feature `cluster`).
//!
//! - [`process`]: `balans cluster scheduler` and `balans cluster executor`, started by our
//!   binary so that they plan and run our nodes, operators and functions.
//! - [`client`]: a session whose queries run on a cluster (`--scheduler df://HOST:PORT`).
//! - [`codec`]: our logical nodes, operators and profile tables as bytes, around Ballista's
//!   own codecs.
//!
//! How a correction is cut: the scheduler plans it (in cluster mode, see
//! `balans_planner::ClusterPlanning`) as stages (`balans_operators::exec::cluster`): each
//! per-partition step a stage of tasks that read their slice of the input themselves, each
//! global step one task, products passed on in an exact binary form, so the output is the
//! single-process bytes. Harmony and inputs that are not a file scan under projections and
//! filters run as one `BalansPassExec` task over the shuffled input. Plain SQL is distributed
//! by Ballista as usual; `evaluate(...)` runs as one task.

pub mod client;
pub mod codec;
pub mod process;

pub use client::connect;
pub use codec::{BalansLogicalCodec, BalansPhysicalCodec};
pub use process::{
    ExecutorOptions, RunningScheduler, SchedulerOptions, run_executor, scheduler_session,
    start_scheduler,
};

use balans_operators::{ProgressSink, RunSummary};

use crate::error::{BalansError, Result};

/// Progress of the corrections a cluster process runs, as log lines (an executor has no
/// terminal to draw bars on).
#[derive(Debug, Default, Clone, Copy)]
pub struct LogProgress;

impl ProgressSink for LogProgress {
    fn stage_started(&self, stage: &str, _total: Option<u64>) {
        log::info!("correction stage started: {stage}");
    }
    fn stage_progress(&self, _done: u64, _message: Option<String>) {}
    fn stage_finished(&self, stage: &str) {
        log::info!("correction stage finished: {stage}");
    }
    fn warn(&self, message: &str) {
        log::warn!("correction: {message}");
    }
    fn finished(&self, summary: &RunSummary) {
        log::info!(
            "correction finished: {} rows, {} features, {} landmarks",
            summary.rows,
            summary.features,
            summary.landmarks
        );
    }
}

/// Splits `HOST:PORT` (a bracketed IPv6 host is accepted).
pub(crate) fn parse_host_port(text: &str, flag: &str) -> Result<(String, u16)> {
    let bad = || {
        BalansError::InvalidArgument(format!(
            "{flag} takes HOST:PORT (e.g. 127.0.0.1:50050), got '{text}'"
        ))
    };
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    let port: u16 = port.parse().map_err(|_| bad())?;
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_are_parsed() {
        assert_eq!(
            parse_host_port("127.0.0.1:50050", "--bind").unwrap(),
            ("127.0.0.1".to_string(), 50050)
        );
        assert_eq!(
            parse_host_port("[::1]:7", "--bind").unwrap(),
            ("::1".to_string(), 7)
        );
        for bad in ["localhost", ":50050", "host:port", "host:70000"] {
            let err = parse_host_port(bad, "--bind").unwrap_err();
            assert!(err.to_string().contains("--bind takes HOST:PORT"), "{err}");
        }
    }
}

#[cfg(test)]
mod stage_tests {
    use std::sync::Arc;

    use balans_operators::exec::cluster::{BalansGatherExec, BalansTaskExec};
    use balans_operators::{Anchor, BalansConfig, Method, NoProgress};
    use datafusion::arrow::array::RecordBatch;
    use datafusion::arrow::compute::concat_batches;
    use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
    use datafusion::physical_plan::{collect, displayable};
    use datafusion::prelude::{DataFrame, ParquetReadOptions};
    use datafusion_proto::bytes::{
        logical_plan_from_bytes_with_extension_codec, logical_plan_to_bytes_with_extension_codec,
    };

    use super::{BalansLogicalCodec, scheduler_session};
    use crate::correct::{CorrectRequest, correct_plan};
    use crate::session::{SessionSettings, build_session};
    use crate::source::{FeatureSelection, SourceOptions, register_profiles};

    /// The example split into files of uneven sizes (one shorter than a leaf), so that leaves
    /// run over one and several partition boundaries.
    async fn split_example(dir: &std::path::Path) -> usize {
        let example = format!(
            "{}/../examples/data/bbbc021.parquet",
            env!("CARGO_MANIFEST_DIR")
        );
        let ctx = datafusion::prelude::SessionContext::new();
        let batches = ctx
            .read_parquet(example, ParquetReadOptions::default())
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let all = concat_batches(&batches[0].schema(), &batches).unwrap();
        let n = all.num_rows();
        let cuts = [0, n / 4 - 13, n / 4 + 16, 3 * n / 4, n];
        for (k, w) in cuts.windows(2).enumerate() {
            let file = std::fs::File::create(dir.join(format!("part-{k}.parquet"))).unwrap();
            let mut writer =
                parquet::arrow::ArrowWriter::try_new(file, all.schema(), None).unwrap();
            writer.write(&all.slice(w[0], w[1] - w[0])).unwrap();
            writer.close().unwrap();
        }
        n
    }

    fn request(input: String, method: Method, anchor: Anchor, negcon: bool) -> CorrectRequest {
        CorrectRequest {
            input,
            output: "unused.parquet".into(),
            batch: vec!["Metadata_Batch".into()],
            selection: FeatureSelection::default(),
            config: BalansConfig {
                method,
                anchor,
                seed: 11,
                // Leaves much shorter than the files: many cross a file boundary.
                leaf_rows: 40,
                ..BalansConfig::default()
            },
            overwrite: false,
            source: SourceOptions {
                scan_partitions: 4,
                ..SourceOptions::default()
            },
            negcon: negcon.then(|| "Metadata_PertType = 'negcon'".to_string()),
            anchor_label: None,
            model: None,
        }
    }

    /// The stages a cluster runs (planned as its scheduler plans them, executed here in one
    /// process, which runs every task of a stage) give the single-process bytes, for BALANS
    /// (two passes; anchored), ComBat and sphering.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stages_give_the_single_process_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let rows = split_example(dir.path()).await;
        let input = format!("{}/*.parquet", dir.path().display());
        let cases = [
            (Method::Balans, Anchor::None, false),
            (Method::Balans, Anchor::Negcon, true),
            (Method::ComBat, Anchor::None, false),
            (Method::Sphering, Anchor::None, true),
        ];
        for (method, anchor, negcon) in cases {
            let request = request(input.clone(), method, anchor, negcon);
            let ctx = build_session(&SessionSettings::default()).unwrap();
            let table = register_profiles(&ctx, &input, "profiles", &request.source)
                .await
                .unwrap();
            let (plan, _) = correct_plan(&ctx, &table, &request, Arc::new(NoProgress))
                .await
                .unwrap();
            let single = DataFrame::new(ctx.state(), plan.clone())
                .collect()
                .await
                .unwrap();

            let logical = BalansLogicalCodec::new(Arc::new(NoProgress));
            let scheduler = scheduler_session().unwrap();
            let plan = ctx.state().optimize(&plan).unwrap();
            let bytes = logical_plan_to_bytes_with_extension_codec(&plan, &logical).unwrap();
            let decoded = logical_plan_from_bytes_with_extension_codec(
                &bytes,
                &scheduler.task_ctx(),
                &logical,
            )
            .unwrap();
            let planned = scheduler
                .state()
                .create_physical_plan(&decoded)
                .await
                .unwrap();
            let shown = displayable(planned.as_ref()).indent(true).to_string();
            assert!(planned.is::<BalansGatherExec>(), "{method}: {shown}");
            let mut partitions = 0;
            planned
                .apply(|node| {
                    if let Some(task) = node.downcast_ref::<BalansTaskExec>() {
                        partitions = task.partitions();
                    }
                    Ok(TreeNodeRecursion::Continue)
                })
                .unwrap();
            assert!(partitions >= 3, "{method}: {shown}");
            let staged = collect(planned, scheduler.task_ctx()).await.unwrap();
            assert_eq!(rows_of(&staged), rows, "{method}");
            assert_same(&single, &staged, &format!("{method} {anchor:?}"));
        }
    }

    fn rows_of(batches: &[RecordBatch]) -> usize {
        batches.iter().map(|b| b.num_rows()).sum()
    }

    fn assert_same(a: &[RecordBatch], b: &[RecordBatch], what: &str) {
        let a = concat_batches(&a[0].schema(), a).unwrap();
        let b = concat_batches(&b[0].schema(), b).unwrap();
        assert_eq!(a.schema(), b.schema(), "{what}");
        for (k, (x, y)) in a.columns().iter().zip(b.columns()).enumerate() {
            assert_eq!(
                x.to_data(),
                y.to_data(),
                "{what}: column {} differs",
                a.schema().field(k).name()
            );
        }
    }
}
