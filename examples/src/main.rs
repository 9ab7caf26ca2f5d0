//! Embedding Balans as a library in a DataFusion application: build a session, register a
//! table of profiles (a local path or an `s3://` prefix, e.g. a JUMP
//! `source_N/workspace/profiles/` layout), run BALANS and the metric suite in SQL, and write
//! the corrected profiles back (to a local file or a bucket).
//!
//! ```bash
//! cargo run -p balans-examples -- examples/data/bbbc021.parquet /tmp/bbbc021_corrected.parquet
//! # against an S3-compatible server:
//! cargo run -p balans-examples -- s3://profiles/source_1/workspace/profiles/ \
//!     s3://profiles/corrected/ http://127.0.0.1:8333
//! ```

use balans_engine::source::SourceOptions;
use balans_engine::sql::run_sql;
use balans_engine::{SessionSettings, build_session};
use datafusion::arrow::util::pretty::pretty_format_batches;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let input = args
        .next()
        .unwrap_or_else(|| "examples/data/bbbc021.parquet".into());
    let output = args
        .next()
        .unwrap_or_else(|| "bbbc021_corrected.parquet".into());
    let endpoint = args.next();

    // A session with Balans' planner, SQL relations and functions, a memory limit and (for
    // s3:// locations) an S3 endpoint.
    let ctx = build_session(&SessionSettings {
        memory_limit: Some(512 << 20),
        source: SourceOptions {
            s3_endpoint: endpoint,
            ..SourceOptions::default()
        },
        ..Default::default()
    })?;
    ctx.sql(&format!(
        "CREATE EXTERNAL TABLE profiles STORED AS PARQUET LOCATION '{input}'"
    ))
    .await?
    .collect()
    .await?;

    // Correct and score in one query: the suite before and after, side by side.
    let scores = |table: &str| {
        format!(
            "SELECT metric, value FROM evaluate(({table}), batch => 'Metadata_Batch', \
             label => 'Metadata_MoA', negcon => 'Metadata_PertType = ''negcon''', \
             skip => 'kbet') WHERE kind = 'aggregate'"
        )
    };
    let corrected =
        "SELECT * FROM balans((SELECT * FROM profiles), batch => 'Metadata_Batch', seed => 1)";
    let (_, batches) = run_sql(
        &ctx,
        &format!(
            "SELECT b.metric, b.value AS before, a.value AS after FROM ({}) b JOIN ({}) a \
             ON a.metric = b.metric ORDER BY b.metric",
            scores("SELECT * FROM profiles"),
            scores(corrected)
        ),
    )
    .await?;
    println!("{}", pretty_format_batches(&batches)?);

    // Write the corrected profiles back: one file, or a folder per batch in a bucket.
    let copy = if output.ends_with('/') {
        format!(
            "COPY ({corrected}) TO '{output}' STORED AS PARQUET PARTITIONED BY (Metadata_Batch)"
        )
    } else {
        format!("COPY ({corrected}) TO '{output}' STORED AS PARQUET")
    };
    let (_, written) = run_sql(&ctx, &copy).await?;
    println!(
        "wrote the corrected profiles to {output}:\n{}",
        pretty_format_batches(&written)?
    );
    Ok(())
}
