//! `balans inspect`: print the detected schema, batches and data problems of a profile table;
//! its options are documented in `balans inspect --help`.

use balans_engine::session::{SessionSettings, build_session};
use balans_engine::source::{inspect, register_profiles};
use balans_engine::{BalansError, Result};
use clap::Args;

use crate::args::SelectionArgs;

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Input: a file, directory, glob, or file://, s3://, https:// URL (or use --input).
    #[arg(value_name = "PATH_OR_URL")]
    location: Option<String>,
    /// Input, as for `correct`.
    #[arg(long = "input", short = 'i', conflicts_with = "location")]
    input: Option<String>,
    #[command(flatten)]
    select: SelectionArgs,
    /// Batch key column(s) whose sizes to report.
    #[arg(long, short, value_delimiter = ',')]
    batch: Vec<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub async fn run(a: InspectArgs) -> Result<()> {
    let location = a.location.or(a.input).ok_or_else(|| {
        BalansError::InvalidArgument("inspect needs a location: balans inspect PATH_OR_URL".into())
    })?;
    let ctx = build_session(&SessionSettings::default())?;
    let table = register_profiles(&ctx, &location, "profiles", &a.select.source()).await?;
    let report = inspect(&ctx, &table, &a.select.selection(), &a.batch).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report).expect("json"));
    } else {
        print!("{report}");
    }
    Ok(())
}
