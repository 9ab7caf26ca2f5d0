//! The registered table: [`ProfileTable`] (what [`register_profiles`](super::register_profiles)
//! returns) and `FileListTable`, the DataFusion table provider over a fixed, path-sorted
//! file list, with its scan partitions (contiguous runs of files or Parquet row groups) and
//! Hive-style partition columns.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder};
use datafusion::datasource::table_schema::TableSchema;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::{ExecutionPlan, Partitioning as PhysicalPartitioning};
use object_store::ObjectMeta;

use super::format::TableFormat;
use super::location::{ResolvedLocation, display_path, relative_path};
use crate::error::{BalansError, Result};

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
/// files or row groups as several (see
/// [`SourceOptions::scan_partitions`](super::SourceOptions::scan_partitions)).
#[derive(Debug)]
pub(super) struct FileListTable {
    pub(super) schema: SchemaRef,
    pub(super) file_schema: SchemaRef,
    pub(super) format: TableFormat,
    pub(super) store_url: ObjectStoreUrl,
    pub(super) files: Vec<ObjectMeta>,
    /// Hive partition column names, and every file's values (same order as `files`).
    pub(super) partition_cols: Vec<String>,
    pub(super) partition_values: Vec<Vec<String>>,
    /// The scan's file groups: per partition, `(file index, row groups or all)`.
    pub(super) groups: Vec<Vec<(usize, Option<Vec<usize>>)>>,
    /// Row groups per file (0 where the metadata was not read).
    pub(super) row_group_totals: Vec<usize>,
}

/// Rows of each row group of a Parquet file, where they were read.
pub(super) type RowGroupRows = Option<Vec<usize>>;

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
pub(super) fn scan_groups(
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
        let format = self.format.file_format();
        let source = format.file_source(
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
        format.create_physical_plan(state, config).await
    }
}

impl FileListTable {
    fn row_group_count(&self, file: usize) -> usize {
        self.row_group_totals.get(file).copied().unwrap_or(0)
    }
}

/// A [`FileListTable`] as bytes (see [`encode_profile_table`]).
#[derive(serde::Serialize, serde::Deserialize)]
struct TablePayload {
    schema: Vec<u8>,
    file_schema: Vec<u8>,
    format: String,
    store_url: String,
    files: Vec<FilePayload>,
    partition_cols: Vec<String>,
    partition_values: Vec<Vec<String>>,
    groups: Vec<Vec<usize>>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct FilePayload {
    location: String,
    size: u64,
    last_modified_ns: i64,
    e_tag: Option<String>,
    version: Option<String>,
}

/// Tag that starts an encoded profile table.
const TABLE_TAG: &[u8] = b"balans-table/1\n";

/// A schema as an Arrow IPC stream without batches.
fn schema_bytes(schema: &SchemaRef) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut writer = datafusion::arrow::ipc::writer::StreamWriter::try_new(&mut out, schema)?;
    writer.finish()?;
    drop(writer);
    Ok(out)
}

fn schema_from_bytes(bytes: &[u8]) -> Result<SchemaRef> {
    let reader =
        datafusion::arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
    Ok(reader.schema())
}

/// Encodes a table registered by [`register_profiles`](super::register_profiles) for another
/// process (the cluster's scheduler plans and its executors scan it); `None` for any other
/// table provider. The file list travels as it is: the other process lists nothing. Scan
/// partitions made of Parquet row groups become whole files (at most one partition per
/// file), because DataFusion's plan serialisation drops a file's row-group selection; the
/// row order is the same.
pub fn encode_profile_table(provider: &dyn TableProvider) -> Option<Result<Vec<u8>>> {
    let table = provider.downcast_ref::<FileListTable>()?;
    Some(table.encode())
}

/// Decodes [`encode_profile_table`]'s bytes; `None` when `bytes` are not an encoded table.
pub fn decode_profile_table(bytes: &[u8]) -> Option<Result<Arc<dyn TableProvider>>> {
    let body = bytes.strip_prefix(TABLE_TAG)?;
    Some(FileListTable::decode(body).map(|t| Arc::new(t) as Arc<dyn TableProvider>))
}

impl FileListTable {
    fn encode(&self) -> Result<Vec<u8>> {
        let by_row_group = self
            .groups
            .iter()
            .any(|g| g.iter().any(|(_, rgs)| rgs.is_some()));
        let groups: Vec<Vec<usize>> = if by_row_group {
            let none: Vec<RowGroupRows> = vec![None; self.files.len()];
            scan_groups(&self.files, &none, self.groups.len())
                .into_iter()
                .map(|g| g.into_iter().map(|(f, _)| f).collect())
                .collect()
        } else {
            self.groups
                .iter()
                .map(|g| g.iter().map(|(f, _)| *f).collect())
                .collect()
        };
        let payload = TablePayload {
            schema: schema_bytes(&self.schema)?,
            file_schema: schema_bytes(&self.file_schema)?,
            format: self.format.name().to_string(),
            store_url: self.store_url.as_str().to_string(),
            files: self
                .files
                .iter()
                .map(|m| FilePayload {
                    location: m.location.to_string(),
                    size: m.size,
                    last_modified_ns: m.last_modified.timestamp_nanos_opt().unwrap_or(0),
                    e_tag: m.e_tag.clone(),
                    version: m.version.clone(),
                })
                .collect(),
            partition_cols: self.partition_cols.clone(),
            partition_values: self.partition_values.clone(),
            groups,
        };
        let mut out = TABLE_TAG.to_vec();
        serde_json::to_writer(&mut out, &payload)
            .map_err(|e| BalansError::InvalidArgument(format!("cannot encode the table: {e}")))?;
        Ok(out)
    }

    fn decode(body: &[u8]) -> Result<Self> {
        let payload: TablePayload = serde_json::from_slice(body).map_err(|e| {
            BalansError::InvalidArgument(format!("cannot decode a profile table: {e}"))
        })?;
        let files: Vec<ObjectMeta> = payload
            .files
            .into_iter()
            .map(|f| ObjectMeta {
                location: object_store::path::Path::from(f.location),
                last_modified: chrono::DateTime::from_timestamp_nanos(f.last_modified_ns),
                size: f.size,
                e_tag: f.e_tag,
                version: f.version,
            })
            .collect();
        let n = files.len();
        if payload.partition_values.len() != n || payload.groups.iter().flatten().any(|&f| f >= n) {
            return Err(BalansError::InvalidArgument(
                "cannot decode a profile table: file indices out of range".into(),
            ));
        }
        Ok(Self {
            schema: schema_from_bytes(&payload.schema)?,
            file_schema: schema_from_bytes(&payload.file_schema)?,
            format: TableFormat::from_name(&payload.format).ok_or_else(|| {
                BalansError::InvalidArgument(format!(
                    "cannot decode a profile table: unknown format '{}'",
                    payload.format
                ))
            })?,
            store_url: ObjectStoreUrl::parse(&payload.store_url)?,
            row_group_totals: vec![0; n],
            files,
            partition_cols: payload.partition_cols,
            partition_values: payload.partition_values,
            groups: payload
                .groups
                .into_iter()
                .map(|g| g.into_iter().map(|f| (f, None)).collect())
                .collect(),
        })
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
pub(super) fn hive_partitions(
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
pub(super) async fn parquet_row_groups(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::test_support::*;
    use crate::source::{FeatureSelection, SourceOptions, register_profiles, resolve_columns};
    use datafusion::arrow::array::{AsArray, Float64Array, RecordBatch};
    use datafusion::arrow::compute::cast;
    use datafusion::arrow::datatypes::{Field, Float64Type, Schema};
    use datafusion::physical_plan::ExecutionPlanProperties;
    use datafusion::prelude::SessionContext;
    use futures::TryStreamExt;
    use tempfile::TempDir;

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
}
