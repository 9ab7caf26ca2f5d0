//! The cluster's processes, started by our binary (Ballista's stock binaries cannot load our
//! nodes and operators): a scheduler that plans with the Balans planner for a cluster, and
//! executors that decode our operators, resolve our SQL functions, read object stores with the
//! same settings as `--input` and keep working files in their work directory.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use balans_planner::ClusterPlanning;
use ballista_core::extension::SessionConfigExt;
use ballista_core::registry::BallistaFunctionRegistry;
use ballista_executor::executor_process::{ExecutorProcessConfig, start_executor_process};
use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;
use ballista_scheduler::scheduler_process::{create_scheduler, start_grpc_service_with_listener};
use datafusion::execution::SessionState;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion_proto::protobuf::{LogicalPlanNode, PhysicalPlanNode};
use tokio::task::JoinHandle;

use super::codec::{BalansLogicalCodec, BalansPhysicalCodec};
use super::{LogProgress, parse_host_port};
use crate::error::{BalansError, Result};
use crate::session::{
    SessionSettings, balans_state, finish_context, runtime_env, session_config_from,
};

/// How a scheduler is started.
#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    /// Address to listen on (`HOST:PORT`; port 0 picks a free port).
    pub bind: String,
    /// How long an executor may go without a heartbeat before its tasks are given to others.
    pub executor_timeout: Duration,
    /// Object-store settings for planning: SQL's external tables over `s3://` prefixes are
    /// listed by the scheduler.
    pub settings: SessionSettings,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:50050".into(),
            executor_timeout: Duration::from_secs(30),
            settings: SessionSettings::default(),
        }
    }
}

/// How an executor is started.
#[derive(Debug, Clone)]
pub struct ExecutorOptions {
    /// The scheduler's `HOST:PORT`.
    pub scheduler: String,
    /// Address to listen on for shuffle reads (`HOST:PORT`); the task port is `PORT + 1`
    /// unless `grpc_port` says otherwise.
    pub bind: String,
    /// Port the scheduler pushes tasks to.
    pub grpc_port: Option<u16>,
    /// Host name other processes reach this executor by (default: the bind host).
    pub external_host: Option<String>,
    /// Tasks run at once (default: the machine's cores).
    pub concurrent_tasks: usize,
    /// Shuffle files and the corrections' working files (default: a temporary directory).
    pub work_dir: Option<PathBuf>,
    /// Memory limit, object-store settings and batch size of the tasks' sessions.
    pub settings: SessionSettings,
    /// Seconds between heartbeats to the scheduler.
    pub heartbeat: Duration,
}

impl Default for ExecutorOptions {
    fn default() -> Self {
        Self {
            scheduler: "127.0.0.1:50050".into(),
            bind: "127.0.0.1:50051".into(),
            grpc_port: None,
            external_host: None,
            concurrent_tasks: 0,
            work_dir: None,
            settings: SessionSettings::default(),
            heartbeat: Duration::from_secs(5),
        }
    }
}

/// A Balans session state (planners, relations, SQL functions) over `config`, with the
/// object stores of `settings`.
fn session_state(
    config: SessionConfig,
    settings: &SessionSettings,
) -> datafusion::error::Result<SessionState> {
    let runtime = runtime_env(settings).map_err(|e| e.into_datafusion("runtime"))?;
    let (state, relations) = balans_state(config, runtime);
    Ok(finish_context(SessionContext::new_with_state(state), relations).state())
}

/// The scheduler's planning state: the client's configuration (it arrives with every job)
/// and the Balans planner in cluster mode ([`ClusterPlanning`]).
fn scheduler_state(
    config: SessionConfig,
    settings: &SessionSettings,
) -> datafusion::error::Result<SessionState> {
    session_state(config.with_extension(Arc::new(ClusterPlanning)), settings)
}

/// A session that plans as the cluster's scheduler does (cluster mode, our codecs): for
/// tests and tools that look at the plans a cluster runs.
pub fn scheduler_session() -> Result<SessionContext> {
    let settings = SessionSettings::default();
    let state = scheduler_state(cluster_config(&settings), &settings)?;
    Ok(SessionContext::new_with_state(state))
}

/// The configuration every process of the cluster starts from: Ballista's, our session
/// settings and our codecs.
pub(crate) fn cluster_config(settings: &SessionSettings) -> SessionConfig {
    let progress = Arc::new(LogProgress);
    session_config_from(SessionConfig::new_with_ballista(), settings)
        .with_ballista_logical_extension_codec(Arc::new(BalansLogicalCodec::new(progress.clone())))
        .with_ballista_physical_extension_codec(Arc::new(BalansPhysicalCodec::new(progress)))
}

/// A running scheduler.
#[derive(Debug)]
pub struct RunningScheduler {
    /// Where it listens.
    pub address: SocketAddr,
    /// The gRPC service (ends on error; abort it to stop the scheduler).
    pub service: JoinHandle<Result<()>>,
}

/// Starts a scheduler on `options.bind` and returns once it listens.
pub async fn start_scheduler(options: &SchedulerOptions) -> Result<RunningScheduler> {
    let (host, port) = parse_host_port(&options.bind, "--bind")?;
    let listener = tokio::net::TcpListener::bind((host.as_str(), port))
        .await
        .map_err(|e| {
            BalansError::InvalidArgument(format!("cannot listen on {}: {e}", options.bind))
        })?;
    let address = listener
        .local_addr()
        .map_err(|e| BalansError::InvalidArgument(format!("cannot listen: {e}")))?;
    let settings = options.settings.clone();
    let planning = options.settings.clone();
    let base = cluster_config(&settings);
    let config = SchedulerConfig {
        bind_host: host.clone(),
        external_host: host,
        bind_port: address.port(),
        executor_timeout_seconds: options.executor_timeout.as_secs().max(1),
        expire_dead_executor_interval_seconds: (options.executor_timeout.as_secs() / 3).max(1),
        no_executors_grace_period_seconds: options.executor_timeout.as_secs().max(1),
        override_session_builder: Some(Arc::new(move |config| scheduler_state(config, &planning))),
        override_logical_codec: Some(base.ballista_logical_extension_codec()),
        override_physical_codec: Some(base.ballista_physical_extension_codec()),
        override_config_producer: Some(Arc::new(move || cluster_config(&settings))),
        ..SchedulerConfig::default()
    };
    let config = Arc::new(config);
    let cluster = BallistaCluster::new_from_config(&config)
        .await
        .map_err(|e| BalansError::Cluster(format!("cannot start the scheduler: {e}")))?;
    let scheduler = create_scheduler::<LogicalPlanNode, PhysicalPlanNode>(cluster, config)
        .await
        .map_err(|e| BalansError::Cluster(format!("cannot start the scheduler: {e}")))?;
    let service = tokio::spawn(async move {
        start_grpc_service_with_listener(listener, scheduler)
            .await
            .map_err(|e| BalansError::Cluster(format!("the scheduler stopped: {e}")))
    });
    Ok(RunningScheduler { address, service })
}

/// Runs an executor until it is stopped (Ctrl-C, SIGTERM, or the scheduler asks it to).
pub async fn run_executor(options: &ExecutorOptions) -> Result<()> {
    let (scheduler_host, scheduler_port) = parse_host_port(&options.scheduler, "--scheduler")?;
    let (bind_host, port) = parse_host_port(&options.bind, "--bind")?;
    let wildcard = matches!(bind_host.as_str(), "0.0.0.0" | "::");
    if wildcard && options.external_host.is_none() {
        return Err(BalansError::InvalidArgument(format!(
            "an executor bound to {bind_host} needs --external-host NAME: the host name the \
             scheduler, the other executors and the clients reach it by"
        )));
    }
    let grpc_port = options.grpc_port.unwrap_or(port.wrapping_add(1));
    let work_dir = match &options.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| {
                BalansError::InvalidArgument(format!(
                    "cannot create the work directory {}: {e}",
                    dir.display()
                ))
            })?;
            Some(dir.display().to_string())
        }
        None => None,
    };
    let settings = options.settings.clone();
    let runtime_settings = SessionSettings {
        // The executor sizes a memory pool per task from `memory_pool_size`.
        memory_limit: None,
        temp_dir: options.work_dir.clone(),
        ..settings.clone()
    };
    let base = cluster_config(&settings);
    // Our functions, for the tasks' plans (they are resolved by name).
    let registry = BallistaFunctionRegistry::from(&session_state(base.clone(), &settings)?);
    let config = ExecutorProcessConfig {
        bind_host: bind_host.clone(),
        external_host: Some(options.external_host.clone().unwrap_or(bind_host)),
        port,
        grpc_port,
        scheduler_host,
        scheduler_port,
        scheduler_connect_timeout_seconds: 10,
        vcores: options.concurrent_tasks,
        work_dir,
        executor_heartbeat_interval_seconds: options.heartbeat.as_secs().max(1),
        memory_pool_size: settings.memory_limit.map(|m| m as u64),
        override_function_registry: Some(Arc::new(registry)),
        override_config_producer: Some(Arc::new(move || cluster_config(&settings))),
        override_runtime_producer: Some(Arc::new(move |_config: &SessionConfig| {
            runtime_env(&runtime_settings).map_err(|e| e.into_datafusion("runtime"))
        })),
        override_logical_codec: Some(base.ballista_logical_extension_codec()),
        override_physical_codec: Some(base.ballista_physical_extension_codec()),
        print_thread_info: false,
        ..ExecutorProcessConfig::default()
    };
    start_executor_process(Arc::new(config))
        .await
        .map_err(|e| BalansError::Cluster(format!("the executor stopped: {e}")))
}
