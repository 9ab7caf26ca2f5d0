//! File formats: [`TableFormat`] (detected from the file extension) and the checks made on
//! the files before a table is registered: one format for all files, intact Parquet
//! footers, and an error naming the file whose schema cannot be read.

use std::fmt;
use std::sync::Arc;

use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::file_format::arrow::ArrowFormat;
use datafusion::datasource::file_format::csv::CsvFormat;
use datafusion::datasource::file_format::file_compression_type::FileCompressionType;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::error::DataFusionError;
use object_store::{ObjectMeta, ObjectStoreExt};
use serde::{Serialize, Serializer};

use super::errors::{error_chain, read_failure};
use super::location::{ResolvedLocation, display_path};
use crate::error::{BalansError, Result};

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
pub(super) const SUPPORTED_EXTENSIONS: &str = ".parquet, .arrow, .ipc, .feather, .csv, .csv.gz";

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
    pub(super) fn file_format(&self) -> Arc<dyn FileFormat> {
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

impl TableFormat {
    /// The format named by [`TableFormat::name`].
    pub(super) fn from_name(name: &str) -> Option<Self> {
        [
            Self::Parquet,
            Self::ArrowIpc,
            Self::Csv { gzip: false },
            Self::Csv { gzip: true },
        ]
        .into_iter()
        .find(|f| f.name() == name)
    }
}

impl Serialize for TableFormat {
    /// Serialised as its short name (`"parquet"`, `"arrow"`, `"csv"`, `"csv.gz"`).
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}
/// Checks each Parquet file's trailer (size, magic, footer length) before any reader sees it,
/// so a truncated or foreign file gets an error naming it (the Parquet reader can panic on a
/// footer length larger than the file).
pub(super) async fn check_parquet_footers(
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

/// The one format shared by all files, or a `BadInput` error.
pub(super) fn common_format(location: &str, metas: &[ObjectMeta]) -> Result<TableFormat> {
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
pub(super) async fn explain_schema_failure(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::test_support::*;
    use crate::source::{FeatureSelection, SourceOptions, register_profiles, resolve_columns};
    use datafusion::prelude::SessionContext;
    use tempfile::TempDir;

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
}
