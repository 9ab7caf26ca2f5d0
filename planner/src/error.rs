//! The planner crate's error type.

use datafusion::arrow::error::ArrowError;
use datafusion::error::DataFusionError;

/// Errors raised while turning a request (CLI arguments, a SQL relation call, a library call)
/// into a plan: unusable columns, invalid parameters, DataFusion planning errors.
#[derive(Debug, thiserror::Error)]
pub enum PlannerError {
    /// The input table cannot be planned (a missing batch column, no feature columns, ...).
    #[error("bad input: {0}")]
    BadInput(String),
    /// A parameter or argument is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An error from DataFusion.
    #[error(transparent)]
    DataFusion(#[from] DataFusionError),
    /// An error from Arrow.
    #[error(transparent)]
    Arrow(#[from] ArrowError),
}

/// Result type of the planner crate.
pub type Result<T, E = PlannerError> = std::result::Result<T, E>;

impl From<PlannerError> for DataFusionError {
    fn from(e: PlannerError) -> Self {
        match e {
            PlannerError::DataFusion(e) => e,
            PlannerError::Arrow(e) => e.into(),
            other => DataFusionError::Plan(other.to_string()),
        }
    }
}
