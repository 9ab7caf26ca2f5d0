//! Profile-table sources: locating profile files (local paths, globs, `file://`, `s3://`,
//! `https://`), registering them as one DataFusion table with a deterministic row order,
//! assigning column roles (metadata / features / batch) and a one-pass inspection report.
//!
//! Row order of a registered table is: files sorted by object path, rows in file order. The
//! table declares a single output partition, so DataFusion neither spreads the files over
//! several partitions nor splits a file into byte ranges. Operators placed above the scan may
//! still repartition (round robin) when the session runs with `target_partitions > 1`; a
//! consumer that needs the row order must keep its plan on one partition.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type, Schema, SchemaRef};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{Column, TableReference};
use datafusion::datasource::TableType;
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::file_format::arrow::ArrowFormat;
use datafusion::datasource::file_format::csv::CsvFormat;
use datafusion::datasource::file_format::file_compression_type::FileCompressionType;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder};
use datafusion::datasource::table_schema::TableSchema;
use datafusion::error::DataFusionError;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::{ExecutionPlan, Partitioning as PhysicalPartitioning};
use datafusion::prelude::SessionContext;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::http::HttpBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientConfigKey, ClientOptions, ObjectMeta, ObjectStore, ObjectStoreExt,
    RetryConfig,
};
use regex::Regex;
use serde::{Serialize, Serializer};
use url::Url;

use crate::error::{BalansError, Result};

/// Prefix that marks a column as metadata regardless of its type.
const METADATA_PREFIX: &str = "Metadata_";

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

/// File format of a profile table, detected from the file extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TableFormat {
    /// Apache Parquet (`.parquet`).
    Parquet,
    /// Arrow IPC file format (`.arrow`, `.ipc`, `.feather`).
    ArrowIpc,
    /// Comma-separated values with a header row (`.csv`, or `.csv.gz` when `gzip`).
    Csv {
        /// Whether the file is gzip-compressed.
        gzip: bool,
    },
}

/// Extensions recognised as profile files, as shown in error messages.
const SUPPORTED_EXTENSIONS: &str = ".parquet, .arrow, .ipc, .feather, .csv, .csv.gz";

impl TableFormat {
    /// Detects the format from a file name or path (case-insensitive); `None` if unknown.
    pub fn detect(path: &str) -> Option<Self> {
        let name = path.rsplit('/').next().unwrap_or(path).to_ascii_lowercase();
        if name.ends_with(".parquet") {
            Some(Self::Parquet)
        } else if name.ends_with(".arrow") || name.ends_with(".ipc") || name.ends_with(".feather") {
            Some(Self::ArrowIpc)
        } else if name.ends_with(".csv") {
            Some(Self::Csv { gzip: false })
        } else if name.ends_with(".csv.gz") {
            Some(Self::Csv { gzip: true })
        } else {
            None
        }
    }

    /// Detects the format from a file name or path; an unknown extension is a `BadInput` error.
    pub fn from_path(path: &str) -> Result<Self> {
        Self::detect(path).ok_or_else(|| {
            BalansError::BadInput(format!(
                "cannot tell the file format of '{path}': supported extensions are \
                 {SUPPORTED_EXTENSIONS}"
            ))
        })
    }

    /// Short name: `parquet`, `arrow`, `csv` or `csv.gz`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Parquet => "parquet",
            Self::ArrowIpc => "arrow",
            Self::Csv { gzip: false } => "csv",
            Self::Csv { gzip: true } => "csv.gz",
        }
    }

    /// The DataFusion reader for this format (CSV: header row, schema inference).
    fn file_format(&self) -> Arc<dyn FileFormat> {
        match self {
            // Plain Utf8 strings (not views), so outputs keep the input's column types.
            Self::Parquet => Arc::new(ParquetFormat::default().with_force_view_types(false)),
            Self::ArrowIpc => Arc::new(ArrowFormat),
            Self::Csv { gzip } => {
                let compression = if *gzip {
                    FileCompressionType::GZIP
                } else {
                    FileCompressionType::UNCOMPRESSED
                };
                Arc::new(
                    CsvFormat::default()
                        .with_has_header(true)
                        .with_file_compression_type(compression),
                )
            }
        }
    }
}

impl fmt::Display for TableFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for TableFormat {
    /// Serialised as its short name (`"parquet"`, `"arrow"`, `"csv"`, `"csv.gz"`).
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

/// A profile table registered in a [`SessionContext`] by [`register_profiles`].
#[derive(Debug, Clone)]
pub struct ProfileTable {
    /// Name under which the table is registered.
    pub table_name: String,
    /// The location as the user gave it.
    pub location: String,
    /// Format shared by all files.
    pub format: TableFormat,
    /// The files read, in scan order (sorted by path): local paths or full URLs.
    pub files: Vec<String>,
    /// The table schema (merged over all files).
    pub schema: SchemaRef,
}

/// A table over a fixed, path-sorted list of files.
///
/// Unlike DataFusion's `ListingTable` it does not list the files again for every scan (a file
/// removed after registration is a read error, not silently skipped) and attaches no file
/// statistics: DataFusion 55 turns a Parquet column whose statistics have `min == max` into a
/// constant, but Parquet statistics ignore NaN, so a column like `[NaN, 1.0]` would read as
/// `[1.0, 1.0]`. Hive-style directory segments (`key=value`) shared by every file become
/// string columns after the file columns. The scan has one partition, or contiguous runs of
/// files or row groups as several (see [`SourceOptions::scan_partitions`]).
#[derive(Debug)]
struct FileListTable {
    schema: SchemaRef,
    file_schema: SchemaRef,
    format: Arc<dyn FileFormat>,
    store_url: ObjectStoreUrl,
    files: Vec<ObjectMeta>,
    /// Hive partition column names, and every file's values (same order as `files`).
    partition_cols: Vec<String>,
    partition_values: Vec<Vec<String>>,
    /// The scan's file groups: per partition, `(file index, row groups or all)`.
    groups: Vec<Vec<(usize, Option<Vec<usize>>)>>,
    /// Row groups per file (0 where the metadata was not read).
    row_group_totals: Vec<usize>,
}

/// Rows of each row group of a Parquet file, where they were read.
type RowGroupRows = Option<Vec<usize>>;

/// Splits `weights` (in order) into `min(parts, weights.len())` contiguous runs of similar
/// total weight; returns the index where each run starts.
fn contiguous_runs(weights: &[u64], parts: usize) -> Vec<usize> {
    let n = weights.len();
    let total: u64 = weights.iter().sum();
    let parts = parts.clamp(1, n.max(1));
    let mut starts = vec![0];
    let mut acc = 0u64;
    for (i, &w) in weights.iter().enumerate() {
        let open = parts - starts.len();
        if i > 0
            && open > 0
            && (acc as u128 * parts as u128 >= total as u128 * starts.len() as u128
                || n - i <= open)
        {
            starts.push(i);
        }
        acc += w;
    }
    starts
}

/// The scan's partitions: runs of files, or runs of `(file, row group)` units when row groups
/// are known and there are fewer files than partitions.
fn scan_groups(
    files: &[ObjectMeta],
    row_groups: &[RowGroupRows],
    partitions: usize,
) -> Vec<Vec<(usize, Option<Vec<usize>>)>> {
    if partitions <= 1 || files.is_empty() {
        return vec![(0..files.len()).map(|f| (f, None)).collect()];
    }
    let by_row_group = files.len() < partitions && row_groups.iter().all(|r| r.is_some());
    if !by_row_group {
        let weights: Vec<u64> = files.iter().map(|m| m.size.max(1)).collect();
        let starts = contiguous_runs(&weights, partitions);
        return starts
            .iter()
            .enumerate()
            .map(|(k, &s)| {
                let e = starts.get(k + 1).copied().unwrap_or(files.len());
                (s..e).map(|f| (f, None)).collect()
            })
            .collect();
    }
    let units: Vec<(usize, usize, u64)> = row_groups
        .iter()
        .enumerate()
        .flat_map(|(f, rg)| {
            rg.as_ref()
                .expect("row groups known")
                .iter()
                .enumerate()
                .map(move |(g, &rows)| (f, g, rows.max(1) as u64))
        })
        .collect();
    if units.is_empty() {
        return vec![(0..files.len()).map(|f| (f, None)).collect()];
    }
    let weights: Vec<u64> = units.iter().map(|u| u.2).collect();
    let starts = contiguous_runs(&weights, partitions);
    starts
        .iter()
        .enumerate()
        .map(|(k, &s)| {
            let e = starts.get(k + 1).copied().unwrap_or(units.len());
            let mut group: Vec<(usize, Option<Vec<usize>>)> = Vec::new();
            for &(f, g, _) in &units[s..e] {
                match group.last_mut() {
                    Some((last, Some(rgs))) if *last == f => rgs.push(g),
                    _ => group.push((f, Some(vec![g]))),
                }
            }
            group
        })
        .collect()
}

#[async_trait::async_trait]
impl TableProvider for FileListTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        use datafusion::common::ScalarValue;
        use datafusion::datasource::physical_plan::parquet::ParquetAccessPlan;
        let partition_fields: Vec<_> = self
            .partition_cols
            .iter()
            .map(|c| {
                Arc::new(datafusion::arrow::datatypes::Field::new(
                    c,
                    DataType::Utf8,
                    false,
                ))
            })
            .collect();
        let source = self.format.file_source(
            TableSchema::builder(Arc::clone(&self.file_schema))
                .with_table_partition_cols(partition_fields)
                .build(),
        );
        let groups: Vec<FileGroup> = self
            .groups
            .iter()
            .map(|group| {
                let files: Vec<PartitionedFile> = group
                    .iter()
                    .map(|(f, rgs)| {
                        let meta = &self.files[*f];
                        let mut file = PartitionedFile::from(meta.clone());
                        file.partition_values = self.partition_values[*f]
                            .iter()
                            .map(|v| ScalarValue::Utf8(Some(v.clone())))
                            .collect();
                        if let Some(rgs) = rgs {
                            let total = self.row_group_count(*f);
                            let mut plan = ParquetAccessPlan::new_none(total);
                            for &g in rgs {
                                plan.scan(g);
                            }
                            file = file.with_extension(plan);
                        }
                        file
                    })
                    .collect();
                FileGroup::new(files)
            })
            .collect();
        // A declared partitioning keeps the optimizer from splitting the file groups into
        // byte ranges (`repartition_file_scans`), which would break the row order.
        let partitions = groups.len().max(1);
        let mut builder = FileScanConfigBuilder::new(self.store_url.clone(), source);
        for group in groups {
            builder = builder.with_file_group(group);
        }
        let config = builder
            .with_projection_indices(projection.cloned())?
            .with_limit(limit)
            .with_output_partitioning(Some(PhysicalPartitioning::UnknownPartitioning(partitions)))
            .build();
        self.format.create_physical_plan(state, config).await
    }
}

impl FileListTable {
    fn row_group_count(&self, file: usize) -> usize {
        self.row_group_totals.get(file).copied().unwrap_or(0)
    }
}

/// Hive-style `key=value` directory segments of `relative` (the path below the location).
fn hive_segments(relative: &str) -> Vec<(String, String)> {
    let mut segments: Vec<&str> = relative.split('/').collect();
    segments.pop(); // the file name
    segments
        .iter()
        .filter_map(|s| s.split_once('='))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect()
}

/// Decodes `%XX` escapes (as DataFusion's partitioned writes produce them).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The Hive partition columns shared by every file (same keys in the same order), and each
/// file's values; none when the files disagree.
fn hive_partitions(
    resolved: &ResolvedLocation,
    metas: &[ObjectMeta],
) -> (Vec<String>, Vec<Vec<String>>) {
    let per_file: Vec<Vec<(String, String)>> = metas
        .iter()
        .map(|m| {
            relative_path(&resolved.base, &m.location)
                .map(hive_segments)
                .unwrap_or_default()
        })
        .collect();
    let keys: Vec<String> = per_file
        .first()
        .map(|f| f.iter().map(|(k, _)| k.clone()).collect())
        .unwrap_or_default();
    let consistent = !keys.is_empty()
        && per_file
            .iter()
            .all(|f| f.iter().map(|(k, _)| k).eq(keys.iter()));
    if !consistent {
        return (Vec::new(), vec![Vec::new(); metas.len()]);
    }
    let values = per_file
        .into_iter()
        .map(|f| f.into_iter().map(|(_, v)| v).collect())
        .collect();
    (keys, values)
}

/// Row counts of every row group of each Parquet file.
async fn parquet_row_groups(
    location: &str,
    resolved: &ResolvedLocation,
    metas: &[ObjectMeta],
) -> Result<Vec<RowGroupRows>> {
    use datafusion::datasource::physical_plan::parquet::metadata::DFParquetMetadata;
    let mut out = Vec::with_capacity(metas.len());
    for meta in metas {
        let md = DFParquetMetadata::new(resolved.store.as_ref(), meta)
            .fetch_metadata()
            .await
            .map_err(|e| BalansError::Source {
                location: location.to_string(),
                message: format!(
                    "corrupt Parquet file {}: {e}",
                    display_path(resolved, &meta.location)
                ),
            })?;
        out.push(Some(
            md.row_groups()
                .iter()
                .map(|rg| rg.num_rows().max(0) as usize)
                .collect(),
        ));
    }
    Ok(out)
}

/// Where a location lives: the object store, the base path to list and an optional glob.
struct ResolvedLocation {
    /// Object store root, e.g. `file:///`, `s3://bucket/`, `https://host:port/`.
    store_url: Url,
    store: Arc<dyn ObjectStore>,
    /// Path (inside the store) of the file or directory named before any glob.
    base: ObjectPath,
    /// Anchored regex of the glob part, matched against paths relative to `base`.
    glob: Option<Regex>,
    kind: StoreKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoreKind {
    Local,
    S3,
    Http,
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
        format: file_format,
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

/// Checks each Parquet file's trailer (size, magic, footer length) before any reader sees it,
/// so a truncated or foreign file gets an error naming it (the Parquet reader can panic on a
/// footer length larger than the file).
async fn check_parquet_footers(
    location: &str,
    resolved: &ResolvedLocation,
    metas: &[ObjectMeta],
) -> Result<()> {
    for meta in metas {
        let size = meta.size;
        let name = display_path(resolved, &meta.location);
        let bad = |m: String| BalansError::Source {
            location: location.to_string(),
            message: format!("corrupt Parquet file {name}: {m}"),
        };
        if size < 12 {
            return Err(bad(format!(
                "{size} bytes is too small for a Parquet file (empty or truncated)"
            )));
        }
        let tail = resolved
            .store
            .get_range(&meta.location, (size - 8)..size)
            .await
            .map_err(|e| read_failure(location, "could not read", e))?;
        if &tail[4..8] != b"PAR1" {
            return Err(bad(
                "no Parquet magic bytes at the end (not Parquet, or truncated)".into(),
            ));
        }
        let footer = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]) as u64;
        if footer + 12 > size {
            return Err(bad(format!(
                "footer length {footer} exceeds the file size {size} (truncated or corrupt)"
            )));
        }
    }
    Ok(())
}

/// Parses `location`, builds (and registers, for remote stores) the object store it needs.
fn resolve_location(
    ctx: &SessionContext,
    location: &str,
    opts: &SourceOptions,
) -> Result<ResolvedLocation> {
    let trimmed = location.trim();
    if trimmed.is_empty() {
        return Err(BalansError::InvalidArgument(
            "the input location must not be empty".into(),
        ));
    }
    let lower = trimmed.to_ascii_lowercase();
    if lower.starts_with("s3://") || lower.starts_with("s3a://") {
        resolve_s3(ctx, location, trimmed, opts)
    } else if lower.starts_with("https://") || lower.starts_with("http://") {
        resolve_http(ctx, location, trimmed, opts)
    } else if lower.starts_with("file://") {
        let url = Url::parse(trimmed).map_err(|e| source_error(location, e))?;
        let path = url.to_file_path().map_err(|()| {
            BalansError::InvalidArgument(format!("'{location}' is not a valid local file URL"))
        })?;
        resolve_local(ctx, location, &path.to_string_lossy())
    } else if let Some((scheme, _)) = trimmed.split_once("://") {
        Err(BalansError::InvalidArgument(format!(
            "unsupported location scheme '{scheme}://' in '{location}': use a local path, \
             file://, s3:// or https://"
        )))
    } else {
        resolve_local(ctx, location, trimmed)
    }
}

fn resolve_local(ctx: &SessionContext, location: &str, path: &str) -> Result<ResolvedLocation> {
    let (base, glob) = split_glob(path);
    let base = if base.is_empty() { "." } else { base.as_str() };
    let base_fs = std::path::Path::new(base);
    let canonical = base_fs.canonicalize().map_err(|e| {
        let message = if e.kind() == std::io::ErrorKind::NotFound {
            format!("'{}' does not exist", base_fs.display())
        } else {
            format!("cannot access '{}': {e}", base_fs.display())
        };
        BalansError::Source {
            location: location.to_string(),
            message,
        }
    })?;
    let object_path =
        ObjectPath::from_absolute_path(&canonical).map_err(|e| source_error(location, e))?;
    let object_store_url = ObjectStoreUrl::local_filesystem();
    let store_url: Url = AsRef::<Url>::as_ref(&object_store_url).clone();
    let store = match ctx.runtime_env().object_store(&object_store_url) {
        Ok(store) => store,
        Err(_) => {
            let store: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new());
            ctx.register_object_store(&store_url, Arc::clone(&store));
            store
        }
    };
    Ok(ResolvedLocation {
        store_url,
        store,
        base: object_path,
        glob: glob.map(|g| glob_to_regex(location, &g)).transpose()?,
        kind: StoreKind::Local,
    })
}

fn resolve_s3(
    ctx: &SessionContext,
    location: &str,
    trimmed: &str,
    opts: &SourceOptions,
) -> Result<ResolvedLocation> {
    let rest = trimmed
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(BalansError::InvalidArgument(format!(
            "'{location}' names no bucket: expected s3://bucket/prefix"
        )));
    }
    let (base, glob) = split_glob(key);
    let base = ObjectPath::parse(base.trim_matches('/')).map_err(|e| {
        BalansError::InvalidArgument(format!("invalid S3 key in '{location}': {e}"))
    })?;

    let store = s3_store(bucket, opts).map_err(|e| source_error(location, e))?;
    let store_url = Url::parse(&format!("s3://{bucket}/")).map_err(|e| {
        BalansError::InvalidArgument(format!("invalid bucket name in '{location}': {e}"))
    })?;
    ctx.register_object_store(&store_url, Arc::clone(&store));
    Ok(ResolvedLocation {
        store_url,
        store,
        base,
        glob: glob.map(|g| glob_to_regex(location, &g)).transpose()?,
        kind: StoreKind::S3,
    })
}

/// An S3 store for `bucket`: `--s3-endpoint` or `AWS_ENDPOINT_URL`, unsigned requests when
/// no `AWS_ACCESS_KEY_ID` is set (public buckets), region `us-east-1` unless set, plain HTTP
/// for `http://` endpoints, and the options' timeouts and retries.
pub fn s3_store(bucket: &str, opts: &SourceOptions) -> object_store::Result<Arc<dyn ObjectStore>> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let endpoint = opts
        .s3_endpoint
        .clone()
        .filter(|e| !e.trim().is_empty())
        .or_else(|| env("AWS_ENDPOINT_URL"))
        .or_else(|| env("AWS_ENDPOINT"));
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    let mut allow_http = opts.s3_allow_http;
    if let Some(endpoint) = &endpoint {
        builder = builder.with_endpoint(endpoint);
        allow_http |= endpoint.to_ascii_lowercase().starts_with("http://");
    }
    if env("AWS_ACCESS_KEY_ID").is_none() {
        builder = builder.with_skip_signature(true);
    }
    if env("AWS_REGION").is_none() && env("AWS_DEFAULT_REGION").is_none() {
        builder = builder.with_region("us-east-1");
    }
    // Set client keys one by one so options coming from the environment are kept.
    for (key, value) in client_config(opts) {
        builder = builder.with_config(object_store::aws::AmazonS3ConfigKey::Client(key), value);
    }
    if allow_http {
        builder = builder.with_allow_http(true);
    }
    Ok(Arc::new(builder.with_retry(retry_config(opts)).build()?))
}

fn resolve_http(
    ctx: &SessionContext,
    location: &str,
    trimmed: &str,
    opts: &SourceOptions,
) -> Result<ResolvedLocation> {
    let url = Url::parse(trimmed).map_err(|e| {
        BalansError::InvalidArgument(format!("'{location}' is not a valid URL: {e}"))
    })?;
    if url.query().is_some() || url.path().ends_with('/') || url.path().contains('*') {
        return Err(BalansError::InvalidArgument(format!(
            "'{location}': an http(s) location must name a single file (no directory, glob or \
             query string)"
        )));
    }
    let mut store_url = url.clone();
    store_url.set_path("/");
    let store = http_store(&store_url, opts).map_err(|e| source_error(location, e))?;
    ctx.register_object_store(&store_url, Arc::clone(&store));
    let base = ObjectPath::from_url_path(url.path())
        .map_err(|e| BalansError::InvalidArgument(format!("invalid path in '{location}': {e}")))?;
    Ok(ResolvedLocation {
        store_url,
        store,
        base,
        glob: None,
        kind: StoreKind::Http,
    })
}

/// An HTTP(S) store for the server of `url` (scheme, host and port), with the options'
/// timeouts and retries; plain HTTP allowed for `http://`.
pub fn http_store(url: &Url, opts: &SourceOptions) -> object_store::Result<Arc<dyn ObjectStore>> {
    let mut base = url.clone();
    base.set_path("/");
    base.set_query(None);
    let mut client = ClientOptions::new();
    for (key, value) in client_config(opts) {
        client = client.with_config(key, value);
    }
    if url.scheme() == "http" {
        client = client.with_allow_http(true);
    }
    Ok(Arc::new(
        HttpBuilder::new()
            .with_url(base.as_str().trim_end_matches('/'))
            .with_client_options(client)
            .with_retry(retry_config(opts))
            .build()?,
    ))
}

/// Client settings derived from the options, as `object_store` configuration keys.
fn client_config(opts: &SourceOptions) -> [(ClientConfigKey, String); 2] {
    [
        (
            ClientConfigKey::ConnectTimeout,
            format!("{}ms", opts.connect_timeout.as_millis()),
        ),
        (
            ClientConfigKey::Timeout,
            format!("{}ms", opts.request_timeout.as_millis()),
        ),
    ]
}

/// Retry policy: `max_retries` quick retries, all within one request timeout.
fn retry_config(opts: &SourceOptions) -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: opts.max_retries,
        retry_timeout: opts.request_timeout,
    }
}

/// Lists the files a resolved location stands for (unsorted).
async fn list_files(location: &str, resolved: &ResolvedLocation) -> Result<Vec<ObjectMeta>> {
    if let Some(glob) = &resolved.glob {
        let metas = list_prefix(location, resolved).await?;
        let matched: Vec<ObjectMeta> = metas
            .into_iter()
            .filter(|meta| {
                relative_path(&resolved.base, &meta.location).is_some_and(|rel| glob.is_match(rel))
            })
            .collect();
        if matched.is_empty() {
            return Err(BalansError::BadInput(format!("no files match {location}")));
        }
        return Ok(matched);
    }

    match resolved.kind {
        StoreKind::Local => {
            let fs_path = format!("/{}", resolved.base);
            let metadata = std::fs::metadata(&fs_path).map_err(|e| source_error(location, e))?;
            if metadata.is_dir() {
                list_directory(location, resolved).await
            } else {
                Ok(vec![head(location, resolved).await?])
            }
        }
        StoreKind::Http => Ok(vec![head(location, resolved).await?]),
        StoreKind::S3 => {
            let names_dir = resolved.base.as_ref().is_empty() || location.ends_with('/');
            if !names_dir {
                match resolved.store.head(&resolved.base).await {
                    Ok(meta) => return Ok(vec![meta]),
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(read_failure(location, "could not look up", e)),
                }
            }
            match list_directory(location, resolved).await {
                Err(BalansError::BadInput(_))
                    if !names_dir && TableFormat::detect(resolved.base.as_ref()).is_some() =>
                {
                    Err(BalansError::Source {
                        location: location.to_string(),
                        message: "no such object".into(),
                    })
                }
                other => other,
            }
        }
    }
}

/// Every file with a supported extension below `resolved.base`.
async fn list_directory(location: &str, resolved: &ResolvedLocation) -> Result<Vec<ObjectMeta>> {
    let metas: Vec<ObjectMeta> = list_prefix(location, resolved)
        .await?
        .into_iter()
        .filter(|meta| TableFormat::detect(meta.location.as_ref()).is_some())
        .collect();
    if metas.is_empty() {
        return Err(BalansError::BadInput(format!(
            "no profile files ({SUPPORTED_EXTENSIONS}) found in {location}"
        )));
    }
    Ok(metas)
}

async fn list_prefix(location: &str, resolved: &ResolvedLocation) -> Result<Vec<ObjectMeta>> {
    if resolved.kind == StoreKind::Http {
        return Err(BalansError::InvalidArgument(format!(
            "'{location}': listing is not supported over http(s); name a single file"
        )));
    }
    let prefix = (!resolved.base.as_ref().is_empty()).then_some(&resolved.base);
    resolved
        .store
        .list(prefix)
        .try_collect()
        .await
        .map_err(|e| read_failure(location, "could not list files", e))
}

async fn head(location: &str, resolved: &ResolvedLocation) -> Result<ObjectMeta> {
    resolved
        .store
        .head(&resolved.base)
        .await
        .map_err(|e| read_failure(location, "could not open", e))
}

/// The one format shared by all files, or a `BadInput` error.
fn common_format(location: &str, metas: &[ObjectMeta]) -> Result<TableFormat> {
    let mut by_format: Vec<(TableFormat, usize, &str)> = Vec::new();
    for meta in metas {
        let path = meta.location.as_ref();
        let format = TableFormat::from_path(path)?;
        match by_format.iter_mut().find(|(f, _, _)| *f == format) {
            Some(entry) => entry.1 += 1,
            None => by_format.push((format, 1, path)),
        }
    }
    match by_format.as_slice() {
        [(format, _, _)] => Ok(*format),
        [] => Err(BalansError::BadInput(format!(
            "no profile files found at {location}"
        ))),
        many => {
            let parts: Vec<String> = many
                .iter()
                .map(|(format, count, first)| format!("{count} {format} (e.g. {first})"))
                .collect();
            Err(BalansError::BadInput(format!(
                "{location} mixes file formats: {}; point the location at files of one format",
                parts.join(", ")
            )))
        }
    }
}

/// Turns a failed schema inference into a Source error naming the first unreadable file.
async fn explain_schema_failure(
    state: &datafusion::execution::SessionState,
    location: &str,
    resolved: &ResolvedLocation,
    format: &dyn FileFormat,
    metas: &[ObjectMeta],
    err: DataFusionError,
) -> BalansError {
    if metas.len() > 1 {
        for meta in metas {
            if let Err(file_err) = format
                .infer_schema(state, &resolved.store, std::slice::from_ref(meta))
                .await
            {
                return BalansError::Source {
                    location: location.to_string(),
                    message: format!(
                        "cannot read the schema of {}: {}",
                        display_path(resolved, &meta.location),
                        error_chain(&file_err)
                    ),
                };
            }
        }
        return BalansError::Source {
            location: location.to_string(),
            message: format!("the files have incompatible schemas: {}", error_chain(&err)),
        };
    }
    let file = metas
        .first()
        .map(|meta| display_path(resolved, &meta.location))
        .unwrap_or_else(|| location.to_string());
    BalansError::Source {
        location: location.to_string(),
        message: format!("cannot read the schema of {file}: {}", error_chain(&err)),
    }
}

fn read_failure(location: &str, action: &str, err: object_store::Error) -> BalansError {
    let message = match &err {
        object_store::Error::NotFound { path, .. } => format!("{action} '{path}': not found"),
        _ => format!("{action}: {}", error_chain(&err)),
    };
    BalansError::Source {
        location: location.to_string(),
        message,
    }
}

fn source_error(location: &str, err: impl std::error::Error + 'static) -> BalansError {
    BalansError::Source {
        location: location.to_string(),
        message: error_chain(&err),
    }
}

/// An error's message followed by those of its sources not already contained in it.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut message = err.to_string();
    let mut current = err.source();
    while let Some(source) = current {
        let text = source.to_string();
        if !text.is_empty() && !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        current = source.source();
    }
    // DataFusion repeats the wrapped error's own prefix ("Parquet error: Parquet error: ...").
    let mut parts: Vec<&str> = message.split(": ").collect();
    parts.dedup();
    parts.join(": ")
}

/// Maps an error raised while scanning a table: reader failures become `Source` errors.
fn scan_error(location: &str, err: DataFusionError) -> BalansError {
    match err.find_root() {
        DataFusionError::ObjectStore(_)
        | DataFusionError::ParquetError(_)
        | DataFusionError::IoError(_)
        | DataFusionError::ArrowError(..)
        | DataFusionError::External(_) => BalansError::Source {
            location: location.to_string(),
            message: format!("reading failed: {}", error_chain(&err)),
        },
        _ => BalansError::DataFusion(err),
    }
}

/// The path of `path` below `base`, without a leading `/`; `None` if outside `base`.
fn relative_path<'a>(base: &ObjectPath, path: &'a ObjectPath) -> Option<&'a str> {
    let base = base.as_ref();
    let path = path.as_ref();
    if base.is_empty() {
        return Some(path);
    }
    path.strip_prefix(base)?.strip_prefix('/')
}

/// How a file is shown to the user: a filesystem path or a full URL.
fn display_path(resolved: &ResolvedLocation, path: &ObjectPath) -> String {
    match resolved.kind {
        StoreKind::Local => format!("/{path}"),
        StoreKind::S3 | StoreKind::Http => format!("{}{path}", resolved.store_url),
    }
}

/// Splits `pattern` at the first `/`-separated segment holding a glob character (`*?[`).
fn split_glob(pattern: &str) -> (String, Option<String>) {
    let segments: Vec<&str> = pattern.split('/').collect();
    let Some(first_glob) = segments
        .iter()
        .position(|segment| segment.contains(['*', '?', '[']))
    else {
        return (pattern.to_string(), None);
    };
    let mut base = segments[..first_glob].join("/");
    if base.is_empty() && pattern.starts_with('/') {
        base.push('/');
    }
    (base, Some(segments[first_glob..].join("/")))
}

/// Converts a glob into an anchored regex over `/`-separated relative paths: `*` and `?` match
/// within one segment, `**` any number of segments, `[...]`/`[!...]` a character class.
fn glob_to_regex(location: &str, glob: &str) -> Result<Regex> {
    let chars: Vec<char> = glob.chars().collect();
    let mut re = String::from("^");
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '*' if chars.get(i + 1) == Some(&'*') => {
                if chars.get(i + 2) == Some(&'/') {
                    re.push_str("(?:[^/]*/)*");
                    i += 3;
                } else {
                    re.push_str(".*");
                    i += 2;
                }
            }
            '*' => {
                re.push_str("[^/]*");
                i += 1;
            }
            '?' => {
                re.push_str("[^/]");
                i += 1;
            }
            '[' => match chars[i + 1..].iter().skip(1).position(|&c| c == ']') {
                Some(offset) => {
                    let end = i + 2 + offset;
                    let mut class: String = chars[i + 1..end].iter().collect();
                    if let Some(rest) = class.strip_prefix('!') {
                        class = format!("^{rest}");
                    }
                    re.push('[');
                    re.push_str(&class.replace('\\', "\\\\").replace('[', "\\["));
                    re.push(']');
                    i = end + 1;
                }
                None => {
                    re.push_str("\\[");
                    i += 1;
                }
            },
            c => {
                re.push_str(&regex::escape(&c.to_string()));
                i += 1;
            }
        }
    }
    re.push('$');
    Regex::new(&re).map_err(|e| {
        BalansError::InvalidArgument(format!("invalid glob pattern in '{location}': {e}"))
    })
}

/// Which columns are features. Each entry is an exact column name or, if it is not one, a
/// regular expression that must match a whole column name (it is anchored: `Cells_.*`).
///
/// Regular expressions never select `Metadata_*` columns (name those exactly). An empty
/// `include` means every numeric column not starting with `Metadata_`; `exclude` then removes
/// columns from the selection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeatureSelection {
    /// Columns to use as features (empty: all numeric non-`Metadata_` columns).
    pub include: Vec<String>,
    /// Columns to drop from the features.
    pub exclude: Vec<String>,
}

/// The role of every column of a profile table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ColumnRoles {
    /// All non-feature columns, in schema order (includes the batch columns).
    pub metadata: Vec<String>,
    /// Numeric feature columns, in schema order.
    pub features: Vec<String>,
    /// Columns whose values identify the batch, in the order given.
    pub batch: Vec<String>,
}

/// A compiled [`FeatureSelection`] entry.
enum Matcher {
    Exact(usize),
    Pattern(Regex),
}

impl Matcher {
    fn compile(schema: &Schema, entry: &str, list: &str) -> Result<Self> {
        if let Ok(index) = schema.index_of(entry) {
            return Ok(Self::Exact(index));
        }
        Regex::new(&format!("^(?:{entry})$"))
            .map(Self::Pattern)
            .map_err(|e| {
                BalansError::InvalidArgument(format!(
                    "{list} entry '{entry}' is neither a column name nor a valid regular \
                     expression: {e}"
                ))
            })
    }
}

/// Splits the columns of `schema` into metadata, features and batch columns.
///
/// Features default to every numeric (integer, float, decimal) column whose name does not
/// start with `Metadata_`, in schema order; `selection` narrows or widens that (see
/// [`FeatureSelection`]). Batch columns must exist and are never features. Errors
/// (`BadInput`): unknown batch column, include entry matching nothing, non-numeric selected
/// feature, or no feature left.
pub fn resolve_columns(
    schema: &Schema,
    selection: &FeatureSelection,
    batch: &[String],
) -> Result<ColumnRoles> {
    let fields = schema.fields();
    let mut batch_columns: Vec<String> = Vec::new();
    for name in batch {
        if schema.index_of(name).is_err() {
            return Err(missing_batch_column(schema, name));
        }
        if !batch_columns.contains(name) {
            batch_columns.push(name.clone());
        }
    }
    let is_batch = |index: usize| batch_columns.contains(fields[index].name());
    let is_metadata = |index: usize| fields[index].name().starts_with(METADATA_PREFIX);
    let is_numeric = |index: usize| fields[index].data_type().is_numeric();

    let mut selected = vec![false; fields.len()];
    if selection.include.is_empty() {
        for (index, flag) in selected.iter_mut().enumerate() {
            *flag = is_numeric(index) && !is_metadata(index) && !is_batch(index);
        }
        if !selected.iter().any(|&s| s) {
            return Err(BalansError::BadInput(format!(
                "no numeric feature columns: every numeric column starts with \
                 '{METADATA_PREFIX}' or is a batch column (columns: {})",
                preview(
                    fields
                        .iter()
                        .map(|f| format!("{} ({})", f.name(), f.data_type()))
                )
            )));
        }
    } else {
        for entry in &selection.include {
            match Matcher::compile(schema, entry, "include")? {
                Matcher::Exact(index) => {
                    if is_batch(index) {
                        return Err(BalansError::BadInput(format!(
                            "column '{entry}' is a batch column and cannot also be a feature"
                        )));
                    }
                    selected[index] = true;
                }
                Matcher::Pattern(re) => {
                    let mut matched = false;
                    for index in 0..fields.len() {
                        if !is_metadata(index)
                            && !is_batch(index)
                            && re.is_match(fields[index].name())
                        {
                            selected[index] = true;
                            matched = true;
                        }
                    }
                    if !matched {
                        let hint = if fields.iter().any(|f| re.is_match(f.name())) {
                            " (patterns do not select Metadata_ or batch columns; name such \
                             columns exactly)"
                        } else {
                            ""
                        };
                        return Err(BalansError::BadInput(format!(
                            "include pattern '{entry}' matches no column{hint}"
                        )));
                    }
                }
            }
        }
    }
    for entry in &selection.exclude {
        let matched = match Matcher::compile(schema, entry, "exclude")? {
            Matcher::Exact(index) => {
                selected[index] = false;
                true
            }
            Matcher::Pattern(re) => {
                let mut matched = false;
                for (index, field) in fields.iter().enumerate() {
                    if re.is_match(field.name()) {
                        selected[index] = false;
                        matched = true;
                    }
                }
                matched
            }
        };
        if !matched {
            log::warn!("exclude entry '{entry}' matches no column");
        }
    }

    let not_numeric: Vec<String> = (0..fields.len())
        .filter(|&i| selected[i] && !is_numeric(i))
        .map(|i| format!("{} ({})", fields[i].name(), fields[i].data_type()))
        .collect();
    if !not_numeric.is_empty() {
        return Err(BalansError::BadInput(format!(
            "selected feature columns are not numeric: {}; exclude them or narrow the include list",
            preview(not_numeric.into_iter())
        )));
    }
    if !selected.iter().any(|&s| s) {
        return Err(BalansError::BadInput(
            "the include/exclude selection leaves no feature columns".into(),
        ));
    }

    let (features, metadata): (Vec<_>, Vec<_>) = fields
        .iter()
        .enumerate()
        .partition(|(index, _)| selected[*index]);
    Ok(ColumnRoles {
        metadata: metadata
            .into_iter()
            .map(|(_, f)| f.name().clone())
            .collect(),
        features: features
            .into_iter()
            .map(|(_, f)| f.name().clone())
            .collect(),
        batch: batch_columns,
    })
}

/// Error for a batch column that is not in the schema, with close names as suggestions.
fn missing_batch_column(schema: &Schema, name: &str) -> BalansError {
    let wanted = name.to_lowercase();
    let mut close: Vec<(usize, &str)> = schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .filter_map(|candidate| {
            let lower = candidate.to_lowercase();
            let distance = edit_distance(&wanted, &lower);
            let contains =
                wanted.len() >= 3 && (lower.contains(&wanted) || wanted.contains(&lower));
            (distance <= 2.max(wanted.len() / 4) || contains).then_some((distance, candidate))
        })
        .collect();
    close.sort();
    let mut message = format!("batch column '{name}' is not in the table");
    if !close.is_empty() {
        let names: Vec<&str> = close.iter().take(5).map(|(_, n)| *n).collect();
        message.push_str(&format!("; did you mean {}?", names.join(", ")));
    }
    let metadata: Vec<&str> = schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .filter(|n| n.starts_with(METADATA_PREFIX))
        .collect();
    if metadata.is_empty() {
        message.push_str(" (the table has no Metadata_ columns)");
    } else {
        message.push_str(&format!(
            " (Metadata columns: {})",
            preview(metadata.into_iter().map(str::to_string))
        ));
    }
    BalansError::BadInput(message)
}

/// Levenshtein distance between two strings.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

/// Comma-separated list of at most 20 items, with a count of the rest.
fn preview(items: impl Iterator<Item = String>) -> String {
    const MAX: usize = 20;
    let items: Vec<String> = items.collect();
    if items.len() <= MAX {
        items.join(", ")
    } else {
        format!(
            "{}, ... ({} more)",
            items[..MAX].join(", "),
            items.len() - MAX
        )
    }
}

/// Counts of missing and non-finite values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ValueCounts {
    /// NaN values.
    pub nan: u64,
    /// `+inf` values.
    pub pos_inf: u64,
    /// `-inf` values.
    pub neg_inf: u64,
    /// Null values.
    pub null: u64,
}

impl ValueCounts {
    /// Whether all counts are zero.
    pub fn is_zero(&self) -> bool {
        *self == Self::default()
    }

    fn add(&mut self, other: &Self) {
        self.nan += other.nan;
        self.pos_inf += other.pos_inf;
        self.neg_inf += other.neg_inf;
        self.null += other.null;
    }
}

/// Missing/non-finite value counts of one feature column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FeatureValueCounts {
    /// The feature column.
    pub column: String,
    /// Its counts.
    #[serde(flatten)]
    pub counts: ValueCounts,
}

/// Name and Arrow type of a column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ColumnType {
    /// Column name.
    pub name: String,
    /// Arrow data type, as displayed by Arrow.
    pub data_type: String,
}

/// Number of rows of one batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BatchSize {
    /// The batch columns' values joined with `/` (nulls shown as `<null>`).
    pub key: String,
    /// Rows in this batch.
    pub rows: u64,
}

/// Summary of a profile table computed by [`inspect`].
#[derive(Debug, Clone, Serialize)]
pub struct InspectReport {
    /// Registered table name.
    pub table_name: String,
    /// Location as given by the user.
    pub location: String,
    /// File format.
    pub format: TableFormat,
    /// Number of files read.
    pub file_count: usize,
    /// Number of rows.
    pub rows: u64,
    /// Metadata (non-feature) columns with their types, in schema order.
    pub metadata_columns: Vec<ColumnType>,
    /// Number of feature columns.
    pub feature_count: usize,
    /// Batch columns (empty if none were given).
    pub batch_columns: Vec<String>,
    /// Rows per batch, sorted by key (empty if no batch columns were given).
    pub batch_sizes: Vec<BatchSize>,
    /// Feature columns with at least one NaN, infinite or null value, in schema order.
    pub non_finite: Vec<FeatureValueCounts>,
    /// Counts summed over all feature columns.
    pub totals: ValueCounts,
    /// Features whose non-null, non-NaN values are all equal (or that have none).
    pub constant_features: Vec<String>,
}

/// Running statistics of one feature column.
#[derive(Debug, Clone, Copy)]
struct FeatureAccumulator {
    counts: ValueCounts,
    min: f64,
    max: f64,
}

impl Default for FeatureAccumulator {
    fn default() -> Self {
        Self {
            counts: ValueCounts::default(),
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }
}

impl FeatureAccumulator {
    fn update(&mut self, array: &dyn Array) -> Result<()> {
        self.counts.null += array.null_count() as u64;
        let values = cast(array, &DataType::Float64)?;
        let values = values.as_primitive::<Float64Type>();
        let mut observe = |v: f64| {
            if v.is_nan() {
                self.counts.nan += 1;
                return;
            }
            if v == f64::INFINITY {
                self.counts.pos_inf += 1;
            } else if v == f64::NEG_INFINITY {
                self.counts.neg_inf += 1;
            }
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        };
        if values.null_count() == 0 {
            values.values().iter().copied().for_each(&mut observe);
        } else {
            values.iter().flatten().for_each(&mut observe);
        }
        Ok(())
    }

    fn is_constant(&self) -> bool {
        // `min > max` when no non-NaN value was seen.
        self.min >= self.max
    }
}

/// Scans `table` once (streaming) and reports rows, column roles, batch sizes, NaN/inf/null
/// counts per feature and constant features. `selection` and `batch` are resolved with
/// [`resolve_columns`]; read failures are returned as [`BalansError::Source`].
pub async fn inspect(
    ctx: &SessionContext,
    table: &ProfileTable,
    selection: &FeatureSelection,
    batch: &[String],
) -> Result<InspectReport> {
    let roles = resolve_columns(&table.schema, selection, batch)?;
    let columns: Vec<Expr> = roles
        .batch
        .iter()
        .chain(&roles.features)
        .map(|name| Expr::Column(Column::new_unqualified(name)))
        .collect();
    let frame = ctx
        .table(TableReference::bare(table.table_name.as_str()))
        .await?
        .select(columns)?;
    let mut stream = frame
        .execute_stream()
        .await
        .map_err(|e| scan_error(&table.location, e))?;

    let n_batch = roles.batch.len();
    let mut rows = 0u64;
    let mut accumulators = vec![FeatureAccumulator::default(); roles.features.len()];
    let mut batch_sizes: HashMap<String, u64> = HashMap::new();
    let format_options = FormatOptions::default().with_null("<null>");
    let mut key = String::new();
    while let Some(record_batch) = stream.next().await {
        let record_batch: RecordBatch = record_batch.map_err(|e| scan_error(&table.location, e))?;
        rows += record_batch.num_rows() as u64;
        for (accumulator, column) in accumulators
            .iter_mut()
            .zip(record_batch.columns()[n_batch..].iter())
        {
            accumulator.update(column.as_ref())?;
        }
        if n_batch > 0 {
            let formatters = record_batch.columns()[..n_batch]
                .iter()
                .map(|column| ArrayFormatter::try_new(column.as_ref(), &format_options))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            for row in 0..record_batch.num_rows() {
                key.clear();
                for (i, formatter) in formatters.iter().enumerate() {
                    if i > 0 {
                        key.push('/');
                    }
                    use std::fmt::Write as _;
                    write!(key, "{}", formatter.value(row)).map_err(|e| {
                        BalansError::BadInput(format!("cannot format a batch value: {e}"))
                    })?;
                }
                match batch_sizes.get_mut(key.as_str()) {
                    Some(count) => *count += 1,
                    None => {
                        batch_sizes.insert(key.clone(), 1);
                    }
                }
            }
        }
    }

    let mut totals = ValueCounts::default();
    let mut non_finite = Vec::new();
    let mut constant_features = Vec::new();
    for (name, accumulator) in roles.features.iter().zip(&accumulators) {
        totals.add(&accumulator.counts);
        if !accumulator.counts.is_zero() {
            non_finite.push(FeatureValueCounts {
                column: name.clone(),
                counts: accumulator.counts,
            });
        }
        if accumulator.is_constant() {
            constant_features.push(name.clone());
        }
    }
    let metadata_columns = roles
        .metadata
        .iter()
        .map(|name| ColumnType {
            name: name.clone(),
            data_type: table
                .schema
                .field_with_name(name)
                .map(|f| f.data_type().to_string())
                .unwrap_or_default(),
        })
        .collect();
    Ok(InspectReport {
        table_name: table.table_name.clone(),
        location: table.location.clone(),
        format: table.format,
        file_count: table.files.len(),
        rows,
        metadata_columns,
        feature_count: roles.features.len(),
        batch_columns: roles.batch,
        batch_sizes: batch_sizes
            .into_iter()
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .map(|(key, rows)| BatchSize { key, rows })
            .collect(),
        non_finite,
        totals,
        constant_features,
    })
}

impl fmt::Display for InspectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let files = if self.file_count == 1 {
            "file"
        } else {
            "files"
        };
        writeln!(f, "table      {}", self.table_name)?;
        writeln!(f, "location   {}", self.location)?;
        writeln!(
            f,
            "format     {} ({} {files})",
            self.format, self.file_count
        )?;
        writeln!(f, "rows       {}", self.rows)?;
        writeln!(f, "features   {}", self.feature_count)?;

        writeln!(f)?;
        writeln!(f, "metadata columns ({}):", self.metadata_columns.len())?;
        let width = self
            .metadata_columns
            .iter()
            .map(|c| c.name.len())
            .max()
            .unwrap_or(0);
        for column in &self.metadata_columns {
            writeln!(f, "  {:<width$}  {}", column.name, column.data_type)?;
        }

        if !self.batch_columns.is_empty() {
            writeln!(f)?;
            writeln!(
                f,
                "batches by {} ({}):",
                self.batch_columns.join("/"),
                self.batch_sizes.len()
            )?;
            let key_width = self
                .batch_sizes
                .iter()
                .map(|b| b.key.len())
                .max()
                .unwrap_or(0);
            let rows_width = self
                .batch_sizes
                .iter()
                .map(|b| b.rows.to_string().len())
                .max()
                .unwrap_or(0);
            for batch in &self.batch_sizes {
                writeln!(
                    f,
                    "  {:<key_width$}  {:>rows_width$}",
                    batch.key, batch.rows
                )?;
            }
        }

        writeln!(f)?;
        if self.non_finite.is_empty() {
            writeln!(f, "NaN / inf / null values: none")?;
        } else {
            writeln!(
                f,
                "NaN / inf / null values in {} of {} features:",
                self.non_finite.len(),
                self.feature_count
            )?;
            let total_label = "total";
            let name_width = self
                .non_finite
                .iter()
                .map(|c| c.column.len())
                .chain([total_label.len(), "column".len()])
                .max()
                .unwrap_or(0);
            let number_width = [
                self.totals.nan,
                self.totals.pos_inf,
                self.totals.neg_inf,
                self.totals.null,
            ]
            .iter()
            .map(|n| n.to_string().len())
            .max()
            .unwrap_or(0)
            .max(4);
            let w = number_width;
            writeln!(
                f,
                "  {:<name_width$}  {:>w$}  {:>w$}  {:>w$}  {:>w$}",
                "column", "NaN", "+inf", "-inf", "null"
            )?;
            let rows = self
                .non_finite
                .iter()
                .map(|c| (c.column.as_str(), &c.counts))
                .chain([(total_label, &self.totals)]);
            for (name, c) in rows {
                writeln!(
                    f,
                    "  {:<name_width$}  {:>w$}  {:>w$}  {:>w$}  {:>w$}",
                    name, c.nan, c.pos_inf, c.neg_inf, c.null
                )?;
            }
        }

        writeln!(f)?;
        if self.constant_features.is_empty() {
            write!(f, "constant features: none")
        } else {
            write!(f, "constant features ({}):", self.constant_features.len())?;
            for name in &self.constant_features {
                write!(f, "\n  {name}")?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{ArrayRef, Float32Array, Float64Array, Int64Array, StringArray};
    use datafusion::arrow::datatypes::Field;
    use datafusion::arrow::ipc::writer::FileWriter;
    use datafusion::parquet::arrow::ArrowWriter;
    use datafusion::physical_plan::ExecutionPlanProperties;
    use datafusion::prelude::SessionConfig;
    use std::io::Write;
    use std::path::Path;
    use std::time::Instant;
    use tempfile::TempDir;

    fn profile_batch(ids: &[i64]) -> RecordBatch {
        let n = ids.len();
        let plate: Vec<String> = ids.iter().map(|i| format!("P{}", i % 2)).collect();
        let batch: Vec<&str> = ids
            .iter()
            .map(|i| if *i <= 3 { "B1" } else { "B2" })
            .collect();
        let schema = Arc::new(Schema::new(vec![
            Field::new("Metadata_Plate", DataType::Utf8, false),
            Field::new("Metadata_Batch", DataType::Utf8, false),
            Field::new("Metadata_Id", DataType::Int64, false),
            Field::new("Cells_A", DataType::Float64, true),
            Field::new("Cells_B", DataType::Int64, false),
            Field::new("Nuclei_C", DataType::Float32, false),
        ]));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(plate)),
            Arc::new(StringArray::from(batch)),
            Arc::new(Int64Array::from(ids.to_vec())),
            Arc::new(Float64Array::from_iter_values(
                ids.iter().map(|&i| i as f64 * 0.5),
            )),
            Arc::new(Int64Array::from_iter_values(ids.iter().map(|&i| i * 10))),
            Arc::new(Float32Array::from(vec![1.0f32; n])),
        ];
        RecordBatch::try_new(schema, columns).unwrap()
    }

    fn write_parquet(path: &Path, batch: &RecordBatch) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let file = std::fs::File::create(path).unwrap();
        let mut writer = ArrowWriter::try_new(file, batch.schema(), None).unwrap();
        writer.write(batch).unwrap();
        writer.close().unwrap();
    }

    fn write_ipc(path: &Path, batch: &RecordBatch) {
        let file = std::fs::File::create(path).unwrap();
        let mut writer = FileWriter::try_new(file, &batch.schema()).unwrap();
        writer.write(batch).unwrap();
        writer.finish().unwrap();
    }

    const CSV: &str = "Metadata_Plate,Metadata_Batch,Cells_A,Cells_B\n\
                       P1,B1,1.5,1\n\
                       P1,B1,2.5,2\n\
                       P2,B2,3.5,3\n";

    fn write_csv_gz(path: &Path, text: &str) {
        let file = std::fs::File::create(path).unwrap();
        let mut encoder = flate2::write::GzEncoder::new(file, flate2::Compression::default());
        encoder.write_all(text.as_bytes()).unwrap();
        encoder.finish().unwrap();
    }

    /// A session that would split scans if the table allowed it.
    fn parallel_context() -> SessionContext {
        let mut config = SessionConfig::new().with_target_partitions(8);
        config.options_mut().optimizer.repartition_file_min_size = 1;
        SessionContext::new_with_config(config)
    }

    async fn column_i64(ctx: &SessionContext, sql: &str) -> Vec<i64> {
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        batches
            .iter()
            .flat_map(|b| {
                let col = cast(b.column(0), &DataType::Int64).unwrap();
                col.as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                    .values()
                    .to_vec()
            })
            .collect()
    }

    fn path_str(path: &Path) -> String {
        path.to_str().unwrap().to_string()
    }

    #[test]
    fn detects_format_from_extension() {
        assert_eq!(
            TableFormat::from_path("a/b.parquet").unwrap(),
            TableFormat::Parquet
        );
        for name in ["x.arrow", "x.ipc", "X.FEATHER"] {
            assert_eq!(TableFormat::from_path(name).unwrap(), TableFormat::ArrowIpc);
        }
        assert_eq!(
            TableFormat::from_path("x.csv").unwrap(),
            TableFormat::Csv { gzip: false }
        );
        assert_eq!(
            TableFormat::from_path("dir.v1/x.CSV.GZ").unwrap(),
            TableFormat::Csv { gzip: true }
        );
        let err = TableFormat::from_path("x.json").unwrap_err();
        assert!(
            matches!(&err, BalansError::BadInput(m) if m.contains("x.json")),
            "{err}"
        );
    }

    #[test]
    fn globs_stay_within_segments() {
        let (base, glob) = split_glob("/data/plates/**/*.parquet");
        assert_eq!(base, "/data/plates");
        let re = glob_to_regex("t", glob.as_deref().unwrap()).unwrap();
        assert!(re.is_match("a.parquet"));
        assert!(re.is_match("x/y/a.parquet"));
        assert!(!re.is_match("a.csv"));
        let (base, glob) = split_glob("*.csv");
        assert_eq!(base, "");
        let re = glob_to_regex("t", glob.as_deref().unwrap()).unwrap();
        assert!(re.is_match("a.csv"));
        assert!(!re.is_match("sub/a.csv"));
        let re = glob_to_regex("t", "p[!0-4]?.parquet").unwrap();
        assert!(re.is_match("p5a.parquet"));
        assert!(!re.is_match("p3a.parquet"));
        assert_eq!(
            split_glob("s3key/x.parquet"),
            ("s3key/x.parquet".into(), None)
        );
    }

    #[tokio::test]
    async fn reads_each_format() {
        let dir = TempDir::new().unwrap();
        let batch = profile_batch(&[1, 2, 3]);
        let parquet = dir.path().join("p.parquet");
        write_parquet(&parquet, &batch);
        let ipc = dir.path().join("p.arrow");
        write_ipc(&ipc, &batch);
        let feather = dir.path().join("p.feather");
        write_ipc(&feather, &batch);
        let csv = dir.path().join("p.csv");
        std::fs::write(&csv, CSV).unwrap();
        let csv_gz = dir.path().join("p.csv.gz");
        write_csv_gz(&csv_gz, CSV);

        let cases = [
            (&parquet, TableFormat::Parquet, 3, 6),
            (&ipc, TableFormat::ArrowIpc, 3, 6),
            (&feather, TableFormat::ArrowIpc, 3, 6),
            (&csv, TableFormat::Csv { gzip: false }, 3, 4),
            (&csv_gz, TableFormat::Csv { gzip: true }, 3, 4),
        ];
        for (path, format, rows, columns) in cases {
            let ctx = SessionContext::new();
            let table = register_profiles(&ctx, &path_str(path), "t", &SourceOptions::default())
                .await
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(table.format, format);
            assert_eq!(table.files, vec![path_str(path)]);
            assert_eq!(table.schema.fields().len(), columns);
            let counted = column_i64(&ctx, "SELECT count(*) FROM t").await;
            assert_eq!(counted, vec![rows], "{}", path.display());
            let b = column_i64(&ctx, "SELECT \"Cells_B\" FROM t").await;
            assert!(b == vec![10, 20, 30] || b == vec![1, 2, 3], "{b:?}");
        }
        // CSV features are inferred as numbers.
        let ctx = SessionContext::new();
        let table = register_profiles(&ctx, &path_str(&csv_gz), "t", &SourceOptions::default())
            .await
            .unwrap();
        let roles = resolve_columns(&table.schema, &FeatureSelection::default(), &[]).unwrap();
        assert_eq!(roles.features, vec!["Cells_A", "Cells_B"]);
    }

    #[tokio::test]
    async fn directory_and_globs_read_files_in_path_order() {
        let dir = TempDir::new().unwrap();
        // Written in reverse order, with a subdirectory and a non-profile file.
        write_parquet(&dir.path().join("sub/c.parquet"), &profile_batch(&[5, 6]));
        write_parquet(&dir.path().join("b.parquet"), &profile_batch(&[3, 4]));
        write_parquet(&dir.path().join("a.parquet"), &profile_batch(&[1, 2]));
        std::fs::write(dir.path().join("README.txt"), "not a profile").unwrap();
        let root = path_str(dir.path());

        let cases = [
            (
                root.clone(),
                vec!["a.parquet", "b.parquet", "sub/c.parquet"],
                vec![1, 2, 3, 4, 5, 6],
            ),
            (
                format!("{root}/"),
                vec!["a.parquet", "b.parquet", "sub/c.parquet"],
                vec![1, 2, 3, 4, 5, 6],
            ),
            (
                format!("file://{root}"),
                vec!["a.parquet", "b.parquet", "sub/c.parquet"],
                vec![1, 2, 3, 4, 5, 6],
            ),
            (
                format!("{root}/*.parquet"),
                vec!["a.parquet", "b.parquet"],
                vec![1, 2, 3, 4],
            ),
            (
                format!("{root}/**/*.parquet"),
                vec!["a.parquet", "b.parquet", "sub/c.parquet"],
                vec![1, 2, 3, 4, 5, 6],
            ),
            (
                format!("{root}/s*/*.parquet"),
                vec!["sub/c.parquet"],
                vec![5, 6],
            ),
        ];
        for (location, files, ids) in cases {
            let ctx = parallel_context();
            let table = register_profiles(&ctx, &location, "t", &SourceOptions::default())
                .await
                .unwrap_or_else(|e| panic!("{location}: {e}"));
            let expected: Vec<String> = files.iter().map(|f| format!("{root}/{f}")).collect();
            assert_eq!(table.files, expected, "{location}");
            for _ in 0..3 {
                let got = column_i64(&ctx, "SELECT \"Metadata_Id\" FROM t").await;
                assert_eq!(got, ids, "{location}");
            }
            let plan = ctx
                .table("t")
                .await
                .unwrap()
                .create_physical_plan()
                .await
                .unwrap();
            assert_eq!(
                plan.output_partitioning().partition_count(),
                1,
                "{location}"
            );
        }
    }

    #[test]
    fn runs_are_contiguous_and_balanced() {
        assert_eq!(contiguous_runs(&[1, 1, 4], 2), vec![0, 2]);
        assert_eq!(contiguous_runs(&[1, 1, 1, 1], 2), vec![0, 2]);
        assert_eq!(contiguous_runs(&[5, 1, 1, 1, 1, 1], 2), vec![0, 1]);
        assert_eq!(contiguous_runs(&[1, 1, 1], 7), vec![0, 1, 2]);
        assert_eq!(contiguous_runs(&[1, 2, 3], 1), vec![0]);
    }

    #[tokio::test]
    async fn partitioned_scans_keep_the_row_order() {
        let dir = TempDir::new().unwrap();
        // Three files; the last holds three row groups (one row each, 4..=6).
        write_parquet(&dir.path().join("a.parquet"), &profile_batch(&[1, 2]));
        write_parquet(&dir.path().join("b.parquet"), &profile_batch(&[3]));
        let big = dir.path().join("c.parquet");
        {
            let file = std::fs::File::create(&big).unwrap();
            let props = datafusion::parquet::file::properties::WriterProperties::builder()
                .set_max_row_group_row_count(Some(1))
                .build();
            let batch = profile_batch(&[4, 5, 6]);
            let mut w =
                datafusion::parquet::arrow::ArrowWriter::try_new(file, batch.schema(), Some(props))
                    .unwrap();
            w.write(&batch).unwrap();
            w.close().unwrap();
        }
        let root = path_str(dir.path());
        // Runs of files (as many partitions as files or fewer), and runs of row groups when
        // one file must be split.
        for (location, partitions, want) in [
            (root.clone(), 2, 2),
            (root.clone(), 3, 3),
            (format!("{root}/c.parquet"), 3, 3),
            (format!("{root}/c.parquet"), 7, 3),
            (root.clone(), 1, 1),
        ] {
            let ctx = parallel_context();
            let opts = SourceOptions {
                scan_partitions: partitions,
                ..SourceOptions::default()
            };
            register_profiles(&ctx, &location, "t", &opts)
                .await
                .unwrap();
            let plan = ctx
                .table("t")
                .await
                .unwrap()
                .create_physical_plan()
                .await
                .unwrap();
            assert_eq!(
                plan.output_partitioning().partition_count(),
                want,
                "{location} in {partitions}"
            );
            // Partition by partition, in order: the file order.
            let task = ctx.task_ctx();
            let mut ids = Vec::new();
            for p in 0..want {
                let batches: Vec<RecordBatch> = plan
                    .execute(p, task.clone())
                    .unwrap()
                    .try_collect()
                    .await
                    .unwrap();
                for b in batches {
                    let c = b.column_by_name("Metadata_Id").unwrap();
                    ids.extend(
                        c.as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                            .values()
                            .iter()
                            .copied(),
                    );
                }
            }
            let all = if location.ends_with("c.parquet") {
                vec![4, 5, 6]
            } else {
                vec![1, 2, 3, 4, 5, 6]
            };
            assert_eq!(ids, all, "{location} in {partitions}");
        }
    }

    #[tokio::test]
    async fn hive_directories_become_columns() {
        let dir = TempDir::new().unwrap();
        let strip = |b: RecordBatch| {
            let keep: Vec<usize> = (0..b.num_columns())
                .filter(|&i| b.schema().field(i).name() != "Metadata_Batch")
                .collect();
            b.project(&keep).unwrap()
        };
        write_parquet(
            &dir.path().join("Metadata_Batch=B1/part-0.parquet"),
            &strip(profile_batch(&[1, 2])),
        );
        write_parquet(
            &dir.path().join("Metadata_Batch=B%202/part-0.parquet"),
            &strip(profile_batch(&[3])),
        );
        let ctx = parallel_context();
        let table = register_profiles(&ctx, &path_str(dir.path()), "t", &SourceOptions::default())
            .await
            .unwrap();
        assert!(
            table.schema.index_of("Metadata_Batch").is_ok(),
            "{:?}",
            table.schema
        );
        let batches = ctx
            .sql("SELECT \"Metadata_Batch\", \"Metadata_Id\" FROM t")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let keys: Vec<String> = batches
            .iter()
            .flat_map(|b| {
                let c = cast(b.column(0), &DataType::Utf8).unwrap();
                c.as_string::<i32>()
                    .iter()
                    .map(|v| v.unwrap().to_string())
                    .collect::<Vec<_>>()
            })
            .collect();
        // Files in path order: `B%202` sorts before `B1`.
        assert_eq!(keys, vec!["B 2", "B1", "B1"]);
        // The batch column is a usable role.
        let roles = resolve_columns(
            &table.schema,
            &FeatureSelection::default(),
            &["Metadata_Batch".to_string()],
        )
        .unwrap();
        assert_eq!(roles.batch, vec!["Metadata_Batch".to_string()]);
        // A column the files hold themselves is not duplicated.
        let dir2 = TempDir::new().unwrap();
        write_parquet(
            &dir2.path().join("Metadata_Batch=B1/part-0.parquet"),
            &profile_batch(&[1, 2]),
        );
        let table = register_profiles(
            &ctx,
            &path_str(dir2.path()),
            "t2",
            &SourceOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(
            table
                .schema
                .fields()
                .iter()
                .filter(|f| f.name() == "Metadata_Batch")
                .count(),
            1
        );
    }

    #[tokio::test]
    async fn location_errors_are_clear() {
        let dir = TempDir::new().unwrap();
        let root = path_str(dir.path());
        let opts = SourceOptions::default();
        let ctx = SessionContext::new();

        // Empty directory and a glob that matches nothing.
        std::fs::create_dir(dir.path().join("empty")).unwrap();
        let err = register_profiles(&ctx, &format!("{root}/empty"), "t", &opts)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BalansError::BadInput(m) if m.contains("empty")),
            "{err}"
        );
        let location = format!("{root}/*.parquet");
        let err = register_profiles(&ctx, &location, "t", &opts)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BalansError::BadInput(m) if m.contains(&location)),
            "{err}"
        );

        // Missing path.
        let missing = format!("{root}/nope.parquet");
        let err = register_profiles(&ctx, &missing, "t", &opts)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BalansError::Source { location, message }
                if location == &missing && message.contains("does not exist")),
            "{err}"
        );

        // Unknown extension.
        let json = dir.path().join("x.json");
        std::fs::write(&json, "{}").unwrap();
        let err = register_profiles(&ctx, &path_str(&json), "t", &opts)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BalansError::BadInput(m) if m.contains("x.json")),
            "{err}"
        );

        // Mixed formats.
        let mixed = dir.path().join("mixed");
        write_parquet(&mixed.join("a.parquet"), &profile_batch(&[1]));
        std::fs::write(mixed.join("b.csv"), CSV).unwrap();
        let err = register_profiles(&ctx, &path_str(&mixed), "t", &opts)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BalansError::BadInput(m) if m.contains("mixes") && m.contains("csv")),
            "{err}"
        );

        // Unsupported scheme.
        let err = register_profiles(&ctx, "gs://bucket/x.parquet", "t", &opts)
            .await
            .unwrap_err();
        assert!(matches!(err, BalansError::InvalidArgument(_)), "{err}");
    }

    /// Parquet statistics ignore NaN; the table must not turn `[NaN, 1, 1]` into a constant.
    #[tokio::test]
    async fn parquet_nan_values_survive_statistics() {
        let dir = TempDir::new().unwrap();
        let schema = Arc::new(Schema::new(vec![Field::new(
            "Cells_A",
            DataType::Float64,
            false,
        )]));
        let values = Float64Array::from(vec![f64::NAN, 1.0, 1.0]);
        let batch = RecordBatch::try_new(schema, vec![Arc::new(values)]).unwrap();
        let path = dir.path().join("nan.parquet");
        write_parquet(&path, &batch);
        let ctx = SessionContext::new();
        register_profiles(&ctx, &path_str(&path), "t", &SourceOptions::default())
            .await
            .unwrap();
        let batches = ctx
            .sql("SELECT \"Cells_A\" FROM t")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let read: Vec<f64> = batches
            .iter()
            .flat_map(|b| b.column(0).as_primitive::<Float64Type>().values().to_vec())
            .collect();
        assert_eq!(read.len(), 3);
        assert!(read[0].is_nan(), "{read:?}");
        assert_eq!(&read[1..], &[1.0, 1.0]);
    }

    #[tokio::test]
    async fn corrupt_parquet_names_the_file() {
        let dir = TempDir::new().unwrap();
        write_parquet(&dir.path().join("a.parquet"), &profile_batch(&[1, 2]));
        std::fs::write(dir.path().join("b.parquet"), b"this is not parquet at all").unwrap();
        let ctx = SessionContext::new();
        for location in [
            path_str(dir.path()),
            path_str(&dir.path().join("b.parquet")),
        ] {
            let err = register_profiles(&ctx, &location, "t", &SourceOptions::default())
                .await
                .unwrap_err();
            assert!(
                matches!(&err, BalansError::Source { message, .. }
                    if message.contains("b.parquet") && !message.contains("error: Parquet error")),
                "{err}"
            );
        }
    }

    #[tokio::test]
    async fn unreachable_stores_fail_fast() {
        let opts = SourceOptions {
            s3_endpoint: Some("http://127.0.0.1:9".into()),
            ..SourceOptions::default()
        };
        for location in [
            "s3://balans-test/plates/",
            "s3://balans-test/plates/p1.parquet",
            "http://127.0.0.1:9/plates/p1.parquet",
        ] {
            let ctx = SessionContext::new();
            let start = Instant::now();
            let err = register_profiles(&ctx, location, "t", &opts)
                .await
                .unwrap_err();
            let elapsed = start.elapsed();
            assert!(
                elapsed < Duration::from_secs(10),
                "{location}: took {elapsed:?}"
            );
            assert!(
                matches!(&err, BalansError::Source { location: l, message }
                    if l == location && message.contains("127.0.0.1:9")),
                "{location}: {err}"
            );
        }
    }

    /// Serves `body` at every path over plain HTTP (HEAD and ranged GET) until the test ends.
    fn serve_http(body: Vec<u8>) -> String {
        use std::io::{BufRead, BufReader};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request = String::new();
                let mut range = None;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if request.is_empty() {
                        request = line.clone();
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(spec) = lower.strip_prefix("range: bytes=") {
                        let (start, end) = spec.trim().split_once('-').unwrap();
                        let start: usize = start.parse().unwrap();
                        let end = end
                            .parse::<usize>()
                            .map_or(body.len() - 1, |e| e.min(body.len() - 1));
                        range = Some((start, end));
                    }
                }
                let head = request.starts_with("HEAD");
                let (status, content, extra) = match range {
                    Some((start, end)) => (
                        "206 Partial Content",
                        &body[start..=end],
                        format!("Content-Range: bytes {start}-{end}/{}\r\n", body.len()),
                    ),
                    None => ("200 OK", &body[..], String::new()),
                };
                let header = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{extra}\
                     Last-Modified: Tue, 01 Jul 2025 00:00:00 GMT\r\nConnection: close\r\n\r\n",
                    content.len()
                );
                let _ = stream.write_all(header.as_bytes());
                if !head {
                    let _ = stream.write_all(content);
                }
            }
        });
        format!("http://{address}")
    }

    #[tokio::test]
    async fn reads_a_file_over_http() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("plate.parquet");
        write_parquet(&path, &profile_batch(&[1, 2, 3]));
        let base = serve_http(std::fs::read(&path).unwrap());
        let location = format!("{base}/data/plate%201.parquet");
        let ctx = SessionContext::new();
        let table = register_profiles(&ctx, &location, "t", &SourceOptions::default())
            .await
            .unwrap();
        assert_eq!(table.files, vec![format!("{base}/data/plate 1.parquet")]);
        assert_eq!(table.format, TableFormat::Parquet);
        let ids = column_i64(&ctx, "SELECT \"Metadata_Id\" FROM t").await;
        assert_eq!(ids, vec![1, 2, 3]);
        let err = register_profiles(
            &ctx,
            &format!("{base}/data/"),
            "t",
            &SourceOptions::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, BalansError::InvalidArgument(_)), "{err}");
    }

    fn roles_schema() -> Schema {
        Schema::new(vec![
            Field::new("Metadata_Plate", DataType::Utf8, false),
            Field::new("Metadata_Batch", DataType::Utf8, false),
            Field::new("Metadata_Count", DataType::Int32, false),
            Field::new("Cells_A", DataType::Float64, true),
            Field::new("Cells_B", DataType::Int64, false),
            Field::new("Cells_Label", DataType::Utf8, true),
            Field::new("Nuclei_C", DataType::Float32, false),
            Field::new("Nuclei_D", DataType::Decimal128(10, 2), false),
        ])
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn resolves_default_and_selected_features() {
        let schema = roles_schema();
        let roles = resolve_columns(
            &schema,
            &FeatureSelection::default(),
            &strings(&["Metadata_Batch"]),
        )
        .unwrap();
        assert_eq!(
            roles.features,
            strings(&["Cells_A", "Cells_B", "Nuclei_C", "Nuclei_D"])
        );
        assert_eq!(
            roles.metadata,
            strings(&[
                "Metadata_Plate",
                "Metadata_Batch",
                "Metadata_Count",
                "Cells_Label"
            ])
        );
        assert_eq!(roles.batch, strings(&["Metadata_Batch"]));

        let selection = FeatureSelection {
            include: strings(&["Nuclei_.*", "Cells_A"]),
            exclude: strings(&[".*_D"]),
        };
        let roles = resolve_columns(&schema, &selection, &[]).unwrap();
        assert_eq!(roles.features, strings(&["Cells_A", "Nuclei_C"]));
        assert_eq!(roles.metadata.len(), 6);

        // Exclude only, and an exact Metadata_ name in include.
        let selection = FeatureSelection {
            include: vec![],
            exclude: strings(&["Cells_.", "Nuclei_C"]),
        };
        let roles = resolve_columns(&schema, &selection, &[]).unwrap();
        assert_eq!(roles.features, strings(&["Nuclei_D"]));
        let selection = FeatureSelection {
            include: strings(&["Metadata_Count", "Cells_B"]),
            exclude: vec![],
        };
        let roles = resolve_columns(&schema, &selection, &[]).unwrap();
        assert_eq!(roles.features, strings(&["Metadata_Count", "Cells_B"]));

        // A numeric batch column without the Metadata_ prefix is never a feature.
        let roles = resolve_columns(
            &schema,
            &FeatureSelection::default(),
            &strings(&["Cells_B"]),
        )
        .unwrap();
        assert!(!roles.features.contains(&"Cells_B".to_string()));
        assert!(roles.metadata.contains(&"Cells_B".to_string()));
    }

    #[test]
    fn column_role_errors() {
        let schema = roles_schema();
        let bad = |selection: FeatureSelection, batch: &[&str]| {
            resolve_columns(&schema, &selection, &strings(batch)).unwrap_err()
        };

        let err = bad(FeatureSelection::default(), &["Metadata_Bach"]);
        assert!(
            matches!(&err, BalansError::BadInput(m)
                if m.contains("'Metadata_Bach'") && m.contains("did you mean Metadata_Batch")),
            "{err}"
        );

        let include = |items: &[&str]| FeatureSelection {
            include: strings(items),
            exclude: vec![],
        };
        let err = bad(include(&["Cytoplasm_.*"]), &[]);
        assert!(
            matches!(&err, BalansError::BadInput(m) if m.contains("Cytoplasm_.*")),
            "{err}"
        );
        let err = bad(include(&["Cells_Label"]), &[]);
        assert!(
            matches!(&err, BalansError::BadInput(m) if m.contains("Cells_Label") && m.contains("not numeric")),
            "{err}"
        );
        let err = bad(include(&["Cells_.*"]), &[]);
        assert!(
            matches!(&err, BalansError::BadInput(m) if m.contains("Cells_Label")),
            "{err}"
        );
        let err = bad(include(&["Cells_B"]), &["Cells_B"]);
        assert!(
            matches!(&err, BalansError::BadInput(m) if m.contains("batch column")),
            "{err}"
        );
        let err = bad(include(&["Cells_("]), &[]);
        assert!(matches!(err, BalansError::InvalidArgument(_)), "{err}");
        let err = bad(
            FeatureSelection {
                include: vec![],
                exclude: strings(&[".*"]),
            },
            &[],
        );
        assert!(
            matches!(&err, BalansError::BadInput(m) if m.contains("no feature")),
            "{err}"
        );

        let only_metadata = Schema::new(vec![
            Field::new("Metadata_Plate", DataType::Utf8, false),
            Field::new("Metadata_Count", DataType::Int32, false),
            Field::new("Label", DataType::Utf8, false),
        ]);
        let err = resolve_columns(&only_metadata, &FeatureSelection::default(), &[]).unwrap_err();
        assert!(
            matches!(&err, BalansError::BadInput(m) if m.contains("no numeric feature")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn inspect_counts_values_and_batches() {
        let dir = TempDir::new().unwrap();
        let schema = Arc::new(Schema::new(vec![
            Field::new("Metadata_Batch", DataType::Utf8, true),
            Field::new("Metadata_Plate", DataType::Utf8, false),
            Field::new("Cells_A", DataType::Float64, true),
            Field::new("Cells_B", DataType::Float32, true),
            Field::new("Cells_Const", DataType::Int64, false),
            Field::new("Cells_Ok", DataType::Float64, false),
        ]));
        let make = |batch: Vec<Option<&str>>,
                    plate: Vec<&str>,
                    a: Vec<Option<f64>>,
                    b: Vec<Option<f32>>,
                    ok: Vec<f64>| {
            let n = plate.len();
            RecordBatch::try_new(
                Arc::clone(&schema),
                vec![
                    Arc::new(StringArray::from(batch)) as ArrayRef,
                    Arc::new(StringArray::from(plate)),
                    Arc::new(Float64Array::from(a)),
                    Arc::new(Float32Array::from(b)),
                    Arc::new(Int64Array::from(vec![7; n])),
                    Arc::new(Float64Array::from(ok)),
                ],
            )
            .unwrap()
        };
        write_parquet(
            &dir.path().join("plate1.parquet"),
            &make(
                vec![Some("B1"), Some("B1"), Some("B2")],
                vec!["P1", "P1", "P1"],
                vec![Some(f64::NAN), Some(1.0), None],
                vec![Some(f32::INFINITY), Some(2.0), Some(f32::NEG_INFINITY)],
                vec![1.0, 2.0, 3.0],
            ),
        );
        write_parquet(
            &dir.path().join("plate2.parquet"),
            &make(
                vec![Some("B2"), None],
                vec!["P2", "P2"],
                vec![Some(f64::NAN), Some(f64::INFINITY)],
                vec![Some(3.0), Some(4.0)],
                vec![4.0, 5.0],
            ),
        );

        let ctx = parallel_context();
        let table = register_profiles(
            &ctx,
            &path_str(dir.path()),
            "profiles",
            &SourceOptions::default(),
        )
        .await
        .unwrap();
        let report = inspect(
            &ctx,
            &table,
            &FeatureSelection::default(),
            &strings(&["Metadata_Batch", "Metadata_Plate"]),
        )
        .await
        .unwrap();

        assert_eq!(report.rows, 5);
        assert_eq!(report.file_count, 2);
        assert_eq!(report.feature_count, 4);
        let metadata: Vec<&str> = report
            .metadata_columns
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(metadata, vec!["Metadata_Batch", "Metadata_Plate"]);
        let sizes: Vec<(&str, u64)> = report
            .batch_sizes
            .iter()
            .map(|b| (b.key.as_str(), b.rows))
            .collect();
        assert_eq!(
            sizes,
            vec![("<null>/P2", 1), ("B1/P1", 2), ("B2/P1", 1), ("B2/P2", 1)]
        );
        assert_eq!(
            report.non_finite,
            vec![
                FeatureValueCounts {
                    column: "Cells_A".into(),
                    counts: ValueCounts {
                        nan: 2,
                        pos_inf: 1,
                        neg_inf: 0,
                        null: 1
                    },
                },
                FeatureValueCounts {
                    column: "Cells_B".into(),
                    counts: ValueCounts {
                        nan: 0,
                        pos_inf: 1,
                        neg_inf: 1,
                        null: 0
                    },
                },
            ]
        );
        assert_eq!(
            report.totals,
            ValueCounts {
                nan: 2,
                pos_inf: 2,
                neg_inf: 1,
                null: 1
            }
        );
        assert_eq!(report.constant_features, strings(&["Cells_Const"]));

        let text = report.to_string();
        assert!(text.contains("rows       5"), "{text}");
        assert!(text.contains("B1/P1"), "{text}");
        assert!(text.contains("Cells_Const"), "{text}");
        assert!(text.contains("total"), "{text}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["rows"], 5);
        assert_eq!(json["format"], "parquet");
        assert_eq!(json["non_finite"][0]["nan"], 2);

        // Without batch columns there are no batch sizes.
        let report = inspect(&ctx, &table, &FeatureSelection::default(), &[])
            .await
            .unwrap();
        assert!(report.batch_sizes.is_empty());
        assert!(!report.to_string().contains("batches"));
    }

    #[tokio::test]
    async fn inspect_reports_files_gone_missing() {
        let dir = TempDir::new().unwrap();
        let file = dir.path().join("a.parquet");
        write_parquet(&file, &profile_batch(&[1, 2]));
        let ctx = SessionContext::new();
        let table = register_profiles(&ctx, &path_str(&file), "t", &SourceOptions::default())
            .await
            .unwrap();
        std::fs::remove_file(&file).unwrap();
        let err = inspect(&ctx, &table, &FeatureSelection::default(), &[])
            .await
            .unwrap_err();
        assert!(matches!(err, BalansError::Source { .. }), "{err}");
    }
}
