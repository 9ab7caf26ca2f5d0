//! Embedding Balans as a library: build a session, correct the bundled BBBC021 table with
//! BALANS and print what happened.
//!
//! ```bash
//! cargo run -p balans-examples -- examples/data/bbbc021.parquet /tmp/bbbc021_corrected.parquet
//! ```

use std::path::PathBuf;
use std::sync::Arc;

use balans_engine::source::{FeatureSelection, SourceOptions};
use balans_engine::{CorrectRequest, SessionSettings, build_session, run_correct};
use balans_operators::{BalansConfig, NoProgress};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let input = args
        .next()
        .unwrap_or_else(|| "examples/data/bbbc021.parquet".into());
    let output = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "bbbc021_corrected.parquet".into()),
    );
    let ctx = build_session(&SessionSettings {
        memory_limit: Some(512 << 20),
        ..Default::default()
    })?;
    let request = CorrectRequest {
        input,
        output: output.clone(),
        batch: vec!["Metadata_Batch".into()],
        selection: FeatureSelection::default(),
        config: BalansConfig {
            seed: 1,
            ..BalansConfig::default()
        },
        overwrite: true,
        source: SourceOptions::default(),
        negcon: None,
    };
    let outcome = run_correct(&ctx, &request, Arc::new(NoProgress)).await?;
    println!(
        "corrected {} rows x {} features of {} batch column(s) into {}",
        outcome.written.rows,
        outcome.roles.features.len(),
        outcome.roles.batch.len(),
        output.display()
    );
    Ok(())
}
