"""References for the cynag.torch cases: Chainer's NumPy sequence, written out."""
import numpy as np


def chainer_step(p, g, v, lr, m, wd=0.0):
    """Chainer's NesterovAG (and WeightDecay before it) on NumPy arrays, in place.

    ``p``, ``g``, ``v`` float32 or float64; ``g`` is not changed.
    """
    g = g.copy()
    if wd:
        g += wd * p          # chainer.optimizer_hooks.WeightDecay
    v *= m                   # chainer.optimizers.NesterovAG.update_core_cpu
    v -= lr * g
    p += m * m * v
    p -= (1 + m) * lr * g


def half_step(p16, g16, v16, lr, m, wd=0.0):
    """float16/bfloat16 as cynag.torch computes them: in float32, stored rounded
    (arrays of float32 values; the caller rounds)."""
    p, g, v = (x.astype(np.float32) for x in (p16, g16, v16))
    chainer_step(p, g, v, lr, m, wd)
    return p, v
