//! # balans-planner
//!
//! Everything between a request (CLI arguments, a SQL relation call, a library call) and a
//! physical plan:
//!
//! - [`columns`]: which columns are metadata, features and batch keys;
//! - [`parameters`]: correction parameters by name, the one parser behind SQL and `tune`;
//! - [`relation`]: the SQL relation planner of `balans(...)`, `correct(...)`,
//!   `evaluate(...)` and `preprocess(...)`;
//! - logical nodes, each with its extension planner: [`BalansNode`] ([`node`], lowered by
//!   [`BalansExtensionPlanner`] to the partitioned operators of
//!   [`balans_operators::exec::plan`]), [`evaluate::EvaluateNode`], [`preprocess::PreprocessNode`]
//!   and [`embed::EmbedNode`];
//! - [`BalansQueryPlanner`] ([`physical`]): the session's query planner with all of them.
//!
//! The planner runs no job itself: `preprocess(...)`, whose columns come from the data, calls
//! the engine's job through [`preprocess::PreprocessRunner`].

pub mod columns;
pub mod embed;
pub mod error;
pub mod evaluate;
pub mod inputs;
pub mod node;
pub mod parameters;
pub mod physical;
pub mod preprocess;
pub mod relation;

pub use error::{PlannerError, Result};
pub use node::{BalansNode, FIT_MASK_COLUMN, balans_plan};
pub use physical::{BalansExtensionPlanner, BalansQueryPlanner, ClusterPlanning};
pub use relation::CorrectionRelationPlanner;
