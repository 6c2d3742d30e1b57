"""A Python interpreter with Sphinx and the theme, for the documentation tests.

``tests/test_docs.py`` builds the site in ``docs/`` with the requirements of
the ``docs`` extra of ``pyproject.toml``.  They live in a virtual environment
of their own, so the main environment needs none of them.

Location: ``$CYNAG_DOCS_VENV`` if set, else ``<repo>/.docs-venv``
(gitignored).  An existing environment is reused when it was set up for the
same requirements, NumPy version and Python; otherwise it is created (or
completed), about half a minute with network access to PyPI::

    python -m venv DIR
    DIR/bin/python -m pip install <the docs extra> numpy==<the tests' NumPy>

cynag is not built again there: a ``.pth`` file puts the folders from which
the test interpreter imports ``cynag`` and ``cynag_kernels`` (the checkout,
after ``pip install -e .``) at the end of the environment's ``sys.path``, so
the site documents the cynag under test, with its compiled extensions.

If the environment cannot be set up, the tests that need it fail with pip's
output -- unless ``CYNAG_SKIP_DOCS=1`` is set, in which case they are skipped
with the reason.

Command line: ``python tests/docs_env.py`` creates/updates the environment and
prints the interpreter's path.
"""
import json
import os
import re
import sys

from venv_tools import REPO_ROOT, EnvError, Venv, provide_or_fail

try:
    import pytest
except ImportError:  # pragma: no cover - command-line use without pytest
    pytest = None

__all__ = ["DocsEnvError", "docs_requirements", "ensure_docs_python", "venv_dir",
           "venv_python"]

ENV_VENV = "CYNAG_DOCS_VENV"
ENV_SKIP = "CYNAG_SKIP_DOCS"
PIP_TIMEOUT_S = 900

_STAMP_NAME = ".cynag-docs-stamp"
_PTH_NAME = "cynag-under-test.pth"
_cached_python = None


class DocsEnvError(EnvError):
    """The documentation environment could not be set up."""


_VENV = Venv("docs-env", ENV_VENV, ".docs-venv", DocsEnvError,
             private_files=(_STAMP_NAME,))
venv_dir, venv_python = _VENV.dir, _VENV.python


def docs_requirements():
    """The requirement strings of the ``docs`` extra in ``pyproject.toml``."""
    with open(os.path.join(REPO_ROOT, "pyproject.toml")) as f:
        text = f.read()
    m = re.search(r"^docs\s*=\s*\[([^\]]*)\]", text, re.M)
    if m is None:
        raise DocsEnvError("pyproject.toml has no 'docs' extra")
    reqs = re.findall(r'"([^"]+)"', m.group(1))
    if not reqs:
        raise DocsEnvError("the 'docs' extra of pyproject.toml is empty")
    return reqs


def _wanted():
    import numpy

    return {"requirements": docs_requirements() + ["numpy==%s" % numpy.__version__],
            "python": sys.version.split()[0]}


def _stamp_ok(d, wanted):
    try:
        with open(os.path.join(d, _STAMP_NAME)) as f:
            return json.load(f) == wanted
    except (OSError, ValueError):
        return False


def _site_packages(python):
    out, _ = _VENV.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       "locating site-packages", 120)
    return out.strip().splitlines()[-1]


def _cynag_dirs():
    """Folders from which this interpreter imports cynag and cynag_kernels."""
    import cynag
    import cynag_kernels

    dirs = []
    for mod in (cynag, cynag_kernels):
        d = os.path.dirname(os.path.dirname(os.path.abspath(mod.__file__)))
        if d not in dirs:
            dirs.append(d)
    return dirs


def ensure_docs_python():
    """Path of an interpreter with the docs requirements that imports the cynag under test."""
    global _cached_python
    if _cached_python is not None:
        return _cached_python
    d, python = _VENV.open()
    wanted = _wanted()
    with _VENV.locked(d):
        if _stamp_ok(d, wanted) and _VENV.python_ok(python, "import sphinx, myst_parser, numpy"):
            _VENV.progress("reusing the documentation environment in %s" % d)
        else:
            _VENV.check_target_dir(d)
            _VENV.progress("setting up the documentation environment in %s (about half a "
                           "minute; needs network access to PyPI) ..." % d)
            if not _VENV.python_ok(python, "import pip"):
                _VENV.run([sys.executable, "-m", "venv", d], "creating the virtual environment",
                          PIP_TIMEOUT_S)
            _, dt = _VENV.run([python, "-m", "pip", "install"] + wanted["requirements"],
                              "installing %s" % " ".join(wanted["requirements"]), PIP_TIMEOUT_S)
            with open(os.path.join(d, _STAMP_NAME), "w") as f:
                json.dump(wanted, f)
            _VENV.progress("  ... done (%.0f s)" % dt)
        with open(os.path.join(_site_packages(python), _PTH_NAME), "w") as f:
            f.write("".join(p + "\n" for p in _cynag_dirs()))
    import cynag

    out, _ = _VENV.run([python, "-c", "import os, cynag, cynag_kernels; "
                                      "print(os.path.realpath(cynag.__file__))"],
                       "importing cynag in the documentation environment", 120)
    if out.strip().splitlines()[-1] != os.path.realpath(cynag.__file__):
        raise DocsEnvError("the documentation environment imports cynag from %s, not %s"
                           % (out.strip(), cynag.__file__))
    _cached_python = python
    return python


if pytest is not None:

    @pytest.fixture(scope="session")
    def docs_python(request):
        """Session fixture: a Python with the docs requirements and the cynag under test."""
        return provide_or_fail(request, _VENV, ensure_docs_python, "documentation", ENV_SKIP)


if __name__ == "__main__":
    try:
        print(ensure_docs_python())
    except DocsEnvError as e:
        sys.stderr.write("%s\n" % e)
        sys.exit(1)
