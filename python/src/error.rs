//! The crate's error type and its mapping onto Python exceptions.

use balans_engine::BalansError;
use pyo3::PyErr;
use pyo3::exceptions::{PyKeyboardInterrupt, PyOSError, PyRuntimeError, PyValueError};

/// Errors of the Python bindings.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An engine error (bad input, invalid argument, I/O, planning).
    #[error(transparent)]
    Engine(#[from] BalansError),
    /// An argument the bindings reject before the engine runs.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// An Arrow error while importing or exporting data.
    #[error(transparent)]
    Arrow(#[from] datafusion::arrow::error::ArrowError),
    /// The engine panicked (a bug: please report it).
    #[error("the engine failed unexpectedly: {0}")]
    Panic(String),
    /// The job was cancelled by Ctrl-C.
    #[error("interrupted; no output written, temporary files removed")]
    Interrupted,
}

impl Error {
    /// An invalid-argument error with `message`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::InvalidArgument(message.into())
    }
}

impl From<datafusion::error::DataFusionError> for Error {
    fn from(e: datafusion::error::DataFusionError) -> Self {
        Error::Engine(balans_engine::correct::unwrap_operator_error(
            BalansError::DataFusion(e),
        ))
    }
}

impl From<balans_planner::PlannerError> for Error {
    fn from(e: balans_planner::PlannerError) -> Self {
        Error::Engine(BalansError::from(e))
    }
}

impl From<Error> for PyErr {
    /// Bad input, invalid arguments and planning errors become `ValueError` with the CLI's
    /// message, I/O
    /// problems `OSError`, Ctrl-C `KeyboardInterrupt`, anything else `RuntimeError`.
    fn from(e: Error) -> PyErr {
        let message = e.to_string();
        if let Error::Engine(BalansError::DataFusion(df)) = &e
            && is_user_error(df.find_root())
        {
            return PyValueError::new_err(message);
        }
        match e {
            Error::Engine(BalansError::BadInput(_) | BalansError::InvalidArgument(_))
            | Error::InvalidArgument(_) => PyValueError::new_err(message),
            Error::Engine(
                BalansError::Source { .. } | BalansError::Output { .. } | BalansError::Io(_),
            ) => PyOSError::new_err(message),
            Error::Interrupted => PyKeyboardInterrupt::new_err(message),
            _ => PyRuntimeError::new_err(message),
        }
    }
}

/// Planning, SQL and schema errors come from the user's request (an unknown column, a model
/// for other features, a bad predicate), not from the engine.
fn is_user_error(e: &datafusion::error::DataFusionError) -> bool {
    use datafusion::error::DataFusionError as E;
    matches!(e, E::Plan(_) | E::SQL(..) | E::SchemaError(..))
}

/// Result type of the bindings.
pub type Result<T, E = Error> = std::result::Result<T, E>;
