"""Parity cases: cynag against real Chainer 7.8.1, in one process.

This script runs in the Chainer environment of ``tests/chainer_env.py``
(an interpreter where both ``chainer`` and ``cynag`` import); pytest drives it
from ``tests/test_chainer_parity.py``::

    python chainer_parity_cases.py RESULTS.json GROUP [GROUP ...]

Each case builds the same situation in both frameworks, runs it, and raises
``AssertionError`` (with the first difference) unless the outcomes agree:
arrays and NesterovAG ``v`` states bit for bit, hook call sequences, exception
types, warning categories and messages, link/parameter paths and order.
Results are written to RESULTS.json after every case, as
``{"meta": {...}, "cases": {name: {"group", "ok", "error", "seconds"}}}``.

Importing this module without Chainer (as the pytest process does, to list the
cases) only registers the case names.
"""
import functools
import json
import os
import sys
import time
import traceback
import warnings

import numpy as np

try:
    import chainer
    import chainer.functions as F
    import chainer.links as L
    from chainer.optimizers import nesterov_ag as _chainer_nesterov_ag
except ImportError:  # listing the cases from the main environment
    chainer = None

try:
    import cynag
    from cynag.optimizers import nesterov_ag as _cynag_nesterov_ag
except ImportError:
    cynag = None

def case_registry():
    """(CASES, case, case_names) for a module of cases.

    CASES maps group -> [(case name, function)] in definition order;
    ``@case(group)`` registers a function; ``case_names()`` lists
    ``(group, name)`` pairs.
    """
    cases = {}

    def case(group):
        def deco(fn):
            cases.setdefault(group, []).append((fn.__name__, fn))
            return fn
        return deco

    def case_names():
        return [(g, n) for g, fns in cases.items() for n, _ in fns]

    return cases, case, case_names


CASES, case, case_names = case_registry()


# ---------------------------------------------------------------------------
# The two frameworks behind one interface
# ---------------------------------------------------------------------------
class _Framework:
    def __init__(self, name, mod, optimizer_mod, nesterov_mod):
        self.name = name
        self.mod = mod
        self.Link = mod.Link
        self.Chain = mod.Chain
        self.ChainList = mod.ChainList
        self.Parameter = mod.Parameter
        self.NesterovAG = mod.optimizers.NesterovAG
        self.NesterovAGRule = nesterov_mod.NesterovAGRule
        self.default_hyperparam = nesterov_mod._default_hyperparam
        self.Hyperparameter = optimizer_mod.Hyperparameter
        self.HyperparameterProxy = optimizer_mod.HyperparameterProxy
        self.UpdateRule = optimizer_mod.UpdateRule
        self.GradientMethod = optimizer_mod.GradientMethod

    def __repr__(self):
        return self.name


def _frameworks():
    ch = _Framework("chainer", chainer, chainer.optimizer, _chainer_nesterov_ag)
    cy = _Framework("cynag", cynag, cynag.optimizer, _cynag_nesterov_ag)
    return ch, cy


# ---------------------------------------------------------------------------
# Comparison helpers
# ---------------------------------------------------------------------------
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.view(_UINT[a.dtype.itemsize]) if a.dtype.kind == "f" else a


def assert_same_array(label, expected, actual):
    """``actual`` (cynag) must equal ``expected`` (Chainer) bit for bit."""
    if expected is None or actual is None:
        if expected is not None or actual is not None:
            raise AssertionError("%s: chainer has %s, cynag has %s" % (
                label, "None" if expected is None else "an array",
                "None" if actual is None else "an array"))
        return
    e, a = np.asarray(expected), np.asarray(actual)
    if type(expected) is not type(actual):
        raise AssertionError("%s: chainer gives a %s, cynag a %s"
                             % (label, type(expected).__name__, type(actual).__name__))
    if e.dtype != a.dtype or e.shape != a.shape:
        raise AssertionError("%s: chainer %s %s, cynag %s %s"
                             % (label, e.dtype, e.shape, a.dtype, a.shape))
    if np.array_equal(e, a) and np.array_equal(_bits(e), _bits(a)):
        return
    diff = np.argwhere(_bits(e) != _bits(a))
    idx = tuple(diff[0]) if e.ndim else ()
    raise AssertionError(
        "%s: %d of %d elements differ; first at %s: chainer %r (bits %s), cynag %r (bits %s)"
        % (label, len(diff), e.size, idx, e[idx], hex(int(_bits(e)[idx])), a[idx],
           hex(int(_bits(a)[idx]))))


def assert_same_nan_aware(label, expected, actual):
    """Bit for bit, except that any NaN matches any NaN (payloads may differ)."""
    if expected is None or actual is None:
        assert_same_array(label, expected, actual)
        return
    e, a = np.asarray(expected), np.asarray(actual)
    if e.dtype != a.dtype or e.shape != a.shape or e.dtype.kind != "f":
        assert_same_array(label, expected, actual)
        return
    assert_same_array(label + " NaN positions", np.isnan(e), np.isnan(a))
    assert_same_array(label, np.where(np.isnan(e), 0, e), np.where(np.isnan(a), 0, a))


def assert_same(label, expected, actual):
    """Plain values / lists: chainer's ``expected`` must equal cynag's ``actual``."""
    if expected == actual:
        return
    if isinstance(expected, list) and isinstance(actual, list):
        for i, (e, a) in enumerate(zip(expected, actual)):
            if e != a:
                raise AssertionError("%s: entry %d differs:\n  chainer: %r\n  cynag:   %r\n"
                                     "(chainer has %d entries, cynag %d)"
                                     % (label, i, e, a, len(expected), len(actual)))
        raise AssertionError("%s: chainer has %d entries, cynag %d; first extra: %r"
                             % (label, len(expected), len(actual),
                                (expected[len(actual):] or actual[len(expected):])[0]))
    raise AssertionError("%s:\n  chainer: %r\n  cynag:   %r" % (label, expected, actual))


def outcome(fn, *args, **kwargs):
    """('ok', repr(result)) or ('raise', exception type name)."""
    try:
        r = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the type is the outcome
        return ["raise", type(e).__name__]
    return ["ok", r if isinstance(r, (bool, int, float, str, type(None))) else repr(r)]


def caught_warnings(fn, *args, **kwargs):
    """Run ``fn``; return (outcome, [[category, message], ...])."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = outcome(fn, *args, **kwargs)
    return res, [[x.category.__name__, str(x.message)] for x in w]


def compare_scenario(scenario, *args):
    """Run ``scenario(fw, *args)`` for both frameworks and compare the logs."""
    ch, cy = _frameworks()
    log_ch = scenario(ch, *args)
    log_cy = scenario(cy, *args)
    assert_same(scenario.__name__, log_ch, log_cy)
    return log_ch


def compare_links(label, ch_link, cy_link, ch_opt=None, cy_opt=None):
    """Same parameter paths, arrays, grads, rule states, t and enabled flags."""
    ch_params = list(ch_link.namedparams())
    cy_params = list(cy_link.namedparams())
    assert_same(label + " paths", [p for p, _ in ch_params], [p for p, _ in cy_params])
    for (path, cp), (_, yp) in zip(ch_params, cy_params):
        lab = "%s %s" % (label, path)
        assert_same_array(lab + " array", cp.array, yp.array)
        cg = cp.grad if cp.array is not None else None
        assert_same_array(lab + " grad", cg, yp.grad if yp.array is not None else None)
        cr, yr = cp.update_rule, yp.update_rule
        assert_same(lab + " has rule", cr is None, yr is None)
        if cr is None:
            continue
        assert_same(lab + " rule.t", cr.t, yr.t)
        assert_same(lab + " rule.enabled", cr.enabled, yr.enabled)
        cs, ys = cr.state, yr.state
        assert_same(lab + " state is None", cs is None, ys is None)
        if cs is not None:
            assert_same(lab + " state keys", sorted(cs), sorted(ys))
            for k in cs:
                assert_same_array("%s state[%r]" % (lab, k), cs[k], ys[k])
    if ch_opt is not None:
        assert_same(label + " optimizer.t", ch_opt.t, cy_opt.t)
        assert_same(label + " optimizer.epoch", ch_opt.epoch, cy_opt.epoch)


# ---------------------------------------------------------------------------
# Trajectories: 300 steps, many shapes and layouts, bit for bit
# ---------------------------------------------------------------------------
def _array_factories(dtype, big=False):
    """name -> (make_param, make_grad(rng)): the same arrays for both frameworks.

    ``big`` adds a parameter above the OpenMP threshold (the parallel path).
    """
    dtype = np.dtype(dtype)

    def normal(seed, shape):
        return np.random.RandomState(seed).standard_normal(shape).astype(dtype)

    def c_param(seed, shape):
        return lambda: normal(seed, shape)

    def c_grad(shape):
        return lambda rng: rng.standard_normal(shape).astype(dtype)

    def f_grad(shape):
        return lambda rng: np.asfortranarray(rng.standard_normal(shape).astype(dtype))

    def t_grad(shape):  # transposed view of a C array
        return lambda rng: rng.standard_normal(shape[::-1]).astype(dtype).T

    factories = {
        "a_scalar": (c_param(1, ()), c_grad(())),
        "b_empty": (c_param(2, (0,)), c_grad((0,))),
        "c_empty3d": (c_param(3, (1, 0, 2)), c_grad((1, 0, 2))),
        "d_345": (c_param(4, (3, 4, 5)), c_grad((3, 4, 5))),
        "e_vec": (c_param(5, (7,)), c_grad((7,))),
        "f_fortran": (lambda: np.asfortranarray(normal(6, (4, 6))), f_grad((4, 6))),
        "g_transposed": (lambda: normal(7, (5, 3)).T, t_grad((3, 5))),
        "h_strided": (lambda: normal(8, (8, 9))[::2, 1::3], c_grad((4, 3))),
        "h2_strided_grad": (c_param(15, (4, 3)), lambda rng: (
            rng.standard_normal((8, 7)).astype(dtype)[1::2, ::2][:, :3])),
        "i_transposed3d": (lambda: normal(9, (4, 5, 6)).transpose(1, 2, 0), c_grad((5, 6, 4))),
        "j_neg_stride": (lambda: normal(10, (6, 5))[::-1, ::2], t_grad((6, 3))),
        "l_cleared": (c_param(12, (2, 3)), c_grad((2, 3))),
        "m_frozen": (c_param(13, (3, 2)), c_grad((3, 2))),
        "n_toggled": (c_param(14, (5,)), c_grad((5,))),
    }
    if big:
        factories["k_big"] = (c_param(11, (300, 250)), c_grad((300, 250)))
    return factories


def _build_link(fw, factories):
    link = fw.Link()
    with link.init_scope():
        for name, (make_param, _) in factories.items():
            setattr(link, name, fw.Parameter(make_param()))
        link.u_uninit = fw.Parameter()
    return link


def _like(x, value):
    """``value`` as the same kind of scalar as ``x``."""
    if isinstance(x, np.ndarray):
        return np.array(value, dtype=x.dtype)
    if isinstance(x, float):
        return value
    return type(x)(value)


def _run_trajectory(dtype, lr, momentum, steps=300, seed=0, big=False):
    ch, cy = _frameworks()
    factories = _array_factories(dtype, big)
    links, opts = [], []
    for fw in (ch, cy):
        link = _build_link(fw, factories)
        opt = fw.NesterovAG(lr=lr, momentum=momentum).setup(link)
        link.m_frozen.update_rule.enabled = False
        link.u_uninit.cleargrad()   # Chainer needs it to read a None grad
        # Added after setup: no update rule, never updated.
        with link.init_scope():
            link.z_late = fw.Parameter(np.arange(4, dtype=dtype))
        links.append(link)
        opts.append(opt)
    names = list(factories)
    k = steps // 300 or 1
    for step in range(steps):
        for link, opt in zip(links, opts):
            # Mid-run changes, the same for both frameworks.
            if step == 40 * k:
                opt.lr = _like(lr, 0.0123)
            if step == 60 * k:
                opt.momentum = 0.8
            if step == 80 * k:
                link.d_345.update_rule.hyperparam.lr = 0.07
                link.e_vec.update_rule.hyperparam.momentum = np.float32(0.3)
                getattr(link, "k_big", link.f_fortran).update_rule.hyperparam.lr = \
                    np.float64(0.002)
            if step == 120 * k:
                link.n_toggled.update_rule.enabled = False
            if step == 160 * k:
                link.n_toggled.update_rule.enabled = True
            if step == 200 * k:
                del link.d_345.update_rule.hyperparam.lr
                opt.hyperparam.lr = lr
                opt.hyperparam.momentum = momentum
            if step == 240 * k:
                link.h_strided.update_rule.hyperparam.momentum = 0.0
                link.g_transposed.update_rule.hyperparam.lr = 3.0
            # The same gradients, with the same memory layouts, for both.
            rng = np.random.RandomState(seed * 100003 + step)
            for name in names:
                getattr(link, name).grad = factories[name][1](rng)
            link.z_late.grad = rng.standard_normal(4).astype(dtype)
            if step >= 100 and step % 7 == 0:
                link.l_cleared.cleargrad()   # reallocated as zeros by update()
            link.u_uninit.cleargrad()
            opt.update()
        compare_links("step %d" % step, links[0], links[1], opts[0], opts[1])
    # The frozen parameter never moved and has no state.
    assert_same_array("frozen param", factories["m_frozen"][0](), links[1].m_frozen.array)
    assert_same("frozen state", None, links[1].m_frozen.update_rule.state)


_CONFIGS = [
    ("lr0.01_m0.9", 0.01, 0.9),
    ("lr1e-3_m0.99", 1e-3, 0.99),
    ("lr0.5_m0.5", 0.5, 0.5),
    ("lr3.0_m0", 3.0, 0.0),
    ("np32_lr1e-3_m0.99", np.float32(1e-3), np.float32(0.99)),
    ("np32_lr0.5_m0.5", np.float32(0.5), np.float32(0.5)),
    ("np64_lr0.3_np32_m0.7", np.float64(0.3), np.float32(0.7)),
    ("int_lr3_m0", 3, 0),
    ("0d_arrays_lr0.02_m0.9f32", np.array(0.02), np.array(0.9, np.float32)),
]


def _make_trajectory_case(dtype, cfg, big):
    label, lr, momentum = cfg

    def fn():
        _run_trajectory(dtype, lr, momentum, big=big)

    fn.__name__ = "trajectory_%s_%s" % (np.dtype(dtype).name, label)
    return fn


for _dtype in (np.float32, np.float64):
    for _i, _cfg in enumerate(_CONFIGS):
        # The first configuration also updates a parameter large enough for
        # OpenMP threads (slow where cores are shared: only there).
        case("trajectory")(_make_trajectory_case(_dtype, _cfg, big=_i == 0))


@case("trajectory")
def trajectory_float64_params_float32_scalars_long():
    """600 steps of float64 arrays with numpy.float32 hyperparameters."""
    _run_trajectory(np.float64, np.float32(0.05), np.float32(0.95), steps=600, seed=3)


def _nan_aware_same(label, expected, actual):
    """Bit-identical, except that any NaN matches any NaN (payloads may differ)."""
    e, a = np.asarray(expected), np.asarray(actual)
    if e.dtype != a.dtype or e.shape != a.shape:
        raise AssertionError("%s: chainer %s %s, cynag %s %s"
                             % (label, e.dtype, e.shape, a.dtype, a.shape))
    assert_same_array(label + " NaN positions", np.isnan(e), np.isnan(a))
    assert_same_array(label, np.where(np.isnan(e), 0, e), np.where(np.isnan(a), 0, a))


@case("trajectory")
def special_values_inf_nan_subnormal_signed_zero():
    """inf/NaN gradients, overflow, subnormals and signed zeros, 30 steps."""
    ch, cy = _frameworks()
    for dtype in (np.float32, np.float64):
        info = np.finfo(dtype)
        tiny = info.tiny
        p0 = np.array([0.0, -0.0, 1.0, -1.0, tiny, tiny / 8, -tiny / 4, info.max / 2,
                       -info.max / 2, 3.5, 1e-3, 0.0, -0.0, 2.0, 7.0, -5.0], dtype)
        grads = [
            np.array([0.0, -0.0, np.inf, -np.inf, np.nan, tiny, -tiny, info.max, info.max,
                      -0.0, 0.0, tiny / 16, -tiny / 16, 1.0, -1.0, 0.5], dtype),
            np.array([-0.0, 0.0, 1.0, 1.0, 0.0, tiny / 2, tiny / 2, -info.max, 0.0,
                      np.nan, 1e-30, 0.0, 0.0, np.inf, 0.0, -0.0], dtype),
        ]
        for lr, m in ((0.01, 0.9), (1.0, 0.0), (1e-30, 0.5), (2.0, 0.99)):
            pair = []
            for fw in (ch, cy):
                link = fw.Link()
                with link.init_scope():
                    link.W = fw.Parameter(p0.copy())
                pair.append((link, fw.NesterovAG(lr=lr, momentum=m).setup(link)))
            with np.errstate(all="ignore"):
                for step in range(30):
                    for link, opt in pair:
                        link.W.grad = grads[step % 2].copy() if step < 4 else \
                            (grads[1] * dtype(0.5) ** step).astype(dtype)
                        opt.update()
                    lab = "%s lr=%r m=%r step %d" % (np.dtype(dtype).name, lr, m, step)
                    (cl, _), (yl, _) = pair
                    _nan_aware_same(lab + " param", cl.W.array, yl.W.array)
                    _nan_aware_same(lab + " v", cl.W.update_rule.state["v"],
                                    yl.W.update_rule.state["v"])


@case("trajectory")
def shared_parameter_and_replaced_rule():
    """A parameter shared by two children (updated twice a step) and a user-set rule."""
    ch, cy = _frameworks()
    models, opts = [], []
    for fw in (ch, cy):
        shared = fw.Parameter(np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3))
        root = fw.Chain()
        with root.init_scope():
            root.a = fw.Link()
            root.b = fw.Link()
            root.c = fw.Link()
        with root.a.init_scope():
            root.a.W = shared
        with root.b.init_scope():
            root.b.W = shared
        with root.c.init_scope():
            root.c.W = fw.Parameter(np.ones(4, np.float64))
        opt = fw.NesterovAG(lr=0.05, momentum=0.8).setup(root)
        # A rule set by hand, with its own (module default) parent.
        root.c.W.update_rule = fw.NesterovAGRule(lr=0.3)
        models.append(root)
        opts.append(opt)
    rng = np.random.RandomState(9)
    for step in range(50):
        g1 = rng.standard_normal((2, 3)).astype(np.float32)
        g2 = rng.standard_normal(4)
        for root, opt in zip(models, opts):
            root.a.W.grad = g1.copy()
            root.c.W.grad = g2.copy()
            opt.update()
        compare_links("step %d" % step, models[0], models[1], opts[0], opts[1])


# ---------------------------------------------------------------------------
# float16: cynag computes in float32 and stores float16
# ---------------------------------------------------------------------------
def _ulp16(x):
    """Spacing of float16 at |x| (as float64)."""
    return np.spacing(np.abs(np.asarray(x, np.float16))).astype(np.float64)


def _f16_pair(lr, momentum, shape, seed):
    ch, cy = _frameworks()
    p0 = np.random.RandomState(seed).standard_normal(shape).astype(np.float16)
    out = []
    for fw in (ch, cy):
        link = fw.Link()
        with link.init_scope():
            link.W = fw.Parameter(p0.copy())
        opt = fw.NesterovAG(lr=lr, momentum=momentum).setup(link)
        out.append((link, opt))
    return p0, out


def _exact_step(p, v, g, lr, m):
    p, v, g = (np.asarray(a, np.float64) for a in (p, v, g))
    lr, m = float(lr), float(m)
    v_new = v * m - lr * g
    return p + m * m * v_new - (1 + m) * lr * g, v_new


@case("float16")
def float16_single_steps_closer_to_exact():
    """From the same float16 state, each cynag step is at least as close to exact math."""
    for lr, m in ((0.01, 0.9), (0.1, 0.5), (1e-3, 0.99), (0.5, 0.0)):
        _, ((cl, copt), (yl, yopt)) = _f16_pair(lr, m, (64, 33), seed=1)
        rng = np.random.RandomState(2)
        err_ch_total = err_cy_total = 0.0
        for step in range(20):
            if step:
                # Start cynag from Chainer's state.
                yl.W.array[...] = cl.W.array
                yl.W.update_rule.state["v"][...] = cl.W.update_rule.state["v"]
            v_before = (np.zeros_like(cl.W.array) if cl.W.update_rule.state is None
                        else cl.W.update_rule.state["v"].copy())
            p_before = cl.W.array.copy()
            g = rng.standard_normal(p_before.shape).astype(np.float16)
            cl.W.grad = g.copy()
            yl.W.grad = g.copy()
            copt.update()
            yopt.update()
            p_ref, v_ref = _exact_step(p_before, v_before, g, lr, m)
            p64, v64, g64 = (a.astype(np.float64) for a in (p_before, v_before, g))
            v_y = yl.W.update_rule.state["v"].astype(np.float64)
            # What a faithful float16 result may be off by: one ulp of the
            # result, the float32 arithmetic, and (for param) the rounding of
            # the stored float16 v it is computed from.
            tol_v = _ulp16(v_ref) + 2.0 ** -21 * (abs(m) * np.abs(v64) + abs(lr) * np.abs(g64))
            tol_p = (_ulp16(p_ref) + m * m * np.abs(v_y - v_ref) + 2.0 ** -21
                     * (np.abs(p64) + m * m * np.abs(v_y) + (1 + m) * lr * np.abs(g64)))
            for what, ref, tol, c, y in (("v", v_ref, tol_v, cl.W.update_rule.state["v"],
                                          yl.W.update_rule.state["v"]),
                                         ("param", p_ref, tol_p, cl.W.array, yl.W.array)):
                assert_same("%s dtype" % what, str(c.dtype), str(y.dtype))
                err_c = np.abs(c.astype(np.float64) - ref)
                err_y = np.abs(y.astype(np.float64) - ref)
                bad = (err_y > err_c) & (err_y > tol)
                if bad.any():
                    i = tuple(np.argwhere(bad)[0])
                    raise AssertionError(
                        "lr=%r m=%r step %d %s%s: exact %r, chainer %r (err %g), cynag %r "
                        "(err %g: more than chainer's and more than a faithful float16 "
                        "result may be off, %g)"
                        % (lr, m, step, what, i, ref[i], c[i], err_c[i], y[i], err_y[i], tol[i]))
                err_ch_total += err_c.sum()
                err_cy_total += err_y.sum()
        if err_cy_total > err_ch_total:
            raise AssertionError("lr=%r m=%r: total error cynag %g > chainer %g"
                                 % (lr, m, err_cy_total, err_ch_total))


@case("float16")
def float16_trajectory_no_less_accurate():
    """20 free float16 steps against a float64 run from the same start.

    The float16 trajectories of Chainer (float16 numpy arithmetic, float16
    coefficients) and cynag (float32 arithmetic, float16 storage) drift
    apart by many ulps where values cancel, so they are not compared element
    by element: at every step cynag's mean and RMS error against the float64
    run must not exceed Chainer's, nor its largest error 1.5 times Chainer's.
    """
    ch, _ = _frameworks()
    for lr, m in ((0.01, 0.9), (0.1, 0.5), (1e-3, 0.99), (0.05, 0.95)):
        p0, ((cl, copt), (yl, yopt)) = _f16_pair(lr, m, (50, 40), seed=5)
        ref = ch.Link()
        with ref.init_scope():
            ref.W = ch.Parameter(p0.astype(np.float64))
        ropt = ch.NesterovAG(lr=lr, momentum=m).setup(ref)
        rng = np.random.RandomState(6)
        for step in range(20):
            g = rng.standard_normal(p0.shape).astype(np.float16)
            cl.W.grad, yl.W.grad, ref.W.grad = g.copy(), g.copy(), g.astype(np.float64)
            copt.update()
            yopt.update()
            ropt.update()
            for what, c, y, r in (("param", cl.W.array, yl.W.array, ref.W.array),
                                  ("v", cl.W.update_rule.state["v"],
                                   yl.W.update_rule.state["v"], ref.W.update_rule.state["v"])):
                assert_same("%s dtype" % what, "float16", str(y.dtype))
                e_c = np.abs(c.astype(np.float64) - r)
                e_y = np.abs(y.astype(np.float64) - r)
                stats = [("mean", e_c.mean(), e_y.mean(), 1.0),
                         ("RMS", np.sqrt((e_c ** 2).mean()), np.sqrt((e_y ** 2).mean()), 1.0),
                         ("max", e_c.max(), e_y.max(), 1.5)]
                for stat, sc, sy, factor in stats:
                    if sy > factor * sc and sy > 0:
                        raise AssertionError(
                            "lr=%r m=%r step %d %s: %s error against float64: cynag %g, "
                            "chainer %g" % (lr, m, step, what, stat, sy, sc))


# ---------------------------------------------------------------------------
# Hooks: timing, order, arguments, errors
# ---------------------------------------------------------------------------
def _hook_scenario(fw):
    log = []
    link = fw.Link()
    with link.init_scope():
        link.W = fw.Parameter(np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3))
        link.b = fw.Parameter(np.array([0.5, -0.25, 2.0], np.float32))
        link.c = fw.Parameter(np.array(1.5, np.float32))
    opt = fw.NesterovAG(lr=0.1, momentum=0.9)

    before = {}

    def changed():
        return [n for n, p in link.namedparams() if not np.array_equal(p.array, before[n])]

    def grads():
        return [None if p.grad is None else float(np.asarray(p.grad, np.float64).sum())
                for _, p in link.namedparams()]

    class OptHook:
        def __init__(self, name, timing=None):
            self.name = name
            if timing is not None:
                self.timing = timing

        def __call__(self, optimizer):
            log.append(["opt", self.name, optimizer is opt, optimizer.t, changed(), grads()])

    class ClearB(OptHook):
        def __call__(self, optimizer):
            super().__call__(optimizer)
            link.b.cleargrad()    # reallocated as zeros right after this hook

    class ScaleGrads(OptHook):
        def __call__(self, optimizer):
            super().__call__(optimizer)
            for _, p in optimizer.target.namedparams():
                p.grad *= np.float32(0.5)

    class EachParam:
        call_for_each_param = True

        def __init__(self, name, timing=None):
            self.name = name
            if timing is not None:
                self.timing = timing

        def __call__(self, rule, param):
            log.append(["each", self.name, opt.t, param.name, rule is param.update_rule,
                        rule.t, changed()])
            param.grad += np.float32(0.01) * param.array

    def plain_hook(optimizer):
        log.append(["opt", "plain_hook", optimizer.t, changed()])

    def rule_hook(name):
        def hook(rule, param):
            log.append(["rule", name, param.name, rule is param.update_rule, rule.t, opt.t,
                        changed(), None if rule.state is None else sorted(rule.state)])
        hook.__name__ = name
        return hook

    class RuleHookPost:
        timing = "post"
        name = "rule_attr_post"

        def __call__(self, rule, param):
            log.append(["rule", self.name, param.name, rule.t, changed()])

    # Before setup: every hook method is an error.
    log.append(["add before setup", outcome(opt.add_hook, OptHook("early"))])
    log.append(["remove before setup", outcome(opt.remove_hook, "early")])
    log.append(["call_hooks before setup", outcome(opt.call_hooks)])
    opt.setup(link)

    log.append(["add pre attr", outcome(opt.add_hook, OptHook("h_pre_attr", "pre"))])
    log.append(["add post attr", outcome(opt.add_hook, OptHook("h_post_attr", "post"))])
    log.append(["add no attr", outcome(opt.add_hook, OptHook("h_no_attr"))])
    log.append(["add plain function", outcome(opt.add_hook, plain_hook)])
    log.append(["add attr pre, timing post",
                outcome(opt.add_hook, OptHook("h_forced_post", "pre"), timing="post")])
    log.append(["add attr post, timing pre",
                outcome(opt.add_hook, OptHook("h_forced_pre", "post"), timing="pre")])
    log.append(["add explicit name", outcome(opt.add_hook, OptHook("ignored"), name="renamed")])
    log.append(["add invalid attr"] + list(caught_warnings(opt.add_hook,
                                                           OptHook("h_bad", "bogus"))))
    log.append(["add clear b", outcome(opt.add_hook, ClearB("h_clear_b", "pre"))])
    log.append(["add after clear", outcome(opt.add_hook, OptHook("h_after_clear", "pre"))])
    log.append(["add scale", outcome(opt.add_hook, ScaleGrads("h_scale", "pre"))])
    log.append(["add each pre", outcome(opt.add_hook, EachParam("each_pre", "pre"))])
    log.append(["add each post", outcome(opt.add_hook, EachParam("each_post", "post"))])
    log.append(["add each auto", outcome(opt.add_hook, EachParam("each_auto"))])
    # Errors.
    log.append(["duplicate pre", outcome(opt.add_hook, OptHook("h_pre_attr", "pre"))])
    log.append(["duplicate across timings", outcome(opt.add_hook, OptHook("h_post_attr", "pre"))])
    log.append(["duplicate explicit", outcome(opt.add_hook, plain_hook, name="h_no_attr")])
    log.append(["not callable", outcome(opt.add_hook, 3, name="three")])
    log.append(["bad timing argument", outcome(opt.add_hook, OptHook("h_x"), timing="later")])
    log.append(["no name", outcome(opt.add_hook, functools.partial(plain_hook))])
    log.append(["remove missing", outcome(opt.remove_hook, "missing")])
    log.append(["call_hooks bad timing", outcome(opt.call_hooks, "during")])

    # Rule-level hooks.
    wr, br = link.W.update_rule, link.b.update_rule
    log.append(["rule add pre", outcome(wr.add_hook, rule_hook("r_pre"), timing="pre")])
    log.append(["rule add post", outcome(wr.add_hook, rule_hook("r_post"), timing="post")])
    log.append(["rule add attr post", outcome(wr.add_hook, RuleHookPost())])
    log.append(["rule add auto no attr", outcome(br.add_hook, rule_hook("r_b_auto"))])
    log.append(["rule add named", outcome(br.add_hook, rule_hook("x"), name="r_b_named",
                                          timing="post")])
    log.append(["rule duplicate", outcome(wr.add_hook, rule_hook("r_pre"), timing="post")])
    log.append(["rule not callable", outcome(wr.add_hook, None, name="none")])
    log.append(["rule bad timing", outcome(wr.add_hook, rule_hook("r_q"), timing="never")])
    log.append(["rule remove missing", outcome(wr.remove_hook, "missing")])

    rng = np.random.RandomState(0)
    for step in range(5):
        for _, p in link.namedparams():
            p.grad = rng.standard_normal(p.shape).astype(np.float32)
        if step == 1:
            link.c.update_rule.enabled = False
        if step == 2:
            log.append(["remove no attr", outcome(opt.remove_hook, "h_no_attr")])
            log.append(["remove post", outcome(opt.remove_hook, "h_post_attr")])
            log.append(["remove each post", outcome(opt.remove_hook, "each_post")])
            log.append(["rule remove pre", outcome(wr.remove_hook, "r_pre")])
            log.append(["rule remove post", outcome(br.remove_hook, "r_b_named")])
            log.append(["re-add removed", outcome(opt.add_hook, OptHook("h_no_attr", "post"))])
        if step == 3:
            link.c.update_rule.enabled = True
        before.clear()
        before.update({n: p.array.copy() for n, p in link.namedparams()})
        log.append(["update", step])
        opt.update()
        log.append(["end", opt.t, [p.update_rule.t for p in link.params()]])

    # Explicit calls of the hooks.
    before.update({n: p.array.copy() for n, p in link.namedparams()})
    log.append(["call_hooks()", outcome(opt.call_hooks)])
    log.append(["call_hooks('post')", outcome(opt.call_hooks, "post")])
    log.append(["final", [[n, p.array.tolist(), p.update_rule.state["v"].tolist()]
                          for n, p in link.namedparams()]])

    # setup() again drops the optimizer hooks (rule hooks go with the old rules).
    opt.setup(link)
    log.append(["re-setup t", opt.t, [p.update_rule.t for p in link.params()]])
    for _, p in link.namedparams():
        p.grad = np.ones(p.shape, np.float32)
    opt.update()
    log.append(["after re-setup", opt.t, [[n, p.array.tolist()] for n, p in link.namedparams()]])
    log.append(["add after re-setup", outcome(opt.add_hook, OptHook("h_pre_attr", "pre"))])
    return log


@case("hooks")
def hooks_timing_order_and_errors():
    compare_scenario(_hook_scenario)


def _hook_chainer_link_scenario(fw):
    """Hooks of a cynag/chainer optimizer on a chainer.Link (update with a loss)."""
    log = []
    model = L.Linear(3, 2, initialW=np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
                     initial_bias=np.array([0.1, -0.2], np.float32))
    opt = fw.NesterovAG(lr=0.05, momentum=0.5).setup(model)

    class Each:
        call_for_each_param = True
        timing = "post"
        name = "each"

        def __call__(self, rule, param):
            log.append(["each", param.name, rule.t, param.array.tolist()])

    def pre(optimizer):
        log.append(["pre", optimizer.t, [p.grad.tolist() for p in model.params()]])

    opt.add_hook(pre)
    opt.add_hook(Each())
    model.W.update_rule.add_hook(lambda r, p: log.append(["rule", r.t, p.grad.tolist()]),
                                 name="rule")
    x = np.random.RandomState(1).standard_normal((4, 3)).astype(np.float32)
    for _ in range(3):
        opt.update(lambda x: F.sum(model(x) ** 2), x)
    log.append(["end", opt.t, [p.array.tolist() for p in model.params()]])
    return log


@case("hooks")
def hooks_on_chainer_link_with_lossfun():
    compare_scenario(_hook_chainer_link_scenario)


# ---------------------------------------------------------------------------
# Hyperparameters, counters, epochs, deprecations
# ---------------------------------------------------------------------------
def _hp(h):
    return [repr(h), sorted((k, repr(v)) for k, v in h.get_dict().items())]


def _hyperparam_scenario(fw):
    log = []
    opt = fw.NesterovAG()
    log.append(["defaults", repr(opt.lr), repr(opt.momentum), _hp(opt.hyperparam),
                opt.hyperparam.parent is None, opt.t, opt.epoch, opt.target is None,
                opt.use_auto_new_epoch])
    log.append(["proxy", type(fw.NesterovAG.lr) is fw.HyperparameterProxy,
                fw.NesterovAG.lr.__doc__, fw.NesterovAG.momentum.__doc__])
    log.append(["missing on optimizer", outcome(lambda: opt.hyperparam.beta1)])
    log.append(["missing proxy", outcome(lambda: opt.nonexistent)])

    link = fw.Link()
    with link.init_scope():
        link.W = fw.Parameter(np.ones((2, 2), np.float32))
        link.b = fw.Parameter(np.zeros(2, np.float32))
    opt = fw.NesterovAG(lr=0.5, momentum=np.float32(0.3))
    log.append(["setup returns self", opt.setup(link) is opt, opt.target is link])
    wr, br = link.W.update_rule, link.b.update_rule
    log.append(["rule types", type(wr).__name__, wr is not br, wr.enabled, wr.t,
                wr.state is None, wr.is_elementwise, fw.UpdateRule.is_elementwise])
    log.append(["rule parent", wr.hyperparam.parent is opt.hyperparam, _hp(wr.hyperparam)])
    wr.hyperparam.lr = 0.2
    log.append(["override", _hp(wr.hyperparam), _hp(br.hyperparam), _hp(opt.hyperparam),
                sorted(vars(wr.hyperparam))])
    opt.lr = 0.7
    log.append(["opt.lr set", repr(opt.hyperparam.lr), repr(wr.hyperparam.lr),
                repr(br.hyperparam.lr)])
    opt.hyperparam.momentum = 0.1
    log.append(["hyperparam.momentum set", repr(opt.momentum), repr(wr.hyperparam.momentum)])
    del wr.hyperparam.lr
    log.append(["override deleted", repr(wr.hyperparam.lr), _hp(wr.hyperparam)])
    log.append(["delete missing", outcome(lambda: delattr(wr.hyperparam, "lr"))])
    log.append(["missing on rule", outcome(lambda: wr.hyperparam.eps)])

    h1 = fw.Hyperparameter()
    log.append(["empty", _hp(h1), outcome(lambda: h1.x), h1.parent is None])
    h1.a = 1
    h1.z = "s"
    h2 = fw.Hyperparameter(h1)
    h2.b = 2.5
    h3 = fw.Hyperparameter(h2)
    h3.a = 3
    log.append(["chain", _hp(h3), h3.a, h3.b, h3.z, h2.a, h3.parent is h2, h2.parent is h1,
                outcome(lambda: h3.c)])

    r = fw.NesterovAGRule()
    log.append(["standalone rule", _hp(r.hyperparam), r.hyperparam.parent is fw.default_hyperparam,
                _hp(fw.default_hyperparam)])
    log.append(["rule lr", _hp(fw.NesterovAGRule(lr=0.5).hyperparam),
                _hp(fw.NesterovAGRule(momentum=0.0).hyperparam),
                _hp(fw.NesterovAGRule(None, 0.25, 0.75).hyperparam)])
    h = fw.Hyperparameter()
    h.lr = 0.3
    r2 = fw.NesterovAGRule(h)
    log.append(["rule with partial parent", _hp(r2.hyperparam),
                outcome(lambda: r2.hyperparam.momentum)])
    r3 = fw.NesterovAGRule(h, momentum=0.5)
    log.append(["rule with partial parent + momentum", _hp(r3.hyperparam)])
    return log


@case("hyperparam")
def hyperparameter_chaining():
    compare_scenario(_hyperparam_scenario)


def _standalone_rule_scenario(fw):
    log = []
    rule = fw.NesterovAGRule(lr=0.1)
    p = fw.Parameter(np.arange(6, dtype=np.float32).reshape(2, 3))
    log.append(["initial grad", p.grad is None])
    rule.update(p)   # grad None: state created, nothing updated
    log.append(["no grad", rule.t, p.array.tolist(), sorted(rule.state),
                rule.state["v"].tolist()])
    rng = np.random.RandomState(4)
    for _ in range(4):
        p.grad = rng.standard_normal((2, 3)).astype(np.float32)
        rule.update(p)
    log.append(["after", rule.t, _bits(p.array).tolist(), _bits(rule.state["v"]).tolist()])
    rule.enabled = False
    p.grad = np.ones((2, 3), np.float32)
    rule.update(p)
    log.append(["disabled", rule.t, _bits(p.array).tolist()])
    rule.enabled = True
    p.cleargrad()
    rule.update(p)
    log.append(["cleared", rule.t, _bits(p.array).tolist(), _bits(rule.state["v"]).tolist()])
    p64 = fw.Parameter(np.linspace(0, 1, 5))
    r64 = fw.NesterovAGRule(fw.NesterovAG(lr=np.float32(0.3), momentum=0.6).hyperparam)
    for i in range(5):
        p64.grad = np.full(5, 0.1 * i)
        r64.update(p64)
    log.append(["float64 with optimizer parent", r64.t, _bits(p64.array).tolist(),
                _bits(r64.state["v"]).tolist()])
    return log


@case("hyperparam")
def standalone_rule_update():
    compare_scenario(_standalone_rule_scenario)


def _counters_scenario(fw):
    log = []
    link = fw.Link()
    with link.init_scope():
        link.W = fw.Parameter(np.ones(3, np.float32))
    opt = fw.NesterovAG().setup(link)
    log.append(["new_epoch", outcome(opt.new_epoch), opt.epoch])
    log.append(["auto without flag", outcome(opt.new_epoch, auto=True), opt.epoch])
    opt.use_auto_new_epoch = True
    log.append(["manual with flag", outcome(opt.new_epoch), opt.epoch])
    log.append(["auto with flag", outcome(opt.new_epoch, auto=True), opt.epoch])
    log.append(["auto positional", outcome(opt.new_epoch, True), opt.epoch])
    opt.use_auto_new_epoch = False
    for _ in range(3):
        link.W.grad = np.ones(3, np.float32)
        opt.update()
    log.append(["counters", opt.t, opt.epoch, link.W.update_rule.t])
    link.W.update_rule.enabled = False
    opt.update()
    log.append(["disabled counters", opt.t, link.W.update_rule.t])
    old_rule = link.W.update_rule
    opt.setup(link)
    log.append(["re-setup", opt.t, opt.epoch, link.W.update_rule is old_rule,
                link.W.update_rule.t, link.W.update_rule.enabled,
                link.W.update_rule.state is None])
    log.append(["use_cleargrads"] + list(caught_warnings(opt.use_cleargrads)))
    log.append(["use_cleargrads(False)"] + list(caught_warnings(opt.use_cleargrads, False)))
    log.append(["setup non-link", outcome(fw.NesterovAG().setup, np.zeros(3))])
    log.append(["setup None", outcome(fw.NesterovAG().setup, None)])
    return log


@case("hyperparam")
def counters_epochs_and_deprecations():
    compare_scenario(_counters_scenario)


# ---------------------------------------------------------------------------
# update(lossfun) with chainer links: cynag and chainer optimize identical copies
# ---------------------------------------------------------------------------
def _lossfun_pair(make_model, make_loss, lr, momentum, steps, inputs, use_cleargrads=True,
                  kwargs=None, tweak=None):
    ch, cy = _frameworks()
    models = [make_model(), make_model()]
    opts = [ch.NesterovAG(lr=lr, momentum=momentum).setup(models[0]),
            cy.NesterovAG(lr=lr, momentum=momentum).setup(models[1])]
    if not use_cleargrads:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            for o in opts:
                o.use_cleargrads(False)
    losses = [make_loss(m) for m in models]
    for step in range(steps):
        x = inputs(step)
        for model, opt, lossfun in zip(models, opts, losses):
            if tweak is not None:
                tweak(step, model, opt)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                opt.update(lossfun, x, **(kwargs or {}))
        compare_links("step %d" % step, models[0], models[1], opts[0], opts[1])


def _inputs(shape, dtype=np.float32, seed=0):
    rng = np.random.RandomState(seed)
    xs = [rng.standard_normal(shape).astype(dtype) for _ in range(8)]
    return lambda step: xs[step % len(xs)]


@case("lossfun")
def lossfun_chainer_link_sum_W_x():
    def make():
        link = chainer.Link()
        with link.init_scope():
            link.W = chainer.Parameter(np.random.RandomState(1).standard_normal((3, 4))
                                       .astype(np.float32))
        return link
    _lossfun_pair(make, lambda link: (lambda x: F.sum(link.W * x)), 0.01, 0.9, 100,
                  _inputs((3, 4)))


@case("lossfun")
def lossfun_linear_mse():
    W0 = np.random.RandomState(2).standard_normal((3, 5)).astype(np.float32)
    b0 = np.random.RandomState(3).standard_normal(3).astype(np.float32)
    t = np.random.RandomState(4).standard_normal((6, 3)).astype(np.float32)

    def make():
        return L.Linear(5, 3, initialW=W0.copy(), initial_bias=b0.copy())
    _lossfun_pair(make, lambda m: (lambda x: F.mean_squared_error(m(x), t)), 0.05, 0.95, 100,
                  _inputs((6, 5)))


@case("lossfun")
def lossfun_lazy_linear_float64_np32_hyperparams():
    """Linear(None, 3): parameters initialized by the first forward pass."""
    W0 = np.random.RandomState(5).standard_normal((3, 4))

    def make():
        return L.Linear(None, 3, initialW=W0.copy(), nobias=True)
    _lossfun_pair(make, lambda m: (lambda x: F.sum(F.tanh(m(x)) ** 2)), np.float32(0.1),
                  np.float32(0.9), 100, _inputs((5, 4), np.float64))


@case("lossfun")
def lossfun_chain_zerograds_disabled_layer_kwargs():
    """A two-layer Chain, use_cleargrads(False), a frozen layer, kwargs to the loss."""
    W1 = np.random.RandomState(6).standard_normal((4, 3)).astype(np.float32)
    W2 = np.random.RandomState(7).standard_normal((2, 4)).astype(np.float32)

    class MLP(chainer.Chain):
        def __init__(self):
            super().__init__()
            with self.init_scope():
                self.l1 = L.Linear(3, 4, initialW=W1.copy())
                self.l2 = L.Linear(4, 2, initialW=W2.copy())

        def forward(self, x):
            return self.l2(F.relu(self.l1(x)))

    def tweak(step, model, opt):
        if step == 30:
            model.l1.disable_update()
        if step == 60:
            model.l1.enable_update()
            opt.lr = 0.02
        if step == 80:
            model.l2.b.update_rule.hyperparam.momentum = 0.0

    _lossfun_pair(MLP, lambda m: (lambda x, scale=1.0: scale * F.sum(m(x) ** 2)), 0.01, 0.9,
                  100, _inputs((8, 3)), use_cleargrads=False, kwargs={"scale": 0.5},
                  tweak=tweak)


# ---------------------------------------------------------------------------
# Naming: paths and order of params, links and children
# ---------------------------------------------------------------------------
def _arr(seed, shape, dtype=np.float32):
    return np.random.RandomState(seed).standard_normal(shape).astype(dtype)


def _build_tree(fw):
    class Leaf(fw.Link):
        def __init__(self, seed):
            super().__init__()
            with self.init_scope():
                self.W = fw.Parameter(_arr(seed, (2, 3)))
                self.b = fw.Parameter(_arr(seed + 1, (3,)))

    class Root(fw.Chain):
        def __init__(self):
            super().__init__()
            with self.init_scope():
                self.l1 = Leaf(0)
                self.l2 = fw.ChainList(Leaf(10), Leaf(20))
                self.l10 = fw.Link(W=(2, 2), a=3, B=((2,), np.float64))
                self.Z = Leaf(30)
                self.p = fw.Parameter(_arr(40, (4,)))
                self.plain = np.zeros(2)             # not a parameter
            self.add_param("q", (2, 2))
            self.add_param("A", (1,), dtype=np.float64)
            self.add_param("init", (3,), initializer=2.0)
            self.outside = fw.Parameter(_arr(50, (2,)))   # outside init_scope
            self.add_link("k", fw.Link(x=(1,)))
            self.l2.add_link(Leaf(60))

    return Root()


def _describe_tree(root):
    paths = {id(p): path for path, p in root.namedparams()}
    link_paths = {id(l): path for path, l in root.namedlinks()}

    def dt(p):
        return None if p.array is None else str(p.array.dtype)

    return [
        ["namedparams", [[path, p.name, None if p.array is None else list(p.shape), dt(p)]
                         for path, p in root.namedparams()]],
        ["namedparams initialized", [path for path, _ in root.namedparams(False)]],
        ["params", [paths[id(p)] for p in root.params()]],
        ["params initialized", [paths[id(p)] for p in root.params(False)]],
        ["namedlinks", [[path, type(l).__name__, l.name] for path, l in root.namedlinks()]],
        ["namedlinks skipself", [path for path, _ in root.namedlinks(skipself=True)]],
        ["links", [link_paths[id(l)] for l in root.links()]],
        ["links skipself", [link_paths[id(l)] for l in root.links(skipself=True)]],
        ["children", [[c.name, link_paths[id(c)]] for c in root.children()]],
        ["l2 children", [c.name for c in root.l2.children()]],
        ["l2 namedparams", [path for path, _ in root.l2.namedparams()]],
        ["l2 namedlinks", [path for path, _ in root.l2.namedlinks()]],
    ]


def _naming_scenario(fw):
    root = _build_tree(fw)
    log = _describe_tree(root)
    log.append(["count_params", root.count_params()])
    log.append(["getitem", root["l1"] is root.l1, root.l2[1] is list(root.l2.children())[1],
                len(root.l2), root.l2[-1].name])
    log.append(["NaN fill", [[path, bool(np.isnan(p.array).all())] for path, p in
                             root.namedparams()]])
    log.append(["init scalar", root.init.array.tolist(), str(root.init.array.dtype)])
    return log


@case("naming")
def naming_nested_chain_chainlist():
    compare_scenario(_naming_scenario)


def _naming_mutation_scenario(fw):
    log = []
    root = _build_tree(fw)

    class Leaf(fw.Link):
        def __init__(self):
            super().__init__()
            with self.init_scope():
                self.w = fw.Parameter(np.zeros(2, np.float32))

    l2 = root.l2
    l2.append(Leaf())
    log.append(["append", [c.name for c in l2], [p for p, _ in root.namedparams()]])
    l2.insert(0, Leaf())
    log.append(["insert 0", [c.name for c in l2], [p for p, _ in l2.namedparams()]])
    l2.insert(len(l2), Leaf())
    log.append(["insert end", [c.name for c in l2]])
    del l2[1]
    log.append(["del 1", [c.name for c in l2], [p for p, _ in l2.namedlinks()]])
    l2[0] = Leaf()
    log.append(["setitem", [c.name for c in l2], [p for p, _ in l2.namedparams()]])
    l2[1:3] = [Leaf(), Leaf(), Leaf()]
    log.append(["setitem slice", [c.name for c in l2], len(l2)])
    log.append(["setitem bad index", outcome(l2.__setitem__, "a", Leaf())])
    del root.l1
    del root.p
    log.append(["delattr", [p for p, _ in root.namedparams()], [c.name for c in root.children()]])

    def register_in_chainlist():
        with l2.init_scope():
            l2.x = Leaf()
    log.append(["link in ChainList init_scope", outcome(register_in_chainlist)])

    def register_existing():
        with root.init_scope():
            root.Z = Leaf()
    log.append(["re-register child", outcome(register_existing)])
    log.append(["add_param existing", outcome(root.add_param, "q", (2,))])
    log.append(["add_link existing", outcome(root.add_link, "k", Leaf())])
    log.append(["add_link non-link", outcome(root.add_link, "new", np.zeros(2))])
    log.append(["param outside scope registered", "outside" in [p for p, _ in root.namedparams()]])
    ch2 = fw.Chain(b=Leaf(), a=Leaf(), c=fw.ChainList(Leaf()))
    log.append(["Chain(**links)", [p for p, _ in ch2.namedparams()],
                [p for p, _ in ch2.namedlinks()], [c.name for c in ch2.children()]])

    opt = fw.NesterovAG().setup(root)
    root.l2.disable_update()
    log.append(["disable l2", [[path, p.update_rule.enabled] for path, p in root.namedparams()],
                root.update_enabled, root.l2.update_enabled])
    root.disable_update()
    log.append(["disable all", root.update_enabled])
    root.Z.enable_update()
    log.append(["enable Z", [[path, p.update_rule.enabled] for path, p in root.namedparams()],
                root.update_enabled])
    root.cleargrads()
    log.append(["cleargrads", [p.grad is None for p in root.params()]])
    opt.update()
    log.append(["update", opt.t, [[path, p.update_rule.t, p.grad is None]
                                  for path, p in root.namedparams()]])
    return log


@case("naming")
def naming_mutations_and_update_flags():
    compare_scenario(_naming_mutation_scenario)


def _copy_scenario(fw):
    """copyparams / addgrads between two trees (and into uninitialized
    parameters, and with cleared gradients): the arrays, gradients and which
    gradients are the source's own arrays."""
    log = []
    a, b = _build_tree(fw), _build_tree(fw)
    for k, (_, p) in enumerate(sorted(b.namedparams())):
        if p.array is not None:
            p.array[...] = k + 0.5
            p.grad = np.full(p.shape, k + 0.25, p.dtype)
    for k, (_, p) in enumerate(sorted(a.namedparams())):
        if p.array is not None and k % 2:
            p.cleargrad()
        elif p.array is not None:
            p.grad = np.full(p.shape, -k, p.dtype)
    a.copyparams(b)
    a.addgrads(b)
    src = dict(b.namedparams())
    for path, p in sorted(a.namedparams()):
        log.append([path, None if p.array is None else p.array.tolist(),
                    None if p.grad is None else [p.grad.tolist(), str(p.grad.dtype)],
                    p.grad is src[path].grad and p.grad is not None])
    return log


@case("naming")
def naming_copyparams_and_addgrads():
    compare_scenario(_copy_scenario)


def _uninit_scenario(fw):
    log = []
    link = fw.Link()
    with link.init_scope():
        link.W = fw.Parameter(np.ones((2, 2), np.float32))
        link.u = fw.Parameter()
    link.add_param("v")
    log.append(["namedparams", [[p, q.array is None] for p, q in link.namedparams()]])
    log.append(["namedparams(False)", [p for p, _ in link.namedparams(False)]])
    log.append(["count_params"] + list(caught_warnings(link.count_params)))
    return log


@case("naming")
def naming_count_params_with_uninitialized():
    compare_scenario(_uninit_scenario)


def _parameter_scenario(fw):
    log = []

    def desc(p):
        arr = p.array
        g = p.grad if arr is not None else None
        return [None if arr is None else [str(arr.dtype), list(arr.shape), repr(arr.tolist())],
                None if g is None else [str(g.dtype), np.isnan(g).all().item()
                                        if g.size else None]]

    log.append(["scalar init", desc(fw.Parameter(2.0, (2,)))])
    log.append(["None init with shape", desc(fw.Parameter(None, (2,)))])
    log.append(["float64 array", desc(fw.Parameter(np.zeros(3)))])
    a = np.ones(2, np.float32)
    log.append(["array kept", fw.Parameter(a).array is a])

    def init_with(initializer, prep=None):
        p = fw.Parameter(initializer)
        if prep is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                getattr(p, prep)()
        p.initialize((2, 2))
        return desc(p)
    log.append(["initialize", init_with(None), init_with(3.0), init_with(None, "cleargrad"),
                init_with(None, "zerograd")])
    return log


@case("naming")
def parameter_construction_and_initialize():
    compare_scenario(_parameter_scenario)


# ---------------------------------------------------------------------------
# ---------------------------------------------------------------------------
# The step on chainer.Link models: cynag's optimizer against Chainer's, both
# on Chainer links (the divergences of a step that trusted change notices)
# ---------------------------------------------------------------------------
def _chainer_twins(build):
    """``[(chainer link, Chainer's optimizer), (chainer link, cynag's optimizer)]``."""
    out = []
    for opt_cls in (chainer.optimizers.NesterovAG, cynag.optimizers.NesterovAG):
        link = build()
        out.append([link, opt_cls(lr=0.1, momentum=0.9)])
    return out


def _two_chainer_params():
    link = chainer.Link()
    with link.init_scope():
        link.a = chainer.Parameter(np.array([1.0, 2.0], np.float32))
        link.b = chainer.Parameter(np.array([2.0, 3.0], np.float32))
    return link


def _compare_chainer_links(label, a, b):
    for (path, pa), (_, pb) in zip(a.namedparams(), b.namedparams()):
        assert_same_array("%s %s array" % (label, path), pa.array, pb.array)
        ra, rb = pa.update_rule, pb.update_rule
        assert_same("%s %s has rule" % (label, path), ra is None, rb is None)
        if ra is not None:
            assert_same("%s %s t" % (label, path), ra.t, rb.t)
            if ra.state:
                assert_same_array("%s %s v" % (label, path), ra.state["v"], rb.state["v"])


@case("step")
def edge_step_shared_gradient_after_a_step():
    """``b.grad = a.grad`` after a step with a rule-level WeightDecay on ``a``."""
    twins = _chainer_twins(_two_chainer_params)
    for link, opt in twins:
        opt.setup(link)
        for p in link.params():
            p.grad = np.ones(2, np.float32)
        opt.update()
        hook = (chainer.optimizer_hooks.WeightDecay if isinstance(
            opt, chainer.optimizers.NesterovAG) else cynag.optimizer_hooks.WeightDecay)(0.5)
        link.a.update_rule.add_hook(hook)
        for p in link.params():
            p.grad = np.ones(2, np.float32)
        opt.update()
        link.b.grad = link.a.grad
        opt.update()
    _compare_chainer_links("shared grad", twins[0][0], twins[1][0])


@case("step")
def edge_step_ndarray_subclasses_have_their_own_arithmetic():
    """A ``numpy.matrix`` or masked array as gradient, parameter or ``v``:
    Chainer's NumPy lines run on those objects (a matrix multiplies by a
    scalar through ``dot``, in float64), with rule-level and optimizer-level
    WeightDecay, Lasso and GradientHardClipping; nothing is refused."""
    wraps = {"matrix": np.asmatrix,
             "masked": lambda x: np.ma.masked_array(x, mask=np.zeros(x.shape, bool))}
    hooks = (None, ("WeightDecay", (0.1,)), ("Lasso", (0.1,)),
             ("GradientHardClipping", (-0.5, 0.7)))
    for kind, wrap in sorted(wraps.items()):
        for role in ("grad", "param", "v"):
            for hook, scalar in [(h, float) for h in hooks] + [(None, np.float32),
                                                               (None, np.float64)]:
                for level in ("optimizer", "rule"):
                    if hook is None and level == "rule":
                        continue
                    for multi in (True, False):
                        twins = []
                        for opt_cls in (chainer.optimizers.NesterovAG,
                                        cynag.optimizers.NesterovAG):
                            link = chainer.Link()
                            with link.init_scope():
                                link.a = chainer.Parameter(np.ones(2, np.float32))
                                link.b = chainer.Parameter(
                                    np.arange(6, dtype=np.float32).reshape(2, 3) / 7)
                            opt = opt_cls(lr=scalar(0.1), momentum=scalar(0.9)).setup(link)
                            if hasattr(opt, "use_multi_tensor"):
                                opt.use_multi_tensor(multi)
                            if hook is not None:
                                mod = (chainer if opt_cls is chainer.optimizers.NesterovAG
                                       else cynag).optimizer_hooks
                                h = getattr(mod, hook[0])(*hook[1])
                                if level == "optimizer":
                                    opt.add_hook(h)
                                else:
                                    link.b.update_rule.add_hook(h)
                            if role == "param":
                                link.b.array = wrap(link.b.array)
                            for step in range(3):
                                link.a.grad = np.full(2, 0.3 + step, np.float32)
                                g = (np.arange(6, dtype=np.float32).reshape(2, 3) + step) / 3
                                link.b.grad = wrap(g) if role == "grad" else g
                                if role == "v" and step == 1:
                                    state = link.b.update_rule.state
                                    state["v"] = wrap(state["v"])
                                opt.update()
                            twins.append(link)
                        label = "%s %s %s %s %s %s" % (kind, role, hook and hook[0], level,
                                                       "multi" if multi else "single",
                                                       scalar.__name__)
                        for (path, pa), (_, pb) in zip(twins[0].namedparams(),
                                                       twins[1].namedparams()):
                            assert_same(label + " type " + path, type(pa.array), type(pb.array))
                            assert_same_array(label + " " + path, np.asarray(pa.array),
                                              np.asarray(pb.array))
                            assert_same_array(label + " v " + path,
                                              np.asarray(pa.update_rule.state["v"]),
                                              np.asarray(pb.update_rule.state["v"]))


@case("step")
def edge_step_update_methods_replaced_after_steps_are_called():
    """After two ordinary steps (the rules' states exist), ``update`` methods
    replaced on one parameter or rule object, or wrapped on the classes, are
    called at every step, as Chainer's loop calls them."""
    import functools
    from unittest import mock

    for how in ("param.update", "rule.update", "rule.update_core_cpu",
                "class chainer.Parameter.update", "class rule update_core_cpu"):
        twins = _chainer_twins(_two_chainer_params)
        counts = []
        for link, opt in twins:
            opt.setup(link)
            calls = []
            for step in range(4):
                for p in link.params():
                    p.grad = np.full(2, 0.5 + step, np.float32)
                if step < 2:
                    opt.update()
                    continue
                rule = link.a.update_rule
                if how == "param.update":
                    link.a.update = lambda: calls.append(1)
                    opt.update()
                elif how == "rule.update":
                    rule.update = lambda param: calls.append(1)
                    opt.update()
                elif how == "rule.update_core_cpu":
                    orig = rule.update_core_cpu

                    def frozen(param, orig=orig):
                        calls.append(1)
                        param.grad[...] = 0
                        orig(param)
                    rule.update_core_cpu = frozen
                    opt.update()
                elif how == "class chainer.Parameter.update":
                    orig = chainer.Parameter.update

                    @functools.wraps(orig)
                    def counted(self, orig=orig):
                        calls.append(1)
                        return orig(self)
                    with mock.patch.object(chainer.Parameter, "update", counted):
                        opt.update()
                else:
                    with mock.patch.object(type(rule), "update_core_cpu",
                                           lambda self, param: calls.append(1)):
                        opt.update()
            counts.append(len(calls))
        assert_same("%s: calls" % how, counts[0], counts[1])
        _compare_chainer_links(how, twins[0][0], twins[1][0])


@case("step")
def edge_step_contiguous_keeps_a_shared_array_shared():
    """Two Parameters holding one array stay one array with ``contiguous=True``."""
    def build():
        link = chainer.Link()
        shared = np.array([1.0, -2.0, 3.0], np.float32)
        with link.init_scope():
            link.a = chainer.Parameter(shared)
            link.b = chainer.Parameter(shared)
            link.c = chainer.Parameter(np.array([0.5, 0.25], np.float32))
        return link

    twins = _chainer_twins(build)
    twins[0][1].setup(twins[0][0])
    twins[1][1].setup(twins[1][0], contiguous=True)
    for step in range(5):
        for link, opt in twins:
            link.a.grad = np.full(3, 1.0 + step, np.float32)
            link.b.grad = np.full(3, -0.5, np.float32)
            link.c.grad = np.ones(2, np.float32)
            opt.update()
        _compare_chainer_links("step %d" % step, twins[0][0], twins[1][0])
    assert np.shares_memory(twins[1][0].a.array, twins[1][0].b.array)


@case("step")
def edge_step_lazy_parameters_not_updated_are_not_read():
    """``L.Linear(None, n)``-style parameters: uninitialized, with a disabled rule or
    added after ``setup``; Chainer's update skips them, and so must cynag's."""
    for how in ("disabled", "after_setup", "linear_none"):
        def build():
            np.random.seed(7)  # the initial weights
            model = chainer.Chain()
            with model.init_scope():
                model.l1 = chainer.links.Linear(3, 2)
                if how == "linear_none":
                    model.l2 = chainer.links.Linear(None, 4)
                elif how == "disabled":
                    model.late = chainer.Parameter(chainer.initializers.Constant(0.5))
            return model

        twins = _chainer_twins(build)
        for model, opt in twins:
            opt.setup(model)
            if how == "disabled":
                model.late.update_rule.enabled = False
            elif how == "after_setup":
                with model.init_scope():
                    model.late = chainer.Parameter(chainer.initializers.Constant(0.5))
            elif how == "linear_none":
                model.l2.W.update_rule.enabled = False
            rng = np.random.RandomState(3)
            for step in range(3):
                model.cleargrads()
                x = chainer.Variable(rng.standard_normal((5, 3)).astype(np.float32))
                loss = chainer.functions.sum(model.l1(x) ** 2)
                loss.backward()
                opt.update()
        _compare_chainer_links(how, twins[0][0], twins[1][0])


@case("step")
def edge_step_parameter_listing_follows_chainer():
    """The step (and cynag.multinode) lists a Chainer model's parameters as
    ``params()`` and ``namedparams()`` do, through
    name and child changes, classes with a ``params()`` of their own (before or
    after Chainer's in the MRO) and name sets that are not sets."""
    from cynag import _multi_tensor, _step

    _multi_tensor._chainer_links()

    class Reversed:
        def params(self, include_uninit=True):
            return reversed(list(super().params(include_uninit)))

    class MixinFirst(Reversed, chainer.Chain):
        pass

    class MixinAfter(chainer.Chain, Reversed):  # super(Chain, self).params is Link's
        pass

    class OwnParams(chainer.Link):
        def params(self, include_uninit=True):
            return iter(sorted(super().params(include_uninit), key=lambda p: -p.size))

    def param(n):
        return chainer.Parameter(np.arange(n, dtype=np.float32))

    root = chainer.Chain()
    with root.init_scope():
        root.z = param(1)
        root.a = param(2)
        root.seq = chainer.Sequential(chainer.links.Linear(2, 3), chainer.links.Linear(None, 2))
        root.first = MixinFirst()
        root.after = MixinAfter()
        root.own = OwnParams()
        root.lst = chainer.ChainList(chainer.Link(), chainer.Chain())
    for link in (root.first, root.after, root.own, root.lst[0]):
        with link.init_scope():
            link.b = param(3)
            link.a = param(4)
            link.c = param(5)
    with root.first.init_scope():
        root.first.kid = chainer.links.Linear(1, 1)

    names, named = {}, {}
    n_set = 0

    def check(label):
        got = _step.link_params(root, names)
        want = list(root.params())
        assert len(got) == len(want) and all(a is b for a, b in zip(got, want)), \
            (label, [p.name for p in got], [p.name for p in want])
        got = _step.link_namedparams(root, named)
        want = list(root.namedparams())
        assert [path for path, _ in got] == [path for path, _ in want], (label, got, want)
        assert all(a[1] is b[1] for a, b in zip(got, want)), label

    edits = [
        ("start", lambda: None),
        ("again", lambda: None),
        ("param added", lambda: setattr_scoped(root, "m", param(6))),
        ("param removed", lambda: delattr(root, "a")),
        ("same count, other name", lambda: (delattr(root, "z"), setattr_scoped(root, "y", param(7)))),
        ("param replaced", lambda: setattr_scoped(root, "y", param(8))),
        ("child added", lambda: setattr_scoped(root, "b_child", chainer.links.Linear(2, 2))),
        ("child removed", lambda: delattr(root, "seq")),
        ("chainlist append", lambda: root.lst.append(chainer.links.Linear(3, 1))),
        ("chainlist child removed", lambda: root.lst.__delitem__(0)),
        ("class method replaced", lambda: setattr(MixinFirst, "params", chainer.Chain.params)),
        ("name set as a list", lambda: setattr(root.own, "_params", list(root.own._params))),
        ("names re-added", lambda: (delattr(root, "m"), setattr_scoped(root, "m", param(9)))),
        ("a child reachable twice", lambda: setattr_scoped(root, "twice", root.lst)),
        ("its set changed", lambda: root.lst.append(chainer.links.Linear(2, 1))),
        # params()/namedparams() set on one link object (e.g. to freeze a child)
        ("params set on the root", lambda: setattr(
            root, "params", lambda include_uninit=True: root.lst.params(include_uninit))),
        ("namedparams set on the root", lambda: setattr(
            root, "namedparams", lambda include_uninit=True: root.lst.namedparams(include_uninit))),
        ("set on a child instead", lambda: (
            delattr(root, "params"), delattr(root, "namedparams"),
            setattr(root.lst, "params", lambda include_uninit=True: iter(())),
            setattr(root.lst, "namedparams", lambda include_uninit=True: iter(())))),
    ]

    def setattr_scoped(link, name, value):
        with link.init_scope():
            setattr(link, name, value)

    for label, edit in edits:
        edit()
        check(label)
        n_set += 1
    assert n_set == len(edits)


@case("step")
def edge_step_params_set_on_the_model_object():
    """``model.params`` replaced on the object (to freeze a child): Chainer's
    update() lists ``target.params()``, so the child is not updated."""
    def build(cls=chainer.Chain):
        root = cls()
        with root.init_scope():
            root.a = chainer.links.Linear(2, 2)
            root.b = chainer.links.Linear(2, 2)
        for k, (_, p) in enumerate(sorted(root.namedparams(), key=lambda x: x[0])):
            p.array[...] = np.arange(p.size, dtype=np.float32).reshape(p.shape) / (k + 3)
        return root
    twins = _chainer_twins(build)
    for root, opt in twins:
        opt.setup(root)
        for step in range(3):
            for p in root.params():
                p.grad = np.full(p.shape, 0.25 + step, np.float32)
            if step == 1:
                root.params = lambda include_uninit=True, r=root: r.b.params(include_uninit)
            opt.update()
    _compare_chainer_links("params on the object", twins[0][0], twins[1][0])
    assert twins[1][0].a.W.update_rule.t == 1 and twins[1][0].b.W.update_rule.t == 3

    class Frozen(chainer.Chain):
        """Its attribute lookup gives params() of child b only."""

        def __getattribute__(self, name):
            if name == "params":
                b = object.__getattribute__(self, "b")
                return lambda include_uninit=True: b.params(include_uninit)
            return object.__getattribute__(self, name)

    twins = _chainer_twins(lambda: build(Frozen))
    for root, opt in twins:
        opt.setup(root)
        for step in range(2):
            for _, p in root.namedparams():
                p.grad = np.full(p.shape, 0.25 + step, np.float32)
            opt.update()
    _compare_chainer_links("__getattribute__", twins[0][0], twins[1][0])
    assert twins[1][0].a.W.update_rule is None and twins[1][0].b.W.update_rule.t == 2


@case("step")
def edge_step_trainer_on_a_chainer_model():
    """Chainer's Trainer (StandardUpdater) driving a chainer.Link model, new gradient
    arrays at every iteration: cynag's optimizer gives Chainer's parameters."""
    from chainer import training

    rng = np.random.RandomState(0)
    x = rng.standard_normal((64, 10)).astype(np.float32)
    t = rng.randint(0, 3, 64).astype(np.int32)
    results = []
    for opt_cls in (chainer.optimizers.NesterovAG, cynag.optimizers.NesterovAG):
        np.random.seed(1)
        model = chainer.links.Classifier(chainer.Sequential(
            chainer.links.Linear(10, 16), chainer.functions.relu, chainer.links.Linear(16, 3)))
        opt = opt_cls(lr=0.05, momentum=0.9).setup(model)
        it = chainer.iterators.SerialIterator(chainer.datasets.TupleDataset(x, t), 16,
                                              shuffle=False)
        updater = training.updaters.StandardUpdater(it, opt)
        trainer = training.Trainer(updater, (3, "epoch"))
        trainer.run()
        results.append((model, opt))
    _compare_chainer_links("trainer", results[0][0], results[1][0])
    assert_same("trainer t", results[0][1].t, results[1][1].t)
    assert_same("trainer epoch", results[0][1].epoch, results[1][1].epoch)


def main(argv, cases=None, doc=__doc__):
    """Run the groups named in ``argv[2:]`` (all by default) of ``cases``
    (this module's CASES by default) and write the results to ``argv[1]``."""
    cases = CASES if cases is None else cases
    if len(argv) < 2:
        sys.stderr.write(doc)
        return 2
    out_path = argv[1]
    groups = argv[2:] or list(cases)
    if chainer is None or cynag is None:
        sys.stderr.write("chainer (%s) and cynag (%s) must both import\n" % (chainer, cynag))
        return 2
    results = {
        "meta": {
            "chainer": chainer.__version__,
            "numpy": np.__version__,
            "cynag": cynag.__version__,
            "cynag_file": os.path.abspath(cynag.__file__),
            "python": sys.version,
        },
        "cases": {},
    }

    def dump():
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, out_path)

    dump()
    for group in groups:
        for name, fn in cases[group]:
            t0 = time.time()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    fn()
                ok, err = True, None
            except Exception:  # noqa: BLE001 - reported to pytest
                ok, err = False, traceback.format_exc()
            results["cases"][name] = {"group": group, "ok": ok, "error": err,
                                      "seconds": round(time.time() - t0, 3)}
            print("%-60s %s %.2fs" % (name, "ok" if ok else "FAIL", time.time() - t0),
                  flush=True)
            dump()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
