//! # balans-operators
//!
//! The BALANS correction as plain numeric kernels ([`kernels`]) over slices, the memory-mapped
//! Arrow IPC working files they stream over ([`io`]), and the DataFusion physical operators a
//! correction is planned as, one per step ([`exec`]). Kernels take no DataFusion types so they can be
//! tested and benchmarked without a session.

pub mod config;
pub mod error;
pub mod exec;
pub mod io;
pub mod kernels;
pub mod progress;

pub use config::{
    Anchor, BalansConfig, ElbowRule, Estimator, Method, NanPolicy, OutputSpace, SpheringMethod,
    Variant,
};
pub use error::{OperatorError, Result};
pub use exec::{BalansSpec, correction_plan};
pub use progress::{NoProgress, ProgressSink, RunSummary, StageTiming};
