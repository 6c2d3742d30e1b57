"""The package as a user gets it: sdist contents, install from the sdist, no-OpenMP build.

These tests take the sdist of the session's release build (tools/build_wheels.sh,
see release_artifacts.py), compare its files with the repository's, install
it into fresh virtual environments (network access to PyPI for the build
requirements), and run a smoke check there, away from the source tree.
"""
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMOKE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import cynag, cynag_kernels
    assert not cynag.__file__.startswith(sys.argv[1]), cynag.__file__
    link = cynag.Link()
    with link.init_scope():
        link.W = cynag.Parameter(np.linspace(-1, 1, 300000, dtype=np.float32))
    opt = cynag.optimizers.NesterovAG(lr=0.01, momentum=0.9).setup(link)
    p, v = link.W.array.copy(), np.zeros_like(link.W.array)
    for step in range(3):
        g = np.cos(np.arange(p.size, dtype=np.float32) * (step + 1))
        link.W.grad = g.copy()
        opt.update()
        v *= 0.9; v -= 0.01 * g; p += 0.9 * 0.9 * v; p -= (1 + 0.9) * 0.01 * g
    assert np.array_equal(p, link.W.array)
    cynag.show_config()
    print(json.dumps({"openmp": cynag_kernels.openmp_enabled(),
                      "threads": cynag.get_num_threads()}))
    """
)


def _clean_env(extra=None):
    """The environment without variables that would import the working tree."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(extra or {})
    return env


def _run(cmd, env=None, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                          env=env or _clean_env(), **kw)
    if proc.returncode != 0:
        pytest.fail("command failed: %s\n--- stdout\n%s\n--- stderr\n%s"
                    % (" ".join(cmd), proc.stdout[-5000:], proc.stderr[-5000:]))
    return proc


@pytest.fixture(scope="module")
def sdist(release_artifacts):
    """The sdist of tools/build_wheels.sh (the session's release build, see release_artifacts.py)."""
    return release_artifacts.sdist


def test_sdist_holds_every_native_source(sdist):
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    kernels_dir = os.path.join(ROOT, "cynag_kernels")
    expected = {"cynag_kernels/" + f for f in os.listdir(kernels_dir)
                if f.endswith((".pyx", ".pxd", ".h", ".cu", ".cuh", ".py"))}
    missing = expected - names
    assert not missing, "sdist lacks %s" % sorted(missing)
    generated = {n for n in names if n.startswith("cynag_kernels/") and n.endswith((".c", ".so"))}
    assert not generated, "sdist ships generated files %s" % sorted(generated)
    for f in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        assert f in names


#: Tracked files that are deliberately not in the sdist (folder prefixes end in "/").
SDIST_EXCLUDED = (".ci/", ".gitignore")
#: Files the sdist adds by itself: its metadata, the egg-info and setuptools' setup.cfg.
SDIST_GENERATED = ("PKG-INFO", "setup.cfg", "cynag.egg-info/")


def _git_files(*args):
    proc = subprocess.run(["git", "ls-files", "-z"] + list(args), capture_output=True,
                          cwd=ROOT, env=_clean_env())
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return {f for f in proc.stdout.decode("utf-8").split("\0") if f}


def _matches(name, prefixes):
    return any(name == p or (p.endswith("/") and name.startswith(p)) for p in prefixes)


def test_sdist_holds_every_tracked_file(sdist):
    """The sdist is the repository: every tracked file, nothing generated, a listed few left out."""
    git = shutil.which("git")
    if git is None or subprocess.run([git, "rev-parse", "--is-inside-work-tree"], cwd=ROOT,
                                     capture_output=True).returncode != 0:
        pytest.skip("not a git checkout: no list of tracked files to compare with")
    tracked = _git_files()
    # Files not committed yet but not ignored either would be committed with the
    # change that makes them; generated files are ignored (.gitignore), so an
    # sdist that ships them still fails.
    untracked = _git_files("--others", "--exclude-standard")
    with tarfile.open(sdist) as tar:
        names = {m.name.split("/", 1)[1] for m in tar.getmembers()
                 if m.isfile() and "/" in m.name}
    missing = {f for f in tracked - names if not _matches(f, SDIST_EXCLUDED)}
    assert not missing, ("tracked files missing from the sdist (add them to MANIFEST.in, or "
                         "to SDIST_EXCLUDED if that is deliberate): %s" % sorted(missing))
    shipped_excluded = {f for f in names & tracked if _matches(f, SDIST_EXCLUDED)}
    assert not shipped_excluded, "sdist ships excluded files %s" % sorted(shipped_excluded)
    extra = {f for f in names - tracked - untracked if not _matches(f, SDIST_GENERATED)}
    assert not extra, "sdist ships files that are not in the repository: %s" % sorted(extra)


def _venv_install(tmp_path, sdist, env=None):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    py = str(venv / ("Scripts" if os.name == "nt" else "bin") / "python")
    _run([py, "-m", "pip", "install", "--no-cache-dir", str(sdist)], env=env)
    return py


@pytest.mark.slow
def test_install_from_sdist_and_run(tmp_path, sdist):
    py = _venv_install(tmp_path, sdist)
    out = _run([py, "-c", SMOKE, ROOT], cwd=str(tmp_path))
    assert "OpenMP:    enabled" in out.stdout
    assert '"openmp": true' in out.stdout


@pytest.mark.slow
def test_build_without_openmp_is_single_threaded_and_correct(tmp_path, sdist):
    env = _clean_env({"CYNAG_DISABLE_OPENMP": "1"})
    py = _venv_install(tmp_path, sdist, env=env)
    out = _run([py, "-c", SMOKE, ROOT], cwd=str(tmp_path))
    assert "OpenMP:    DISABLED" in out.stdout
    assert '"openmp": false, "threads": 1' in out.stdout
