"""Parity with real Chainer 7.8.1, in its own virtual environment.

The cases live in ``chainer_parity_cases.py``; they run in the interpreter
given by the ``chainer_python`` fixture (``tests/chainer_env.py``: chainer
7.8.1 and the current cynag, installed once per session), one subprocess per
group of cases, and each case becomes one test here.

Bit-identical: float32/float64 parameters and NesterovAG ``v`` states over
300+ steps (shapes (), (0,), (1, 0, 2), (3, 4, 5), large; C, Fortran,
transposed, strided and negative-stride layouts; Python, int and numpy-scalar
hyperparameters; lr/momentum changed mid-run, per-rule overrides, disabled
and frozen rules, cleared gradients, uninitialized and late parameters) and
``update(lossfun)`` on chainer links; inf/NaN/subnormal/signed-zero values
(NaN payloads aside).  float16, which cynag computes in float32: each step
from a common state is at least as close to exact math as Chainer's or
faithfully rounded, and over 20 free steps its mean/RMS error against a
float64 run is no larger than Chainer's.  Also hook timing/order/errors,
hyperparameter chaining, counters, epochs, deprecation warnings, and
Chainer's link/parameter naming and order.

``CYNAG_CHAINER_VENV`` chooses the environment's location;
``CYNAG_SKIP_CHAINER=1`` skips these tests when it cannot be set up.
"""
import os

import pytest

import chainer_parity_cases
from chainer_env import case_result, check_case, group_runner_fixture, venv_dir

pytestmark = pytest.mark.chainer

_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chainer_parity_cases.py")
_CASES = chainer_parity_cases.case_names()


run_group = group_runner_fixture(_SCRIPT, "chainer-parity")


@pytest.mark.parametrize("group,name", _CASES, ids=[n for _, n in _CASES])
def test_parity(run_group, group, name):
    check_case(run_group, group, name)


def test_environment(run_group):
    """The cases ran against chainer 7.8.1 and the installed (not in-tree) cynag."""
    group, name = _CASES[0]
    results, _ = case_result(run_group, group, name)
    meta = results["meta"]
    assert meta["chainer"] == "7.8.1"
    assert meta["numpy"].split(".")[0] == "1"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cynag_file = os.path.normcase(os.path.realpath(meta["cynag_file"]))
    in_tree = os.path.normcase(os.path.realpath(os.path.join(repo, "cynag", "__init__.py")))
    assert cynag_file != in_tree, meta["cynag_file"]
    venv = os.path.normcase(os.path.realpath(venv_dir()))
    assert cynag_file.startswith(venv + os.sep), (meta["cynag_file"], venv_dir())


def test_every_group_has_cases():
    assert sorted({g for g, _ in _CASES}) == sorted(
        ["float16", "hooks", "hyperparam", "lossfun", "naming", "step", "trajectory"])
    assert len({n for _, n in _CASES}) == len(_CASES)
