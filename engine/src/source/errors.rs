//! How failures while reading a source are reported: object-store, reader and scan errors
//! become [`BalansError::Source`] errors naming the location, with the whole error chain in
//! one message.

use datafusion::error::DataFusionError;

use crate::error::BalansError;

/// A failed object-store request (`action`: "could not open", ...) as a Source error; a
/// missing object is reported by its path.
pub(super) fn read_failure(location: &str, action: &str, err: object_store::Error) -> BalansError {
    let message = match &err {
        object_store::Error::NotFound { path, .. } => format!("{action} '{path}': not found"),
        _ => format!("{action}: {}", error_chain(&err)),
    };
    BalansError::Source {
        location: location.to_string(),
        message,
    }
}

/// Any error as a Source error for `location`, with its whole chain.
pub(super) fn source_error(location: &str, err: impl std::error::Error + 'static) -> BalansError {
    BalansError::Source {
        location: location.to_string(),
        message: error_chain(&err),
    }
}

/// An error's message followed by those of its sources not already contained in it.
pub(super) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut message = err.to_string();
    let mut current = err.source();
    while let Some(source) = current {
        let text = source.to_string();
        if !text.is_empty() && !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        current = source.source();
    }
    // DataFusion repeats the wrapped error's own prefix ("Parquet error: Parquet error: ...").
    let mut parts: Vec<&str> = message.split(": ").collect();
    parts.dedup();
    parts.join(": ")
}

/// Maps an error raised while scanning a table: reader failures become `Source` errors.
pub(super) fn scan_error(location: &str, err: DataFusionError) -> BalansError {
    match err.find_root() {
        DataFusionError::ObjectStore(_)
        | DataFusionError::ParquetError(_)
        | DataFusionError::IoError(_)
        | DataFusionError::ArrowError(..)
        | DataFusionError::External(_) => BalansError::Source {
            location: location.to_string(),
            message: format!("reading failed: {}", error_chain(&err)),
        },
        _ => BalansError::DataFusion(err),
    }
}
