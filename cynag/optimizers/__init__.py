"""Optimizers: :class:`NesterovAG` and its update rule."""
from cynag.optimizers.nesterov_ag import NesterovAG, NesterovAGRule

__all__ = ["NesterovAG", "NesterovAGRule"]
