//! Numeric kernels of BALANS and ComBat: free functions and small state machines over slices, with no
//! DataFusion types. Each is tested against a dense brute-force reference.

pub mod combat;
pub mod distance;
pub mod elbow;
pub mod exact;
pub mod harmony;
pub mod landmark;
pub mod pca;
pub mod preprocess;
pub mod quality;
pub mod sampling;
pub mod scale;
pub mod search;
pub mod smooth;
pub mod sphering;

pub use balans_metrics::simd::clear_upper_simd_state;
