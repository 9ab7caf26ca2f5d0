//! Where training runs: the CPU (always built) or a CUDA GPU (the `cuda` cargo feature).
//!
//! Every model and loss is written against candle's device-generic tensors, so the same
//! code trains on either. The one CPU-only kernel is the FFT long convolution
//! ([`crate::fftconv`]); on a GPU, CellPainTR's long convolution is the equivalent Toeplitz
//! product, a batched matmul.
//!
//! Determinism: on the CPU the same data, options and seed give the same bytes whatever the
//! thread count. GPU reductions are not ordered, so a CUDA run is reproducible only to
//! rounding.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::error::{LearnedError, Result};

/// A compute device named on the command line: `cpu`, `cuda` (GPU 0) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComputeDevice {
    /// The CPU (threads from rayon).
    #[default]
    Cpu,
    /// The CUDA GPU with this ordinal.
    Cuda(usize),
}

impl ComputeDevice {
    /// Whether this binary was built with CUDA support (`--features cuda`).
    pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

    /// Opens the device. A CUDA device in a build without the `cuda` feature, or one the
    /// driver cannot open, is a clear error.
    pub fn open(self) -> Result<Device> {
        match self {
            ComputeDevice::Cpu => Ok(Device::Cpu),
            ComputeDevice::Cuda(ordinal) => {
                if !Self::CUDA_BUILT {
                    return Err(LearnedError::InvalidArgument(format!(
                        "device {self} needs a build with CUDA support: \
                         cargo build --release --features cuda (needs the CUDA toolkit's nvcc)"
                    )));
                }
                Device::new_cuda(ordinal).map_err(|e| {
                    LearnedError::InvalidArgument(format!("cannot open device {self}: {e}"))
                })
            }
        }
    }
}

impl fmt::Display for ComputeDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ComputeDevice::Cpu => write!(f, "cpu"),
            ComputeDevice::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

impl FromStr for ComputeDevice {
    type Err = LearnedError;

    fn from_str(text: &str) -> Result<Self> {
        let lower = text.trim().to_ascii_lowercase();
        let bad = || {
            LearnedError::InvalidArgument(format!(
                "unknown device '{text}': use cpu, cuda or cuda:N"
            ))
        };
        match lower.as_str() {
            "cpu" => Ok(ComputeDevice::Cpu),
            "cuda" | "gpu" => Ok(ComputeDevice::Cuda(0)),
            other => {
                let ordinal = other
                    .strip_prefix("cuda:")
                    .or_else(|| other.strip_prefix("gpu:"))
                    .ok_or_else(bad)?;
                ordinal.parse().map(ComputeDevice::Cuda).map_err(|_| bad())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print() {
        assert_eq!("cpu".parse::<ComputeDevice>().unwrap(), ComputeDevice::Cpu);
        assert_eq!(
            " CUDA ".parse::<ComputeDevice>().unwrap(),
            ComputeDevice::Cuda(0)
        );
        assert_eq!(
            "cuda:3".parse::<ComputeDevice>().unwrap(),
            ComputeDevice::Cuda(3)
        );
        assert_eq!(
            "gpu:1".parse::<ComputeDevice>().unwrap(),
            ComputeDevice::Cuda(1)
        );
        assert_eq!(ComputeDevice::Cuda(2).to_string(), "cuda:2");
        for bad in ["", "tpu", "cuda:", "cuda:x", "cuda:-1", "metal"] {
            let e = bad.parse::<ComputeDevice>().unwrap_err().to_string();
            assert!(e.contains("use cpu, cuda or cuda:N"), "{bad}: {e}");
        }
    }

    #[test]
    fn the_cpu_opens_and_cuda_without_the_feature_is_a_clear_error() {
        assert!(ComputeDevice::Cpu.open().unwrap().is_cpu());
        if !ComputeDevice::CUDA_BUILT {
            let e = ComputeDevice::Cuda(0).open().unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
    }
}
