//! The crate's error type.

/// Errors raised while training, saving, loading or applying a learned model.
#[derive(Debug, thiserror::Error)]
pub enum LearnedError {
    /// A tensor operation failed (shape mismatch, device error).
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The training or inference data is unusable.
    #[error("bad input: {0}")]
    BadInput(String),
    /// An option is out of range or inconsistent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A model directory could not be read or written, or does not describe a model.
    #[error("model {path}: {message}")]
    Model {
        /// The model directory or file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// Training was stopped by the caller.
    #[error("training was cancelled")]
    Cancelled,
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, LearnedError>;
