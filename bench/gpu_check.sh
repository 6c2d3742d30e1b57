#!/usr/bin/env bash
# The GPU checks, for a machine with an NVIDIA GPU: the GPU tests (and the
# cynag.torch CUDA case where PyTorch with CUDA is installed), then the GPU
# benchmark (single tensors, 2000x64, 1000x1000, ResNet-50's shapes).
#   bash bench/gpu_check.sh [bench_gpu.py options]     (from anywhere)
# The benchmark's results go to $CYNAG_GPU_CHECK_DIR/bench_gpu.json (default:
# the checkout).  When the running interpreter already has CuPy and sees a
# device (a machine without network access, say), cynag's extensions are
# built in place and used from the checkout; otherwise cynag is installed
# with the CUDA extra matching the driver into .venv-gpu.  The benchmark runs even when a test
# fails; the exit status is the tests'.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi || true
if python -c "import sys, cupy; sys.exit(cupy.cuda.runtime.getDeviceCount() < 1)" 2>/dev/null; then
    echo "gpu_check: using $(command -v python) and its CuPy"
    python setup.py -q build_ext --inplace
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    extra=cuda12
    if nvidia-smi 2>/dev/null | grep -q "CUDA Version: 1[3-9]"; then extra=cuda13; fi
    python -m venv .venv-gpu
    . .venv-gpu/bin/activate
    python -m pip install -q -e ".[test,${extra}]"
fi
python -c "import cynag; cynag.show_config()"
status=0
python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py || status=$?
# cynag.torch on CUDA tensors, where this interpreter has a CUDA PyTorch.
if python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    python -m pytest -q -p no:cacheprovider -rs --confcutdir tests/torch_cases \
        -o python_files="torch_case_*.py" -m gpu tests/torch_cases/torch_case_optimizer.py \
        || status=$?
else
    echo "gpu_check: no CUDA PyTorch here; the cynag.torch CUDA case not run"
fi
python bench/bench_gpu.py --json "${CYNAG_GPU_CHECK_DIR:-.}/bench_gpu.json" "$@"
exit "$status"
