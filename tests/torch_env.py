"""A Python interpreter with PyTorch (CPU), real Chainer 7.8.1 and the current cynag.

The ``cynag.torch`` tests (``tests/torch_cases/torch_case_*.py``) run there,
so the main environment needs no PyTorch, and the migration tests can compare
with real Chainer in the same process.  It is the Chainer environment of
``chainer_env.py`` (``.chainer-venv``, with the current cynag installed once
per session) with PyTorch added.  PyTorch is installed, the first way that
works:

1. ``$CYNAG_TORCH_PIP``: pip arguments, e.g. ``torch==2.5.1 --index-url URL``;
2. ``torch`` from PyTorch's CPU index (https://download.pytorch.org/whl/cpu,
   which has its dependencies too), about 200 MB;
3. the newest ``torch==X+cpu`` the configured indexes or find-links offer;
4. ``torch`` from the default index (on Linux the CUDA build: several GB).

If PyTorch cannot be installed, the tests fail with pip's output, unless
``CYNAG_SKIP_TORCH=1`` is set, in which case they are skipped with the reason.

Command line: ``python tests/torch_env.py`` prepares the environment and
prints the interpreter's path.
"""
import os
import re
import shlex
import subprocess
import sys

import chainer_env
from venv_tools import provide_or_fail

try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

ENV_SKIP = "CYNAG_SKIP_TORCH"
ENV_PIP = "CYNAG_TORCH_PIP"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
PIP_TIMEOUT_S = 1800

_cached = None


def _has_torch(python):
    return chainer_env._python_ok(python, "import torch, torch.optim, chainer; torch.zeros(1) + 1")


def _try(python, args, what):
    chainer_env._progress("  %s ..." % what)
    try:
        _, dt = chainer_env._run([python, "-m", "pip"] + args, what, timeout=PIP_TIMEOUT_S)
        # PyTorch's wheels require a newer setuptools, which Chainer 7.8.1
        # cannot import; torch itself runs with the old one.
        chainer_env._run([python, "-m", "pip", "install", "setuptools<70"],
                         "pinning setuptools<70 again", timeout=600)
    except chainer_env.ChainerEnvError as e:
        chainer_env._progress("  ... failed: %s" % str(e).strip().splitlines()[-1][:200])
        return False
    chainer_env._progress("  ... done (%.0f s)" % dt)
    return _has_torch(python)


def _local_cpu_version(python):
    try:
        out = subprocess.run([python, "-m", "pip", "index", "versions", "torch"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             universal_newlines=True, timeout=300).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        if line.strip().startswith("Available versions:"):
            for v in line.split(":", 1)[1].split(","):
                v = v.strip()
                if re.match(r"^\d+(\.\d+)*\+cpu$", v):
                    return v
    return None


def _install_torch(python):
    errors = []
    spec = os.environ.get(ENV_PIP)
    if spec:
        if _try(python, ["install"] + shlex.split(spec), "pip install %s" % spec):
            return
        errors.append("%s=%r did not install a working torch" % (ENV_PIP, spec))
    # (That index holds PyTorch's dependencies too; the default index is not
    # added: it would offer the CUDA build of torch.)
    if _try(python, ["install", "torch", "--index-url", CPU_INDEX, "--timeout", "30",
                     "--retries", "1"], "installing torch from PyTorch's CPU index"):
        return
    version = _local_cpu_version(python)
    if version and _try(python, ["install", "torch==%s" % version],
                        "installing torch==%s" % version):
        return
    if _try(python, ["install", "torch"], "installing torch from the default index"):
        return
    raise chainer_env.ChainerEnvError("could not install PyTorch into %s (tried %s, the CPU "
                                      "index, a +cpu wheel, the default index)%s"
                                      % (chainer_env.venv_dir(), ENV_PIP,
                                         "".join("\n" + e for e in errors)))


def ensure_torch_python():
    """Path of an interpreter with torch, chainer 7.8.1 and the current cynag."""
    global _cached
    if _cached is not None:
        return _cached
    python = chainer_env.ensure_chainer_python()
    d = chainer_env.venv_dir()
    with chainer_env._locked(d):
        if not chainer_env._python_ok(python, "import hypothesis, pytest, ninja"):
            # (ninja: torch.utils.cpp_extension builds cynag.torch's native reader)
            chainer_env._run([python, "-m", "pip", "install", "hypothesis", "pytest", "ninja"],
                             "installing hypothesis, pytest and ninja", timeout=600)
        if _has_torch(python):
            chainer_env._progress("torch is installed in %s" % d)
        else:
            chainer_env._progress("installing PyTorch (CPU) into %s ..." % d)
            _install_torch(python)
    _cached = python
    return python


if pytest is not None:

    @pytest.fixture(scope="session")
    def torch_python(request):
        """Session fixture: a Python with torch, chainer 7.8.1 and the current cynag."""
        return provide_or_fail(request, chainer_env._VENV, ensure_torch_python,
                               "PyTorch", ENV_SKIP)


if __name__ == "__main__":
    try:
        print(ensure_torch_python())
    except chainer_env.ChainerEnvError as e:
        sys.stderr.write("%s\n" % e)
        sys.exit(1)
