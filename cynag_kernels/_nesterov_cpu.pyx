# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Fused NesterovAG update on the CPU: one pass over param, grad and v.

Per element, in exactly the order of Chainer's numpy sequence
(``v *= m; v -= lr * g; p += mm * v; p -= c * g``)::

    v = v * m - lr * g
    p = (p + mm * v) - c * g

where ``lr``, ``m``, ``mm = m * m`` and ``c = (1 + m) * lr`` have already been
rounded to the compute type by :func:`cynag_kernels.nesterov_ag_coefficients`.
The build disables floating-point contraction, so float32 and float64 results
are bit-identical to numpy's.  float16 arrays are read into float32, updated in
float32 and stored as float16 (round to nearest even); the parameter update
uses the stored float16 ``v``, as Chainer's sequence does.

The entry points take typed memoryviews of one element type (float32,
float64, or float16 viewed as uint16) and plain scalars; the thread count is a
plain ``int`` decided by the caller.  Nothing here reads the environment.
:func:`kernel_api` gives native front ends (cynag.torch's reader) the same
coefficient and weight decay rules and multi-tensor runner as a C capsule.
"""
cimport numpy as cnp
from cython.parallel cimport prange
from libc.math cimport isinf
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from cpython.pycapsule cimport PyCapsule_New

cnp.import_array()

cdef extern from "numpy/arrayobject.h":
    enum: NPY_HALF

cdef extern from "_half.h" nogil:
    float cynag_half_to_float(uint16_t h)
    uint16_t cynag_float_to_half(float f)
    void cynag_nag_span_f16c(uint16_t* p, const uint16_t* g, uint16_t* v, Py_ssize_t n,
                             float lr, float m, float mm, float c)
    int cynag_cpu_has_f16c()

# Whether the float16 span may use the F16C instructions (decided once).
cdef bint _use_f16c = cynag_cpu_has_f16c() != 0


def f16c_available():
    """True if this CPU has the AVX and F16C instructions the fast float16 span uses."""
    return cynag_cpu_has_f16c() != 0


def f16c_enabled():
    """True if float16 updates use the CPU's F16C conversion instructions."""
    return _use_f16c


def set_f16c_enabled(flag):
    """Use (if the CPU has them) or avoid the F16C instructions; returns the old setting."""
    global _use_f16c
    old = _use_f16c
    _use_f16c = bool(flag) and cynag_cpu_has_f16c() != 0
    return old


ctypedef fused storage_t:
    float
    double
    uint16_t

# Elements handed to one thread at a time are a multiple of this, so that
# two threads never write the same 64-byte cache line of a contiguous array.
cdef enum:
    CHUNK_ALIGN = 64


# --------------------------------------------------------------------------
# Per-element arithmetic: the only place where the update is written down.
# --------------------------------------------------------------------------
cdef inline void _elem(storage_t* p, const storage_t* g, storage_t* v,
                       double lr, double m, double mm, double c) noexcept nogil:
    cdef float lr32, m32, mm32, c32, g32, v32
    cdef double gd, vd
    if storage_t is double:
        gd = g[0]
        vd = v[0] * m - lr * gd
        v[0] = vd
        p[0] = (p[0] + mm * vd) - c * gd
    elif storage_t is float:
        lr32 = <float>lr
        m32 = <float>m
        mm32 = <float>mm
        c32 = <float>c
        g32 = g[0]
        v32 = v[0] * m32 - lr32 * g32
        v[0] = v32
        p[0] = (p[0] + mm32 * v32) - c32 * g32
    else:
        lr32 = <float>lr
        m32 = <float>m
        mm32 = <float>mm
        c32 = <float>c
        g32 = cynag_half_to_float(g[0])
        v[0] = cynag_float_to_half(cynag_half_to_float(v[0]) * m32 - lr32 * g32)
        v32 = cynag_half_to_float(v[0])
        p[0] = cynag_float_to_half((cynag_half_to_float(p[0]) + mm32 * v32) - c32 * g32)


cdef inline void _span(storage_t* p, const storage_t* g, storage_t* v, Py_ssize_t n,
                       double lr, double m, double mm, double c) noexcept nogil:
    """Contiguous run of ``n`` elements (the loop the compiler vectorises)."""
    cdef Py_ssize_t i
    if storage_t is uint16_t:
        if _use_f16c:
            cynag_nag_span_f16c(p, g, v, n, <float>lr, <float>m, <float>mm, <float>c)
            return
    for i in range(n):
        _elem(p + i, g + i, v + i, lr, m, mm, c)


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------
cdef void _contiguous_run(storage_t* pp, const storage_t* gp, storage_t* vp, Py_ssize_t n,
                          double lr, double momentum, double mm, double c,
                          int n_threads) noexcept nogil:
    """Update ``n`` contiguous elements; one static chunk per thread."""
    cdef Py_ssize_t chunk, n_chunks, k, start, stop
    if n_threads <= 1:
        _span(pp, gp, vp, n, lr, momentum, mm, c)
        return
    # One chunk per thread, rounded up to whole cache lines.
    chunk = (n + n_threads - 1) // n_threads
    k = CHUNK_ALIGN // sizeof(storage_t)
    chunk = ((chunk + k - 1) // k) * k
    n_chunks = (n + chunk - 1) // chunk
    for k in prange(n_chunks, schedule="static", num_threads=min(n_threads, n_chunks)):
        start = k * chunk
        stop = min(start + chunk, n)
        _span(pp + start, gp + start, vp + start, stop - start, lr, momentum, mm, c)


def nesterov_ag_contiguous(storage_t[::1] param,        # IN/OUT
                           const storage_t[::1] grad,   # IN
                           storage_t[::1] v,            # IN/OUT
                           double lr, double momentum, double mm, double c,
                           int n_threads):
    """Update 1-d contiguous views in place; ``n_threads <= 1`` runs serially."""
    cdef Py_ssize_t n = param.shape[0]
    if grad.shape[0] != n or v.shape[0] != n:
        raise ValueError("param, grad and v must have the same length")
    if n == 0:
        return
    with nogil:
        _contiguous_run(&param[0], &grad[0], &v[0], n, lr, momentum, mm, c, n_threads)


cdef extern from "_nag_coef.h" nogil:
    int cynag_nag_coefficients(int type_num, double lr, double m, int has_ls, double ls,
                               double* out)
    float cynag_float_round_to_odd(double d)


def coefficient_rows(int type_num, lr, momentum, loss_scale, double[:, ::1] out,
                     cnp.uint8_t[::1] ok):
    """Fill ``out[i]`` (6 columns, see ``_nag_coef.h``) for tensor ``i``; ``ok[i] = 0`` where
    the kernels cannot take its values.

    ``lr``, ``momentum``: sequences of Python floats (anything else is not
    ok); ``loss_scale``: ``None`` or a sequence of ``None``, Python floats
    and ints of at most 2**53.  The one place of the rounding rule is
    ``cynag_nag_coefficients`` (``_nag_coef.h``).
    """
    cdef Py_ssize_t i, n = out.shape[0]
    cdef double ls
    cdef int has_ls
    if out.shape[1] != 6 or ok.shape[0] != n or len(lr) != n or len(momentum) != n \
            or (loss_scale is not None and len(loss_scale) != n):
        raise ValueError("coefficient_rows: inconsistent lengths")
    for i in range(n):
        a = lr[i]
        m = momentum[i]
        out[i, :] = 0
        if type(a) is not float or type(m) is not float:
            ok[i] = 0
            continue
        has_ls = 0
        ls = 0.0
        if loss_scale is not None:
            s = loss_scale[i]
            if s is not None:
                if type(s) is int and -2 ** 53 <= s <= 2 ** 53:
                    s = float(s)
                if type(s) is not float:
                    ok[i] = 0
                    continue
                ls = s
                has_ls = 1
        ok[i] = cynag_nag_coefficients(type_num, a, m, has_ls, ls, &out[i, 0])


cdef extern from "_dense.h":
    int cynag_dense_type(object param, object grad, object v, bint grad_written)


cdef inline int _dense_type(object param, object grad, object v) noexcept:
    """NumPy type number if the arrays qualify for the dense path (``_dense.h``), else -1."""
    return cynag_dense_type(param, grad, v, False)


def dense_arrays_ok(object param, object grad, object v):
    """True if ``param``, ``grad`` and ``v`` qualify for the dense path.

    Such arrays pass every check of ``check_nesterov_ag_arrays``; the test
    costs a few header reads, so callers use it to skip the full checks.
    """
    return _dense_type(param, grad, v) >= 0


def try_nesterov_ag_dense(object param, object grad, object v, object lr, object momentum,
                          int n_threads):
    """Fast path for the common case; returns False (doing nothing) otherwise.

    Takes arrays that qualify for the dense path (see ``dense_arrays_ok``)
    and Python ``float`` hyperparameters, so that a small update costs well
    under a microsecond of overhead.  The coefficients are rounded exactly as
    :func:`cynag_kernels.nesterov_ag_coefficients` rounds them.
    """
    cdef int type_num
    cdef Py_ssize_t n
    cdef double lr_d, m_d, mm_d, c_d
    cdef double coef[6]
    cdef void* pp
    cdef void* gp
    cdef void* vp
    if type(lr) is not float or type(momentum) is not float:
        return False
    type_num = _dense_type(param, grad, v)
    if type_num < 0:
        return False
    n = cnp.PyArray_SIZE(<cnp.ndarray>param)
    if n == 0:
        return True
    pp = cnp.PyArray_DATA(<cnp.ndarray>param)
    gp = cnp.PyArray_DATA(<cnp.ndarray>grad)
    vp = cnp.PyArray_DATA(<cnp.ndarray>v)
    if not cynag_nag_coefficients(type_num, lr, momentum, 0, 0.0, coef):
        return False  # NumPy 1.x would compute in float64: general path
    lr_d = coef[0]
    m_d = coef[1]
    mm_d = coef[2]
    c_d = coef[3]
    with nogil:
        if type_num == cnp.NPY_FLOAT:
            _contiguous_run(<float*>pp, <const float*>gp, <float*>vp,
                            n, lr_d, m_d, mm_d, c_d, n_threads)
        elif type_num == cnp.NPY_DOUBLE:
            _contiguous_run(<double*>pp, <const double*>gp, <double*>vp,
                            n, lr_d, m_d, mm_d, c_d, n_threads)
        else:
            _contiguous_run(<uint16_t*>pp, <const uint16_t*>gp, <uint16_t*>vp,
                            n, lr_d, m_d, mm_d, c_d, n_threads)
    return True


def nesterov_ag_strided(storage_t[:, :] param,          # IN/OUT
                        const storage_t[:, :] grad,     # IN
                        storage_t[:, :] v,              # IN/OUT
                        double lr, double momentum, double mm, double c,
                        int n_threads):
    """Update 2-d views of any strides in place (row-major walk).

    The caller collapses any array whose axes can be merged to at most two
    axes; the flattened index range is split into one chunk per thread.
    """
    cdef Py_ssize_t rows = param.shape[0]
    cdef Py_ssize_t cols = param.shape[1]
    cdef Py_ssize_t total = rows * cols
    cdef Py_ssize_t chunk, n_chunks, k, start, stop, i, r, col
    if (grad.shape[0] != rows or grad.shape[1] != cols
            or v.shape[0] != rows or v.shape[1] != cols):
        raise ValueError("param, grad and v must have the same shape")
    if total == 0:
        return
    if n_threads < 1:
        n_threads = 1
    chunk = (total + n_threads - 1) // n_threads
    n_chunks = (total + chunk - 1) // chunk
    for k in prange(n_chunks, nogil=True, schedule="static",
                    num_threads=min(n_threads, n_chunks),
                    use_threads_if=n_chunks > 1):
        start = k * chunk
        stop = min(start + chunk, total)
        r = start // cols
        col = start - r * cols
        i = start
        while i < stop:
            _elem(&param[r, col], &grad[r, col], &v[r, col], lr, momentum, mm, c)
            col = col + 1
            if col == cols:
                col = 0
                r = r + 1
            i = i + 1


# --------------------------------------------------------------------------
# Multi-tensor step: many tensors of one dtype in one call
# --------------------------------------------------------------------------
# Columns of the coefficient table (one row per tensor).
cdef enum:
    COEF_LR = 0
    COEF_M = 1
    COEF_MM = 2
    COEF_C = 3
    COEF_LS = 4       # loss scale, rounded to the compute type
    COEF_HAS_LS = 5   # nonzero: divide the gradient by the loss scale first
    N_COEF = 6


cdef inline void _span_scaled(storage_t* p, storage_t* g, storage_t* v, Py_ssize_t n,
                              double lr, double m, double mm, double c,
                              double ls) noexcept nogil:
    """``g /= ls`` (stored, in the array dtype) then the update, per element.

    Chainer divides the gradient in place by the loss scale before the
    update; here both happen in one pass, in the same order.
    """
    cdef Py_ssize_t i
    cdef float ls32 = <float>ls
    for i in range(n):
        if storage_t is double:
            g[i] = g[i] / ls
        elif storage_t is float:
            g[i] = g[i] / ls32
        else:
            g[i] = cynag_float_to_half(cynag_half_to_float(g[i]) / ls32)
        _elem(p + i, g + i, v + i, lr, m, mm, c)


cdef extern from "_hook_ops.h" nogil:
    enum: CYNAG_OP_WORDS
    enum: CYNAG_OP_BLOCK
    enum: CYNAG_OP_WEIGHT_DECAY
    int cynag_weight_decay_row(int type_num, double rate, double* out)
    void cynag_ops_run(int type_num, void* g, const void* p, ptrdiff_t n,
                       const double* ops, int n_ops)


cdef inline void _span_decay(storage_t* p, storage_t* g, storage_t* v, Py_ssize_t n,
                             double lr, double m, double mm, double c, double rate,
                             bint keep_grad) noexcept nogil:
    """Weight decay (``g += rate * p``, in the array dtype, as the operation row
    computes it) and the update, per element, in one pass; ``g`` stored only
    without ``keep_grad``.  float32 and float64 (float16 takes the blocks)."""
    cdef Py_ssize_t i
    cdef storage_t gd
    cdef float a32 = <float>rate, t32
    cdef double t64
    if storage_t is uint16_t:
        return  # (not called for float16)
    for i in range(n):
        if storage_t is double:
            t64 = rate * p[i]
            gd = g[i] + t64
        elif storage_t is float:
            t32 = a32 * p[i]
            gd = g[i] + t32
        if not keep_grad:
            g[i] = gd
        _elem(p + i, &gd, v + i, lr, m, mm, c)


# Flags of a multi-tensor pass.
cdef enum:
    PASS_UPDATE = 1      # the update (else the hook operations only; v untouched)
    PASS_KEEP_GRAD = 2   # the operations act on a copy of each gradient block:
                         # the gradients are read, never written


cdef inline void _segment(storage_t* p, storage_t* g, storage_t* v, Py_ssize_t n,
                          const double* k, const double* ops, int n_ops, int type_num,
                          int flags) noexcept nogil:
    """Hook operations (if any), then the update (with ``PASS_UPDATE``), of one segment.

    With operations, block by block: the operations and the update of a
    block run before the next block, so memory is read and written once.
    With ``PASS_KEEP_GRAD`` the operations (and a loss scale's division)
    act on a copy of the block in a buffer, which the update then reads:
    the same values, and the gradient stays as it was (PyTorch's weight
    decay leaves ``p.grad`` alone).
    """
    cdef Py_ssize_t b0, m
    cdef storage_t buf[CYNAG_OP_BLOCK]
    cdef storage_t* gb
    cdef bint update = (flags & PASS_UPDATE) != 0
    if storage_t is not uint16_t:
        if n_ops == 1 and update and <int>ops[0] == CYNAG_OP_WEIGHT_DECAY \
                and k[COEF_HAS_LS] == 0.0:
            # (the usual program: one pass, without the block buffer)
            _span_decay(p, g, v, n, k[COEF_LR], k[COEF_M], k[COEF_MM], k[COEF_C], ops[1],
                        (flags & PASS_KEEP_GRAD) != 0)
            return
    if n_ops == 0 and not (flags & PASS_KEEP_GRAD and k[COEF_HAS_LS] != 0.0):
        if not update:
            return
        if k[COEF_HAS_LS] != 0.0:
            _span_scaled(p, g, v, n, k[COEF_LR], k[COEF_M], k[COEF_MM], k[COEF_C], k[COEF_LS])
        else:
            _span(p, g, v, n, k[COEF_LR], k[COEF_M], k[COEF_MM], k[COEF_C])
        return
    b0 = 0
    while b0 < n:
        m = n - b0
        if m > CYNAG_OP_BLOCK:
            m = CYNAG_OP_BLOCK
        if flags & PASS_KEEP_GRAD:
            memcpy(buf, g + b0, m * sizeof(storage_t))
            gb = buf
        else:
            gb = g + b0
        if n_ops:
            cynag_ops_run(type_num, gb, p + b0, m, ops, n_ops)
        if update:
            if k[COEF_HAS_LS] != 0.0:
                _span_scaled(p + b0, gb, v + b0, m, k[COEF_LR], k[COEF_M], k[COEF_MM],
                             k[COEF_C], k[COEF_LS])
            else:
                _span(p + b0, gb, v + b0, m, k[COEF_LR], k[COEF_M], k[COEF_MM], k[COEF_C])
        b0 += m


cdef extern from "_prefetch.h" nogil:
    void cynag_prefetch_tensor(const char* p, const char* g, const char* v, long long nbytes)


# Tensors ahead of the current one whose first lines are asked for (see
# _prefetch.h).  Measured on 2000 tensors of 16-1000 elements scattered in
# memory: 4-8 ahead are best (a step 40% faster at 64 elements), 12 no better.
cdef enum:
    PREFETCH_AHEAD = 6


cdef inline void _prefetch_row(storage_t* tag, const int64_t* ptrs, const int64_t* cum,
                               Py_ssize_t a, Py_ssize_t n_tensors, int64_t b1) noexcept nogil:
    """Ask for the first lines of tensor ``a``'s arrays if it is in this work item."""
    if a < n_tensors and cum[a] < b1:
        cynag_prefetch_tensor(<const char*>ptrs[3 * a], <const char*>ptrs[3 * a + 1],
                              <const char*>ptrs[3 * a + 2], (cum[a + 1] - cum[a]) * sizeof(storage_t))


cdef void _multi_item(storage_t* tag, const int64_t* ptrs, const int64_t* cum,
                      const double* coef, Py_ssize_t n_tensors,
                      int64_t b0, int64_t b1, Py_ssize_t t, const double* ops, int n_ops,
                      int type_num, int flags) noexcept nogil:
    """Elements ``[b0, b1)`` of the concatenation of the tensors, from tensor ``t`` on."""
    cdef int64_t base, start, stop
    cdef storage_t* p
    cdef storage_t* g
    cdef storage_t* v
    cdef Py_ssize_t a
    for a in range(t + 1, t + PREFETCH_AHEAD):
        _prefetch_row(tag, ptrs, cum, a, n_tensors, b1)
    while t < n_tensors and cum[t] < b1:
        _prefetch_row(tag, ptrs, cum, t + PREFETCH_AHEAD, n_tensors, b1)
        base = cum[t]
        start = b0 - base if b0 > base else 0
        stop = cum[t + 1] - base
        if b1 - base < stop:
            stop = b1 - base
        if stop > start:
            p = <storage_t*>ptrs[3 * t]
            g = <storage_t*>ptrs[3 * t + 1]
            v = <storage_t*>ptrs[3 * t + 2]
            _segment(p + start, g + start, v + start, stop - start, coef + N_COEF * t,
                     ops, n_ops, type_num, flags)
        t += 1


cdef void _multi_run(storage_t* tag, const int64_t* ptrs, const int64_t* cum,
                     const double* coef, Py_ssize_t n_tensors,
                     const int64_t* bounds, const int64_t* first, Py_ssize_t n_items,
                     int n_threads, const double* ops, int n_ops, int type_num,
                     int flags) noexcept nogil:
    cdef Py_ssize_t k
    if n_threads <= 1 or n_items <= 1:
        for k in range(n_items):
            _multi_item(tag, ptrs, cum, coef, n_tensors, bounds[k], bounds[k + 1],
                        first[k], ops, n_ops, type_num, flags)
        return
    for k in prange(n_items, schedule="static", num_threads=min(n_threads, n_items)):
        _multi_item(tag, ptrs, cum, coef, n_tensors, bounds[k], bounds[k + 1],
                    first[k], ops, n_ops, type_num, flags)


def nesterov_ag_multi(const int64_t[:, ::1] ptrs,     # (n, 3) addresses of p, g, v
                      const int64_t[::1] cum,         # (n + 1,) element offsets
                      const double[:, ::1] coef,      # (n, N_COEF) coefficients
                      const int64_t[::1] bounds,      # (k + 1,) work item boundaries
                      const int64_t[::1] first,       # (k,) first tensor of each item
                      int type_num, int n_threads, const double[:, ::1] ops=None,
                      bint update=True):
    """One NesterovAG step over a table of tensors of one dtype (one native call).

    Tensor ``t`` has ``cum[t + 1] - cum[t]`` elements at the addresses
    ``ptrs[t]`` (param, grad, v: dense, disjoint, in the dtype ``type_num``)
    and the coefficients ``coef[t]`` (lr, momentum, mm, c as for
    ``nesterov_ag_contiguous``; then the loss scale and a flag: when set,
    the gradient is divided by it in place first).  ``ops`` (``(n_ops, 4)``,
    see ``_hook_ops.h``), if given, is a program of hook operations applied
    to every gradient before the division and the update, in the same pass.  Work item ``k`` covers the elements
    ``[bounds[k], bounds[k + 1])`` of the concatenated tensors, starting in
    tensor ``first[k]``; items are spread over ``n_threads`` threads in one
    parallel region (serial when ``n_threads <= 1``).  ``update=False`` runs
    the hook operations only (``v`` is not touched).

    The caller (``cynag_kernels.multi_tensor``) owns the table and keeps
    the arrays alive; nothing here can check the addresses.
    """
    cdef Py_ssize_t n = ptrs.shape[0]
    cdef Py_ssize_t n_items = bounds.shape[0] - 1
    cdef int n_ops = 0
    cdef const double* op_ptr = NULL
    cdef int flags = PASS_UPDATE if update else 0
    if ptrs.shape[1] != 3 or cum.shape[0] != n + 1 or coef.shape[0] != n \
            or coef.shape[1] != N_COEF or first.shape[0] != n_items:
        raise ValueError("nesterov_ag_multi: inconsistent table shapes")
    if ops is not None and ops.shape[0] > 0:
        if ops.shape[1] != CYNAG_OP_WORDS:
            raise ValueError("nesterov_ag_multi: ops must have %d columns" % CYNAG_OP_WORDS)
        n_ops = <int>ops.shape[0]
        op_ptr = &ops[0, 0]
    if n == 0 or n_items <= 0:
        return
    with nogil:
        if type_num == cnp.NPY_FLOAT:
            _multi_run(<float*>NULL, &ptrs[0, 0], &cum[0], &coef[0, 0], n, &bounds[0],
                       &first[0], n_items, n_threads, op_ptr, n_ops, type_num, flags)
        elif type_num == cnp.NPY_DOUBLE:
            _multi_run(<double*>NULL, &ptrs[0, 0], &cum[0], &coef[0, 0], n, &bounds[0],
                       &first[0], n_items, n_threads, op_ptr, n_ops, type_num, flags)
        elif type_num == NPY_HALF:
            _multi_run(<uint16_t*>NULL, &ptrs[0, 0], &cum[0], &coef[0, 0], n,
                       &bounds[0], &first[0], n_items, n_threads, op_ptr, n_ops, type_num,
                       flags)
        else:
            with gil:
                raise TypeError("nesterov_ag_multi: unsupported type number %d" % type_num)


cdef Py_ssize_t _compact(const int64_t* ptrs, const int64_t* sizes, const double* coef,
                        const uint8_t* mask, int select, const int32_t* type_nums,
                        int type_num, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t itemsize,
                        int64_t* out_ptrs, int64_t* out_cum, double* out_coef) noexcept nogil:
    """The rows ``[lo, hi)`` (those with ``mask[i] == select`` and ``type_nums[i] ==
    type_num`` when ``mask`` is given) without the empty ones, adjacent runs
    merged: row ``i`` continues the previous one when its three arrays start
    where that one's end and its coefficients are the same.  ``ptrs``: 3 and
    ``coef``: 6 per row, C order; the outputs have room for ``hi - lo``
    rows (``out_cum``: one more).  Returns the number of rows written."""
    cdef Py_ssize_t i, j, m = 0
    cdef int64_t nb
    cdef bint merge
    out_cum[0] = 0
    for i in range(lo, hi):
        if sizes[i] <= 0:
            continue
        if mask is not NULL and (mask[i] != select or type_nums[i] != type_num):
            continue
        merge = m > 0
        if merge:
            nb = (out_cum[m] - out_cum[m - 1]) * itemsize
            for j in range(3):
                if ptrs[3 * i + j] != out_ptrs[3 * (m - 1) + j] + nb:
                    merge = False
                    break
        if merge:
            for j in range(6):
                if coef[6 * i + j] != out_coef[6 * (m - 1) + j]:
                    merge = False
                    break
        if merge:
            out_cum[m] += sizes[i]
            continue
        for j in range(3):
            out_ptrs[3 * m + j] = ptrs[3 * i + j]
        for j in range(6):
            out_coef[6 * m + j] = coef[6 * i + j]
        out_cum[m + 1] = out_cum[m] + sizes[i]
        m += 1
    return m


cdef Py_ssize_t _compact_selected(const int64_t* ptrs, const int64_t* sizes,
                                  const double* coef, const uint8_t* mask, int select,
                                  const int32_t* type_nums, int type_num, Py_ssize_t lo,
                                  Py_ssize_t hi, int64_t* out_ptrs, int64_t* out_cum,
                                  double* out_coef) noexcept nogil:
    """:func:`_compact` of the rows of one dtype (its itemsize); -2 for a type
    number the kernel does not take."""
    if type_num != cnp.NPY_FLOAT and type_num != cnp.NPY_DOUBLE and type_num != NPY_HALF:
        return -2
    return _compact(ptrs, sizes, coef, mask, select, type_nums, type_num, lo, hi,
                    4 if type_num == cnp.NPY_FLOAT else (8 if type_num == cnp.NPY_DOUBLE else 2),
                    out_ptrs, out_cum, out_coef)


def compact_rows(const int64_t[:, ::1] ptrs, const int64_t[::1] sizes,
                 const double[:, ::1] coef, Py_ssize_t itemsize, int64_t[:, ::1] out_ptrs,
                 int64_t[::1] out_cum, double[:, ::1] out_coef):
    """Rows of a multi-tensor table, without the empty ones, adjacent runs merged.

    Row ``t`` continues row ``t - 1`` when its three arrays start where the
    previous row's end and its coefficients are the same (as in contiguous
    mode): the two become one row.  Fills ``out_ptrs``, ``out_coef`` and the
    cumulative element counts ``out_cum`` (``out_cum[0] = 0``); returns the
    number of rows.  One pass, no Python objects.
    """
    cdef Py_ssize_t n = ptrs.shape[0], m
    if sizes.shape[0] != n or coef.shape[0] != n or ptrs.shape[1] != 3 \
            or coef.shape[1] != 6 or out_ptrs.shape[0] < n or out_cum.shape[0] < n + 1 \
            or out_coef.shape[0] < n or out_ptrs.shape[1] != 3 or out_coef.shape[1] != 6:
        raise ValueError("compact_rows: inconsistent shapes")
    if n == 0:
        out_cum[0] = 0
        return 0
    with nogil:
        m = _compact(&ptrs[0, 0], &sizes[0], &coef[0, 0], NULL, 0, NULL, 0, 0, n, itemsize,
                     &out_ptrs[0, 0], &out_cum[0], &out_coef[0, 0])
    return m


def compact_selected_rows(const int64_t[:, ::1] ptrs, const int64_t[::1] sizes,
                          const double[:, ::1] coef, const cnp.uint8_t[::1] mask, int select,
                          const cnp.int32_t[::1] type_nums, int type_num, Py_ssize_t lo,
                          Py_ssize_t hi, int64_t[:, ::1] out_ptrs, int64_t[::1] out_cum,
                          double[:, ::1] out_coef):
    """:func:`compact_rows` over the rows ``i`` in ``[lo, hi)`` with ``mask[i] == select``
    and ``type_nums[i] == type_num``; returns the number of rows written.

    The caller's selection of a table (e.g. the rows its scan found fit for
    the kernel) without a copy per step.
    """
    cdef Py_ssize_t n = ptrs.shape[0], m
    if sizes.shape[0] < n or coef.shape[0] < n or mask.shape[0] < n \
            or type_nums.shape[0] < n or out_ptrs.shape[0] < n or out_cum.shape[0] < n + 1 \
            or out_coef.shape[0] < n or lo < 0 or hi > n or ptrs.shape[1] != 3 \
            or coef.shape[1] != 6 or out_ptrs.shape[1] != 3 or out_coef.shape[1] != 6:
        raise ValueError("compact_selected_rows: inconsistent shapes")
    if hi <= lo:
        out_cum[0] = 0
        return 0
    with nogil:
        m = _compact_selected(&ptrs[0, 0], &sizes[0], &coef[0, 0], &mask[0], select,
                              &type_nums[0], type_num, lo, hi, &out_ptrs[0, 0], &out_cum[0],
                              &out_coef[0, 0])
    if m < 0:
        raise TypeError("compact_selected_rows: unsupported type number %d" % type_num)
    return m


# Work items whose bounds _run_compacted keeps on the stack (256 threads at
# ITEMS_PER_THREAD = 2).
cdef enum:
    STACK_ITEMS = 512


cdef int _run_compacted(const int64_t* ptrs, const int64_t* cum, const double* coef,
                        Py_ssize_t m, int type_num, int n_threads, int items_per_thread,
                        int item_align, const double* op_ptr, int n_ops,
                        int keep_grad) noexcept nogil:
    """The first ``m`` rows of a table, with the work items made here (``keep_grad``:
    the operations act on copies, the gradients are not written).

    Returns 0, -1 if memory for the work items ran out (only with more than
    ``STACK_ITEMS`` items: the usual thread counts never allocate, so a
    caller running several tables in a row cannot stop half way), -2 for a
    type number the kernel does not take (nothing changed in either case).
    """
    cdef int64_t total, k, j, b, prev
    cdef int64_t* bounds
    cdef int64_t* first
    cdef int64_t stack_bounds[STACK_ITEMS + 1]
    cdef int64_t stack_first[STACK_ITEMS + 1]
    cdef bint on_heap
    cdef Py_ssize_t n_items = 0, t = 0
    cdef int flags
    if m <= 0:
        return 0
    if type_num != cnp.NPY_FLOAT and type_num != cnp.NPY_DOUBLE and type_num != NPY_HALF:
        return -2
    total = cum[m]
    if total <= 0:
        return 0
    if item_align < 1:
        item_align = 1
    k = 1 if n_threads <= 1 else <int64_t>n_threads * items_per_thread
    if k > (total + item_align - 1) // item_align:
        k = (total + item_align - 1) // item_align
    if k < 1:
        k = 1
    on_heap = k > STACK_ITEMS
    if on_heap:
        bounds = <int64_t*>malloc(sizeof(int64_t) * (k + 1))
        first = <int64_t*>malloc(sizeof(int64_t) * (k + 1))
        if bounds is NULL or first is NULL:
            free(bounds)
            free(first)
            return -1
    else:
        bounds = stack_bounds
        first = stack_first
    prev = -1
    for j in range(k + 1):
        b = (j * total) // k
        if 0 < j < k:
            b -= b % item_align
        if b == prev:
            continue
        bounds[n_items] = b
        n_items += 1
        prev = b
    n_items -= 1  # items between consecutive bounds
    for j in range(n_items):
        while t + 1 < m and cum[t + 1] <= bounds[j]:
            t += 1
        first[j] = t
    flags = PASS_UPDATE | (PASS_KEEP_GRAD if keep_grad else 0)
    if type_num == cnp.NPY_FLOAT:
        _multi_run(<float*>NULL, ptrs, cum, coef, m, bounds, first, n_items, n_threads,
                   op_ptr, n_ops, type_num, flags)
    elif type_num == cnp.NPY_DOUBLE:
        _multi_run(<double*>NULL, ptrs, cum, coef, m, bounds, first, n_items, n_threads,
                   op_ptr, n_ops, type_num, flags)
    else:
        _multi_run(<uint16_t*>NULL, ptrs, cum, coef, m, bounds, first, n_items, n_threads,
                   op_ptr, n_ops, type_num, flags)
    if on_heap:
        free(bounds)
        free(first)
    return 0


def nesterov_ag_compacted(const int64_t[:, ::1] ptrs, const int64_t[::1] cum,
                          const double[:, ::1] coef, Py_ssize_t m, int type_num,
                          int n_threads, int items_per_thread, int item_align,
                          const double[:, ::1] ops=None, bint keep_grad=False):
    """:func:`nesterov_ag_multi` over the first ``m`` rows, with the work items made here.

    ``keep_grad``: the operations act on copies of the gradients, which are
    only read.

    The elements are split as ``CPUTable.work_items`` splits them
    (``n_threads * items_per_thread`` items whose inner boundaries are
    multiples of ``item_align``); every element's arithmetic is the same
    whatever the split.
    """
    cdef int n_ops = 0, rc
    cdef const double* op_ptr = NULL
    if m <= 0:
        return
    if ptrs.shape[0] < m or cum.shape[0] < m + 1 or coef.shape[0] < m or coef.shape[1] != 6:
        raise ValueError("nesterov_ag_compacted: inconsistent shapes")
    if ops is not None and ops.shape[0] > 0:
        if ops.shape[1] != CYNAG_OP_WORDS:
            raise ValueError("nesterov_ag_compacted: ops must have %d columns" % CYNAG_OP_WORDS)
        n_ops = <int>ops.shape[0]
        op_ptr = &ops[0, 0]
    with nogil:
        rc = _run_compacted(&ptrs[0, 0], &cum[0], &coef[0, 0], m, type_num, n_threads,
                            items_per_thread, item_align, op_ptr, n_ops, keep_grad)
    if rc == -1:
        raise MemoryError()
    if rc == -2:
        raise TypeError("nesterov_ag_compacted: unsupported type number %d" % type_num)


# The kernel's C entry (_kernel_api.h), for native callers that read their
# arrays themselves (cynag._step's one-call step, cynag.torch's reader): the
# rule of the coefficients, the compaction and the table runner above, the
# same functions nesterov_ag_addresses and compact_selected_rows reach from
# Python.
cdef extern from "_kernel_api.h":
    const char* CYNAG_KERNEL_API_NAME_C "CYNAG_KERNEL_API_NAME"
    ctypedef struct cynag_kernel_api:
        int n_coef
        int n_op_words
        int (*coefficients)(int, double, double, int, double, double*) noexcept nogil
        int (*weight_decay)(int, double, double*) noexcept nogil
        int (*run_table)(const int64_t*, const int64_t*, const double*, Py_ssize_t, int, int,
                         int, int, const double*, int, int) noexcept nogil
        Py_ssize_t (*compact)(const int64_t*, const int64_t*, const double*, const uint8_t*,
                              int, const int32_t*, int, Py_ssize_t, Py_ssize_t, int64_t*,
                              int64_t*, double*) noexcept nogil


cdef int _coefficients(int type_num, double lr, double m, int has_ls, double ls,
                       double* out) noexcept nogil:
    return cynag_nag_coefficients(type_num, lr, m, has_ls, ls, out)


cdef int _weight_decay(int type_num, double rate, double* out) noexcept nogil:
    return cynag_weight_decay_row(type_num, rate, out)


def weight_decay_row(int type_num, double rate):
    """The operation row of ``g += rate * p`` for a Python float ``rate`` and arrays
    of ``type_num``, or None where NumPy 1.x would compute it in float64 (the C
    rule of :func:`cynag_kernels.hooks.op_row` for a Python float)."""
    cdef double out[4]
    if not cynag_weight_decay_row(type_num, rate, out):
        return None
    return (out[0], out[1], out[2], out[3])


cdef cynag_kernel_api _kernel_api
_kernel_api.n_coef = N_COEF
_kernel_api.n_op_words = CYNAG_OP_WORDS
_kernel_api.coefficients = _coefficients
_kernel_api.weight_decay = _weight_decay
_kernel_api.run_table = _run_compacted
_kernel_api.compact = _compact_selected

CYNAG_KERNEL_API_NAME = (<bytes>CYNAG_KERNEL_API_NAME_C).decode()
_kernel_api_capsule = PyCapsule_New(<void*>&_kernel_api, CYNAG_KERNEL_API_NAME_C, NULL)


def kernel_api():
    """The capsule of the kernel's C entry (``cynag_kernel_api``, ``_kernel_api.h``)."""
    return _kernel_api_capsule


def hook_ops(object g, object p, const double[:, ::1] ops, int type_num):
    """Run a hook operation program on one contiguous gradient (``p`` may be None).

    ``g`` and ``p``: 1-d contiguous NumPy arrays of the dtype ``type_num``
    (float16 as uint16 views are accepted too); ``ops``: ``(n_ops, 4)``.
    Serial: the caller splits large arrays (see ``cynag_kernels.hooks``).
    """
    cdef cnp.ndarray ga = g
    cdef cnp.ndarray pa
    cdef void* pp = NULL
    cdef Py_ssize_t n = cnp.PyArray_SIZE(ga)
    if not cnp.PyArray_CHKFLAGS(ga, cnp.NPY_ARRAY_C_CONTIGUOUS) or not cnp.PyArray_ISWRITEABLE(ga):
        raise ValueError("hook_ops: g must be a writeable contiguous array")
    if ops.shape[1] != CYNAG_OP_WORDS:
        raise ValueError("hook_ops: ops must have %d columns" % CYNAG_OP_WORDS)
    if p is not None:
        pa = p
        if cnp.PyArray_SIZE(pa) != n or not cnp.PyArray_CHKFLAGS(pa, cnp.NPY_ARRAY_C_CONTIGUOUS) \
                or cnp.PyArray_ITEMSIZE(pa) != cnp.PyArray_ITEMSIZE(ga):
            raise ValueError("hook_ops: p must be contiguous, as long as g and of its dtype")
        pp = cnp.PyArray_DATA(pa)
    if n == 0 or ops.shape[0] == 0:
        return
    with nogil:
        cynag_ops_run(type_num, cnp.PyArray_DATA(ga), pp, n, &ops[0, 0], <int>ops.shape[0])


cdef double _sumsq_f32(const float* x, Py_ssize_t n) noexcept nogil:
    # Four float64 accumulators (a blocked sum): each square is exact in
    # float64 for float32 and float16 inputs.
    cdef double s0 = 0, s1 = 0, s2 = 0, s3 = 0
    cdef double a
    cdef Py_ssize_t i = 0
    while i + 4 <= n:
        a = x[i]
        s0 = s0 + a * a
        a = x[i + 1]
        s1 = s1 + a * a
        a = x[i + 2]
        s2 = s2 + a * a
        a = x[i + 3]
        s3 = s3 + a * a
        i += 4
    while i < n:
        a = x[i]
        s0 = s0 + a * a
        i += 1
    return (s0 + s1) + (s2 + s3)


cdef double _sumsq_f64(const double* x, Py_ssize_t n) noexcept nogil:
    cdef double s0 = 0, s1 = 0, s2 = 0, s3 = 0
    cdef Py_ssize_t i = 0
    while i + 4 <= n:
        s0 = s0 + x[i] * x[i]
        s1 = s1 + x[i + 1] * x[i + 1]
        s2 = s2 + x[i + 2] * x[i + 2]
        s3 = s3 + x[i + 3] * x[i + 3]
        i += 4
    while i < n:
        s0 = s0 + x[i] * x[i]
        i += 1
    return (s0 + s1) + (s2 + s3)


cdef double _sumsq_f16(const uint16_t* x, Py_ssize_t n) noexcept nogil:
    cdef double s = 0
    cdef double a
    cdef Py_ssize_t i
    for i in range(n):
        a = cynag_half_to_float(x[i])
        s = s + a * a
    return s


cdef double _sumsq_any(int type_num, const void* x, Py_ssize_t n) noexcept nogil:
    if type_num == cnp.NPY_FLOAT:
        return _sumsq_f32(<const float*>x, n)
    if type_num == cnp.NPY_DOUBLE:
        return _sumsq_f64(<const double*>x, n)
    return _sumsq_f16(<const uint16_t*>x, n)


def sum_squares_multi(const int64_t[::1] ptrs, const int64_t[::1] cum,
                      const int64_t[::1] bounds, const int64_t[::1] first,
                      int type_num, int n_threads, double[::1] per_tensor):
    """Sum of squares of many contiguous arrays of one dtype, in float64, in one call.

    Array ``t`` has ``cum[t + 1] - cum[t]`` elements at ``ptrs[t]``.  Work
    items are as for ``nesterov_ag_multi``; each item accumulates its
    elements in float64 (four interleaved partial sums), and the partial
    sums are added per tensor in a fixed order, so the result depends only
    on the split into items.  Fills ``per_tensor`` (one sum per array) and
    returns the total.
    """
    cdef Py_ssize_t n = ptrs.shape[0]
    cdef Py_ssize_t n_items = bounds.shape[0] - 1
    cdef Py_ssize_t k, t, item_t
    cdef int64_t b0, b1, base, start, stop
    cdef double total = 0
    if cum.shape[0] != n + 1 or first.shape[0] != n_items or per_tensor.shape[0] != n:
        raise ValueError("sum_squares_multi: inconsistent table shapes")
    if type_num != cnp.NPY_FLOAT and type_num != cnp.NPY_DOUBLE and type_num != NPY_HALF:
        raise TypeError("sum_squares_multi: unsupported type number %d" % type_num)
    per_tensor[:] = 0
    if n == 0 or n_items <= 0:
        return 0.0
    # partial[k, j]: item k's sum over its j-th tensor (items span few tensors
    # each; store per (item, tensor) pairs through a flat buffer).
    import numpy as _np
    cdef int64_t[::1] pair_start = _np.zeros(n_items + 1, _np.int64)
    for k in range(n_items):
        t = first[k]
        item_t = 0
        while t < n and cum[t] < bounds[k + 1]:
            item_t += 1
            t += 1
        pair_start[k + 1] = pair_start[k] + item_t
    cdef double[::1] partial = _np.zeros(max(1, pair_start[n_items]), _np.float64)
    with nogil:
        for k in prange(n_items, schedule="static", num_threads=max(1, min(n_threads, n_items)),
                        use_threads_if=n_threads > 1 and n_items > 1):
            b0 = bounds[k]
            b1 = bounds[k + 1]
            t = first[k]
            item_t = pair_start[k]
            while t < n and cum[t] < b1:
                base = cum[t]
                start = b0 - base if b0 > base else 0
                stop = cum[t + 1] - base
                if b1 - base < stop:
                    stop = b1 - base
                if stop > start:
                    partial[item_t] = _sumsq_any(
                        type_num, (<const char*>ptrs[t]) + start * (4 if type_num == cnp.NPY_FLOAT
                                                                   else 8 if type_num == cnp.NPY_DOUBLE
                                                                   else 2),
                        stop - start)
                item_t = item_t + 1
                t = t + 1
    # Fixed-order combination: per tensor, items in order.
    for k in range(n_items):
        t = first[k]
        item_t = pair_start[k]
        while t < n and cum[t] < bounds[k + 1]:
            per_tensor[t] += partial[item_t]
            item_t += 1
            t += 1
    for t in range(n):
        total += per_tensor[t]
    return total


def arrays_writeable(list arrays):
    """True if every array of the list (NumPy arrays) is writeable."""
    cdef object a
    for a in arrays:
        if not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>a):
            return False
    return True


def multi_verify(list params, list grads, list vs, int type_num,
                 const int64_t[:, ::1] ptrs, const int64_t[::1] sizes,
                 const cnp.uint8_t[::1] scaled):
    """True if every entry still qualifies exactly as ``multi_pointers`` found it.

    Re-reads the headers of every array: same addresses and sizes, still
    dense (a shape, strides or flags changed in place would show), and a
    gradient divided in place (``scaled[i]``) still writeable.
    """
    cdef Py_ssize_t i, n = len(params)
    cdef object p, g, v
    if len(grads) != n or len(vs) != n or ptrs.shape[0] != n or sizes.shape[0] != n \
            or scaled.shape[0] != n:
        return False
    for i in range(n):
        p = params[i]
        g = grads[i]
        v = vs[i]
        if _dense_type(p, g, v) != type_num:
            return False
        if (ptrs[i, 0] != <int64_t>cnp.PyArray_DATA(<cnp.ndarray>p)
                or ptrs[i, 1] != <int64_t>cnp.PyArray_DATA(<cnp.ndarray>g)
                or ptrs[i, 2] != <int64_t>cnp.PyArray_DATA(<cnp.ndarray>v)
                or sizes[i] != cnp.PyArray_SIZE(<cnp.ndarray>p)):
            return False
        if scaled[i] and not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>g):
            return False
    return True


def multi_pointers(list params, list grads, list vs, int type_num,
                   int64_t[:, ::1] ptrs, int64_t[::1] sizes, cnp.uint8_t[::1] ok):
    """Fill ``ptrs``/``sizes`` from lists of arrays; ``ok[i] = 0`` where entry ``i`` fails.

    An entry qualifies when its three arrays take the dense path (see
    ``dense_arrays_ok``) and have the NumPy type ``type_num``.  Reads the
    array headers only.
    """
    cdef Py_ssize_t i, n = len(params)
    cdef object p, g, v
    if len(grads) != n or len(vs) != n or ptrs.shape[0] != n or ptrs.shape[1] != 3 \
            or sizes.shape[0] != n or ok.shape[0] != n:
        raise ValueError("multi_pointers: lists and outputs must have the same length")
    for i in range(n):
        p = params[i]
        g = grads[i]
        v = vs[i]
        if _dense_type(p, g, v) != type_num:
            ok[i] = 0
            ptrs[i, 0] = 0
            ptrs[i, 1] = 0
            ptrs[i, 2] = 0
            sizes[i] = 0
            continue
        ok[i] = 1
        ptrs[i, 0] = <int64_t>cnp.PyArray_DATA(<cnp.ndarray>p)
        ptrs[i, 1] = <int64_t>cnp.PyArray_DATA(<cnp.ndarray>g)
        ptrs[i, 2] = <int64_t>cnp.PyArray_DATA(<cnp.ndarray>v)
        sizes[i] = cnp.PyArray_SIZE(<cnp.ndarray>p)


# --------------------------------------------------------------------------
# Step with per-operation rounding (NumPy 1.x promotion)
# --------------------------------------------------------------------------
cdef inline double _round_to(double x, int bits) noexcept nogil:
    """``x`` rounded to float16 (16), float32 (32) or left in float64 (64).

    Each operation is done in double and rounded to its result type; for
    +, -, * of operands no wider than that type this equals the operation in
    that type (53 >= 2 * 24 + 2 and 24 >= 2 * 11 + 2 rule out double
    rounding).  To float16 the double is rounded once (see :func:`_to_half`).
    """
    if bits == 32:
        return <float>x
    if bits == 16:
        return cynag_half_to_float(_to_half(x))
    return x


cdef inline uint16_t _to_half(double x) noexcept nogil:
    """``x`` rounded once to float16 (nearest, ties to even), as NumPy converts
    a double: rounded to odd in float32 first (24 >= 11 + 2 bits), so that
    the float32 step cannot make a tie of one that was not."""
    return cynag_float_to_half(cynag_float_round_to_odd(x))


cdef inline double _load(const storage_t* a) noexcept nogil:
    if storage_t is uint16_t:
        return cynag_half_to_float(a[0])
    else:
        return a[0]


cdef inline void _store(storage_t* a, double x) noexcept nogil:
    if storage_t is uint16_t:
        a[0] = _to_half(x)
    else:
        a[0] = <storage_t>x


def nesterov_ag_promoted(storage_t[::1] param,        # IN/OUT
                         const storage_t[::1] grad,   # IN
                         storage_t[::1] v,            # IN/OUT
                         double lr, double momentum, double mm, double c,
                         int r_vm, int r_lrg, int r_vsub, int r_mmv, int r_padd,
                         int r_cg, int r_psub):
    """Chainer's four in-place operations with explicit result types.

    Runs ``v *= m; v -= lr * g; p += mm * v; p -= c * g`` element by element,
    each operation rounded to the type given by its ``r_*`` code (16, 32 or
    64 bits) and each in-place result stored into the array's own dtype, as
    NumPy does.  The caller derives the codes from NumPy 1.x's promotion
    rules: used for 0-d arrays (which NumPy 1.x promotes like scalars) and
    for coefficients too large for float32 (kept in float64 by value-based
    casting).  Serial: these cases are tiny or pathological.
    """
    cdef Py_ssize_t i, n = param.shape[0]
    cdef double gi, t
    if grad.shape[0] != n or v.shape[0] != n:
        raise ValueError("param, grad and v must have the same length")
    with nogil:
        for i in range(n):
            gi = _load(&grad[i])
            _store(&v[i], _round_to(_load(&v[i]) * momentum, r_vm))
            t = _round_to(lr * gi, r_lrg)
            _store(&v[i], _round_to(_load(&v[i]) - t, r_vsub))
            t = _round_to(mm * _load(&v[i]), r_mmv)
            _store(&param[i], _round_to(_load(&param[i]) + t, r_padd))
            t = _round_to(c * gi, r_cg)
            _store(&param[i], _round_to(_load(&param[i]) - t, r_psub))


# --------------------------------------------------------------------------
# float16 conversion, exposed for the tests of _half.h
# --------------------------------------------------------------------------
def half_bits_to_float(const uint16_t[::1] src, float[::1] dst):
    """dst[i] = float(src[i]) where src holds float16 bit patterns."""
    cdef Py_ssize_t i
    if dst.shape[0] != src.shape[0]:
        raise ValueError("dst has %d elements but src has %d" % (dst.shape[0], src.shape[0]))
    with nogil:
        for i in range(src.shape[0]):
            dst[i] = cynag_half_to_float(src[i])


def float_to_half_bits(const float[::1] src, uint16_t[::1] dst):
    """dst[i] = float16 bit pattern of src[i], rounded to nearest even."""
    cdef Py_ssize_t i
    if dst.shape[0] != src.shape[0]:
        raise ValueError("dst has %d elements but src has %d" % (dst.shape[0], src.shape[0]))
    with nogil:
        for i in range(src.shape[0]):
            dst[i] = cynag_float_to_half(src[i])
