"""cynag: Chainer's NesterovAG optimizer with a fused native update.

Chainer's optimizer API under a new name: port Chainer code by changing
``chainer`` to ``cynag`` in the imports.  A ``chainer.Link`` can be passed to
``setup`` as is.
"""
from cynag._version import __version__

from cynag import optimizer, optimizer_hooks, optimizers, serializer, serializers
from cynag._config import config, show_config
from cynag.link import Chain, ChainList, Link
from cynag.optimizer import GradientMethod, Hyperparameter, Optimizer, UpdateRule
from cynag.parameter import Parameter
from cynag_kernels.threads import (
    get_num_threads,
    get_parallel_threshold,
    set_num_threads,
    set_parallel_threshold,
)

__all__ = [
    "Chain", "ChainList", "GradientMethod", "Hyperparameter", "Link", "Optimizer",
    "Parameter", "UpdateRule", "config", "get_num_threads", "get_parallel_threshold",
    "optimizer", "optimizer_hooks", "optimizers", "serializer", "serializers", "set_num_threads", "set_parallel_threshold", "show_config",
]
