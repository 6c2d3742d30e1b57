"""Checkpoints, fp32 master copies and loss scaling: parity with real Chainer 7.8.1.

The cases live in ``chainer_checkpoint_cases.py`` (see its docstring for what
each group covers); like ``test_chainer_parity.py`` they run in the
interpreter given by the ``chainer_python`` fixture (``tests/chainer_env.py``:
chainer 7.8.1 and the current cynag, installed once per session), one
subprocess per group, and each case becomes one test here.

``CYNAG_CHAINER_VENV`` chooses the environment's location;
``CYNAG_SKIP_CHAINER=1`` skips these tests when it cannot be set up.
"""
import json
import os
import subprocess

import pytest

import chainer_checkpoint_cases
from chainer_env import clean_env

pytestmark = pytest.mark.chainer

_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                       "chainer_checkpoint_cases.py")
#: Wall-clock limit of one group of cases.
GROUP_TIMEOUT_S = 300

_CASES = chainer_checkpoint_cases.case_names()


@pytest.fixture(scope="module")
def run_group(chainer_python, tmp_path_factory):
    """run_group(group) -> results of that group (run once, in the Chainer env)."""
    cache = {}

    def run(group):
        if group not in cache:
            out = tmp_path_factory.mktemp("chainer-checkpoint") / ("%s.json" % group)
            try:
                proc = subprocess.run(
                    [chainer_python, _SCRIPT, str(out), group], stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, universal_newlines=True,
                    timeout=GROUP_TIMEOUT_S, env=clean_env({"PYTHONHASHSEED": "0"}),
                    cwd=str(out.parent))
                output, rc = proc.stdout, proc.returncode
            except subprocess.TimeoutExpired as e:
                output, rc = (e.stdout or ""), "timeout after %d s" % GROUP_TIMEOUT_S
                if isinstance(output, bytes):
                    output = output.decode("utf-8", "replace")
            results = None
            if out.exists():
                with open(str(out)) as f:
                    results = json.load(f)
            cache[group] = (results, rc, output)
        return cache[group]

    return run


@pytest.mark.parametrize("group,name", _CASES, ids=[n for _, n in _CASES])
def test_checkpoint_parity(run_group, group, name):
    results, rc, output = run_group(group)
    if results is None or name not in results["cases"]:
        pytest.fail("the Chainer subprocess for group %r ended (exit status %s) without a "
                    "result for %s; its output:\n%s" % (group, rc, name, output), pytrace=False)
    res = results["cases"][name]
    if not res["ok"]:
        pytest.fail("cynag differs from Chainer 7.8.1 in %s:\n%s" % (name, res["error"]),
                    pytrace=False)


def test_every_group_has_cases():
    assert sorted({g for g, _ in _CASES}) == sorted(
        ["checkpoint", "fp32", "interop", "loss_scaling", "pickle"])
    assert len({n for _, n in _CASES}) == len(_CASES)
