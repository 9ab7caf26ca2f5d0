//! # balans-learned
//!
//! Learned batch-robust embeddings, trained and applied in Rust on
//! [candle](https://github.com/huggingface/candle), on the CPU or, with the `cuda` cargo
//! feature, on a CUDA GPU ([`device`]).
//!
//! - [`abra`]: ABRA at the profile level: an MLP encoder, adversarial batch-statistics
//!   perturbation, an additive angular margin classifier and a clean/perturbed alignment.
//! - [`cellpaintr`]: CellPainTR: feature tokens, bidirectional Hyena mixing, a
//!   source-context token, masked-value and supervised contrastive training in three stages.
//! - [`losses`]: ArcFace, supervised contrastive (SupCon) and symmetric-KL losses.
//! - [`train`]: AdamW with clipping, validation on held-out batches, checkpoints, early
//!   stopping; [`store`]: the model directory (safetensors + JSON card); [`embed`]:
//!   inference for `balans correct --method embed` and SQL's `embed(...)`.
//!
//! Everything is seeded ([`init`]): the same data, options and seed give the same weights.

pub mod abra;
pub mod cellpaintr;
mod custom_op;
pub mod data;
pub mod device;
pub mod embed;
pub mod error;
pub mod fftconv;
pub mod init;
pub mod losses;
pub mod shortconv;
pub mod store;
pub mod train;

pub use abra::{AbraConfig, AbraModel};
pub use cellpaintr::{CellPainTrConfig, CellPainTrModel};
pub use data::{BatchSplit, Profiles, Standardizer};
pub use device::ComputeDevice;
pub use embed::Embedder;
pub use error::{LearnedError, Result};
pub use store::{Architecture, EpochRecord, ModelCard};
pub use train::{TrainOptions, TrainOutcome, train_abra, train_cellpaintr};
