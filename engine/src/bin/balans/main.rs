//! `balans`: batch correction of Cell Painting profiles from the command line.
//!
//! This file holds the command line's top level (global flags and dispatch); each command's
//! options and run function live in the module of its name, the argument groups several
//! commands share in `args`, and the shared evaluation output in `output`.

mod args;
mod bench;
#[cfg(feature = "cluster")]
mod cluster;
mod correct;
mod evaluate;
mod inspect;
mod output;
mod preprocess;
mod sql;
mod synth;
mod train;
mod tune;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "balans",
    version,
    about = "Out-of-core batch correction of Cell Painting profiles"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Worker threads (default: all cores). Results do not depend on it.
    #[arg(long, global = true)]
    threads: Option<usize>,
    /// Hide progress bars.
    #[arg(long, short, global = true)]
    quiet: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Batch-correct a profile table and write corrected profiles as Parquet.
    Correct(Box<correct::CorrectArgs>),
    /// Train a learned batch-robust embedding (ABRA) with batches held out for validation,
    /// and save it as a model directory for `correct --method embed` and SQL's embed(...).
    Train(Box<train::TrainArgs>),
    /// Run SQL statements (separated by semicolons) with Balans' functions registered; print
    /// the last result as a table or write it as Parquet.
    Sql(sql::SqlArgs),
    /// Aggregate, normalise and select features as pycytominer does (or run the
    /// mad_int_featselect recipe) and write the preprocessed profiles as Parquet.
    Preprocess(Box<preprocess::PreprocessArgs>),
    /// Score batch mixing and biology preservation of an embedding (scib metrics + mAP).
    Evaluate(evaluate::EvaluateArgs),
    /// Print the detected schema, batches and data problems of a profile table.
    Inspect(inspect::InspectArgs),
    /// Run BALANS over a grid of its parameters and score every setting with the metric suite.
    Tune(tune::TuneArgs),
    /// Generate the synthetic Cell Painting-like benchmark data set.
    Synth(synth::SynthArgs),
    /// Run the synthetic scalability benchmark and print a Markdown table.
    Bench(bench::BenchArgs),
    /// Start a scheduler or an executor of a Balans cluster (Apache DataFusion Ballista);
    /// commands given --scheduler df://HOST:PORT run there.
    #[cfg(feature = "cluster")]
    Cluster(cluster::ClusterArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = cli
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    if let Err(e) = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
    {
        eprintln!("balans: cannot start {threads} threads: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("balans: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let quiet = cli.quiet;
    // The cluster's processes run until stopped and handle Ctrl-C and SIGTERM themselves.
    #[cfg(feature = "cluster")]
    if let Command::Cluster(a) = cli.command {
        return match runtime.block_on(cluster::run(a)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("balans: error: {e}");
                ExitCode::from(1)
            }
        };
    }
    let result = runtime.block_on(async move {
        let job = async move {
            match cli.command {
                Command::Correct(a) => correct::run(*a, quiet).await,
                Command::Train(a) => train::run(*a, quiet).await,
                Command::Preprocess(a) => preprocess::run(*a, quiet).await,
                Command::Sql(a) => sql::run(a).await,
                Command::Evaluate(a) => evaluate::run(a, quiet).await,
                Command::Inspect(a) => inspect::run(a).await,
                Command::Tune(a) => tune::run(a, quiet).await,
                Command::Synth(a) => synth::run(a),
                Command::Bench(a) => bench::run(a, threads),
                #[cfg(feature = "cluster")]
                Command::Cluster(_) => unreachable!("handled above"),
            }
        };
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            r = job => Some(r),
            _ = tokio::signal::ctrl_c() => None,
            _ = terminate => None,
        }
    });
    // Waits for blocking workers to notice cancellation and delete their working files.
    runtime.shutdown_timeout(std::time::Duration::from_secs(10));
    match result {
        Some(Ok(())) => ExitCode::SUCCESS,
        Some(Err(e)) => {
            eprintln!("balans: error: {e}");
            ExitCode::from(1)
        }
        None => {
            eprintln!("balans: interrupted; no output written, temporary files removed");
            ExitCode::from(130)
        }
    }
}
