"""The GPU path: dispatch and errors without a GPU, real updates with one.

Tests marked ``gpu`` need CuPy and a CUDA device and skip cleanly otherwise
(run them on a GPU machine with ``python -m pytest -m gpu``).  The others run
everywhere: ``import cynag`` without CuPy, and the errors for mixed
host/device parameters, simulated with an object that looks like a CuPy array.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cynag
from cynag_kernels import cuda as cuda_launcher

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
    for name in cuda_launcher.KERNEL_NAMES.values():
        assert 'extern "C" __global__ void %s(' % name in src


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
