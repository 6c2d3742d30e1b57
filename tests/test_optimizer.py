"""Optimizer API of cynag against Chainer 7.8.1 semantics, with numpy oracles.

Reference behaviour: chainer/optimizer.py and chainer/optimizers/nesterov_ag.py
of Chainer 7.8.1 (not imported here).  Numerical expectations are written as
formulas evaluated with numpy:

    v <- v * m - lr * g
    p <- (p + mm * v) - c * g,      mm = m * m,  c = (1 + m) * lr

with ``lr``, ``m``, ``mm`` and ``c`` computed in double precision and rounded
once to the compute dtype, every array operation rounded to the compute dtype
(no fused multiply-add); float16 arrays are computed in float32 and stored as
float16, the parameter update reading the stored (float16-rounded) ``v``.
"""
import copy
import io
import warnings

import numpy as np
import pytest

import cynag
from cynag import Chain, ChainList, Link, Parameter
from cynag.optimizer import (
    GradientMethod,
    Hyperparameter,
    HyperparameterProxy,
    Optimizer,
    UpdateRule,
)
from cynag.optimizers import NesterovAG, NesterovAGRule

DTYPES = [np.float16, np.float32, np.float64]


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
def _strong(x):
    """A hyperparameter as NumPy 1.x (Chainer's) types it in scalar arithmetic."""
    if isinstance(x, bool):
        return np.bool_(x)
    if isinstance(x, int):
        return np.int64(x)
    if isinstance(x, float):
        return np.float64(x)
    if isinstance(x, np.ndarray) and x.ndim == 0:
        return x[()]
    return x


def oracle_step(p, g, v, lr, m):
    """One NesterovAG step as formulas; returns new (p, v) in p's dtype.

    Arrays with ndim >= 1: the coefficients ``mm = m * m`` and
    ``c = (1 + m) * lr`` are formed as NumPy 1.x forms them (Python float ->
    float64, Python int -> int64) and rounded once to the compute dtype
    (float32 for float16 arrays); every array operation is rounded to the
    compute dtype; ``v`` is stored first (float16: rounded) and the stored
    ``v`` updates ``p``.

    0-d arrays: NumPy 1.x treats them as scalars, so Chainer's sequence
    ``v *= m; v -= lr * g; p += m * m * v; p -= (1 + m) * lr * g`` runs in the
    promoted scalar type (float64 for Python-float hyperparameters) and only
    the four stores round to the array dtype.
    """
    dtype = np.dtype(p.dtype)
    lr_s, m_s = _strong(lr), _strong(m)
    p, g, v = (np.asarray(a) for a in (p, g, v))
    if p.ndim == 0:
        st = dtype.type
        gs = g[()]
        with np.errstate(all="ignore"):
            vv = st(v[()] * m_s)
            vv = st(vv - lr_s * gs)
            pp = st(p[()] + (m_s * m_s) * vv)
            pp = st(pp - ((np.int64(1) + m_s) * lr_s) * gs)
        return np.asarray(pp, dtype), np.asarray(vv, dtype)
    cdt = np.dtype(np.float32) if dtype == np.float16 else dtype
    t = cdt.type
    lr_, m_ = t(lr_s), t(m_s)
    mm, c = t(m_s * m_s), t((np.int64(1) + m_s) * lr_s)
    P, G, V = (np.asarray(a, dtype=cdt) for a in (p, g, v))
    V = (V * m_ - lr_ * G).astype(dtype)  # v is stored first (float16: rounded) ...
    P = (P + mm * V.astype(cdt)) - c * G  # ... and the stored v updates p
    return P.astype(dtype), V


def assert_bits_equal(actual, expected):
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    if actual.tobytes() != expected.tobytes():
        diff = np.flatnonzero(actual.ravel() != expected.ravel())
        raise AssertionError("arrays differ at %d positions, first %s: %r vs %r" % (
            diff.size, diff[:5], actual.ravel()[diff[:5]], expected.ravel()[diff[:5]]))


def make_link(*shapes, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    link = Link()
    with link.init_scope():
        for i, shape in enumerate(shapes):
            setattr(link, "p%d" % i, Parameter(rng.standard_normal(shape).astype(dtype)))
    return link


def make_chain(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)

    def layer(shape_w, shape_b):
        link = Link()
        with link.init_scope():
            link.W = Parameter(rng.standard_normal(shape_w).astype(dtype))
            link.b = Parameter(rng.standard_normal(shape_b).astype(dtype))
        return link

    return Chain(l1=layer((3, 4), (4,)), l2=layer((4, 2), (2,)))


def set_grads(link, seed):
    rng = np.random.default_rng(seed)
    for p in link.params(include_uninit=False):
        p.grad = rng.standard_normal(p.shape).astype(p.dtype)


class Recorder:
    def __init__(self):
        self.events = []


# ---------------------------------------------------------------------------
# Hyperparameter / HyperparameterProxy
# ---------------------------------------------------------------------------
class TestHyperparameter:
    def test_parent_fallback(self):
        parent = Hyperparameter()
        parent.x = 1
        parent.y = 2
        child = Hyperparameter(parent)
        assert child.parent is parent
        assert child.x == 1
        child.x = 10
        assert child.x == 10 and parent.x == 1
        parent.y = 20
        assert child.y == 20

    def test_get_dict(self):
        parent = Hyperparameter()
        parent.x = 1
        parent.y = 2
        child = Hyperparameter(parent)
        child.y = 3
        child.z = 4
        assert child.get_dict() == {"x": 1, "y": 3, "z": 4}
        assert parent.get_dict() == {"x": 1, "y": 2}
        assert Hyperparameter().get_dict() == {}

    def test_repr(self):
        h = Hyperparameter()
        h.b = 2
        h.a = 0.5
        assert repr(h) == "Hyperparameter(a=0.5, b=2)"
        assert repr(Hyperparameter()) == "Hyperparameter()"

    def test_missing_attribute(self):
        h = Hyperparameter()
        with pytest.raises(AttributeError):
            h.lr
        child = Hyperparameter(h)
        with pytest.raises(AttributeError):
            child.lr
        assert not hasattr(child, "lr")

    def test_copy(self):
        h = Hyperparameter()
        h.lr = 0.1
        c = Hyperparameter(h)
        d = copy.deepcopy(c)
        assert d.lr == 0.1
        assert copy.copy(c).lr == 0.1


class TestHyperparameterProxy:
    def test_proxy(self):
        class Owner:
            lr = HyperparameterProxy("lr")

            def __init__(self):
                self.hyperparam = Hyperparameter()

        o = Owner()
        o.hyperparam.lr = 0.3
        assert o.lr == 0.3
        o.lr = 0.4
        assert o.hyperparam.lr == 0.4
        assert isinstance(Owner.lr, HyperparameterProxy)
        assert "lr" in Owner.lr.__doc__

    def test_nesterov_aliases(self):
        assert isinstance(NesterovAG.__dict__["lr"], HyperparameterProxy)
        assert isinstance(NesterovAG.__dict__["momentum"], HyperparameterProxy)


# ---------------------------------------------------------------------------
# NesterovAG hyperparameters
# ---------------------------------------------------------------------------
class TestNesterovAGHyperparameters:
    def test_defaults(self):
        opt = NesterovAG()
        assert opt.lr == 0.01 and opt.momentum == 0.9
        assert opt.hyperparam.lr == 0.01 and opt.hyperparam.momentum == 0.9
        assert isinstance(opt, GradientMethod) and isinstance(opt, Optimizer)

    def test_constructor(self):
        opt = NesterovAG(lr=0.5, momentum=0.25)
        assert opt.lr == 0.5 and opt.momentum == 0.25
        opt = NesterovAG(0.2, 0.3)
        assert opt.hyperparam.get_dict() == {"lr": 0.2, "momentum": 0.3}

    def test_alias_changes_all_rules(self):
        link = make_link((2,), (3,), (4,))
        opt = NesterovAG().setup(link)
        rules = [p.update_rule for p in link.params()]
        assert all(r.hyperparam.parent is opt.hyperparam for r in rules)
        rules[1].hyperparam.lr = 0.7
        opt.lr = 0.05
        opt.momentum = 0.5
        assert opt.hyperparam.lr == 0.05
        assert [r.hyperparam.lr for r in rules] == [0.05, 0.7, 0.05]
        assert [r.hyperparam.momentum for r in rules] == [0.5, 0.5, 0.5]
        opt.hyperparam.lr = 0.06
        assert [r.hyperparam.lr for r in rules] == [0.06, 0.7, 0.06]

    def test_per_rule_override_numerics(self):
        link = make_link((5,), (5,))
        opt = NesterovAG(lr=0.1, momentum=0.9).setup(link)
        link.p1.update_rule.hyperparam.lr = 0.3
        link.p1.update_rule.hyperparam.momentum = 0.5
        set_grads(link, 1)
        exp0 = oracle_step(link.p0.array, link.p0.grad, np.zeros(5, np.float32), 0.1, 0.9)
        exp1 = oracle_step(link.p1.array, link.p1.grad, np.zeros(5, np.float32), 0.3, 0.5)
        opt.update()
        assert_bits_equal(link.p0.array, exp0[0])
        assert_bits_equal(link.p1.array, exp1[0])
        assert_bits_equal(link.p1.update_rule.state["v"], exp1[1])

    def test_rule_standalone_defaults(self):
        rule = NesterovAGRule()
        assert rule.hyperparam.lr == 0.01 and rule.hyperparam.momentum == 0.9
        assert rule.hyperparam.get_dict() == {"lr": 0.01, "momentum": 0.9}
        assert rule.t == 0 and rule.state is None and rule.enabled

    def test_rule_standalone_values(self):
        rule = NesterovAGRule(lr=0.2, momentum=0.3)
        assert rule.hyperparam.lr == 0.2 and rule.hyperparam.momentum == 0.3
        rule = NesterovAGRule(lr=0.0, momentum=0.0)
        assert rule.hyperparam.lr == 0.0 and rule.hyperparam.momentum == 0.0

    def test_rule_with_parent(self):
        parent = Hyperparameter()
        parent.lr = 0.4
        parent.momentum = 0.6
        rule = NesterovAGRule(parent, momentum=0.1)
        assert rule.hyperparam.parent is parent
        assert rule.hyperparam.lr == 0.4 and rule.hyperparam.momentum == 0.1

    def test_create_update_rule(self):
        opt = NesterovAG(lr=0.3)
        rule = opt.create_update_rule()
        assert isinstance(rule, NesterovAGRule) and isinstance(rule, UpdateRule)
        assert rule.hyperparam.parent is opt.hyperparam
        assert rule.hyperparam.lr == 0.3

    def test_standalone_rule_numerics(self):
        p = Parameter(np.linspace(-1, 1, 7).astype(np.float64))
        p.grad = np.linspace(2, -3, 7)
        p.update_rule = NesterovAGRule(lr=0.2, momentum=0.7)
        exp = oracle_step(p.array, p.grad, np.zeros(7), 0.2, 0.7)
        p.update()
        assert_bits_equal(p.array, exp[0])
        assert_bits_equal(p.update_rule.state["v"], exp[1])


# ---------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------
class DuckLink:
    """A Chainer-style link that is not a cynag Link."""

    def __init__(self, *arrays):
        self._params = [Parameter(a, "p%d" % i) for i, a in enumerate(arrays)]
        self.cleared = 0

    def params(self, include_uninit=True):
        for p in self._params:
            if include_uninit or p.array is not None:
                yield p

    def namedparams(self, include_uninit=True):
        for p in self.params(include_uninit):
            yield "/" + p.name, p

    def cleargrads(self):
        self.cleared += 1
        for p in self._params:
            p.cleargrad()


class TestSetup:
    def test_returns_self_and_sets_target(self):
        link = make_link((2,))
        opt = NesterovAG()
        assert opt.setup(link) is opt
        assert opt.target is link

    def test_resets_counters_and_gives_fresh_rules(self):
        link = make_link((2,), (3,))
        opt = NesterovAG().setup(link)
        set_grads(link, 0)
        opt.update()
        opt.new_epoch()
        old_rules = [p.update_rule for p in link.params()]
        assert opt.t == 1 and opt.epoch == 1
        assert all(r.t == 1 and r.state is not None for r in old_rules)
        opt.add_hook(lambda o: None, name="h")
        assert opt.setup(link) is opt
        assert opt.t == 0 and opt.epoch == 0
        new_rules = [p.update_rule for p in link.params()]
        assert all(n is not o for n, o in zip(new_rules, old_rules))
        assert all(r.t == 0 and r.state is None for r in new_rules)
        assert all(r.hyperparam.parent is opt.hyperparam for r in new_rules)
        # hooks are reset too: the name can be registered again
        opt.add_hook(lambda o: None, name="h")

    def test_distinct_rules_per_param(self):
        link = make_link((2,), (3,), (4,))
        NesterovAG().setup(link)
        rules = [p.update_rule for p in link.params()]
        assert len(set(map(id, rules))) == 3

    @pytest.mark.parametrize("bad", [None, 3, object(), np.zeros(3), Parameter(np.zeros(2))])
    def test_rejects_non_links(self, bad):
        with pytest.raises(TypeError):
            NesterovAG().setup(bad)

    def test_duck_typed_link(self):
        a0 = np.ones(3, np.float32)
        a1 = np.full(2, 2.0, np.float32)
        duck = DuckLink(a0, a1)
        opt = NesterovAG(lr=0.1, momentum=0.9).setup(duck)
        assert opt.target is duck
        assert all(isinstance(p.update_rule, NesterovAGRule) for p in duck.params())
        g0 = np.full(3, 0.5, np.float32)
        duck._params[0].grad = g0
        e0 = oracle_step(a0, g0, np.zeros(3, np.float32), 0.1, 0.9)[0]
        opt.update()
        assert_bits_equal(a0, e0)
        # cleared grad reallocated as zeros: v = 0, p unchanged
        assert_bits_equal(a1, np.full(2, 2.0, np.float32))
        assert_bits_equal(duck._params[1].grad, np.zeros(2, np.float32))
        assert opt.t == 1

    def test_duck_typed_link_lossfun(self):
        duck = DuckLink(np.ones(2, np.float32))

        class Loss:
            def backward(self, loss_scale=None):
                duck._params[0].grad = np.ones(2, np.float32)

        opt = NesterovAG().setup(duck)
        opt.update(Loss)
        assert duck.cleared == 1
        assert opt.t == 1 and duck._params[0].update_rule.t == 1

    def test_update_before_setup(self):
        with pytest.raises(RuntimeError):
            NesterovAG().update()

    def test_base_classes_not_implemented(self):
        with pytest.raises(NotImplementedError):
            Optimizer().update()
        with pytest.raises(NotImplementedError):
            GradientMethod().create_update_rule()
        rule = UpdateRule()
        p = Parameter(np.zeros(2, np.float32))
        p.grad = np.zeros(2, np.float32)
        with pytest.raises(NotImplementedError):
            rule.update(p)


# ---------------------------------------------------------------------------
# update(): order of operations, counters, lazy state
# ---------------------------------------------------------------------------
class TestUpdateSemantics:
    def test_chainer_order(self):
        link = make_link((3,), (2,))
        opt = NesterovAG(lr=0.1, momentum=0.9).setup(link)
        link.p0.grad = np.ones(3, np.float32)
        link.p1.cleargrad()
        before = {n: p.array.copy() for n, p in link.namedparams()}
        log = []

        def pre(o):
            assert o is opt
            log.append(("pre", o.t, {n: p.grad is None for n, p in link.namedparams()},
                        {n: np.array_equal(p.array, before[n]) for n, p in link.namedparams()}))

        def post(o):
            log.append(("post", o.t, {n: p.grad is None for n, p in link.namedparams()},
                        {n: np.array_equal(p.array, before[n]) for n, p in link.namedparams()}))

        opt.add_hook(pre, timing="pre")
        opt.add_hook(post, timing="post")
        opt.update()
        # pre: grads reallocated, t not yet incremented, params untouched
        assert log[0] == ("pre", 0, {"/p0": False, "/p1": False}, {"/p0": True, "/p1": True})
        # post: t incremented, p0 updated (p1 had a zero grad and zero v: unchanged)
        assert log[1] == ("post", 1, {"/p0": False, "/p1": False}, {"/p0": False, "/p1": True})
        assert_bits_equal(link.p1.grad, np.zeros(2, np.float32))

    def test_cleared_grads_reallocated_as_zeros(self):
        link = make_link((3,), (2, 2), dtype=np.float64)
        opt = NesterovAG().setup(link)
        link.cleargrads()
        before = [p.array.copy() for p in link.params()]
        opt.update()
        for p, b in zip(link.params(), before):
            assert p.grad is not None
            assert p.grad.dtype == p.dtype and p.grad.shape == p.shape and not p.grad.any()
            assert_bits_equal(p.array, b)
            assert_bits_equal(p.update_rule.state["v"], np.zeros_like(b))

    def test_hook_clearing_grads_is_reallocated(self):
        link = make_link((3,))
        opt = NesterovAG().setup(link)
        link.p0.grad = np.ones(3, np.float32)
        seen = []
        opt.add_hook(lambda o: link.cleargrads(), name="clear", timing="pre")
        opt.add_hook(lambda o: seen.append(link.p0.grad), name="look", timing="pre")
        before = link.p0.array.copy()
        opt.update()
        assert seen[0] is not None and not seen[0].any()
        assert_bits_equal(link.p0.array, before)  # zero grad, zero v

    def test_counters(self):
        link = make_link((2,), (3,))
        opt = NesterovAG().setup(link)
        assert opt.t == 0 and opt.epoch == 0
        for i in range(3):
            set_grads(link, i)
            opt.update()
        assert opt.t == 3
        assert [p.update_rule.t for p in link.params()] == [3, 3]
        link.p1.update_rule.enabled = False
        opt.update()
        assert opt.t == 4
        assert [p.update_rule.t for p in link.params()] == [4, 3]

    def test_disabled_rule_freezes(self):
        link = make_link((4,), (4,))
        opt = NesterovAG(lr=0.1).setup(link)
        link.p1.update_rule.enabled = False
        set_grads(link, 3)
        frozen = link.p1.array.copy()
        opt.update()
        assert_bits_equal(link.p1.array, frozen)
        assert link.p1.update_rule.state is None
        assert link.p1.update_rule.t == 0
        assert link.p0.update_rule.t == 1

    def test_disable_update_via_link(self):
        link = make_link((4,))
        opt = NesterovAG().setup(link)
        link.disable_update()
        set_grads(link, 0)
        a = link.p0.array.copy()
        opt.update()
        assert_bits_equal(link.p0.array, a)
        assert link.p0.update_rule.t == 0 and opt.t == 1
        link.enable_update()
        opt.update()
        assert link.p0.update_rule.t == 1
        assert not np.array_equal(link.p0.array, a)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_state_created_lazily(self, dtype):
        link = make_link((2, 3), dtype=dtype)
        opt = NesterovAG().setup(link)
        rule = link.p0.update_rule
        assert rule.state is None
        set_grads(link, 0)
        opt.update()
        v = rule.state["v"]
        assert set(rule.state) == {"v"}
        assert isinstance(v, np.ndarray)
        assert v.dtype == dtype and v.shape == (2, 3)
        v_obj = v
        opt.update()
        assert rule.state["v"] is v_obj  # updated in place, not replaced

    def test_state_v_zeros_at_first_update(self):
        p = Parameter(np.ones(3, np.float32))
        rule = NesterovAGRule(lr=0.1, momentum=0.9)
        seen = []
        rule.add_hook(lambda r, prm: seen.append(r.state["v"].copy()), name="s", timing="pre")
        p.grad = np.ones(3, np.float32)
        rule.update(p)
        assert_bits_equal(seen[0], np.zeros(3, np.float32))

    def test_rule_update_grad_none_leaves_param(self):
        a = np.arange(4, dtype=np.float32)
        p = Parameter(a)
        rule = NesterovAGRule()
        rule.update(p)  # Chainer: t incremented, state created, nothing updated
        assert_bits_equal(a, np.arange(4, dtype=np.float32))
        assert p.grad is None
        assert rule.t == 1
        assert_bits_equal(rule.state["v"], np.zeros(4, np.float32))

    def test_rule_update_disabled(self):
        p = Parameter(np.ones(2, np.float32))
        p.grad = np.ones(2, np.float32)
        rule = NesterovAGRule()
        rule.enabled = False
        rule.update(p)
        assert rule.t == 0 and rule.state is None
        assert_bits_equal(p.array, np.ones(2, np.float32))

    def test_uninitialized_param_in_target(self):
        link = make_link((2,))
        with link.init_scope():
            link.u = Parameter()
        opt = NesterovAG().setup(link)
        set_grads(link, 0)
        opt.update()
        assert link.u.array is None and link.u.grad is None
        assert link.u.update_rule.state is None
        assert opt.t == 1

    def test_param_without_rule_is_skipped(self):
        link = make_link((2,))
        opt = NesterovAG().setup(link)
        with link.init_scope():
            link.q = Parameter(np.ones(2, np.float32))
        link.q.grad = np.ones(2, np.float32)
        set_grads(link, 0)
        link.q.grad = np.ones(2, np.float32)
        opt.update()
        assert link.q.update_rule is None
        assert_bits_equal(link.q.array, np.ones(2, np.float32))


# ---------------------------------------------------------------------------
# update(lossfun, *args, **kwds)
# ---------------------------------------------------------------------------
class LoggingLink(Link):
    def __init__(self, log, dtype=np.float32):
        super().__init__()
        self.log = log
        with self.init_scope():
            self.W = Parameter(np.ones(3, dtype))

    def cleargrads(self):
        self.log.append(("cleargrads",))
        super().cleargrads()

    def zerograds(self):
        self.log.append(("zerograds",))
        super().zerograds()


class TestUpdateWithLossfun:
    def _loss_class(self, link, log, grad_value=2.0):
        class Loss:
            def backward(self, *args, **kwargs):
                log.append(("backward", args, kwargs,
                            None if link.W.grad is None else link.W.grad.copy()))
                link.W.grad = np.full(3, grad_value, link.W.dtype)

        return Loss

    def test_cleargrads_then_backward(self):
        log = []
        link = LoggingLink(log)
        link.W.grad = np.full(3, 9.0, np.float32)  # stale grad: must be cleared
        opt = NesterovAG(lr=0.1, momentum=0.9).setup(link)
        Loss = self._loss_class(link, log)

        def lossfun(*args, **kwds):
            log.append(("lossfun", args, kwds))
            return Loss()

        expected = oracle_step(np.ones(3, np.float32), np.full(3, 2.0, np.float32),
                               np.zeros(3, np.float32), 0.1, 0.9)[0]
        opt.update(lossfun, 1, "x", key=3)
        assert [e[0] for e in log] == ["lossfun", "cleargrads", "backward"]
        assert log[0][1:] == ((1, "x"), {"key": 3})
        # backward is called as backward(loss_scale=None), after the grads were cleared
        assert log[2][1] == () and log[2][2] == {"loss_scale": None}
        assert log[2][3] is None
        assert_bits_equal(link.W.array, expected)
        assert opt.t == 1

    def test_use_cleargrads_false_uses_zerograds(self):
        log = []
        link = LoggingLink(log)
        g = np.full(3, 9.0, np.float32)
        link.W.grad = g
        opt = NesterovAG().setup(link)
        with pytest.warns(DeprecationWarning):
            opt.use_cleargrads(False)
        Loss = self._loss_class(link, log)
        opt.update(lambda: Loss())
        assert [e[0] for e in log] == ["zerograds", "backward"]
        assert_bits_equal(log[1][3], np.zeros(3, np.float32))  # zero-filled, not None
        assert not g.any()  # filled in place
        with pytest.warns(DeprecationWarning):
            opt.use_cleargrads(True)
        log.clear()
        opt.update(lambda: Loss())
        assert [e[0] for e in log] == ["cleargrads", "backward"]


# ---------------------------------------------------------------------------
# optimizer hooks
# ---------------------------------------------------------------------------
class TestOptimizerHooks:
    def _setup(self):
        link = make_link((2,), (3,))
        opt = NesterovAG().setup(link)
        set_grads(link, 0)
        return link, opt

    def test_before_setup(self):
        opt = NesterovAG()
        with pytest.raises(RuntimeError):
            opt.add_hook(lambda o: None, name="x")
        with pytest.raises(RuntimeError):
            opt.remove_hook("x")
        with pytest.raises(RuntimeError):
            opt.call_hooks()

    @pytest.mark.parametrize("timing", ["pre", "post"])
    def test_explicit_timing(self, timing):
        link, opt = self._setup()
        ts = []
        opt.add_hook(lambda o: ts.append(o.t), name="h", timing=timing)
        opt.update()
        opt.update()
        assert ts == ([0, 1] if timing == "pre" else [1, 2])

    @pytest.mark.parametrize("attr,expected", [(None, [0]), ("pre", [0]), ("post", [1])])
    def test_auto_timing_attribute(self, attr, expected):
        link, opt = self._setup()
        ts = []

        def hook(o):
            ts.append(o.t)

        if attr is not None:
            hook.timing = attr
        opt.add_hook(hook)  # timing='auto' by default
        opt.update()
        assert ts == expected

    def test_explicit_timing_overrides_attribute(self):
        link, opt = self._setup()
        ts = []

        def hook(o):
            ts.append(o.t)

        hook.timing = "post"
        opt.add_hook(hook, timing="pre")
        opt.update()
        assert ts == [0]

    @pytest.mark.parametrize("timing", ["before", None, "PRE", 1])
    def test_invalid_timing_argument(self, timing):
        link, opt = self._setup()
        with pytest.raises(ValueError):
            opt.add_hook(lambda o: None, name="h", timing=timing)

    def test_invalid_timing_attribute_warns_and_defaults_to_pre(self):
        link, opt = self._setup()
        ts = []

        def hook(o):
            ts.append(o.t)

        hook.timing = "middle"
        with pytest.warns(UserWarning, match="pre"):
            opt.add_hook(hook)
        opt.update()
        assert ts == [0]

    def test_names(self):
        link, opt = self._setup()
        calls = []

        class Named:
            name = "custom"

            def __call__(self, o):
                calls.append("custom")

        def plain(o):
            calls.append("plain")

        opt.add_hook(Named())
        opt.add_hook(plain)
        with pytest.raises(KeyError):
            opt.add_hook(Named())
        with pytest.raises(KeyError):
            opt.add_hook(lambda o: None, name="plain")
        with pytest.raises(KeyError):  # names are unique across pre and post
            opt.add_hook(lambda o: None, name="custom", timing="post")
        opt.update()
        assert calls == ["custom", "plain"]
        opt.remove_hook("custom")
        opt.remove_hook("plain")
        calls.clear()
        opt.update()
        assert calls == []

    def test_name_attribute_preferred_over_dunder_name(self):
        link, opt = self._setup()

        def f(o):
            pass

        f.name = "by_attr"
        opt.add_hook(f)
        opt.remove_hook("by_attr")
        with pytest.raises(KeyError):
            opt.remove_hook("f")

    def test_no_name(self):
        link, opt = self._setup()

        class Anon:
            def __call__(self, o):
                pass

        with pytest.raises(ValueError):
            opt.add_hook(Anon())
        opt.add_hook(Anon(), name="ok")

    def test_non_callable(self):
        link, opt = self._setup()
        with pytest.raises(TypeError):
            opt.add_hook(3, name="x")

    def test_non_str_name(self):
        link, opt = self._setup()
        with pytest.raises(TypeError):
            opt.add_hook(lambda o: None, name=3)

    def test_remove_unknown(self):
        link, opt = self._setup()
        with pytest.raises(KeyError):
            opt.remove_hook("nope")

    def test_registration_order(self):
        link, opt = self._setup()
        calls = []
        for name in ["c", "a", "b"]:
            opt.add_hook(lambda o, n=name: calls.append(n), name=name, timing="post")
        opt.add_hook(lambda o: calls.append("p"), name="p", timing="pre")
        opt.update()
        assert calls == ["p", "c", "a", "b"]

    def test_call_hooks_directly(self):
        link, opt = self._setup()
        calls = []
        opt.add_hook(lambda o: calls.append("pre"), name="a", timing="pre")
        opt.add_hook(lambda o: calls.append("post"), name="b", timing="post")
        opt.call_hooks("post")
        opt.call_hooks()
        assert calls == ["post", "pre"]
        with pytest.raises(ValueError):
            opt.call_hooks("middle")

    def test_call_for_each_param(self):
        link, opt = self._setup()
        calls = []

        class Each:
            name = "each"
            call_for_each_param = True
            timing = "pre"

            def __call__(self, rule, param):
                calls.append((rule, param, opt.t))

        opt.add_hook(Each())
        opt.update()
        assert [(r, p) for r, p, _ in calls] == [(p.update_rule, p) for p in link.params()]
        assert all(t == 0 for _, _, t in calls)

    def test_hook_modifies_grads_before_update(self):
        link = make_link((4,))
        opt = NesterovAG(lr=0.1, momentum=0.9).setup(link)
        link.p0.grad = np.ones(4, np.float32)

        def double(o):
            for p in o.target.params():
                p.grad *= 2

        opt.add_hook(double, timing="pre")
        expected = oracle_step(link.p0.array, np.full(4, 2, np.float32),
                               np.zeros(4, np.float32), 0.1, 0.9)[0]
        opt.update()
        assert_bits_equal(link.p0.array, expected)


# ---------------------------------------------------------------------------
# update-rule hooks
# ---------------------------------------------------------------------------
class TestRuleHooks:
    def test_pre_post_order(self):
        a = np.ones(3, np.float32)
        p = Parameter(a)
        p.grad = np.ones(3, np.float32)
        rule = NesterovAGRule(lr=0.1)
        log = []

        def pre(r, prm):
            log.append(("pre", r.t, prm.array.copy(), r.state is not None))

        def post(r, prm):
            log.append(("post", r.t, prm.array.copy()))

        rule.add_hook(post, timing="post")
        rule.add_hook(pre, timing="pre")
        rule.update(p)
        assert [e[0] for e in log] == ["pre", "post"]
        assert log[0][1] == 1 and log[1][1] == 1  # t incremented before the hooks
        assert_bits_equal(log[0][2], np.ones(3, np.float32))
        assert log[0][3]  # state created before the pre hooks
        assert_bits_equal(log[1][2], a)
        assert not np.array_equal(log[1][2], np.ones(3, np.float32))

    def test_pre_hook_modifies_grad(self):
        p = Parameter(np.ones(3, np.float32))
        p.grad = np.ones(3, np.float32)
        rule = NesterovAGRule(lr=0.1, momentum=0.5)

        def clip(r, prm):
            prm.grad[...] = 0.25

        rule.add_hook(clip, timing="pre")
        expected = oracle_step(np.ones(3, np.float32), np.full(3, 0.25, np.float32),
                               np.zeros(3, np.float32), 0.1, 0.5)[0]
        rule.update(p)
        assert_bits_equal(p.array, expected)

    def test_called_through_optimizer(self):
        link = make_link((2,), (2,))
        opt = NesterovAG().setup(link)
        set_grads(link, 0)
        calls = []
        link.p1.update_rule.add_hook(lambda r, prm: calls.append((r, prm, opt.t)), name="h")
        opt.update()
        assert calls == [(link.p1.update_rule, link.p1, 1)]

    def test_auto_timing(self):
        rule = NesterovAGRule()
        p = Parameter(np.ones(2, np.float32))
        p.grad = np.ones(2, np.float32)
        log = []

        def h(r, prm):
            log.append(prm.array.copy())

        h.timing = "post"
        rule.add_hook(h)
        rule.update(p)
        assert_bits_equal(log[0], p.array)

    def test_invalid_timing_attribute_is_value_error(self):
        rule = NesterovAGRule()

        def h(r, prm):
            pass

        h.timing = "middle"
        with pytest.raises(ValueError):
            rule.add_hook(h)

    def test_errors(self):
        rule = NesterovAGRule()

        def h(r, prm):
            pass

        rule.add_hook(h)
        assert rule.has_hooks
        with pytest.raises(KeyError):
            rule.add_hook(h)
        with pytest.raises(TypeError):
            rule.add_hook("x", name="x")
        with pytest.raises(TypeError):
            rule.add_hook(h, name=1.5)
        with pytest.raises(ValueError):
            rule.add_hook(h, name="y", timing="later")
        rule.remove_hook("h")
        assert not rule.has_hooks
        with pytest.raises(KeyError):
            rule.remove_hook("h")


# ---------------------------------------------------------------------------
# new_epoch
# ---------------------------------------------------------------------------
class TestNewEpoch:
    def test_manual(self):
        opt = NesterovAG().setup(make_link((1,)))
        opt.new_epoch()
        opt.new_epoch()
        assert opt.epoch == 2

    def test_auto_without_flag(self):
        opt = NesterovAG().setup(make_link((1,)))
        with pytest.raises(RuntimeError):
            opt.new_epoch(auto=True)
        assert opt.epoch == 0

    def test_manual_with_flag(self):
        opt = NesterovAG().setup(make_link((1,)))
        opt.use_auto_new_epoch = True
        with pytest.raises(RuntimeError):
            opt.new_epoch()
        assert opt.epoch == 0
        opt.new_epoch(auto=True)
        assert opt.epoch == 1


# ---------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------
class TestNumerics:
    def test_docstring_example(self):
        link = Link()
        with link.init_scope():
            link.W = Parameter(np.ones(3, np.float32))
        opt = NesterovAG(lr=0.1, momentum=0.9).setup(link)
        link.W.grad = np.ones(3, np.float32)
        opt.update()
        np.testing.assert_allclose(link.W.array, 0.729, rtol=1e-6)

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("lr,m", [(0.01, 0.9), (0.1, 0.5), (0.3, 0.0), (0.05, 0.99)])
    def test_multi_step_vs_oracle(self, dtype, lr, m):
        model = make_chain(dtype=dtype, seed=1)
        opt = NesterovAG(lr=lr, momentum=m).setup(model)
        ref = {n: (p.array.copy(), np.zeros_like(p.array)) for n, p in model.namedparams()}
        for step in range(4):
            set_grads(model, 100 + step)
            for n, p in model.namedparams():
                ref[n] = oracle_step(ref[n][0], p.grad, ref[n][1], lr, m)
            opt.update()
            for n, p in model.namedparams():
                assert p.dtype == dtype
                assert_bits_equal(p.array, ref[n][0])
                assert_bits_equal(p.update_rule.state["v"], ref[n][1])
        assert opt.t == 4

    @pytest.mark.parametrize("dtype", DTYPES)
    @pytest.mark.parametrize("shape", [(6,), ()])
    @pytest.mark.parametrize("lr,m", [
        (np.float64(0.2), np.float32(0.75)),
        (np.float32(0.03), np.float32(0.7)),  # 1 + m: float64 as in NumPy 1.x
        (0.03, np.float32(0.7)),
        (np.float16(0.1), np.float64(0.9)),
        (1, 0),  # Python ints
        (np.array(0.05), np.array(0.8, np.float32)),  # 0-d arrays
    ])
    def test_numpy_scalar_hyperparameters(self, dtype, shape, lr, m):
        link = make_link(shape, dtype=dtype)
        opt = NesterovAG(lr=lr, momentum=m).setup(link)
        ref_p, ref_v = link.p0.array.copy(), np.zeros(shape, dtype)
        for step in range(3):
            set_grads(link, 5 + step)
            ref_p, ref_v = oracle_step(ref_p, link.p0.grad, ref_v, lr, m)
            opt.update()
            assert_bits_equal(link.p0.array, ref_p)
            assert_bits_equal(link.p0.update_rule.state["v"], ref_v)

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_float16_stored_as_float16(self, dtype):
        p = Parameter(np.full(4, 1.0, dtype))
        p.grad = np.full(4, 0.3, dtype)
        p.update_rule = NesterovAGRule(lr=0.01, momentum=0.9)
        p.update()
        assert p.array.dtype == dtype and p.update_rule.state["v"].dtype == dtype

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_large_array_multithreaded(self, dtype):
        n = 200_003
        rng = np.random.default_rng(7)
        a = rng.standard_normal(n).astype(dtype)
        g = rng.standard_normal(n).astype(dtype)
        p = Parameter(a.copy())
        p.grad = g
        p.update_rule = NesterovAGRule(lr=0.05, momentum=0.9)
        old_threshold = cynag.get_parallel_threshold()
        try:
            cynag.set_num_threads(4)
            cynag.set_parallel_threshold(0)
            p.update()
            p.update()
        finally:
            cynag.set_num_threads(None)
            cynag.set_parallel_threshold(old_threshold)
        e1 = oracle_step(a, g, np.zeros(n, dtype), 0.05, 0.9)
        e2 = oracle_step(e1[0], g, e1[1], 0.05, 0.9)
        assert_bits_equal(p.array, e2[0])
        assert_bits_equal(p.update_rule.state["v"], e2[1])

    @pytest.mark.parametrize("dtype", DTYPES)
    def test_special_shapes(self, dtype):
        for shape in [(), (0,), (1,), (2, 0, 3), (1, 1, 5)]:
            a = np.full(shape, 0.5, dtype)
            p = Parameter(a)
            p.grad = np.full(shape, 2.0, dtype)
            p.update_rule = NesterovAGRule(lr=0.1, momentum=0.9)
            exp = oracle_step(a.copy(), p.grad, np.zeros(shape, dtype), 0.1, 0.9)
            p.update()
            assert p.array is a
            assert_bits_equal(a, exp[0])
            assert_bits_equal(p.update_rule.state["v"], exp[1])


# ---------------------------------------------------------------------------
# non-contiguous parameter arrays: updated in place
# ---------------------------------------------------------------------------
def _views(dtype):
    rng = np.random.default_rng(11)
    base2 = rng.standard_normal((6, 8)).astype(dtype)
    base3 = rng.standard_normal((6, 6, 6)).astype(dtype)
    return {
        "fortran": (None, np.asfortranarray(rng.standard_normal((5, 7)).astype(dtype))),
        "row_slice": (base2, base2[::2]),
        "column_slice": (base2, base2[:, 1:6]),
        "transposed": (base2, base2.T),
        "step_3d": (base3, base3[::2, 1::2, ::3]),
        "transposed_3d": (base3, base3.transpose(2, 0, 1)[:, :, ::2]),
        "negative_stride": (base2, base2[::-1, ::-2]),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["fortran", "row_slice", "column_slice", "transposed",
                                  "step_3d", "transposed_3d", "negative_stride"])
@pytest.mark.parametrize("grad_layout", ["C", "F", "strided"])
def test_non_contiguous_in_place(dtype, kind, grad_layout):
    base, view = _views(dtype)[kind]
    base_before = None if base is None else base.copy()
    view_before = view.copy()
    rng = np.random.default_rng(3)
    gvals = rng.standard_normal(view.shape).astype(dtype)
    if grad_layout == "C":
        grad = np.ascontiguousarray(gvals)
    elif grad_layout == "F":
        grad = np.asfortranarray(gvals)
    else:
        big = np.zeros(tuple(2 * s for s in view.shape), dtype)
        grad = big[tuple(slice(None, None, 2) for _ in view.shape)]
        grad[...] = gvals
    link = Link()
    with link.init_scope():
        link.W = Parameter(view)
    opt = NesterovAG(lr=0.1, momentum=0.9).setup(link)
    link.W.grad = grad
    e1 = oracle_step(view_before, gvals, np.zeros(view.shape, dtype), 0.1, 0.9)
    opt.update()
    opt.update()
    e2 = oracle_step(e1[0], gvals, e1[1], 0.1, 0.9)
    assert link.W.array is view
    assert_bits_equal(view, e2[0])
    assert_bits_equal(link.W.update_rule.state["v"], e2[1])
    assert_bits_equal(link.W.grad, gvals)  # grad not modified
    if base is not None:
        # the caller's base array sees the update, and only inside the view
        mask = np.zeros(base.shape, bool)
        mask_view = mask[tuple(slice(None) for _ in base.shape)]
        if kind == "row_slice":
            mask_view[::2] = True
        elif kind == "column_slice":
            mask_view[:, 1:6] = True
        elif kind == "transposed":
            mask_view[...] = True
        elif kind == "step_3d":
            mask_view[::2, 1::2, ::3] = True
        elif kind == "transposed_3d":
            mask_view.transpose(2, 0, 1)[:, :, ::2] = True
        elif kind == "negative_stride":
            mask_view[::-1, ::-2] = True
        assert_bits_equal(base[~mask], base_before[~mask])
        expected_base = base_before.copy()
        np.copyto(_view_like(expected_base, kind), e2[0])
        assert_bits_equal(base, expected_base)


def _view_like(base, kind):
    return {
        "row_slice": lambda b: b[::2],
        "column_slice": lambda b: b[:, 1:6],
        "transposed": lambda b: b.T,
        "step_3d": lambda b: b[::2, 1::2, ::3],
        "transposed_3d": lambda b: b.transpose(2, 0, 1)[:, :, ::2],
        "negative_stride": lambda b: b[::-1, ::-2],
    }[kind](base)


# ---------------------------------------------------------------------------
# features not available yet, configuration
# ---------------------------------------------------------------------------
class TestConfig:
    def test_show_config(self, capsys):
        cynag.show_config()
        out = capsys.readouterr().out
        assert "OpenMP" in out
        assert "threads" in out
        assert str(cynag.get_num_threads()) in out
        assert cynag.__version__ in out

    def test_show_config_file(self):
        buf = io.StringIO()
        cynag.show_config(file=buf)
        assert "OpenMP" in buf.getvalue()

    def test_config_dict(self):
        c = cynag.config()
        assert c["threads"]["num_threads"] == cynag.get_num_threads()
        assert "openmp" in c["build"]

    def test_threads_exported(self):
        assert callable(cynag.get_num_threads) and callable(cynag.set_num_threads)
        default = cynag.get_num_threads()
        assert isinstance(default, int) and default >= 1
        try:
            cynag.set_num_threads(2)
            assert cynag.get_num_threads() == (2 if cynag.config()["build"]["openmp"] else 1)
            with pytest.raises(ValueError):
                cynag.set_num_threads(0)
            with pytest.raises(TypeError):
                cynag.set_num_threads("2")
        finally:
            cynag.set_num_threads(None)
        assert cynag.get_num_threads() == default

    def test_version_and_exports(self):
        assert isinstance(cynag.__version__, str)
        assert cynag.optimizers.NesterovAG is NesterovAG
        assert cynag.Hyperparameter is Hyperparameter
        assert cynag.UpdateRule is UpdateRule
        assert cynag.GradientMethod is GradientMethod
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            NesterovAG().setup(ChainList(make_link((1,))))
