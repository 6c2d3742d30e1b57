"""float32 master copies (use_fp32_update) and loss scaling, against NumPy oracles.

* ``use_fp32_update`` (on the optimizer before or after ``setup``, or on one
  rule): a float16 parameter is updated through a float32 master copy, bit for
  bit as the oracle that keeps a float32 master and ``v`` (the float32
  NesterovAG sequence of tests/oracle.py), then ``param = master.astype(f16)``.
* Static loss scaling: the gradient is divided by the scale before the rule's
  hooks and the update (NumPy 1.x semantics: in the array dtype for ndim >= 1,
  in float64 then rounded for 0-d arrays).
* Dynamic loss scaling: start at 1, double per step until the first
  non-finite gradient, skip that step (with a warning naming the parameter)
  and halve, then grow by ``2 ** (1 / interval)``; bounds ``[1, 65504]``.

Chainer itself is not imported here (test_chainer_parity.py compares with it).
"""
import math
import warnings

import numpy
import pytest

import cynag
from cynag.optimizers import NesterovAG
from oracle import assert_same_bits, nesterov_ag_numpy

F16, F32, F64 = numpy.float16, numpy.float32, numpy.float64
LR, MOM = 0.01, 0.9


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------
class Init16:
    """Initializer carrying dtype float16 (the parameter's dtype is known before init)."""

    dtype = numpy.dtype(F16)

    def __init__(self, values):
        self.values = values

    def __call__(self, array):
        array[...] = self.values


def make_link(seed=0):
    """W: (4, 3) f16, s: 0-d f16, u: (5,) f32, x: (3,) f64 (sorted names = update order)."""
    rng = numpy.random.RandomState(seed)
    link = cynag.Link()
    with link.init_scope():
        link.W = cynag.Parameter(rng.randn(4, 3).astype(F16))
        link.s = cynag.Parameter(numpy.asarray(rng.randn(), dtype=F16))
        link.u = cynag.Parameter(rng.randn(5).astype(F32))
        link.x = cynag.Parameter(rng.randn(3).astype(F64))
    return link


def divide_like_numpy1(g, scale):
    """``g /= scale`` as Chainer's rule does it under NumPy 1.x."""
    if g.ndim == 0:
        return numpy.asarray(g.dtype.type(F64(g[()]) / F64(scale)))
    return g / g.dtype.type(scale)


class ParamOracle:
    """One parameter's expected state; ``fp32``: through a float32 master."""

    def __init__(self, array, fp32):
        self.fp32 = fp32 and array.dtype == F16
        self.param = array.copy()
        self.master = array.astype(F32) if self.fp32 else None
        self.v = None
        self.t = 0

    def step(self, grad, loss_scale=None):
        self.t += 1
        if self.fp32:
            g = grad.astype(F32)
            if loss_scale is not None:
                g = divide_like_numpy1(g, loss_scale)
            if self.v is None:
                self.v = numpy.zeros_like(self.master)
            nesterov_ag_numpy(self.master, g, self.v, LR, MOM)
            self.param = self.master.astype(F16)
            return g
        g = grad.copy()
        if loss_scale is not None:
            g = divide_like_numpy1(g, loss_scale)
        if self.v is None:
            self.v = numpy.zeros_like(self.param)
        nesterov_ag_numpy(self.param, g, self.v, LR, MOM)
        return g

    def check(self, param, name):
        assert_same_bits(param.array, self.param, name)
        rule = param.update_rule
        assert rule.t == self.t, name
        if self.v is None:
            assert rule.state is None, name
        else:
            assert rule.state["v"].dtype == self.v.dtype, name
            assert_same_bits(rule.state["v"], self.v, name + "/v")
        if self.fp32:
            assert_same_bits(rule._fp32_param.array, self.master, name + " master")


def grads_for(link, step, scale=1.0):
    rng = numpy.random.RandomState(500 + step)
    out = {}
    for name, p in link.namedparams():
        out[name] = numpy.asarray(rng.standard_normal(p.shape) * scale).astype(p.dtype)
    return out


class Loss:
    """A loss whose backward(loss_scale) writes given gradients (already scaled)."""

    def __init__(self, link, grads, log):
        self.link, self.grads, self.log = link, grads, log

    def backward(self, loss_scale=None):
        self.log.append(loss_scale)
        for name, p in self.link.namedparams():
            assert p.grad is None  # cleared before backward
            p.grad = self.grads[name].copy()


# ---------------------------------------------------------------------------
# use_fp32_update
# ---------------------------------------------------------------------------
class TestFp32Update:
    @pytest.mark.parametrize("how", ["before_setup", "after_setup", "rules"])
    @pytest.mark.parametrize("loss_scale", [None, 3.3])
    def test_matches_float32_master_oracle(self, how, loss_scale):
        link = make_link()
        opt = NesterovAG(lr=LR, momentum=MOM)
        if how == "before_setup":
            opt.use_fp32_update()
            opt.setup(link)
        else:
            opt.setup(link)
            if how == "after_setup":
                opt.use_fp32_update()
            else:  # on W's rule only; s stays a plain float16 update
                link.W.update_rule.use_fp32_update()
                link.u.update_rule.use_fp32_update()
        if loss_scale is not None:
            opt.set_loss_scale(loss_scale)
        fp32_names = {"/W", "/s"} if how != "rules" else {"/W"}
        params = dict(link.namedparams())
        oracles = {n: ParamOracle(p.array, n in fp32_names) for n, p in params.items()}
        assert all(p.update_rule._fp32_param is None for p in params.values())  # lazy
        log = []
        for step in range(60):
            grads = grads_for(link, step, scale=1.0 if loss_scale is None else loss_scale)
            if loss_scale is None:
                for n, p in params.items():
                    p.grad = grads[n].copy()
                opt.update()
            else:
                opt.update(lambda: Loss(link, grads, log))
            for n, p in params.items():
                oracles[n].step(grads[n], loss_scale)
                oracles[n].check(p, "%s step %d" % (n, step))
        if loss_scale is not None:
            assert log == [loss_scale] * 60
        for n, p in params.items():
            master = p.update_rule._fp32_param
            if n in fp32_names:
                assert master.array.dtype == F32 and p.array.dtype == F16
                assert p.update_rule.state["v"].dtype == F32
            else:
                assert master is None  # float32/float64 (or flag off): no master copy
        assert params["/u"].update_rule.state["v"].dtype == F32
        assert params["/x"].update_rule.state["v"].dtype == F64

    def test_differs_from_plain_float16(self):
        # The oracle comparison above is meaningful: without the flag the
        # float16 parameter ends up elsewhere.
        results = []
        for flag in (False, True):
            link = make_link()
            opt = NesterovAG(lr=LR, momentum=MOM).setup(link)
            if flag:
                opt.use_fp32_update()
            for step in range(60):
                for n, g in grads_for(link, step).items():
                    dict(link.namedparams())[n].grad = g
                opt.update()
            results.append(link.W.array.copy())
        assert not numpy.array_equal(results[0], results[1])

    def test_master_is_lazy_and_hooks_see_float32(self):
        link = make_link()
        opt = NesterovAG(lr=LR, momentum=MOM).setup(link)
        opt.use_fp32_update()
        seen = []

        def pre(rule, param):
            seen.append(("pre", param.dtype, param.grad.dtype, param.array is link.W.array))

        def post(rule, param):
            seen.append(("post", param.dtype, param.grad.dtype))

        link.W.update_rule.add_hook(pre, timing="pre")
        link.W.update_rule.add_hook(post, timing="post")
        assert link.W.update_rule._fp32_param is None and link.W.update_rule.state is None
        before = link.W.array.copy()
        for n, g in grads_for(link, 0).items():
            dict(link.namedparams())[n].grad = g
        opt.update()
        assert seen == [("pre", F32, F32, False), ("post", F32, F32)]
        master = link.W.update_rule._fp32_param
        assert master.array.dtype == F32 and master.grad is None  # grad dropped after
        assert link.W.array.dtype == F16 and link.W.grad.dtype == F16
        assert not numpy.array_equal(before, link.W.array)
        # the same master is kept
        for n, g in grads_for(link, 1).items():
            dict(link.namedparams())[n].grad = g
        opt.update()
        assert link.W.update_rule._fp32_param is master

    def test_uninitialized_parameter_gets_master_when_initialized(self):
        values = numpy.random.RandomState(3).randn(4, 3).astype(F16)
        link = cynag.Link()
        with link.init_scope():
            link.W = cynag.Parameter(Init16(values))
        assert link.W.array is None and link.W.dtype == F16
        opt = NesterovAG(lr=LR, momentum=MOM)
        opt.use_fp32_update()
        opt.setup(link)
        opt.update()  # W uninitialized: nothing to update, but the rule counts
        rule = link.W.update_rule
        assert rule.t == 1 and rule.state is None and link.W.array is None
        link.W.initialize((4, 3))
        assert_same_bits(link.W.array, values)
        oracle = ParamOracle(link.W.array, True)
        oracle.t = 1
        for step in range(30):
            g = grads_for(link, step)["/W"]
            link.W.grad = g.copy()
            opt.update()
            oracle.step(g)
            oracle.check(link.W, "W step %d" % step)
        assert rule._fp32_param.array.dtype == F32
        assert rule.state["v"].dtype == F32

    @pytest.mark.parametrize("loss_scale", [None, 3.3])
    def test_switched_after_steps_keeps_v_and_its_dtype(self, loss_scale):
        # As in Chainer, a state created before use_fp32_update() is switched
        # keeps its dtype: switched on after float16 steps, the float16 v is
        # updated with the float32 master copy; switched off again, the
        # float32 v with the float16 parameter; switched on once more, the
        # master copy made at the first switch is used again, as it was left.
        # Chainer's NumPy lines, in the mixed dtypes, are the oracle.
        def chainer_lines(p, g, v):
            v *= MOM
            v -= LR * g
            p += MOM * MOM * v
            p -= (1 + MOM) * LR * g

        link = make_link()
        opt = NesterovAG(lr=LR, momentum=MOM).setup(link)
        if loss_scale is not None:
            opt.set_loss_scale(loss_scale)
        W, u = link.W, link.u
        rule = W.update_rule
        u_oracle = ParamOracle(u.array, False)
        master = v = p16 = None
        for step in range(12):
            if step == 3:
                rule.use_fp32_update()
            elif step == 7:
                rule.use_fp32_update(False)
            elif step == 10:
                rule.use_fp32_update(True)
            if step == 3:
                before16, before_v = W.array.copy(), rule.state["v"].copy()
            grads = grads_for(link, step, scale=1.0 if loss_scale is None else loss_scale)
            # (the other parameters take the multi-tensor kernel)
            if loss_scale is None:
                for n, p in link.namedparams():
                    p.grad = grads[n].copy()
                opt.update()
            else:
                opt.update(lambda: Loss(link, grads, []))
            u_oracle.step(grads["/u"], loss_scale)
            u_oracle.check(u, "u step %d" % step)
            if step < 3:
                continue  # plain float16 steps (cynag's float16 rule, tested elsewhere)
            if step == 3:
                p16 = before16.copy()
                v = before_v.copy()
                assert v.dtype == F16
                master = p16.astype(F32)
            if 3 <= step < 7 or step >= 10:
                g = grads["/W"].astype(F32)
                if loss_scale is not None:
                    g = g / F32(loss_scale)
                chainer_lines(master, g, v)
                p16 = master.astype(F16)
                assert rule._fp32_param is not None
                assert_same_bits(rule._fp32_param.array, master, "master step %d" % step)
            else:
                # float16 v and parameter: cynag's float16 rule (see
                # docs/differences.md); the master copy is left as it was.
                assert_same_bits(rule._fp32_param.array, master, "master step %d" % step)
                p16, v = W.array.copy(), rule.state["v"].copy()
            assert rule.state["v"].dtype == F16  # kept from the first steps
            assert_same_bits(W.array, p16, "W step %d" % step)
            assert_same_bits(rule.state["v"], v, "v step %d" % step)
            assert rule.t == step + 1
        # ... and the other way: a float32 v (made with the master copy) kept
        # after the switch is turned off.
        assert W.dtype == F16
        link2 = make_link()
        opt2 = NesterovAG(lr=LR, momentum=MOM).setup(link2)
        opt2.use_fp32_update()
        for step in range(2):
            for n, g in grads_for(link2, step).items():
                dict(link2.namedparams())[n].grad = g
            opt2.update()
        link2.W.update_rule.use_fp32_update(False)
        p16, v = link2.W.array.copy(), link2.W.update_rule.state["v"].copy()
        assert v.dtype == F32
        g = grads_for(link2, 2)["/W"]
        link2.W.grad = g.copy()
        for n, gg in grads_for(link2, 2).items():
            if n != "/W":
                dict(link2.namedparams())[n].grad = gg
        opt2.update()
        chainer_lines(p16, g, v)
        assert_same_bits(link2.W.array, p16, "W after switching off")
        assert_same_bits(link2.W.update_rule.state["v"], v, "v after switching off")

    def test_flag_does_not_touch_float32_float64(self):
        results = {}
        for flag in (False, True):
            link = make_link()
            opt = NesterovAG(lr=LR, momentum=MOM).setup(link)
            if flag:
                opt.use_fp32_update()
            for step in range(20):
                for n, g in grads_for(link, step).items():
                    dict(link.namedparams())[n].grad = g
                opt.update()
            results[flag] = link
            assert link.u.update_rule._fp32_param is None
            assert link.x.update_rule._fp32_param is None
        for name in ("u", "x"):
            a, b = getattr(results[False], name), getattr(results[True], name)
            assert_same_bits(b.array, a.array, name)
            assert_same_bits(b.update_rule.state["v"], a.update_rule.state["v"], name)


# ---------------------------------------------------------------------------
# loss scaling: configuration
# ---------------------------------------------------------------------------
class TestLossScaleConfig:
    def test_validation(self):
        opt = NesterovAG().setup(make_link())
        for bad in (0, 0.0, -1, -2.5):
            with pytest.raises(ValueError):
                opt.set_loss_scale(bad)
            with pytest.raises(ValueError):
                opt.loss_scaling(scale=bad)
        for bad in (0, 0.5, -3):
            with pytest.raises(ValueError):
                opt.loss_scaling(interval=bad)
        opt = NesterovAG().setup(make_link())
        opt.set_loss_scale(128.0)
        assert opt._loss_scale == 128.0 and not opt._loss_scaling_is_dynamic

    def test_dynamic_starts_at_one(self):
        opt = NesterovAG().setup(make_link())
        opt.set_loss_scale(None)
        assert opt._loss_scaling_is_dynamic and opt._loss_scale == 1.0
        opt2 = NesterovAG().setup(make_link())
        opt2.loss_scaling(interval=7)
        assert opt2._loss_scale == 1.0
        assert opt2._loss_scaling_multiplier == math.pow(2.0, 1.0 / 7)


# ---------------------------------------------------------------------------
# static loss scaling
# ---------------------------------------------------------------------------
def make_f32_link(seed=0, with_f16=True):
    """W (4, 3), b (3,), s 0-d float32; d 0-d float64; h 0-d float16 (with_f16)."""
    rng = numpy.random.RandomState(seed)
    link = cynag.Link()
    with link.init_scope():
        link.W = cynag.Parameter(rng.randn(4, 3).astype(F32))
        link.b = cynag.Parameter(rng.randn(3).astype(F32))
        link.s = cynag.Parameter(numpy.asarray(rng.randn(), F32))
        link.d = cynag.Parameter(numpy.asarray(rng.randn(), F64))
        h = cynag.Parameter(numpy.asarray(rng.randn(), F16))
        if with_f16:
            link.h = h
    return link


def discriminating_0d_grad(dtype, scale):
    """A value whose 0-d division differs between float64-then-round and dtype division."""
    rng = numpy.random.RandomState(11)
    for _ in range(100000):
        g = dtype(rng.standard_normal() * 5)
        a = dtype(F64(g) / F64(scale))
        b = numpy.divide(numpy.asarray([g]), dtype(scale))[0]
        if a != b:
            return g
    raise AssertionError("no discriminating value found")


class TestStaticLossScale:
    SCALE = 3.3  # not a float32 number: the two divisions differ often

    def test_grad_divided_before_rule_hooks_and_update(self):
        link = make_f32_link()
        opt = NesterovAG(lr=LR, momentum=MOM).setup(link)
        opt.set_loss_scale(self.SCALE)
        params = dict(link.namedparams())
        oracles = {n: ParamOracle(p.array, False) for n, p in params.items()}
        in_rule, in_opt, received = {}, [], []

        def rule_hook(rule, param):
            in_rule.setdefault(param.name, []).append(param.grad.copy())

        for p in params.values():
            p.update_rule.add_hook(rule_hook, name="rec", timing="pre")
        opt.add_hook(lambda o: in_opt.append({n: p.grad.copy() for n, p in params.items()}),
                     name="opt_pre", timing="pre")
        special = {n: discriminating_0d_grad(params[n].dtype.type, self.SCALE)
                   for n in ("/s", "/h")}
        distinct_1d = False
        for step in range(6):
            grads = grads_for(link, step, scale=self.SCALE)
            if step == 0:
                for n, g in special.items():
                    grads[n] = numpy.asarray(g)
            opt.update(lambda: Loss(link, grads, received))
            for n, p in params.items():
                assert p._loss_scale == self.SCALE
                expected = oracles[n].step(grads[n], self.SCALE)
                assert_same_bits(in_rule[n[1:]][-1], expected, "%s grad step %d" % (n, step))
                # the optimizer's hooks run before the division
                assert_same_bits(in_opt[-1][n], grads[n], "%s opt-hook grad" % n)
                oracles[n].check(p, "%s step %d" % (n, step))
                if p.ndim and not numpy.array_equal(
                        expected, (grads[n].astype(F64) / self.SCALE).astype(p.dtype)):
                    distinct_1d = True
        assert received == [self.SCALE] * 6
        assert distinct_1d  # the ndim >= 1 check can tell the two divisions apart

    def test_0d_division_oracle(self):
        # grad = float32(float64(g) / float64(scale)) for a 0-d float32 parameter
        g = discriminating_0d_grad(F32, self.SCALE)
        link = cynag.Link()
        with link.init_scope():
            link.s = cynag.Parameter(numpy.asarray(1.0, F32))
        opt = NesterovAG(lr=LR, momentum=MOM).setup(link)
        opt.set_loss_scale(self.SCALE)
        seen = []
        link.s.update_rule.add_hook(lambda r, p: seen.append(p.grad.copy()), name="h")
        grads = {"/s": numpy.asarray(g, F32)}
        opt.update(lambda: Loss(link, grads, []))
        expected = F32(F64(g) / F64(self.SCALE))
        assert seen[0].shape == () and seen[0].dtype == F32
        assert_same_bits(seen[0], numpy.asarray(expected))
        assert expected != F32(g) / F32(self.SCALE)

    def test_static_scale_without_lossfun_uses_param_loss_scale(self):
        # As in Chainer, the rule divides by param._loss_scale (set by backward).
        link = make_f32_link()
        opt = NesterovAG(lr=LR, momentum=MOM).setup(link)
        opt.set_loss_scale(8.0)
        seen = []
        link.W.update_rule.add_hook(lambda r, p: seen.append(p.grad.copy()), name="h")
        g = grads_for(link, 0)
        for n, p in link.namedparams():
            p.grad = g[n].copy()
        opt.update()  # no backward: _loss_scale not set, nothing divided
        assert_same_bits(seen[-1], g["/W"])
        link.W._loss_scale = 8.0
        link.W.grad = g["/W"].copy()
        opt.update()
        assert_same_bits(seen[-1], g["/W"] / F32(8.0))


# ---------------------------------------------------------------------------
# dynamic loss scaling
# ---------------------------------------------------------------------------
def expected_scales(bad_steps, n, interval):
    """The scale passed to backward at each step, by Chainer's rule."""
    scale, ever, mult, out = 1.0, False, math.pow(2.0, 1.0 / interval), []
    for step in range(n):
        out.append(scale)
        if step in bad_steps:
            ever, m = True, 0.5
        else:
            m = mult if ever else 2.0
        scale = max(1, min(65504, scale * m))
    return out


class TestDynamicLossScale:
    def run(self, link, opt, n, bad_steps, bad_param):
        """Steps through update(lossfun); returns per-step records."""
        params = dict(link.namedparams())
        counts = {"pre": 0, "post": 0}
        opt.add_hook(lambda o: counts.__setitem__("pre", counts["pre"] + 1), name="p",
                     timing="pre")
        opt.add_hook(lambda o: counts.__setitem__("post", counts["post"] + 1), name="q",
                     timing="post")
        received, records = [], []
        for step in range(n):
            scale = opt._loss_scale
            with numpy.errstate(over="ignore"):
                grads = {k: numpy.asarray(v * F32(scale)).astype(v.dtype)
                         for k, v in grads_for(link, step).items()}
            if step in bad_steps:
                grads[bad_param] = grads[bad_param].copy()
                grads[bad_param].reshape(-1)[-1] = numpy.inf
            before = {k: (p.array.copy(), p.update_rule.t,
                          None if p.update_rule.state is None
                          else p.update_rule.state["v"].copy()) for k, p in params.items()}
            t_before = opt.t
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                opt.update(lambda: Loss(link, grads, received))
            msgs = [str(x.message) for x in w]
            records.append((step, scale, grads, before, t_before, msgs, dict(counts)))
        return received, records

    def test_sequence_skip_and_growth(self):
        link = make_f32_link()
        opt = NesterovAG(lr=LR, momentum=MOM).setup(link)
        opt.loss_scaling(interval=3)
        bad = {4, 9}
        n = 16
        params = dict(link.namedparams())
        oracles = {k: ParamOracle(p.array, False) for k, p in params.items()}
        received, records = self.run(link, opt, n, bad, "/b")
        assert received == expected_scales(bad, n, 3)
        assert received[:5] == [1.0, 2.0, 4.0, 8.0, 16.0]
        assert received[5] == 8.0 and received[6] == 8.0 * math.pow(2.0, 1 / 3)
        for step, scale, grads, before, t_before, msgs, counts in records:
            assert opt.t >= t_before + 1
            assert counts == {"pre": step + 1, "post": step + 1}  # hooks run on skipped steps
            if step in bad:
                assert len(msgs) == 1 and "/b" in msgs[0], msgs
                assert "/W" not in msgs[0]
                continue
            assert msgs == []
            for k in params:
                oracles[k].step(grads[k], scale)
        assert opt.t == n
        for k, p in params.items():
            oracles[k].check(p, k)
            assert p.update_rule.t == n - len(bad)

    def test_skipped_step_changes_nothing(self):
        link = make_f32_link()
        opt = NesterovAG(lr=LR, momentum=MOM).setup(link)
        opt.loss_scaling()
        params = dict(link.namedparams())
        _, records = self.run(link, opt, 6, {3}, "/W")
        for step, scale, grads, before, t_before, msgs, counts in records:
            if step == 4:  # values seen before step 4 = after the skipped step 3
                for k, (arr, t, v) in before.items():
                    prev = records[3][3][k]
                    assert_same_bits(arr, prev[0], k)
                    assert t == prev[1]
                    assert_same_bits(v, prev[2], k)
                assert t_before == 4  # optimizer.t still counted the skipped step
        assert records[3][5] and "/W" in records[3][5][0]

    def test_upper_bound(self):
        link = make_f32_link(with_f16=False)  # no float16 gradient to overflow
        opt = NesterovAG(lr=LR, momentum=MOM).setup(link)
        opt.loss_scaling(interval=2)
        received, _ = self.run(link, opt, 20, set(), "/W")
        assert received[:17] == [2.0 ** i for i in range(16)] + [65504]
        assert received[17:] == [65504] * 3
        assert opt._loss_scale == 65504

    def test_lower_bound(self):
        link = make_f32_link()
        opt = NesterovAG(lr=LR, momentum=MOM).setup(link)
        opt.loss_scaling(interval=1)
        received, records = self.run(link, opt, 5, {0, 1, 2}, "/s")
        assert received == [1.0, 1.0, 1.0, 1.0, 2.0]
        assert all("/s" in r[5][0] for r in records[:3])
        assert link.W.update_rule.t == 2 and opt.t == 5

    def test_without_lossfun(self):
        link = make_f32_link()
        opt = NesterovAG(lr=LR, momentum=MOM).setup(link)
        opt.loss_scaling()
        before = link.b.array.copy()
        for k, g in grads_for(link, 0).items():
            dict(link.namedparams())[k].grad = g
        link.b.grad[0] = numpy.nan
        with pytest.warns(UserWarning, match="/b"):
            opt.update()
        assert_same_bits(link.b.array, before)
        assert opt.t == 1 and link.b.update_rule.t == 0
        assert opt._loss_scale == 1.0

    def test_float16_fp32_against_oracle(self):
        # float16 parameters, float32 masters and dynamic scaling; a large
        # gradient element overflows float16 once the scale is high enough.
        rng = numpy.random.RandomState(1)
        link = cynag.Link()
        with link.init_scope():
            link.W = cynag.Parameter(rng.randn(4, 3).astype(F16))
            link.s = cynag.Parameter(numpy.asarray(rng.randn(), F16))
        opt = NesterovAG(lr=LR, momentum=MOM).setup(link)
        opt.use_fp32_update()
        opt.loss_scaling(interval=2)
        params = dict(link.namedparams())
        oracles = {k: ParamOracle(p.array, True) for k, p in params.items()}
        scale, ever, mult = 1.0, False, math.pow(2.0, 0.5)
        received, skipped, opt_t = [], 0, 0
        for step in range(50):
            rs = numpy.random.RandomState(900 + step)
            base = {"/W": rs.standard_normal((4, 3)) * 0.3,
                    "/s": numpy.asarray(rs.standard_normal())}
            base["/W"][0, 0] = 6.0  # overflows float16 from scale 16384 on
            with numpy.errstate(over="ignore"):  # the overflow is the point
                grads = {k: numpy.asarray(v * scale).astype(F16) for k, v in base.items()}
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                opt.update(lambda: Loss(link, grads, received))
            assert received[-1] == scale
            finite = all(numpy.isfinite(g).all() for g in grads.values())
            opt_t += 1
            if finite:
                assert not w
                for k in params:
                    oracles[k].step(grads[k], scale)
            else:
                skipped += 1
                assert w and "/W" in str(w[0].message)
            for k, p in params.items():
                oracles[k].check(p, "%s step %d" % (k, step))
            assert opt.t == opt_t
            if not finite:
                ever, m = True, 0.5
            else:
                m = mult if ever else 2.0
            scale = max(1, min(65504, scale * m))
            assert opt._loss_scale == scale
        assert skipped >= 2  # overflow happened and was recovered from


def test_loading_a_checkpoint_drops_a_stale_fp32_master(tmp_path):
    """The master copy is not saved; after a load it must not overwrite the
    loaded float16 parameter with the values of the run before the load."""
    from cynag import serializers

    def make():
        link = cynag.Link()
        with link.init_scope():
            link.W = cynag.Parameter(numpy.linspace(-1, 1, 8).astype(numpy.float16))
        opt = cynag.optimizers.NesterovAG(lr=0.1).setup(link)
        opt.use_fp32_update()
        return link, opt

    link, opt = make()
    for _ in range(3):
        link.W.grad = numpy.ones(8, numpy.float16)
        opt.update()
    serializers.save_npz(tmp_path / "m.npz", link)
    serializers.save_npz(tmp_path / "o.npz", opt)
    saved = link.W.array.copy()
    for _ in range(3):  # the master moves on
        link.W.grad = numpy.ones(8, numpy.float16)
        opt.update()
    serializers.load_npz(tmp_path / "m.npz", link)
    serializers.load_npz(tmp_path / "o.npz", opt)
    fresh_link, fresh_opt = make()
    serializers.load_npz(tmp_path / "m.npz", fresh_link)
    serializers.load_npz(tmp_path / "o.npz", fresh_opt)
    assert numpy.array_equal(link.W.array, saved)
    for lk, op in ((link, opt), (fresh_link, fresh_opt)):
        lk.W.grad = numpy.ones(8, numpy.float16)
        op.update()
    assert numpy.array_equal(link.W.array, fresh_link.W.array)


def _two_f16_params():
    link = cynag.Link()
    with link.init_scope():
        link.a = cynag.Parameter(numpy.ones(4, numpy.float16))
        link.b = cynag.Parameter(numpy.ones(4, numpy.float16))
    for p in link.params():
        p.grad = numpy.full(4, 0.5, numpy.float16)
    return link


def test_fp32_switched_on_with_float16_state_goes_on_as_chainer():
    """v created without fp32 updates is float16: as in Chainer, it stays float16
    and is updated with the float32 master copy (NumPy's mixed arithmetic)."""
    link = _two_f16_params()
    opt = NesterovAG().setup(link)
    opt.update()
    opt.use_fp32_update()
    opt.update()
    assert opt.t == 2 and all(p.update_rule.t == 2 for p in link.params())
    for p in link.params():
        assert p.update_rule.state["v"].dtype == F16
        assert p.update_rule._fp32_param.array.dtype == F32 and p.array.dtype == F16


def test_mixed_v_dtype_checked_before_any_change():
    """A v of a kind NumPy cannot update in place (integers) is refused before
    anything changes, with the parameter's name."""
    link = _two_f16_params()
    opt = NesterovAG().setup(link)
    opt.update()
    opt.use_fp32_update()
    link.b.update_rule.state["v"] = numpy.zeros(4, numpy.int32)
    before = [p.array.copy() for p in link.params()]
    with pytest.raises(TypeError, match="'/b'.*v has dtype int32"):
        opt.update()
    assert opt.t == 1 and all(p.update_rule.t == 1 for p in link.params())
    assert all(numpy.array_equal(p.array, b) for p, b in zip(link.params(), before))
    assert all(p.update_rule._fp32_param is None for p in link.params())


@pytest.mark.parametrize("multi", [True, False])
@pytest.mark.parametrize("hook", [False, True])
def test_fp32_master_of_another_shape_refused_before_any_change(multi, hook):
    """A float16 parameter whose array was replaced by one of another shape
    keeps its float32 master copy (as in Chainer, which then fails on that
    parameter after updating the ones before it): refused before anything
    changes, hooks included, naming the parameter."""
    from cynag.optimizer_hooks import WeightDecay

    link = cynag.Link()
    with link.init_scope():
        link.a = cynag.Parameter(numpy.ones(4, numpy.float32))
        link.b = cynag.Parameter(numpy.asarray(0.5, numpy.float16))
        link.c = cynag.Parameter(numpy.ones(4, numpy.float32))
    opt = NesterovAG().setup(link)
    opt.use_multi_tensor(multi)
    opt.use_fp32_update()
    for p in link.params():
        p.grad = numpy.full(p.shape, 0.5, p.dtype)
    opt.update()
    if hook:
        opt.add_hook(WeightDecay(0.01), timing="pre")
    link.b.array = numpy.asfortranarray(link.b.array)  # 0-d becomes (1,)
    for p in link.params():
        p.grad = numpy.full(p.shape, 0.25, p.dtype)
    before = [(p.array.copy(), p.grad.copy(), p.update_rule.state["v"].copy())
              for p in link.params()]
    with pytest.raises(ValueError, match="'/b'.*float32 master copy has shape"):
        opt.update()
    assert opt.t == 1 and all(p.update_rule.t == 1 for p in link.params())
    for p, (a, g, v) in zip(link.params(), before):
        assert_same_bits(p.array, a)
        assert_same_bits(p.grad, g)
        assert_same_bits(p.update_rule.state["v"], v)


def test_read_only_grad_with_loss_scale_after_state_exists():
    link = _two_f16_params()
    opt = NesterovAG().setup(link)
    opt.update()
    for p in link.params():
        p._loss_scale = 2.0
    link.b.grad = numpy.broadcast_to(numpy.float16(1), (4,))
    before = link.a.array.copy()
    with pytest.raises(ValueError, match="'/b'.*read-only"):
        opt.update()
    assert opt.t == 1 and numpy.array_equal(link.a.array, before)


@pytest.mark.parametrize("multi", [True, False])
def test_fp32_update_takes_read_only_param_and_grad(multi):
    """With a float32 master copy the rule assigns a new array and works on a
    float32 copy of the gradient (Chainer's UpdateRule.update): a read-only
    float16 array, and a read-only gradient even with a loss scale and a
    rule-level hook, are fine; the bits are those of writeable ones."""
    from cynag.optimizer_hooks import WeightDecay

    results = []
    for read_only in (False, True):
        link = _two_f16_params()
        opt = NesterovAG(lr=0.1, momentum=0.9).setup(link)
        opt.use_multi_tensor(multi)
        opt.use_fp32_update()
        link.b.update_rule.add_hook(WeightDecay(0.01))
        for step in range(3):
            for k, p in enumerate(link.params()):
                p._loss_scale = 4.0
                g = numpy.full(4, 0.25 * (step + k + 1), numpy.float16)
                if read_only:
                    g.flags.writeable = False
                    p.array.flags.writeable = False
                p.grad = g
            opt.update()
        results.append([p.array.copy() for p in link.params()])
        assert all(p.update_rule.t == 3 for p in link.params())
    for a, b in zip(*results):
        assert_same_bits(a, b)


def test_rule_t_must_be_a_number():
    """Chainer takes ``rule.t = None`` and fails at the next update, after the
    parameters before it were updated; cynag refuses the assignment."""
    link = _two_f16_params()
    opt = NesterovAG().setup(link)
    opt.update()
    for bad in (None, "x", [1], numpy.zeros(2)):
        with pytest.raises(TypeError, match="t must be a number"):
            link.a.update_rule.t = bad
        assert link.a.update_rule.t == 1
    for good in (numpy.int64(5), numpy.asarray(6), 7.0, True, numpy.True_):
        link.a.update_rule.t = good
        opt.update()
        assert link.a.update_rule.t == good + 1
        assert type(link.a.update_rule.t) is type(good + 1)  # (Chainer's t += 1)
