//! The operators crate's error type.

use datafusion::arrow::error::ArrowError;
use datafusion::error::DataFusionError;

/// Errors raised by the BALANS kernels and operators.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// The input cannot be corrected (no rows, one batch, non-finite values, ...).
    #[error("bad input: {0}")]
    BadInput(String),
    /// A parameter is out of range.
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    /// The run needs more memory than the configured limit allows.
    #[error("memory limit exceeded: {0}")]
    MemoryLimit(String),
    /// The run was cancelled (output stream dropped or Ctrl-C).
    #[error("cancelled")]
    Cancelled,
    /// A working-file I/O error.
    #[error("working file: {0}")]
    Io(#[from] std::io::Error),
    /// An Arrow error.
    #[error(transparent)]
    Arrow(#[from] ArrowError),
    /// A DataFusion error.
    #[error(transparent)]
    DataFusion(#[from] DataFusionError),
}

impl OperatorError {
    /// The same error again, for reporting one failure from several tasks (the error types
    /// it wraps cannot be cloned: their text is kept, and the kind where it can be).
    pub fn replay(&self) -> OperatorError {
        match self {
            OperatorError::BadInput(m) => OperatorError::BadInput(m.clone()),
            OperatorError::InvalidParameter(m) => OperatorError::InvalidParameter(m.clone()),
            OperatorError::MemoryLimit(m) => OperatorError::MemoryLimit(m.clone()),
            OperatorError::Cancelled => OperatorError::Cancelled,
            OperatorError::Io(e) => OperatorError::Io(std::io::Error::new(e.kind(), e.to_string())),
            OperatorError::Arrow(e) => {
                OperatorError::Arrow(ArrowError::ComputeError(e.to_string()))
            }
            OperatorError::DataFusion(DataFusionError::ResourcesExhausted(m)) => {
                OperatorError::DataFusion(DataFusionError::ResourcesExhausted(m.clone()))
            }
            OperatorError::DataFusion(e) => {
                OperatorError::DataFusion(DataFusionError::Execution(e.to_string()))
            }
        }
    }
}

/// Result type of the operators crate.
pub type Result<T, E = OperatorError> = std::result::Result<T, E>;

impl From<OperatorError> for DataFusionError {
    fn from(e: OperatorError) -> Self {
        match e {
            OperatorError::DataFusion(e) => e,
            OperatorError::MemoryLimit(m) => {
                DataFusionError::ResourcesExhausted(format!("BALANS: {m}"))
            }
            other => DataFusionError::External(Box::new(other)),
        }
    }
}
