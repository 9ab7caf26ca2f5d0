//! Profile-table sources: locating profile files (local paths, globs, `file://`, `s3://`,
//! `https://`), registering them as one DataFusion table with a deterministic row order,
//! and a one-pass inspection report. Column roles (metadata / features / batch) are decided
//! by [`balans_planner::columns`] and re-exported here.
//!
//! Row order of a registered table is: files sorted by object path, rows in file order. The
//! table declares a single output partition, so DataFusion neither spreads the files over
//! several partitions nor splits a file into byte ranges. Operators placed above the scan may
//! still repartition (round robin) when the session runs with `target_partitions > 1`; a
//! consumer that needs the row order must keep its plan on one partition.
//!
//! The module is split by concern:
//!
//! - this file: [`SourceOptions`] and [`register_profiles`], which ties the parts together;
//! - `location`: parsing a location (local path, glob, `file://`, `s3://`, `http(s)://`),
//!   building its object store ([`s3_store`], [`http_store`]) and listing its files;
//! - `format`: [`TableFormat`] and the checks on the files' format (common format, Parquet
//!   footers, unreadable schemas);
//! - `table`: [`ProfileTable`] and the DataFusion table provider over a fixed file list
//!   (scan partitions, Hive partition columns);
//! - `inspect`: [`inspect`] and its [`InspectReport`];
//! - `errors`: how read failures become [`BalansError::Source`] messages.

mod errors;
mod format;
mod inspect;
mod location;
mod table;
#[cfg(test)]
mod test_support;

use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::datatypes::{DataType, Schema};
use datafusion::common::TableReference;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::prelude::SessionContext;

use crate::error::{BalansError, Result};

pub use balans_planner::columns::{ColumnRoles, FeatureSelection, resolve_columns};
pub use format::TableFormat;
pub use inspect::{BatchSize, ColumnType, FeatureValueCounts, InspectReport, ValueCounts, inspect};
pub use location::{http_store, s3_store};
pub use table::{ProfileTable, decode_profile_table, encode_profile_table};

use format::{check_parquet_footers, common_format, explain_schema_failure};
use location::{display_path, list_files, resolve_location};
use table::{FileListTable, RowGroupRows, hive_partitions, parquet_row_groups, scan_groups};

/// Connection settings for remote (`s3://`, `https://`) locations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceOptions {
    /// S3 endpoint URL (e.g. a MinIO server); falls back to the `AWS_ENDPOINT_URL` variable.
    pub s3_endpoint: Option<String>,
    /// Allow plain-HTTP S3 endpoints (implied when the endpoint starts with `http://`).
    pub s3_allow_http: bool,
    /// Time allowed to open a connection.
    pub connect_timeout: Duration,
    /// Time allowed for one whole request.
    pub request_timeout: Duration,
    /// How often a failed request is retried.
    pub max_retries: usize,
    /// Partitions a Parquet table is scanned as: contiguous runs of files, or of row groups
    /// when there are fewer files than partitions (1: one partition). Partitions keep the
    /// row order: partition 0 holds the first rows.
    pub scan_partitions: usize,
}

impl Default for SourceOptions {
    /// Short timeouts so that an unreachable store fails within seconds: connect 5 s,
    /// request 30 s, one retry.
    fn default() -> Self {
        Self {
            s3_endpoint: None,
            s3_allow_http: false,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            max_retries: 1,
            scan_partitions: 1,
        }
    }
}

/// Registers the profile files at `location` as one table named `table_name` in `ctx`.
///
/// `location` is a local file or directory, a glob (`data/*.parquet`, `plates/**/*.parquet`;
/// `*` and `?` stay within one path segment, `**` spans directories), a `file://` URL, an
/// `s3://bucket/prefix` location (a key, a prefix or a glob) or an `http(s)://` URL of one
/// file. A directory or prefix stands for every file with a supported extension below it,
/// recursively. All files must share one [`TableFormat`]; their schemas are merged.
///
/// For `s3://` an object store is registered for the bucket, configured from the `AWS_*`
/// environment: unsigned requests (public buckets) unless `AWS_ACCESS_KEY_ID` is set, endpoint
/// from `opts.s3_endpoint` or `AWS_ENDPOINT_URL`, region `us-east-1` unless set. S3 keys are
/// taken verbatim (not percent-decoded). An existing table of the same name is replaced.
///
/// Rows are exposed on a single partition in a fixed order: files sorted by path, rows in file
/// order. Unreadable locations or files are reported as [`BalansError::Source`]; a location that
/// matches no profile file, mixed formats or unknown extensions as [`BalansError::BadInput`].
pub async fn register_profiles(
    ctx: &SessionContext,
    location: &str,
    table_name: &str,
    opts: &SourceOptions,
) -> Result<ProfileTable> {
    if table_name.trim().is_empty() {
        return Err(BalansError::InvalidArgument(
            "the table name must not be empty".into(),
        ));
    }
    let resolved = resolve_location(ctx, location, opts)?;
    let mut metas = list_files(location, &resolved).await?;
    metas.sort_by(|a, b| a.location.as_ref().cmp(b.location.as_ref()));
    let format = common_format(location, &metas)?;

    if format == TableFormat::Parquet {
        check_parquet_footers(location, &resolved, &metas).await?;
    }
    let state = ctx.state();
    let file_format = format.file_format();
    let schema = match file_format
        .infer_schema(&state, &resolved.store, &metas)
        .await
    {
        Ok(schema) => schema,
        Err(err) => {
            return Err(explain_schema_failure(
                &state,
                location,
                &resolved,
                file_format.as_ref(),
                &metas,
                err,
            )
            .await);
        }
    };
    if schema.fields().is_empty() {
        return Err(BalansError::BadInput(format!(
            "the files at {location} have no columns"
        )));
    }
    // Hive-style partition columns the files do not hold themselves.
    let (mut partition_cols, mut partition_values) = hive_partitions(&resolved, &metas);
    let keep: Vec<bool> = partition_cols
        .iter()
        .map(|c| schema.index_of(c).is_err())
        .collect();
    if keep.iter().any(|k| !k) {
        partition_cols = partition_cols
            .into_iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(c, _)| c)
            .collect();
        for values in &mut partition_values {
            *values = std::mem::take(values)
                .into_iter()
                .zip(&keep)
                .filter(|(_, k)| **k)
                .map(|(v, _)| v)
                .collect();
        }
    }
    let file_schema = schema;
    let schema = if partition_cols.is_empty() {
        Arc::clone(&file_schema)
    } else {
        let mut fields: Vec<_> = file_schema.fields().iter().cloned().collect();
        fields.extend(partition_cols.iter().map(|c| {
            Arc::new(datafusion::arrow::datatypes::Field::new(
                c,
                DataType::Utf8,
                false,
            ))
        }));
        Arc::new(Schema::new_with_metadata(
            fields,
            file_schema.metadata().clone(),
        ))
    };
    let partitions = opts.scan_partitions.max(1);
    let row_groups: Vec<RowGroupRows> =
        if format == TableFormat::Parquet && partitions > 1 && metas.len() < partitions {
            parquet_row_groups(location, &resolved, &metas).await?
        } else {
            vec![None; metas.len()]
        };
    let groups = if format == TableFormat::Parquet {
        scan_groups(&metas, &row_groups, partitions)
    } else {
        scan_groups(&metas, &row_groups, 1)
    };
    let provider = FileListTable {
        schema: Arc::clone(&schema),
        file_schema,
        format,
        store_url: ObjectStoreUrl::parse(resolved.store_url.as_str())?,
        files: metas.clone(),
        partition_cols,
        partition_values,
        groups,
        row_group_totals: row_groups
            .iter()
            .map(|r| r.as_ref().map_or(0, |v| v.len()))
            .collect(),
    };

    let table_ref = TableReference::bare(table_name);
    ctx.deregister_table(table_ref.clone())?;
    ctx.register_table(table_ref, Arc::new(provider))?;

    let files = metas
        .iter()
        .map(|meta| display_path(&resolved, &meta.location))
        .collect();
    Ok(ProfileTable {
        table_name: table_name.to_string(),
        location: location.to_string(),
        format,
        files,
        schema,
    })
}
