//! The one error type of the metrics crate.

/// Errors raised by the metric kernels.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The input is unusable as given (shape mismatch, too few rows, bad parameter).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// Some rows of the embedding hold NaN or infinite values.
    #[error("the embedding has non-finite values in {count} row(s), first rows: {rows:?}")]
    NonFinite {
        /// Number of rows with at least one NaN / inf.
        count: usize,
        /// The first offending rows (0-based), at most ten.
        rows: Vec<usize>,
    },
    /// A numeric procedure failed (e.g. an eigen-decomposition or solver did not converge).
    #[error("numeric failure: {0}")]
    Numeric(String),
}

/// Result alias of the metrics crate.
pub type Result<T, E = MetricsError> = std::result::Result<T, E>;

/// Errs with [`MetricsError::NonFinite`] (count, first ten rows) if any of `rows` of the
/// row-major `x` (`d` columns) holds a NaN or infinite value.
pub(crate) fn ensure_finite_rows(
    x: &[f64],
    d: usize,
    rows: impl IntoIterator<Item = usize>,
) -> Result<()> {
    let bad: Vec<usize> = rows
        .into_iter()
        .filter(|&i| x[i * d..(i + 1) * d].iter().any(|v| !v.is_finite()))
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(MetricsError::NonFinite {
            count: bad.len(),
            rows: bad.into_iter().take(10).collect(),
        })
    }
}

/// [`ensure_finite_rows`] over every row of `x`.
pub(crate) fn ensure_finite(x: &[f64], d: usize) -> Result<()> {
    ensure_finite_rows(x, d, 0..x.len() / d)
}
