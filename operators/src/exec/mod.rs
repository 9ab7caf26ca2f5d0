//! DataFusion physical operators, one per file.

pub mod balans;

pub use balans::{BalansExec, BalansSpec, balans_output_schema};
