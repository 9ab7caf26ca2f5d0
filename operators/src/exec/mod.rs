//! DataFusion physical operators, one per file, and the chain a correction pass is planned as
//! ([`plan`]). Per-partition and global steps share the shapes of [`step`] and the pass state
//! of [`context`].

pub mod apply;
pub mod cluster;
pub mod combat;
pub mod common;
pub mod concat;
pub mod context;
pub mod embed;
pub mod evaluate;
pub mod harmony;
pub mod ingest;
pub mod landmarks;
pub mod pass;
pub mod pca;
pub mod plan;
pub mod preprocess;
pub mod profile;
pub mod reduce;
pub mod smooth;
pub mod spec;
pub mod sphering;
pub mod step;

pub use plan::{correction_node, correction_pass, correction_plan};
pub use spec::{BalansSpec, COVERED_COLUMN, balans_output_schema};
