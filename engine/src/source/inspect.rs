//! `balans inspect`: [`inspect`] scans a registered profile table once and returns an
//! [`InspectReport`] (rows, column roles, batch sizes, NaN/inf/null counts per feature,
//! constant features), shown as text by its `Display` and as JSON by `Serialize`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::common::{Column, TableReference};
use datafusion::logical_expr::Expr;
use datafusion::prelude::SessionContext;
use futures::StreamExt;
use serde::Serialize;

use super::errors::scan_error;
use super::{FeatureSelection, ProfileTable, TableFormat, resolve_columns};
use crate::error::{BalansError, Result};

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
    use crate::source::test_support::*;
    use crate::source::{SourceOptions, register_profiles};
    use datafusion::arrow::array::{ArrayRef, Float32Array, Float64Array, Int64Array, StringArray};
    use datafusion::arrow::datatypes::{Field, Schema};
    use std::sync::Arc;
    use tempfile::TempDir;

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
