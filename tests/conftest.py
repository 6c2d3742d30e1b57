"""pytest configuration shared by the test modules.

Makes the helper modules in this directory (``oracle``) importable as
top-level modules when the tests are run from the repository root
(``python -m pytest``) with any import mode.
"""
import os
import sys

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

# Session fixture ``chainer_python``: an interpreter with Chainer 7.8.1 and the
# current cynag (see chainer_env.py), for test_chainer_parity.py.
from chainer_env import chainer_python  # noqa: E402,F401
# ``torch_python``: the same environment with PyTorch added (see torch_env.py).
from torch_env import torch_python  # noqa: E402,F401
# ``release_artifacts``: the sdist and the repaired wheel of tools/build_wheels.sh,
# built once per session (see release_artifacts.py).
from release_artifacts import release_artifacts  # noqa: E402,F401
