"""Multi-tensor NesterovAG: one native call updates many arrays of one dtype.

A :class:`CPUTable` holds, for a list of tensors, the addresses of
``param``, ``grad`` and ``v``, the element counts and the per-tensor
coefficients (learning rate, momentum, their products and an optional loss
scale), plus the split of the concatenated elements into balanced work
items.  :meth:`CPUTable.run` then updates every tensor with one Cython call
and one OpenMP parallel region: chunks of tensors, so that one large tensor
and many small ones both spread over the threads.  The arithmetic is the one
of :func:`cynag_kernels.nesterov_ag_cpu` (same coefficients, same order), so
results are bit-identical to updating the tensors one by one.

Like the rest of :mod:`cynag_kernels` this knows arrays and scalars only.
The table keeps references to the arrays it points into; the caller rebuilds
it when an array is replaced.
"""
import numpy

from cynag_kernels import _nesterov_cpu
from cynag_kernels.threads import threads_for

# Columns of the coefficient table (see _nesterov_cpu.nesterov_ag_multi).
_LR, _M, _MM, _C, _LS, _HAS_LS = range(6)
N_COEF = 6

_TYPE_NUMS = {
    numpy.dtype(numpy.float16): 23,  # NPY_HALF
    numpy.dtype(numpy.float32): 11,  # NPY_FLOAT
    numpy.dtype(numpy.float64): 12,  # NPY_DOUBLE
}
for _dt, _num in _TYPE_NUMS.items():  # guard against a NumPy renumbering
    assert _dt.num == _num
del _dt, _num

#: Work items per thread: a little slack for uneven per-tensor overheads.
ITEMS_PER_THREAD = 2
#: Work item boundaries are multiples of this many elements (64 bytes of float32).
ITEM_ALIGN = 16


def _per_tensor(value, n, name):
    """``value`` (a scalar or a sequence of ``n`` scalars) as a list of ``n``."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError("%s has %d entries for %d tensors" % (name, len(value), n))
        return list(value)
    return [value] * n


def coefficient_table(dtype, lr, momentum, loss_scale=None):
    """Per-tensor coefficients for arrays of ``dtype``, and which ones the kernel takes.

    Args:
        dtype: the arrays' dtype (float16, float32 or float64).
        lr, momentum: sequences of Python floats (one per tensor).
        loss_scale: ``None`` or a sequence with ``None`` (no scaling) or a
            Python float/int per tensor.

    Returns:
        ``(coef, ok)``: a ``(n, 6)`` float64 array (lr, momentum, mm, c, loss
        scale, loss-scale flag), rounded exactly as
        :func:`cynag_kernels.nesterov_ag_coefficients` rounds Python floats
        (``mm = m * m`` and ``c = (1 + m) * lr`` in double precision, then
        rounded once to the compute type), and a boolean mask of the tensors
        the kernel can update this way.  Excluded: a coefficient or loss
        scale that is finite but overflows the compute type (NumPy 1.x would
        then compute in float64), a loss scale that is not a float or an
        int of at most 2**53.  The rule is written once, in C
        (``_nag_coef.h``), and shared with the optimizer's step table.
    """
    dtype = numpy.dtype(dtype)
    n = len(lr)
    coef = numpy.zeros((n, N_COEF), numpy.float64)
    ok = numpy.ones(n, numpy.uint8)
    _nesterov_cpu.coefficient_rows(_TYPE_NUMS[dtype], list(lr), list(momentum),
                                   None if loss_scale is None else list(loss_scale), coef, ok)
    return coef, ok.view(bool)


def run_selected_rows(ptrs, sizes, coef, mask, select, type_nums, type_num, lo, hi, scratch,
                      num_threads=None, ops=None):
    """One step over the rows of a prepared table, without copying the table.

    Updates the rows ``i`` in ``[lo, hi)`` with ``mask[i] == select`` and
    ``type_nums[i] == type_num`` (arrays as :meth:`CPUTable.from_rows` takes
    them, already checked by the caller), adjacent runs merged, in one
    native call.  ``scratch``: ``(ptrs, cum, coef)`` arrays with room for
    every row (kept by the caller from step to step).  Returns the number of
    elements updated.
    """
    out_ptrs, out_cum, out_coef = scratch
    m = _nesterov_cpu.compact_selected_rows(ptrs, sizes, coef, mask, select, type_nums,
                                            type_num, lo, hi, out_ptrs, out_cum, out_coef)
    if not m:
        return 0
    total = int(out_cum[m])
    k = threads_for(total) if num_threads is None else max(1, int(num_threads))
    _nesterov_cpu.nesterov_ag_compacted(out_ptrs, out_cum, out_coef, m, type_num, k,
                                        ITEMS_PER_THREAD, ITEM_ALIGN, ops)
    return total


def run_addresses(ptrs, sizes, coef_row, type_num, num_threads=None, ops=None,
                  keep_grads=False):
    """One step over tensors given by their addresses, all with the coefficients ``coef_row``.

    ``ptrs``: ``(n, 3)`` C-contiguous int64 (param, grad, v), ``sizes``:
    ``(n,)`` int64, ``coef_row``: one row of :func:`coefficient_table`, or
    an ``(n, 6)`` table of them (one row per tensor); the tensors as
    :meth:`CPUTable.from_rows` takes them (checked by the caller, disjoint,
    kept alive).  No compaction: one native call.  ``keep_grads``: ``ops``
    act on copies of the gradients, which are only read.  Returns the
    number of elements updated.
    """
    n = len(sizes)
    if n == 0:
        return 0
    cum = numpy.zeros(n + 1, numpy.int64)
    numpy.cumsum(sizes, out=cum[1:])
    total = int(cum[n])
    coef = numpy.asarray(coef_row, numpy.float64)
    if coef.ndim == 1:
        coef = numpy.repeat(coef.reshape(1, N_COEF), n, axis=0)
    elif coef.shape != (n, N_COEF):
        raise ValueError("run_addresses: coef must be one row or one row per tensor")
    else:
        coef = numpy.ascontiguousarray(coef)
    k = threads_for(total) if num_threads is None else max(1, int(num_threads))
    _nesterov_cpu.nesterov_ag_compacted(ptrs, cum, coef, n, type_num, k, ITEMS_PER_THREAD,
                                        ITEM_ALIGN, ops, keep_grads)
    return total


class CPUTable:
    """One NesterovAG step over many NumPy arrays of one dtype, in one native call.

    Args:
        params, grads, vs: lists of NumPy arrays (one entry per tensor).
        lr, momentum: Python floats, or lists of them (one per tensor).
        loss_scale: ``None``, a scalar, or a list with ``None`` or a scalar
            per tensor: the gradient of such a tensor is divided by it in
            place before the update (Chainer's loss scaling).
        strict (bool): if true (default) an entry that cannot be updated by
            the multi-tensor kernel raises ``ValueError`` naming its index;
            otherwise it is left out and listed in :attr:`excluded`.

    An entry qualifies when its arrays take the dense path of
    :func:`cynag_kernels.nesterov_ag_cpu` (same dtype and shape, all C- or
    all F-contiguous, aligned, native byte order, ``param`` and ``v``
    writeable, pairwise disjoint), its coefficients fit the compute type, a
    gradient to be divided by a loss scale is writeable, and its arrays
    overlap no other entry's.  Entries adjacent in memory (``param``,
    ``grad`` and ``v`` each continuing the previous entry's, same
    coefficients), as in contiguous mode, are merged into one.

    Attributes:
        dtype: the arrays' dtype.
        n_tensors (int): entries in the table (after exclusion and merging).
        n_elements (int): elements updated by :meth:`run`.
        excluded (list of int): indices of the entries left out.
    """

    def __init__(self, params, grads, vs, lr, momentum, loss_scale=None, strict=True):
        params, grads, vs = list(params), list(grads), list(vs)
        n = len(params)
        if len(grads) != n or len(vs) != n:
            raise ValueError("params, grads and vs must have the same length")
        dtype = None
        for a in params:
            if isinstance(a, numpy.ndarray):
                dtype = a.dtype
                break
        if dtype is None and n:
            raise TypeError("CPUTable takes NumPy arrays")
        self.dtype = numpy.dtype(numpy.float32) if dtype is None else dtype
        type_num = _TYPE_NUMS.get(self.dtype)
        if type_num is None:
            raise TypeError("CPUTable: unsupported dtype %s" % (self.dtype,))
        for name, value in (("lr", lr), ("momentum", momentum)):
            values = value if isinstance(value, (list, tuple)) else (value,)
            if set(map(type, values)) - {float}:
                bad = next(x for x in values if type(x) is not float)
                raise TypeError("CPUTable: %s must be Python floats, got %r" % (name, bad))
        lr = _per_tensor(lr, n, "lr")
        momentum = _per_tensor(momentum, n, "momentum")
        scales = None if loss_scale is None else _per_tensor(loss_scale, n, "loss_scale")
        self._type_num = type_num
        self._coef_all, self._coef_ok = coefficient_table(self.dtype, lr, momentum, scales)
        self._finish(params, grads, vs, strict)

    def _finish(self, params, grads, vs, strict):
        """Read the addresses, check the entries, merge and lay out the table."""
        n = len(params)
        ptrs = numpy.empty((n, 3), numpy.int64)
        sizes = numpy.empty(n, numpy.int64)
        ok8 = numpy.empty(n, numpy.uint8)
        _nesterov_cpu.multi_pointers(params, grads, vs, self._type_num, ptrs, sizes, ok8)
        ok = ok8.view(bool)
        coef = self._coef_all
        ok &= self._coef_ok
        scaled = coef[:, _HAS_LS] != 0
        if scaled.any():
            for i in numpy.flatnonzero(scaled & ok):
                if not grads[i].flags.writeable:
                    ok[i] = False  # the gradient is divided in place
        ok &= ~_overlapping(ptrs, sizes * self.dtype.itemsize, ok)
        excluded = numpy.flatnonzero(~ok)
        if strict and len(excluded):
            raise ValueError(
                "CPUTable: entry %d cannot be updated by the multi-tensor kernel (arrays "
                "not dense, of another dtype than %s, overlapping another entry, or "
                "coefficients beyond the compute type)" % (excluded[0], self.dtype))
        self.excluded = excluded.tolist()
        # What verify() compares against: every entry as it was checked.
        self._entry_ptrs, self._entry_sizes = ptrs, sizes
        self._entry_scaled = numpy.ascontiguousarray(scaled, dtype=numpy.uint8)
        self._entry_ok = ok
        keep = ok & (sizes > 0)
        ptrs, sizes, coef = ptrs[keep], sizes[keep], coef[keep]
        ptrs, sizes, coef = _merge_adjacent(ptrs, sizes, coef, self.dtype.itemsize)
        self._ptrs = numpy.ascontiguousarray(ptrs)
        self._coef = numpy.ascontiguousarray(coef)
        self._cum = numpy.zeros(len(sizes) + 1, numpy.int64)
        numpy.cumsum(sizes, out=self._cum[1:])
        self._scaled = bool(self._coef[:, _HAS_LS].any())
        self._items = {}
        # Keep the arrays alive while the table points into them.
        self._arrays = (params, grads, vs)
        self.n_tensors = len(sizes)
        self.n_elements = int(self._cum[-1])

    @classmethod
    def from_rows(cls, ptrs, sizes, coef, dtype, keep=None):
        """A table over rows that were already checked (e.g. by ``cynag._step``).

        Args:
            ptrs: ``(n, 3)`` int64 addresses of param, grad and v (dense,
                disjoint, aligned, of ``dtype``; param, v and a loss-scaled
                grad writeable).
            sizes: ``(n,)`` int64 element counts.
            coef: ``(n, 6)`` float64 coefficient rows, as
                :func:`coefficient_table` makes them.
            dtype: the arrays' dtype.
            keep: the arrays (kept alive while the table points into them).

        Nothing is checked here: the caller vouches for the rows.
        """
        table = object.__new__(cls)
        table.dtype = numpy.dtype(dtype)
        table._type_num = _TYPE_NUMS[table.dtype]
        table.excluded = []
        n = len(sizes)
        out_ptrs = numpy.empty((n, 3), numpy.int64)
        out_coef = numpy.empty((n, N_COEF), numpy.float64)
        cum = numpy.empty(n + 1, numpy.int64)
        m = _nesterov_cpu.compact_rows(
            numpy.ascontiguousarray(ptrs, numpy.int64), numpy.ascontiguousarray(sizes, numpy.int64),
            numpy.ascontiguousarray(coef, numpy.float64), table.dtype.itemsize,
            out_ptrs, cum, out_coef)
        table._ptrs = out_ptrs[:m]
        table._coef = out_coef[:m]
        table._cum = cum[:m + 1]
        sizes = table._cum[1:]
        table._scaled = bool(table._coef[:, _HAS_LS].any()) if m else False
        table._items = {}
        table._arrays = keep
        table.n_tensors = len(sizes)
        table.n_elements = int(table._cum[-1])
        return table

    def with_grads(self, grads):
        """A table for the same entries with new gradient arrays.

        Reuses the coefficients; reads the new gradients' addresses and
        checks them as the constructor does (``strict=False``: entries
        whose new gradient does not qualify are listed in ``excluded``).
        Costs one pass over the array headers and a few vectorized steps,
        not a Python call per entry.
        """
        params, _, vs = self._arrays
        grads = list(grads)
        if len(grads) != len(params):
            raise ValueError("with_grads: %d gradients for %d entries" % (len(grads), len(params)))
        table = object.__new__(CPUTable)
        table.dtype = self.dtype
        table._type_num = self._type_num
        table._coef_all = self._coef_all
        table._coef_ok = self._coef_ok
        table._finish(params, grads, vs, strict=False)
        return table

    def work_items(self, n_threads):
        """``(bounds, first)``: the split of the elements for ``n_threads`` threads."""
        items = self._items.get(n_threads)
        if items is None:
            total = self.n_elements
            k = 1 if n_threads <= 1 else n_threads * ITEMS_PER_THREAD
            k = max(1, min(k, -(-total // ITEM_ALIGN)))
            bounds = (numpy.arange(k + 1, dtype=numpy.int64) * total) // k
            bounds[1:-1] -= bounds[1:-1] % ITEM_ALIGN
            bounds = numpy.unique(bounds)
            if len(bounds) < 2:
                bounds = numpy.array([0, total], numpy.int64)
            first = numpy.searchsorted(self._cum, bounds[:-1], side="right") - 1
            items = (bounds, numpy.ascontiguousarray(first, dtype=numpy.int64))
            self._items[n_threads] = items
        return items

    def run(self, num_threads=None, ops=None):
        """Update every tensor of the table once.

        Args:
            num_threads (int or None): threads to use; ``None`` follows
                :func:`cynag_kernels.threads.threads_for` for the total
                number of elements (one thread below the parallel threshold).
            ops: optional ``(n_ops, 4)`` float64 program of hook operations
                (rows from :func:`cynag_kernels.hooks.op_row` for this
                table's dtype) applied to every gradient before the update,
                in the same pass: the result equals running
                :func:`cynag_kernels.hooks.apply_ops` on each gradient first.
        """
        if self.n_tensors == 0:
            return
        k = threads_for(self.n_elements) if num_threads is None else max(1, int(num_threads))
        bounds, first = self.work_items(k)
        _nesterov_cpu.nesterov_ag_multi(self._ptrs, self._cum, self._coef, bounds, first,
                                        self._type_num, k, ops)

    def verify(self):
        """True if every array is still as the table found it.

        NumPy arrays can change in place after the table was built (made
        read-only, reshaped, given other strides): one pass over the array
        headers, a few nanoseconds per array, tells.  Callers check this
        before :meth:`run`; excluded entries are not looked at.
        """
        params, grads, vs = self._arrays
        if self.excluded:
            keep = numpy.flatnonzero(self._entry_ok)
            params, grads, vs = ([a[i] for i in keep] for a in (params, grads, vs))
            return _nesterov_cpu.multi_verify(
                params, grads, vs, self._type_num, self._entry_ptrs[keep],
                self._entry_sizes[keep], self._entry_scaled[keep])
        return _nesterov_cpu.multi_verify(params, grads, vs, self._type_num, self._entry_ptrs,
                                          self._entry_sizes, self._entry_scaled)

    def entry_bounds(self):
        """``(lo, hi)`` byte ranges of the arrays of the included entries (3 per entry)."""
        keep = self._entry_ok & (self._entry_sizes > 0)
        lo = self._entry_ptrs[keep]
        hi = lo + (self._entry_sizes[keep] * self.dtype.itemsize)[:, None]
        return lo, hi, numpy.flatnonzero(keep)

    def __len__(self):
        return self.n_tensors

    def __reduce__(self):
        raise TypeError("a CPUTable holds addresses of arrays and cannot be copied or "
                        "pickled; build a new one")


def shared_rows(ptrs, nbytes):
    """Mask of the rows of an address table whose arrays are not all disjoint.

    ``ptrs``: ``(n, 3)`` int64 addresses (param, grad, v), ``nbytes``: the
    bytes of each row's arrays.  A row is marked if two of its own arrays
    overlap, or one of them overlaps an array of another row.
    """
    p, g, v = ptrs[:, 0], ptrs[:, 1], ptrs[:, 2]
    own = (((p + nbytes <= g) | (g + nbytes <= p)) & ((p + nbytes <= v) | (v + nbytes <= p))
           & ((g + nbytes <= v) | (v + nbytes <= g))) | (nbytes == 0)
    return _overlapping(ptrs, nbytes, own.copy()) | ~own


def _overlapping(ptrs, nbytes, ok):
    """Mask of the entries whose arrays overlap an array of another entry.

    The three arrays of one entry are already known to be disjoint.
    """
    n = len(nbytes)
    idx = numpy.flatnonzero(ok & (nbytes > 0))
    bad = numpy.zeros(n, bool)
    if len(idx) < 2:
        return bad
    lo = ptrs[idx].ravel()
    hi = lo + numpy.repeat(nbytes[idx], 3)
    owner = numpy.repeat(idx, 3)
    order = numpy.argsort(lo, kind="stable")
    lo, hi, owner = lo[order], hi[order], owner[order]
    runmax = numpy.maximum.accumulate(hi)
    starts_inside = numpy.zeros(len(lo), bool)
    starts_inside[1:] = lo[1:] < runmax[:-1]
    if not starts_inside.any():
        return bad
    # Interval i overlaps a later one iff some interval starting inside an
    # earlier interval starts in [lo_i, hi_i) (other than i itself).
    inside_lo = lo[starts_inside]
    count = (numpy.searchsorted(inside_lo, hi, side="left")
             - numpy.searchsorted(inside_lo, lo, side="left") - starts_inside)
    bad[owner[starts_inside | (count > 0)]] = True
    return bad


def _merge_adjacent(ptrs, sizes, coef, itemsize):
    """Merge runs of entries whose arrays continue the previous entry's in memory."""
    if len(sizes) < 2:
        return ptrs, sizes, coef
    nbytes = sizes * itemsize
    adj = ((ptrs[1:] == ptrs[:-1] + nbytes[:-1, None]).all(axis=1)
           & (coef[1:] == coef[:-1]).all(axis=1))
    if not adj.any():
        return ptrs, sizes, coef
    starts = numpy.concatenate(([0], numpy.flatnonzero(~adj) + 1))
    return ptrs[starts], numpy.add.reduceat(sizes, starts), coef[starts]
