"""Contiguous mode: ``opt.setup(link, contiguous=True)``.

Every (device, dtype) group of parameters lives in one parameter buffer, one
gradient buffer and one state buffer (``opt.contiguous_buffers``); the
parameters' arrays, gradients and NesterovAG's ``v`` are views of them.  The
results are bit-identical to the ordinary mode, and a plain group is one row
of the multi-tensor table.  (A ``chainer.Link`` target is out of scope here.)
"""
import copy
import io
import pickle

import numpy as np
import pytest

from cynag import Chain, Link, Parameter, serializers
from cynag.contiguous import ALIGNMENT
from cynag.optimizers import NesterovAG

from test_multi_tensor import assert_same_state, grads_for, state_of

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)


class _Init:
    dtype = F32

    def __call__(self, array):
        array[...] = np.arange(array.size).reshape(array.shape) / 10


def make_model(seed=0, dtypes=(np.float32,), uninit=False):
    """A chain of links with parameters of several shapes, per dtype."""
    rng = np.random.default_rng(seed)
    model = Chain()
    with model.init_scope():
        for k, dtype in enumerate(dtypes):
            for j, shapes in enumerate([{"W": (4, 5), "b": (5,)}, {"W": (3, 2, 2), "b": (1,)},
                                        {"W": (7,), "b": (0,)}]):
                link = Link()
                with link.init_scope():
                    for name, shape in shapes.items():
                        a = np.asarray(rng.standard_normal(shape)).astype(dtype)
                        setattr(link, name, Parameter(a))
                setattr(model, "l%d_%d" % (k, j), link)
        if uninit:
            late = Link()
            with late.init_scope():
                late.W = Parameter(_Init())
            model.late = late
    return model


def assign_grads(model, step, how="new", scale=1.0):
    for path, g in grads_for(model, step, scale).items():
        p = dict(model.namedparams())[path]
        if how == "inplace":
            p.grad[...] = g
        else:
            p.grad = g


def buffer_of(opt, dtype):
    (buf,) = [b for b in opt.contiguous_buffers if b.dtype == dtype]
    return buf


# ---------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtypes", [(np.float32,), (np.float16, np.float64, np.float32)])
def test_params_become_views_of_the_buffers(dtypes):
    model = make_model(dtypes=dtypes)
    before = {path: p.array.copy() for path, p in model.namedparams()}
    opt = NesterovAG().setup(model, contiguous=True)
    bufs = opt.contiguous_buffers
    assert len(bufs) == len(dtypes)
    assert sorted(str(b.dtype) for b in bufs) == sorted(str(np.dtype(d)) for d in dtypes)
    for b in bufs:
        assert b.device == "cpu"
        params = [dict(model.namedparams())[path] for path in b.paths]
        assert b.param.ndim == b.grad.ndim == b.state["v"].ndim == 1
        assert b.param.size == b.grad.size == b.state["v"].size == sum(p.size for p in params)
        for arr in (b.param, b.grad, b.state["v"]):
            assert arr.dtype == b.dtype
            assert arr.ctypes.data % ALIGNMENT == 0
            assert arr.flags.c_contiguous and arr.flags.writeable
        assert not np.shares_memory(b.param, b.grad)
        assert not np.shares_memory(b.param, b.state["v"])
        assert not np.shares_memory(b.grad, b.state["v"])
        offset = 0
        for path, p in zip(b.paths, params):
            assert p.dtype == b.dtype
            # in the link's parameter order, one after the other
            assert np.array_equal(b.param[offset:offset + p.size].reshape(p.shape), p.array)
            if p.size:
                assert np.shares_memory(p.array, b.param)
                assert p.array.ctypes.data == b.param.ctypes.data + offset * b.dtype.itemsize
            offset += p.size
            np.testing.assert_array_equal(p.array, before[path])
            assert p.array.dtype == before[path].dtype and p.shape == before[path].shape
    paths = [path for b in bufs for path in b.paths]
    assert sorted(paths) == sorted(path for path, _ in model.namedparams())


def test_buffer_order_follows_namedparams():
    model = make_model(dtypes=(np.float32, np.float64))
    opt = NesterovAG().setup(model, contiguous=True)
    order = [path for path, _ in model.namedparams()]
    for b in opt.contiguous_buffers:
        assert b.paths == [p for p in order if p in b.paths]


def test_grads_and_state_are_views_after_the_first_update():
    model = make_model(dtypes=(np.float32, np.float16))
    opt = NesterovAG().setup(model, contiguous=True)
    assert all(p.grad is None for p in model.params())
    for p in model.params():
        assert p.update_rule.state is None  # created at the first update, as in Chainer
    assign_grads(model, 0)
    opt.update()
    for b in opt.contiguous_buffers:
        for path in b.paths:
            p = dict(model.namedparams())[path]
            if not p.size:
                continue
            assert np.shares_memory(p.grad, b.grad), path
            assert np.shares_memory(p.update_rule.state["v"], b.state["v"]), path
            assert np.shares_memory(p.array, b.param), path


def test_existing_grads_and_state_are_copied_into_the_buffers():
    model = make_model()
    opt = NesterovAG(lr=0.1).setup(model)
    assign_grads(model, 0)
    opt.update()
    assign_grads(model, 1)
    snapshot = {path: (p.array.copy(), p.grad.copy(), p.update_rule.state["v"].copy())
                for path, p in model.namedparams()}
    from cynag import contiguous

    bufs = contiguous.pack(model)
    (b,) = bufs
    for path, p in model.namedparams():
        a, g, v = snapshot[path]
        np.testing.assert_array_equal(p.array, a)
        np.testing.assert_array_equal(p.grad, g)
        np.testing.assert_array_equal(p.update_rule.state["v"], v)
        if p.size:
            assert np.shares_memory(p.grad, b.grad)
            assert np.shares_memory(p.update_rule.state["v"], b.state["v"])


def test_uninitialized_params_are_left_alone():
    model = make_model(uninit=True)
    opt = NesterovAG().setup(model, contiguous=True)
    (b,) = opt.contiguous_buffers
    assert "/late/W" not in b.paths
    assert model.late.W.array is None
    model.late.W.initialize((2, 3))
    assert not np.shares_memory(model.late.W.array, b.param)
    for i in range(3):
        assign_grads(model, i)
        opt.update()
    np.testing.assert_array_equal(model.late.W.array.shape, (2, 3))
    assert model.late.W.update_rule.t == 3
    assert "/late/W" not in opt.multi_tensor_plan()["rest"]


# ---------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------
def test_grad_assignment_copies_into_the_view():
    model = make_model()
    opt = NesterovAG().setup(model, contiguous=True)
    (b,) = opt.contiguous_buffers
    p = model.l0_0.W
    g = np.full(p.shape, 0.25, np.float32)
    p.grad = g
    assert p.grad is not g
    assert np.shares_memory(p.grad, b.grad) and not np.shares_memory(g, b.grad)
    np.testing.assert_array_equal(p.grad, g)
    g[...] = 7  # the caller's array stays the caller's
    assert (p.grad == 0.25).all()
    # a gradient that does not fit the view is kept as given (and checked at update)
    bad = np.zeros(3, np.float32)
    p.grad = bad
    assert p.grad is bad
    with pytest.raises(ValueError, match="'/l0_0/W'.*shape"):
        opt.update()


def test_cleargrads_then_update_gives_the_views_back():
    model = make_model(dtypes=(np.float32, np.float64))
    opt = NesterovAG().setup(model, contiguous=True)
    for i in range(3):
        assign_grads(model, i)
        opt.update()
    model.cleargrads()
    assert all(p.grad is None for p in model.params())
    assign_grads(model, 3)
    model.l0_0.b.cleargrad()
    model.l1_1.W.cleargrad()
    opt.update()
    for b in opt.contiguous_buffers:
        for path in b.paths:
            p = dict(model.namedparams())[path]
            assert p.grad is not None
            if p.size:
                assert np.shares_memory(p.grad, b.grad), path
    assert (model.l0_0.b.grad == 0).all() and (model.l1_1.W.grad == 0).all()
    plan = opt.multi_tensor_plan()
    assert [g["table_rows"] for g in plan["groups"]] == [1, 1]


def test_zerograds_gives_the_views_back():
    model = make_model()
    opt = NesterovAG().setup(model, contiguous=True)
    (b,) = opt.contiguous_buffers
    model.cleargrads()
    with pytest.warns(DeprecationWarning):
        model.zerograds()
    for p in model.params():
        assert (p.grad == 0).all()
        if p.size:
            assert np.shares_memory(p.grad, b.grad)
    del opt


@pytest.mark.parametrize("clear", ["cleargrads", "zerograds"])
@pytest.mark.parametrize("replacement", [((6, 5), F32), ((4, 5), F64)])
def test_array_of_another_shape_or_dtype_gets_gradients_of_its_own(clear, replacement):
    """Model surgery in contiguous mode: a parameter whose array no longer fits
    its view of the gradient buffer gets a gradient of its own shape and dtype
    (as in the ordinary mode and in Chainer), before and after its first update."""
    shape, dtype = replacement
    results = []
    for contiguous in (True, False):
        model = make_model()
        opt = NesterovAG(lr=0.1).setup(model, contiguous=contiguous)
        assign_grads(model, 0)
        opt.update()
        model.l0_0.W.array = np.full(shape, 0.5, dtype)
        model.l0_1.W.array = model.l0_1.W.array.astype(F64)
        for p in (model.l0_0.W, model.l0_1.W):
            p.update_rule._state = None   # a new state, as after surgery in Chainer
            p.cleargrad()                 # (zerograd would keep an old gradient)
        for step in range(1, 4):
            if clear == "cleargrads":
                model.cleargrads()
            else:
                with pytest.warns(DeprecationWarning):
                    model.zerograds()
            opt.update()
            for path, p in model.namedparams():
                assert p.grad.shape == p.array.shape and p.grad.dtype == p.array.dtype, path
            assign_grads(model, step)
            model.l0_0.W.grad = np.full(shape, 0.25, dtype)
            model.l0_1.W.grad = np.ones((3, 2, 2), F64)
            opt.update()
        results.append(state_of(model, opt))
    assert_same_state(*results, "contiguous vs ordinary")


# ---------------------------------------------------------------------------
# the plan: one table row per group
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtypes", [(np.float32,), (np.float16, np.float64, np.float32)])
def test_one_table_row_per_group(dtypes):
    model = make_model(dtypes=dtypes)
    opt = NesterovAG().setup(model, contiguous=True)
    for i in range(2):
        assign_grads(model, i)
        opt.update()
    plan = opt.multi_tensor_plan()
    assert plan["rest"] == []
    assert len(plan["groups"]) == len(dtypes)
    for g in plan["groups"]:
        assert g["table_rows"] == 1
        b = buffer_of(opt, np.dtype(g["dtype"]))
        assert g["elements"] == b.param.size
        assert g["params"] == len(b.paths)


def test_plain_mode_has_one_row_per_param():
    model = make_model()
    opt = NesterovAG().setup(model)
    assign_grads(model, 0)
    opt.update()
    (g,) = opt.multi_tensor_plan()["groups"]
    assert g["table_rows"] == sum(1 for p in model.params() if p.size)


def test_override_hook_and_frozen_split_the_run():
    model = make_model()
    opt = NesterovAG().setup(model, contiguous=True)
    model.l0_1.W.update_rule.hyperparam.lr = 0.5
    model.l0_0.disable_update()
    model.l0_2.W.update_rule.add_hook(lambda rule, param: None, name="h")
    assign_grads(model, 0)
    opt.update()
    plan = opt.multi_tensor_plan()
    assert set(plan["rest"]) == {"/l0_0/W", "/l0_0/b", "/l0_2/W"}
    (g,) = plan["groups"]
    assert g["params"] == 3  # l0_1/W, l0_1/b, l0_2/b (empty)
    assert g["table_rows"] == 2  # l0_1/W has its own lr


# ---------------------------------------------------------------------------
# trajectories: contiguous (multi-tensor) == ordinary mode, per parameter
# ---------------------------------------------------------------------------
def run_pair(make, step, n_steps=22):
    """Contiguous mode with the multi-tensor path vs ordinary mode without it."""
    trajectories = []
    pairs = []
    for contiguous in (True, False):
        model, opt = make(contiguous)
        opt.use_multi_tensor(contiguous)
        traj = []
        for i in range(n_steps):
            step(model, opt, i)
            traj.append(state_of(model, opt))
        trajectories.append(traj)
        pairs.append((model, opt))
    for i, (a, b) in enumerate(zip(*trajectories)):
        assert_same_state(a, b, "step %d" % i)
    return pairs


DTYPE_SETS = [(np.float32,), (np.float64,), (np.float16,), (np.float16, np.float32, np.float64)]


@pytest.mark.parametrize("dtypes", DTYPE_SETS)
@pytest.mark.parametrize("how", ["new", "inplace", "cleargrads"])
def test_trajectory_matches_ordinary_mode(dtypes, how):
    def make(contiguous):
        model = make_model(dtypes=dtypes, uninit=True)
        return model, NesterovAG(lr=0.02, momentum=0.9).setup(model, contiguous=contiguous)

    def step(model, opt, i):
        if i == 3:
            model.late.W.initialize((2, 3))
        if how == "cleargrads":
            model.cleargrads()
            for k, (path, g) in enumerate(sorted(grads_for(model, i).items())):
                if (k + i) % 4:
                    dict(model.namedparams())[path].grad = g
        else:
            assign_grads(model, i, how if i else "new")
        if i == 8:
            opt.lr = 0.01
        if i == 12:
            opt.momentum = 0.5
        opt.update()

    (model, opt), _ = run_pair(make, step)
    for b in opt.contiguous_buffers:
        for path in b.paths:
            p = dict(model.namedparams())[path]
            if p.size:
                assert np.shares_memory(p.array, b.param)
                assert np.shares_memory(p.grad, b.grad)
                assert np.shares_memory(p.update_rule.state["v"], b.state["v"])
    for g in opt.multi_tensor_plan()["groups"]:
        # /late/W (float32, initialized after packing) has a row of its own
        packed = any(str(b.dtype) == g["dtype"] for b in opt.contiguous_buffers)
        assert g["table_rows"] == int(packed) + (g["dtype"] == "float32"), g


class _Loss:
    def __init__(self, model, step):
        self.model, self.step = model, step

    def backward(self, loss_scale=None):
        for path, g in grads_for(self.model, self.step, loss_scale or 1.0).items():
            p = dict(self.model.namedparams())[path]
            assert p.grad is None
            p.grad = g


@pytest.mark.parametrize("scale", [None, 16.0, "dynamic"])
def test_trajectory_with_lossfun(scale):
    def make(contiguous):
        model = make_model(dtypes=(np.float16, np.float32))
        opt = NesterovAG(lr=0.01).setup(model, contiguous=contiguous)
        if scale == "dynamic":
            opt.loss_scaling(interval=3)
        elif scale is not None:
            opt.loss_scaling(scale=scale)
        return model, opt

    def step(model, opt, i):
        opt.update(lambda: _Loss(model, i))

    (model, opt), _ = run_pair(make, step)
    for b in opt.contiguous_buffers:
        for path in b.paths:
            p = dict(model.namedparams())[path]
            if p.size:
                assert np.shares_memory(p.grad, b.grad)


def test_trajectory_with_replaced_arrays_and_frozen_params():
    def make(contiguous):
        model = make_model(dtypes=(np.float32, np.float64))
        return model, NesterovAG(lr=0.02).setup(model, contiguous=contiguous)

    def step(model, opt, i):
        if i == 4:
            model.l0_1.W.array = model.l0_1.W.array.copy()  # out of the buffer
        if i == 6:
            model.l1_0.disable_update()
        if i == 9:
            rule = model.l0_0.W.update_rule
            rule.state["v"] = rule.state["v"].copy()
        if i == 11:
            model.l1_0.enable_update()
        if i == 14:
            model.l0_0.b.update_rule.hyperparam.lr = 0.1
        assign_grads(model, i)
        opt.update()

    (model, opt), _ = run_pair(make, step)
    b32 = buffer_of(opt, F32)
    assert not np.shares_memory(model.l0_1.W.array, b32.param)


def test_fp32_update_in_contiguous_mode():
    def make(contiguous):
        model = make_model(dtypes=(np.float16, np.float32))
        opt = NesterovAG(lr=0.02)
        opt.use_fp32_update()
        return model, opt.setup(model, contiguous=contiguous)

    def step(model, opt, i):
        assign_grads(model, i)
        opt.update()

    (model, opt), _ = run_pair(make, step)
    plan = opt.multi_tensor_plan()
    assert any(path.startswith("/l0_") for path in plan["rest"])  # float16: rest


# ---------------------------------------------------------------------------
# checkpoints and copies
# ---------------------------------------------------------------------------
def _train(model, opt, start, n):
    for i in range(start, start + n):
        assign_grads(model, i)
        opt.update()


def _reference(n):
    model = make_model(dtypes=(np.float32, np.float64))
    opt = NesterovAG(lr=0.02).setup(model)
    opt.use_multi_tensor(False)
    _train(model, opt, 0, n)
    return state_of(model, opt)


def _assert_views(model, opt):
    for b in opt.contiguous_buffers:
        for path in b.paths:
            p = dict(model.namedparams())[path]
            if not p.size:
                continue
            assert np.shares_memory(p.array, b.param), path
            assert np.shares_memory(p.grad, b.grad), path
            assert np.shares_memory(p.update_rule.state["v"], b.state["v"]), path


def test_checkpoint_loaded_mid_training_keeps_the_views():
    model = make_model(dtypes=(np.float32, np.float64))
    opt = NesterovAG(lr=0.02).setup(model, contiguous=True)
    _train(model, opt, 0, 8)
    fm, fo = io.BytesIO(), io.BytesIO()
    serializers.save_npz(fm, model)
    serializers.save_npz(fo, opt)
    _train(model, opt, 8, 5)
    fm.seek(0)
    fo.seek(0)
    serializers.load_npz(fm, model)
    serializers.load_npz(fo, opt)
    _train(model, opt, 8, 8)
    assert_same_state(state_of(model, opt), _reference(16), "resumed in place")
    _assert_views(model, opt)


def test_checkpoint_loaded_into_a_fresh_contiguous_optimizer():
    """A checkpoint loaded before the first update: same continuation, and the
    state restored from the file lives in the state buffer like the rest."""
    model = make_model(dtypes=(np.float32, np.float64))
    opt = NesterovAG(lr=0.02).setup(model)
    _train(model, opt, 0, 8)
    fm, fo = io.BytesIO(), io.BytesIO()
    serializers.save_npz(fm, model)
    serializers.save_npz(fo, opt)
    fm.seek(0)
    fo.seek(0)
    model2 = make_model(seed=3, dtypes=(np.float32, np.float64))
    opt2 = NesterovAG(lr=0.02).setup(model2, contiguous=True)
    serializers.load_npz(fm, model2)
    serializers.load_npz(fo, opt2)
    _train(model2, opt2, 8, 8)
    assert_same_state(state_of(model2, opt2), _reference(16), "resumed")
    _assert_views(model2, opt2)


def _copy(model, opt, how):
    """(model, opt) copied by ``how``: deepcopy of the optimizer alone or of the
    pair, or a pickle round trip of the optimizer; the model is the copy's target."""
    if how == "deepcopy_opt":
        opt2 = copy.deepcopy(opt)
    elif how == "deepcopy_pair":
        _, opt2 = copy.deepcopy((model, opt))
    else:
        opt2 = pickle.loads(pickle.dumps(opt))
    return opt2.target, opt2


@pytest.mark.parametrize("how", ["deepcopy_opt", "deepcopy_pair", "pickle_opt"])
def test_copies_train_independently(how):
    model = make_model(dtypes=(np.float32, np.float64))
    opt = NesterovAG(lr=0.02).setup(model, contiguous=True)
    _train(model, opt, 0, 6)
    before = state_of(model, opt)
    model2, opt2 = _copy(model, opt, how)
    for b2 in opt2.contiguous_buffers:
        for b in opt.contiguous_buffers:
            for x in (b2.param, b2.grad, b2.state["v"]):
                for y in (b.param, b.grad, b.state["v"]):
                    assert not np.shares_memory(x, y)
    _train(model2, opt2, 6, 6)
    assert_same_state(state_of(model, opt), before, "original")
    assert_same_state(state_of(model2, opt2), _reference(12), "copy")
    _train(model, opt, 6, 6)
    assert_same_state(state_of(model, opt), _reference(12), "original, trained on")
    _assert_views(model, opt)


@pytest.mark.parametrize("how", ["deepcopy_opt", "deepcopy_pair", "pickle_opt"])
def test_copies_stay_contiguous(how):
    """The copy's parameters, gradients and state are views of the copy's buffers."""
    model = make_model(dtypes=(np.float32, np.float64))
    opt = NesterovAG(lr=0.02).setup(model, contiguous=True)
    _train(model, opt, 0, 3)
    model2, opt2 = _copy(model, opt, how)
    _assert_views(model2, opt2)
    _train(model2, opt2, 3, 2)
    _assert_views(model2, opt2)


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
@pytest.mark.parametrize("wrap", ["matrix", "masked"])
def test_ndarray_subclass_parameters_keep_their_arrays(wrap):
    # Their own arithmetic (and a mask) stays theirs: they are left out of the pack.
    def build():
        link = Link()
        with link.init_scope():
            link.a = Parameter(np.arange(6, dtype=np.float32).reshape(2, 3) / 7)
            link.b = Parameter(np.ones(3, np.float32))
        if wrap == "matrix":
            link.a.array = np.asmatrix(link.a.array)
        else:
            link.a.array = np.ma.masked_array(link.a.array, mask=[[0, 1, 0], [0, 0, 1]])
        return link
    runs = []
    for contiguous in (True, False):
        link = build()
        opt = NesterovAG(lr=0.1, momentum=0.9)
        opt.setup(link, contiguous=contiguous)
        for step in range(3):
            link.a.grad = np.full((2, 3), 0.5 + step, np.float32)
            link.b.grad = np.full(3, 0.25, np.float32)
            opt.update()
        runs.append(link)
    a, b = runs
    assert type(a.a.array) is type(b.a.array) is type(build().a.array)
    assert np.asarray(a.a.array).tobytes() == np.asarray(b.a.array).tobytes()
    assert a.b.array.tobytes() == b.b.array.tobytes()
    if wrap == "masked":
        assert (a.a.array.mask == b.a.array.mask).all()
