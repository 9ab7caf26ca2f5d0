//! Column roles: which columns of a profile table are metadata, features and batch columns.
//!
//! [`resolve_columns`] splits a schema by a [`FeatureSelection`] (exact names or anchored
//! regular expressions to include and exclude) and the batch columns into [`ColumnRoles`].
//! By default every numeric column whose name does not start with `Metadata_` is a feature.
//! The CLI, the SQL relations and the library calls all decide roles here, so a request
//! plans the same columns whichever way it comes in.

use datafusion::arrow::datatypes::Schema;
use regex::Regex;
use serde::Serialize;

use crate::error::{PlannerError, Result};

/// Prefix that marks a column as metadata regardless of its type.
const METADATA_PREFIX: &str = "Metadata_";

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
                PlannerError::InvalidArgument(format!(
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
            return Err(PlannerError::BadInput(format!(
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
                        return Err(PlannerError::BadInput(format!(
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
                        return Err(PlannerError::BadInput(format!(
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
        return Err(PlannerError::BadInput(format!(
            "selected feature columns are not numeric: {}; exclude them or narrow the include list",
            preview(not_numeric.into_iter())
        )));
    }
    if !selected.iter().any(|&s| s) {
        return Err(PlannerError::BadInput(
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
fn missing_batch_column(schema: &Schema, name: &str) -> PlannerError {
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
    PlannerError::BadInput(message)
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

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::{DataType, Field};

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
            matches!(&err, PlannerError::BadInput(m)
                if m.contains("'Metadata_Bach'") && m.contains("did you mean Metadata_Batch")),
            "{err}"
        );

        let include = |items: &[&str]| FeatureSelection {
            include: strings(items),
            exclude: vec![],
        };
        let err = bad(include(&["Cytoplasm_.*"]), &[]);
        assert!(
            matches!(&err, PlannerError::BadInput(m) if m.contains("Cytoplasm_.*")),
            "{err}"
        );
        let err = bad(include(&["Cells_Label"]), &[]);
        assert!(
            matches!(&err, PlannerError::BadInput(m) if m.contains("Cells_Label") && m.contains("not numeric")),
            "{err}"
        );
        let err = bad(include(&["Cells_.*"]), &[]);
        assert!(
            matches!(&err, PlannerError::BadInput(m) if m.contains("Cells_Label")),
            "{err}"
        );
        let err = bad(include(&["Cells_B"]), &["Cells_B"]);
        assert!(
            matches!(&err, PlannerError::BadInput(m) if m.contains("batch column")),
            "{err}"
        );
        let err = bad(include(&["Cells_("]), &[]);
        assert!(matches!(err, PlannerError::InvalidArgument(_)), "{err}");
        let err = bad(
            FeatureSelection {
                include: vec![],
                exclude: strings(&[".*"]),
            },
            &[],
        );
        assert!(
            matches!(&err, PlannerError::BadInput(m) if m.contains("no feature")),
            "{err}"
        );

        let only_metadata = Schema::new(vec![
            Field::new("Metadata_Plate", DataType::Utf8, false),
            Field::new("Metadata_Count", DataType::Int32, false),
            Field::new("Label", DataType::Utf8, false),
        ]);
        let err = resolve_columns(&only_metadata, &FeatureSelection::default(), &[]).unwrap_err();
        assert!(
            matches!(&err, PlannerError::BadInput(m) if m.contains("no numeric feature")),
            "{err}"
        );
    }
}
