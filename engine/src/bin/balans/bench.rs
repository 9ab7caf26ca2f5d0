//! `balans bench`: the synthetic scalability benchmark; its options are documented in
//! `balans bench --help`.

use std::path::PathBuf;

use balans_engine::Result;
use clap::Args;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Workloads: N (with --d features) or NxD, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "10000,100000,1000000,5000000,100000x300"
    )]
    sizes: Vec<String>,
    /// Features for workloads given as N.
    #[arg(long, default_value_t = 10)]
    d: usize,
    /// Directory for the generated data (kept between runs; default: a temporary directory).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Also write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write each data set as a directory of Parquet files of this many rows each.
    #[arg(long)]
    rows_per_file: Option<usize>,
    /// Also time our Harmony (`correct --method harmony`) on the same files.
    #[arg(long)]
    harmony: bool,
    /// Also time harmonypy 2.1 on the same files with this Python (which has harmonypy,
    /// numpy, pandas and pyarrow; see bench/peers/harmonypy_bench.py).
    #[arg(long)]
    harmonypy: Option<PathBuf>,
    /// Extra options passed to the BALANS runs of `balans correct`.
    #[arg(last = true)]
    extra: Vec<String>,
}

pub fn run(a: BenchArgs, threads: usize) -> Result<()> {
    use balans_engine::bench::{BenchOptions, Workload, markdown_table, run_bench};
    let workloads: Vec<Workload> = a
        .sizes
        .iter()
        .map(|s| Workload::parse(s, a.d))
        .collect::<Result<_>>()?;
    let tmp = tempfile::tempdir()?;
    let dir = a
        .data_dir
        .clone()
        .unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let opts = BenchOptions {
        exe: std::env::current_exe()?,
        threads,
        dir,
        extra: a.extra.clone(),
        rows_per_file: a.rows_per_file,
        harmony: a.harmony,
        harmonypy: a.harmonypy.clone(),
    };
    let rows = run_bench(&workloads, &opts)?;
    println!("{}", markdown_table(&rows));
    if let Some(path) = a.json {
        std::fs::write(path, serde_json::to_string_pretty(&rows).expect("json"))?;
    }
    Ok(())
}
