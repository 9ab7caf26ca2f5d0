//! `balans sql`: run SQL statements with Balans' functions registered, or an interactive
//! shell; its options are documented in `balans sql --help`.

use std::path::PathBuf;

use balans_engine::session::SessionSettings;
use balans_engine::source::SourceOptions;
use balans_engine::{BalansError, Result};
use clap::Args;
use datafusion::prelude::SessionContext;

use crate::args::{ClusterArgs, SessionArgs};

#[derive(Args, Debug)]
pub struct SqlArgs {
    /// The statements, e.g. "CREATE EXTERNAL TABLE p STORED AS PARQUET LOCATION 'x.parquet';
    /// SELECT count(*) FROM p". Without statements (and --file), they are read from standard
    /// input: an interactive shell on a terminal, with a history file.
    query: Option<String>,
    /// Read the statements from this file instead.
    #[arg(long, short)]
    file: Option<PathBuf>,
    /// Write the last statement's result to this Parquet file instead of printing it.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Replace an existing output file.
    #[arg(long)]
    overwrite: bool,
    /// Print at most this many rows of the result.
    #[arg(long, default_value_t = 50)]
    max_rows: usize,
    /// S3 endpoint for s3:// locations (e.g. http://127.0.0.1:8333); also AWS_ENDPOINT_URL.
    #[arg(long)]
    s3_endpoint: Option<String>,
    #[command(flatten)]
    session: SessionArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
}

pub async fn run(a: SqlArgs) -> Result<()> {
    let script = match (&a.query, &a.file) {
        (Some(q), None) => q.clone(),
        (None, Some(path)) => std::fs::read_to_string(path).map_err(|e| {
            BalansError::InvalidArgument(format!("cannot read {}: {e}", path.display()))
        })?,
        (Some(_), Some(_)) => {
            return Err(BalansError::InvalidArgument(
                "give the statements either as an argument or with --file, not both".into(),
            ));
        }
        (None, None) => {
            if a.output.is_some() {
                return Err(BalansError::InvalidArgument(
                    "--output needs the statements as an argument or with --file".into(),
                ));
            }
            return run_sql_shell(&a).await;
        }
    };
    let ctx = sql_session(&a).await?;
    match &a.output {
        Some(path) => {
            let written =
                balans_engine::sql::run_sql_to_file(&ctx, &script, path, a.overwrite).await?;
            eprintln!("balans: wrote {} rows to {}", written.rows, path.display());
        }
        None => {
            let (schema, batches) = balans_engine::sql::run_sql(&ctx, &script).await?;
            print_result(schema, &batches, a.max_rows)?;
        }
    }
    Ok(())
}

/// The session of `balans sql`: the memory options, the S3 endpoint and the cluster.
async fn sql_session(a: &SqlArgs) -> Result<SessionContext> {
    let settings = SessionSettings {
        source: SourceOptions {
            s3_endpoint: a.s3_endpoint.clone(),
            ..SourceOptions::default()
        },
        ..a.session.settings()?
    };
    a.cluster.session(&settings).await
}

/// The file the shell appends its statements to.
fn history_path() -> Option<PathBuf> {
    std::env::var_os("BALANS_HISTORY")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".balans_history")))
}

/// `balans sql` without statements: read them from standard input, one result per statement.
/// On a terminal it is a shell: a prompt, line editing with history recall
/// ([`balans_engine::line_editor`]), a history file (`$BALANS_HISTORY` or
/// `~/.balans_history`) listed by `\history`, and `\q`, `exit` or Ctrl-D to end; an error is
/// printed and the session goes on, and Ctrl-C abandons the statement being typed.
async fn run_sql_shell(a: &SqlArgs) -> Result<()> {
    use balans_engine::line_editor::{Outcome, read_line};
    use std::io::{BufRead, IsTerminal, Write};
    let ctx = sql_session(a).await?;
    let interactive = std::io::stdin().is_terminal() && std::io::stderr().is_terminal();
    let history_file = history_path();
    // Earlier statements, oldest first, for recall with the arrow keys.
    let mut history: Vec<String> = history_file
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .map(|text| text.lines().map(str::to_string).collect())
        .unwrap_or_default();
    if interactive {
        eprintln!(
            "balans sql: end statements with ';'; arrows edit and recall, \\history lists \
             earlier statements, \\q quits"
        );
    }
    let mut pending = String::new();
    let mut failures = 0usize;
    // Piped input is read through one lock; the line editor takes its own per line.
    let mut lines = (!interactive).then(|| std::io::stdin().lock().lines());
    loop {
        let line = if interactive {
            let prompt = if pending.trim().is_empty() {
                "balans> "
            } else {
                "   ...> "
            };
            match read_line(prompt, &history, &mut std::io::stderr())? {
                Outcome::Done(line) => line,
                Outcome::Interrupted => {
                    pending.clear();
                    continue;
                }
                Outcome::EndOfInput | Outcome::Editing => break,
            }
        } else {
            match lines.as_mut().and_then(|l| l.next()) {
                Some(line) => line?,
                None => break,
            }
        };
        let command = line.trim();
        if pending.trim().is_empty() {
            match command {
                "\\q" | "exit" | "quit" => break,
                "\\history" => {
                    for entry in &history {
                        println!("{entry}");
                    }
                    continue;
                }
                _ => {}
            }
        }
        pending.push_str(&line);
        pending.push('\n');
        if !pending.trim_end().ends_with(';') {
            continue;
        }
        for statement in balans_engine::sql::split_statements(&pending) {
            let entry = format!("{};", statement.replace('\n', " "));
            // The history file is best effort: a read-only home does not stop the shell.
            if let Some(Ok(mut file)) = history_file.as_ref().map(|path| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
            }) {
                let _ = writeln!(file, "{entry}");
            }
            history.push(entry);
            match balans_engine::sql::run_sql(&ctx, &statement).await {
                Ok((schema, batches)) => print_result(schema, &batches, a.max_rows)?,
                Err(e) => {
                    failures += 1;
                    eprintln!("balans: error: {e}");
                }
            }
        }
        pending.clear();
    }
    if !pending.trim().is_empty() {
        return Err(BalansError::InvalidArgument(
            "the input ended inside a statement (missing ';')".into(),
        ));
    }
    if failures > 0 && !interactive {
        return Err(BalansError::InvalidArgument(format!(
            "{failures} statement(s) failed"
        )));
    }
    Ok(())
}

/// Prints the first `max_rows` rows of a result as a table, with a row count.
fn print_result(
    schema: datafusion::arrow::datatypes::SchemaRef,
    batches: &[datafusion::arrow::array::RecordBatch],
    max_rows: usize,
) -> Result<()> {
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let mut shown = Vec::new();
    let mut left = max_rows;
    for b in batches {
        if left == 0 {
            break;
        }
        let take = b.num_rows().min(left);
        shown.push(b.slice(0, take));
        left -= take;
    }
    if shown.is_empty() {
        shown.push(datafusion::arrow::array::RecordBatch::new_empty(schema));
    }
    println!(
        "{}",
        datafusion::arrow::util::pretty::pretty_format_batches(&shown)?
    );
    if rows > max_rows {
        println!("({rows} rows, first {max_rows} shown; --max-rows or --output for more)");
    } else {
        println!("({rows} row{})", if rows == 1 { "" } else { "s" });
    }
    Ok(())
}
