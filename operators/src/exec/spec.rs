//! What a correction pass is asked to do ([`BalansSpec`]) and the schema it produces.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::config::{BalansConfig, Method, OutputSpace};
use crate::error::{OperatorError, Result};
use crate::progress::ProgressSink;

/// Name of the column that marks points no landmark covers (present when a cap can stop
/// sampling before full coverage).
pub const COVERED_COLUMN: &str = "Metadata_balans_covered";

/// What to correct and how.
#[derive(Debug, Clone)]
pub struct BalansSpec {
    /// Feature columns, in input order.
    pub features: Vec<String>,
    /// Batch key columns (combined into one key).
    pub batch: Vec<String>,
    /// Parameters.
    pub config: BalansConfig,
    /// Progress and summary receiver.
    pub progress: Arc<dyn ProgressSink>,
    /// Which of the `config.iterations` passes this operator runs (1-based); planners chain
    /// one operator per pass, each correcting the previous pass's output.
    pub pass: usize,
    /// Boolean input column marking the rows a method is fitted on: the negative controls of
    /// sphering; BALANS's anchor rows (the batch offsets are estimated from them, every row is
    /// corrected). It is passed on to the next pass and left out of the last pass's output.
    pub fit_mask: Option<String>,
    /// BALANS: a label column whose values present in at least two batches make their rows
    /// anchors (with `fit_mask`, the union is anchored).
    pub anchor_label: Option<String>,
}

impl BalansSpec {
    /// A spec for the first pass.
    pub fn new(
        features: Vec<String>,
        batch: Vec<String>,
        config: BalansConfig,
        progress: Arc<dyn ProgressSink>,
    ) -> Self {
        Self {
            features,
            batch,
            config,
            progress,
            pass: 1,
            fit_mask: None,
            anchor_label: None,
        }
    }

    /// Whether BALANS estimates its offsets from anchor rows only.
    pub fn anchored(&self) -> bool {
        self.config.method == Method::Balans
            && (self.fit_mask.is_some() || self.anchor_label.is_some())
    }

    /// Whether this pass is the last one.
    pub fn is_last_pass(&self) -> bool {
        self.pass >= self.config.passes()
    }

    /// Output space of this pass: features for every pass but the last.
    pub fn output_space(&self) -> OutputSpace {
        if self.config.method == Method::Harmony {
            // Harmony corrects the PCA coordinates (or the features when PCA is off).
            return match self.config.pca_components(self.features.len()) {
                Some(_) => OutputSpace::Pca,
                None => OutputSpace::Features,
            };
        }
        if self.is_last_pass() {
            self.config.output_space
        } else {
            OutputSpace::Features
        }
    }

    /// `pass i/N ` when the correction runs several passes (prefix of stage names).
    pub fn pass_label(&self) -> String {
        if self.config.passes() > 1 {
            format!("pass {}/{} ", self.pass, self.config.passes())
        } else {
            String::new()
        }
    }

    /// Whether the output carries [`COVERED_COLUMN`] (a landmark cap, or `tau < J`).
    pub fn emits_covered_column(&self) -> bool {
        self.config.method == Method::Balans
            && (self.config.max_landmarks.is_some() || self.config.tau < self.config.block)
    }
}

/// The output schema of a BALANS correction over `input`.
pub fn balans_output_schema(input: &Schema, spec: &BalansSpec) -> Result<SchemaRef> {
    for name in spec.features.iter().chain(&spec.batch) {
        if input.index_of(name).is_err() {
            return Err(OperatorError::BadInput(format!(
                "column '{name}' is not in the input"
            )));
        }
    }
    if let Some(mask) = &spec.fit_mask {
        match input.field_with_name(mask) {
            Ok(f) if f.data_type() == &DataType::Boolean => {}
            _ => {
                return Err(OperatorError::BadInput(format!(
                    "the fit-row column '{mask}' must be a boolean column of the input"
                )));
            }
        }
    }
    if let Some(label) = &spec.anchor_label {
        if input.index_of(label).is_err() {
            return Err(OperatorError::BadInput(format!(
                "the anchor label column '{label}' is not in the input"
            )));
        }
        if spec.features.contains(label) || spec.batch.contains(label) {
            return Err(OperatorError::BadInput(format!(
                "the anchor label column '{label}' is a feature or batch column"
            )));
        }
    }
    if spec.anchored() && spec.config.variant != crate::config::Variant::Residual {
        return Err(OperatorError::InvalidParameter(format!(
            "anchored BALANS estimates batch offsets, which only the residual variant applies \
             (got --variant {})",
            spec.config.variant
        )));
    }
    let is_feature = |f: &Field| spec.features.iter().any(|n| n == f.name());
    // The fit-row column travels with the rows to the next pass and ends at the last one.
    let is_mask =
        |f: &Field| spec.is_last_pass() && spec.fit_mask.as_deref() == Some(f.name().as_str());
    let mut fields: Vec<Field> = Vec::new();
    match spec.output_space() {
        OutputSpace::Features => {
            for f in input.fields().iter().filter(|f| !is_mask(f)) {
                if is_feature(f) {
                    fields.push(Field::new(f.name(), DataType::Float32, false));
                } else {
                    fields.push(f.as_ref().clone());
                }
            }
        }
        OutputSpace::Pca => {
            let p = spec
                .config
                .pca_components(spec.features.len())
                .ok_or_else(|| {
                    OperatorError::InvalidParameter(
                        "--output-space pca needs PCA (set --pca N)".into(),
                    )
                })?;
            fields.extend(
                input
                    .fields()
                    .iter()
                    .filter(|f| !is_feature(f) && !is_mask(f))
                    .map(|f| f.as_ref().clone()),
            );
            fields.extend((1..=p).map(|c| Field::new(format!("PC{c}"), DataType::Float32, false)));
        }
    }
    // An earlier pass's covered column is overwritten in place by this pass's.
    if spec.emits_covered_column() && input.index_of(COVERED_COLUMN).is_err() {
        fields.push(Field::new(COVERED_COLUMN, DataType::Boolean, false));
    }
    Ok(Arc::new(Schema::new_with_metadata(
        fields,
        input.metadata().clone(),
    )))
}
