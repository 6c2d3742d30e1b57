"""A bad step raises, names the parameter, and changes nothing.

cynag's ``GradientMethod.update`` checks every parameter before it updates
any.  For each bad input below, ``opt.update()`` must raise ``TypeError`` or
``ValueError`` with a message naming the parameter's path and the problem,
and leave every parameter array, gradient (a ``None`` gradient included),
state array, ``opt.t``, ``opt.epoch`` and every ``rule.t`` exactly as they were.

The model has several parameters; the bad one is ``/l1/W``, the third in
``namedparams`` order (``/l0/W``, ``/l0/b``, ``/l1/W``, ``/l1/b``), so an
implementation that checked each parameter only when it reached it would
already have updated ``/l0/W`` and ``/l0/b``.  ``/l0/b`` and ``/l1/b`` have
cleared (``None``) gradients, which a step reallocates as zeros: after a
failed step they must still be ``None``.

"On another device" is simulated without CuPy: ``FakeCupyArray`` is a class
whose ``__module__`` is ``'cupy._core.core'`` and which has a ``device``
attribute (``device.id == 0``), which is how cynag recognises a CuPy array
without importing CuPy.
"""
import copy
import decimal
import fractions
import sys

import numpy as np
import pytest

import cynag
from cynag import Chain, ChainList, Link, Parameter
from cynag.optimizers import NesterovAG, NesterovAGRule

BAD = "/l1/W"
LR, MOMENTUM = 0.1, 0.9


# ---------------------------------------------------------------------------
# fakes and helpers
# ---------------------------------------------------------------------------
class _FakeDevice:
    id = 0


class FakeCupyArray:
    """Looks like a cupy.ndarray on GPU 0 (type module 'cupy...', .device)."""

    def __init__(self, like):
        self.shape = like.shape
        self.dtype = like.dtype
        self.ndim = like.ndim
        self.size = like.size
        self.device = _FakeDevice()


FakeCupyArray.__module__ = "cupy._core.core"
FakeCupyArray.__name__ = FakeCupyArray.__qualname__ = "ndarray"


def make_model(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)

    def layer(shape_w, shape_b):
        link = Link()
        with link.init_scope():
            link.W = Parameter(rng.standard_normal(shape_w).astype(dtype))
            link.b = Parameter(rng.standard_normal(shape_b).astype(dtype))
        return link

    return Chain(l0=layer((3, 4), (4,)), l1=layer((4, 5), (5,)))


def set_grads(model, seed):
    """Random grads, except /l0/b and /l1/b which are cleared (None)."""
    rng = np.random.default_rng(seed)
    for path, p in model.namedparams():
        if path.endswith("/b"):
            p.cleargrad()
        else:
            p.grad = rng.standard_normal(p.shape).astype(p.dtype)


def _freeze(a):
    if a is None:
        return None
    if isinstance(a, np.ndarray):
        return ("ndarray", a.dtype.str, a.shape, a.strides, a.tobytes(order="A"),
                a.flags.writeable)
    if isinstance(a, (list, tuple, float, int, str)):
        return ("value", copy.deepcopy(a))
    return ("object-id", id(a))


def snapshot(model, opt):
    """Everything a step could change, compared by identity and bit pattern."""
    snap = {"opt.t": opt.t, "opt.epoch": opt.epoch, "params": {}}
    for path, p in model.namedparams():
        rule = p.update_rule
        state = None if rule.state is None else {
            k: (v, _freeze(v)) for k, v in rule.state.items()}
        snap["params"][path] = {
            "array": (p.array, _freeze(p.array)),
            "grad": (p.grad, _freeze(p.grad)),
            "rule": rule,
            "rule.t": rule.t,
            "state_is_none": rule.state is None,
            "state": state,
        }
    return snap


def assert_unchanged(model, opt, snap):
    assert opt.t == snap["opt.t"]
    assert opt.epoch == snap["opt.epoch"]
    for path, p in model.namedparams():
        s = snap["params"][path]
        rule = p.update_rule
        assert rule is s["rule"], path
        assert rule.t == s["rule.t"], path
        assert p.array is s["array"][0], path
        assert _freeze(p.array) == s["array"][1], "%s: param array changed" % path
        if s["grad"][0] is None:
            assert p.grad is None, "%s: a None grad was reallocated" % path
        else:
            assert p.grad is s["grad"][0], path
            assert _freeze(p.grad) == s["grad"][1], "%s: grad changed" % path
        if s["state_is_none"]:
            assert rule.state is None, "%s: state was created" % path
        else:
            assert set(rule.state) == set(s["state"]), path
            for k, (obj, frozen) in s["state"].items():
                assert rule.state[k] is obj, (path, k)
                assert _freeze(rule.state[k]) == frozen, "%s: state %s changed" % (path, k)


def _param(model, path):
    return dict(model.namedparams())[path]


# ---------------------------------------------------------------------------
# bad cases: each breaks /l1/W (or its rule) and returns a function that fixes it
# ---------------------------------------------------------------------------
def _set_grad(value_fn):
    def brk(model):
        p = _param(model, BAD)
        good = p.grad
        p.grad = value_fn(p)
        return lambda: setattr(p, "grad", good)
    return brk


def _readonly_param(model):
    p = _param(model, BAD)
    p.array.flags.writeable = False

    def fix():
        p.array.flags.writeable = True
    return fix


def _replace_arrays(conv):
    """Replace param array and grad by converted copies (same shape)."""
    def brk(model):
        p = _param(model, BAD)
        good_a, good_g = p.array, p.grad
        p.array = conv(good_a)
        p.grad = conv(good_g)

        def fix():
            p.array, p.grad = good_a, good_g
        return fix
    return brk


def _set_state_v(value_fn):
    def brk(model):
        rule = _param(model, BAD).update_rule
        good = rule.state["v"]
        rule.state["v"] = value_fn(good, _param(model, BAD))

        def fix():
            rule.state["v"] = good
        return fix
    return brk


def _drop_state_v(model):
    rule = _param(model, BAD).update_rule
    good = rule.state.pop("v")

    def fix():
        rule.state["v"] = good
    return fix


def _readonly_v(model):
    v = _param(model, BAD).update_rule.state["v"]
    v.flags.writeable = False

    def fix():
        v.flags.writeable = True
    return fix


def _rule_hyperparam(name, value):
    def brk(model):
        h = _param(model, BAD).update_rule.hyperparam
        setattr(h, name, value)
        return lambda: delattr(h, name)
    return brk


def _grad_view_of_param(model):
    p = _param(model, BAD)
    good = p.grad
    p.grad = p.array[...]  # a different array object on the same memory
    return lambda: setattr(p, "grad", good)


def _grad_is_v(model):
    p = _param(model, BAD)
    good = p.grad
    p.grad = p.update_rule.state["v"]
    return lambda: setattr(p, "grad", good)


def _other_float(dtype):
    return np.dtype(np.float32) if dtype == np.float64 else np.dtype(np.float64)


# (case id, break function, needs a warm-up step (state exists), exception type,
#  substrings the message must contain besides the path)
CASES = [
    ("grad_wrong_shape", _set_grad(lambda p: np.zeros(p.shape[::-1], p.dtype)),
     False, ValueError, ["shape"]),
    ("grad_extra_axis", _set_grad(lambda p: np.zeros((1,) + p.shape, p.dtype)),
     False, ValueError, ["shape"]),
    ("grad_wrong_dtype", _set_grad(lambda p: p.grad.astype(_other_float(p.dtype))),
     False, TypeError, ["dtype"]),
    ("grad_byteswapped", _set_grad(lambda p: p.grad.astype(p.dtype.newbyteorder())),
     False, TypeError, ["dtype"]),
    ("grad_list", _set_grad(lambda p: p.grad.tolist()), False, TypeError, ["grad", "list"]),
    ("grad_scalar", _set_grad(lambda p: 1.0), False, TypeError, ["grad"]),
    ("grad_numpy_scalar", _set_grad(lambda p: p.dtype.type(1)), False, TypeError,
     ["grad must be a numpy or cupy ndarray", "NumPy scalar"]),
    ("grad_fake_cupy", _set_grad(lambda p: FakeCupyArray(p.array)),
     False, TypeError, ["device", "cupy"]),
    ("grad_is_param", _set_grad(lambda p: p.array), False, ValueError, ["overlap"]),
    ("grad_view_of_param", _grad_view_of_param, False, ValueError, ["overlap"]),
    ("param_read_only", _readonly_param, False, ValueError, ["read-only"]),
    ("param_int32", _replace_arrays(lambda a: (a * 10).astype(np.int32)),
     False, TypeError, ["dtype", "int32"]),
    ("param_complex", _replace_arrays(lambda a: a.astype(np.complex64)),
     False, TypeError, ["dtype"]),
    ("param_big_endian", _replace_arrays(lambda a: a.astype(a.dtype.newbyteorder())),
     False, TypeError, ["byte order"]),
    ("v_wrong_shape", _set_state_v(lambda v, p: np.zeros((2, 2), v.dtype)),
     True, ValueError, ["shape", "v"]),
    ("v_wrong_dtype", _set_state_v(lambda v, p: v.astype(_other_float(v.dtype))),
     True, TypeError, ["dtype", "v"]),
    ("v_list", _set_state_v(lambda v, p: v.tolist()), True, TypeError, ["v"]),
    ("v_fake_cupy", _set_state_v(lambda v, p: FakeCupyArray(v)), True, TypeError, ["v"]),
    ("v_read_only", _readonly_v, True, ValueError, ["read-only", "v"]),
    ("v_missing", _drop_state_v, True, ValueError, ["state", "'v'"]),
    ("v_none", _set_state_v(lambda v, p: None), True, ValueError, ["state", "'v'"]),
    ("v_is_param", _set_state_v(lambda v, p: p.array), True, ValueError, ["overlap"]),
    ("grad_is_v", _grad_is_v, True, ValueError, ["overlap"]),
    ("lr_string", _rule_hyperparam("lr", "0.1"), False, TypeError, ["lr"]),
    ("lr_none", _rule_hyperparam("lr", None), False, TypeError, ["lr"]),
    ("lr_array", _rule_hyperparam("lr", np.array([0.1, 0.2])), False, TypeError, ["lr"]),
    ("lr_complex", _rule_hyperparam("lr", 0.1 + 1j), False, TypeError, ["lr"]),
    ("momentum_string", _rule_hyperparam("momentum", "x"), False, TypeError, ["momentum"]),
    ("momentum_none", _rule_hyperparam("momentum", None), False, TypeError, ["momentum"]),
]
WARMUPS = [0, 1]


def _cases():
    for cid, brk, needs_state, exc, words in CASES:
        for warmup in WARMUPS:
            if needs_state and warmup == 0:
                continue
            yield pytest.param(brk, warmup, exc, words, id="%s-warmup%d" % (cid, warmup))


def _prepared(dtype=np.float32, warmup=0):
    model = make_model(dtype)
    opt = NesterovAG(lr=LR, momentum=MOMENTUM).setup(model)
    for i in range(warmup):
        set_grads(model, 100 + i)
        opt.update()
    opt.new_epoch()
    set_grads(model, 7)
    return model, opt


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("brk,warmup,exc,words", list(_cases()))
def test_bad_input_raises_and_changes_nothing(brk, warmup, exc, words, dtype):
    model, opt = _prepared(dtype=dtype, warmup=warmup)
    brk(model)
    snap = snapshot(model, opt)
    with pytest.raises(exc) as info:
        opt.update()
    msg = str(info.value)
    assert BAD in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    assert_unchanged(model, opt, snap)
    # a second attempt fails the same way and still changes nothing
    with pytest.raises(exc):
        opt.update()
    assert_unchanged(model, opt, snap)


def _final_state(model, opt):
    return (opt.t, opt.epoch, [
        (path, _freeze(p.array), _freeze(p.grad), p.update_rule.t,
         None if p.update_rule.state is None
         else sorted((k, _freeze(v)) for k, v in p.update_rule.state.items()))
        for path, p in model.namedparams()])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("brk,warmup,exc,words", list(_cases()))
def test_fix_and_retry_matches_clean_run(brk, warmup, exc, words, dtype):
    clean, clean_opt = _prepared(dtype=dtype, warmup=warmup)
    clean_opt.update()
    set_grads(clean, 8)
    clean_opt.update()

    model, opt = _prepared(dtype=dtype, warmup=warmup)
    fix = brk(model)
    with pytest.raises(exc):
        opt.update()
    fix()
    opt.update()
    set_grads(model, 8)
    opt.update()
    assert _final_state(model, opt) == _final_state(clean, clean_opt)


# ---------------------------------------------------------------------------
# more situations
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_dtypes_wrong_grad_dtype(dtype):
    model, opt = _prepared(dtype=dtype, warmup=1)
    p = _param(model, BAD)
    p.grad = p.grad.astype(np.float32)
    snap = snapshot(model, opt)
    with pytest.raises(TypeError, match="dtype") as info:
        opt.update()
    assert_unchanged(model, opt, snap)
    assert BAD in str(info.value)


def test_optimizer_level_lr_none():
    model, opt = _prepared(warmup=1)
    opt.lr = None
    snap = snapshot(model, opt)
    with pytest.raises(TypeError) as info:
        opt.update()
    assert "lr" in str(info.value) and "/l0/W" in str(info.value)
    assert_unchanged(model, opt, snap)
    opt.lr = LR
    opt.update()
    assert opt.t == 2


@pytest.mark.parametrize("name,value", [("lr", 10 ** 30), ("momentum", 2 ** 70),
                                        ("lr", -(10 ** 25))],
                         ids=["lr_1e30", "momentum_2pow70", "lr_minus_1e25"])
def test_hyperparameter_int_beyond_int64(name, value):
    """A Python int hyperparameter too large for int64 passes the scalar check.

    Chainer 7.8.1 (NumPy 1.x) fails on it too (``lr * grad`` gives an object
    array that ``v -= ...`` cannot cast: a TypeError), so cynag should reject
    it before changing anything, as for any other bad hyperparameter (or
    compute with it: a step that succeeds is accepted too).
    """
    model, opt = _prepared(warmup=1)
    setattr(_param(model, BAD).update_rule.hyperparam, name, value)
    snap = snapshot(model, opt)
    try:
        opt.update()
    except (TypeError, ValueError, OverflowError) as e:
        assert_unchanged(model, opt, snap)
        assert BAD in str(e) and name in str(e)
    else:
        assert opt.t == snap["opt.t"] + 1


def test_grad_on_uninitialized_param():
    """An uninitialized parameter (array None) that was given a gradient.

    check_param skips parameters without an array, but the rule would then
    try to update it with its (never created) state; the step must be refused
    up front, naming the parameter, with nothing changed.
    """
    model, opt = _prepared(warmup=0)
    with model.l1.init_scope():
        model.l1.W = Parameter()
    model.l1.W.update_rule = opt.create_update_rule()
    model.l1.W.grad = np.ones((4, 5), np.float32)
    snap = snapshot(model, opt)
    with pytest.raises((TypeError, ValueError)) as info:
        opt.update()
    assert_unchanged(model, opt, snap)
    assert BAD in str(info.value)


def test_optimizer_level_lr_string():
    model, opt = _prepared(warmup=0)
    opt.lr = "fast"
    snap = snapshot(model, opt)
    with pytest.raises(TypeError, match="lr"):
        opt.update()
    assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("name", ["lr", "momentum"])
@pytest.mark.parametrize("value", [fractions.Fraction(1, 10), decimal.Decimal("0.1"),
                                   complex(0.1, 0), np.complex64(0.1)])
def test_hyperparameters_numpy_cannot_compute_with(name, value):
    # NumPy meets a Fraction or a Decimal as an object (Chainer's lines fail);
    # a complex one is no real number: refused, naming it, before any change.
    model, opt = _prepared(warmup=1)
    setattr(opt, name, value)
    snap = snapshot(model, opt)
    with pytest.raises(TypeError, match=r"\b%s\b" % name):
        opt.update()
    assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("value", [fractions.Fraction(1, 10), decimal.Decimal("0.1")])
def test_hook_rates_numpy_cannot_compute_with(value):
    with pytest.raises(TypeError, match="rate"):
        cynag.optimizer_hooks.WeightDecay(value)


def test_chainlist_path_in_message():
    cl = ChainList(*[make_model(seed=s) for s in range(2)])
    opt = NesterovAG().setup(cl)
    for i, (path, p) in enumerate(cl.namedparams()):
        p.grad = np.ones_like(p.array)
    cl[1].l0.b.grad = np.ones(7, np.float32)
    snap = snapshot(cl, opt)
    with pytest.raises(ValueError) as info:
        opt.update()
    assert "/1/l0/b" in str(info.value) and "shape" in str(info.value)
    assert_unchanged(cl, opt, snap)


def test_disabled_rule_with_bad_grad_is_skipped():
    model, opt = _prepared(warmup=0)
    p = _param(model, BAD)
    p.update_rule.enabled = False
    p.grad = np.zeros((7, 7), np.float64)
    frozen = p.array.copy()
    opt.update()  # nothing to check for a frozen parameter
    assert opt.t == 1
    assert p.update_rule.t == 0
    np.testing.assert_array_equal(p.array, frozen)
    assert _param(model, "/l0/W").update_rule.t == 1


def test_lossfun_path_checks_before_update():
    model, opt = _prepared(warmup=1)

    class Loss:
        def backward(self, loss_scale=None):
            set_grads(model, 11)
            _param(model, BAD).grad = np.zeros(3, np.float32)

    with pytest.raises(ValueError, match="shape"):
        opt.update(lambda: Loss())
    assert opt.t == 1
    assert all(p.update_rule.t == 1 for p in model.params())
    assert _param(model, "/l0/b").grad is None


def test_several_bad_params_first_one_reported():
    model, opt = _prepared(warmup=0)
    _param(model, "/l1/b").grad = np.zeros(2, np.float32)
    _param(model, BAD).grad = np.zeros(2, np.float32)
    with pytest.raises(ValueError) as info:
        opt.update()
    assert BAD in str(info.value)


def test_rule_update_directly_checks_before_counting():
    model, opt = _prepared(warmup=0)
    p = _param(model, BAD)
    p.grad = p.grad.astype(np.float64)
    rule = p.update_rule
    with pytest.raises(TypeError, match="dtype"):
        p.update()
    assert rule.t == 0 and rule.state is None


def test_rule_update_directly_after_frozen_step_still_checks():
    """A frozen rule skipped by opt.update() must not skip its checks later.

    GradientMethod.update() marks every rule as "already checked" before
    calling param.update(); a disabled rule returns without consuming that
    mark.  When the rule is enabled again and its parameter is updated
    directly with a bad gradient, the update must still be refused before
    rule.t, the state or the hooks are touched.
    """
    model, opt = _prepared(warmup=0)
    p = _param(model, BAD)
    rule = p.update_rule
    rule.enabled = False
    opt.update()
    rule.enabled = True
    calls = []
    rule.add_hook(lambda r, prm: calls.append(1), name="pre", timing="pre")
    p.grad = np.zeros((9,), np.float32)
    with pytest.raises(ValueError, match="shape"):
        p.update()
    assert rule.t == 0
    assert rule.state is None
    assert calls == []


# ---------------------------------------------------------------------------
# Hooks that break a parameter after the first check, and foreign rules
# ---------------------------------------------------------------------------
def _two_param_link():
    link = cynag.Link()
    with link.init_scope():
        link.a = cynag.Parameter(np.ones(3, np.float32))
        link.b = cynag.Parameter(np.ones(3, np.float32))
    link.a.grad = np.full(3, 0.5, np.float32)
    link.b.grad = np.full(3, 0.5, np.float32)
    return link


@pytest.mark.parametrize("breakage", ["dtype", "shape", "hyperparameter"])
def test_pre_hook_breaking_a_later_param_changes_nothing(breakage):
    link = _two_param_link()
    opt = cynag.optimizers.NesterovAG().setup(link)

    def hook(optimizer):
        if breakage == "dtype":
            link.b.grad = link.b.grad.astype(np.float64)
        elif breakage == "shape":
            link.b.grad = np.ones(4, np.float32)
        else:
            link.b.update_rule.hyperparam.lr = "0.1"

    opt.add_hook(hook, name="breaker")
    before = link.a.array.copy(), link.b.array.copy()
    with pytest.raises((TypeError, ValueError)) as info:
        opt.update()
    assert "'/b'" in str(info.value)
    assert opt.t == 0 and link.a.update_rule.t == 0 and link.b.update_rule.t == 0
    assert np.array_equal(link.a.array, before[0]) and np.array_equal(link.b.array, before[1])
    assert link.a.update_rule.state is None


def test_rule_enabled_by_a_pre_hook_is_checked():
    link = _two_param_link()
    opt = cynag.optimizers.NesterovAG().setup(link)
    link.b.update_rule.enabled = False
    link.b.grad = np.ones(5, np.float32)  # bad, but b is frozen at the first check

    def hook(optimizer):
        link.b.update_rule.enabled = True

    opt.add_hook(hook, name="enabler")
    with pytest.raises(ValueError, match="'/b'.*shape"):
        opt.update()
    assert opt.t == 0 and np.array_equal(link.a.array, np.ones(3, np.float32))


def test_read_only_grad_with_loss_scale_is_rejected_first():
    link = _two_param_link()
    opt = cynag.optimizers.NesterovAG().setup(link)
    for p in link.params():
        p._loss_scale = 4.0
    link.b.grad = np.broadcast_to(np.float32(0.5), (3,))
    with pytest.raises(ValueError, match="'/b'.*read-only"):
        opt.update()
    assert opt.t == 0 and np.array_equal(link.a.array, np.ones(3, np.float32))


def test_foreign_update_rule_without_check_param_is_used_as_is():
    """A rule from another library (e.g. Chainer's SGDRule) has no check_param."""
    link = _two_param_link()
    opt = cynag.optimizers.NesterovAG().setup(link)

    class ForeignRule:
        enabled = True
        is_elementwise = True

        def __init__(self):
            self.calls = 0

        def update(self, param):
            self.calls += 1
            param.array -= param.grad

    link.b.update_rule = ForeignRule()
    opt.update()
    assert link.b.update_rule.calls == 1
    assert np.array_equal(link.b.array, np.full(3, 0.5, np.float32))
    assert opt.t == 1 and link.a.update_rule.t == 1


def test_missing_hyperparameter_error_names_the_path():
    link = _two_param_link()
    opt = cynag.optimizers.NesterovAG().setup(link)
    link.b.update_rule = cynag.optimizers.NesterovAGRule(cynag.optimizer.Hyperparameter())
    with pytest.raises(AttributeError, match="'/b'"):
        opt.update()
    assert opt.t == 0


def _hook_sets():
    from cynag import optimizer_hooks as H

    return {
        "WeightDecay": lambda: [H.WeightDecay(0.01)],
        "Lasso+Noise": lambda: [H.Lasso(0.01),
                                H.GradientNoise(0.1, noise_func=lambda xp, s, d, h, r:
                                                np.ones(s, d))],
        "HardClipping": lambda: [H.GradientHardClipping(-0.1, 0.1)],
        "LARS": lambda: [H.GradientLARS(threshold=0.0, weight_decay=0.1)],
        "Clipping": lambda: [H.GradientClipping(1e-3)],
        "Clipping+WeightDecay": lambda: [H.GradientClipping(1e-3), H.WeightDecay(0.01)],
    }


@pytest.mark.parametrize("cleared", [True, False])
@pytest.mark.parametrize("multi", [True, False])
@pytest.mark.parametrize("timing", ["pre", "post"])
@pytest.mark.parametrize("hooks", sorted(_hook_sets()) + ["Clipping, no clip"])
def test_read_only_grad_a_hook_writes_is_refused_first(hooks, timing, multi, cleared):
    """A hook that writes gradients (GradientClipping: even where it would not
    clip, which is known only when it runs) and a read-only gradient: the
    error names it, and nothing changed -- no gradient written by a hook
    before the bad one was reached, no cleared gradient reallocated, no
    update."""
    model, opt = _prepared(warmup=1)
    opt.use_multi_tensor(multi)
    from cynag import optimizer_hooks as H

    made = [H.GradientClipping(1e9)] if hooks == "Clipping, no clip" else _hook_sets()[hooks]()
    for hook in made:
        opt.add_hook(hook, timing=timing)
    set_grads(model, 3)  # (/l0/b and /l1/b cleared)
    if not cleared:
        for path, p in model.namedparams():
            if p.grad is None:
                p.grad = np.ones(p.shape, p.dtype)
    _param(model, BAD).grad.flags.writeable = False
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"'%s'.*read-only" % BAD):
        opt.update()
    assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("level", ["optimizer", "rule"])
def test_multi_tensor_plan_checks_read_only_grads_as_update_does(level):
    """multi_tensor_plan() checks every parameter as update() does: a read-only
    gradient that a hook may write is named there too, and nothing changes."""
    from cynag import optimizer_hooks as H

    model, opt = _prepared(warmup=1)
    if level == "optimizer":
        opt.add_hook(H.WeightDecay(0.01))
    else:
        _param(model, BAD).update_rule.add_hook(H.WeightDecay(0.01))
    set_grads(model, 3)
    _param(model, BAD).grad.flags.writeable = False
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"'%s'.*read-only.*'WeightDecay' may" % BAD):
        opt.multi_tensor_plan()
    assert_unchanged(model, opt, snap)
    _param(model, BAD).grad = _param(model, BAD).grad.copy()
    assert opt.multi_tensor_plan()["groups"]


@pytest.mark.parametrize("multi", [True, False])
def test_read_only_grad_a_rule_hook_writes_is_refused_first(multi):
    from cynag import optimizer_hooks as H

    model, opt = _prepared(warmup=1)
    opt.use_multi_tensor(multi)
    _param(model, BAD).update_rule.add_hook(H.WeightDecay(0.01))
    set_grads(model, 3)
    _param(model, BAD).grad.flags.writeable = False
    snap = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"'%s'.*read-only.*'WeightDecay' may" % BAD):
        opt.update()
    assert_unchanged(model, opt, snap)


@pytest.mark.parametrize("timing", ["pre", "post"])
@pytest.mark.parametrize("multi", [True, False])
def test_read_only_grad_with_a_hook_that_does_not_write_it(multi, timing):
    """A read-only gradient is fine where no hook writes it (a hook that only reads)."""
    model, opt = _prepared(warmup=1)
    opt.use_multi_tensor(multi)
    seen = []
    opt.add_hook(lambda o: seen.append(o.t), name="reader", timing=timing)
    set_grads(model, 3)
    _param(model, BAD).grad.flags.writeable = False
    t = opt.t
    opt.update()
    assert opt.t == t + 1 and seen == [t if timing == "pre" else t + 1]


@pytest.mark.parametrize("multi", [True, False])
def test_read_only_grad_made_by_a_pre_hook_for_a_post_writer(multi):
    """A 'pre' hook replaces a gradient with a read-only array and a 'post'
    WeightDecay would write it after the update: refused before the update."""
    from cynag import optimizer_hooks as H

    model, opt = _prepared(warmup=1)
    opt.use_multi_tensor(multi)

    def freeze(o):
        g = _param(model, BAD).grad.copy()
        g.flags.writeable = False
        _param(model, BAD).grad = g

    opt.add_hook(freeze, name="freeze", timing="pre")
    opt.add_hook(H.WeightDecay(0.01), timing="post")
    set_grads(model, 3)
    t = opt.t
    arrays = {path: p.array.copy() for path, p in model.namedparams()}
    with pytest.raises(ValueError, match=r"'%s'.*read-only.*'WeightDecay' may" % BAD):
        opt.update()
    assert opt.t == t
    for path, p in model.namedparams():
        assert np.array_equal(p.array, arrays[path]), path


@pytest.mark.parametrize("multi", [True, False])
def test_hooks_with_an_uninitialized_parameter(multi):
    """The read-only check skips parameters without an array (Chainer's lazy
    parameters cannot even give their gradient); the step runs."""
    from cynag import optimizer_hooks as H

    model, opt = _prepared(warmup=1)
    opt.use_multi_tensor(multi)
    opt.add_hook(H.WeightDecay(0.01))
    set_grads(model, 3)
    with model.l0.init_scope():
        model.l0.lazy = Parameter()  # uninitialized, no shape yet
    _param(model, "/l1/b").grad = np.ones(5, np.float32)
    t = opt.t
    opt.update()
    assert opt.t == t + 1 and model.l0.lazy.array is None
