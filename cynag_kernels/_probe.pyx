# cython: language_level=3
"""Reference loops for the benchmark (``python -m cynag.bench``).

Two tables over lists of float32 or float64 NumPy arrays, built once outside
the timed region (the array addresses are read into int64 arrays), whose
``run(num_threads)`` is a single C call over all the tensors:

* :class:`TriadTable` -- a memory-bandwidth probe with NesterovAG's traffic,
  per element ``a[i] += s * c[i]; b[i] += s * c[i]`` (reads three arrays,
  writes two in place: five accesses per element, like one NesterovAG step);
* :class:`NesterovTable` -- the NesterovAG step written by hand in C,
  ``v = v * m - lr * g; p = (p + mm * v) - c * g`` with the coefficients in
  the array dtype; built with ``-ffp-contract=off`` like cynag's kernels, so
  its results are bit-identical to :func:`cynag_kernels.nesterov_ag_cpu`.

With ``num_threads <= 1`` the loops run on the calling thread without opening
a parallel region; otherwise one OpenMP region covers all the tensors, split
into one balanced range per thread across tensor boundaries (see
``_probe.h``).  These are measuring instruments, not part of the optimizer.
"""
cimport numpy as cnp
from libc.stdint cimport int64_t

import numpy

cnp.import_array()

cdef extern from "_probe.h" nogil:
    ctypedef struct cynag_probe_table:
        int64_t* x0          # const in C; Cython only assigns them
        int64_t* x1
        int64_t* x2
        int64_t* offsets
        int64_t n_tensors
        int64_t total
    enum:
        CYNAG_PROBE_TRIAD_F32
        CYNAG_PROBE_TRIAD_F64
        CYNAG_PROBE_NAG_F32
        CYNAG_PROBE_NAG_F64
    void cynag_probe_run(const cynag_probe_table* t, int op, const double* coef,
                         int num_threads)
    void cynag_probe_empty_region(int num_threads)
    int cynag_probe_openmp()


def openmp_enabled():
    """True if the probe was compiled with OpenMP."""
    return cynag_probe_openmp() != 0


def empty_region(int num_threads):
    """Open and join an empty parallel region of ``num_threads`` threads."""
    with nogil:
        cynag_probe_empty_region(num_threads)


_DTYPES = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))


cdef class _Table:
    """Addresses of three lists of arrays (one entry per tensor) and their offsets."""

    cdef cynag_probe_table table
    cdef int op
    cdef double coef[4]
    cdef object _keep          # the arrays: their memory must outlive the table
    cdef object _addresses     # int64 (3, n_tensors)
    cdef object _offsets       # int64 (n_tensors + 1,)
    cdef readonly object dtype
    cdef readonly Py_ssize_t n_tensors
    cdef readonly Py_ssize_t size

    cdef _build(self, names, lists, written):
        cdef int64_t[:, ::1] addresses
        cdef int64_t[::1] offsets
        cdef Py_ssize_t k, j, n
        lists = [list(x) for x in lists]
        n = len(lists[0])
        for name, x in zip(names, lists):
            if len(x) != n:
                raise ValueError("%s has %d arrays but %s has %d"
                                 % (name, len(x), names[0], n))
        dtype = None
        self._addresses = numpy.zeros((3, n), numpy.int64)
        self._offsets = numpy.zeros(n + 1, numpy.int64)
        addresses = self._addresses
        offsets = self._offsets
        for k in range(n):
            arrays = [x[k] for x in lists]
            for name, a in zip(names, arrays):
                where = "%s[%d]" % (name, k)
                if not isinstance(a, numpy.ndarray):
                    raise TypeError("%s must be a numpy.ndarray, got %s" % (where, type(a).__name__))
                if a.dtype not in _DTYPES or not a.dtype.isnative:
                    raise TypeError("%s has dtype %s; the probe takes float32 or float64"
                                    % (where, a.dtype))
                if dtype is None:
                    dtype = a.dtype
                elif a.dtype != dtype:
                    raise TypeError("%s has dtype %s but %s[0] has dtype %s"
                                    % (where, a.dtype, names[0], dtype))
                if not (a.flags.c_contiguous and a.flags.aligned):
                    raise ValueError("%s must be C-contiguous and aligned" % where)
                if a.shape != arrays[0].shape:
                    raise ValueError("%s has shape %s but %s[%d] has shape %s"
                                     % (where, a.shape, names[0], k, arrays[0].shape))
            for j in written:
                if not arrays[j].flags.writeable:
                    raise ValueError("%s[%d] is read-only" % (names[j], k))
            for i in range(3):
                for j in range(i + 1, 3):
                    if arrays[i].size and numpy.may_share_memory(arrays[i], arrays[j]):
                        raise ValueError("%s[%d] and %s[%d] overlap in memory"
                                         % (names[i], k, names[j], k))
            for j in range(3):
                addresses[j, k] = <int64_t>arrays[j].ctypes.data
            offsets[k + 1] = offsets[k] + arrays[0].size
        self._keep = lists
        self.dtype = dtype if dtype is not None else numpy.dtype(numpy.float32)
        self.n_tensors = n
        self.size = offsets[n]
        self.table.n_tensors = n
        self.table.total = offsets[n]
        self.table.offsets = &offsets[0]
        if n:
            self.table.x0 = &addresses[0, 0]
            self.table.x1 = &addresses[1, 0]
            self.table.x2 = &addresses[2, 0]
        else:
            self.table.x0 = self.table.x1 = self.table.x2 = NULL

    def run(self, int num_threads=1):
        """One pass over every tensor, in place (``num_threads <= 1``: serial)."""
        with nogil:
            cynag_probe_run(&self.table, self.op, self.coef, num_threads)

    @property
    def nbytes_per_run(self):
        """Bytes one run moves at least: 5 accesses per element."""
        return 5 * self.dtype.itemsize * self.size


cdef class TriadTable(_Table):
    """Bandwidth probe ``a[i] += s * c[i]; b[i] += s * c[i]`` over lists of arrays.

    Args:
        a, b: lists of arrays updated in place.
        c: list of arrays read.
        s: the scale (small, so that many runs neither overflow nor reach
            subnormals).
    """

    def __init__(self, a, b, c, double s=2.0 ** -20):
        self._build(("a", "b", "c"), (a, b, c), (0, 1))
        if self.dtype == numpy.float32:
            self.op = CYNAG_PROBE_TRIAD_F32
            self.coef[0] = <float>s
        else:
            self.op = CYNAG_PROBE_TRIAD_F64
            self.coef[0] = s
        self.coef[1] = self.coef[2] = self.coef[3] = 0.0


cdef class NesterovTable(_Table):
    """Hand-written NesterovAG step over lists of arrays.

    ``v = v * m - lr * g; p = (p + mm * v) - c * g`` per element, with
    ``mm = momentum * momentum`` and ``c = (1 + momentum) * lr`` computed in
    double precision and rounded once to the array dtype, as Chainer's numpy
    sequence rounds them for Python-float hyperparameters.

    Args:
        params, vs: lists of arrays updated in place.
        grads: list of arrays read.
        lr, momentum: the hyperparameters.
    """

    cdef readonly tuple coefficients

    def __init__(self, params, grads, vs, double lr, double momentum):
        cdef double mm = momentum * momentum
        cdef double c = (1.0 + momentum) * lr
        self._build(("params", "grads", "vs"), (params, grads, vs), (0, 2))
        if self.dtype == numpy.float32:
            self.op = CYNAG_PROBE_NAG_F32
            self.coef[0] = <float>lr
            self.coef[1] = <float>momentum
            self.coef[2] = <float>mm
            self.coef[3] = <float>c
        else:
            self.op = CYNAG_PROBE_NAG_F64
            self.coef[0] = lr
            self.coef[1] = momentum
            self.coef[2] = mm
            self.coef[3] = c
        self.coefficients = (self.coef[0], self.coef[1], self.coef[2], self.coef[3])
