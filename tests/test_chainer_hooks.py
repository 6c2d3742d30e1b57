"""Optimizer hooks: parity with real Chainer 7.8.1.

The cases live in ``chainer_hook_cases.py`` (see its docstring for what each
group covers); like ``test_chainer_parity.py`` they run in the interpreter
given by the ``chainer_python`` fixture (``tests/chainer_env.py``: chainer
7.8.1 and the current cynag, installed once per session), one subprocess per
group, and each case becomes one test here.

``CYNAG_CHAINER_VENV`` chooses the environment's location;
``CYNAG_SKIP_CHAINER=1`` skips these tests when it cannot be set up.
"""
import os

import pytest

import chainer_hook_cases
from chainer_env import check_case, group_runner_fixture

pytestmark = pytest.mark.chainer

_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chainer_hook_cases.py")
_CASES = chainer_hook_cases.case_names()


run_group = group_runner_fixture(_SCRIPT, "chainer-hooks")


@pytest.mark.parametrize("group,name", _CASES, ids=[n for _, n in _CASES])
def test_hook_parity(run_group, group, name):
    check_case(run_group, group, name)


def test_every_group_has_cases():
    assert sorted({g for g, _ in _CASES}) == sorted(
        ["attributes", "edge", "kernels", "link", "trajectories"])
    assert len({n for _, n in _CASES}) == len(_CASES)
    # Every hook alone, in both placements and timings (GradientClipping is an
    # optimizer hook only).
    singles = [n for _, n in _CASES if n.startswith("trajectory_") and "combined" not in n
               and n.count("_") == 3]
    assert len(singles) == 6 * 4 - 2, singles
