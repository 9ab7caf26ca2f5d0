//! Distributed execution on Apache DataFusion Ballista (cargo feature `cluster`).
//!
//! - [`process`]: `balans cluster scheduler` and `balans cluster executor`, started by our
//!   binary so that they plan and run our nodes, operators and functions.
//! - [`client`]: a session whose queries run on a cluster (`--scheduler df://HOST:PORT`).
//! - [`codec`]: our logical nodes, operators and profile tables as bytes, around Ballista's
//!   own codecs.
//!
//! How a correction is cut: the scheduler plans it (in cluster mode, see
//! `balans_planner::ClusterPlanning`) as one `BalansPassExec` over a `CoalescePartitionsExec`
//! of its input. Ballista cuts a stage at the coalesce: the input's partitions (the scan,
//! filters, projections) run as tasks on every executor and are shuffled; the correction then
//! runs as one task, on one executor, over those partitions, with the machine's cores. Plain
//! SQL is distributed by Ballista as usual; `evaluate(...)` runs as one task.

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
