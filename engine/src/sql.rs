//! The `sql` job: run a script of SQL statements in a Balans session (our functions
//! registered) and return or write the last statement's result.

use std::path::Path;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::prelude::{DataFrame, SessionContext};

use crate::error::{BalansError, Result};
use crate::writer::{WriteStats, check_output, write_parquet_atomic};

/// Splits `script` into statements at semicolons that are outside string literals, quoted
/// identifiers and comments. Empty statements are dropped.
pub fn split_statements(script: &str) -> Vec<String> {
    let mut statements = Vec::new();
    let mut current = String::new();
    let mut chars = script.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                current.push(c);
                // Doubled quotes inside a literal are part of it.
                while let Some(d) = chars.next() {
                    current.push(d);
                    if d == c {
                        if chars.peek() == Some(&c) {
                            current.push(chars.next().expect("peeked"));
                        } else {
                            break;
                        }
                    }
                }
            }
            '-' if chars.peek() == Some(&'-') => {
                for d in chars.by_ref() {
                    if d == '\n' {
                        current.push('\n');
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut previous = ' ';
                for d in chars.by_ref() {
                    if previous == '*' && d == '/' {
                        break;
                    }
                    previous = d;
                }
                current.push(' ');
            }
            ';' => {
                if !current.trim().is_empty() {
                    statements.push(current.trim().to_string());
                }
                current.clear();
            }
            _ => current.push(c),
        }
    }
    if !current.trim().is_empty() {
        statements.push(current.trim().to_string());
    }
    statements
}

/// Runs every statement of `script` but the last (collecting and discarding their results)
/// and plans the last one. Errors name the failing statement.
pub async fn plan_script(ctx: &SessionContext, script: &str) -> Result<DataFrame> {
    let statements = split_statements(script);
    let count = statements.len();
    if count == 0 {
        return Err(BalansError::InvalidArgument(
            "no SQL statement to run".into(),
        ));
    }
    let failed = |i: usize, e: datafusion::error::DataFusionError| {
        let what = if count > 1 {
            format!("statement {} of {count}", i + 1)
        } else {
            "the statement".to_string()
        };
        BalansError::InvalidArgument(format!("{what} failed: {e}"))
    };
    for (i, statement) in statements[..count - 1].iter().enumerate() {
        ctx.sql(statement)
            .await
            .map_err(|e| failed(i, e))?
            .collect()
            .await
            .map_err(|e| failed(i, e))?;
    }
    ctx.sql(&statements[count - 1])
        .await
        .map_err(|e| failed(count - 1, e))
}

/// Runs `script` and collects the last statement's result.
pub async fn run_sql(ctx: &SessionContext, script: &str) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let df = plan_script(ctx, script).await?;
    let schema = df.schema().inner().clone();
    let batches = df
        .collect()
        .await
        .map_err(|e| BalansError::InvalidArgument(format!("the last statement failed: {e}")))?;
    Ok((schema, batches))
}

/// Runs `script` and streams the last statement's result to `output` as Parquet
/// (atomically; an existing file needs `overwrite`).
pub async fn run_sql_to_file(
    ctx: &SessionContext,
    script: &str,
    output: &Path,
    overwrite: bool,
) -> Result<WriteStats> {
    check_output(output, overwrite, &[])?;
    let df = plan_script(ctx, script).await?;
    let stream = df.execute_stream().await?;
    let metadata = vec![
        ("balans.method".to_string(), "sql".to_string()),
        (
            "balans.version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
    ];
    write_parquet_atomic(stream, output, metadata).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_outside_quotes_and_comments() {
        let script = "CREATE TABLE t AS VALUES (1, 'a;b');\n-- a comment; still a comment\n\
                      SELECT \"x;y\" FROM t /* ; */ ;  ;\nSELECT 'it''s; fine'";
        assert_eq!(
            split_statements(script),
            vec![
                "CREATE TABLE t AS VALUES (1, 'a;b')".to_string(),
                "SELECT \"x;y\" FROM t".to_string(),
                "SELECT 'it''s; fine'".to_string(),
            ]
        );
        assert!(split_statements(" ; -- nothing\n").is_empty());
    }

    #[tokio::test]
    async fn runs_statements_in_order_and_names_the_failing_one() {
        let ctx = crate::session::build_session(&Default::default()).unwrap();
        let (_, batches) = run_sql(
            &ctx,
            "CREATE TABLE t AS VALUES (1), (2), (3); SELECT sum(column1) AS s FROM t",
        )
        .await
        .unwrap();
        let total = datafusion::arrow::compute::cast(
            batches[0].column(0),
            &datafusion::arrow::datatypes::DataType::Int64,
        )
        .unwrap();
        use datafusion::arrow::array::AsArray;
        assert_eq!(
            total
                .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                .value(0),
            6
        );
        let err = run_sql(&ctx, "SELECT 1; SELECT nope FROM t; SELECT 2")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("statement 2 of 3"), "{err}");
        assert!(run_sql(&ctx, " ;; ").await.is_err());
    }
}
