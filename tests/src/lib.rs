//! Shared helpers of the Balans integration tests (the tests live in `tests/tests/`).

use std::path::PathBuf;

/// The `shared/` folder with the data sets and golden files: `BALANS_SHARED`, or `../shared`
/// beside the repository.
pub fn shared_dir() -> PathBuf {
    std::env::var_os("BALANS_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
}
