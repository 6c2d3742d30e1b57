"""GPU launcher: the CUDA source of ``nesterov_ag.cu`` through CuPy's RawModule.

CuPy is imported only when a GPU update runs, so this module imports without
it.  The pieces that do not need a GPU are public so that the compilation
and emulation tests use exactly what the launcher uses:

* :func:`kernel_source` -- the source text (read once, ``#line`` prepended so
  compiler messages point at the file);
* :data:`KERNEL_NAMES`, :data:`SCALAR_TYPES` -- entry point and C type of the
  ``lr``/``momentum`` arguments for each array dtype;
* :func:`nvrtc_options` -- the options the launcher passes to NVRTC;
* :func:`launch_config` -- grid and block for ``n`` elements on a device with
  ``sm_count`` multiprocessors;
* :func:`kernel_args` -- the argument tuple with exact C types
  (``numpy.float32`` for a ``float`` parameter, ``numpy.int64`` for a
  ``long long``: CuPy passes a Python float as a double, which a ``float``
  parameter would read as garbage).

:func:`nesterov_ag_gpu` runs the update: one ``RawModule`` per device,
compiled at first use and cached (CuPy also caches the binary on disk).
"""
import functools
import os

import numpy

from cynag_kernels.nesterov import SUPPORTED_DTYPES, check_nesterov_ag_arrays, \
    nesterov_ag_coefficients

SOURCE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nesterov_ag.cu")

#: Entry point of the kernel for each array dtype.
KERNEL_NAMES = {
    numpy.dtype(numpy.float16): "cynag_nesterov_ag_f16",
    numpy.dtype(numpy.float32): "cynag_nesterov_ag_f32",
    numpy.dtype(numpy.float64): "cynag_nesterov_ag_f64",
}

#: NumPy type of the kernel's ``lr`` and ``momentum`` parameters per array dtype.
SCALAR_TYPES = {
    numpy.dtype(numpy.float16): numpy.float32,
    numpy.dtype(numpy.float32): numpy.float32,
    numpy.dtype(numpy.float64): numpy.float64,
}

#: Threads per block.
BLOCK_SIZE = 256
#: Resident blocks per multiprocessor the grid is sized for (grid-stride loop beyond).
BLOCKS_PER_SM = 8


@functools.lru_cache(maxsize=None)
def kernel_source():
    """The CUDA source, read once, with a ``#line`` directive naming the file."""
    with open(SOURCE_FILE) as f:
        text = f.read()
    return '#line 1 "%s"\n%s' % (SOURCE_FILE.replace("\\", "/"), text)


def nvrtc_options():
    """Options passed to NVRTC (CuPy adds the architecture and its include paths)."""
    return ("--std=c++11",)


def launch_config(n, sm_count, block=BLOCK_SIZE):
    """``(grid, block)`` tuples for ``n`` elements on ``sm_count`` multiprocessors.

    One thread per element up to ``BLOCKS_PER_SM`` blocks per
    multiprocessor; the kernel's grid-stride loop covers the rest.
    """
    if n < 0 or sm_count < 1 or block < 1:
        raise ValueError("launch_config: need n >= 0, sm_count >= 1, block >= 1")
    blocks = min((n + block - 1) // block, sm_count * BLOCKS_PER_SM)
    return (max(int(blocks), 1),), (int(block),)


def kernel_args(param, grad, v, lr, momentum):
    """Argument tuple of the kernel for these (contiguous) arrays.

    ``(param, grad, v, lr, momentum, n)`` with ``lr`` and ``momentum``
    rounded as Chainer's kernel receives them (see
    :func:`cynag_kernels.nesterov_ag_coefficients` with ``device='gpu'``) and
    typed as the kernel's C parameters, and ``n`` a ``numpy.int64``.
    """
    dtype = numpy.dtype(param.dtype)
    scalar = SCALAR_TYPES[dtype]
    lr_c, m_c = nesterov_ag_coefficients(lr, momentum, dtype, device="gpu")
    return (param, grad, v, scalar(lr_c), scalar(m_c), numpy.int64(param.size))


_modules = {}
_sm_counts = {}


def _cupy():
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - a CuPy array implies CuPy
        raise RuntimeError("the GPU path needs CuPy (pip install 'cynag[cuda12]' or "
                           "'cynag[cuda13]')") from e
    return cupy


def _kernel(cupy, device_id, dtype):
    module = _modules.get(device_id)
    if module is None:
        module = cupy.RawModule(code=kernel_source(), options=nvrtc_options())
        _modules[device_id] = module
    return module.get_function(KERNEL_NAMES[dtype])


def _sm_count(cupy, device_id):
    n = _sm_counts.get(device_id)
    if n is None:
        n = cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]
        _sm_counts[device_id] = n
    return n


def nesterov_ag_gpu(param, grad, v, lr, momentum):
    """One NesterovAG step on CuPy arrays, in place, on their device.

    The three arrays must be on one device; C- or F-contiguous arrays of one
    layout are updated directly, others through contiguous copies that are
    written back (RawKernel ignores strides).
    """
    cupy = _cupy()
    check_nesterov_ag_arrays(param, grad, v, xp=cupy)
    if param.dtype not in SUPPORTED_DTYPES:  # pragma: no cover - checked above
        raise TypeError("unsupported dtype %s" % param.dtype)
    device_id = param.device.id
    for name, a in (("grad", grad), ("v", v)):
        if a.device.id != device_id:
            raise ValueError("param is on GPU %d but %s is on GPU %d"
                             % (device_id, name, a.device.id))
    n = param.size
    if n == 0:
        return
    try:
        with cupy.cuda.Device(device_id):
            order = None
            for o, flag in (("C", "c_contiguous"), ("F", "f_contiguous")):
                if all(getattr(a.flags, flag) for a in (param, grad, v)):
                    order = o
                    break
            if order is not None:
                p, g, vv = (a.ravel(order) for a in (param, grad, v))
            else:
                p, g, vv = (cupy.ascontiguousarray(a).ravel() for a in (param, grad, v))
            kernel = _kernel(cupy, device_id, param.dtype)
            grid, block = launch_config(n, _sm_count(cupy, device_id))
            kernel(grid, block, kernel_args(p, g, vv, lr, momentum))
            if order is None:
                param[...] = p.reshape(param.shape)
                v[...] = vv.reshape(v.shape)
    except cupy.cuda.runtime.CUDARuntimeError as e:
        raise RuntimeError("CuPy could not use GPU %d: %s" % (device_id, e)) from e
