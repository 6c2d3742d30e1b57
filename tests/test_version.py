"""One version: cynag/_version.py, read by pyproject.toml, cynag.__version__ and show_config()."""
import ast
import importlib.metadata
import io
import os
import re

import pytest

import cynag

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*path):
    with open(os.path.join(ROOT, *path), encoding="utf-8") as f:
        return f.read()


def _static_version():
    """The literal assignment setuptools reads without importing the package."""
    tree = ast.parse(_read("cynag", "_version.py"))
    assigns = [n for n in tree.body if isinstance(n, ast.Assign)]
    assert [[t.id for t in n.targets] for n in assigns] == [["__version__"]], \
        "cynag/_version.py must hold only the assignment of __version__"
    return ast.literal_eval(assigns[0].value)


def test_pyproject_reads_the_version_from_version_py():
    text = _read("pyproject.toml")
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^dynamic = \[[^\]]*"version"', project, re.M), project
    assert not re.search(r"^version\s*=", project, re.M), "a second version in [project]"
    assert re.search(r'^version = \{attr = "cynag\._version\.__version__"\}', text, re.M)


def test_version_agrees_everywhere():
    version = _static_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?", version), version
    assert cynag.__version__ == version
    assert cynag.config()["cynag"] == version
    buf = io.StringIO()
    cynag.show_config(file=buf)
    assert buf.getvalue().splitlines()[0] == "cynag %s" % version
    try:
        installed = importlib.metadata.version("cynag")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("cynag is imported from a source tree without installed metadata")
    assert installed == version, ("the installed metadata says %s, cynag/_version.py %s: "
                                  "reinstall (pip install -e .)" % (installed, version))


def test_changelog_has_the_version():
    changelog = _read("CHANGELOG.md")
    assert re.search(r"^## \[?%s\]?" % re.escape(_static_version()), changelog, re.M)
    assert re.search(r"^## \[?Unreleased\]?", changelog, re.M)
