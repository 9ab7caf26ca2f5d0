//! Batch-correction evaluation metrics, compatible with the field's reference benchmark
//! (Arevalo et al. 2024: scib metrics and copairs mAP), as plain kernels over slices.
//!
//! Embeddings are row-major `f64` slices (`n * d`). Every kernel is exact unless its
//! documentation says otherwise, deterministic for a given seed, and bounded in memory
//! (blocked over rows, never an `n x n` matrix).

pub mod classifier;
pub mod cluster;
pub mod error;
pub mod graph;
pub mod kbet;
pub mod knn;
pub mod layout;
pub mod leiden;
pub mod lisi;
pub mod map;
pub mod silhouette;
pub mod simd;
pub mod suite;
pub mod types;

pub use error::{MetricsError, Result};
pub use types::{Codes, CsrGraph, Distance, Neighbors, gather_rows};
