//! # balans-planner
//!
//! Turns a correction request into a DataFusion plan: [`BalansNode`] is the logical extension
//! node (it shows in `EXPLAIN`), [`BalansExtensionPlanner`] lowers each pass to the chain of
//! partitioned operators of [`balans_operators::exec::plan`], and [`BalansQueryPlanner`] is the session's query planner
//! with that extension registered.
//!
//! [`columns`] decides the role of every column of a profile table (metadata, features,
//! batch) for the CLI, SQL and library requests alike.

pub mod columns;
pub mod error;
pub mod node;
pub mod physical;

pub use error::{PlannerError, Result};
pub use node::{BalansNode, balans_plan};
pub use physical::{BalansExtensionPlanner, BalansQueryPlanner};
