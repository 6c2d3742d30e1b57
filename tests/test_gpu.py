"""The GPU path: dispatch and errors without a GPU, real updates with one.

Tests marked ``gpu`` need CuPy and a CUDA device and skip cleanly otherwise
(run them on a GPU machine with ``python -m pytest -m gpu``).  The others run
everywhere: ``import cynag`` without CuPy, and the errors for mixed
host/device parameters, simulated with an object that looks like a CuPy array.
"""
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cynag
from cynag_kernels import cuda as cuda_launcher
from cynag_kernels import hooks as cpu_hooks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cupy_with_device():
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        return cupy
    except Exception:
        return None


cp = _cupy_with_device()
needs_gpu = pytest.mark.skipif(cp is None, reason="needs CuPy and a CUDA device")


# ---------------------------------------------------------------------------
# Without a GPU
# ---------------------------------------------------------------------------
def test_import_and_cpu_update_without_cupy():
    """cynag imports and updates NumPy parameters when CuPy cannot be imported."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["cupy"] = None  # any import of cupy now fails
        import numpy as np
        import cynag
        link = cynag.Link()
        with link.init_scope():
            link.W = cynag.Parameter(np.ones(4, np.float32))
        link.W.grad = np.ones(4, np.float32)
        cynag.optimizers.NesterovAG().setup(link).update()
        cynag.show_config()
        import cynag_kernels.cuda  # the launcher itself imports without CuPy
        print("ok", link.W.array[0])
        """
    )
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ok 0.9729" in proc.stdout


class _FakeDevice:
    id = 0


class _FakeCupyArray:
    """Looks like a cupy.ndarray on GPU 0 to cynag's device checks."""

    def __init__(self, like):
        self.shape, self.dtype, self.ndim, self.size = like.shape, like.dtype, like.ndim, like.size
        self.device = _FakeDevice()


_FakeCupyArray.__module__ = "cupy._core.core"
_FakeCupyArray.__name__ = _FakeCupyArray.__qualname__ = "ndarray"


def test_host_param_with_device_grad_names_the_parameter():
    link = cynag.Chain()
    with link.init_scope():
        link.l1 = cynag.Link()
    with link.l1.init_scope():
        link.l1.W = cynag.Parameter(np.ones(3, np.float32))
    opt = cynag.optimizers.NesterovAG().setup(link)
    link.l1.W.grad = _FakeCupyArray(link.l1.W.array)
    before = link.l1.W.array.copy()
    with pytest.raises(TypeError, match=r"'/l1/W'.*same device"):
        opt.update()
    assert opt.t == 0 and np.array_equal(link.l1.W.array, before)


def test_launch_config_and_args_have_exact_types():
    for n in (1, 255, 256, 257, 10 ** 6, 10 ** 9):
        grid, block = cuda_launcher.launch_config(n, sm_count=132)
        assert grid[0] >= 1 and block[0] == cuda_launcher.BLOCK_SIZE
        assert grid[0] <= 132 * cuda_launcher.BLOCKS_PER_SM
    for dtype, scalar in ((np.float16, np.float32), (np.float32, np.float32),
                          (np.float64, np.float64)):
        a = np.zeros(5, dtype)
        args = cuda_launcher.kernel_args(a, a, a, 0.01, 0.9)
        assert [type(x) for x in args[3:]] == [scalar, scalar, np.int64]
        assert args[5] == 5
    # lr and momentum reach the kernel rounded to the array dtype, as in Chainer
    args = cuda_launcher.kernel_args(np.zeros(1, np.float16), None, None, 0.01, 0.9)
    assert args[3] == np.float32(np.float16(0.01))


def test_kernel_source_is_read_once_and_names_its_file():
    src = cuda_launcher.kernel_source()
    assert src is cuda_launcher.kernel_source()
    assert src.startswith("#line 1 ") and "nesterov_ag.cu" in src.splitlines()[0]
    directives = [l for l in src.splitlines() if l.startswith("#line ")]
    assert directives == ['#line 1 "%s"' % f.replace("\\", "/")
                          for f in cuda_launcher.SOURCE_FILES]
    assert [os.path.basename(f) for f in cuda_launcher.SOURCE_FILES] == ["nesterov_ag.cu",
                                                                         "hooks.cu"]
    for names in (cuda_launcher.KERNEL_NAMES, cuda_launcher.MULTI_KERNEL_NAMES,
                  cuda_launcher.HOOK_KERNEL_NAMES, cuda_launcher.SUM_SQUARES_KERNEL_NAMES,
                  cuda_launcher.SUM_SQUARES_MULTI_KERNEL_NAMES):
        for name in names.values():
            assert src.count('extern "C" __global__ void %s(' % name) == 1, name


# ---------------------------------------------------------------------------
# With a GPU
# ---------------------------------------------------------------------------
def _gpu_oracle(p, g, v, lr, m):
    """Chainer's GPU expression in float64 (the reference for the tolerance)."""
    p, g, v = (np.asarray(a, np.float64) for a in (p, g, v))
    v = v * m - lr * g
    return p + (m * m * v - (1 + m) * lr * g), v


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(), (0,), (1,), (1000,), (37, 53), (4, 5, 6)])
@pytest.mark.parametrize("layout", ["contiguous", "fortran", "strided"])
def test_gpu_update_matches_oracle(dtype, shape, layout):
    rng = np.random.default_rng(0)
    lr, m = 0.01, 0.9
    link = cynag.Link()
    host = rng.standard_normal(shape).astype(dtype)
    if layout == "fortran":
        array = cp.asfortranarray(cp.asarray(host))
    elif layout == "strided" and len(shape) >= 1:
        array = cp.asarray(np.repeat(host[..., None], 2, axis=-1))[..., 0]
    else:
        array = cp.asarray(host)
    with link.init_scope():
        link.W = cynag.Parameter(array)
    opt = cynag.optimizers.NesterovAG(lr=lr, momentum=m).setup(link)
    p_ref, v_ref = host.astype(np.float64), np.zeros(shape)
    eps = {np.float16: 2e-3, np.float32: 2e-6, np.float64: 1e-14}[dtype]
    for _ in range(5):
        g = rng.standard_normal(shape).astype(dtype)
        link.W.grad = cp.asarray(g)
        opt.update()
        p_ref, v_ref = _gpu_oracle(p_ref, g, v_ref, lr, m)
        got_p = cp.asnumpy(link.W.array).astype(np.float64)
        got_v = cp.asnumpy(link.W.update_rule.state["v"]).astype(np.float64)
        scale = np.abs(p_ref) + np.abs(v_ref) + np.abs(g.astype(np.float64)) + 1
        assert np.all(np.abs(got_p - p_ref) <= 8 * eps * scale)
        assert np.all(np.abs(got_v - v_ref) <= 8 * eps * scale)
    assert isinstance(link.W.update_rule.state["v"], cp.ndarray)


@needs_gpu
@pytest.mark.gpu
def test_gpu_state_on_the_parameters_device():
    n = cp.cuda.runtime.getDeviceCount()
    for dev in range(n):
        with cp.cuda.Device(dev):
            w = cp.ones(10, cp.float32)
        link = cynag.Link()
        with link.init_scope():
            link.W = cynag.Parameter(w)
        opt = cynag.optimizers.NesterovAG().setup(link)
        with cp.cuda.Device(dev):
            link.W.grad = cp.ones(10, cp.float32)
        with cp.cuda.Device(0):  # a different current device must not matter
            opt.update()
        assert link.W.update_rule.state["v"].device.id == dev


@needs_gpu
@pytest.mark.gpu
def test_gpu_mixed_host_device_is_a_clear_error():
    link = cynag.Link()
    with link.init_scope():
        link.W = cynag.Parameter(cp.ones(3, cp.float32))
    opt = cynag.optimizers.NesterovAG().setup(link)
    link.W.grad = np.ones(3, np.float32)
    with pytest.raises(TypeError, match=r"'/W'.*same device"):
        opt.update()
    assert opt.t == 0


def test_cupy_without_a_usable_gpu_is_a_clear_error(monkeypatch):
    """Simulated: a CuPy whose runtime reports no device (no driver / no GPU)."""
    import types

    class CUDARuntimeError(RuntimeError):
        pass

    class FakeArray(_FakeCupyArray):
        flags = types.SimpleNamespace(c_contiguous=True, f_contiguous=True)

    def no_device(*args, **kwargs):
        raise CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    runtime = types.SimpleNamespace(CUDARuntimeError=CUDARuntimeError)
    fake = types.ModuleType("cupy")
    fake.ndarray = FakeArray
    fake.cuda = types.SimpleNamespace(Device=no_device, runtime=runtime)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    a = FakeArray(np.zeros(4, np.float32))
    with pytest.raises(RuntimeError, match="could not use GPU 0.*no CUDA-capable device"):
        cuda_launcher.nesterov_ag_gpu(a, FakeArray(a), FakeArray(a), 0.01, 0.9)


# ---------------------------------------------------------------------------
# Multi-tensor path (GPUTable): one launch per (device, dtype) group
# ---------------------------------------------------------------------------
_EPS = {np.dtype(np.float16): 2e-3, np.dtype(np.float32): 2e-6, np.dtype(np.float64): 1e-14}


class _LaunchCounter:
    """Wraps the launcher's kernel lookup so that every launch is recorded as (name, device)."""

    def __init__(self, monkeypatch):
        self.launches = []
        original = cuda_launcher._kernel

        def counting_kernel(cupy, device_id, dtype, names=cuda_launcher.KERNEL_NAMES):
            kernel = original(cupy, device_id, dtype, names)
            name = names[dtype]

            def launch(grid, block, args, *rest, **kwargs):
                self.launches.append((name, device_id))
                return kernel(grid, block, args, *rest, **kwargs)

            return launch

        monkeypatch.setattr(cuda_launcher, "_kernel", counting_kernel)

    def take(self):
        out, self.launches = self.launches, []
        return out


def _close(got, want, dtype, scale):
    """Elementwise |got - want| <= 8 eps (scale + tiny), in float64."""
    eps = _EPS[np.dtype(dtype)]
    tiny = float(np.finfo(dtype).tiny)
    got = np.asarray(got, np.float64)
    bad = np.abs(got - want) > 8 * eps * (scale + tiny)
    return np.flatnonzero(bad.reshape(-1))


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_gpu_table_matches_oracle_in_one_launch(monkeypatch, dtype):
    """GPUTable over many tensors (sizes 1 to 300k, per-tensor lr/momentum/loss scale): one launch.

    Each step is compared with Chainer's expression in float64 from the
    state before the step, the gradient with ``grad / loss_scale``.
    """
    counter = _LaunchCounter(monkeypatch)
    rng = np.random.default_rng(21)
    dtype = np.dtype(dtype)
    sizes = [1, 2, 3, 255, 257, 8191, 8192, 8193, 300_007] + \
        [int(s) for s in rng.integers(1, 5000, size=60)]
    n = len(sizes)
    lrs = [float(x) for x in 10 ** rng.uniform(-4, -1, size=n)]
    ms = [float(x) for x in rng.uniform(0, 0.99, size=n)]
    scales = [None if rng.random() < 0.5 else float(rng.choice([128.0, 1000.1, 0.7, 3.0]))
              for _ in range(n)]
    host_p = [rng.standard_normal(s).astype(dtype) for s in sizes]
    ps = [cp.asarray(h) for h in host_p]
    vs = [cp.asarray((rng.standard_normal(s) * 0.1).astype(dtype)) for s in sizes]
    for step in range(3):
        host_g = [rng.standard_normal(s).astype(dtype) for s in sizes]
        gs = [cp.asarray(h) for h in host_g]
        before_p = [cp.asnumpy(a).astype(np.float64) for a in ps]
        before_v = [cp.asnumpy(a).astype(np.float64) for a in vs]
        table = cuda_launcher.GPUTable(ps, gs, vs, lrs, ms, scales)
        assert table.excluded == [] and table.n_tensors == n and table.n_elements == sum(sizes)
        counter.take()
        table.run()
        assert counter.take() == [(cuda_launcher.MULTI_KERNEL_NAMES[dtype], 0)]
        problems = []
        for t in range(n):
            g = host_g[t].astype(np.float64)
            if scales[t] is not None:
                g = g / scales[t]
            want_p, want_v = _gpu_oracle(before_p[t], g, before_v[t], lrs[t], ms[t])
            scale = np.abs(want_p) + np.abs(want_v) + np.abs(g) + 1
            for what, got, want, sc in (("param", ps[t], want_p, scale),
                                        ("v", vs[t], want_v, scale),
                                        ("grad", gs[t], g, np.abs(g))):
                bad = _close(cp.asnumpy(got), want, dtype, sc)
                if bad.size:
                    problems.append("step %d tensor %d (size %d, scale %r): %s off at %d elements"
                                    % (step, t, sizes[t], scales[t], what, bad.size))
        assert not problems, problems[:5]


@needs_gpu
@pytest.mark.gpu
def test_gpu_table_excludes_what_it_cannot_update():
    """Strided, other-dtype or overlapping entries: excluded (strict=False) or ValueError."""
    a = [cp.zeros((8, 8), cp.float32) for _ in range(3)]
    strided = [cp.zeros((8, 16), cp.float32)[:, ::2] for _ in range(3)]
    other = [cp.zeros(5, cp.float64) for _ in range(3)]
    table = cuda_launcher.GPUTable([a[0], strided[0], other[0]], [a[1], strided[1], other[1]],
                                   [a[2], strided[2], other[2]], 0.01, 0.9, strict=False)
    assert table.excluded == [1, 2] and table.n_tensors == 1
    with pytest.raises(ValueError, match="entry 1"):
        cuda_launcher.GPUTable([a[0], strided[0]], [a[1], strided[1]], [a[2], strided[2]],
                               0.01, 0.9)
    table = cuda_launcher.GPUTable([a[0], a[0]], [a[1], cp.zeros((8, 8), cp.float32)],
                                   [a[2], cp.zeros((8, 8), cp.float32)], 0.01, 0.9, strict=False)
    assert table.excluded == [0, 1]  # the two entries share param
    assert cuda_launcher.GPUTable([], [], [], 0.01, 0.9).n_tensors == 0


def _gpu_model(seed, n_params, devices):
    """A Chain of parameters on ``devices``: mixed dtypes, 0-d and empty arrays,
    F-contiguous and strided arrays, frozen parameters, rule hooks, per-rule
    hyperparameters and loss scales.  Returns (model, optimizer, params, specs)."""
    rng = np.random.default_rng(seed)
    model = cynag.Chain()
    params, specs = [], []
    for start in range(0, n_params, 10):
        link = cynag.Link()
        with link.init_scope():
            for i in range(start, min(n_params, start + 10)):
                dtype = np.dtype([np.float16, np.float32, np.float64][int(rng.integers(3))])
                dev = devices[int(rng.integers(len(devices)))]
                r = rng.random()
                shape = (() if r < 0.03 else (0,) if r < 0.05 else
                         (int(rng.integers(20_000, 200_000)),) if r < 0.1 else
                         (int(rng.integers(1, 40)), int(rng.integers(1, 40))))
                layout = str(rng.choice(["C", "C", "C", "F", "strided"])) if len(shape) == 2 \
                    else "C"
                spec = dict(dtype=dtype, dev=dev, shape=shape, layout=layout,
                            frozen=rng.random() < 0.05, hook=rng.random() < 0.05,
                            lr=float(10 ** rng.uniform(-4, -1)) if rng.random() < 0.2 else None,
                            scale=(None if rng.random() < 0.7 else 2.0 ** int(rng.integers(0, 8))
                                   if shape == () else float(rng.choice([128.0, 1000.1, 0.7]))))
                host = rng.standard_normal(shape).astype(dtype)
                with cp.cuda.Device(dev):
                    array = _layout(cp.asarray(host), layout)
                p = cynag.Parameter(array)
                setattr(link, "p%d" % i, p)
                params.append(p)
                specs.append(spec)
        with model.init_scope():
            setattr(model, "l%d" % (start // 10), link)
    opt = cynag.optimizers.NesterovAG(lr=0.01, momentum=0.9).setup(model)
    for p, spec in zip(params, specs):
        rule = p.update_rule
        rule.enabled = not spec["frozen"]
        if spec["hook"]:
            rule.add_hook(lambda rule, param: None, name="noop")
        if spec["lr"] is not None:
            rule.hyperparam.lr = spec["lr"]
        if spec["scale"] is not None:
            p._loss_scale = spec["scale"]
    return model, opt, params, specs


def _layout(a, layout):
    if layout == "F":
        return cp.asfortranarray(a)
    if layout == "strided":
        return cp.repeat(a, 2, axis=-1)[..., ::2]
    return a


def _expected_gpu_launches(params, specs):
    """One launch per (device, dtype) group of dense, hook-free parameters, one per other param."""
    groups, rest = set(), 0
    for p, spec in zip(params, specs):
        if spec["frozen"] or p.array.size == 0:
            continue
        if spec["hook"] or spec["layout"] == "strided":
            rest += 1
        else:
            groups.add((spec["dev"], spec["dtype"]))
    return len(groups), rest


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("n_params", [1, 7, 161])
def test_gpu_optimizer_multi_tensor_matches_per_parameter(monkeypatch, n_params):
    """update() with the multi-tensor path: launches per step and results vs use_multi_tensor(False).

    After the first step: one launch per (device, dtype) group plus one per
    parameter left to the per-parameter path.  Results agree with the
    per-parameter kernels to rounding (both are NVRTC code, contracted to
    FMAs independently).
    """
    devices = list(range(min(2, cp.cuda.runtime.getDeviceCount())))
    counter = _LaunchCounter(monkeypatch)
    model_a, opt_a, params_a, specs = _gpu_model(n_params, n_params, devices)
    model_b, opt_b, params_b, _ = _gpu_model(n_params, n_params, devices)
    opt_b.use_multi_tensor(False)
    enabled = sum(1 for p, s in zip(params_a, specs) if not s["frozen"] and p.array.size)
    rng = np.random.default_rng(n_params + 1)
    for step in range(4):
        for pa, pb, spec in zip(params_a, params_b, specs):
            g = rng.standard_normal(spec["shape"]).astype(spec["dtype"])
            with cp.cuda.Device(spec["dev"]):
                pa.grad = _layout(cp.asarray(g), spec["layout"])
                pb.grad = _layout(cp.asarray(g), spec["layout"])
        counter.take()
        opt_a.update()
        launches_a = counter.take()
        opt_b.update()
        assert len(counter.take()) == enabled
        if step == 0:
            assert len(launches_a) == enabled  # the state is created per parameter
        else:
            n_groups, n_rest = _expected_gpu_launches(params_a, specs)
            multi = [l for l in launches_a if l[0] in cuda_launcher.MULTI_KERNEL_NAMES.values()]
            assert (len(multi), len(launches_a) - len(multi)) == (n_groups, n_rest), (
                step, launches_a, opt_a.multi_tensor_plan())
        problems = []
        for i, (pa, pb, spec) in enumerate(zip(params_a, params_b, specs)):
            if spec["frozen"]:
                continue
            pairs = [(pa.array, pb.array), (pa.grad, pb.grad),
                     (pa.update_rule.state["v"], pb.update_rule.state["v"])]
            for what, (x, y) in zip(("param", "grad", "v"), pairs):
                xa, ya = cp.asnumpy(x), cp.asnumpy(y).astype(np.float64)
                bad = _close(xa, ya, spec["dtype"], np.abs(ya) + 1)
                if bad.size:
                    problems.append("step %d param %d %s: %s differs at %d elements"
                                    % (step, i, spec["shape"], what, bad.size))
        assert not problems, problems[:5]


# ---------------------------------------------------------------------------
# Optimizer hooks: operation programs and sums of squares (hooks.cu)
# ---------------------------------------------------------------------------
#: Programs: (operations, what p is).  "NOISE" stands for the noise array.
_HOOK_PROGRAMS = (
    ([("weight_decay", 5e-4)], "param"),
    ([("lasso", 1e-3)], "param"),
    ([("clip", -0.5, 0.5)], None),
    ([("clip", None, 0.25)], None),
    ([("scale", 0.37)], None),
    ([("add", "NOISE")], "noise"),
    ([("weight_decay", 1e-4), ("lasso", -2e-3), ("clip", -1.0, 1.0), ("scale", 0.9)], "param"),
    ([("add", "NOISE"), ("scale", 0.5), ("clip", -0.75, None)], "noise"),
)


def _hook_rows(dtype, ops):
    return np.array([cpu_hooks.op_row(dtype, op) for op in ops], np.float64).reshape(-1, 4)


def _same_bits(a, b):
    """Equal bit patterns, any two NaNs equal."""
    u = {2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    diff = (a.view(u) != b.view(u)) & ~(np.isnan(a) & np.isnan(b))
    return np.flatnonzero(diff.reshape(-1))


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("layout", ["C", "F", "strided"])
def test_gpu_hook_ops_match_apply_ops(monkeypatch, dtype, layout):
    """hook_ops_gpu: one launch; float16 bit-identical to apply_ops, float32/64 to rounding.

    (float32/float64: NVRTC contracts ``g + a * p`` into a fused multiply-add.)
    """
    counter = _LaunchCounter(monkeypatch)
    dtype = np.dtype(dtype)
    rng = np.random.default_rng(41)
    shape = (37, 53)
    problems = []
    for ops_template, source in _HOOK_PROGRAMS:
        hg = rng.standard_normal(shape).astype(dtype)
        hparam = rng.standard_normal(shape).astype(dtype)
        hnoise = (rng.standard_normal(shape) * 0.1).astype(dtype)
        ops = [(op[0], hnoise) if op[0] == "add" else op for op in ops_template]
        hp = {"param": hparam, "noise": hnoise, None: None}[source]
        want = hg.copy()
        cpu_hooks.apply_ops(want, hp, ops)
        g = _layout(cp.asarray(hg), layout)
        p = None if hp is None else _layout(cp.asarray(hp), layout)
        counter.take()
        cuda_launcher.hook_ops_gpu(g, p, _hook_rows(dtype, ops))
        assert counter.take() == [(cuda_launcher.HOOK_KERNEL_NAMES[dtype], 0)]
        got = cp.asnumpy(g)
        if dtype == np.float16:
            bad = _same_bits(got, want)
        else:
            scale = np.abs(want) + np.abs(hg) + (0 if hp is None else np.abs(hp))
            bad = _close(got, want.astype(np.float64), dtype, scale)
        if bad.size:
            problems.append("%s: %d elements differ" % ([o[0] for o in ops], bad.size))
        if hp is not None:
            assert _same_bits(cp.asnumpy(p), hp).size == 0
    assert not problems, problems


@needs_gpu
@pytest.mark.gpu
def test_gpu_hook_ops_every_float16_value():
    """Every float16 bit pattern as g: every kind alone and a program of four, apply_ops's bits."""
    rng = np.random.default_rng(42)
    dtype = np.dtype(np.float16)
    hg = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    hparam, hnoise = rng.permutation(hg), rng.permutation(hg)
    programs = [([(kind, a)], hparam) for kind in ("weight_decay", "lasso", "scale")
                for a in (5e-4, -0.3, 2.5, 0.0, -0.0, 65504.0, 6e-8, math.inf, math.nan)]
    programs += [([("clip", lo, hi)], None) for lo, hi in
                 ((-1.0, 1.0), (None, 0.5), (-0.25, None), (math.nan, 1.0), (1.0, -1.0),
                  (0.0, -0.0), (-1e6, 1e6))]
    programs += [([("add", hnoise)], hnoise),
                 ([("weight_decay", 1e-4), ("lasso", 1e-3), ("clip", -2.0, 2.0),
                   ("scale", 0.75)], hparam)]
    problems = []
    for ops, hp in programs:
        want = hg.copy()
        cpu_hooks.apply_ops(want, hp, ops)
        g = cp.asarray(hg)
        cuda_launcher.hook_ops_gpu(g, None if hp is None else cp.asarray(hp),
                                   _hook_rows(dtype, ops))
        bad = _same_bits(cp.asnumpy(g), want)
        if bad.size:
            i = bad[0]
            problems.append("%s: %d elements differ (first: g=%r -> %r, want %r)"
                            % ([o[:1] + tuple(x for x in o[1:] if not hasattr(x, "shape"))
                                for o in ops], bad.size, hg[i], cp.asnumpy(g)[i], want[i]))
    assert not problems, problems[:5]


@needs_gpu
@pytest.mark.gpu
def test_gpu_sum_squares_matches_numpy(monkeypatch):
    """sum_squares_gpu: one launch per dtype, the float64 sum of squares to 1e-12."""
    counter = _LaunchCounter(monkeypatch)
    rng = np.random.default_rng(43)
    host = [rng.standard_normal(s).astype(np.float32) for s in (1, 255, 8193, 3_000_001)]
    host += [np.array(2.5, np.float32), np.zeros((0, 4), np.float32),
             (rng.standard_normal(100_003) * 10).astype(np.float16),
             rng.standard_normal(7) * 1e100, rng.standard_normal(500_000)]
    arrays = [cp.asarray(h) for h in host]
    for layout in ("F", "strided"):  # float32 (37, 53) in the other layouts
        host.append(rng.standard_normal((37, 53)).astype(np.float32))
        arrays.append(_layout(cp.asarray(host[-1]), layout))
    counter.take()
    got = cuda_launcher.sum_squares_gpu(arrays)
    want = math.fsum(float(v) for h in host for v in np.square(h.astype(np.float64)).ravel())
    assert abs(got - want) <= 1e-12 * want, (got, want)
    assert sorted(counter.take()) == sorted([
        (cuda_launcher.SUM_SQUARES_KERNEL_NAMES[np.dtype(np.float16)], 0),
        (cuda_launcher.SUM_SQUARES_MULTI_KERNEL_NAMES[np.dtype(np.float32)], 0),
        (cuda_launcher.SUM_SQUARES_MULTI_KERNEL_NAMES[np.dtype(np.float64)], 0)])
    assert abs(got - cpu_hooks.sum_squares(host)) <= 1e-12 * want
    x = cp.asarray(np.array([1.0, np.inf, 2.0], np.float32))
    assert cuda_launcher.sum_squares_gpu([x]) == math.inf
    assert cuda_launcher.sum_squares_gpu([]) == 0.0
