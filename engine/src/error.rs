//! The engine's error type.

use datafusion::arrow::error::ArrowError;
use datafusion::error::DataFusionError;
use datafusion::parquet::errors::ParquetError;

/// Errors raised by the Balans engine (I/O, planning, bad input).
#[derive(Debug, thiserror::Error)]
pub enum BalansError {
    /// The input table is unusable (missing columns, no rows, non-finite values, ...).
    #[error("bad input: {0}")]
    BadInput(String),
    /// A command-line or API argument is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The input location could not be read (unreachable store, missing or corrupt file).
    #[error("cannot read {location}: {message}")]
    Source {
        /// The location the user gave.
        location: String,
        /// What went wrong.
        message: String,
    },
    /// The output could not be written.
    #[error("cannot write {path}: {message}")]
    Output {
        /// The output path.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// An error from DataFusion (planning or execution).
    #[error(transparent)]
    DataFusion(#[from] DataFusionError),
    /// An error from Arrow.
    #[error(transparent)]
    Arrow(#[from] ArrowError),
    /// An error from the Parquet reader or writer.
    #[error(transparent)]
    Parquet(#[from] ParquetError),
    /// An operating-system I/O error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The cluster (scheduler or executors) could not be reached or failed the job.
    #[error("cluster: {0}")]
    Cluster(String),
    /// Training or applying a learned model failed.
    #[error(transparent)]
    Learned(balans_learned::LearnedError),
}

impl From<balans_learned::LearnedError> for BalansError {
    fn from(e: balans_learned::LearnedError) -> Self {
        use balans_learned::LearnedError as L;
        match e {
            L::BadInput(m) => BalansError::BadInput(m),
            L::InvalidArgument(m) => BalansError::InvalidArgument(m),
            other => BalansError::Learned(other),
        }
    }
}

impl From<balans_planner::PlannerError> for BalansError {
    fn from(e: balans_planner::PlannerError) -> Self {
        use balans_planner::PlannerError as P;
        match e {
            P::BadInput(m) => BalansError::BadInput(m),
            P::InvalidArgument(m) => BalansError::InvalidArgument(m),
            P::DataFusion(e) => BalansError::DataFusion(e),
            P::Arrow(e) => BalansError::Arrow(e),
        }
    }
}

impl BalansError {
    /// This error as a DataFusion error (for callbacks that must return one), with `context`.
    pub fn into_datafusion(self, context: &str) -> DataFusionError {
        match self {
            BalansError::DataFusion(e) => e,
            other => DataFusionError::External(format!("{context}: {other}").into()),
        }
    }
}

/// Result type of the engine.
pub type Result<T, E = BalansError> = std::result::Result<T, E>;
