"""A Python interpreter with real Chainer 7.8.1 *and* cynag, for the parity tests.

Chainer 7.8.1 needs ``numpy<2`` and an old ``setuptools``, so it lives in its
own virtual environment; the parity tests run scripts in that interpreter
(see ``tests/test_chainer_parity.py``).

Location: ``$CYNAG_CHAINER_VENV`` if set, else ``<repo>/.chainer-venv``
(gitignored).  An existing environment is reused when
``import chainer; assert chainer.__version__ == '7.8.1'`` works in it;
otherwise it is created (one to two minutes, network access to PyPI needed)::

    python -m venv DIR
    DIR/bin/pip install "setuptools<70" wheel "numpy<2"
    DIR/bin/pip install --no-build-isolation chainer==7.8.1
    DIR/bin/pip install "Cython>=3.1"

cynag itself is (re)installed into it, non-editable, once per test session so
that the tests always exercise the current source::

    DIR/bin/pip install --no-build-isolation --force-reinstall --no-deps <copy of repo>

The build runs on a temporary copy of the source tree (generated ``.c``
files, build folders and ``*.so`` left out) so that it never writes
``build/``, ``*.egg-info`` or regenerated Cython output into the working tree
other people are building in.

If the environment cannot be created or cynag cannot be installed, the tests
that need it fail with pip's output -- unless ``CYNAG_SKIP_CHAINER=1`` is set,
in which case they are skipped with the reason.

Command line: ``python tests/chainer_env.py`` creates/updates the environment
and prints the interpreter's path (useful to warm a CI cache).
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

from venv_tools import REPO_ROOT, EnvError, Venv, provide_or_fail

try:
    import pytest
except ImportError:  # pragma: no cover - command-line use without pytest
    pytest = None

__all__ = ["CHAINER_VERSION", "ChainerEnvError", "case_group_runner", "chainer_python",
           "clean_env", "case_result", "ensure_chainer_python", "repo_root", "venv_dir",
           "venv_python"]

CHAINER_VERSION = "7.8.1"
ENV_VENV = "CYNAG_CHAINER_VENV"
ENV_SKIP = "CYNAG_SKIP_CHAINER"

#: Timeout of one pip command (chainer is built from its sdist).
PIP_TIMEOUT_S = 1200

_STAMP_NAME = ".cynag-install-stamp"
# Never copied when installing cynag from the working tree.
_SKIP_NAMES = {".git", ".hg", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis",
               ".eggs", ".tox", ".nox", ".mypy_cache", ".ruff_cache", ".benchmarks"}
_SKIP_SUFFIXES = (".egg-info", ".so", ".pyd", ".pyc", ".pyo", ".o", ".obj", ".dll", ".dylib")

_cached_python = None  # per process: cynag is reinstalled once per session


class ChainerEnvError(EnvError):
    """The Chainer environment could not be created, or cynag not installed into it."""


_VENV = Venv("chainer-env", ENV_VENV, ".chainer-venv", ChainerEnvError,
             private_files=(_STAMP_NAME,))
venv_dir, venv_python, clean_env = _VENV.dir, _VENV.python, _VENV.clean_env
_progress, _python_ok, _locked = _VENV.progress, _VENV.python_ok, _VENV.locked
_check_target_dir = _VENV.check_target_dir


def repo_root():
    """Root of the cynag repository (the parent of ``tests/``)."""
    return REPO_ROOT


def _run(cmd, what, timeout=PIP_TIMEOUT_S, cwd=None):
    return _VENV.run(cmd, what, timeout, cwd)


def _has_chainer(python):
    return _python_ok(python, "import chainer; assert chainer.__version__ == %r"
                      % CHAINER_VERSION)


def _create_venv(d, python):
    """Create the environment in ``d`` (or complete a partial one) with Chainer."""
    _check_target_dir(d)
    t_start = time.time()
    _progress("creating a Chainer %s environment in %s (takes 1-2 minutes; "
              "needs network access to PyPI) ..." % (CHAINER_VERSION, d))
    if not _python_ok(python, "import pip"):
        _progress("  python -m venv %s" % d)
        _, dt = _run([sys.executable, "-m", "venv", d], "creating the virtual environment")
        _progress("  ... done (%.0f s)" % dt)
    steps = [
        (["install", "setuptools<70", "wheel", "numpy<2"],
         "installing setuptools<70, wheel, numpy<2"),
        (["install", "--no-build-isolation", "chainer==%s" % CHAINER_VERSION],
         "installing chainer==%s" % CHAINER_VERSION),
        # The stateful tests (test_step_machine.py) run there too.
        (["install", "hypothesis"], "installing hypothesis"),
    ]
    for args, what in steps:
        _progress("  %s ..." % what)
        _, dt = _run([python, "-m", "pip"] + args, what)
        _progress("  ... done (%.0f s)" % dt)
    if not _has_chainer(python):
        out, _ = _run([python, "-c", "import chainer; print(chainer.__version__)"],
                      "importing chainer")
        raise ChainerEnvError("chainer==%s was installed in %s but does not import as that "
                              "version:\n%s" % (CHAINER_VERSION, d, out))
    _progress("Chainer environment ready (%.0f s)" % (time.time() - t_start))


def _ignore_for_copy(venv):
    venv = os.path.normcase(os.path.abspath(venv))

    def ignore(src, names):
        skipped = set()
        for name in names:
            path = os.path.join(src, name)
            if (name in _SKIP_NAMES or name.endswith(_SKIP_SUFFIXES)
                    or os.path.normcase(os.path.abspath(path)) == venv
                    or os.path.exists(os.path.join(path, "pyvenv.cfg"))):
                skipped.add(name)
                continue
            stem, ext = os.path.splitext(name)
            # Cython output next to its .pyx: regenerated by the venv's Cython.
            if ext in (".c", ".cpp", ".html") and stem + ".pyx" in names:
                skipped.add(name)
        return skipped

    return ignore


def _install_cynag(python, d):
    """Build and install the current cynag source into the environment."""
    if not _python_ok(python, "import Cython; v = Cython.__version__.split('.'); "
                              "assert (int(v[0]), int(v[1])) >= (3, 1)"):
        _progress("  installing Cython>=3.1 ...")
        _, dt = _run([python, "-m", "pip", "install", "Cython>=3.1"], "installing Cython>=3.1")
        _progress("  ... done (%.0f s)" % dt)
    _progress("building and installing cynag from %s into %s ..." % (REPO_ROOT, d))
    tmp = tempfile.mkdtemp(prefix="cynag-src-")
    try:
        src = os.path.join(tmp, "cynag")
        shutil.copytree(REPO_ROOT, src, ignore=_ignore_for_copy(d), symlinks=True)
        _, dt = _run([python, "-m", "pip", "install", "--no-build-isolation", "--force-reinstall",
                      "--no-deps", src], "installing cynag into the Chainer environment")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _progress("  ... done (%.0f s)" % dt)
    # The installed copy must be the one imported, next to chainer 7.8.1.
    out, _ = _run([python, "-c", "import os, chainer, numpy, cynag, cynag_kernels; "
                                 "print(chainer.__version__); print(numpy.__version__); "
                                 "print(os.path.dirname(os.path.abspath(cynag.__file__)))"],
                  "importing chainer and cynag in the Chainer environment")
    lines = out.strip().splitlines()
    cynag_dir = os.path.normcase(os.path.realpath(lines[-1]))
    if (cynag_dir == os.path.normcase(os.path.realpath(os.path.join(REPO_ROOT, "cynag")))
            or not cynag_dir.startswith(os.path.normcase(os.path.realpath(d)) + os.sep)):
        raise ChainerEnvError("the Chainer environment imports cynag from %s, not from its "
                              "own site-packages" % lines[-1])
    _progress("chainer %s, numpy %s, cynag from %s" % (lines[-3], lines[-2], lines[-1]))


def ensure_chainer_python(reinstall_cynag=True):
    """Path of an interpreter with chainer 7.8.1 and the current cynag.

    Creates the environment if needed and (re)installs cynag, once per
    process (and once per pytest-xdist run).  Raises :class:`ChainerEnvError`
    with the failing command's output.
    """
    global _cached_python
    if _cached_python is not None:
        return _cached_python
    d, python = _VENV.open()
    with _locked(d):
        if _has_chainer(python):
            _progress("reusing the Chainer %s environment in %s" % (CHAINER_VERSION, d))
        else:
            _create_venv(d, python)
        if reinstall_cynag:
            # pytest-xdist workers of one run share PYTEST_XDIST_TESTRUNUID:
            # the first one installs, the others reuse its installation.
            run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
            stamp = os.path.join(d, _STAMP_NAME)
            done = False
            if run_id:
                try:
                    with open(stamp) as f:
                        done = f.read().strip() == run_id
                except OSError:
                    done = False
            if done:
                _progress("cynag already installed in %s for this test run" % d)
            else:
                _install_cynag(python, d)
                with open(stamp, "w") as f:
                    f.write(run_id or "pid-%d-%f" % (os.getpid(), time.time()))
    _cached_python = python
    return python


if pytest is not None:

    @pytest.fixture(scope="session")
    def chainer_python(request):
        """Session fixture: path of a Python with chainer 7.8.1 and the current cynag.

        Fails with pip's output if the environment cannot be set up, or skips
        when ``CYNAG_SKIP_CHAINER=1``.
        """
        return provide_or_fail(request, _VENV, ensure_chainer_python,
                               "Chainer %s" % CHAINER_VERSION, ENV_SKIP)


if __name__ == "__main__":
    try:
        print(ensure_chainer_python())
    except ChainerEnvError as e:
        sys.stderr.write("%s\n" % e)
        sys.exit(1)


#: Wall-clock limit of one group of parity cases.
GROUP_TIMEOUT_S = 300


def case_group_runner(python, script, out_dir_factory):
    """run(group) -> (results, exit status, output) of one group of cases.

    Runs ``script OUT.json GROUP`` (a cases module whose ``main`` writes
    results as JSON) in ``python`` once per group, caching the result.
    ``out_dir_factory()`` gives a fresh folder for the output.
    """
    import json

    cache = {}

    def run(group):
        if group not in cache:
            out = os.path.join(str(out_dir_factory()), "%s.json" % group)
            try:
                proc = subprocess.run(
                    [python, script, out, group], stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, universal_newlines=True,
                    timeout=GROUP_TIMEOUT_S, env=clean_env({"PYTHONHASHSEED": "0"}),
                    cwd=os.path.dirname(out))
                output, rc = proc.stdout, proc.returncode
            except subprocess.TimeoutExpired as e:
                output, rc = (e.stdout or ""), "timeout after %d s" % GROUP_TIMEOUT_S
                if isinstance(output, bytes):
                    output = output.decode("utf-8", "replace")
            results = None
            if os.path.exists(out):
                with open(out) as f:
                    results = json.load(f)
            cache[group] = (results, rc, output)
        return cache[group]

    return run


def group_runner_fixture(script, tmp_name):
    """A module-scoped ``run_group`` fixture for the cases module ``script``.

    ``run_group(group)`` -> results of that group (run once, in the Chainer
    env, output under a fresh ``tmp_name`` folder); see :func:`case_group_runner`.
    """
    @pytest.fixture(scope="module")
    def run_group(chainer_python, tmp_path_factory):
        """run_group(group) -> results of that group (run once, in the Chainer env)."""
        return case_group_runner(chainer_python, script,
                                 lambda: tmp_path_factory.mktemp(tmp_name))

    return run_group


def check_case(run_group, group, name):
    """Fails the test unless case ``name`` of ``group`` matched Chainer 7.8.1."""
    _, res = case_result(run_group, group, name)
    if not res["ok"]:
        pytest.fail("cynag differs from Chainer 7.8.1 in %s:\n%s" % (name, res["error"]),
                    pytrace=False)


def case_result(run_group, group, name):
    """The result of case ``name``; fails the test if the group produced none."""
    results, rc, output = run_group(group)
    if results is None or name not in results["cases"]:
        pytest.fail("the Chainer subprocess for group %r ended (exit status %s) without a "
                    "result for %s; its output:\n%s" % (group, rc, name, output), pytrace=False)
    return results, results["cases"][name]
