//! # balans-engine
//!
//! The embeddable façade of Balans: session setup ([`session`]), profile-table sources
//! (local files, directories, globs, `s3://`, `https://`: [`source`]), the correction job
//! ([`correct`]), atomic Parquet output ([`writer`]), the synthetic data generator
//! ([`synth`]) and the terminal progress display used by the `balans` command
//! ([`progress`]). See `ARCHITECTURE.md` at the repository root for the data flow.

pub mod auto;
pub mod bench;
#[cfg(feature = "cluster")]
pub mod cluster;
pub mod correct;
pub mod error;
pub mod evaluate;
pub mod line_editor;
pub mod preprocess;
pub mod preprocess_relation;
pub mod progress;
pub mod session;
pub mod source;
pub mod sql;
pub mod stores;
pub mod synth;
pub mod train;
pub mod writer;

pub use correct::{CorrectOutcome, CorrectRequest, run_correct};
pub use error::{BalansError, Result};
pub use evaluate::{EvaluateRequest, Evaluation, run_evaluate};
pub use session::{SessionSettings, build_session};
