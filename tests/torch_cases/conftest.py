"""The cynag.torch cases: run by tests/test_torch.py in the environment of
tests/torch_env.py (PyTorch, Chainer 7.8.1 and the current cynag)."""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
for _path in (_HERE, os.path.dirname(_HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device and CuPy")
