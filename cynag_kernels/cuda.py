"""GPU launcher: the CUDA sources ``nesterov_ag.cu`` and ``hooks.cu`` through CuPy's RawModule.

CuPy is imported only when a GPU update runs, so this module imports without
it.  The pieces that do not need a GPU are public so that the compilation
and emulation tests use exactly what the launcher uses:

* :func:`kernel_source` -- the source text: the files of :data:`SOURCE_FILES`
  one after the other, each after a ``#line`` directive so that compiler
  messages point at the file (read once);
* :data:`KERNEL_NAMES`, :data:`SCALAR_TYPES` -- entry point and C type of the
  ``lr``/``momentum`` arguments for each array dtype;
* :func:`nvrtc_options` -- the options the launcher passes to NVRTC;
* :func:`launch_config` -- grid and block for ``n`` elements on a device with
  ``sm_count`` multiprocessors;
* :func:`kernel_args` -- the argument tuple with exact C types
  (``numpy.float32`` for a ``float`` parameter, ``numpy.int64`` for a
  ``long long``: CuPy passes a Python float as a double, which a ``float``
  parameter would read as garbage).

:func:`nesterov_ag_gpu` runs the update, :class:`GPUTable` the multi-tensor
update, :func:`hook_ops_gpu` a program of hook operations (see
``cynag_kernels.hooks``) and :func:`sum_squares_gpu` a sum of squares: one
``RawModule`` per device holds every kernel, compiled at first use and cached
(CuPy also caches the binary on disk).
"""
import collections
import functools
import os

import numpy

from cynag_kernels.nesterov import SUPPORTED_DTYPES, check_nesterov_ag_arrays, \
    nesterov_ag_coefficients

_HERE = os.path.dirname(os.path.abspath(__file__))
#: The NesterovAG kernels.
SOURCE_FILE = os.path.join(_HERE, "nesterov_ag.cu")
#: The kernels of the optimizer hooks (operation programs, sums of squares).
HOOKS_SOURCE_FILE = os.path.join(_HERE, "hooks.cu")
#: The files of the module, in the order :func:`kernel_source` joins them.
SOURCE_FILES = (SOURCE_FILE, HOOKS_SOURCE_FILE)

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

#: Entry point of the hook operation kernel for each array dtype (``hooks.cu``).
HOOK_KERNEL_NAMES = {
    numpy.dtype(numpy.float16): "cynag_hook_ops_f16",
    numpy.dtype(numpy.float32): "cynag_hook_ops_f32",
    numpy.dtype(numpy.float64): "cynag_hook_ops_f64",
}

#: Entry point of the partial sum of squares of one array, per dtype (``hooks.cu``).
SUM_SQUARES_KERNEL_NAMES = {
    numpy.dtype(numpy.float16): "cynag_sum_squares_partial_f16",
    numpy.dtype(numpy.float32): "cynag_sum_squares_partial_f32",
    numpy.dtype(numpy.float64): "cynag_sum_squares_partial_f64",
}

#: Entry point of the partial sum of squares of a table of arrays, per dtype.
#: Entry point of the multi-tensor kernel with an operation program (folded
#: optimizer hooks) for each array dtype (in hooks.cu).
MULTI_OPS_KERNEL_NAMES = {
    numpy.dtype(numpy.float16): "cynag_nesterov_ag_multi_ops_f16",
    numpy.dtype(numpy.float32): "cynag_nesterov_ag_multi_ops_f32",
    numpy.dtype(numpy.float64): "cynag_nesterov_ag_multi_ops_f64",
}

SUM_SQUARES_MULTI_KERNEL_NAMES = {
    numpy.dtype(numpy.float16): "cynag_sum_squares_multi_partial_f16",
    numpy.dtype(numpy.float32): "cynag_sum_squares_multi_partial_f32",
    numpy.dtype(numpy.float64): "cynag_sum_squares_multi_partial_f64",
}

#: Threads per block.
BLOCK_SIZE = 256
#: Elements per work item of the multi-tensor kernel (a block's share).
MULTI_ITEM_ELEMENTS = 8192
#: Resident blocks per multiprocessor the grid is sized for (grid-stride loop beyond).
BLOCKS_PER_SM = 8


@functools.lru_cache(maxsize=None)
def kernel_source():
    """The CUDA source of the module, read once.

    The files of :data:`SOURCE_FILES` in order, each preceded by a ``#line 1``
    directive naming it (and ended by a newline), so that compiler messages
    point at the file and line where the code is.
    """
    parts = []
    for path in SOURCE_FILES:
        with open(path) as f:
            text = f.read()
        if not text.endswith("\n"):
            text += "\n"
        parts.append('#line 1 "%s"\n%s' % (path.replace("\\", "/"), text))
    return "".join(parts)


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
        ptrs: ``(n, 3)`` integer addresses of param, grad and v (``(n, 1)``
            for the sum of squares: see :func:`sum_squares_table`).
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

    def run(self, ops=None):
        """Update every tensor of the table once (one kernel launch).

        ``ops``: optional ``(n_ops, 4)`` float64 operation program (rows of
        :func:`cynag_kernels.hooks.gpu_row` for this dtype) run on every
        gradient element before its update, in the same launch (folded
        optimizer hooks, as :func:`hook_ops_gpu` would run them first).
        """
        if self.n_tensors == 0:
            return
        cupy = _cupy()
        args = (self._table, self._coef, numpy.int64(self.n_tensors), numpy.int64(self._n_items))
        try:
            with cupy.cuda.Device(self.device_id):
                if ops is None or len(ops) == 0:
                    self._kernel(self._grid, self._block, args)
                else:
                    rows = check_hook_rows(ops)
                    kernel = _kernel(cupy, self.device_id, self.dtype, MULTI_OPS_KERNEL_NAMES)
                    kernel(self._grid, self._block,
                           args + (device_rows(cupy, self.device_id, rows),
                                   numpy.int64(rows.shape[0])))
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


# ---------------------------------------------------------------------------
# Optimizer hooks: operation programs and sums of squares (hooks.cu)
# ---------------------------------------------------------------------------
#: Operation codes of the rows (those of ``_hook_ops.h`` and ``hooks.cu``).
HOOK_OP_CODES = {"weight_decay": 1, "lasso": 2, "clip": 3, "scale": 4, "add": 5}
#: Codes of the operations that read the second array (parameter or noise).
_READS_P = (1, 2, 5)
#: Operation programs kept on each device (see :func:`device_rows`).
ROWS_CACHE_SIZE = 64

_rows_cache = collections.OrderedDict()


def check_hook_rows(rows):
    """``rows`` as a C-contiguous ``(n_ops, 4)`` ``numpy.float64`` array, checked.

    Each row is ``(kind, a, b, flags)`` as :func:`cynag_kernels.hooks.op_row`
    builds it: ``kind`` one of :data:`HOOK_OP_CODES`, ``flags`` (clip) an
    integer from 0 to 3.  Raises ValueError otherwise.
    """
    table = numpy.ascontiguousarray(numpy.asarray(rows, numpy.float64))
    if table.size == 0:
        return table.reshape(0, 4)
    if table.ndim != 2 or table.shape[1] != 4:
        raise ValueError("hook operations: rows of 4 numbers (kind, a, b, flags) are needed, "
                         "got an array of shape %s" % (table.shape,))
    kinds, flags = table[:, 0], table[:, 3]
    bad = ~numpy.isin(kinds, list(HOOK_OP_CODES.values()))
    bad |= (kinds == HOOK_OP_CODES["clip"]) & ~numpy.isin(flags, (0.0, 1.0, 2.0, 3.0))
    if bad.any():
        k = int(numpy.flatnonzero(bad)[0])
        raise ValueError("hook operations: row %d (%s) has no valid kind and flags"
                         % (k, table[k].tolist()))
    return table


def device_rows(cupy, device_id, rows):
    """The checked ``rows`` in memory of device ``device_id`` (current device).

    The last :data:`ROWS_CACHE_SIZE` programs are kept, so that a program
    used at every step (a constant weight decay rate) is copied to the device
    once; the copies are never written.
    """
    key = (device_id, rows.tobytes())
    hit = _rows_cache.get(key)
    if hit is not None:
        try:
            _rows_cache.move_to_end(key)
        except KeyError:  # dropped by another thread meanwhile: still valid here
            pass
        return hit
    ops = cupy.asarray(rows)
    _rows_cache[key] = ops
    while len(_rows_cache) > ROWS_CACHE_SIZE:
        try:
            _rows_cache.popitem(last=False)
        except KeyError:
            break
    return ops


def _check_cupy_array(cupy, a, what):
    if not isinstance(a, cupy.ndarray):
        raise TypeError("%s must be a CuPy array, got %s" % (what, type(a).__name__))


def _ranges_meet(a, b):
    """Whether the memory of two contiguous arrays overlaps."""
    na, nb = a.size * a.itemsize, b.size * b.itemsize
    if not na or not nb:
        return False
    pa, pb = a.data.ptr, b.data.ptr
    return pa < pb + nb and pb < pa + na


def hook_ops_gpu(g, p, rows):
    """Apply a program of hook operations to the CuPy gradient ``g`` in place: one launch.

    Args:
        g: CuPy array (float16/32/64), any layout; updated in place.
        p: the array the rows read -- the parameter (weight decay, lasso) or
            the noise (add) -- of ``g``'s dtype, shape and device; ``None``
            if no row reads it (clip, scale only).
        rows: ``(n_ops, 4)`` float64 rows of :func:`cynag_kernels.hooks.op_row`
            (coefficients rounded to the dtype), applied in order.

    The rows are copied to the device (:func:`device_rows`) and the kernel
    ``HOOK_KERNEL_NAMES[dtype]`` runs once over all elements.  Arrays that
    are both C- or both F-contiguous are used in place; others through
    contiguous copies, ``g``'s written back.  A ``p`` whose memory overlaps
    ``g``'s is copied first (NumPy reads it before writing too).  Nothing is
    launched for an empty array or program.  float16 results are those of
    ``cynag_kernels.hooks.apply_ops``; float32/float64 agree with them to
    rounding (fused multiply-adds, see ``hooks.cu``).
    """
    cupy = _cupy()
    rows = check_hook_rows(rows)
    _check_cupy_array(cupy, g, "g")
    dtype = numpy.dtype(g.dtype)
    if dtype not in HOOK_KERNEL_NAMES:
        raise TypeError("hook operations need a float16, float32 or float64 gradient, got %s"
                        % dtype)
    if p is None:
        if numpy.isin(rows[:, 0], _READS_P).any():
            raise ValueError("hook operations: a row reads p (weight decay, lasso or add) but "
                             "p is None")
    else:
        _check_cupy_array(cupy, p, "p")
        if numpy.dtype(p.dtype) != dtype or p.shape != g.shape:
            raise ValueError("hook operations: p must have g's dtype %s and shape %s, got %s %s"
                             % (dtype, g.shape, p.dtype, p.shape))
        if p.device.id != g.device.id:
            raise ValueError("hook operations: g is on GPU %d but p is on GPU %d"
                             % (g.device.id, p.device.id))
    n = g.size
    if n == 0 or len(rows) == 0:
        return
    device_id = g.device.id
    try:
        with cupy.cuda.Device(device_id):
            arrays = (g,) if p is None else (g, p)
            order = None
            for o, flag in (("C", "c_contiguous"), ("F", "f_contiguous")):
                if all(getattr(a.flags, flag) for a in arrays):
                    order = o
                    break
            copied = False
            if order is not None:
                gc = g.ravel(order)
                pc = None if p is None else p.ravel(order)
            else:
                copied = not g.flags.c_contiguous
                gc = cupy.ascontiguousarray(g).ravel()
                pc = None if p is None else cupy.ascontiguousarray(p).ravel()
            if pc is not None and _ranges_meet(gc, pc):
                pc = pc.copy()
            ops = device_rows(cupy, device_id, rows)
            kernel = _kernel(cupy, device_id, dtype, HOOK_KERNEL_NAMES)
            grid, block = launch_config(n, _sm_count(cupy, device_id))
            kernel(grid, block, (gc, gc if pc is None else pc, numpy.int64(n), ops,
                                 numpy.int64(len(rows))))
            if copied:
                g[...] = gc.reshape(g.shape)
    except cupy.cuda.runtime.CUDARuntimeError as e:
        raise RuntimeError("CuPy could not use GPU %d: %s" % (device_id, e)) from e


def sum_squares_table(sizes, ptrs, item_elements=MULTI_ITEM_ELEMENTS):
    """``(table, n_items)`` of the multi-array sum of squares kernel.

    :func:`multi_table` with one address per array: ``ptrs[n]``, ``cum``,
    ``bounds``, ``first`` (see ``hooks.cu``).
    """
    return multi_table(sizes, numpy.asarray(ptrs, numpy.int64).reshape(-1, 1), item_elements)


def sum_squares_gpu(arrays):
    """Sum of the squares of the elements of CuPy arrays, as a Python float.

    The arrays (float16/32/64, any mix, any layout) must be on one device.
    One partial-sum launch per dtype present -- per table: the arrays of a
    dtype are read by ``SUM_SQUARES_MULTI_KERNEL_NAMES[dtype]`` through a
    table (:func:`sum_squares_table`) copied to the device, or, when a dtype
    has a single array, by ``SUM_SQUARES_KERNEL_NAMES[dtype]`` without one.
    Every square is computed in float64 (exact for float16 and float32) and
    added into the kernel's per-thread partial sums; the launches write into
    one float64 buffer, which ``cupy.sum`` then reduces in float64.  The
    additions are not in NumPy's order, so the result agrees with
    ``cynag_kernels.hooks.sum_squares`` to rounding, not bit for bit.

    C- and F-contiguous arrays are read in place (the sum does not depend
    on the element order), others through contiguous copies.  Empty arrays
    (and no arrays) add nothing and launch nothing.
    """
    cupy = _cupy()
    arrays = list(arrays)
    device_id = None
    groups = {}
    for i, a in enumerate(arrays):
        _check_cupy_array(cupy, a, "sum_squares: array %d" % i)
        dtype = numpy.dtype(a.dtype)
        if dtype not in SUM_SQUARES_KERNEL_NAMES:
            raise TypeError("sum_squares: float16, float32 or float64 arrays are needed, "
                            "array %d is %s" % (i, dtype))
        if device_id is None:
            device_id = a.device.id
        elif a.device.id != device_id:
            raise ValueError("sum_squares: array 0 is on GPU %d but array %d is on GPU %d"
                             % (device_id, i, a.device.id))
        if a.size:
            groups.setdefault(dtype, []).append(a)
    if not groups:
        return 0.0
    try:
        with cupy.cuda.Device(device_id):
            sm_count = _sm_count(cupy, device_id)
            launches = []
            total_threads = 0
            for dtype in sorted(groups, key=str):
                flat = []
                for a in groups[dtype]:
                    if a.flags.c_contiguous:
                        flat.append(a.ravel())
                    elif a.flags.f_contiguous:
                        flat.append(a.ravel("F"))
                    else:
                        flat.append(cupy.ascontiguousarray(a).ravel())
                if len(flat) == 1:
                    kernel = _kernel(cupy, device_id, dtype, SUM_SQUARES_KERNEL_NAMES)
                    grid, block = launch_config(flat[0].size, sm_count)
                    head = (flat[0], numpy.int64(flat[0].size))
                    tail = ()
                else:
                    table, n_items = sum_squares_table([a.size for a in flat],
                                                       [a.data.ptr for a in flat])
                    kernel = _kernel(cupy, device_id, dtype, SUM_SQUARES_MULTI_KERNEL_NAMES)
                    grid, block = multi_launch_config(n_items, sm_count)
                    head = (cupy.asarray(table),)
                    tail = (numpy.int64(len(flat)), numpy.int64(n_items))
                threads = grid[0] * block[0]
                launches.append((kernel, grid, block, head, tail, total_threads, threads, flat))
                total_threads += threads
            partial = cupy.empty(total_threads, numpy.float64)
            for kernel, grid, block, head, tail, start, threads, _ in launches:
                kernel(grid, block, head + (partial[start:start + threads],) + tail)
            return float(cupy.sum(partial))
    except cupy.cuda.runtime.CUDARuntimeError as e:
        raise RuntimeError("CuPy could not use GPU %d: %s" % (device_id, e)) from e
