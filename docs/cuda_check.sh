#!/bin/bash
# Type-checks the `cuda` feature of balans-learned on a machine without a CUDA toolkit, with
# CUDA 13.0's compiler pieces from PyPI (ARCHITECTURE.md, "learned/"). candle-kernels compiles
# its PTX with nvcc in its build script, so this exercises the GPU kernels' build as well as
# our code under the feature. Linking a runnable `balans` with `--features cuda` also needs the
# toolkit's libraries (cudart, cublas, curand, nvrtc) and the driver's libcuda; on a machine
# with the toolkit installed, `cargo build --release --features cuda` is all it takes.
#   usage: docs/cuda_check.sh [VENV_DIR] [TARGET_DIR]   (CUDA_COMPUTE_CAP, default 90)
set -euo pipefail
VENV=${1:-/tmp/balans-cuda-venv}
TARGET=${2:-/tmp/balans-cuda-target}
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" \
    "nvidia-cuda-crt==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*"
CUDA=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
chmod +x "$CUDA"/bin/* "$CUDA"/nvvm/bin/*
# nvcc looks for libnvvm under nvvm/lib64.
mkdir -p "$CUDA/nvvm/lib64"
ln -sf "$CUDA/lib/libnvvm.so.4" "$CUDA/nvvm/lib64/libnvvm.so"
export PATH="$CUDA/bin:$PATH" CUDA_ROOT="$CUDA" CUDA_PATH="$CUDA" CUDA_HOME="$CUDA"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CARGO_TARGET_DIR="$TARGET"
nvcc --version | tail -n 1
cargo check -p balans-learned --features cuda
