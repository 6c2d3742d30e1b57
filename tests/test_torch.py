"""cynag.torch, tested in the PyTorch environment of ``torch_env.py``.

Each ``tests/torch_cases/torch_case_*.py`` module runs there under pytest
(PyTorch CPU, real Chainer 7.8.1 and the current cynag in one interpreter);
a failure shows that run's output.  The CUDA cases skip without a device.
"""
import glob
import os
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(HERE, "torch_cases",
                                                                    "torch_case_*.py")))
#: Wall-clock limit of one module (DDP and torch.compile included).
TIMEOUT_S = 900


def test_cases_found():
    assert {"torch_case_optimizer.py", "torch_case_migration.py",
            "torch_case_ecosystem.py"} <= set(CASES)


def test_import_cynag_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, cynag, cynag.functional; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("reader", ["native", "python"])
@pytest.mark.parametrize("case", CASES)
def test_torch_cases(torch_python, case, reader):
    """Every case with the native reader (built once, at the start) and without it."""
    from chainer_env import clean_env

    cases_dir = os.path.join(HERE, "torch_cases")
    cmd = [torch_python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
           "--confcutdir", cases_dir, "--rootdir", cases_dir,
           "-o", "python_files=torch_case_*.py", os.path.join(cases_dir, case)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=TIMEOUT_S, cwd=cases_dir,
                          env=clean_env({"CYNAG_TORCH_NATIVE": "1" if reader == "native"
                                         else "0"}))
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stdout[-12000:]
    assert " passed" in proc.stdout
