"""Cases where trusting change notifications gave other results than Chainer.

Each compares the multi-tensor step with the per-parameter path (Chainer's
loop, ``use_multi_tensor(False)``) bit for bit; their Chainer counterparts
are in chainer_parity_cases.py (``edge_*_step_*``).
"""
import numpy as np
import pytest

import cynag
from cynag import optimizer_hooks as H
from test_step_machine import _DuckParam as _DictParam  # (a class of its own, with a __dict__)

F32 = np.float32


def _pair(build, contiguous=False):
    out = []
    for multi in (True, False):
        link, extra = build()
        opt = cynag.optimizers.NesterovAG(lr=0.1, momentum=0.9)
        opt.setup(link, contiguous=contiguous)
        opt.use_multi_tensor(multi)
        out.append((link, opt, extra))
    return out


def _assert_same(runs):
    (la, oa, _), (lb, ob, _) = runs
    for (path, pa), (_, pb) in zip(la.namedparams(), lb.namedparams()):
        assert pa.array.tobytes() == pb.array.tobytes(), (path, pa.array, pb.array)
        ra, rb = pa.update_rule, pb.update_rule
        assert ra.t == rb.t, path
        if ra.state:
            assert ra.state["v"].tobytes() == rb.state["v"].tobytes(), path


def _two():
    link = cynag.Link()
    with link.init_scope():
        link.a = cynag.Parameter(np.array([1.0, 2.0], F32))
        link.b = cynag.Parameter(np.array([2.0, 3.0], F32))
    return link, None


def test_shared_gradient_after_the_plan_was_built():
    """``b.grad = a.grad`` after a step: a's rule-level WeightDecay changes the
    shared gradient before b is updated with it (Chainer's order)."""
    runs = _pair(_two)
    for link, opt, _ in runs:
        for p in link.params():
            p.grad = np.ones(2, F32)
        opt.update()                                  # creates the states
        link.a.update_rule.add_hook(H.WeightDecay(0.5))
        for p in link.params():
            p.grad = np.ones(2, F32)
        opt.update()                                  # the old plan: b grouped, a alone
        link.b.grad = link.a.grad
        opt.update()
    _assert_same(runs)
    # Chainer 7.8.1's values for this sequence (see the parity case).
    assert runs[0][0].b.array.tolist() == runs[1][0].b.array.tolist()


def test_shared_gradient_with_folded_optimizer_hooks():
    """A folded WeightDecay adds each parameter's term to a shared gradient
    before either is updated, as Chainer's hook loop does."""
    runs = _pair(_two)
    for link, opt, _ in runs:
        for p in link.params():
            p.grad = np.ones(2, F32)
        opt.update()
        opt.add_hook(H.WeightDecay(0.25))
        g = np.ones(2, F32)
        link.a.grad = g
        link.b.grad = g
        opt.update()
    _assert_same(runs)


def test_shared_arrays_across_threads():
    """Parameters whose arrays overlap are updated one after the other even when
    the kernel would split the work over threads."""
    n = 1 << 17
    base = np.linspace(-1, 1, 2 * n).astype(F32)

    def build():
        link = cynag.Link()
        b = base.copy()
        with link.init_scope():
            link.a = cynag.Parameter(b[:n + 1000])
            link.b = cynag.Parameter(b[n - 1000:2 * n])
        return link, None

    old = cynag.get_num_threads()
    cynag.set_num_threads(2)
    try:
        runs = _pair(build)
        for link, opt, _ in runs:
            for step in range(3):
                for p in link.params():
                    p.grad = np.full(p.array.shape, 0.5 + step, F32)
                opt.update()
    finally:
        cynag.set_num_threads(old)
    _assert_same(runs)


def test_contiguous_mode_keeps_parameters_that_share_an_array_sharing_it():
    """Two Parameters holding one array object stay one array in contiguous mode."""
    def build():
        link = cynag.Link()
        shared = np.array([1.0, -2.0, 3.0], F32)
        with link.init_scope():
            link.a = cynag.Parameter(shared)
            link.b = cynag.Parameter(shared)
            link.c = cynag.Parameter(np.array([0.5, 0.25], F32))
        return link, None

    for contiguous in (True, False):
        runs = _pair(build, contiguous=contiguous)
        for link, opt, _ in runs:
            for step in range(4):
                link.a.grad = np.full(3, 1.0 + step, F32)
                link.b.grad = np.full(3, -0.5, F32)
                link.c.grad = np.ones(2, F32)
                opt.update()
            assert link.a.array is link.b.array or np.shares_memory(link.a.array,
                                                                     link.b.array)
        _assert_same(runs)
        # Against the plain model (no contiguous packing).
        plain = _pair(build)
        for link, opt, _ in plain:
            for step in range(4):
                link.a.grad = np.full(3, 1.0 + step, F32)
                link.b.grad = np.full(3, -0.5, F32)
                link.c.grad = np.ones(2, F32)
                opt.update()
        assert runs[0][0].a.array.tolist() == plain[1][0].a.array.tolist()


@pytest.mark.parametrize("how", ["disabled", "added_after_setup"])
def test_uninitialized_parameter_that_is_not_updated_is_not_read(how):
    """A lazily initialized parameter whose rule is disabled or that has no rule
    is skipped without reading its gradient (Chainer raises on reading it)."""

    class Lazy(cynag.Parameter):
        @property
        def grad(self):
            if self.array is None:
                raise RuntimeError("Cannot retrieve Variable.grad")
            return self._grad

        @grad.setter
        def grad(self, value):
            self._grad = value

    link = cynag.Link()
    with link.init_scope():
        link.w = cynag.Parameter(np.ones(3, F32))
        if how == "disabled":
            link.lazy = Lazy(lambda a: a.fill(1))
    opt = cynag.optimizers.NesterovAG().setup(link)
    if how == "disabled":
        link.lazy.update_rule.enabled = False
    else:
        with link.init_scope():
            link.lazy = Lazy(lambda a: a.fill(1))
    link.w.grad = np.ones(3, F32)
    opt.update()
    opt.update()
    assert link.w.update_rule.t == 2


def _override(how, link, calls):
    """Chainer's loop calls param.update() -> rule.update() -> update_core() ->
    update_core_cpu(): a replacement of any of them, on the object or on the
    class, must be called at every step, not only while the state is new."""
    rule = link.a.update_rule
    if how == "rule.update_core_cpu":
        orig = rule.update_core_cpu

        def patched(param):
            calls.append(1)
            param.grad[...] = 0  # e.g. freezing by gradient surgery
            orig(param)
        rule.update_core_cpu = patched
    elif how == "rule.update_core":
        rule.update_core = lambda param: calls.append(1)
    elif how == "rule.update":
        rule.update = lambda param: calls.append(1)
    elif how == "param.update":
        link.a.update = lambda: calls.append(1)
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["rule.update_core_cpu", "rule.update_core", "rule.update",
                                 "param.update"])
def test_update_methods_set_on_objects_after_steps_are_called(how):
    runs = _pair(_two)
    calls = [[], []]
    for step in range(4):
        for k, (link, opt, _) in enumerate(runs):
            if step == 2:
                _override(how, link, calls[k])
            for p in link.params():
                p.grad = np.full(2, 0.5 + step, F32)
            opt.update()
        _assert_same(runs)
    assert calls[0] == calls[1] == [1, 1]
    if how == "param.update":
        for link, opt, _ in runs:
            del link.a.update  # back to the rule's update
            link.a.grad = np.ones(2, F32)
            link.b.grad = np.ones(2, F32)
            opt.update()
        _assert_same(runs)
        assert calls[0] == [1, 1]


@pytest.mark.parametrize("owner,name", [("rule", "update_core_cpu"), ("rule", "update_core"),
                                        ("rule", "update"), ("param", "update")])
def test_update_methods_patched_on_the_class_after_steps_are_called(owner, name):
    from unittest import mock

    from cynag.optimizers.nesterov_ag import NesterovAGRule

    cls = NesterovAGRule if owner == "rule" else cynag.Parameter
    runs = _pair(_two)
    calls = [[], []]
    for step in range(4):
        for k, (link, opt, _) in enumerate(runs):
            for p in link.params():
                p.grad = np.full(2, 0.5 + step, F32)
            if step >= 2:
                with mock.patch.object(cls, name,
                                       lambda self, *p, c=calls[k]: c.append(1)):
                    opt.update()
            else:
                opt.update()
        _assert_same(runs)
    assert calls[0] == calls[1] == [1, 1, 1, 1]  # two parameters, two steps
    for link, opt, _ in runs:  # the class as it was: the kernel's again
        for p in link.params():
            p.grad = np.ones(2, F32)
        opt.update()
    _assert_same(runs)
    assert runs[0][1].multi_tensor_plan()["groups"][0]["params"] == 2


class _SlotsParam(_DictParam):
    __slots__ = ()


class _OnlySlotsParam:
    """The same with __slots__ and no instance dictionary at all."""

    __slots__ = ("array", "grad", "update_rule", "name", "_loss_scale", "_init")
    __init__ = _DictParam.__init__
    data = _DictParam.data
    update = _DictParam.update
    cleargrad = _DictParam.cleargrad


class _DuckLink:
    def __init__(self, cls):
        self._params = [cls(np.array([1.0, 2.0], F32)), cls(np.array([2.0, 3.0], F32))]
        for i, p in enumerate(self._params):
            p.name = "p%d" % i

    def params(self, include_uninit=True):
        return iter(self._params)

    def namedparams(self, include_uninit=True):
        return (("/" + p.name, p) for p in self._params)

    def cleargrads(self):
        for p in self._params:
            p.cleargrad()


@pytest.mark.parametrize("cls", [_DictParam, _SlotsParam, _OnlySlotsParam])
def test_duck_parameters_with_and_without_an_instance_dictionary(cls):
    """A duck parameter's own ``update`` is looked up in its instance dictionary
    where it has one; a class with only __slots__ has none to look up."""
    runs = _pair(lambda: (_DuckLink(cls), None))
    calls = [[], []]
    for step in range(4):
        for k, (link, opt, _) in enumerate(runs):
            if step == 2 and cls is not _OnlySlotsParam:
                link._params[0].update = lambda c=calls[k]: c.append(1)
            for p in link.params():
                p.grad = np.full(2, 0.5 + step, F32)
            opt.update()
        _assert_same(runs)
    expected = [] if cls is _OnlySlotsParam else [1, 1]
    assert calls[0] == calls[1] == expected
    if cls is _OnlySlotsParam:
        assert runs[0][0]._params[0].update_rule.t == 4
