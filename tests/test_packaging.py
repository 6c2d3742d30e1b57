"""The package as a user gets it: sdist contents, install from the sdist, no-OpenMP build.

These tests build an sdist of the checkout, install it into fresh virtual
environments (network access to PyPI for the build requirements), and run a
smoke check there, away from the source tree.
"""
import os
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
def sdist(tmp_path_factory):
    out = tmp_path_factory.mktemp("sdist")
    _run([sys.executable, "-m", "build", "--sdist", "--outdir", str(out), ROOT])
    (path,) = out.glob("cynag-*.tar.gz")
    return path


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
