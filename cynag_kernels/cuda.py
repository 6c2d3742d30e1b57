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

#: Entry point of the multi-tensor kernel for each array dtype.
MULTI_KERNEL_NAMES = {
    numpy.dtype(numpy.float16): "cynag_nesterov_ag_multi_f16",
    numpy.dtype(numpy.float32): "cynag_nesterov_ag_multi_f32",
    numpy.dtype(numpy.float64): "cynag_nesterov_ag_multi_f64",
}

#: Threads per block.
BLOCK_SIZE = 256
#: Elements per work item of the multi-tensor kernel (a block's share).
MULTI_ITEM_ELEMENTS = 8192
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


def _kernel(cupy, device_id, dtype, names=KERNEL_NAMES):
    module = _modules.get(device_id)
    if module is None:
        module = cupy.RawModule(code=kernel_source(), options=nvrtc_options())
        _modules[device_id] = module
    return module.get_function(names[dtype])


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


# ---------------------------------------------------------------------------
# Multi-tensor update: one launch per (device, dtype) group
# ---------------------------------------------------------------------------
def multi_table(sizes, ptrs, item_elements=MULTI_ITEM_ELEMENTS):
    """The int64 table of the multi-tensor kernel, and the number of work items.

    Args:
        sizes: element count of each tensor (none of them 0).
        ptrs: ``(n, 3)`` integer addresses of param, grad and v.
        item_elements: elements per work item.

    Returns:
        ``(table, n_items)``: ``table`` is a 1-d ``numpy.int64`` array laid
        out as the kernel reads it (ptrs, cum, bounds, first; see
        ``nesterov_ag.cu``).
    """
    sizes = numpy.asarray(sizes, numpy.int64)
    n = len(sizes)
    cum = numpy.zeros(n + 1, numpy.int64)
    numpy.cumsum(sizes, out=cum[1:])
    total = int(cum[-1])
    n_items = max(1, -(-total // item_elements))
    bounds = numpy.minimum(numpy.arange(n_items + 1, dtype=numpy.int64) * item_elements, total)
    first = numpy.searchsorted(cum, bounds[:-1], side="right") - 1
    table = numpy.concatenate([numpy.asarray(ptrs, numpy.int64).reshape(-1), cum, bounds,
                               first.astype(numpy.int64)])
    return table, n_items


def multi_launch_config(n_items, sm_count, block=BLOCK_SIZE):
    """``(grid, block)`` of the multi-tensor kernel: one block per work item, capped."""
    if n_items < 0 or sm_count < 1 or block < 1:
        raise ValueError("multi_launch_config: need n_items >= 0, sm_count >= 1, block >= 1")
    return (max(1, min(int(n_items), sm_count * BLOCKS_PER_SM)),), (int(block),)


def multi_coefficients(dtype, lr, momentum, loss_scale=None):
    """``(coef, ok)``: the ``(n, 4)`` coefficients of the multi-tensor kernel.

    lr and momentum are rounded as :func:`kernel_args` rounds them for the
    single-tensor kernel; the loss scale to the array dtype (as CuPy's
    ``grad /= loss_scale`` does), then all are held in the kernel's scalar
    type.  ``ok`` is false where a value is not a Python float (or a loss
    scale not a float or an int of at most 2**53) or a finite value
    overflows the array dtype.
    """
    dtype = numpy.dtype(dtype)
    scalar = SCALAR_TYPES[dtype]
    stored = dtype.type
    n = len(lr)
    ok = numpy.ones(n, bool)
    raw = numpy.zeros((n, 4), numpy.float64)
    for i, (a, m) in enumerate(zip(lr, momentum)):
        if type(a) is not float or type(m) is not float:
            ok[i] = False
            continue
        raw[i, 0], raw[i, 1] = a, m
        s = None if loss_scale is None else loss_scale[i]
        if type(s) is int and -2 ** 53 <= s <= 2 ** 53:
            s = float(s)
        if s is not None:
            if type(s) is not float:
                ok[i] = False
                continue
            raw[i, 2], raw[i, 3] = s, 1.0
    with numpy.errstate(all="ignore"):
        rounded = raw[:, :3].astype(stored)
    ok &= ~(numpy.isinf(rounded) & numpy.isfinite(raw[:, :3])).any(axis=1)
    coef = numpy.empty((n, 4), scalar)
    coef[:, :3] = rounded
    coef[:, 3] = raw[:, 3]
    return numpy.ascontiguousarray(coef), ok


class GPUTable:
    """One NesterovAG step over many CuPy arrays of one device and dtype: one launch.

    The arguments mirror :class:`cynag_kernels.multi_tensor.CPUTable`:
    ``params``, ``grads`` and ``vs`` are lists of CuPy arrays; ``lr`` and
    ``momentum`` Python floats or lists of them; ``loss_scale`` ``None``, a
    scalar or a list.  An entry qualifies when its three arrays are on the
    device of the first, of one supported dtype and shape, all C- or all
    F-contiguous, pairwise disjoint and disjoint from every other entry's,
    and its coefficients fit the dtype; with ``strict=False`` the others are
    listed in :attr:`excluded` instead of raising.

    The table is built on the host and copied to the device once (and again
    only when the table is rebuilt); :meth:`run` is a single kernel launch,
    whatever the number of tensors.

    An empty table (no entries) is valid and :meth:`run` does nothing.

    Attributes:
        device_id (int), dtype, n_tensors, n_elements, excluded (list of int);
        ``device_id`` and ``dtype`` are ``None`` for an empty table.
    """

    def __init__(self, params, grads, vs, lr, momentum, loss_scale=None, strict=True):
        cupy = _cupy()
        params, grads, vs = list(params), list(grads), list(vs)
        n = len(params)
        if len(grads) != n or len(vs) != n:
            raise ValueError("params, grads and vs must have the same length")
        if not n:
            # As CPUTable: the plan builds a table over the entries whose
            # gradients exist, which may be none of them (all cleared).
            self.device_id = self.dtype = None
            self.excluded = []
            self.n_tensors = self.n_elements = self._n_items = 0
            self._arrays = ([], [], [])
            self._values = ([], [], None)
            return
        first = params[0]
        self.device_id = first.device.id
        self.dtype = numpy.dtype(first.dtype)
        if self.dtype not in MULTI_KERNEL_NAMES:
            raise TypeError("GPUTable: unsupported dtype %s" % (self.dtype,))

        def per(x, name):
            if isinstance(x, (list, tuple)):
                if len(x) != n:
                    raise ValueError("%s has %d entries for %d tensors" % (name, len(x), n))
                return list(x)
            return [x] * n

        coef, ok = multi_coefficients(self.dtype, per(lr, "lr"), per(momentum, "momentum"),
                                      None if loss_scale is None else per(loss_scale, "loss_scale"))
        ptrs = numpy.zeros((n, 3), numpy.int64)
        sizes = numpy.zeros(n, numpy.int64)
        for i, arrays in enumerate(zip(params, grads, vs)):
            if not ok[i] or not _multi_entry_ok(arrays, self.device_id, self.dtype):
                ok[i] = False
                continue
            ptrs[i] = [a.data.ptr for a in arrays]
            sizes[i] = arrays[0].size
        ok &= ~_ranges_overlap(ptrs, sizes * self.dtype.itemsize, ok)
        excluded = numpy.flatnonzero(~ok)
        if strict and len(excluded):
            raise ValueError(
                "GPUTable: entry %d cannot be updated by the multi-tensor kernel (arrays not "
                "contiguous, on another device, of another dtype than %s, overlapping another "
                "entry, or coefficients beyond the dtype)" % (excluded[0], self.dtype))
        self.excluded = excluded.tolist()
        self._excluded_set = frozenset(self.excluded)
        keep = ok & (sizes > 0)
        self.n_tensors = int(keep.sum())
        self.n_elements = int(sizes[keep].sum())
        self._arrays = (params, grads, vs)  # keep the memory alive
        self._values = (lr, momentum, loss_scale)
        self._n_items = 0
        if self.n_tensors == 0:
            return
        table, self._n_items = multi_table(sizes[keep], ptrs[keep])
        try:
            with cupy.cuda.Device(self.device_id):
                self._table = cupy.asarray(table)
                self._coef = cupy.asarray(numpy.ascontiguousarray(coef[keep].reshape(-1)))
                self._kernel = _kernel(cupy, self.device_id, self.dtype, MULTI_KERNEL_NAMES)
                self._grid, self._block = multi_launch_config(
                    self._n_items, _sm_count(cupy, self.device_id))
        except cupy.cuda.runtime.CUDARuntimeError as e:
            raise RuntimeError("CuPy could not use GPU %d: %s" % (self.device_id, e)) from e

    def run(self):
        """Update every tensor of the table once (one kernel launch)."""
        if self.n_tensors == 0:
            return
        cupy = _cupy()
        args = (self._table, self._coef, numpy.int64(self.n_tensors), numpy.int64(self._n_items))
        try:
            with cupy.cuda.Device(self.device_id):
                self._kernel(self._grid, self._block, args)
        except cupy.cuda.runtime.CUDARuntimeError as e:
            raise RuntimeError("CuPy could not use GPU %d: %s" % (self.device_id, e)) from e

    def with_grads(self, grads):
        """A table for the same entries with new gradient arrays (``strict=False``)."""
        params, _, vs = self._arrays
        return GPUTable(params, grads, vs, *self._values, strict=False)

    def verify(self):
        """True if every array still has the shape and contiguity the table found.

        (CuPy arrays cannot be made read-only.)
        """
        params, grads, vs = self._arrays
        for i in range(len(params)):
            if i in self._excluded_set:
                continue
            if not _multi_entry_ok((params[i], grads[i], vs[i]), self.device_id, self.dtype):
                return False
        return True

    def __len__(self):
        return self.n_tensors

    def __reduce__(self):
        raise TypeError("a GPUTable holds device addresses and cannot be copied or pickled")


def _multi_entry_ok(arrays, device_id, dtype):
    p = arrays[0]
    for a in arrays:
        if type(a) is not type(p) or a.device.id != device_id or a.dtype != dtype \
                or a.shape != p.shape:
            return False
    for flag in ("c_contiguous", "f_contiguous"):
        if all(getattr(a.flags, flag) for a in arrays):
            break
    else:
        return False
    nbytes = p.size * dtype.itemsize
    if not nbytes:
        return True
    starts = sorted(a.data.ptr for a in arrays)
    return all(b >= a + nbytes for a, b in zip(starts, starts[1:]))


def _ranges_overlap(ptrs, nbytes, ok):
    """Entries whose ranges overlap another entry's (see multi_tensor._overlapping)."""
    from cynag_kernels.multi_tensor import _overlapping

    return _overlapping(ptrs, nbytes, ok)
