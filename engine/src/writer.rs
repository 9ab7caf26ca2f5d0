//! Atomic Parquet output: write to a temporary file beside the target, then rename.

use std::fs::File;
use std::path::{Path, PathBuf};

use datafusion::execution::SendableRecordBatchStream;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::{Compression, ZstdLevel};
use datafusion::parquet::file::metadata::KeyValue;
use datafusion::parquet::file::properties::WriterProperties;
use datafusion::parquet::schema::types::ColumnPath;
use futures::StreamExt;

use crate::error::{BalansError, Result};

/// What was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteStats {
    /// Rows written.
    pub rows: usize,
    /// Record batches written.
    pub batches: usize,
}

/// Checks that `output` may be written: not an existing file unless `overwrite`, never one of
/// the input files, and its directory exists.
pub fn check_output(output: &Path, overwrite: bool, inputs: &[String]) -> Result<()> {
    let err = |m: String| BalansError::Output {
        path: output.display().to_string(),
        message: m,
    };
    let canon_out = std::fs::canonicalize(output).ok();
    for input in inputs {
        let local = input.strip_prefix("file://").unwrap_or(input);
        if let (Some(o), Ok(i)) = (&canon_out, std::fs::canonicalize(local))
            && *o == i
        {
            return Err(err(
                "this is an input file; Balans never writes over its input".into(),
            ));
        }
    }
    if output.exists() && !overwrite {
        return Err(err(
            "the file exists (pass --overwrite to replace it)".into()
        ));
    }
    if output.is_dir() {
        return Err(err("is a directory".into()));
    }
    let dir = parent_dir(output);
    if !dir.is_dir() {
        return Err(err(format!("directory {} does not exist", dir.display())));
    }
    Ok(())
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes `stream` as zstd Parquet to `output` atomically, with `metadata` as key-value
/// metadata. On any error (or if the future is dropped) the temporary file is removed and
/// `output` is untouched.
pub async fn write_parquet_atomic(
    mut stream: SendableRecordBatchStream,
    output: &Path,
    metadata: Vec<(String, String)>,
) -> Result<WriteStats> {
    let dir = parent_dir(output);
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "output".into());
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".balans-tmp")
        .tempfile_in(&dir)
        .map_err(|e| BalansError::Output {
            path: output.display().to_string(),
            message: e.to_string(),
        })?;
    let file: File = tmp.reopen()?;
    // Float columns are not dictionary-encoded (it never pays for measurements and holds a
    // dictionary page per column in memory); row groups are capped in rows and bytes so the
    // writer's buffer stays small for wide tables.
    let mut builder = WriterProperties::builder();
    for field in stream.schema().fields() {
        if field.data_type().is_floating() {
            builder = builder
                .set_column_dictionary_enabled(ColumnPath::from(field.name().as_str()), false);
        }
    }
    let props = builder
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
        .set_max_row_group_row_count(Some(65_536))
        .set_max_row_group_bytes(Some(64 << 20))
        .set_key_value_metadata(Some(
            metadata
                .into_iter()
                .map(|(k, v)| KeyValue::new(k, v))
                .collect(),
        ))
        .build();
    let mut writer = ArrowWriter::try_new(file, stream.schema(), Some(props))?;
    let mut stats = WriteStats {
        rows: 0,
        batches: 0,
    };
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        stats.rows += batch.num_rows();
        stats.batches += 1;
        writer.write(&batch)?;
    }
    writer.close()?;
    // Temporary files are private (0600); the result gets ordinary file permissions.
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    tmp.persist(output).map_err(|e| BalansError::Output {
        path: output.display().to_string(),
        message: e.to_string(),
    })?;
    Ok(stats)
}

/// Writes `bytes` to `output` atomically (temporary file beside it, then rename), mode 0644.
pub fn write_bytes_atomic(output: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    let err = |e: std::io::Error| BalansError::Output {
        path: output.display().to_string(),
        message: e.to_string(),
    };
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "output".into());
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".balans-tmp")
        .tempfile_in(parent_dir(output))
        .map_err(err)?;
    tmp.write_all(bytes).map_err(err)?;
    tmp.flush().map_err(err)?;
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(err)?;
    }
    tmp.persist(output).map_err(|e| err(e.error))?;
    Ok(())
}
