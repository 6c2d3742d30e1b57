"""Parameter, Link, Chain and ChainList: Chainer 7.8.1 semantics, pure cynag.

Expected behaviour follows chainer/variable.py (Parameter) and chainer/link.py
(Link, Chain, ChainList) of Chainer 7.8.1; Chainer itself is not imported.
"""
import warnings

import numpy as np
import pytest

import cynag
from cynag import Chain, ChainList, Link, Parameter
from cynag.optimizers import NesterovAG, NesterovAGRule


def _nan_like(a):
    return a.dtype.kind == "f" and bool(np.all(np.isnan(a)))


# ---------------------------------------------------------------------------
# Parameter
# ---------------------------------------------------------------------------
class TestParameterConstruction:
    def test_from_array_uses_array_as_is(self):
        a = np.arange(6, dtype=np.float32).reshape(2, 3)
        p = Parameter(a)
        assert p.array is a
        assert p.data is a
        assert p.grad is None
        assert p.name is None
        assert p.update_rule is None
        assert p.is_initialized

    def test_short_form_name(self):
        a = np.zeros(3, np.float64)
        p = Parameter(a, "W")
        assert p.name == "W"
        assert p.array is a
        assert p.shape == (3,)

    def test_name_keyword(self):
        p = Parameter(np.zeros(2, np.float32), name="b")
        assert p.name == "b"

    def test_array_keyword(self):
        a = np.ones((2, 2), np.float16)
        p = Parameter(array=a)
        assert p.array is a
        assert p.dtype == np.float16
        assert p.grad is None

    def test_array_keyword_and_initializer_conflict(self):
        with pytest.raises(TypeError):
            Parameter(np.zeros(2), array=np.zeros(2))

    @pytest.mark.parametrize("value", [0.5, 3, -2.0])
    def test_scalar_initializer_with_shape(self, value):
        p = Parameter(value, (2, 3))
        assert p.shape == (2, 3)
        assert p.dtype == np.float32  # Chainer: float32 for scalars
        np.testing.assert_array_equal(p.array, np.full((2, 3), value, np.float32))
        # Chainer: a parameter created with a shape has a NaN gradient
        assert p.grad.shape == (2, 3) and p.grad.dtype == np.float32
        assert _nan_like(p.grad)

    def test_none_initializer_with_shape_is_nan(self):
        p = Parameter(None, (4,))
        assert p.dtype == np.float32
        assert _nan_like(p.array)
        assert p.grad.shape == (4,)
        assert _nan_like(p.grad)

    def test_shape_as_int(self):
        p = Parameter(1.0, 5)
        assert p.shape == (5,)

    def test_callable_initializer_with_shape(self):
        calls = []

        def init(arr):
            calls.append(arr.shape)
            arr[...] = np.arange(arr.size).reshape(arr.shape)

        p = Parameter(init, (2, 2))
        assert calls == [(2, 2)]
        assert p.dtype == np.float32
        np.testing.assert_array_equal(p.array, np.arange(4, dtype=np.float32).reshape(2, 2))
        assert _nan_like(p.grad)

    def test_callable_initializer_with_dtype_attribute(self):
        class Init:
            dtype = np.float64

            def __call__(self, arr):
                arr[...] = 7

        p = Parameter(Init(), (3,))
        assert p.dtype == np.float64
        np.testing.assert_array_equal(p.array, np.full(3, 7.0))
        assert p.grad.dtype == np.float64 and _nan_like(p.grad)

    def test_array_initializer_with_shape_broadcasts_copy(self):
        src = np.arange(3, dtype=np.float64)
        p = Parameter(src, (2, 3))
        assert p.array is not src
        assert p.dtype == np.float32  # Chainer: Constant initializer, default dtype
        np.testing.assert_array_equal(p.array, np.broadcast_to(src, (2, 3)))
        assert _nan_like(p.grad)



class TestUninitializedParameter:
    def test_uninitialized(self):
        p = Parameter()
        assert not p.is_initialized
        assert p.array is None and p.data is None
        assert p.shape is None and p.size is None
        with pytest.raises(RuntimeError):
            p.dtype

    def test_uninitialized_dtype_from_initializer(self):
        class Init:
            dtype = np.float16

            def __call__(self, arr):
                arr[...] = 1

        p = Parameter(Init())
        assert not p.is_initialized
        assert p.dtype == np.float16

    def test_initialize_none_gives_nan_and_nan_grad(self):
        p = Parameter()
        p.initialize((2, 3))
        assert p.is_initialized
        assert p.shape == (2, 3) and p.dtype == np.float32
        assert _nan_like(p.array)
        assert p.grad is not None and p.grad.shape == (2, 3) and _nan_like(p.grad)

    def test_initialize_scalar(self):
        p = Parameter(2.5)
        assert not p.is_initialized
        p.initialize((3,))
        np.testing.assert_array_equal(p.array, np.full(3, 2.5, np.float32))

    def test_initialize_callable_dtype(self):
        class Init:
            dtype = np.float64

            def __call__(self, arr):
                arr[...] = -1

        p = Parameter(Init())
        p.initialize((2,))
        assert p.dtype == np.float64
        np.testing.assert_array_equal(p.array, [-1.0, -1.0])
        assert p.grad.dtype == np.float64

    def test_cleargrad_before_initialize_gives_none_grad(self):
        p = Parameter()
        p.cleargrad()
        p.initialize((2,))
        assert p.grad is None

    def test_zerograd_before_initialize_gives_zero_grad(self):
        p = Parameter()
        with pytest.warns(DeprecationWarning):
            p.zerograd()
        p.initialize((2,))
        np.testing.assert_array_equal(p.grad, np.zeros(2, np.float32))


class TestParameterAttributes:
    def test_data_array_alias(self):
        a = np.zeros(3, np.float32)
        b = np.ones(3, np.float32)
        p = Parameter(a)
        p.data = b
        assert p.array is b
        p.array = a
        assert p.data is a

    @pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
    def test_shape_dtype_size_ndim(self, dtype):
        p = Parameter(np.zeros((2, 3, 4), dtype))
        assert p.shape == (2, 3, 4)
        assert p.dtype == dtype
        assert p.size == 24
        assert p.ndim == 3

    def test_grad_setter(self):
        p = Parameter(np.zeros(3, np.float32))
        g = np.ones(3, np.float32)
        p.grad = g
        assert p.grad is g

    def test_cleargrad(self):
        p = Parameter(np.zeros(3, np.float32))
        p.grad = np.ones(3, np.float32)
        p.cleargrad()
        assert p.grad is None

    def test_zerograd_allocates(self):
        p = Parameter(np.ones((2, 2), np.float64))
        with pytest.warns(DeprecationWarning):
            p.zerograd()
        assert p.grad.dtype == np.float64 and p.grad.shape == (2, 2)
        assert not np.any(p.grad)

    def test_zerograd_fills_in_place(self):
        p = Parameter(np.ones(3, np.float32))
        g = np.full(3, 5, np.float32)
        p.grad = g
        with pytest.warns(DeprecationWarning):
            p.zerograd()
        assert p.grad is g
        np.testing.assert_array_equal(g, np.zeros(3, np.float32))

    def test_repr(self):
        assert "uninitialized" in repr(Parameter(name="x"))
        r = repr(Parameter(np.zeros((2,), np.float32), "W"))
        assert "W" in r and "float32" in r


class TestParameterUpdate:
    def test_update_without_rule_is_noop(self):
        a = np.ones(3, np.float32)
        p = Parameter(a)
        p.grad = np.ones(3, np.float32)
        p.update()
        np.testing.assert_array_equal(a, np.ones(3, np.float32))

    def test_update_with_rule_calls_rule(self):
        calls = []

        class Rule:
            def update(self, param):
                calls.append(param)

        p = Parameter(np.ones(3, np.float32))
        p.update_rule = Rule()
        p.update()
        assert calls == [p]

    def test_update_with_nesterov_rule(self):
        a = np.ones(3, np.float32)
        p = Parameter(a)
        p.grad = np.ones(3, np.float32)
        p.update_rule = NesterovAGRule(lr=0.1, momentum=0.9)
        p.update()
        assert p.array is a
        # v = -lr*g; p = 1 + m*m*v - (1+m)*lr*g, rounded to float32 step by step
        v = np.float32(0) * np.float32(0.9) - np.float32(0.1) * np.float32(1)
        exp = (np.float32(1) + np.float32(0.81) * v) - np.float32(1.9 * 0.1) * np.float32(1)
        np.testing.assert_array_equal(a, np.full(3, exp, np.float32))
        assert p.update_rule.t == 1


# ---------------------------------------------------------------------------
# Link
# ---------------------------------------------------------------------------
def _link(**arrays):
    link = Link()
    with link.init_scope():
        for name, a in arrays.items():
            setattr(link, name, Parameter(a))
    return link


class TestLink:
    def test_init_scope_registers(self):
        link = Link()
        with link.init_scope():
            link.W = Parameter(np.zeros((2, 3), np.float32))
            link.b = Parameter(np.zeros(3, np.float32))
        assert link.W.name == "W" and link.b.name == "b"
        assert [p.name for p in link.params()] == ["W", "b"]
        assert [path for path, _ in link.namedparams()] == ["/W", "/b"]
        assert link.within_init_scope is False

    def test_within_init_scope_flag(self):
        link = Link()
        assert not link.within_init_scope
        with link.init_scope():
            assert link.within_init_scope
        assert not link.within_init_scope

    def test_attribute_outside_init_scope_not_registered(self):
        link = Link()
        link.W = Parameter(np.zeros(2, np.float32))
        assert list(link.params()) == []
        assert link.W.name is None

    def test_non_parameter_in_init_scope_not_registered(self):
        link = Link()
        with link.init_scope():
            link.x = np.zeros(3)
            link.y = 3
        assert list(link.params()) == []

    def test_delattr_unregisters(self):
        link = _link(W=np.zeros(2, np.float32), b=np.zeros(2, np.float32))
        del link.W
        assert [path for path, _ in link.namedparams()] == ["/b"]

    def test_params_sorted_order(self):
        link = Link()
        with link.init_scope():
            link.zeta = Parameter(np.zeros(1, np.float32))
            link.alpha = Parameter(np.zeros(2, np.float32))
            link.mid = Parameter(np.zeros(3, np.float32))
        assert [p.name for p in link.params()] == ["alpha", "mid", "zeta"]
        assert [n for n, _ in link.namedparams()] == ["/alpha", "/mid", "/zeta"]

    def test_add_param_shape(self):
        link = Link()
        link.add_param("W", (2, 3))
        assert link.W.name == "W"
        assert link.W.shape == (2, 3) and link.W.dtype == np.float32
        assert _nan_like(link.W.array)
        assert [n for n, _ in link.namedparams()] == ["/W"]

    @pytest.mark.parametrize("how", ["add_param", "Link(**params)"])
    def test_add_param_shape_grad_is_nan_like_chainer(self, how):
        # Chainer 7.8.1: add_param(name, shape) (and Link(name=shape), which calls
        # it) creates Parameter(initializers.NaN(dtype), shape), whose grad is a
        # NaN-filled array like that of any Parameter created with a shape.
        if how == "add_param":
            link = Link()
            link.add_param("W", (2, 3), dtype=np.float64)
        else:
            link = Link(W=((2, 3), np.float64))
        assert link.W.grad is not None
        assert link.W.grad.shape == (2, 3) and link.W.grad.dtype == np.float64
        assert _nan_like(link.W.grad)

    def test_add_param_dtype(self):
        link = Link()
        link.add_param("W", (4,), dtype=np.float16)
        assert link.W.dtype == np.float16

    def test_add_param_uninitialized(self):
        link = Link()
        link.add_param("W", dtype=np.float64)
        assert not link.W.is_initialized
        assert link.W.dtype == np.float64
        link.W.initialize((3,))
        assert link.W.dtype == np.float64 and _nan_like(link.W.array)

    def test_add_param_initializer(self):
        link = Link()
        link.add_param("W", (2,), initializer=3.0)
        np.testing.assert_array_equal(link.W.array, [3.0, 3.0])
        arr = np.arange(3, dtype=np.float64)
        link.add_param("b", initializer=arr)
        assert link.b.array is arr

    def test_add_param_existing_attribute(self):
        link = Link()
        link.x = 1
        with pytest.raises(AttributeError):
            link.add_param("x", (2,))
        link.add_param("W", (2,))
        with pytest.raises(AttributeError):
            link.add_param("W", (2,))

    def test_link_kwargs_params(self):
        link = Link(x=(2, 3), y=((4,), np.float64), z=5)
        assert [n for n, _ in link.namedparams()] == ["/x", "/y", "/z"]
        assert link.x.shape == (2, 3) and link.x.dtype == np.float32
        assert link.y.shape == (4,) and link.y.dtype == np.float64
        assert link.z.shape == (5,)
        assert all(_nan_like(p.array) for p in link.params())

    def test_add_persistent(self):
        link = _link(W=np.zeros(2, np.float32))
        link.add_persistent("count", 3)
        assert link.count == 3
        assert [n for n, _ in link.namedparams()] == ["/W"]
        with pytest.raises(AttributeError):
            link.add_persistent("count", 4)
        with pytest.raises(AttributeError):
            link.add_persistent("W", 4)

    def test_register_persistent(self):
        link = Link()
        link.x = 1
        link.register_persistent("x")
        with pytest.raises(AttributeError):
            link.register_persistent("missing")

    def test_include_uninit(self):
        link = Link()
        with link.init_scope():
            link.a = Parameter()
            link.b = Parameter(np.zeros(2, np.float32))
        assert [p.name for p in link.params()] == ["a", "b"]
        assert [p.name for p in link.params(include_uninit=False)] == ["b"]
        assert [n for n, _ in link.namedparams(include_uninit=False)] == ["/b"]

    def test_cleargrads(self):
        link = _link(W=np.zeros(2, np.float32), b=np.zeros(3, np.float32))
        for p in link.params():
            p.grad = np.ones_like(p.array)
        link.cleargrads()
        assert all(p.grad is None for p in link.params())

    def test_zerograds(self):
        link = _link(W=np.zeros(2, np.float32), b=np.zeros(3, np.float64))
        g = np.ones(2, np.float32)
        link.W.grad = g
        with pytest.warns(DeprecationWarning):
            link.zerograds()
        assert link.W.grad is g and not g.any()
        assert link.b.grad.dtype == np.float64 and not link.b.grad.any()

    def test_enable_disable_update(self):
        link = _link(W=np.zeros(2, np.float32), b=np.zeros(3, np.float32))
        assert link.update_enabled is False  # no update rules yet
        link.disable_update()  # no rule: nothing to do, no error
        NesterovAG().setup(link)
        assert link.update_enabled
        link.disable_update()
        assert not link.update_enabled
        assert all(not p.update_rule.enabled for p in link.params())
        link.b.update_rule.enabled = True
        assert link.update_enabled
        link.enable_update()
        assert all(p.update_rule.enabled for p in link.params())

    def test_count_params(self):
        link = Link()
        with link.init_scope():
            link.W = Parameter(np.zeros((2, 3), np.float32))
            link.b = Parameter(np.zeros(3, np.float32))
            link.u = Parameter()
        assert link.count_params() == 9

    def test_links_namedlinks_children(self):
        link = Link()
        assert list(link.links()) == [link]
        assert list(link.links(skipself=True)) == []
        assert list(link.namedlinks()) == [("/", link)]
        assert list(link.children()) == []

    def test_init_scope_requires_init(self):
        class Bad(Link):
            def __init__(self):
                with self.init_scope():
                    pass

        with pytest.raises(RuntimeError):
            Bad()


# ---------------------------------------------------------------------------
# Chain
# ---------------------------------------------------------------------------
def _two_layer():
    l1 = _link(W=np.zeros((2, 3), np.float32), b=np.zeros(3, np.float32))
    l2 = _link(W=np.zeros((3, 1), np.float32))
    chain = Chain()
    with chain.init_scope():
        chain.l2 = l2
        chain.l1 = l1
    return chain, l1, l2


class TestChain:
    def test_paths(self):
        chain, l1, l2 = _two_layer()
        assert [n for n, _ in chain.namedparams()] == ["/l1/W", "/l1/b", "/l2/W"]
        assert list(chain.params()) == [l1.W, l1.b, l2.W]
        assert l1.name == "l1" and l2.name == "l2"

    def test_own_params_before_children(self):
        chain, l1, l2 = _two_layer()
        with chain.init_scope():
            chain.z = Parameter(np.zeros(1, np.float32))
        assert [n for n, _ in chain.namedparams()] == ["/z", "/l1/W", "/l1/b", "/l2/W"]

    def test_kwargs_and_add_link(self):
        l1 = _link(W=np.zeros(1, np.float32))
        l0 = _link(W=np.zeros(2, np.float32))
        chain = Chain(l1=l1)
        chain.add_link("l0", l0)
        assert chain.l0 is l0 and chain["l0"] is l0
        assert [n for n, _ in chain.namedparams()] == ["/l0/W", "/l1/W"]

    def test_getitem(self):
        chain, l1, _ = _two_layer()
        assert chain["l1"] is l1
        with pytest.raises(AttributeError):
            chain["nope"]

    def test_duplicate_attribute_in_init_scope(self):
        chain, _, _ = _two_layer()
        with pytest.raises(AttributeError):
            with chain.init_scope():
                chain.l1 = Link()
        chain.x = 1
        with pytest.raises(AttributeError):
            with chain.init_scope():
                chain.x = Link()

    def test_add_link_duplicate(self):
        chain, _, _ = _two_layer()
        with pytest.raises(AttributeError):
            chain.add_link("l1", Link())

    def test_add_link_non_link(self):
        chain = Chain()
        with pytest.raises(TypeError):
            chain.add_link("x", object())
        with pytest.raises(TypeError):
            chain.add_link("p", Parameter(np.zeros(1, np.float32)))

    def test_link_outside_init_scope_not_registered(self):
        chain = Chain()
        chain.l1 = _link(W=np.zeros(1, np.float32))
        assert list(chain.params()) == []
        assert list(chain.children()) == []

    def test_links_namedlinks_children_order(self):
        chain, l1, l2 = _two_layer()
        assert list(chain.links()) == [chain, l1, l2]
        assert list(chain.links(skipself=True)) == [l1, l2]
        assert list(chain.namedlinks()) == [("/", chain), ("/l1", l1), ("/l2", l2)]
        assert list(chain.namedlinks(skipself=True)) == [("/l1", l1), ("/l2", l2)]
        assert list(chain.children()) == [l1, l2]

    def test_delattr_unregisters_child(self):
        chain, l1, l2 = _two_layer()
        del chain.l1
        assert list(chain.children()) == [l2]
        assert [n for n, _ in chain.namedparams()] == ["/l2/W"]

    def test_cleargrads_and_count(self):
        chain, l1, l2 = _two_layer()
        for p in chain.params():
            p.grad = np.ones_like(p.array)
        chain.cleargrads()
        assert all(p.grad is None for p in chain.params())
        assert chain.count_params() == 6 + 3 + 3

    def test_enable_disable_propagates(self):
        chain, l1, l2 = _two_layer()
        NesterovAG().setup(chain)
        l1.disable_update()
        assert chain.update_enabled
        assert not l1.update_enabled and l2.update_enabled
        chain.disable_update()
        assert not chain.update_enabled
        chain.enable_update()
        assert all(p.update_rule.enabled for p in chain.params())


# ---------------------------------------------------------------------------
# ChainList
# ---------------------------------------------------------------------------
def _leaf(n):
    return _link(W=np.zeros(n, np.float32))


class TestChainList:
    def test_paths_and_names(self):
        a, b = _leaf(1), _leaf(2)
        cl = ChainList(a, b)
        assert [n for n, _ in cl.namedparams()] == ["/0/W", "/1/W"]
        assert a.name == "0" and b.name == "1"
        assert len(cl) == 2
        assert list(cl) == [a, b]
        assert cl[0] is a and cl[-1] is b

    def test_append_add_link(self):
        cl = ChainList()
        a, b = _leaf(1), _leaf(2)
        cl.append(a)
        cl.add_link(b)
        assert list(cl) == [a, b]
        assert b.name == "1"
        assert [n for n, _ in cl.namedparams()] == ["/0/W", "/1/W"]

    def test_insert_renames(self):
        a, b, c = _leaf(1), _leaf(2), _leaf(3)
        cl = ChainList(a, b)
        cl.insert(0, c)
        assert list(cl) == [c, a, b]
        assert [x.name for x in cl] == ["0", "1", "2"]
        assert [p.shape for _, p in cl.namedparams()] == [(3,), (1,), (2,)]
        assert [n for n, _ in cl.namedparams()] == ["/0/W", "/1/W", "/2/W"]

    def test_delitem_renames(self):
        a, b, c = _leaf(1), _leaf(2), _leaf(3)
        cl = ChainList(a, b, c)
        del cl[0]
        assert list(cl) == [b, c]
        assert b.name == "0" and c.name == "1"
        assert [p.shape for _, p in cl.namedparams()] == [(2,), (3,)]

    def test_setitem_renames(self):
        a, b, c = _leaf(1), _leaf(2), _leaf(3)
        cl = ChainList(a, b)
        cl[1] = c
        assert list(cl) == [a, c]
        assert c.name == "1"
        assert [p.shape for _, p in cl.namedparams()] == [(1,), (3,)]

    def test_setitem_slice_renames(self):
        a, b, c, d = _leaf(1), _leaf(2), _leaf(3), _leaf(4)
        cl = ChainList(a, b)
        cl[0:1] = [c, d]
        assert list(cl) == [c, d, b]
        assert [x.name for x in cl] == ["0", "1", "2"]

    def test_setitem_bad_index(self):
        cl = ChainList(_leaf(1))
        with pytest.raises(TypeError):
            cl["x"] = _leaf(1)

    def test_insert_non_link(self):
        cl = ChainList()
        with pytest.raises(TypeError):
            cl.append(object())

    def test_register_link_in_init_scope_is_type_error(self):
        cl = ChainList()
        with pytest.raises(TypeError):
            with cl.init_scope():
                cl.l = _leaf(1)

    def test_own_params_in_init_scope(self):
        cl = ChainList(_leaf(1))
        with cl.init_scope():
            cl.p = Parameter(np.zeros(5, np.float32))
        assert [n for n, _ in cl.namedparams()] == ["/p", "/0/W"]

    def test_links_namedlinks_children(self):
        a, b = _leaf(1), _leaf(2)
        cl = ChainList(a, b)
        assert list(cl.links()) == [cl, a, b]
        assert list(cl.links(skipself=True)) == [a, b]
        assert list(cl.namedlinks()) == [("/", cl), ("/0", a), ("/1", b)]
        assert list(cl.children()) == [a, b]


def test_nested_paths():
    inner = Chain()
    with inner.init_scope():
        inner.fc = _link(W=np.zeros(1, np.float32), b=np.zeros(1, np.float32))
    cl = ChainList(_leaf(2), inner)
    top = Chain()
    with top.init_scope():
        top.blocks = cl
        top.head = _leaf(3)
        top.a = Parameter(np.zeros(4, np.float32))
    assert [n for n, _ in top.namedparams()] == [
        "/a", "/blocks/0/W", "/blocks/1/fc/W", "/blocks/1/fc/b", "/head/W"]
    assert [n for n, _ in top.namedlinks()] == [
        "/", "/blocks", "/blocks/0", "/blocks/1", "/blocks/1/fc", "/head"]
    assert top.count_params() == 4 + 2 + 1 + 1 + 3
    opt = NesterovAG().setup(top)
    assert all(p.update_rule is not None for p in top.params())
    assert opt.target is top


def test_cynag_link_types_exported():
    assert cynag.Link is Link and cynag.Chain is Chain and cynag.ChainList is ChainList
    assert cynag.Parameter is Parameter
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Link()


def test_link_call_runs_forward_as_in_chainer():
    class Doubler(Link):
        def forward(self, x, scale=1):
            return 2 * x * scale

    assert Doubler()(3, scale=2) == 12
    with pytest.raises(TypeError, match="forward"):
        Link()(1)


def test_docstring_examples_run():
    import doctest

    import cynag.optimizers.nesterov_ag as module

    failures, tried = doctest.testmod(module)
    assert tried > 0 and failures == 0


def test_parameter_device_as_chainers_specifier():
    """``Parameter.device``: Chainer's specifier and array module (Chainer's own
    device object when Chainer is imported; the Chainer-environment cases run
    Chainer's hooks, which read it, on cynag links)."""
    import sys

    import numpy

    import cynag

    p = cynag.Parameter(numpy.ones(3, numpy.float32))
    dev = p.device
    if "chainer" in sys.modules:
        assert str(dev) == "@numpy" and dev.xp is numpy
    else:
        assert dev.name == "@numpy" and dev.xp is numpy and str(dev) == "@numpy"
        assert dev == cynag.Parameter(numpy.zeros(1)).device
    assert cynag.Parameter(shape=None).device is None


def test_addgrad_checks_the_gradient_as_chainer_assigns_it():
    """Chainer's addgrad assigns through the gradient's checks: another shape or
    dtype than the array raises, and nothing changes."""
    import numpy

    import cynag

    a = cynag.Parameter(numpy.zeros((3, 1), numpy.float32))
    a.grad = numpy.ones((3, 1), numpy.float32)
    for bad in (numpy.ones(3, numpy.float32), numpy.ones((3, 1), numpy.float64)):
        b = cynag.Parameter(numpy.zeros(bad.shape, bad.dtype))
        b.grad = bad
        with pytest.raises((ValueError, TypeError), match="addgrad"):
            a.addgrad(b)
        assert (a.grad == 1).all() and a.grad.shape == (3, 1)
