//! Session setup: memory pool, temporary directory, threads and the Balans query planner.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::Arc;

use datafusion::execution::memory_pool::{FairSpillPool, TrackConsumersPool};
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::{SessionState, SessionStateBuilder};
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::error::{BalansError, Result};
use crate::preprocess_relation::PreprocessJob;
use crate::source::SourceOptions;
use crate::stores::BalansObjectStoreRegistry;
use balans_planner::{BalansQueryPlanner, CorrectionRelationPlanner};

/// Settings of a Balans session.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// Memory limit in bytes for DataFusion's pool and the operators' reservations
    /// (`None` = unbounded).
    pub memory_limit: Option<usize>,
    /// Directory for working files (default: the system temporary directory).
    pub temp_dir: Option<PathBuf>,
    /// Rows per record batch.
    pub batch_size: usize,
    /// Object-store settings for `s3://` locations named in SQL.
    pub source: SourceOptions,
}

impl Default for SessionSettings {
    fn default() -> Self {
        Self {
            memory_limit: None,
            temp_dir: None,
            batch_size: 8192,
            source: SourceOptions::default(),
        }
    }
}

/// Builds a session with the Balans planner and SQL functions, a bounded memory pool and a
/// disk manager.
///
/// SQL identifiers are case-sensitive as written (no lower-casing), so predicates such as
/// `Metadata_PertType = 'negcon'` work unquoted.
/// Scans run as one partition so row order is the input's (files sorted by path, rows in file
/// order); parallelism comes from the operators' own kernels.
pub fn build_session(settings: &SessionSettings) -> Result<SessionContext> {
    let (state, relations) = balans_state(session_config(settings), runtime_env(settings)?);
    Ok(finish_context(
        SessionContext::new_with_state(state),
        relations,
    ))
}

/// [`build_session`], or with `scheduler` (`df://HOST:PORT`) a session whose queries run on
/// that cluster (`crate::cluster::connect`; needs the `cluster` feature).
pub async fn open_session(
    settings: &SessionSettings,
    scheduler: Option<&str>,
) -> Result<SessionContext> {
    match scheduler {
        None => build_session(settings),
        #[cfg(feature = "cluster")]
        Some(url) => crate::cluster::connect(url, settings).await,
        #[cfg(not(feature = "cluster"))]
        Some(_) => Err(BalansError::InvalidArgument(
            "--scheduler needs a balans built with the `cluster` feature \
             (cargo install --path engine --features cluster)"
                .into(),
        )),
    }
}

/// The session configuration every Balans session starts from (see [`build_session`]).
pub(crate) fn session_config(settings: &SessionSettings) -> SessionConfig {
    session_config_from(SessionConfig::new(), settings)
}

/// [`session_config`]'s settings applied to `config` (a cluster session starts from
/// Ballista's configuration).
pub(crate) fn session_config_from(
    config: SessionConfig,
    settings: &SessionSettings,
) -> SessionConfig {
    config
        .with_target_partitions(1)
        .with_repartition_file_scans(false)
        .with_batch_size(settings.batch_size)
        .with_information_schema(true)
        // Keep string columns as plain Utf8 so outputs have the input's column types.
        .set_bool(
            "datafusion.execution.parquet.schema_force_view_types",
            false,
        )
        // Profile columns are mixed case (`Metadata_PertType`): SQL names them as written.
        .set_bool("datafusion.sql_parser.enable_ident_normalization", false)
        // JUMP layouts keep one file per plate in nested folders: an external table over a
        // prefix reads all of them.
        .set_bool(
            "datafusion.execution.listing_table_ignore_subdirectory",
            false,
        )
}

/// The runtime of a Balans session: the object-store registry (`s3://` and `http(s)://`
/// stores made on first use), the memory pool and the working-file directory.
pub(crate) fn runtime_env(settings: &SessionSettings) -> Result<Arc<RuntimeEnv>> {
    let mut runtime = RuntimeEnvBuilder::new().with_object_store_registry(Arc::new(
        BalansObjectStoreRegistry::new(settings.source.clone()),
    ));
    if let Some(limit) = settings.memory_limit {
        let pool = TrackConsumersPool::new(
            FairSpillPool::new(limit),
            NonZeroUsize::new(5).expect("5 > 0"),
        );
        runtime = runtime.with_memory_pool(Arc::new(pool));
    }
    if let Some(dir) = &settings.temp_dir {
        std::fs::create_dir_all(dir).map_err(|e| {
            BalansError::InvalidArgument(format!(
                "cannot create temporary directory {}: {e}",
                dir.display()
            ))
        })?;
        runtime = runtime.with_temp_file_path(dir);
    }
    Ok(runtime.build_arc()?)
}

/// A session state with the Balans query and relation planners, and the relation planner
/// (to be bound to its context by [`finish_context`]).
pub(crate) fn balans_state(
    config: SessionConfig,
    runtime: Arc<RuntimeEnv>,
) -> (SessionState, Arc<CorrectionRelationPlanner>) {
    let relations = Arc::new(CorrectionRelationPlanner::with_preprocess(Arc::new(
        PreprocessJob,
    )));
    let state = SessionStateBuilder::new()
        .with_config(config)
        .with_runtime_env(runtime)
        .with_default_features()
        .with_query_planner(Arc::new(BalansQueryPlanner))
        .with_relation_planners(vec![relations.clone()])
        .build();
    (state, relations)
}

/// Binds `relations` to `ctx` and registers the SQL functions.
pub(crate) fn finish_context(
    ctx: SessionContext,
    relations: Arc<CorrectionRelationPlanner>,
) -> SessionContext {
    // A weak reference: the planner lives in the state and must not keep it alive.
    let weak = ctx.state_weak_ref();
    relations.bind_session(move || weak.upgrade().map(|state| state.read().clone()));
    balans_udfs::register_all(&ctx);
    ctx
}

/// Parses a byte size such as `2GB`, `512MiB`, `1.5G` or `1000000`.
pub fn parse_bytes(text: &str) -> Result<usize> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        BalansError::InvalidArgument(format!("'{text}' is not a size (e.g. 2GB, 512MiB)"))
    })?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" => 1e12,
        "tib" => 1024f64.powi(4),
        other => {
            return Err(BalansError::InvalidArgument(format!(
                "unknown size unit '{other}' in '{text}'"
            )));
        }
    };
    Ok((value * mult) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_bytes("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1.5k").unwrap(), 1500);
        assert_eq!(parse_bytes("42").unwrap(), 42);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("3 parsecs").is_err());
    }
}
