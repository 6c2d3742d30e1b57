#!/usr/bin/env bash
# The GPU checks, for a machine with an NVIDIA GPU: installs cynag with the
# CUDA extra matching the driver, runs the GPU tests and the GPU benchmark.
#   bash bench/gpu_check.sh            (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi || true
extra=cuda12
if nvidia-smi 2>/dev/null | grep -q "CUDA Version: 1[3-9]"; then extra=cuda13; fi
python -m venv .venv-gpu
. .venv-gpu/bin/activate
python -m pip install -q -e ".[test,${extra}]"
python -c "import cynag; cynag.show_config()"
python -m pytest -q -m gpu tests/test_gpu.py
python bench/bench_gpu.py --json "${OUT:-.}/bench_gpu.json"
