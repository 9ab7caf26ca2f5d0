//! `balans cluster scheduler` and `balans cluster executor`: the processes of a Balans cluster
//! on Apache DataFusion Ballista (see `balans_engine::cluster`). Commands given
//! `--scheduler df://HOST:PORT` run their plans there.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use balans_engine::cluster::{ExecutorOptions, SchedulerOptions, run_executor, start_scheduler};
use balans_engine::session::parse_bytes;
use balans_engine::source::SourceOptions;
use balans_engine::{BalansError, Result, SessionSettings};
use clap::{Args, Subcommand};

#[derive(Args, Debug)]
pub struct ClusterArgs {
    #[command(subcommand)]
    process: Process,
}

#[derive(Subcommand, Debug)]
enum Process {
    /// Start the scheduler: it plans the jobs clients send (`--scheduler df://HOST:PORT`) and
    /// hands their tasks to the executors. Prints `listening on df://HOST:PORT`.
    Scheduler {
        /// Address to listen on (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:50050", value_name = "HOST:PORT")]
        bind: String,
        /// Seconds without a heartbeat after which an executor is dead and its tasks run
        /// elsewhere.
        #[arg(long, default_value_t = 30, value_name = "SECONDS")]
        executor_timeout: u64,
        /// S3 endpoint for the s3:// prefixes of SQL's external tables, which the scheduler
        /// lists while planning (e.g. http://127.0.0.1:8333); also AWS_ENDPOINT_URL.
        #[arg(long)]
        s3_endpoint: Option<String>,
    },
    /// Start an executor: it registers with the scheduler and runs tasks until stopped
    /// (Ctrl-C or SIGTERM).
    Executor {
        /// The scheduler's address.
        #[arg(long, value_name = "HOST:PORT")]
        scheduler: String,
        /// Address to listen on for shuffle reads; tasks arrive on PORT + 1 (--grpc-port).
        #[arg(long, default_value = "127.0.0.1:50051", value_name = "HOST:PORT")]
        bind: String,
        /// Port the scheduler sends tasks to (default: the --bind port + 1).
        #[arg(long)]
        grpc_port: Option<u16>,
        /// Host name the scheduler and other executors reach this one by (default: the
        /// --bind host).
        #[arg(long)]
        external_host: Option<String>,
        /// Tasks run at once (default: the machine's cores).
        #[arg(long, default_value_t = 0, value_name = "N")]
        concurrent_tasks: usize,
        /// Directory for shuffle files and the corrections' working files (default: a
        /// temporary directory).
        #[arg(long)]
        work_dir: Option<PathBuf>,
        /// Memory limit of this executor's tasks, e.g. 8GB (split between concurrent tasks).
        #[arg(long)]
        memory_limit: Option<String>,
        /// S3 endpoint for s3:// inputs (e.g. http://127.0.0.1:8333); also AWS_ENDPOINT_URL.
        /// Credentials come from the AWS_* environment variables, as for --input.
        #[arg(long)]
        s3_endpoint: Option<String>,
        /// Seconds between heartbeats to the scheduler.
        #[arg(long, default_value_t = 5, value_name = "SECONDS")]
        heartbeat: u64,
    },
}

pub async fn run(a: ClusterArgs) -> Result<()> {
    let _ = env_logger::Builder::from_env(
        // DataFusion warns for every task that a scan restricted to its slice of files no
        // longer matches the declared partitioning (harmless).
        env_logger::Env::default().default_filter_or(
            "warn,balans_engine=info,datafusion_datasource::file_scan_config=error",
        ),
    )
    .try_init();
    match a.process {
        Process::Scheduler {
            bind,
            executor_timeout,
            s3_endpoint,
        } => {
            let running = start_scheduler(&SchedulerOptions {
                bind,
                executor_timeout: Duration::from_secs(executor_timeout),
                settings: SessionSettings {
                    source: SourceOptions {
                        s3_endpoint,
                        ..SourceOptions::default()
                    },
                    ..SessionSettings::default()
                },
            })
            .await?;
            println!("balans: scheduler listening on df://{}", running.address);
            let _ = std::io::stdout().flush();
            tokio::select! {
                r = running.service => r.map_err(|e| BalansError::Cluster(e.to_string()))?,
                _ = tokio::signal::ctrl_c() => Ok(()),
            }
        }
        Process::Executor {
            scheduler,
            bind,
            grpc_port,
            external_host,
            concurrent_tasks,
            work_dir,
            memory_limit,
            s3_endpoint,
            heartbeat,
        } => {
            let settings = SessionSettings {
                memory_limit: memory_limit.as_deref().map(parse_bytes).transpose()?,
                source: SourceOptions {
                    s3_endpoint,
                    ..SourceOptions::default()
                },
                ..SessionSettings::default()
            };
            println!("balans: executor on {bind} joining the scheduler at {scheduler}");
            let _ = std::io::stdout().flush();
            run_executor(&ExecutorOptions {
                scheduler,
                bind,
                grpc_port,
                external_host,
                concurrent_tasks,
                work_dir,
                settings,
                heartbeat: Duration::from_secs(heartbeat),
            })
            .await
        }
    }
}
