# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Packing many arrays into one communication buffer, and back.

Used by :mod:`cynag.multinode` to average gradients across processes with a
few large messages instead of one message per parameter.  A *group* is a
list of arrays of one dtype; its elements, concatenated in list order (each
array in memory order), form a virtual vector of ``offsets[-1]`` elements.
:func:`pack` copies the slice ``[lo, hi)`` of that vector into a buffer (a
bucket) and :func:`unpack` copies a bucket back, optionally multiplying by a
scale in the arrays' dtype.  A list of float16 arrays is packed into a float32
buffer (MPI has no float16 sum), as ChainerMN's communicators do.

Arithmetic of :func:`unpack` with ``mean=True`` (``scale`` already rounded to
the arrays' dtype by the caller), as NumPy computes ``grad *= scale``:

* float32 / float64: ``dst = buf * scale`` in the dtype;
* float16: ``h = half(buf)`` (``astype(float16)``), then
  ``dst = half(float(h) * float(scale))``: NumPy's float16 multiply (the
  product of two float16 values is exact in float32, so it is rounded once).

Arrays must be dense (C- or F-contiguous, elements taken in memory order);
:func:`scan` checks a list once per step and reports, per entry, what is
wrong with it; :func:`gather` reads the arrays from an attribute of a
list of objects and checks them in the same pass, and :func:`same_entries`
tells whether a list of ``(key, object)`` pairs and the shapes of one
attribute of the objects are still those recorded.  Nothing here knows MPI,
parameters or models.
"""
cimport numpy as cnp
from libc.stdint cimport int8_t, int32_t, int64_t, uint16_t
from libc.string cimport memcpy, memset

cnp.import_array()

cdef extern from "numpy/arrayobject.h":
    enum: NPY_HALF

cdef extern from "_half.h" nogil:
    float cynag_half_to_float(uint16_t h)
    uint16_t cynag_float_to_half(float f)

# Codes written by scan() for each entry.
OK = 0
NONE = 1
NOT_NDARRAY = 2
BAD_DTYPE = 3
BAD_SIZE = 4
NOT_DENSE = 5
READ_ONLY = 6


cdef inline bint _dense(cnp.ndarray a):
    return cnp.PyArray_IS_C_CONTIGUOUS(a) or cnp.PyArray_IS_F_CONTIGUOUS(a)


cdef inline int8_t _code(object obj, int typenum, int64_t size, bint writeable,
                        int64_t* ptr, const int64_t* dims=NULL, Py_ssize_t nd=-1) noexcept:
    """What :func:`scan` reports for one entry; ``ptr[0]`` its address when OK.

    With ``dims`` (``nd`` of them), the array must have that shape, and be C
    contiguous to be OK: its elements then travel in the order of every
    other rank's (an F-ordered array is NOT_DENSE, copied in C order).
    """
    cdef cnp.ndarray a
    cdef Py_ssize_t d
    ptr[0] = 0
    if obj is None:
        return NONE
    if not cnp.PyArray_Check(obj):
        return NOT_NDARRAY
    a = <cnp.ndarray>obj
    if cnp.PyArray_TYPE(a) != typenum:
        return BAD_DTYPE
    if cnp.PyArray_SIZE(a) != size:
        return BAD_SIZE
    if nd >= 0:
        if cnp.PyArray_NDIM(a) != nd:
            return BAD_SIZE
        for d in range(nd):
            if cnp.PyArray_DIMS(a)[d] != dims[d]:
                return BAD_SIZE
    # (before the density: an array that is not dense is copied and written
    # back after the collective operation, which a read-only one would fail)
    if writeable and not cnp.PyArray_ISWRITEABLE(a):
        return READ_ONLY
    if nd >= 0:
        if not cnp.PyArray_IS_C_CONTIGUOUS(a):
            return NOT_DENSE
    elif not _dense(a):
        return NOT_DENSE
    ptr[0] = <int64_t><size_t>cnp.PyArray_DATA(a)
    return OK


def scan(list arrays, int typenum, const int64_t[::1] sizes, int64_t[::1] ptrs,
         int8_t[::1] codes, bint writeable=True, const int64_t[::1] shape_at=None,
         const int64_t[::1] dims=None):
    """Check ``arrays`` against the expected dtype and sizes; return the number of bad entries.

    For entry ``i``: ``codes[i]`` is :data:`OK` (a dense NumPy array of type
    number ``typenum`` and ``sizes[i]`` elements, writeable if asked) or
    the reason it is not (:data:`NONE`, :data:`NOT_NDARRAY`,
    :data:`BAD_DTYPE`, :data:`BAD_SIZE`, :data:`NOT_DENSE`,
    :data:`READ_ONLY`); ``ptrs[i]`` is its data address (0 if not OK).
    With ``shape_at`` and ``dims`` (entry ``i``'s shape is
    ``dims[shape_at[i]:shape_at[i + 1]]``), another shape is ``BAD_SIZE``
    and only a C-contiguous array is dense.
    """
    cdef Py_ssize_t i, n = len(arrays)
    cdef int nbad = 0
    cdef int8_t code
    cdef int64_t ptr
    cdef bint shaped = shape_at is not None
    if sizes.shape[0] < n or ptrs.shape[0] < n or codes.shape[0] < n:
        raise ValueError("scan: sizes, ptrs and codes need %d entries" % n)
    if shaped and (dims is None or shape_at.shape[0] < n + 1
                   or (n and dims.shape[0] < shape_at[n])):
        raise ValueError("scan: shape_at needs %d entries and dims what they index" % (n + 1))
    for i in range(n):
        if shaped:
            code = _code(arrays[i], typenum, sizes[i], writeable, &ptr,
                         &dims[shape_at[i]] if shape_at[i + 1] > shape_at[i] else NULL,
                         shape_at[i + 1] - shape_at[i])
        else:
            code = _code(arrays[i], typenum, sizes[i], writeable, &ptr)
        ptrs[i] = ptr
        codes[i] = code
        if code != OK:
            nbad += 1
    return nbad


def gather(list objs, str attr, int typenum, const int64_t[::1] sizes, int64_t[::1] ptrs,
           int8_t[::1] codes, list out, bint writeable=True):
    """:func:`scan` of ``getattr(obj, attr)`` for each of ``objs``, in one pass.

    ``out[i]`` receives ``getattr(objs[i], attr)`` (``out`` is a list of at
    least ``len(objs)`` entries, which the caller keeps while it uses the
    addresses); ``codes`` and ``ptrs`` are filled as :func:`scan` fills them.
    Returns the number of entries that are not :data:`OK`.  An exception
    raised by an attribute read propagates (``out`` is then partly filled).
    """
    cdef Py_ssize_t i, n = len(objs)
    cdef int nbad = 0
    cdef int8_t code
    cdef int64_t ptr
    cdef object a
    if sizes.shape[0] < n or ptrs.shape[0] < n or codes.shape[0] < n or len(out) < n:
        raise ValueError("gather: sizes, ptrs, codes and out need %d entries" % n)
    for i in range(n):
        a = getattr(objs[i], attr)
        out[i] = a
        code = _code(a, typenum, sizes[i], writeable, &ptr)
        ptrs[i] = ptr
        codes[i] = code
        if code != OK:
            nbad += 1
    return nbad


# Kinds of entries for same_entries().
KIND_NONE = -1       # the attribute is None
KIND_OTHER = -2      # neither None nor a NumPy array (the caller checks it further)
KIND_SET = -3        # anything but None


def same_entries(list items, list keys, list objs, str attr, const int32_t[::1] kinds,
                 const int64_t[::1] shape_at, const int64_t[::1] dims, list values=None):
    """True if ``items`` still holds ``zip(keys, objs)`` and every ``getattr(obj, attr)``
    still has the recorded kind, type number and shape.

    ``items[i]`` must be a 2-tuple whose first element equals ``keys[i]``
    and whose second element *is* ``objs[i]``.  ``kinds[i]`` is
    :data:`KIND_NONE`, :data:`KIND_OTHER`, :data:`KIND_SET` or a NumPy
    type number: then the attribute must be a NumPy array of that type
    number whose shape is ``dims[shape_at[i]:shape_at[i + 1]]``.  One pass,
    stopping at the first difference.  ``values``: the attributes already
    read (``values[i]`` stands for ``getattr(objs[i], attr)``).
    """
    cdef Py_ssize_t i, d, nd, n = len(keys)
    cdef object item, key, a
    cdef int kind
    cdef cnp.ndarray arr
    cdef cnp.npy_intp* shape
    if len(items) != n:
        return False
    if len(objs) != n or kinds.shape[0] < n or shape_at.shape[0] < n + 1 \
            or (values is not None and len(values) < n):
        raise ValueError("same_entries: keys, objs, kinds and shape_at disagree")
    for i in range(n):
        item = items[i]
        if type(item) is not tuple or len(<tuple>item) != 2:
            return False
        if (<tuple>item)[1] is not objs[i]:
            return False
        key = (<tuple>item)[0]
        if key is not keys[i] and not (key == keys[i]):
            return False
        a = getattr(objs[i], attr) if values is None else values[i]
        kind = kinds[i]
        if kind == KIND_NONE:
            if a is not None:
                return False
        elif kind == KIND_SET:
            if a is None:
                return False
        elif kind == KIND_OTHER:
            if a is None or cnp.PyArray_Check(a):
                return False
        else:
            if not cnp.PyArray_Check(a):
                return False
            arr = <cnp.ndarray>a
            nd = cnp.PyArray_NDIM(arr)
            if cnp.PyArray_TYPE(arr) != kind or nd != shape_at[i + 1] - shape_at[i]:
                return False
            shape = cnp.PyArray_DIMS(arr)
            for d in range(nd):
                if shape[d] != dims[shape_at[i] + d]:
                    return False
    return True


cdef inline cnp.ndarray _checked(object obj, int typenum, int64_t size):
    if not cnp.PyArray_Check(obj):
        raise TypeError("expected a NumPy array, got %s" % type(obj).__name__)
    cdef cnp.ndarray a = <cnp.ndarray>obj
    if cnp.PyArray_TYPE(a) != typenum or cnp.PyArray_SIZE(a) != size or not _dense(a):
        raise ValueError("array does not match the packing layout (dtype %s, %d elements, "
                         "dense expected)" % (a.dtype, size))
    return a


cdef inline void _bounds(const int64_t[::1] offsets, Py_ssize_t first, Py_ssize_t last,
                         int64_t lo, int64_t hi, Py_ssize_t n) except *:
    if not (0 <= first <= last <= n and offsets.shape[0] > last):
        raise IndexError("tensor range [%d, %d) outside the %d arrays" % (first, last, n))
    if not (offsets[first] <= lo <= hi <= offsets[last]):
        raise IndexError("element range [%d, %d) outside the tensors' [%d, %d)"
                         % (lo, hi, offsets[first], offsets[last]))


cdef inline int _checked_call(cnp.ndarray buf, int btype, int atype, const int64_t[::1] offsets,
                              Py_ssize_t first, Py_ssize_t last, int64_t lo, int64_t hi,
                              Py_ssize_t n) except -1:
    """The checks :func:`pack` and :func:`unpack` make before copying."""
    _check_buf(buf, btype, hi - lo)
    _check_types(atype, btype)
    _bounds(offsets, first, last, lo, hi, n)
    return 0


cdef inline bint _span(const int64_t[::1] offsets, Py_ssize_t i, int64_t lo, int64_t hi,
                       int64_t* s, int64_t* e) noexcept nogil:
    """Set ``[s, e)`` to the elements of entry ``i`` inside ``[lo, hi)``; False if none."""
    cdef int64_t a0 = offsets[i]
    cdef int64_t a1 = offsets[i + 1]
    s[0] = a0 if a0 > lo else lo
    e[0] = a1 if a1 < hi else hi
    return s[0] < e[0]


cdef inline cnp.ndarray _overlap(list arrays, const int64_t[::1] offsets, Py_ssize_t i,
                                 int64_t lo, int64_t hi, int atype, int64_t* s, int64_t* e):
    """``arrays[i]`` (checked), with ``[s, e)`` set to its elements inside ``[lo, hi)``;
    None where it has none."""
    if not _span(offsets, i, lo, hi, s, e):
        return None
    return _checked(arrays[i], atype, offsets[i + 1] - offsets[i])


cdef inline void _check_buf(cnp.ndarray buf, int btype, int64_t n) except *:
    if btype != cnp.NPY_FLOAT and btype != cnp.NPY_DOUBLE and btype != NPY_HALF:
        raise TypeError("buffer dtype %s is not supported" % buf.dtype)
    if cnp.PyArray_NDIM(buf) != 1 or not cnp.PyArray_IS_C_CONTIGUOUS(buf):
        raise ValueError("buffer must be a contiguous 1-d array")
    if n < 0 or cnp.PyArray_SIZE(buf) < n:
        raise ValueError("buffer of %d elements is smaller than the %d to pack"
                         % (cnp.PyArray_SIZE(buf), n))


cdef inline void _check_types(int atype, int btype) except *:
    if atype != btype and not (atype == NPY_HALF and btype == cnp.NPY_FLOAT):
        raise TypeError("arrays of type number %d cannot be packed into a buffer of type "
                        "number %d" % (atype, btype))


def scale(cnp.ndarray buf, int64_t lo, int64_t hi, double scale):
    """``buf[lo:hi] *= scale`` in place, in ``buf``'s dtype (float32 or float64).

    ``scale`` must already be a value of that dtype (see :func:`unpack`).
    """
    cdef int btype = cnp.PyArray_TYPE(buf)
    cdef int64_t k
    cdef float fs = <float>scale
    cdef float* f
    cdef double* d
    if cnp.PyArray_NDIM(buf) != 1 or not cnp.PyArray_IS_C_CONTIGUOUS(buf):
        raise ValueError("buffer must be a contiguous 1-d array")
    if not cnp.PyArray_ISWRITEABLE(buf):
        raise ValueError("buffer is read-only")
    if not (0 <= lo <= hi <= cnp.PyArray_SIZE(buf)):
        raise IndexError("range [%d, %d) outside the buffer of %d elements"
                         % (lo, hi, cnp.PyArray_SIZE(buf)))
    if btype == cnp.NPY_FLOAT:
        f = <float*>cnp.PyArray_DATA(buf)
        with nogil:
            for k in range(lo, hi):
                f[k] = f[k] * fs
    elif btype == cnp.NPY_DOUBLE:
        d = <double*>cnp.PyArray_DATA(buf)
        with nogil:
            for k in range(lo, hi):
                d[k] = d[k] * scale
    else:
        raise TypeError("scale: buffer dtype %s is not supported" % buf.dtype)


cdef int64_t[::1] _addresses(list arrays, const int64_t[::1] offsets, Py_ssize_t first,
                              Py_ssize_t last, int64_t lo, int64_t hi, int atype,
                              bint writeable):
    """Data addresses of ``arrays[first:last]`` (checked; 0 where outside ``[lo, hi)``)."""
    cdef cnp.npy_intp n = len(arrays)
    cdef int64_t[::1] ptrs = cnp.PyArray_ZEROS(1, &n, cnp.NPY_INT64, 0)
    cdef Py_ssize_t i
    cdef int64_t s, e
    cdef cnp.ndarray a
    for i in range(first, last):
        a = _overlap(arrays, offsets, i, lo, hi, atype, &s, &e)
        if a is None:
            continue
        if writeable and not cnp.PyArray_ISWRITEABLE(a):
            raise ValueError("unpack: array %d is read-only" % i)
        ptrs[i] = <int64_t><size_t>cnp.PyArray_DATA(a)
    return ptrs


cdef void _pack_core(const int64_t[::1] ptrs, char* dst, Py_ssize_t item, bint widen,
                     const int64_t[::1] offsets, Py_ssize_t first, Py_ssize_t last,
                     int64_t lo, int64_t hi) noexcept nogil:
    cdef Py_ssize_t i, k
    cdef int64_t a0, s, e
    cdef const uint16_t* hsrc
    cdef float* fdst
    for i in range(first, last):
        if not _span(offsets, i, lo, hi, &s, &e) or ptrs[i] == 0:
            continue
        a0 = offsets[i]
        if not widen:
            memcpy(dst + (s - lo) * item, <char*><size_t>ptrs[i] + (s - a0) * item,
                   <size_t>((e - s) * item))
        else:
            hsrc = <const uint16_t*><size_t>ptrs[i] + (s - a0)
            fdst = <float*>dst + (s - lo)
            for k in range(e - s):
                fdst[k] = cynag_half_to_float(hsrc[k])


cdef void _unpack_core(const int64_t[::1] ptrs, char* src, Py_ssize_t item, int btype,
                       bint narrow, bint mean, double scale, const int64_t[::1] offsets,
                       Py_ssize_t first, Py_ssize_t last, int64_t lo,
                       int64_t hi) noexcept nogil:
    cdef Py_ssize_t i, k
    cdef int64_t a0, s, e, count
    cdef float fs = <float>scale
    cdef float* fsrc
    cdef float* fdst
    cdef double* dsrc
    cdef double* ddst
    cdef uint16_t* hdst
    for i in range(first, last):
        if not _span(offsets, i, lo, hi, &s, &e) or ptrs[i] == 0:
            continue
        a0 = offsets[i]
        count = e - s
        if narrow:  # float16 arrays, float32 buffer
            fsrc = <float*>src + (s - lo)
            hdst = <uint16_t*><size_t>ptrs[i] + (s - a0)
            if mean:
                for k in range(count):
                    hdst[k] = cynag_float_to_half(
                        cynag_half_to_float(cynag_float_to_half(fsrc[k])) * fs)
            else:
                for k in range(count):
                    hdst[k] = cynag_float_to_half(fsrc[k])
        elif not mean:
            memcpy(<char*><size_t>ptrs[i] + (s - a0) * item, src + (s - lo) * item,
                   <size_t>(count * item))
        elif btype == cnp.NPY_FLOAT:
            fsrc = <float*>src + (s - lo)
            fdst = <float*><size_t>ptrs[i] + (s - a0)
            for k in range(count):
                fdst[k] = fsrc[k] * fs
        else:
            dsrc = <double*>src + (s - lo)
            ddst = <double*><size_t>ptrs[i] + (s - a0)
            for k in range(count):
                ddst[k] = dsrc[k] * scale


cdef inline void _check_addresses(const int64_t[::1] ptrs, const int64_t[::1] offsets,
                                  Py_ssize_t first, Py_ssize_t last, int64_t lo,
                                  int64_t hi) except *:
    cdef Py_ssize_t i
    for i in range(first, last):
        if ptrs[i] == 0 and offsets[i] < offsets[i + 1] and offsets[i] < hi \
                and offsets[i + 1] > lo:
            raise ValueError("entry %d has no address (not checked by scan)" % i)


cdef inline void _check_mean(int btype, int atype, bint mean) except *:
    if mean and atype == btype and btype != cnp.NPY_FLOAT and btype != cnp.NPY_DOUBLE:
        raise TypeError("mean of a buffer of type number %d is not supported" % btype)


def pack(list arrays, cnp.ndarray buf, const int64_t[::1] offsets, Py_ssize_t first,
         Py_ssize_t last, int64_t lo, int64_t hi, int typenum=-1):
    """Copy elements ``[lo, hi)`` of the concatenation of ``arrays`` into ``buf[:hi - lo]``.

    ``arrays[i]`` holds the elements ``[offsets[i], offsets[i + 1])`` of the
    virtual vector; only ``arrays[first:last]`` are read (they must cover
    ``[lo, hi)``).  ``buf`` is a contiguous 1-d array of the arrays' dtype,
    or float32 for float16 arrays (converted exactly).
    """
    cdef int btype = cnp.PyArray_TYPE(buf)
    cdef int atype = btype if typenum < 0 else typenum
    _checked_call(buf, btype, atype, offsets, first, last, lo, hi, len(arrays))
    cdef int64_t[::1] ptrs = _addresses(arrays, offsets, first, last, lo, hi, atype, False)
    cdef char* dst = <char*>cnp.PyArray_DATA(buf)
    cdef Py_ssize_t item = cnp.PyArray_ITEMSIZE(buf)
    with nogil:
        _pack_core(ptrs, dst, item, atype != btype, offsets, first, last, lo, hi)


def unpack(list arrays, cnp.ndarray buf, const int64_t[::1] offsets, Py_ssize_t first,
           Py_ssize_t last, int64_t lo, int64_t hi, bint mean=False, double scale=1.0,
           int typenum=-1):
    """Copy ``buf[:hi - lo]`` back into elements ``[lo, hi)`` of ``arrays`` (see :func:`pack`).

    With ``mean``, every element is multiplied by ``scale`` (a value of the
    arrays' dtype) in that dtype, as ``grad *= scale`` does in NumPy; a
    float16 array receives ``half(buf)`` first, then the float16 product.
    Without ``mean`` the elements are copied (converted to float16 for a
    float32 buffer of float16 arrays).
    """
    cdef int btype = cnp.PyArray_TYPE(buf)
    cdef int atype = btype if typenum < 0 else typenum
    _checked_call(buf, btype, atype, offsets, first, last, lo, hi, len(arrays))
    _check_mean(btype, atype, mean)
    cdef int64_t[::1] ptrs = _addresses(arrays, offsets, first, last, lo, hi, atype, True)
    cdef char* src = <char*>cnp.PyArray_DATA(buf)
    cdef Py_ssize_t item = cnp.PyArray_ITEMSIZE(buf)
    with nogil:
        _unpack_core(ptrs, src, item, btype, atype != btype, mean, scale, offsets, first,
                     last, lo, hi)


def pack_at(const int64_t[::1] ptrs, cnp.ndarray buf, const int64_t[::1] offsets,
            Py_ssize_t first, Py_ssize_t last, int64_t lo, int64_t hi, int typenum=-1):
    """:func:`pack` from data addresses: ``ptrs[i]`` is the address :func:`scan`
    reported for entry ``i`` (code OK) of a list the caller still holds.

    Same copy as :func:`pack` without touching the array objects (a few
    nanoseconds per array instead of tens): for lists of many small arrays
    checked by :func:`scan` in the same step.
    """
    cdef int btype = cnp.PyArray_TYPE(buf)
    cdef int atype = btype if typenum < 0 else typenum
    _checked_call(buf, btype, atype, offsets, first, last, lo, hi, ptrs.shape[0])
    _check_addresses(ptrs, offsets, first, last, lo, hi)
    cdef char* dst = <char*>cnp.PyArray_DATA(buf)
    cdef Py_ssize_t item = cnp.PyArray_ITEMSIZE(buf)
    with nogil:
        _pack_core(ptrs, dst, item, atype != btype, offsets, first, last, lo, hi)


def unpack_at(const int64_t[::1] ptrs, cnp.ndarray buf, const int64_t[::1] offsets,
              Py_ssize_t first, Py_ssize_t last, int64_t lo, int64_t hi, bint mean=False,
              double scale=1.0, int typenum=-1):
    """:func:`unpack` into data addresses (see :func:`pack_at`); the arrays must
    have been checked writeable by :func:`scan`."""
    cdef int btype = cnp.PyArray_TYPE(buf)
    cdef int atype = btype if typenum < 0 else typenum
    _checked_call(buf, btype, atype, offsets, first, last, lo, hi, ptrs.shape[0])
    _check_mean(btype, atype, mean)
    _check_addresses(ptrs, offsets, first, last, lo, hi)
    cdef char* src = <char*>cnp.PyArray_DATA(buf)
    cdef Py_ssize_t item = cnp.PyArray_ITEMSIZE(buf)
    with nogil:
        _unpack_core(ptrs, src, item, btype, atype != btype, mean, scale, offsets, first,
                     last, lo, hi)


def add_into(cnp.ndarray v, int64_t lo, int64_t hi, cnp.ndarray t, double scale,
             bint apply_scale):
    """``v[lo:hi] = v[lo:hi] + t[:hi - lo]``, then ``*= scale`` if ``apply_scale``.

    One pass, in ``v``'s dtype (float32 or float64), each operation rounded
    (an addition, then a multiplication: nothing to contract): the local
    step of a ring reduction, whose last addition is fused with the
    multiplication of the mean (``scale`` already rounded to the dtype).
    """
    cdef int vtype = cnp.PyArray_TYPE(v)
    cdef int64_t k, n = hi - lo
    cdef float fs = <float>scale
    cdef float* fv
    cdef const float* ft
    cdef double* dv
    cdef const double* dt
    if cnp.PyArray_NDIM(v) != 1 or not cnp.PyArray_IS_C_CONTIGUOUS(v) \
            or cnp.PyArray_NDIM(t) != 1 or not cnp.PyArray_IS_C_CONTIGUOUS(t):
        raise ValueError("add_into: contiguous 1-d arrays expected")
    if cnp.PyArray_TYPE(t) != vtype:
        raise TypeError("add_into: dtypes differ (%s, %s)" % (v.dtype, t.dtype))
    if not cnp.PyArray_ISWRITEABLE(v):
        raise ValueError("add_into: array is read-only")
    if not (0 <= lo <= hi <= cnp.PyArray_SIZE(v)) or cnp.PyArray_SIZE(t) < n:
        raise IndexError("add_into: range [%d, %d) outside the arrays" % (lo, hi))
    if vtype == cnp.NPY_FLOAT:
        fv = <float*>cnp.PyArray_DATA(v) + lo
        ft = <const float*>cnp.PyArray_DATA(t)
        with nogil:
            if apply_scale:
                for k in range(n):
                    fv[k] = (fv[k] + ft[k]) * fs
            else:
                for k in range(n):
                    fv[k] = fv[k] + ft[k]
    elif vtype == cnp.NPY_DOUBLE:
        dv = <double*>cnp.PyArray_DATA(v) + lo
        dt = <const double*>cnp.PyArray_DATA(t)
        with nogil:
            if apply_scale:
                for k in range(n):
                    dv[k] = (dv[k] + dt[k]) * scale
            else:
                for k in range(n):
                    dv[k] = dv[k] + dt[k]
    else:
        raise TypeError("add_into: dtype %s is not supported" % v.dtype)
