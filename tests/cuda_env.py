"""A Python interpreter with NVRTC and CuPy from PyPI wheels, for the CUDA compile tests.

``tests/test_cuda_compile.py`` proves that ``cynag_kernels/nesterov_ag.cu``
compiles with NVRTC on machines without a GPU and without a system CUDA
toolkit.  The compiler comes from PyPI wheels, in a virtual environment of its
own (so the main environment needs neither CuPy nor CUDA):

* ``nvidia-cuda-nvrtc`` -- ``libnvrtc.so.13`` and its builtins library;
* ``nvidia-cuda-runtime`` -- the CUDA headers (``cuda_fp16.h`` and what it
  includes: ``vector_types.h``, ...), under ``site-packages/nvidia/cu13/``;
* ``cupy-cuda13x`` -- only for ``cupy.cuda.nvrtc`` (works without a driver) and
  for the compiler options CuPy's ``RawModule`` passes (its bundled CCCL and
  ``cupy/_core/include`` search paths, the CUDA include path it derives from
  where NVRTC was found).  Nothing is launched, so no device is needed.

About 140 MB is downloaded (the versions are pinned in :data:`PINNED`, checked
to work together).

Location: ``$CYNAG_CUDA_VENV`` if set, else ``<repo>/.venv-cuda`` (gitignored
by ``.venv*/``).  An existing environment is reused when the pinned versions
are installed in it and ``cupy.cuda.nvrtc`` reports a version; otherwise it is
created (or completed) -- network access to PyPI needed::

    python -m venv DIR
    DIR/bin/python -m pip install --only-binary=:all: cupy-cuda13x==... nvidia-cuda-nvrtc==... \\
        nvidia-cuda-runtime==... cuda-pathfinder==... numpy==...

cynag is *not* installed into it: the tests pass the source text returned by
``cynag_kernels.cuda.kernel_source()`` and the options of
``cynag_kernels.cuda.nvrtc_options()`` from the main process in a JSON file,
and this module, run by the environment's interpreter
(``python cuda_env.py compile JOB.json OUT.json``), compiles them and writes
the logs, PTX and CUBIN sizes back as JSON.

If the environment cannot be created, the tests that need it fail with pip's
output -- unless ``CYNAG_SKIP_CUDA_COMPILE=1`` is set, in which case they are
skipped with the reason.

Command line: ``python tests/cuda_env.py`` creates/updates the environment and
prints the interpreter's path (useful to warm a CI cache).
"""
import json
import os
import subprocess
import sys
import tempfile
import time

from venv_tools import REPO_ROOT, EnvError, Venv, provide_or_fail

try:
    import pytest
except ImportError:  # the worker runs in the CUDA environment, without pytest
    pytest = None

__all__ = ["PINNED", "CudaEnvError", "clean_env", "cuda_compile_python", "ensure_cuda_python",
           "repo_root", "run_compile_job", "venv_dir", "venv_python"]

#: Packages of the environment, with the versions verified to work together
#: (CUDA 13.5 NVRTC and headers, CuPy 14.2 for CUDA 13).
PINNED = (
    ("cupy-cuda13x", "14.2.0"),
    ("nvidia-cuda-nvrtc", "13.5.37"),
    ("nvidia-cuda-runtime", "13.5.37"),
    ("cuda-pathfinder", "1.9.1"),
    ("numpy", "2.4.6"),
)
ENV_VENV = "CYNAG_CUDA_VENV"
ENV_SKIP = "CYNAG_SKIP_CUDA_COMPILE"

#: Timeout of one pip command.
PIP_TIMEOUT_S = 1200
#: Timeout of one compile job (all architectures in one process).
COMPILE_TIMEOUT_S = 300


_cached_python = None  # per process


class CudaEnvError(EnvError):
    """The NVRTC environment could not be created, or a compile job did not run."""


# Also dropped: what would make CuPy look for a system CUDA toolkit.
_VENV = Venv("cuda-env", ENV_VENV, ".venv-cuda", CudaEnvError,
             dropped=("CUDA_PATH", "CUDA_HOME", "NVCC"), dropped_prefixes=("CUPY_",))
venv_dir, venv_python, clean_env = _VENV.dir, _VENV.python, _VENV.clean_env
_progress, _python_ok, _locked = _VENV.progress, _VENV.python_ok, _VENV.locked
_check_target_dir = _VENV.check_target_dir


def repo_root():
    """Root of the cynag repository (the parent of ``tests/``)."""
    return REPO_ROOT


def _run(cmd, what, timeout=PIP_TIMEOUT_S):
    return _VENV.run(cmd, what, timeout)


# Run by the environment's interpreter: exit status 0 when the pinned versions
# are installed and NVRTC loads.
_CHECK_CODE = """
import importlib.metadata as md, sys
pins = %r
bad = []
for name, version in pins:
    try:
        got = md.version(name)
    except md.PackageNotFoundError:
        got = None
    if got != version:
        bad.append("%%s %%s (want %%s)" %% (name, got, version))
from cupy.cuda import nvrtc
print("nvrtc %%d.%%d" %% nvrtc.getVersion())
if bad:
    print("wrong versions: " + ", ".join(bad))
    sys.exit(1)
""" % (PINNED,)


def _toolchain_status(python):
    """(ok, output) of the environment check in ``python``."""
    if not os.path.exists(python):
        return False, "%s does not exist" % python
    try:
        proc = subprocess.run([python, "-c", _CHECK_CODE], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, universal_newlines=True, timeout=120,
                              env=clean_env(), cwd=tempfile.gettempdir())
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    return proc.returncode == 0, proc.stdout


def _create_venv(d, python, why):
    """Create the environment in ``d`` (or complete/update a partial one)."""
    _check_target_dir(d)
    t_start = time.time()
    _progress("setting up the NVRTC environment in %s (%s; downloads about 140 MB from "
              "PyPI, takes about a minute) ..." % (d, why.strip().replace("\n", "; ")))
    if not _python_ok(python, "import pip"):
        _progress("  python -m venv %s" % d)
        _, dt = _run([sys.executable, "-m", "venv", d], "creating the virtual environment")
        _progress("  ... done (%.0f s)" % dt)
    pins = ["%s==%s" % p for p in PINNED]
    what = "installing " + " ".join(pins)
    _progress("  %s ..." % what)
    _, dt = _run([python, "-m", "pip", "install", "--only-binary=:all:"] + pins, what)
    _progress("  ... done (%.0f s)" % dt)
    ok, out = _toolchain_status(python)
    if not ok:
        raise CudaEnvError("the pinned packages were installed in %s but the check failed:\n%s"
                           % (d, out))
    _progress("NVRTC environment ready (%.0f s): %s" % (time.time() - t_start, out.strip()))


def ensure_cuda_python():
    """Path of an interpreter with NVRTC and CuPy from the pinned wheels.

    Creates the environment if needed, once per process.  Raises
    :class:`CudaEnvError` with the failing command's output.
    """
    global _cached_python
    if _cached_python is not None:
        return _cached_python
    d, python = _VENV.open()
    with _locked(d):
        ok, out = _toolchain_status(python)
        if ok:
            _progress("reusing the NVRTC environment in %s (%s)" % (d, out.strip()))
        else:
            _create_venv(d, python, out.strip().splitlines()[-1] if out.strip() else "new")
    _cached_python = python
    return python


def run_compile_job(python, job, work_dir):
    """Run ``job`` (see :func:`_compile_main`) in ``python``; return its result dict.

    Raises :class:`CudaEnvError` with the worker's output if it writes no result.
    """
    job_path = os.path.join(str(work_dir), "cuda_compile_job.json")
    out_path = os.path.join(str(work_dir), "cuda_compile_result.json")
    with open(job_path, "w") as f:
        json.dump(job, f)
    if os.path.exists(out_path):
        os.remove(out_path)
    cmd = [python, os.path.abspath(__file__), "compile", job_path, out_path]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True, timeout=COMPILE_TIMEOUT_S,
                              env=clean_env(), cwd=str(work_dir))
        output, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as e:
        output, rc = (e.stdout or ""), "timeout after %d s" % COMPILE_TIMEOUT_S
        if isinstance(output, bytes):
            output = output.decode("utf-8", "replace")
    if rc != 0 or not os.path.exists(out_path):
        raise CudaEnvError("the NVRTC compile job ended (exit status %s) without a result: "
                           "%s\n%s" % (rc, " ".join(cmd), output))
    with open(out_path) as f:
        result = json.load(f)
    result["worker_output"] = output
    return result


def _compile_main(job_path, out_path):
    """Worker, run by the environment's interpreter: compile every unit of the job.

    The job (JSON) has ``options`` (the caller's NVRTC options, as given to
    ``cupy.RawModule(options=...)``), ``extra_options`` (appended after
    CuPy's, e.g. ``--ptxas-options=-v``) and ``units``: a list of
    ``{"label", "source", "name", "arch"}`` (``arch`` like ``"80"``; an
    optional ``extra_options`` list is appended for that unit only).  Each
    unit is compiled like ``RawModule`` compiles on a device of that compute
    capability: ``assemble_cupy_compiler_options(options) + ('-ftz=true',
    '-arch=sm_XX', '--device-as-default-execution-space')`` (CuPy's NVRTC
    path; ``sm_`` since CuPy compiles straight to CUBIN), then the extras.
    """
    import importlib.metadata as md

    with open(job_path) as f:
        job = json.load(f)

    import cupy
    from cupy._core import core
    from cupy.cuda import nvrtc

    base = tuple(core.assemble_cupy_compiler_options(tuple(job["options"])))
    base += ("-ftz=true",)
    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        lib = load_nvidia_dynamic_lib("nvrtc")
        nvrtc_lib = {"path": os.path.realpath(lib.abs_path), "found_via": lib.found_via}
    except Exception as e:  # reported, checked by the tests
        nvrtc_lib = {"path": None, "found_via": "error: %s" % e}
    result = {
        "versions": {name: md.version(name) for name, _ in PINNED},
        "cupy_version": cupy.__version__,
        "nvrtc_version": list(nvrtc.getVersion()),
        "supported_archs": list(nvrtc.getSupportedArchs()),
        "cuda_path": cupy.cuda.get_cuda_path(),
        "nvrtc_lib": nvrtc_lib,
        "site_packages": [os.path.realpath(p) for p in sys.path if p.endswith("site-packages")],
        "cupy_options": list(base),
        "units": [],
    }
    for unit in job["units"]:
        options = base + ("-arch=sm_%s" % unit["arch"], "--device-as-default-execution-space")
        options += tuple(job.get("extra_options", ())) + tuple(unit.get("extra_options", ()))
        t0 = time.time()
        prog = nvrtc.createProgram(unit["source"], unit["name"], (), ())
        try:
            try:
                nvrtc.compileProgram(prog, options)
                ok, error = True, None
            except nvrtc.NVRTCError as e:
                ok, error = False, str(e)
            log = nvrtc.getProgramLog(prog)
            ptx = cubin_size = None
            if ok:
                ptx = nvrtc.getPTX(prog)
                if isinstance(ptx, bytes):
                    ptx = ptx.decode("utf-8", "replace")
                cubin_size = len(nvrtc.getCUBIN(prog))
        finally:
            nvrtc.destroyProgram(prog)
        if isinstance(log, bytes):
            log = log.decode("utf-8", "replace")
        result["units"].append({
            "label": unit["label"], "arch": unit["arch"], "name": unit["name"],
            "options": list(options), "ok": ok, "error": error, "log": log.rstrip("\x00"),
            "ptx": ptx, "cubin_size": cubin_size, "seconds": time.time() - t0,
        })
    with open(out_path, "w") as f:
        json.dump(result, f)


if pytest is not None:

    @pytest.fixture(scope="session")
    def cuda_compile_python(request):
        """Session fixture: path of a Python with NVRTC and CuPy from the pinned wheels.

        Fails with pip's output if the environment cannot be set up, or skips
        when ``CYNAG_SKIP_CUDA_COMPILE=1``.
        """
        return provide_or_fail(request, _VENV, ensure_cuda_python, "NVRTC", ENV_SKIP)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "compile":
        _compile_main(sys.argv[2], sys.argv[3])
        sys.exit(0)
    if len(sys.argv) != 1:
        sys.stderr.write("usage: python cuda_env.py [compile JOB.json OUT.json]\n")
        sys.exit(2)
    try:
        print(ensure_cuda_python())
    except CudaEnvError as e:
        sys.stderr.write("%s\n" % e)
        sys.exit(1)
