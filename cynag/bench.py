"""Benchmark of one NesterovAG step on the CPU: ``python -m cynag.bench``.

Times, in one process, with the variants interleaved inside each round and
medians over rounds, one optimizer step on several parameter sets:

* ``big``      -- one tensor of 2**24 elements;
* ``small``    -- 2000 tensors of 64 elements;
* ``medium``   -- 1000 tensors of 1000 elements;
* ``resnet50`` -- the 161 parameter shapes of ResNet-50 (25,557,032 elements);

Every case first runs as training does (``run_user_case``): before each step
the parameters get new gradient arrays (``cleargrads()`` and a copy of each
gradient, outside the timed region), and only ``update()`` is timed:
``cynag update() on chainer.Link`` (when Chainer imports), ``chainer update()
on chainer.Link``, ``cynag update() on cynag.Link``, ``torch fused SGD`` (new
gradient tensors every step), and the Python floor of each kind of link
(``list(link.params())`` and every ``.grad`` read).

Then the same step with the same gradient arrays every step (idealized), with
these variants, each at every requested thread count where it has one:

* ``probe 3R+2W``      -- a C memory-bandwidth probe with NesterovAG's traffic
  (read three arrays, write two) over the same tensors: the reference;
* ``C loop``           -- NesterovAG written by hand in C over all the tensors
  in one OpenMP region (``cynag_kernels._probe``);
* ``cynag kernel``     -- the multi-tensor native call of
  ``cynag_kernels.multi_tensor`` (skipped with a note where missing);
* ``cynag contiguous`` -- ``opt.setup(link, contiguous=True)`` then
  ``opt.update()`` (skipped with a note where ``setup`` lacks it);
* ``cynag update()``   -- ``NesterovAG(lr=0.01, momentum=0.9).setup(link)``
  then ``opt.update()``;
* ``numpy``            -- Chainer's four in-place numpy operations per tensor;
* ``chainer update()`` -- Chainer's own optimizer, when ``import chainer`` works;
* ``torch fused``      -- ``torch.optim.SGD(..., nesterov=True, fused=True)``
  on CPU tensors, when ``import torch`` works.

``--cases resnet50-hooks`` (not run by default) times a step with optimizer
hooks on the ResNet-50 shapes: ``NesterovAG`` + ``WeightDecay(5e-4)`` +
``GradientClipping(1.0)`` registered in that order (as Chainer's examples do:
cynag folds the clipping into its update pass) and in the other order (both
hooks folded), each as ``cynag update()`` (multi-tensor, folding where it
applies), ``cynag per-param`` (``use_multi_tensor(False)``) and
``chainer update()`` with Chainer's hooks; every step first copies the
gradients back (the hooks change them in place), a copy also timed alone.

It then reports where the time of ``update()`` goes (its cost over the native
call, per tensor) and measures one tensor of 2**12 .. 2**22 elements with one
and with several threads to recommend ``CYNAG_NUM_THREADS`` and
``CYNAG_PARALLEL_THRESHOLD`` for this machine.  A benchmark, not a test: it
exits 0 whatever it measures.

``--e2e`` times Chainer's training loop (``StandardUpdater``) with Chainer's
and cynag's optimizer instead, each run in its own process: see
``cynag/bench_e2e.py``.
"""
import argparse
import cProfile
import datetime
import functools
import gc
import json
import math
import os
import platform
import pstats
import statistics
import sys
import time
import warnings

import numpy

import cynag
import cynag_kernels
from cynag import bench_e2e
from cynag_kernels import threads as _threads

LR = 0.01
MOMENTUM = 0.9
#: Memory accesses per element of one step: read param, grad, v; write param, v.
ACCESSES = 5
#: A multi-thread run must be this much faster to count as a win (10%).
THREAD_WIN = 1.10
NOISY_IQR_PCT = 25.0
#: CPUs kept busy by other processes above which a block of timings is flagged.
OTHER_LOAD_WARN = 0.25
PROBE_SCALE = 2.0 ** -20

#: ResNet-50's parameter shapes, in torchvision's order (161 arrays, 25,557,032
#: elements).  Convolutions (out, in, kh, kw) have no bias; each batch
#: normalization has gamma and beta.  A bottleneck is conv1 1x1, bn1, conv2 3x3,
#: bn2, conv3 1x1, bn3; the first of each layer also has a downsample conv and bn.
RESNET50_SHAPES = [
    # stem: conv1 (7x7), bn1 gamma, beta
    (64, 3, 7, 7), (64,), (64,),
    # layer1: 3 bottlenecks, 64 -> 64 -> 256
    (64, 64, 1, 1), (64,), (64,), (64, 64, 3, 3), (64,), (64,),
    (256, 64, 1, 1), (256,), (256,),
    # downsample: conv 1x1, bn
    (256, 64, 1, 1), (256,), (256,),
    (64, 256, 1, 1), (64,), (64,), (64, 64, 3, 3), (64,), (64,),
    (256, 64, 1, 1), (256,), (256,),
    (64, 256, 1, 1), (64,), (64,), (64, 64, 3, 3), (64,), (64,),
    (256, 64, 1, 1), (256,), (256,),
    # layer2: 4 bottlenecks, 256 -> 128 -> 512
    (128, 256, 1, 1), (128,), (128,), (128, 128, 3, 3), (128,), (128,),
    (512, 128, 1, 1), (512,), (512,),
    # downsample: conv 1x1, bn
    (512, 256, 1, 1), (512,), (512,),
    (128, 512, 1, 1), (128,), (128,), (128, 128, 3, 3), (128,), (128,),
    (512, 128, 1, 1), (512,), (512,),
    (128, 512, 1, 1), (128,), (128,), (128, 128, 3, 3), (128,), (128,),
    (512, 128, 1, 1), (512,), (512,),
    (128, 512, 1, 1), (128,), (128,), (128, 128, 3, 3), (128,), (128,),
    (512, 128, 1, 1), (512,), (512,),
    # layer3: 6 bottlenecks, 512 -> 256 -> 1024
    (256, 512, 1, 1), (256,), (256,), (256, 256, 3, 3), (256,), (256,),
    (1024, 256, 1, 1), (1024,), (1024,),
    # downsample: conv 1x1, bn
    (1024, 512, 1, 1), (1024,), (1024,),
    (256, 1024, 1, 1), (256,), (256,), (256, 256, 3, 3), (256,), (256,),
    (1024, 256, 1, 1), (1024,), (1024,),
    (256, 1024, 1, 1), (256,), (256,), (256, 256, 3, 3), (256,), (256,),
    (1024, 256, 1, 1), (1024,), (1024,),
    (256, 1024, 1, 1), (256,), (256,), (256, 256, 3, 3), (256,), (256,),
    (1024, 256, 1, 1), (1024,), (1024,),
    (256, 1024, 1, 1), (256,), (256,), (256, 256, 3, 3), (256,), (256,),
    (1024, 256, 1, 1), (1024,), (1024,),
    (256, 1024, 1, 1), (256,), (256,), (256, 256, 3, 3), (256,), (256,),
    (1024, 256, 1, 1), (1024,), (1024,),
    # layer4: 3 bottlenecks, 1024 -> 512 -> 2048
    (512, 1024, 1, 1), (512,), (512,), (512, 512, 3, 3), (512,), (512,),
    (2048, 512, 1, 1), (2048,), (2048,),
    # downsample: conv 1x1, bn
    (2048, 1024, 1, 1), (2048,), (2048,),
    (512, 2048, 1, 1), (512,), (512,), (512, 512, 3, 3), (512,), (512,),
    (2048, 512, 1, 1), (2048,), (2048,),
    (512, 2048, 1, 1), (512,), (512,), (512, 512, 3, 3), (512,), (512,),
    (2048, 512, 1, 1), (2048,), (2048,),
    # fc: W (out, in), b
    (1000, 2048), (1000,),
]

#: name -> (description, list of shapes).  Run in this order.
CASES = {
    "big": ("1 tensor of 2**24", [(2 ** 24,)]),
    "small": ("2000 tensors of 64", [(64,)] * 2000),
    "medium": ("1000 tensors of 1000", [(1000,)] * 1000),
    "resnet50": ("ResNet-50's 161 parameters", RESNET50_SHAPES),
}
#: Cases run when --cases is not given.
DEFAULT_CASES = list(CASES)

#: Cases of an optimizer step with hooks: their own variants and table (see
#: run_hook_case); not in the default run.
HOOK_CASES = {
    "resnet50-hooks": ("ResNet-50's 161 parameters, NesterovAG + WeightDecay(5e-4) + "
                       "GradientClipping(1.0)", RESNET50_SHAPES),
}
CASES.update(HOOK_CASES)
HOOK_WEIGHT_DECAY = 5e-4
HOOK_CLIP_THRESHOLD = 1.0
#: Registration orders of the hooks: Chainer's examples add WeightDecay, then
#: GradientClipping (cynag folds the clipping into its pass, not the decay
#: before it); the other order lets cynag fold both.
HOOK_ORDERS = [("wd,clip", ("WeightDecay", "GradientClipping")),
               ("clip,wd", ("GradientClipping", "WeightDecay"))]

#: Variant keys, in the order of the tables.
VARIANTS = [
    ("probe", "probe 3R+2W"),
    ("c_loop", "C loop"),
    ("cynag_kernel", "cynag kernel"),
    ("cynag_contiguous", "cynag contiguous"),
    ("cynag_update", "cynag update()"),
    ("numpy", "numpy"),
    ("chainer_update", "chainer update()"),
    ("torch_fused", "torch fused"),
]
LABELS = dict(VARIANTS)

#: Sizes (elements of one tensor) of the thread sweep.
SWEEP_SIZES = [2 ** k for k in range(12, 23)]


# ---------------------------------------------------------------------------
# Progress and formatting
# ---------------------------------------------------------------------------
_TTY = sys.stderr.isatty()


def progress(msg, final=False):
    """Progress on stderr (rewritten in place on a terminal)."""
    if _TTY:
        sys.stderr.write("\r\033[K" + msg + ("\n" if final else ""))
    else:
        sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def fmt_time(s):
    """Seconds with a unit, about 3 significant digits."""
    if s is None:
        return "-"
    for unit, f in (("s", 1.0), ("ms", 1e3), ("us", 1e6), ("ns", 1e9)):
        v = s * f
        if abs(v) >= 1 or unit == "ns":
            a = abs(v)
            return ("%.0f %s" if a >= 100 else "%.1f %s" if a >= 10 else "%.2f %s") % (v, unit)


def sig(x, suffix="", none="-"):
    """About 3 significant digits."""
    if x is None:
        return none
    if abs(x) >= 100:
        return "%.0f%s" % (x, suffix)
    if abs(x) >= 10:
        return "%.1f%s" % (x, suffix)
    if abs(x) >= 0.01:
        return "%.2f%s" % (x, suffix)
    return "%.1e%s" % (x, suffix)


# ---------------------------------------------------------------------------
# Optional peers
# ---------------------------------------------------------------------------
def import_chainer():
    """(chainer, None) or (None, why not)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import chainer
            import chainer.optimizers  # noqa: F401
    except Exception as e:
        return None, "not importable in %s (%s: %s)" % (sys.executable, type(e).__name__, e)
    return chainer, None


def import_torch():
    """(torch, None) or (None, why not)."""
    try:
        import torch
    except Exception as e:
        return None, "not importable in %s (%s: %s)" % (sys.executable, type(e).__name__, e)
    return torch, None


def import_probe():
    """(cynag_kernels._probe, None) or (None, why not)."""
    try:
        from cynag_kernels import _probe
    except ImportError as e:
        return None, "cynag_kernels._probe is not built (%s); rebuild cynag" % e
    return _probe, None


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------
def case_shapes(name, scale):
    """Shapes of a case; with ``scale`` != 1 every tensor is 1-d of size*scale (>= 1)."""
    shapes = CASES[name][1]
    if scale == 1:
        return list(shapes)
    return [(max(1, int(round(math.prod(s) * scale))),) for s in shapes]


def make_params(shapes, dtype, seed):
    """param ~ U(-1, 1) per tensor, each its own allocation."""
    rng = numpy.random.default_rng(seed)
    return [rng.uniform(-1.0, 1.0, s).astype(dtype) for s in shapes]


def make_grads(shapes, dtype, seed):
    """Gradients of magnitude in [0.005, 0.01] with a random sign.

    Small and away from zero, so that thousands of steps neither overflow nor
    produce subnormals (which would time the FPU's slow path)."""
    rng = numpy.random.default_rng(seed)
    out = []
    for s in shapes:
        g = rng.choice([-1.0, 1.0], s) * rng.uniform(0.005, 0.01, s)
        g = g.astype(dtype)
        g.flags.writeable = False
        out.append(g)
    return out


def touched_zeros(like):
    """Zeros whose pages are mapped (numpy.zeros maps the shared zero page lazily)."""
    out = []
    for a in like:
        z = numpy.empty_like(a)
        z.fill(0)
        out.append(z)
    return out


class Skip(Exception):
    """A variant that cannot run here; the message says why."""


# ---------------------------------------------------------------------------
# Variants: each builder returns ({threads: (prepare, step)}, what to keep
# alive, a note for its rows), over its own params and state (the gradients
# are shared and read-only), or raises Skip.
# ---------------------------------------------------------------------------
def _noop():
    pass


class Env:
    """What the run found importable, and the settings."""


def _set_threads(K, t):
    def prepare():
        K.set_num_threads(t)
    return prepare


def build_probe(env, shapes, dtype, grads, thread_counts):
    if env.probe is None:
        raise Skip(env.probe_note)
    a = [numpy.full(s, 1.0, dtype) for s in shapes]
    b = [numpy.full(s, -1.0, dtype) for s in shapes]
    table = env.probe.TriadTable(a, b, grads, PROBE_SCALE)
    return {t: (_noop, functools.partial(table.run, t)) for t in thread_counts}, table, ""


def build_c_loop(env, shapes, dtype, grads, thread_counts):
    if env.probe is None:
        raise Skip(env.probe_note)
    params = make_params(shapes, dtype, seed=1)
    table = env.probe.NesterovTable(params, grads, touched_zeros(params), LR, MOMENTUM)
    return {t: (_noop, functools.partial(table.run, t)) for t in thread_counts}, table, ""


def build_cynag_kernel(env, shapes, dtype, grads, thread_counts):
    try:
        from cynag_kernels import multi_tensor
        multi_tensor.CPUTable
    except (ImportError, AttributeError) as e:
        raise Skip("cynag_kernels.multi_tensor.CPUTable is not available in this cynag (%s)"
                   % e) from None
    params = make_params(shapes, dtype, seed=1)
    try:
        table = multi_tensor.CPUTable(params, grads, touched_zeros(params), LR, MOMENTUM)
        table.run()
    except Exception as e:
        raise Skip("multi_tensor.CPUTable failed here (%s: %s)" % (type(e).__name__, e)) from None
    return {t: (_set_threads(env.K, t), table.run) for t in thread_counts}, table, ""


def _cynag_link(shapes, dtype, grads):
    link = cynag.Link()
    params = make_params(shapes, dtype, seed=1)
    with link.init_scope():
        for i, p in enumerate(params):
            setattr(link, "p%04d" % i, cynag.Parameter(p))
    for i, g in enumerate(grads):
        getattr(link, "p%04d" % i).grad = g
    return link


def build_cynag_update(env, shapes, dtype, grads, thread_counts):
    link = _cynag_link(shapes, dtype, grads)
    opt = cynag.optimizers.NesterovAG(lr=LR, momentum=MOMENTUM).setup(link)
    opt.update()
    return {t: (_set_threads(env.K, t), opt.update) for t in thread_counts}, (link, opt), ""


def build_cynag_contiguous(env, shapes, dtype, grads, thread_counts):
    link = _cynag_link(shapes, dtype, grads)
    opt = cynag.optimizers.NesterovAG(lr=LR, momentum=MOMENTUM)
    try:
        opt.setup(link, contiguous=True)
    except TypeError as e:
        if "contiguous" in str(e):
            raise Skip("setup() does not accept contiguous= in this cynag") from None
        raise
    opt.update()
    return {t: (_set_threads(env.K, t), opt.update) for t in thread_counts}, (link, opt), ""


def build_numpy(env, shapes, dtype, grads, thread_counts):
    params = make_params(shapes, dtype, seed=1)
    triples = list(zip(params, grads, touched_zeros(params)))
    lr, m = LR, MOMENTUM

    def step():
        # Chainer 7.8.1's NesterovAGRule.update_core_cpu, once per tensor.
        for p, g, v in triples:
            v *= m
            v -= lr * g
            p += m * m * v
            p -= (1 + m) * lr * g
    return {1: (_noop, step)}, triples, ""


def build_chainer_update(env, shapes, dtype, grads, thread_counts):
    chainer = env.chainer
    if chainer is None:
        raise Skip("chainer " + env.chainer_note)
    link = chainer.Link()
    params = make_params(shapes, dtype, seed=1)
    with link.init_scope():
        for i, p in enumerate(params):
            setattr(link, "p%04d" % i, chainer.Parameter(p))
    for i, g in enumerate(grads):
        getattr(link, "p%04d" % i).grad = g
    opt = chainer.optimizers.NesterovAG(lr=LR, momentum=MOMENTUM)
    opt.setup(link)
    opt.update()
    return {1: (_noop, opt.update)}, (link, opt), ""


def build_torch_fused(env, shapes, dtype, grads, thread_counts, weight_decay=0.0):
    torch = env.torch
    if torch is None:
        raise Skip("torch " + env.torch_note)
    params = [torch.from_numpy(p) for p in make_params(shapes, dtype, seed=1)]
    for p, g in zip(params, grads):
        p.grad = torch.from_numpy(numpy.array(g))   # torch wants a writeable array
    note = ""
    try:
        opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, nesterov=True, fused=True,
                              weight_decay=weight_decay)
        opt.step()
    except Exception as e:
        note = "fused=True unsupported on CPU here (%s); ran foreach=True" % (
            str(e).splitlines()[0] if str(e) else type(e).__name__)
        opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, nesterov=True, foreach=True,
                              weight_decay=weight_decay)
        opt.step()

    def set_torch_threads(t):
        def prepare():
            torch.set_num_threads(t)
        return prepare
    return {t: (set_torch_threads(t), opt.step) for t in thread_counts}, (params, opt), note


BUILDERS = {
    "probe": build_probe,
    "c_loop": build_c_loop,
    "cynag_kernel": build_cynag_kernel,
    "cynag_contiguous": build_cynag_contiguous,
    "cynag_update": build_cynag_update,
    "numpy": build_numpy,
    "chainer_update": build_chainer_update,
    "torch_fused": build_torch_fused,
}


# ---------------------------------------------------------------------------
# What users run: new gradient arrays at every step.  A training step's
# backward pass allocates new gradients, and a Chainer user keeps the model a
# chainer.Link.  Each builder returns ({threads: (prepare, step)}, what to keep
# alive, a note, fresh): fresh() gives the parameters new gradient arrays (a
# copy of the shared read-only ones) before every step, outside the timed
# region.  The floors time what any optimizer must do on that link: list its
# parameters and read every gradient.
# ---------------------------------------------------------------------------
#: Variant keys of the user-path table, in its order.
USER_VARIANTS = [
    ("cynag_on_chainer", "cynag update() on chainer.Link"),
    ("chainer_update", "chainer update() on chainer.Link"),
    ("cynag_on_cynag", "cynag update() on cynag.Link"),
    ("torch_fused", "torch fused SGD"),
    ("cynag_torch", "cynag.torch NesterovAG"),
    ("torch_fused_wd", "torch fused SGD, weight decay"),
    ("cynag_torch_wd", "cynag.torch, weight decay"),
    ("floor_chainer", "Python floor, chainer.Link"),
    ("floor_cynag", "Python floor, cynag.Link"),
    ("floor_torch", "Python floor, torch"),
]
#: The rows of ``--torch``.
TORCH_VARIANTS = ("torch_fused", "cynag_torch", "torch_fused_wd", "cynag_torch_wd",
                  "floor_torch")
USER_LABELS = dict(USER_VARIANTS)
#: The floor each optimizer row is measured against.
FLOOR_OF = {"cynag_on_chainer": "floor_chainer", "chainer_update": "floor_chainer",
            "cynag_on_cynag": "floor_cynag", "cynag_torch": "floor_torch",
            "torch_fused": "floor_torch", "cynag_torch_wd": "floor_torch",
            "torch_fused_wd": "floor_torch"}
#: The PyTorch row each row's "vs torch" is measured against (else torch_fused):
#: with weight decay (PyTorch's weight_decay, HOOK_WEIGHT_DECAY) on both sides.
TORCH_PEER_OF = {"cynag_torch_wd": "torch_fused_wd", "torch_fused_wd": "torch_fused_wd"}


def _fill_link(link, parameter, shapes, dtype):
    with link.init_scope():
        for i, p in enumerate(make_params(shapes, dtype, seed=1)):
            setattr(link, "p%04d" % i, parameter(p))
    return [getattr(link, "p%04d" % i) for i in range(len(shapes))]


def _fresh_grads(link, params, grads):
    """fresh(): cleargrads(), then a new copy of every gradient (as backward allocates them)."""
    def fresh():
        link.cleargrads()
        for p, g in zip(params, grads):
            p.grad = g.copy()
    return fresh


def _floor(link):
    def step():
        return [p.grad for p in list(link.params())]
    return step


def _user_link(env, kind, shapes, dtype, grads):
    if kind == "chainer":
        if env.chainer is None:
            raise Skip("chainer " + env.chainer_note)
        link = env.chainer.Link()
        params = _fill_link(link, env.chainer.Parameter, shapes, dtype)
    else:
        link = cynag.Link()
        params = _fill_link(link, cynag.Parameter, shapes, dtype)
    fresh = _fresh_grads(link, params, grads)
    fresh()
    return link, fresh


def _build_user_cynag(env, kind, shapes, dtype, grads, thread_counts):
    link, fresh = _user_link(env, kind, shapes, dtype, grads)
    opt = cynag.optimizers.NesterovAG(lr=LR, momentum=MOMENTUM).setup(link)
    opt.update()
    return ({t: (_set_threads(env.K, t), opt.update) for t in thread_counts}, (link, opt), "",
            fresh)


def build_user_cynag_on_chainer(env, shapes, dtype, grads, thread_counts):
    return _build_user_cynag(env, "chainer", shapes, dtype, grads, thread_counts)


def build_user_cynag_on_cynag(env, shapes, dtype, grads, thread_counts):
    return _build_user_cynag(env, "cynag", shapes, dtype, grads, thread_counts)


def build_user_chainer_update(env, shapes, dtype, grads, thread_counts):
    link, fresh = _user_link(env, "chainer", shapes, dtype, grads)
    opt = env.chainer.optimizers.NesterovAG(lr=LR, momentum=MOMENTUM)
    opt.setup(link)
    opt.update()
    return {1: (_noop, opt.update)}, (link, opt), "", fresh


def build_user_torch_fused(env, shapes, dtype, grads, thread_counts, weight_decay=0.0):
    steps, (params, opt), note = build_torch_fused(env, shapes, dtype, grads, thread_counts,
                                                   weight_decay)
    sources = [p.grad for p in params]
    return steps, (params, opt, sources), note, _torch_fresh(opt, params, sources)


def build_user_torch_fused_wd(env, shapes, dtype, grads, thread_counts):
    return build_user_torch_fused(env, shapes, dtype, grads, thread_counts, HOOK_WEIGHT_DECAY)


def _torch_fresh(opt, params, sources):
    """fresh(): zero_grad(), then a new copy of every gradient (as backward allocates them)."""
    def fresh():
        opt.zero_grad(set_to_none=True)
        for p, g in zip(params, sources):
            p.grad = g.clone()
    return fresh


def _torch_params(env, shapes, dtype):
    if env.torch is None:
        raise Skip("torch " + env.torch_note)
    return [env.torch.nn.Parameter(env.torch.from_numpy(p))
            for p in make_params(shapes, dtype, seed=1)]


def build_user_cynag_torch(env, shapes, dtype, grads, thread_counts, weight_decay=0.0):
    """cynag.torch.NesterovAG on the same tensors as torch fused, new gradients every step."""
    params = _torch_params(env, shapes, dtype)
    torch = env.torch
    import cynag.torch as cynag_torch

    sources = [torch.from_numpy(numpy.array(g)) for g in grads]
    opt = cynag_torch.NesterovAG(params, lr=LR, momentum=MOMENTUM, weight_decay=weight_decay)
    fresh = _torch_fresh(opt, params, sources)
    fresh()
    opt.step()
    # Time the reader a run steps with once its first steps are done: a first
    # run of CYNAG_TORCH_NATIVE=background builds it meanwhile.
    from cynag import _torch_native

    _torch_native.wait()
    reader = cynag_torch.native_status()
    note = "" if reader.startswith("native") else reader

    def prepare_for(t):
        def prepare():
            env.K.set_num_threads(t)
            torch.set_num_threads(t)
        return prepare
    return ({t: (prepare_for(t), opt.step) for t in thread_counts}, (params, opt, sources),
            note, fresh)


def build_user_cynag_torch_wd(env, shapes, dtype, grads, thread_counts):
    return build_user_cynag_torch(env, shapes, dtype, grads, thread_counts, HOOK_WEIGHT_DECAY)


def build_user_floor_torch(env, shapes, dtype, grads, thread_counts):
    params = _torch_params(env, shapes, dtype)
    for p, g in zip(params, grads):
        p.grad = env.torch.from_numpy(numpy.array(g))

    def step():
        return [p.grad for p in params]
    return {1: (_noop, step)}, params, "every p.grad of the parameter list", None


def build_user_floor_chainer(env, shapes, dtype, grads, thread_counts):
    link, _ = _user_link(env, "chainer", shapes, dtype, grads)
    return {1: (_noop, _floor(link))}, link, "list(link.params()) + every .grad", None


def build_user_floor_cynag(env, shapes, dtype, grads, thread_counts):
    link, _ = _user_link(env, "cynag", shapes, dtype, grads)
    return {1: (_noop, _floor(link))}, link, "list(link.params()) + every .grad", None


USER_BUILDERS = {
    "cynag_on_chainer": build_user_cynag_on_chainer,
    "chainer_update": build_user_chainer_update,
    "cynag_on_cynag": build_user_cynag_on_cynag,
    "torch_fused": build_user_torch_fused,
    "cynag_torch": build_user_cynag_torch,
    "torch_fused_wd": build_user_torch_fused_wd,
    "cynag_torch_wd": build_user_cynag_torch_wd,
    "floor_chainer": build_user_floor_chainer,
    "floor_cynag": build_user_floor_cynag,
    "floor_torch": build_user_floor_torch,
}


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------
class Series:
    """Samples of one (variant, threads).

    ``fresh``, when given, runs before every call of ``step`` outside the
    timed region (it gives the parameters new gradient arrays)."""

    def __init__(self, key, threads, prepare, step, note="", fresh=None, labels=None):
        self.key, self.threads = key, threads
        self.prepare, self.step = prepare, step
        self.note = note
        self.fresh = fresh
        self.labels = LABELS if labels is None else labels
        self.reps = 1
        self.samples = []

    @property
    def label(self):
        return self.labels.get(self.key, self.key)

    @property
    def median(self):
        return statistics.median(self.samples)


def timed(step, reps, fresh=None):
    """Mean seconds of one call of ``step``; ``fresh()`` before each call, not timed."""
    if fresh is None:
        t0 = time.perf_counter()
        for _ in range(reps):
            step()
        return (time.perf_counter() - t0) / reps
    total = 0.0
    for _ in range(reps):
        fresh()
        t0 = time.perf_counter()
        step()
        total += time.perf_counter() - t0
    return total / reps


def calibrate(series, warmup, min_sample_s):
    """Warm up, then choose calls per sample so that a sample lasts min_sample_s."""
    series.prepare()
    for _ in range(warmup):
        if series.fresh is not None:
            series.fresh()
        series.step()
    t1 = min(timed(series.step, 1, series.fresh) for _ in range(3))
    series.reps = int(max(1, min(1_000_000, math.ceil(min_sample_s / max(t1, 1e-9)))))


def run_rounds(series_list, rounds, tag):
    """Interleaved rounds, the order rotated every round; gc off while timing."""
    if not series_list:
        return
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(rounds):
            k = r % len(series_list)
            for s in series_list[k:] + series_list[:k]:
                if _TTY:
                    progress("%s round %d/%d: %s, %d thr" % (tag, r + 1, rounds, s.label,
                                                             s.threads))
                s.prepare()
                s.samples.append(timed(s.step, s.reps, s.fresh))
            if not _TTY:
                progress("%s round %d/%d done" % (tag, r + 1, rounds))
    finally:
        if was_enabled:
            gc.enable()


def paired_ratio(a, b):
    """Median over rounds of a[r] / b[r]: two series timed in the same rounds."""
    return statistics.median(x / y for x, y in zip(a.samples, b.samples))


class OtherLoad:
    """CPUs that other processes kept busy while a block ran (Linux /proc/stat), else None."""

    def __init__(self):
        self.start = self._snapshot()

    @staticmethod
    def _snapshot():
        try:
            with open("/proc/stat") as f:
                fields = f.readline().split()
            v = [int(x) for x in fields[1:]]
            busy = (v[0] + v[1] + v[2] + sum(v[5:8])) / os.sysconf("SC_CLK_TCK")
            t = os.times()
            return busy, t.user + t.system, time.perf_counter()
        except Exception:
            return None

    def result(self):
        end = self._snapshot()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return None
        other = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return max(0.0, other / (end[2] - self.start[2]))


# ---------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------
def run_case(env, index, name):
    desc, _ = CASES[name]
    shapes = case_shapes(name, env.scale)
    dtype = env.dtype
    n_tensors = len(shapes)
    elements = sum(math.prod(s) for s in shapes)
    nbytes = ACCESSES * dtype.itemsize * elements
    tag = "[%d/%d %s]" % (index + 1, len(env.cases), name)
    progress("%s building %d tensors, %d elements" % (tag, n_tensors, elements))
    grads = make_grads(shapes, dtype, seed=0)

    series, keep, skipped = [], [], {}
    for key, label in VARIANTS:
        progress("%s setting up %s" % (tag, label))
        try:
            steps, owner, note = BUILDERS[key](env, shapes, dtype, grads, env.threads)
        except Skip as e:
            skipped[key] = str(e)
            continue
        except Exception as e:  # a peer or a half-finished feature: report, go on
            skipped[key] = "failed to set up (%s: %s)" % (type(e).__name__, e)
            continue
        keep.append(owner)
        for t, (prepare, step) in sorted(steps.items()):
            series.append(Series(key, t, prepare, step, note))

    for i, s in enumerate(series):
        if s.key in skipped:
            continue
        progress("%s warm-up %d/%d: %s, %d thr" % (tag, i + 1, len(series), s.label, s.threads))
        try:
            calibrate(s, env.warmup, env.min_sample_s)
        except Exception as e:
            skipped[s.key] = "failed when run (%s: %s)" % (type(e).__name__, e)
    series = [s for s in series if s.key not in skipped]

    load = OtherLoad()
    try:
        run_rounds(series, env.rounds, tag)
    finally:
        env.K.set_num_threads(None)
    other_load = load.result()

    profile = None
    if env.profile:
        profile = profile_update(env, tag, series)
    env.K.set_num_threads(None)
    progress("%s done" % tag, final=_TTY)

    res = analyse(name, desc, dtype, shapes, nbytes, series, skipped, env)
    res["other_load_cpus"] = other_load
    res["profile"] = profile
    del series, keep
    gc.collect()
    return res


# ---------------------------------------------------------------------------
# One case as users run it (new gradient arrays every step)
# ---------------------------------------------------------------------------
def run_user_case(env, index, name):
    """Time the USER_VARIANTS of one case, interleaved in rounds."""
    desc, _ = CASES[name]
    shapes = case_shapes(name, env.scale)
    dtype = env.dtype
    elements = sum(math.prod(s) for s in shapes)
    tag = "[%d/%d %s, new grads]" % (index + 1, len(env.user_cases), name)
    progress("%s building %d tensors, %d elements" % (tag, len(shapes), elements))
    grads = make_grads(shapes, dtype, seed=0)

    series, keep, skipped = [], [], {}
    for key, label in USER_VARIANTS:
        if env.torch_only and key not in TORCH_VARIANTS:
            continue
        progress("%s setting up %s" % (tag, label))
        try:
            steps, owner, note, fresh = USER_BUILDERS[key](env, shapes, dtype, grads,
                                                           env.threads)
        except Skip as e:
            skipped[key] = str(e)
            continue
        except Exception as e:  # a peer or a half-finished feature: report, go on
            skipped[key] = "failed to set up (%s: %s)" % (type(e).__name__, e)
            continue
        keep.append(owner)
        for t, (prepare, step) in sorted(steps.items()):
            series.append(Series(key, t, prepare, step, note, fresh, USER_LABELS))

    for i, s in enumerate(series):
        progress("%s warm-up %d/%d: %s, %d thr" % (tag, i + 1, len(series), s.label, s.threads))
        try:
            calibrate(s, env.warmup, env.min_sample_s)
        except Exception as e:
            skipped[s.key] = "failed when run (%s: %s)" % (type(e).__name__, e)
    series = [s for s in series if s.key not in skipped]

    load = OtherLoad()
    try:
        run_rounds(series, env.rounds, tag)
    finally:
        env.K.set_num_threads(None)
    other_load = load.result()
    progress("%s done" % tag, final=_TTY)

    res = analyse_user(name, desc, dtype, shapes, series, skipped, env)
    res["other_load_cpus"] = other_load
    del series, keep
    gc.collect()
    return res


def analyse_user(name, desc, dtype, shapes, series, skipped, env):
    by = {(s.key, s.threads): s for s in series}
    elements = sum(math.prod(s) for s in shapes)
    nbytes = ACCESSES * dtype.itemsize * elements
    chainer_s = by.get(("chainer_update", 1))
    rows = []
    for s in series:
        is_floor = s.key.startswith("floor_")
        floor = by.get((FLOOR_OF.get(s.key), 1))
        torch_s = by.get((TORCH_PEER_OF.get(s.key, "torch_fused"), s.threads))
        q1, q3 = numpy.percentile(s.samples, [25, 75])
        med = s.median
        rows.append({
            "key": s.key, "variant": s.label, "threads": s.threads,
            "median_s": med, "iqr_pct": 100.0 * (q3 - q1) / med,
            "gbps": None if is_floor else nbytes / med / 1e9,
            "floor_s": None if floor is None else floor.median,
            "over_floor_s": None if floor is None else med - floor.median,
            "speedup_chainer": paired_ratio(chainer_s, s)
            if chainer_s is not None and not is_floor else None,
            "speedup_torch": paired_ratio(torch_s, s)
            if torch_s is not None and not is_floor else None,
            "reps_per_sample": s.reps, "samples_s": list(s.samples), "note": s.note,
        })
    return {"name": name, "kind": "new_grads",
            "description": desc if env.scale == 1 else
            "%s, every tensor scaled by %g" % (desc, env.scale),
            "dtype": dtype.name, "n_tensors": len(shapes), "elements": elements,
            "elements_per_tensor": elements / len(shapes),
            "bytes_per_step": nbytes, "rounds": env.rounds,
            "rows": rows, "skipped": skipped}


# ---------------------------------------------------------------------------
# Cases with optimizer hooks
# ---------------------------------------------------------------------------
#: The hook case's variant kinds: key -> label.
HOOK_VARIANT_LABELS = {
    "restore": "restore grads",
    "cynag_nohooks": "cynag update()",
    "cynag_update": "cynag update()",
    "cynag_loop": "cynag per-param",
    "chainer_update": "chainer update()",
}


def _hook_key(kind, order):
    return kind if order is None else "%s|%s" % (kind, order)


def _split_hook_key(key):
    kind, _, order = key.partition("|")
    return kind, order or None


def _grad_buffer(shapes, dtype):
    """Writeable gradients: views of one buffer, so that one copy restores them all."""
    sizes = [math.prod(s) for s in shapes]
    buf = numpy.empty(sum(sizes), dtype)
    views, offset = [], 0
    for s, n in zip(shapes, sizes):
        views.append(buf[offset:offset + n].reshape(s))
        offset += n
    return buf, views


def _make_hooks(mod, order):
    hooks = []
    for name in order:
        if name == "WeightDecay":
            hooks.append(mod.WeightDecay(HOOK_WEIGHT_DECAY))
        else:
            hooks.append(mod.GradientClipping(HOOK_CLIP_THRESHOLD))
    return hooks


def _fold_note(opt):
    """Which hooks cynag's update() runs inside its pass."""
    from cynag._multi_tensor import foldable_suffix

    hooks = list(opt._hookable._pre_update_hooks.values())
    n = foldable_suffix(hooks)
    if not n:
        return "no hook folded"
    if n == len(hooks):
        return "both hooks folded into the pass"
    return "%s folded into the pass" % ", ".join(h.name for h in hooks[len(hooks) - n:])


def build_hook_restore(env, shapes, dtype, source, thread_counts, order):
    buf, _ = _grad_buffer(shapes, dtype)
    return {1: (_noop, functools.partial(numpy.copyto, buf, source))}, buf, \
        "one copy of every gradient (in every row below)"


def _build_cynag_hooked(env, shapes, dtype, source, thread_counts, order, multi):
    from cynag import optimizer_hooks

    buf, grads = _grad_buffer(shapes, dtype)
    link = cynag.Link()
    with link.init_scope():
        for i, p in enumerate(make_params(shapes, dtype, seed=1)):
            setattr(link, "p%04d" % i, cynag.Parameter(p))
    for i, g in enumerate(grads):
        getattr(link, "p%04d" % i).grad = g
    opt = cynag.optimizers.NesterovAG(lr=LR, momentum=MOMENTUM).setup(link)
    opt.use_multi_tensor(multi)
    if order is not None:
        for hook in _make_hooks(optimizer_hooks, order):
            opt.add_hook(hook)

    def step():
        numpy.copyto(buf, source)
        opt.update()
    step()   # creates the state
    note = _fold_note(opt) if multi and order is not None else ""
    return {t: (_set_threads(env.K, t), step) for t in thread_counts}, (link, opt, buf), note


def build_hook_cynag_nohooks(env, shapes, dtype, source, thread_counts, order):
    steps, keep, _ = _build_cynag_hooked(env, shapes, dtype, source, thread_counts, None, True)
    return steps, keep, "no hooks: the reference of the hooks' cost"


def build_hook_cynag_update(env, shapes, dtype, source, thread_counts, order):
    return _build_cynag_hooked(env, shapes, dtype, source, thread_counts, order, True)


def build_hook_cynag_loop(env, shapes, dtype, source, thread_counts, order):
    return _build_cynag_hooked(env, shapes, dtype, source, thread_counts, order, False)


def build_hook_chainer_update(env, shapes, dtype, source, thread_counts, order):
    chainer = env.chainer
    if chainer is None:
        raise Skip("chainer " + env.chainer_note)
    import chainer.optimizer_hooks as chainer_hooks

    buf, grads = _grad_buffer(shapes, dtype)
    link = chainer.Link()
    with link.init_scope():
        for i, p in enumerate(make_params(shapes, dtype, seed=1)):
            setattr(link, "p%04d" % i, chainer.Parameter(p))
    for i, g in enumerate(grads):
        getattr(link, "p%04d" % i).grad = g
    opt = chainer.optimizers.NesterovAG(lr=LR, momentum=MOMENTUM).setup(link)
    for hook in _make_hooks(chainer_hooks, order):
        opt.add_hook(hook)

    def step():
        numpy.copyto(buf, source)
        opt.update()
    step()
    return {1: (_noop, step)}, (link, opt, buf), ""


HOOK_BUILDERS = {
    "restore": build_hook_restore,
    "cynag_nohooks": build_hook_cynag_nohooks,
    "cynag_update": build_hook_cynag_update,
    "cynag_loop": build_hook_cynag_loop,
    "chainer_update": build_hook_chainer_update,
}


def hook_variants():
    """(key, kind, order) of every series of a hook case, in table order."""
    out = [("restore", "restore", None), ("cynag_nohooks", "cynag_nohooks", None)]
    for order_key, _ in HOOK_ORDERS:
        for kind in ("cynag_update", "cynag_loop", "chainer_update"):
            out.append((_hook_key(kind, order_key), kind, order_key))
    return out


def run_hook_case(env, index, name):
    """Time one optimizer step with hooks (see the module docstring), every
    variant over its own parameters, state and gradients, interleaved in rounds."""
    desc, _ = CASES[name]
    shapes = case_shapes(name, env.scale)
    dtype = env.dtype
    n_tensors = len(shapes)
    elements = sum(math.prod(s) for s in shapes)
    tag = "[%d/%d %s]" % (index + 1, len(env.cases), name)
    progress("%s building %d tensors, %d elements" % (tag, n_tensors, elements))
    source = numpy.concatenate([g.reshape(-1) for g in make_grads(shapes, dtype, seed=0)]
                               + [numpy.zeros(0, dtype)])
    source.flags.writeable = False
    orders = dict(HOOK_ORDERS)

    series, keep, skipped = [], [], {}
    for key, kind, order_key in hook_variants():
        label = HOOK_VARIANT_LABELS[kind]
        progress("%s setting up %s%s" % (tag, label, "" if order_key is None
                                         else " (%s)" % order_key))
        try:
            steps, owner, note = HOOK_BUILDERS[kind](
                env, shapes, dtype, source, env.threads,
                None if order_key is None else orders[order_key])
        except Skip as e:
            skipped[key] = str(e)
            continue
        except Exception as e:  # a peer or a half-finished feature: report, go on
            skipped[key] = "failed to set up (%s: %s)" % (type(e).__name__, e)
            continue
        keep.append(owner)
        for t, (prepare, step) in sorted(steps.items()):
            series.append(Series(key, t, prepare, step, note))

    for i, s in enumerate(series):
        progress("%s warm-up %d/%d: %s, %d thr" % (tag, i + 1, len(series), s.key, s.threads))
        try:
            calibrate(s, env.warmup, env.min_sample_s)
        except Exception as e:
            skipped[s.key] = "failed when run (%s: %s)" % (type(e).__name__, e)
    series = [s for s in series if s.key not in skipped]

    load = OtherLoad()
    try:
        run_rounds(series, env.rounds, tag)
    finally:
        env.K.set_num_threads(None)
    other_load = load.result()
    progress("%s done" % tag, final=_TTY)

    res = analyse_hooks(name, desc, dtype, shapes, series, skipped, env)
    res["other_load_cpus"] = other_load
    del series, keep
    gc.collect()
    return res


def analyse_hooks(name, desc, dtype, shapes, series, skipped, env):
    by = {(s.key, s.threads): s for s in series}
    restore = by.get(("restore", 1))
    rows = []
    for s in series:
        kind, order = _split_hook_key(s.key)
        loop = chainer_s = nohooks = None
        if order is not None:
            chainer_s = by.get((_hook_key("chainer_update", order), 1))
            if kind != "chainer_update":
                loop = by.get((_hook_key("cynag_loop", order), s.threads))
                nohooks = by.get(("cynag_nohooks", s.threads))
        q1, q3 = numpy.percentile(s.samples, [25, 75])
        med = s.median
        rows.append({
            "key": s.key, "kind": kind, "order": order,
            "variant": HOOK_VARIANT_LABELS[kind], "threads": s.threads,
            "median_s": med, "iqr_pct": 100.0 * (q3 - q1) / med,
            "minus_restore_s": None if restore is None or s is restore
            else med - restore.median,
            "hooks_cost_s": None if nohooks is None else med - nohooks.median,
            "speedup_loop": paired_ratio(loop, s) if loop is not None and loop is not s
            else None,
            "speedup_chainer": paired_ratio(chainer_s, s)
            if chainer_s is not None and chainer_s is not s else None,
            "reps_per_sample": s.reps, "samples_s": list(s.samples), "note": s.note,
        })
    elements = sum(math.prod(s) for s in shapes)
    return {"name": name, "kind": "hooks",
            "description": desc if env.scale == 1 else
            "%s, every tensor scaled by %g" % (desc, env.scale),
            "dtype": dtype.name, "n_tensors": len(shapes), "elements": elements,
            "elements_per_tensor": elements / len(shapes),
            "bytes_per_step": ACCESSES * dtype.itemsize * elements, "rounds": env.rounds,
            "weight_decay": HOOK_WEIGHT_DECAY, "clip_threshold": HOOK_CLIP_THRESHOLD,
            "orders": [k for k, _ in HOOK_ORDERS],
            "rows": rows, "skipped": skipped}


def profile_update(env, tag, series):
    """cProfile of env.profile cynag update() calls at the largest thread count."""
    cands = [s for s in series if s.key == "cynag_update"]
    if not cands:
        return None
    s = max(cands, key=lambda x: x.threads)
    progress("%s profiling %d update() calls" % (tag, env.profile))
    s.prepare()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(env.profile):
        s.step()
    prof.disable()
    stats = pstats.Stats(prof)
    total = stats.total_tt
    rows = []
    for (filename, line, func), (cc, nc, tt, ct, _callers) in stats.stats.items():
        rows.append({"function": "%s:%d(%s)" % (_short_path(filename), line, func)
                     if line else func,
                     "calls_per_step": nc / env.profile,
                     "tottime_per_step_s": tt / env.profile,
                     "cumtime_per_step_s": ct / env.profile})
    rows.sort(key=lambda r: -r["tottime_per_step_s"])
    return {"calls": env.profile, "threads": s.threads,
            "total_per_step_s": total / env.profile, "top": rows[:env.profile_top]}


def _short_path(path):
    """A profile entry's file relative to the package or site-packages."""
    parts = path.replace("\\", "/").split("/")
    for anchor in ("site-packages", "cynag", "cynag_kernels"):
        if anchor in parts:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            return "/".join(parts[i + (anchor == "site-packages"):])
    return os.path.basename(path)


def analyse(name, desc, dtype, shapes, nbytes, series, skipped, env):
    by = {(s.key, s.threads): s for s in series}
    n_tensors = len(shapes)
    elements = sum(math.prod(s) for s in shapes)

    def find(key, t):
        return by.get((key, t))

    rows = []
    for s in series:
        probe = find("probe", s.threads)
        numpy_s = find("numpy", 1)
        chainer_s = find("chainer_update", 1)
        torch_s = find("torch_fused", s.threads)
        q1, q3 = numpy.percentile(s.samples, [25, 75])
        med = s.median
        rows.append({
            "key": s.key, "variant": s.label, "threads": s.threads,
            "median_s": med, "iqr_pct": 100.0 * (q3 - q1) / med,
            "gbps": nbytes / med / 1e9,
            "frac_probe": paired_ratio(probe, s) if probe else None,
            "speedup_numpy": paired_ratio(numpy_s, s) if numpy_s else None,
            "speedup_chainer": paired_ratio(chainer_s, s) if chainer_s else None,
            "speedup_torch": paired_ratio(torch_s, s) if torch_s else None,
            "reps_per_sample": s.reps, "samples_s": list(s.samples),
            "note": s.note,
        })

    overhead = []
    for t in env.threads:
        upd = find("cynag_update", t)
        ref_key = "cynag_kernel" if find("cynag_kernel", t) else "c_loop"
        ref = find(ref_key, t)
        if upd is None or ref is None:
            continue
        entry = {"threads": t, "reference": ref_key,
                 "update_s": upd.median, "reference_s": ref.median,
                 "overhead_s": upd.median - ref.median,
                 "overhead_per_tensor_us": 1e6 * (upd.median - ref.median) / n_tensors}
        con = find("cynag_contiguous", t)
        if con is not None:
            entry["contiguous_s"] = con.median
            entry["contiguous_overhead_s"] = con.median - ref.median
            entry["contiguous_overhead_per_tensor_us"] = (
                1e6 * (con.median - ref.median) / n_tensors)
        overhead.append(entry)

    return {"name": name, "kind": "same_grads", "description": desc if env.scale == 1 else
            "%s, every tensor scaled by %g" % (desc, env.scale),
            "dtype": dtype.name, "n_tensors": n_tensors, "elements": elements,
            "elements_per_tensor": elements / n_tensors,
            "bytes_per_step": nbytes, "rounds": env.rounds,
            "rows": rows, "skipped": skipped, "overhead": overhead}


# ---------------------------------------------------------------------------
# Thread sweep and recommendation
# ---------------------------------------------------------------------------
def thread_sweep(env):
    """One tensor of each sweep size, 1 thread vs N threads via nesterov_ag_cpu."""
    n = max(env.threads)
    sizes = sorted({max(16, int(s * env.scale)) for s in SWEEP_SIZES})
    points = []
    load = OtherLoad()
    for i, size in enumerate(sizes):
        tag = "[threads sweep %d/%d: %d elements]" % (i + 1, len(sizes), size)
        progress(tag)
        p = make_params([(size,)], env.dtype, seed=3)[0]
        g = make_grads([(size,)], env.dtype, seed=4)[0]
        v = touched_zeros([p])[0]
        series = []
        for t in (1, n):
            def step(t=t):
                cynag_kernels.nesterov_ag_cpu(p, g, v, LR, MOMENTUM, num_threads=t)
            s = Series("nesterov_ag_cpu", t, _noop, step)
            calibrate(s, env.warmup, env.min_sample_s)
            series.append(s)
        run_rounds(series, env.rounds, tag)
        one, many = series
        points.append({"size": size, "t1_s": one.median, "tn_s": many.median,
                       "speedup": paired_ratio(one, many),
                       "samples_1_s": one.samples, "samples_n_s": many.samples})
    progress("threads sweep done", final=_TTY)
    return {"threads": n, "points": points, "other_load_cpus": load.result()}


def recommend(env, sweep, cases):
    """CYNAG_NUM_THREADS / CYNAG_PARALLEL_THRESHOLD from the sweep and the big case."""
    n = max(env.threads)
    out = {"threads_compared": n, "sweep": sweep}
    if n <= 1 or sweep is None:
        out.update(num_threads=None, parallel_threshold=None,
                   text=["no thread recommendation: only 1 thread was measured (--threads)"
                         if n <= 1 else "no thread recommendation: the sweep was skipped"])
        return out
    pts = sweep["points"]
    threshold = None
    for i, pt in enumerate(pts):
        if all(q["speedup"] > THREAD_WIN for q in pts[i:]):
            threshold = pt["size"]
            break
    text = []
    for pt in pts:
        text.append("  %9d elements: 1 thr %9s, %d thr %9s  -> x%s" % (
            pt["size"], fmt_time(pt["t1_s"]), n, fmt_time(pt["tn_s"]), sig(pt["speedup"])))
    big = next((c for c in cases if c["name"] == "big"), None)
    big_speedup = None
    if big is not None:
        rows = {(r["key"], r["threads"]): r for r in big["rows"]}
        for key in ("cynag_update", "cynag_kernel", "c_loop"):
            if (key, 1) in rows and (key, n) in rows:
                a, b = rows[(key, 1)], rows[(key, n)]
                big_speedup = statistics.median(
                    x / y for x, y in zip(a["samples_s"], b["samples_s"]))
                big_from = "%s, big case" % LABELS[key]
                break
    if big_speedup is None:
        big_speedup, big_from = pts[-1]["speedup"], "%d elements, sweep" % pts[-1]["size"]
    if threshold is None:
        num = 1
        text.append("%d threads never win by more than %d%% from some size on: use one thread."
                    % (n, round(100 * (THREAD_WIN - 1))))
        text.append("recommended: CYNAG_NUM_THREADS=1")
    else:
        num = n
        text.append("%d threads win by more than %d%% from %d elements on (and at every "
                    "larger size measured)." % (n, round(100 * (THREAD_WIN - 1)), threshold))
        text.append("recommended: CYNAG_NUM_THREADS=%d CYNAG_PARALLEL_THRESHOLD=%d"
                    % (n, threshold))
    helps = big_speedup > THREAD_WIN
    text.append("big tensors: %d threads run x%s as fast as 1 (%s): %s" % (
        n, sig(big_speedup), big_from,
        "more threads help" if helps else
        "more threads do not help (memory-bound); one thread loses little there"))
    load = sweep.get("other_load_cpus")
    if load is not None and load > OTHER_LOAD_WARN:
        text.append("WARNING: other processes kept %.2f CPUs busy during the sweep: rerun on a "
                    "quiet machine before following this recommendation" % load)
    out.update(num_threads=num, parallel_threshold=threshold, big_speedup=big_speedup,
               big_speedup_from=big_from, big_helps=helps, text=text)
    return out


# ---------------------------------------------------------------------------
# Machine description
# ---------------------------------------------------------------------------
def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            import subprocess
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                  capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            pass
    return platform.processor() or platform.machine()


#: Environment variables that change how the kernels' threads run.
THREAD_ENV = ("OMP_NUM_THREADS", "CYNAG_NUM_THREADS", "CYNAG_PARALLEL_THRESHOLD",
              "OMP_WAIT_POLICY", "OMP_PROC_BIND")


def thread_env():
    return {k: os.environ[k] for k in THREAD_ENV if k in os.environ}


def machine_info(env):
    K = env.K
    build = K.build_info()
    info = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": _threads.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "numpy": numpy.__version__,
        "cynag": cynag.__version__,
        "cynag_path": os.path.dirname(cynag.__file__),
        "build": build,
        "openmp": bool(build.get("openmp")),
        "probe_openmp": None if env.probe is None else env.probe.openmp_enabled(),
        "thread_config": _threads.thread_config(),
        "chainer": None if env.chainer is None else env.chainer.__version__,
        "torch": None if env.torch is None else env.torch.__version__,
        "env": thread_env(),
    }
    return info


def header_lines(env, info):
    tc = info["thread_config"]
    lines = [
        "cynag NesterovAG benchmark  %s" % env.started,
        "machine : %s; %s logical CPUs, %d usable by this process"
        % (info["cpu"], info["logical_cpus"], info["usable_cpus"]),
        "software: python %s, numpy %s, cynag %s (%s), chainer %s, torch %s"
        % (info["python"], info["numpy"], info["cynag"], info["cynag_path"],
           info["chainer"] or "-", info["torch"] or "-"),
        "build   : OpenMP %s, compiler %s; thread default %d (%s), parallel threshold %d"
        % ("on" if info["openmp"] else "OFF (single-threaded kernels)",
           info["build"].get("compiler"), tc["num_threads"], tc["source"],
           tc["parallel_threshold"]),
        "settings: %s, threads %s, %d rounds, samples >= %.0f ms, lr=%g momentum=%g%s%s"
        % (env.dtype.name, ",".join(map(str, env.threads)), env.rounds,
           env.min_sample_s * 1e3, LR, MOMENTUM,
           "" if env.scale == 1 else ", sizes scaled by %g" % env.scale,
           ", env %s" % info["env"] if info["env"] else ""),
    ]
    for what, mod, note in (("chainer", env.chainer, env.chainer_note),
                            ("torch", env.torch, env.torch_note)):
        if mod is None:
            lines.append("skipped : %s %s" % (what, note))
    if env.probe is None:
        lines.append("skipped : C loop and probe: %s" % env.probe_note)
    if max(env.threads) > info["usable_cpus"]:
        lines.append("WARNING : more threads than usable CPUs (%d): oversubscribed"
                     % info["usable_cpus"])
    lines.append("Shared or virtual machines are noisy: compare ratios within one run, "
                 "not absolute times across runs.")
    return lines


LEGEND = """\
First, per case, a step as training runs it: the parameters get new gradient arrays
before every step (not timed), then only update() is timed, on a chainer.Link and on a
cynag.Link.  Python floor = list(link.params()) and reading every .grad, which any
optimizer does; over floor = time/step minus the floor of the same kind of link.
Then, per case, the same step with the same gradient arrays every step (idealized),
against a bandwidth probe, a C loop and the native call.
time/step = median over rounds of one step; GB/s = 5 accesses x itemsize x elements /
time (the least traffic of a step); %probe = share of the bandwidth probe's speed at
the same thread count; vs numpy / vs chainer = speedup over their single-threaded step;
vs torch = speedup over torch at the same thread count.  Ratios are medians of
per-round ratios (the variants are interleaved in every round)."""


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------
def fmt_bytes(n):
    for unit, f in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= f:
            return "%s %s" % (sig(n / f), unit)
    return "%d B" % n


#: What each kind of table times, after its case's description.
GRADS_TITLE = {"new_grads": "new gradient arrays every step, as in training",
               "same_grads": "same gradient arrays every step (idealized)"}


def case_title(res):
    what = GRADS_TITLE.get(res.get("kind", "same_grads"))
    return ("== %s: %s%s (%s %s elements, %s moved per step, %d rounds) =="
            % (res["name"], res["description"], "" if what is None else " -- " + what,
               format(res["elements"], ","), res["dtype"], fmt_bytes(res["bytes_per_step"]),
               res["rounds"]))


def print_user_case(res, quiet=(), out=None):
    """One case's table of the user path (new gradient arrays every step)."""
    out = out or sys.stdout
    w = out.write
    w("\n" + case_title(res) + "\n")
    cols = "%-32s %3s %10s %6s %8s %11s %10s %9s  %s"
    hdr = cols % ("variant", "thr", "time/step", "IQR%", "GB/s", "over floor", "vs chainer",
                  "vs torch", "note")
    w(hdr + "\n" + "-" * len(hdr) + "\n")
    for r in res["rows"]:
        notes = [r["note"]] if r["note"] else []
        if r["iqr_pct"] > NOISY_IQR_PCT:
            notes.append("noisy")
        w(cols % (r["variant"], r["threads"], fmt_time(r["median_s"]), "%.1f" % r["iqr_pct"],
                  sig(r["gbps"]), fmt_time(r["over_floor_s"]), sig(r["speedup_chainer"], "x"),
                  sig(r["speedup_torch"], "x"), "; ".join(notes)) + "\n")
    for key, why in res["skipped"].items():
        if key in quiet:
            continue
        w("  (%s skipped: %s)\n" % (USER_LABELS.get(key, key), why))
    load = res.get("other_load_cpus")
    if load is not None and load > OTHER_LOAD_WARN:
        w("  other processes kept %.2f CPUs busy during the rounds: the times are "
          "unreliable\n" % load)
    out.flush()


def _noise(overhead_s):
    return " (below zero: within the noise)" if overhead_s < 0 else ""


def print_case(res, quiet=(), out=None):
    """One case's table; skipped variants whose key is in ``quiet`` are not repeated."""
    out = out or sys.stdout
    w = out.write
    w("\n" + case_title(res) + "\n")
    cols = ("%-17s %3s %10s %6s %8s %7s %9s %10s %9s  %s")
    hdr = cols % ("variant", "thr", "time/step", "IQR%", "GB/s", "%probe", "vs numpy",
                  "vs chainer", "vs torch", "note")
    w(hdr + "\n" + "-" * len(hdr) + "\n")
    for r in res["rows"]:
        notes = [r["note"]] if r["note"] else []
        if r["iqr_pct"] > NOISY_IQR_PCT:
            notes.append("noisy")
        w(cols % (r["variant"], r["threads"], fmt_time(r["median_s"]), "%.1f" % r["iqr_pct"],
                  sig(r["gbps"]),
                  sig(None if r["frac_probe"] is None else 100 * r["frac_probe"]),
                  sig(r["speedup_numpy"], "x"), sig(r["speedup_chainer"], "x"),
                  sig(r["speedup_torch"], "x"), "; ".join(notes)) + "\n")
    for key, why in res["skipped"].items():
        if key in quiet:
            continue
        w("  (%s skipped: %s)\n" % (LABELS.get(key, key), why))
    if res["overhead"]:
        w("where the time goes (cynag update() minus the native call at the same thread "
          "count):\n")
        for o in res["overhead"]:
            ref = "%s %s" % (LABELS[o["reference"]], fmt_time(o["reference_s"]))
            w("  %d thr: update() %s = %s + %s, %s per tensor%s\n"
              % (o["threads"], fmt_time(o["update_s"]), ref, fmt_time(o["overhead_s"]),
                 fmt_time(o["overhead_per_tensor_us"] * 1e-6), _noise(o["overhead_s"])))
            if "contiguous_s" in o:
                w("         contiguous %s = %s + %s, %s per tensor%s\n"
                  % (fmt_time(o["contiguous_s"]), ref, fmt_time(o["contiguous_overhead_s"]),
                     fmt_time(o["contiguous_overhead_per_tensor_us"] * 1e-6),
                     _noise(o["contiguous_overhead_s"])))
    load = res.get("other_load_cpus")
    if load is not None and load > OTHER_LOAD_WARN:
        w("  other processes kept %.2f CPUs busy during the rounds: the times are "
          "unreliable\n" % load)
    prof = res.get("profile")
    if prof:
        w("profile of %d update() calls at %d thr (%s per step under the profiler), "
          "top functions by own time:\n" % (prof["calls"], prof["threads"],
                                            fmt_time(prof["total_per_step_s"])))
        w("  %10s %10s %12s  %s\n" % ("own/step", "cum/step", "calls/step", "function"))
        for r in prof["top"]:
            w("  %10s %10s %12s  %s\n" % (fmt_time(r["tottime_per_step_s"]),
                                          fmt_time(r["cumtime_per_step_s"]),
                                          sig(r["calls_per_step"]), r["function"]))
    out.flush()


def print_hook_case(res, quiet=(), out=None):
    """The table of a hook case."""
    out = out or sys.stdout
    w = out.write
    w("\n" + case_title(res) + "\n")
    w("orders: wd,clip = WeightDecay(%g) then GradientClipping(%g) (as Chainer's examples); "
      "clip,wd = the other way round\n" % (res["weight_decay"], res["clip_threshold"]))
    cols = "%-17s %-7s %3s %10s %6s %10s %10s %9s %10s  %s"
    hdr = cols % ("variant", "hooks", "thr", "time/step", "IQR%", "-restore", "hooks cost",
                  "vs loop", "vs chainer", "note")
    w(hdr + "\n" + "-" * len(hdr) + "\n")
    for r in res["rows"]:
        notes = [r["note"]] if r["note"] else []
        if r["iqr_pct"] > NOISY_IQR_PCT:
            notes.append("noisy")
        hooks = r["order"] or ("none" if r["kind"] == "cynag_nohooks" else "-")
        w(cols % (r["variant"], hooks, r["threads"], fmt_time(r["median_s"]),
                  "%.1f" % r["iqr_pct"],
                  "-" if r["minus_restore_s"] is None else fmt_time(r["minus_restore_s"]),
                  "-" if r["hooks_cost_s"] is None else fmt_time(r["hooks_cost_s"]),
                  sig(r["speedup_loop"], "x"), sig(r["speedup_chainer"], "x"),
                  "; ".join(notes)) + "\n")
    for key, why in res["skipped"].items():
        kind, order = _split_hook_key(key)
        if kind in quiet:
            continue
        w("  (%s%s skipped: %s)\n" % (HOOK_VARIANT_LABELS.get(kind, kind),
                                      "" if order is None else " " + order, why))
    w("-restore: time/step minus the gradient copy alone; hooks cost: minus cynag update() "
      "without hooks at the same thread count; vs loop / vs chainer: speedup over cynag "
      "per-param at the same thread count / chainer update() (1 thr), same hook order.\n")
    load = res.get("other_load_cpus")
    if load is not None and load > OTHER_LOAD_WARN:
        w("  other processes kept %.2f CPUs busy during the rounds: the times are "
          "unreliable\n" % load)
    out.flush()


# ---------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------
def _import_pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _count(x):
    """An element count: an integer as such, else about 3 significant digits."""
    return "%d" % x if float(x).is_integer() else sig(x)


def plot(results, path):
    """The figure of a run: the step as training runs it first, then the idealized step.

    Top row (when the run has new-gradient cases): time per step of each
    variant of the user path (log), one panel per thread count, the Python
    floor dashed.  Bottom row: effective GB/s of the idealized variants
    against elements per tensor, the bandwidth probe dashed.
    """
    plt = _import_pyplot()
    user = sorted(results.get("user_path", []), key=lambda c: c["elements_per_tensor"])
    ideal = sorted((c for c in results["cases"] if c.get("kind") != "hooks"),
                   key=lambda c: c["elements_per_tensor"])
    cases = user + ideal
    panels = [p for p in ((user, "user"), (ideal, "ideal")) if p[0]]
    thread_counts = sorted({r["threads"] for c in cases for r in c["rows"]})
    fig, axes = plt.subplots(max(1, len(panels)), len(thread_counts),
                             figsize=(6.5 * len(thread_counts), 4.8 * max(1, len(panels))),
                             squeeze=False)
    palette = plt.get_cmap("tab20").colors
    keys = [k for k, _ in USER_VARIANTS] + [k for k, _ in VARIANTS if k not in dict(USER_VARIANTS)]
    colors = {key: palette[i % len(palette)] for i, key in enumerate(keys)}
    one_thread = ("numpy", "chainer_update")
    for row, (group, kind) in enumerate(panels):
        variants = USER_VARIANTS if kind == "user" else VARIANTS
        for ax, t in zip(axes[row], thread_counts):
            for key, label in variants:
                xs, ys = [], []
                for c in group:
                    rows = [r for r in c["rows"] if r["key"] == key
                            and (r["threads"] == t or (r["threads"] == 1 and key in one_thread))]
                    value = rows and (rows[0]["median_s"] * 1e3 if kind == "user"
                                      else rows[0]["gbps"])
                    if value:
                        xs.append(c["elements_per_tensor"])
                        ys.append(value)
                if not xs:
                    continue
                if key == "probe" or key.startswith("floor_"):
                    ax.plot(xs, ys, "--", color="k" if key == "probe" else colors[key], lw=1.2,
                            label=label + (" (reference)" if key == "probe" else ""))
                else:
                    ax.plot(xs, ys, "o-", color=colors[key],
                            label=label + (" (1 thr)" if key in one_thread else ""))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks([c["elements_per_tensor"] for c in group])
            ax.set_xticklabels(["%s\n%d x %s" % (c["name"], c["n_tensors"],
                                                 _count(c["elements_per_tensor"]))
                                for c in group], fontsize=8)
            ax.minorticks_off()
            ax.set_xlabel("case: tensors x mean elements per tensor (log)")
            ax.set_title("%s, %d thread%s" % (
                "as training runs it: new gradient arrays every step" if kind == "user"
                else "idealized: the same gradient arrays every step",
                t, "" if t == 1 else "s"), fontsize=9)
            ax.grid(True, which="major", alpha=0.3)
        axes[row][0].set_ylabel("update() time per step, ms (log; lower is faster)"
                                if kind == "user" else
                                "effective GB/s (5 accesses per element, log)")
        axes[row][0].legend(fontsize=7, loc="best")
    m = results["machine"]
    fig.suptitle("NesterovAG step, %s: %s, %d usable CPUs"
                 % (results["settings"]["dtype"], m["cpu"], m["usable_cpus"]), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------
def _positive_int_list(text):
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("expected positive integers separated by commas, "
                                         "got %r" % text)
    return tuple(sorted(set(values)))


def _case_list(text, cases=None):
    cases = CASES if cases is None else cases
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in cases]
    if not names or bad:
        raise argparse.ArgumentTypeError("unknown case %s; choose from %s"
                                         % (", ".join(map(repr, bad)) or "(none)",
                                            ",".join(cases)))
    return [n for n in cases if n in names]


def _positive_float(text):
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError("expected a positive number, got %r" % text)
    return v


def parse_args(argv):
    default_threads = tuple(sorted({1, _threads.cpu_count()}))
    ap = argparse.ArgumentParser(
        prog="python -m cynag.bench",
        description="Benchmark one NesterovAG step (cynag, its native call, numpy, a C loop, "
                    "a bandwidth probe, and Chainer/PyTorch when importable).",
        epilog="Cases: " + "; ".join("%s = %s" % (k, v[0]) for k, v in CASES.items())
        + ".  Cases with --e2e: " + "; ".join("%s = %s, batch %d" % (k, v[0], v[1])
                                              for k, v in bench_e2e.MODELS.items()) + ".")
    ap.add_argument("--cases", default=None,
                    help="comma-separated cases to run (default: %s; also: %s; with --e2e: "
                         "%s)" % (",".join(DEFAULT_CASES), ",".join(HOOK_CASES),
                                  ",".join(bench_e2e.MODELS)))
    ap.add_argument("--e2e", action="store_true",
                    help="time Chainer's training loop (StandardUpdater: forward, backward, "
                         "update) with Chainer's NesterovAG and with cynag's, each run in "
                         "its own process, instead of the optimizer step alone")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                    help="array dtype (default float32)")
    ap.add_argument("--threads", type=_positive_int_list, default=default_threads,
                    help="comma-separated thread counts (default: %s, i.e. 1 and the usable "
                         "CPUs)" % ",".join(map(str, default_threads)))
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds per case (default 11, --quick 5)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer rounds and shorter samples (less precise)")
    ap.add_argument("--profile", type=int, nargs="?", const=200, default=0, metavar="N",
                    help="also profile N cynag update() calls per case (default N=200) "
                         "and show the top functions")
    ap.add_argument("--no-sweep", action="store_true",
                    help="skip the one-tensor thread sweep and the recommendation")
    ap.add_argument("--json", metavar="FILE", help="write every result and sample to FILE")
    ap.add_argument("--torch", action="store_true",
                    help="time cynag.torch.NesterovAG against PyTorch's fused SGD only "
                         "(new gradient tensors every step, as zero_grad() + backward() "
                         "make them; cases small, medium, resnet50 by default); with "
                         "--e2e, PyTorch's training loop on the e2e models")
    ap.add_argument("--mpi", action="store_true",
                    help="time the gradient averaging of cynag.multinode instead (run under "
                         "mpiexec -n 2 or more; cases small, big, resnet50)")
    ap.add_argument("--plot", metavar="FILE.png",
                    help="draw GB/s per case and variant into FILE.png (needs matplotlib)")
    # Shrinks every tensor (tests; not a measurement setting).
    ap.add_argument("--scale", type=_positive_float, default=1.0, help=argparse.SUPPRESS)
    # Timed iterations per --e2e process (tests; default 50, --quick 20).
    ap.add_argument("--e2e-iterations", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    models = bench_e2e.MODELS if args.e2e else CASES
    if args.cases is None:
        args.cases = list(models if args.e2e else (["small", "medium", "resnet50"]
                                                   if args.torch else DEFAULT_CASES))
    else:
        try:
            args.cases = _case_list(args.cases, models)
        except argparse.ArgumentTypeError as e:
            ap.error("argument --cases: %s" % e)
    if args.torch and args.mpi:
        ap.error("--torch does not combine with --mpi")
    if args.e2e and (args.mpi or args.plot):
        ap.error("--e2e does not combine with %s" % ("--mpi" if args.mpi else "--plot"))
    if args.e2e_iterations is not None and args.e2e_iterations < 1:
        ap.error("--e2e-iterations must be >= 1")
    if args.rounds is not None and args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.profile < 0:
        ap.error("--profile must be >= 1")
    if args.plot and _import_pyplot() is None:
        ap.error('--plot needs matplotlib, which is not installed: '
                 'pip install "cynag[bench]" (or pip install matplotlib)')
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.mpi:
        from cynag.multinode import bench as multinode_bench

        cases = [c for c in args.cases if c in multinode_bench.CASES]
        if not cases:
            sys.stderr.write("--mpi: none of the cases %s has an MPI benchmark (%s)\n"
                             % (",".join(args.cases), ",".join(multinode_bench.CASES)))
            return 2
        mpi_argv = ["--cases", ",".join(cases), "--dtype", args.dtype]
        if args.rounds is not None:
            mpi_argv += ["--rounds", str(args.rounds)]
        if args.json:
            mpi_argv += ["--json", args.json]
        return multinode_bench.main(mpi_argv)
    env = Env()
    env.K = cynag_kernels
    env.started = datetime.datetime.now().isoformat(timespec="seconds")
    env.cases = args.cases
    env.user_cases = [name for name in args.cases if name not in HOOK_CASES]
    env.torch_only = args.torch
    env.dtype = numpy.dtype(args.dtype)
    env.threads = args.threads
    env.rounds = args.rounds or (5 if args.quick else 11)
    env.warmup = 2 if args.quick else 3
    env.min_sample_s = 0.005 if args.quick else 0.02
    env.scale = args.scale
    env.profile = args.profile
    env.profile_top = 12
    env.probe, env.probe_note = import_probe()
    env.chainer, env.chainer_note = import_chainer()
    env.torch, env.torch_note = import_torch()

    info = machine_info(env)
    if args.e2e:
        missing = (("torch", env.torch_note) if args.torch and env.torch is None else
                   ("chainer", env.chainer_note) if not args.torch and env.chainer is None
                   else None)
        if missing is not None:
            print("\n".join(header_lines(env, info)))
            print("--e2e: nothing to run, %s %s" % missing)
            return 0
        # The machine and the software; the settings are the e2e run's own.
        return bench_e2e.main(args, {"header": header_lines(env, info)[:4], "machine": info,
                                     "started": env.started},
                              fmt_time, sig, progress, _json_default)
    # Variants the header already says are missing, not repeated under every table.
    header_skips = ({"chainer_update", "cynag_on_chainer", "floor_chainer"}
                    if env.chainer is None else set()) | (
        {"torch_fused", "torch_fused_wd"} if env.torch is None else set()) | (
        {"probe", "c_loop"} if env.probe is None else set())
    print("\n".join(header_lines(env, info)))
    print(LEGEND)
    sys.stdout.flush()

    user_path, failures = [], {}
    for i, name in enumerate(env.user_cases):
        try:
            res = run_user_case(env, i, name)
        except Exception as e:   # report and go on: a benchmark never fails the caller
            failures[name + " (new grads)"] = "%s: %s" % (type(e).__name__, e)
            print("\n== %s, new grads: failed (%s: %s) ==" % (name, type(e).__name__, e))
            continue
        user_path.append(res)
        print_user_case(res, quiet=header_skips)

    cases = []
    for i, name in enumerate([] if env.torch_only else env.cases):
        try:
            res = (run_hook_case if name in HOOK_CASES else run_case)(env, i, name)
        except Exception as e:   # report and go on: a benchmark never fails the caller
            failures[name] = "%s: %s" % (type(e).__name__, e)
            print("\n== %s: failed (%s) ==" % (name, failures[name]))
            continue
        cases.append(res)
        if name in HOOK_CASES:
            print_hook_case(res, quiet=header_skips)
        else:
            print_case(res, quiet=header_skips)

    sweep = None
    # The sweep recommends thread settings for the plain step: not with hook cases alone.
    if max(env.threads) > 1 and not args.no_sweep and not env.torch_only and any(
            name not in HOOK_CASES for name in env.cases):
        try:
            sweep = thread_sweep(env)
        except Exception as e:
            failures["threads sweep"] = "%s: %s" % (type(e).__name__, e)
    rec = recommend(env, sweep, cases)
    if sweep is not None:
        print("\n== threads: one tensor, 1 thread vs %d (cynag_kernels.nesterov_ag_cpu) =="
              % sweep["threads"])
    else:
        print()
    print("\n".join(rec["text"]))
    sys.stdout.flush()

    results = {
        "tool": "cynag.bench", "format": 2, "started": env.started, "argv": sys.argv[1:],
        "machine": info,
        "settings": {"dtype": env.dtype.name, "threads": list(env.threads),
                     "rounds": env.rounds, "warmup_calls": env.warmup,
                     "min_sample_s": env.min_sample_s, "lr": LR, "momentum": MOMENTUM,
                     "scale": env.scale, "cases": env.cases,
                     "accesses_per_element": ACCESSES},
        "user_path": user_path,
        "cases": cases,
        "failures": failures,
        "recommendation": rec,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=_json_default)
        progress("wrote %s" % args.json, final=True)
    if args.plot:
        if not cases:
            progress("no case ran: no plot written", final=True)
        elif all(c.get("kind") == "hooks" for c in cases):
            progress("only hook cases ran: no plot written", final=True)
        else:
            plot(results, args.plot)
            progress("wrote %s" % args.plot, final=True)
    return 0


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
