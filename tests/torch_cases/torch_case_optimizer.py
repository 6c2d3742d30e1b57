"""cynag.torch.NesterovAG: Chainer's numbers, PyTorch's optimizer conventions."""
import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cynag
import cynag.torch as ct
from torch_refs import chainer_step, half_step

F32, F64 = torch.float32, torch.float64


def _params(shapes, dtype, seed, make=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        t = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        out.append(torch.nn.Parameter(make(t) if make else t))
    return out


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for p in params]


def _bits(t):
    a = t.detach().cpu().contiguous()
    if a.dtype == torch.bfloat16:
        return a.view(torch.int16).numpy().copy()
    return a.numpy().view(np.uint8).copy()


def _same(a, b):
    return np.array_equal(_bits(a), _bits(b))


shapes_st = st.lists(st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple),
                     min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(shapes=shapes_st, dtype=st.sampled_from([F32, F64]), seed=st.integers(0, 2**16),
       lr=st.sampled_from([0.01, 0.1, 0.37, 1e-5]), m=st.sampled_from([0.9, 0.0, 0.5, 0.99]),
       wd=st.sampled_from([0.0, 0.0, 5e-4, 0.1]), steps=st.integers(1, 4))
def test_bit_identical_to_chainer_sequence(shapes, dtype, seed, lr, m, wd, steps):
    params = _params(shapes, dtype, seed)
    ref = [p.detach().numpy().copy() for p in params]
    vs = [np.zeros_like(r) for r in ref]
    opt = ct.NesterovAG(params, lr=lr, momentum=m, weight_decay=wd)
    for k in range(steps):
        grads = _grads(params, seed + 1 + k)
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        for r, gr, v in zip(ref, grads, vs):
            chainer_step(r, gr.numpy(), v, lr, m, wd)
        for p, gr in zip(params, grads):
            assert torch.equal(p.grad, gr)  # p.grad is left as it is (weight decay too)
    for p, r, v in zip(params, ref, vs):
        assert p.detach().numpy().tobytes() == r.tobytes()
        assert opt.state[p]["v"].numpy().tobytes() == v.tobytes()
        assert opt.state[p]["step"] == steps
    assert opt.t == steps


def test_matches_real_chainer_with_weight_decay():
    import chainer
    import chainer.links as L

    rng = np.random.RandomState(0)
    model = chainer.Sequential(L.Linear(5, 4), L.Linear(4, 3))
    model(np.zeros((1, 5), np.float32))
    copt = chainer.optimizers.NesterovAG(lr=0.05, momentum=0.8)
    copt.setup(model)
    copt.add_hook(chainer.optimizer_hooks.WeightDecay(1e-3))
    names = [n for n, _ in sorted(model.namedparams())]
    tparams = [torch.nn.Parameter(torch.from_numpy(dict(model.namedparams())[n].array.copy()))
               for n in names]
    topt = ct.NesterovAG(tparams, lr=0.05, momentum=0.8, weight_decay=1e-3)
    for _ in range(5):
        grads = {n: rng.standard_normal(dict(model.namedparams())[n].shape).astype(np.float32)
                 for n in names}
        for n, p in model.namedparams():
            p.grad = grads[n].copy()
        copt.update()
        for n, p in zip(names, tparams):
            p.grad = torch.from_numpy(grads[n].copy())
        topt.step()
    for n, p in zip(names, tparams):
        assert np.array_equal(p.detach().numpy(), dict(model.namedparams())[n].array), n


@pytest.mark.parametrize("threads", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_any_thread_count_same_bits(threads):
    cy, th = threads
    old_cy, old_th = cynag.get_num_threads(), torch.get_num_threads()
    try:
        cynag.set_num_threads(cy)
        torch.set_num_threads(th)
        params = _params([(300000,), (7, 9)], F32, 3)
        ref = [p.detach().numpy().copy() for p in params]
        vs = [np.zeros_like(r) for r in ref]
        opt = ct.NesterovAG(params, lr=0.1, momentum=0.9)
        for k in range(3):
            grads = _grads(params, 10 + k)
            for p, gr in zip(params, grads):
                p.grad = gr
            opt.step()
            for r, gr, v in zip(ref, grads, vs):
                chainer_step(r, gr.numpy(), v, 0.1, 0.9)
        for p, r in zip(params, ref):
            assert np.array_equal(p.detach().numpy(), r)
    finally:
        cynag.set_num_threads(old_cy)
        torch.set_num_threads(old_th)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_computed_in_float32(dtype):
    params = _params([(33,), (4, 5)], dtype, 7)
    ref = [p.detach().clone() for p in params]
    vref = [torch.zeros_like(r) for r in ref]
    opt = ct.NesterovAG(params, lr=0.1, momentum=0.9, weight_decay=0.01)
    for k in range(3):
        grads = _grads(params, 20 + k)
        for p, gr in zip(params, grads):
            p.grad = gr
        opt.step()
        for i, gr in enumerate(grads):
            p32, v32 = half_step(ref[i].float().numpy(), gr.float().numpy(),
                                 vref[i].float().numpy(), 0.1, 0.9, 0.01)
            ref[i] = torch.from_numpy(p32).to(dtype)
            vref[i] = torch.from_numpy(v32).to(dtype)
    for p, r, v in zip(params, ref, vref):
        assert p.dtype == dtype and _same(p, r)
        assert opt.state[p]["v"].dtype == dtype and _same(opt.state[p]["v"], v)


@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last"])
def test_non_contiguous_parameters(layout):
    base = torch.randn(6, 8, dtype=F32)
    if layout == "transposed":
        p = torch.nn.Parameter(base.t())
    elif layout == "sliced":
        p = torch.nn.Parameter(torch.randn(6, 16)[:, ::2])
    else:
        p = torch.nn.Parameter(torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last))
    ref = p.detach().numpy().copy()
    v = np.zeros_like(ref)
    opt = ct.NesterovAG([p], lr=0.2, momentum=0.7)
    for k in range(3):
        g = torch.randn(p.shape)
        p.grad = g
        opt.step()
        chainer_step(ref, g.numpy(), v, 0.2, 0.7)
    assert np.array_equal(p.detach().numpy(), ref)
    assert np.array_equal(opt.state[p]["v"].numpy(), v)


def test_parameters_sharing_memory_update_in_order():
    base = torch.zeros(10)
    a = torch.nn.Parameter(base[:6])
    b = torch.nn.Parameter(base[4:])
    with torch.no_grad():
        base.copy_(torch.arange(10.0))
    opt = ct.NesterovAG([a, b], lr=0.5, momentum=0.9)
    ga, gb = torch.ones(6), torch.full((6,), 2.0)
    a.grad, b.grad = ga, gb
    ref = np.arange(10.0, dtype=np.float32)
    va, vb = np.zeros(6, np.float32), np.zeros(6, np.float32)
    chainer_step(ref[:6], ga.numpy(), va, 0.5, 0.9)
    chainer_step(ref[4:], gb.numpy(), vb, 0.5, 0.9)
    opt.step()
    assert np.array_equal(base.numpy(), ref)


def test_grad_none_is_skipped_and_closure_returns_loss():
    w = torch.nn.Parameter(torch.ones(3))
    u = torch.nn.Parameter(torch.ones(2))
    opt = ct.NesterovAG([w, u], lr=0.1)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = (w * w).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [True] and float(loss) == 3.0
    assert u not in opt.state or not opt.state[u]
    assert opt.state[w]["step"] == 1 and torch.equal(u, torch.ones(2))
    opt.step(closure)
    assert opt.state[w]["step"] == 2 and opt.t == 2


def _train_groups(opt, refs, steps, sched=None, on_step=None):
    for k in range(steps):
        if on_step is not None:
            on_step(k)
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.randn(p.shape, dtype=p.dtype)
                if id(p) not in refs:
                    refs[id(p)] = (p.detach().numpy().copy(), np.zeros(p.shape, p.detach().numpy().dtype))
                r, v = refs[id(p)]
                chainer_step(r, p.grad.numpy(), v, group["lr"], group["momentum"])
        opt.step()
        if sched is not None:
            sched.step()


def test_param_groups_and_schedulers():
    a = torch.nn.Parameter(torch.randn(4))
    b = torch.nn.Parameter(torch.randn(3, dtype=F64))
    opt = ct.NesterovAG([{"params": [a]}, {"params": [b], "lr": 0.5, "momentum": 0.3}],
                        lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5 ** e)
    refs = {}
    _train_groups(opt, refs, 4, sched)
    assert opt.param_groups[0]["lr"] == 0.1 * 0.5 ** 4
    for p in (a, b):
        assert np.array_equal(p.detach().numpy(), refs[id(p)][0])
    step = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    _train_groups(opt, refs, 2, step)
    for p in (a, b):
        assert np.array_equal(p.detach().numpy(), refs[id(p)][0])


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n_groups=st.integers(1, 7), native=st.booleans())
def test_many_groups_match_chainer_sequence(data, n_groups, native):
    # Groups of their own lr, momentum and weight decay (some huge lr: NumPy
    # 1.x's promotion, through copies), mixed dtypes, parameters without a
    # gradient, and views of one storage in different groups (updated in the
    # groups' order).  The native reader reads all groups in one table and
    # updates the undecayed rows of all of them in one call.
    if ct._native.mode() == "off":
        native = False  # (CYNAG_TORCH_NATIVE=0: the Python reader only)
    with pytest.MonkeyPatch.context() as mp:
        if native:
            if ct._native.get() is None:
                ct._native.wait()
            assert ct._native.get() is not None, ct.native_status()
        else:
            mp.setattr(ct._native, "get", lambda: None)
        _many_groups(data, n_groups)


def _many_groups(data, n_groups):
    base = torch.randn(12, dtype=F32)
    groups, refs = [], []
    for gi in range(n_groups):
        lr = data.draw(st.sampled_from([0.1, 0.01, 0.37, 1e39]), label="lr%d" % gi)
        m = data.draw(st.sampled_from([0.9, 0.0, 0.5]), label="m%d" % gi)
        wd = data.draw(st.sampled_from([0.0, 0.0, 1e-3, -0.5, 1e39]), label="wd%d" % gi)
        ps = []
        for k in range(data.draw(st.integers(0, 4), label="n%d" % gi)):
            kind = data.draw(st.sampled_from(["f32", "f64", "view", "nograd"]),
                             label="kind%d_%d" % (gi, k))
            if kind == "view":
                j = data.draw(st.integers(0, 10), label="at%d_%d" % (gi, k))
                p = torch.nn.Parameter(base[j:j + 2])  # shares base's memory
            else:
                p = torch.nn.Parameter(torch.randn(3, dtype=F64 if kind == "f64" else F32))
            ps.append((p, kind == "nograd", kind == "view"))
        groups.append({"params": [p for p, _, _ in ps], "lr": lr, "momentum": m,
                       "weight_decay": wd})
        refs.append(ps)
    opt = ct.NesterovAG(groups)
    # The reference: Chainer's sequence, group after group, parameter after
    # parameter, on NumPy copies (one of base for all the views).
    base_ref = base.numpy().copy()
    own = {id(p): p.detach().numpy().copy() for ps in refs for p, _, view in ps if not view}
    vs = {}
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))
    with np.errstate(over="ignore", invalid="ignore"):
        for _ in range(3):
            for ps in refs:
                for p, nograd, _ in ps:
                    p.grad = None if nograd else torch.randn(p.shape, generator=gen,
                                                             dtype=p.dtype)
            opt.step()
            for gi, ps in enumerate(refs):
                hp = groups[gi]
                for p, nograd, view in ps:
                    if nograd:
                        continue
                    if view:
                        off = p.storage_offset()
                        arr = base_ref[off:off + 2]
                    else:
                        arr = own[id(p)]
                    v = vs.setdefault(id(p), np.zeros(p.shape, arr.dtype))
                    chainer_step(arr, p.grad.numpy(), v, hp["lr"], hp["momentum"],
                                 hp["weight_decay"])
    assert np.array_equal(base.numpy(), base_ref, equal_nan=True)
    for ps in refs:
        for p, nograd, view in ps:
            if nograd:
                assert p not in opt.state
                continue
            if not view:
                assert np.array_equal(p.detach().numpy(), own[id(p)], equal_nan=True)
            assert np.array_equal(opt.state[p]["v"].numpy(), vs[id(p)], equal_nan=True)
            assert opt.state[p]["step"] == 3


def test_usual_step_is_one_native_call_and_others_take_the_general_path(monkeypatch):
    # Dense CPU float32/float64 rows with a state, with or without weight
    # decay: the whole step is one native call (step_groups), the general
    # path is not entered.  A parameter without a state yet sends the step to
    # the general path.  Both give Chainer's sequence bit for bit, and weight
    # decay leaves p.grad as it is.
    if ct._native.mode() == "off":
        pytest.skip("CYNAG_TORCH_NATIVE=0: the Python reader only")
    if ct._native.get() is None:
        ct._native.wait()
    assert ct._native.get() is not None, ct.native_status()
    a = torch.nn.Parameter(torch.randn(5, dtype=F32))
    b = torch.nn.Parameter(torch.randn(2, 3, dtype=F64))
    c = torch.nn.Parameter(torch.randn(4, dtype=F32))
    late = torch.nn.Parameter(torch.randn(3, dtype=F32))
    opt = ct.NesterovAG([{"params": [a, late], "lr": 0.1, "momentum": 0.5},
                         {"params": [b, c], "lr": 0.37}], lr=0.01, momentum=0.9)
    hyper = {id(a): (0.1, 0.5), id(late): (0.1, 0.5), id(b): (0.37, 0.9), id(c): (0.37, 0.9)}
    refs = {id(p): (p.detach().numpy().copy(), np.zeros_like(p.detach().numpy()))
            for p in (a, b, c, late)}
    real_plans = ct.NesterovAG._plans
    calls = []

    def plans(self, native, collected=None):
        calls.append(1)
        return real_plans(self, native, collected)

    monkeypatch.setattr(ct.NesterovAG, "_plans", plans)
    gen = torch.Generator().manual_seed(3)
    for k in range(4):
        live = (a, b, c, late) if k == 3 else (a, b, c)
        for p in live:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        grads = [p.grad.clone() for p in live]
        if k >= 2:
            opt.param_groups[1]["weight_decay"] = 1e-3
        opt.step()
        for p, g0 in zip(live, grads):
            assert torch.equal(p.grad, g0)
            lr, m = hyper[id(p)]
            wd = 1e-3 if k >= 2 and (p is b or p is c) else 0.0
            chainer_step(refs[id(p)][0], p.grad.numpy(), refs[id(p)][1], lr, m, wd)
        # the first step makes the states (general path), the next two (the
        # second with weight decay) are one native call each; a parameter
        # without a state takes the general path again
        assert len(calls) == (1 if k < 3 else 2), k
    for p in (a, b, c, late):
        assert np.array_equal(p.detach().numpy(), refs[id(p)][0])
        assert np.array_equal(opt.state[p]["v"].numpy(), refs[id(p)][1])
    assert [opt.state[p]["step"] for p in (a, b, c, late)] == [4, 4, 4, 1] and opt.t == 4


@pytest.fixture(params=["native", "python"])
def reader(request, monkeypatch):
    """Each test twice: with the native reader (when this run builds it) and the Python one."""
    if request.param == "native":
        if ct._native.mode() == "off":
            pytest.skip("CYNAG_TORCH_NATIVE=0: the Python reader only")
        if ct._native.get() is None:
            ct._native.wait()
        assert ct._native.get() is not None, ct.native_status()
    else:
        monkeypatch.setattr(ct._native, "get", lambda: None)
    return request.param


def test_native_step_on_several_threads_same_bits(reader):
    # Work above the parallel threshold: the one-call step splits it over
    # threads; the bits are Chainer's.
    import cynag_kernels

    ps = _params([(37,), (5, 9), (1000,)], F32, 1) + _params([(3, 4), (257,)], F64, 2)
    refs = [(p.detach().numpy().copy(), np.zeros_like(p.detach().numpy())) for p in ps]
    opt = ct.NesterovAG(ps, lr=0.1, momentum=0.9)
    old = cynag_kernels.get_parallel_threshold()
    try:
        cynag_kernels.set_parallel_threshold(0)
        cynag_kernels.set_num_threads(3)
        for k in range(3):
            for p, gr in zip(ps, _grads(ps, 10 + k)):
                p.grad = gr
            opt.step()
            for p, (r, v) in zip(ps, refs):
                chainer_step(r, p.grad.numpy(), v, 0.1, 0.9)
    finally:
        cynag_kernels.set_parallel_threshold(old)
        cynag_kernels.set_num_threads(None)
    for p, (r, v) in zip(ps, refs):
        assert np.array_equal(p.detach().numpy(), r)
        assert np.array_equal(opt.state[p]["v"].numpy(), v)


def _snapshot(opt, ps):
    return [(p.detach().clone(), {k: (x.clone() if isinstance(x, torch.Tensor) else x)
                                  for k, x in opt.state[p].items()} if p in opt.state else None)
            for p in ps]


def _unchanged(opt, ps, snap):
    for p, (p0, st0) in zip(ps, snap):
        assert torch.equal(p.detach(), p0)
        if st0 is None:
            assert p not in opt.state
            continue
        for k, x in st0.items():
            y = opt.state[p][k]
            assert torch.equal(y, x) if isinstance(x, torch.Tensor) else y == x


@pytest.mark.parametrize("bad", ["sparse_grad", "step_none", "step_tensor", "step_missing",
                                 "inference"])
def test_a_late_refusal_changes_nothing(reader, bad):
    # States exist (the step would be one native call); one parameter then
    # does not fit: the step raises naming it, and no parameter, v or step
    # count changes.
    ps = _params([(4,), (3,), (2, 2)], F32, 5)
    opt = ct.NesterovAG(ps, lr=0.1)
    for p, gr in zip(ps, _grads(ps, 6)):
        p.grad = gr
    opt.step()
    for p, gr in zip(ps, _grads(ps, 7)):
        p.grad = gr
    if bad == "sparse_grad":
        ps[2].grad = torch.ones(2, 2).to_sparse()
        match = r"\['params'\]\[2\]"
    elif bad == "step_none":
        opt.state[ps[2]]["step"] = None
        match = r"\['params'\]\[2\].*'step'"
    elif bad == "step_tensor":
        opt.state[ps[2]]["step"] = torch.tensor(1)
        match = r"\['params'\]\[2\].*'step'"
    elif bad == "step_missing":
        del opt.state[ps[2]]["step"]
        match = r"\['params'\]\[2\].*'step'"
    else:
        with torch.inference_mode():
            opt.state[ps[2]]["v"] = torch.zeros(2, 2)
        match = r"\['params'\]\[2\].*inference"
    snap = _snapshot(opt, ps)
    with pytest.raises((ValueError, RuntimeError), match=match):
        opt.step()
    _unchanged(opt, ps, snap)
    assert opt.t == 1


def test_load_state_dict_without_step_counts_from_zero(reader):
    p = torch.nn.Parameter(torch.ones(3))
    opt = ct.NesterovAG([p], lr=0.1)
    opt.load_state_dict({"state": {0: {"v": torch.full((3,), 0.5)}},
                         "param_groups": [{"params": [0], "lr": 0.1, "momentum": 0.9,
                                           "weight_decay": 0.0}]})
    assert opt.state[p]["step"] == 0 and type(opt.state[p]["step"]) is int
    p.grad = torch.ones(3)
    opt.step()
    assert opt.state[p]["step"] == 1


@pytest.mark.parametrize("kind", ["neg_view", "zero_tensor"])
def test_gradients_whose_memory_is_not_their_values(reader, kind):
    # A negative view keeps the sign in the tensor, not in memory; an
    # efficient zero tensor has no memory.  Both go through copies.
    ps = _params([(5,), (3,)], F32, 8)
    refs = [(p.detach().numpy().copy(), np.zeros_like(p.detach().numpy())) for p in ps]
    opt = ct.NesterovAG(ps, lr=0.1, momentum=0.9)
    for k in range(3):
        grads = _grads(ps, 20 + k)
        for p, gr in zip(ps, grads):
            p.grad = gr
        if kind == "neg_view":
            ps[0].grad = torch._neg_view(-grads[0])
            assert ps[0].grad.is_neg()
        else:
            ps[0].grad = torch._efficientzerotensor(5)
            grads[0] = torch.zeros(5)
        opt.step()
        for (r, v), gr in zip(refs, grads):
            chainer_step(r, gr.numpy(), v, 0.1, 0.9)
    for p, (r, v) in zip(ps, refs):
        assert np.array_equal(p.detach().numpy(), r)
        assert np.array_equal(opt.state[p]["v"].numpy(), v)


def test_step_bumps_version_counters_as_an_inplace_op(reader):
    # A graph that saved a parameter before the step must refuse to backward
    # after it, as with any PyTorch optimizer.
    ps = _params([(3,), (2, 2)], F64, 9)
    opt = ct.NesterovAG(ps, lr=0.1)
    for step in range(2):  # (the first step makes the states, the second is the usual one)
        for p in ps:
            p.grad = torch.ones_like(p)
        loss = (ps[0] * ps[0]).sum() + (ps[1] * ps[1]).sum()  # saves both parameters
        before = [p._version for p in ps]
        opt.step()
        assert all(p._version > b for p, b in zip(ps, before))
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_add_param_group():
    a = torch.nn.Parameter(torch.randn(4))
    c = torch.nn.Parameter(torch.randn(2))
    opt = ct.NesterovAG([a], lr=0.1, momentum=0.9)
    refs = {}

    def add(k):
        if k == 2:
            opt.add_param_group({"params": [c], "lr": 0.05, "momentum": 0.6})

    _train_groups(opt, refs, 4, on_step=add)
    assert opt.param_groups[1]["weight_decay"] == 0.0  # the default filled in
    assert opt.state[a]["step"] == 4 and opt.state[c]["step"] == 2
    for p in (a, c):
        assert np.array_equal(p.detach().numpy(), refs[id(p)][0])


def test_state_dict_roundtrip_weights_only_and_hooks():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = ct.NesterovAG(model.parameters(), lr=0.05, momentum=0.8)
    events = []
    opt.register_step_pre_hook(lambda o, a, k: events.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: events.append("post"))
    x = torch.randn(5, 4)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    opt.new_epoch()
    assert events == ["pre", "post"] * 3
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model2.load_state_dict(ck["model"])
    opt2 = ct.NesterovAG(model2.parameters())
    opt2.load_state_dict(ck["opt"])
    assert (opt2.t, opt2.epoch) == (3, 1)
    assert opt2.param_groups[0]["lr"] == 0.05
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["v"], opt2.state[q]["v"])
        assert opt.state[p]["step"] == opt2.state[q]["step"] == 4


@pytest.mark.parametrize("bad", ["shape", "dtype", "count", "groups", "step", "missing_v"])
def test_load_state_dict_that_does_not_fit_changes_nothing(bad):
    model = torch.nn.Linear(3, 2)
    opt = ct.NesterovAG(model.parameters(), lr=0.1)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    before = {k: (v["v"].clone(), v["step"]) for k, v in sd["state"].items()}
    bad_sd = {"state": {k: dict(v) for k, v in sd["state"].items()},
              "param_groups": [dict(g) for g in sd["param_groups"]], "cynag": {"t": 9}}
    if bad == "shape":
        bad_sd["state"][0]["v"] = torch.zeros(5)
    elif bad == "dtype":
        bad_sd["state"][0]["v"] = bad_sd["state"][0]["v"].long()
    elif bad == "count":
        bad_sd["param_groups"][0]["params"] = bad_sd["param_groups"][0]["params"][:1]
    elif bad == "groups":
        bad_sd["param_groups"] = bad_sd["param_groups"] * 2
    elif bad == "step":
        bad_sd["state"][1]["step"] = -1
    else:
        del bad_sd["state"][1]["v"]
    with pytest.raises(ValueError):
        opt.load_state_dict(bad_sd)
    assert opt.t == 1
    for k, p in enumerate(model.parameters()):
        assert torch.equal(opt.state[p]["v"], before[k][0]) and opt.state[p]["step"] == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_load_state_dict_converts_v_to_the_parameters_dtype(dtype):
    """As torch.optim converts a state (resuming after model.to(dtype))."""
    model = torch.nn.Linear(3, 2)
    opt = ct.NesterovAG(model.parameters(), lr=0.1)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    sd = opt.state_dict()
    model.to(dtype)
    opt2 = ct.NesterovAG(model.parameters(), lr=0.1)
    opt2.load_state_dict(sd)
    for k, p in enumerate(model.parameters()):
        assert opt2.state[p]["v"].dtype == dtype
        assert torch.equal(opt2.state[p]["v"], sd["state"][k]["v"].to(dtype))
    model(torch.randn(2, 3, dtype=dtype)).sum().backward()
    opt2.step()
    assert all(opt2.state[p]["step"] == 2 for p in model.parameters())


def test_empty_and_extra_state_entries_round_trip():
    """A state read before its first update (the state is a defaultdict) and an
    entry of the user's own are saved and loaded as torch.optim does."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = ct.NesterovAG([a, b], lr=0.1)
    a.grad = torch.ones(3)
    opt.step()
    assert opt.state[b] == {}  # (read: an empty state)
    opt.state[a]["ema"] = torch.full((3,), 7.0)
    sd = opt.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    opt2 = ct.NesterovAG([a, b], lr=0.1)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.state[b] == {} and torch.equal(opt2.state[a]["ema"], torch.full((3,), 7.0))
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    opt2.step()
    assert opt2.state[a]["step"] == 2 and opt2.state[b]["step"] == 1


def test_load_pre_hooks_run_before_the_checks():
    """A load pre-hook may migrate a checkpoint (as torch.optim runs them first);
    what it returns is checked."""
    a = torch.nn.Parameter(torch.ones(3))
    sgd = torch.optim.SGD([a], lr=0.1, momentum=0.9)
    a.grad = torch.ones(3)
    sgd.step()
    sd = sgd.state_dict()
    opt = ct.NesterovAG([a], lr=0.1)

    def migrate(optimizer, state_dict):
        state_dict = dict(state_dict)
        state_dict["state"] = {k: {"v": -0.1 * st["momentum_buffer"], "step": 1}
                               for k, st in state_dict["state"].items()}
        return state_dict

    handle = opt.register_load_state_dict_pre_hook(migrate)
    opt.load_state_dict(sd)
    assert torch.equal(opt.state[a]["v"], torch.full((3,), -0.1)) and opt.state[a]["step"] == 1
    handle.remove()
    opt.register_load_state_dict_pre_hook(
        lambda o, state_dict: {**state_dict, "state": {0: {"v": torch.zeros(7), "step": 1}}})
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(sd)
    assert torch.equal(opt.state[a]["v"], torch.full((3,), -0.1))


def test_load_post_hooks_see_the_loaded_counts_and_expanded_v_refused():
    a = torch.nn.Parameter(torch.ones(3))
    opt = ct.NesterovAG([a], lr=0.1)
    for _ in range(3):
        a.grad = torch.ones(3)
        opt.step()
    sd = opt.state_dict()
    opt2 = ct.NesterovAG([a], lr=0.1)
    seen = []
    opt2.register_load_state_dict_post_hook(
        lambda o: seen.append((o.t, o.state[a]["step"], type(o.state[a]["step"]))))
    opt2.load_state_dict(sd)
    assert seen == [(3, 3, int)]
    bad = {"state": {0: {"v": torch.zeros(1).expand(3), "step": 3}},
           "param_groups": sd["param_groups"], "cynag": {"t": 9}}
    with pytest.raises(ValueError, match="expanded"):
        opt2.load_state_dict(bad)
    assert opt2.t == 3 and not opt2.state[a]["v"].stride() == (0,)
    assert len(seen) == 1


def test_copies_and_pickles_keep_t_and_epoch():
    import copy
    import pickle

    a = torch.nn.Parameter(torch.ones(3))
    opt = ct.NesterovAG([a], lr=0.1)
    for _ in range(3):
        a.grad = torch.ones(3)
        opt.step()
    opt.new_epoch()
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert (other.t, other.epoch) == (3, 1)
        assert other.state_dict()["cynag"] == {"t": 3, "epoch": 1}


@pytest.mark.parametrize("what", ["meta", "expanded v", "expanded param"])
def test_tensors_the_step_cannot_address_refused_first(reader, what):
    """Parameters the step cannot update in place are refused before anything
    changes, naming the parameter: not in CPU or CUDA memory (a meta tensor;
    also DTensor and other devices) or with elements sharing memory."""
    a = torch.nn.Parameter(torch.zeros(3))
    if what == "meta":
        b = torch.nn.Parameter(torch.zeros(4, device="meta"))
    elif what == "expanded param":
        b = torch.nn.Parameter(torch.zeros(1).expand(4))
    else:
        b = torch.nn.Parameter(torch.zeros(4))
    opt = ct.NesterovAG([a, b], lr=0.1)
    if what == "expanded v":
        a.grad, b.grad = torch.ones(3), torch.ones(4)
        opt.step()
        opt.state[b]["v"] = torch.zeros(1).expand(4)
    a.grad, b.grad = torch.ones(3), torch.ones(4, device=b.device)
    before = a.detach().clone()
    t = opt.t
    with pytest.raises((TypeError, ValueError), match=r"\['params'\]\[1\]"):
        opt.step()
    assert torch.equal(a.detach(), before) and opt.t == t
    assert opt.state[a].get("step", 0) == t


def test_bad_input_raises_naming_the_parameter_and_changes_nothing():
    a = torch.nn.Parameter(torch.ones(3))
    e = torch.nn.Parameter(torch.ones(4, 2))
    opt = ct.NesterovAG([a, e], lr=0.1)
    a.grad = torch.ones(3)
    e.grad = torch.sparse_coo_tensor([[0, 1]], torch.ones(2, 2), (4, 2))
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[1\].*sparse"):
        opt.step()
    assert torch.equal(a, torch.ones(3)) and not opt.state.get(a) and opt.t == 0
    e.grad = None
    opt.param_groups[0]["lr"] = "fast"
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['lr'\]"):
        opt.step()
    assert torch.equal(a, torch.ones(3))
    with pytest.raises(ValueError, match="learning rate"):
        ct.NesterovAG([a], lr=-1.0)
    i = torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))
    i.grad = torch.ones(2, dtype=torch.complex64)
    with pytest.raises(TypeError, match=r"\['params'\]\[0\].*float"):
        ct.NesterovAG([i]).step()


def test_cuda_tensors_without_cupy_raise_before_any_group_changes(monkeypatch):
    # A CUDA parameter in a later group, CuPy missing: the step must raise
    # before the CPU parameters of the first group are updated.  (No CUDA
    # device here: the later group's collected entry is a stand-in CUDA
    # tensor; everything else is the real step.)
    import sys
    import types

    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(2))
    opt = ct.NesterovAG([{"params": [a]}, {"params": [b]}], lr=0.1)
    a.grad = torch.ones(3)
    b.grad = torch.ones(2)
    real_plans = ct.NesterovAG._plans

    def plans(self, native, collected=None):
        merged, out = real_plans(self, native, collected)
        fake = types.SimpleNamespace(is_cuda=True, dtype=torch.float32, device="cuda:0",
                                     shape=(2,))
        out[1][4].append(ct._Entry(fake, fake, fake, {"v": fake, "step": 0}, (1, 0)))
        return merged, out

    monkeypatch.setattr(ct.NesterovAG, "_plans", plans)
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    with pytest.raises(RuntimeError, match=r"param_groups\[1\]\['params'\]\[0\].*CuPy"):
        opt.step()
    assert torch.equal(a, torch.ones(3)) and not opt.state.get(a) and opt.t == 0
    assert torch.equal(b, torch.ones(2)) and not opt.state.get(b)


def test_huge_learning_rate_follows_numpy_promotion():
    # lr * m products that float32 cannot hold: NumPy 1.x computes in float64
    # (Chainer's sequence); the kernel is bypassed, the result is the same.
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ref = p.detach().numpy().copy()
    v = np.zeros(2, np.float32)
    opt = ct.NesterovAG([p], lr=1e39, momentum=0.5)
    p.grad = torch.tensor([1e-30, 2e-30])
    with np.errstate(over="ignore", invalid="ignore"):
        opt.step()
        import cynag_kernels

        cynag_kernels.nesterov_ag_cpu(ref, np.array([1e-30, 2e-30], np.float32), v, 1e39, 0.5)
    assert np.array_equal(p.detach().numpy(), ref, equal_nan=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_match_the_cpu_update():
    pytest.importorskip("cupy")
    params = _params([(1000,), (3, 7)], F32, 5)
    cuda_params = [torch.nn.Parameter(p.detach().cuda()) for p in params]
    opt = ct.NesterovAG(params, lr=0.1, momentum=0.9)
    copt = ct.NesterovAG(cuda_params, lr=0.1, momentum=0.9)
    for k in range(3):
        grads = _grads(params, 40 + k)
        for p, q, gr in zip(params, cuda_params, grads):
            p.grad = gr
            q.grad = gr.cuda()
        opt.step()
        copt.step()
    torch.cuda.synchronize()
    for p, q in zip(params, cuda_params):
        np.testing.assert_allclose(q.detach().cpu().numpy(), p.detach().numpy(), rtol=1e-6,
                                   atol=1e-7)


READER_SCRIPT = """
import json, sys, torch
import cynag.torch as ct
from cynag import _torch_native
torch.manual_seed(0)
params = [torch.nn.Parameter(torch.randn(s)) for s in [(50,), (3, 4), (7,), ()]]
params.append(torch.nn.Parameter(torch.randn(4, 6).t()))
opt = ct.NesterovAG(params, lr=0.1, momentum=0.9, weight_decay=1e-3)
statuses = []
for k in range(40):
    g = torch.Generator().manual_seed(k)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    if k == 20:
        _torch_native.wait()  # the background build: steps after it use the native reader
    statuses.append(ct.native_status())
    opt.step()
print(json.dumps({"status": [statuses[0], statuses[-1]],
                  "bits": [p.detach().numpy().tobytes().hex() for p in params],
                  "v": [opt.state[p]["v"].numpy().tobytes().hex() for p in params]}))
"""


def test_background_build_and_python_reader_give_the_same_bits(tmp_path):
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "readers.py"
    script.write_text(READER_SCRIPT)
    out = {}
    for mode in ("background", "0"):
        env = dict(os.environ, CYNAG_TORCH_NATIVE=mode)
        proc = subprocess.run([sys.executable, str(script)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, universal_newlines=True, timeout=600,
                              env=env)
        assert proc.returncode == 0, proc.stdout[-4000:]
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["background"]["status"][-1].startswith("native reader"), out["background"]
    assert out["0"]["status"] == ["Python reader (CYNAG_TORCH_NATIVE=0)"] * 2
    assert out["background"]["bits"] == out["0"]["bits"]
    assert out["background"]["v"] == out["0"]["v"]


KILLED_BUILD_SCRIPT = """
import os, sys, time, torch
import cynag.torch as ct
from cynag import _torch_native
p = torch.nn.Parameter(torch.ones(3))
p.grad = torch.ones(3)
ct.NesterovAG([p]).step()  # starts the background build
time.sleep(float(sys.argv[1]))
assert _torch_native._module is None, "the build ended too soon for this test"
os._exit(0)  # the process ends in the middle of the build
"""

SYNC_SCRIPT = """
import time, torch
import cynag.torch as ct
t0 = time.time()
p = torch.nn.Parameter(torch.ones(3))
p.grad = torch.ones(3)
ct.NesterovAG([p]).step()
print(ct.native_status(), time.time() - t0)
"""


def test_a_process_ending_during_the_build_does_not_block_the_next(tmp_path):
    """A short script that ends while the background build runs leaves no lock behind."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    (tmp_path / "killed.py").write_text(KILLED_BUILD_SCRIPT)
    (tmp_path / "sync.py").write_text(SYNC_SCRIPT)
    env["CYNAG_TORCH_NATIVE"] = "background"
    proc = subprocess.run([sys.executable, str(tmp_path / "killed.py"), "4"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:]
    env["CYNAG_TORCH_NATIVE"] = "1"
    for _ in range(2):  # built, then loaded from the cache
        proc = subprocess.run([sys.executable, str(tmp_path / "sync.py")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stdout[-4000:]
        assert proc.stdout.strip().splitlines()[-1].startswith("native reader"), proc.stdout
    cache = tmp_path / "ext" / "cynag"
    assert len(list(cache.glob("*.so")) + list(cache.glob("*.pyd"))) == 1
    # (what the ended process left: its build folder, no lock)
    assert all(".build-" in f.name for f in cache.iterdir() if f.is_dir())


def test_state_dict_post_hooks_see_the_counts_and_groups_get_missing_defaults():
    p = torch.nn.Parameter(torch.ones(3))
    opt = ct.NesterovAG([p], lr=0.1, weight_decay=0.01)
    p.grad = torch.ones(3)
    opt.step()
    seen = []
    opt.register_state_dict_post_hook(lambda o, sd: seen.append(dict(sd["cynag"])))
    sd = opt.state_dict()
    assert seen == [{"t": 1, "epoch": 0}] and sd["cynag"] == {"t": 1, "epoch": 0}
    del sd["param_groups"][0]["weight_decay"]  # (a dict saved before the key existed)
    opt2 = ct.NesterovAG([p], lr=0.1, weight_decay=0.5)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["weight_decay"] == 0.5  # the optimizer's default
    opt2.step()
    assert opt2.t == 2


def test_a_group_listing_one_parameter_twice_is_refused():
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="same parameter twice"):
        ct.NesterovAG([p, q, p])
    opt = ct.NesterovAG([q])
    with pytest.raises(ValueError, match="same parameter twice"):
        opt.add_param_group({"params": [p, p]})
    assert len(opt.param_groups) == 1


def test_add_param_group_keeps_the_users_dict():
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = ct.NesterovAG([p])
    g = {"params": (q,), "lr": 0.5}
    opt.add_param_group(g)
    assert opt.param_groups[-1] is g and g["params"] == [q]


def test_named_parameters_listing_one_parameter_twice_are_refused():
    # (name, tensor) pairs, which torch.optim takes: the same check, by tensor.
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="same parameter twice"):
        ct.NesterovAG([("a", p), ("b", p)])
    with pytest.raises(ValueError, match="same parameter twice"):
        ct.NesterovAG([{"params": [("a", p), ("q", q), ("a2", p)]}])
    opt = ct.NesterovAG([("a", p), ("q", q)], lr=0.1, momentum=0.9)
    p.grad, q.grad = torch.ones(2), torch.ones(2)
    opt.step()
    assert torch.equal(p.detach(), torch.full((2,), 0.72900003)) and opt.state[p]["step"] == 1


@pytest.mark.parametrize("extra", [{"t": 2.5}, {"t": -7}, {"t": "12"}, {"epoch": True},
                                   {"t": float("nan")}, None, [1]])
def test_load_state_dict_refuses_counts_that_are_not_counts(extra):
    p = torch.nn.Parameter(torch.ones(2))
    opt = ct.NesterovAG([p], lr=0.1)
    p.grad = torch.ones(2)
    opt.step()
    sd = opt.state_dict()
    sd["cynag"] = extra
    opt2 = ct.NesterovAG([p], lr=0.1)
    with pytest.raises(ValueError, match="cynag"):
        opt2.load_state_dict(sd)
    assert opt2.t == 0 and not opt2.state


def test_a_state_of_only_the_users_own_entries_is_not_started(reader):
    # As torch.optim: entries written before the first update are kept, and
    # the first update adds its own; saved before it, they load as they are.
    p = torch.nn.Parameter(torch.ones(3))
    opt = ct.NesterovAG([p], lr=0.1, momentum=0.9)
    opt.state[p]["lr_scale"] = 0.5
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    p.grad = torch.ones(3)
    opt.step()
    assert sorted(opt.state[p]) == ["lr_scale", "step", "v"] and opt.state[p]["step"] == 1
    assert torch.equal(p.detach(), torch.full((3,), 0.72900003))
    buf.seek(0)
    q = torch.nn.Parameter(torch.ones(3))
    opt2 = ct.NesterovAG([q], lr=0.1, momentum=0.9)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    assert opt2.state[q] == {"lr_scale": 0.5}
    q.grad = torch.ones(3)
    opt2.step()
    assert torch.equal(q.detach(), p.detach()) and opt2.state[q]["step"] == 1
    # "step" without "v" is no state of this optimizer's
    opt2.state[q] = {"step": 3}
    with pytest.raises(ValueError, match="does not fit"):
        opt2.step()
