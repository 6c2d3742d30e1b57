# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The collection of one optimizer step: one native pass over the parameter objects.

:func:`scan` walks the target's parameter objects once per step and, for
each, reads its update rule, array, gradient and loss scale, the rule's
flags, state and hyperparameters, checks the arrays from their headers
(dtype, shape, contiguity, alignment, byte order, writability, disjointness)
and fills one row of the step's table: the addresses and coefficients the
multi-tensor kernel takes.  Nothing is remembered from one step to the next:
every step reads the objects as they are, so no change can go unnoticed,
whoever makes it and whatever the parameter's class.  (:func:`link_params`,
which lists a Chainer model's parameters as ``params()`` does, keeps the
sorted order of each link's name set, and uses it only after seeing that the
set holds the same name objects in the same order.)

A row gets one of these codes:

* ``SKIP`` -- nothing to update: no update rule, or a disabled rule;
* ``FAST`` -- updated by the multi-tensor kernel (a CPU row of the table);
* ``GPU`` -- a candidate for the GPU multi-tensor launch (the arrays are not
  NumPy arrays; the caller checks and groups them);
* ``REST`` -- updated by its rule (``param.update()``), as Chainer does;
* ``NEEDS_GRAD`` -- as ``FAST`` but the gradient is ``None``: the optimizer
  allocates zeros and scans the row again.

``flags`` marks every initialized parameter whose gradient is ``None``
(``CLEARED``), whatever its code: the optimizer reallocates those, as
Chainer's ``reallocate_cleared_grads`` does; and every one whose gradient is
a read-only NumPy array (``GRAD_READ_ONLY``): the optimizer refuses the step
if a hook may write it.

How attributes are read depends on the parameter's class (decided once per
class by the caller, see ``cynag._multi_tensor``): cynag's ``Parameter``
from its slots, Chainer 7's ``chainer.Parameter`` from its instance
dictionary (the non-ChainerX, standard-layout case; anything else through
the public properties), any other class through ``getattr``.  Update rules
whose class takes the multi-tensor kernel are read from
:class:`cynag.optimizer.UpdateRule`'s slots.

:func:`mark_overlaps` then moves to ``REST`` every ``FAST`` row whose arrays
overlap an array of another row or one of the caller's extra arrays (those
of the parameters updated by their rules), in time linear in the number of
arrays (arrays are grouped by the allocation that owns their memory; only
arrays of one allocation are compared by address).
"""
cimport numpy as cnp
from cpython.object cimport PyObject, PyTypeObject
from libc.stdint cimport int64_t, uint8_t, int32_t, uint32_t, uintptr_t
from libc.stdlib cimport malloc, calloc, free, qsort
from libc.string cimport memset
from cpython.pycapsule cimport PyCapsule_GetPointer

import numpy

cdef extern from "_dense.h":
    int cynag_dense_type(object param, object grad, object v, bint grad_written)

cnp.import_array()

cdef extern from "numpy/arrayobject.h":
    enum: NPY_HALF

cdef extern from "_kernel_api.h":
    const char* CYNAG_KERNEL_API_NAME
    ctypedef struct cynag_kernel_api:
        int n_coef
        int n_op_words
        int (*run_table)(const int64_t*, const int64_t*, const double*, Py_ssize_t, int, int,
                         int, int, const double*, int, int) noexcept nogil
        Py_ssize_t (*compact)(const int64_t*, const int64_t*, const double*, const uint8_t*,
                              int, const int32_t*, int, Py_ssize_t, Py_ssize_t, int64_t*,
                              int64_t*, double*) noexcept nogil

cdef extern from "_nag_coef.h" nogil:
    int CYNAG_N_COEF
    int cynag_nag_coefficients(int type_num, double lr, double m, int has_ls, double ls,
                               double* out)

cdef extern from *:
    """
    static inline unsigned int cynag_type_tag(PyTypeObject *t)
    {
    #if PY_VERSION_HEX >= 0x030C0000
        return t->tp_version_tag;
    #else
        return (t->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG) ? t->tp_version_tag : 0;
    #endif
    }

    /* Whether instances of t can have a __dict__ (a class with __slots__ and
       no __dict__ slot has neither an offset nor a managed dictionary). */
    static inline int cynag_type_has_dict(PyTypeObject *t)
    {
    #ifdef Py_TPFLAGS_MANAGED_DICT
        if (t->tp_flags & Py_TPFLAGS_MANAGED_DICT)
            return 1;
    #endif
        return t->tp_dictoffset != 0;
    }

    /* Whether t looks its instances' attributes up as object does (no
       __getattribute__ or __getattr__ of its own). */
    static inline int cynag_generic_getattr(PyTypeObject *t)
    {
        return t->tp_getattro == PyObject_GenericGetAttr;
    }
    """
    unsigned int cynag_type_tag(PyTypeObject* t)
    bint cynag_type_has_dict(PyTypeObject* t)
    bint cynag_generic_getattr(PyTypeObject* t)

cdef extern from "Python.h":
    # Borrowed reference or NULL; a lookup by str key cannot raise here.
    PyObject* PyDict_GetItem "PyDict_GetItemWithError"(PyObject* d, PyObject* key)
    Py_ssize_t PyDict_Size(PyObject* d)
    bint PyDict_Check(PyObject* o)
    bint PyFloat_CheckExact(PyObject* o)
    double PyFloat_AS_DOUBLE(PyObject* o)
    bint PyLong_CheckExact(PyObject* o)
    long long PyLong_AsLongLongAndOverflow(PyObject* o, int* overflow)
    bint PyList_CheckExact(PyObject* o)
    bint PyUnicode_CheckExact(PyObject* o)
    int PyUnicode_Compare(object a, object b) except? -1
    Py_ssize_t PyList_GET_SIZE(PyObject* o)
    PyObject* PyList_GET_ITEM(PyObject* o, Py_ssize_t i)
    void PyList_SET_ITEM_raw "PyList_SET_ITEM"(PyObject* o, Py_ssize_t i, PyObject* v)
    PyTypeObject* Py_TYPE(PyObject* o)
    int PyObject_IsTrue(PyObject* o) except -1
    object PyObject_GenericGetDict(object o, void* context)
    ctypedef struct PyMemberDef:
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member
    PyTypeObject PyMemberDescr_Type
    PyObject* PyLong_FromLongLong(long long v)
    int PyDict_Next(PyObject* d, Py_ssize_t* pos, PyObject** key, PyObject** value)
    void Py_DECREF(PyObject* o)
    void Py_INCREF(PyObject* o)
    void Py_XDECREF(PyObject* o)


cdef inline void _list_set(list lst, Py_ssize_t i, object value) noexcept:
    """``lst[i] = value`` for an index known to be in range."""
    cdef PyObject* old = PyList_GET_ITEM(<PyObject*>lst, i)
    Py_INCREF(<PyObject*>value)
    PyList_SET_ITEM_raw(<PyObject*>lst, i, <PyObject*>value)
    Py_XDECREF(old)


# Row codes.
SKIP = 0
FAST = 1
GPU = 2
REST = 3
NEEDS_GRAD = 4
cdef enum:
    C_SKIP = 0
    C_FAST = 1
    C_GPU = 2
    C_REST = 3
    C_NEEDS_GRAD = 4

# Row flags.
CLEARED = 1
GRAD_READ_ONLY = 4
cdef enum:
    F_CLEARED = 1
    F_OVERLAP = 2
    F_GRAD_READ_ONLY = 4

# Parameter classes (values of the ``param_kinds`` dictionary).
PARAM_GENERIC = 0     # getattr of the public attributes
PARAM_CYNAG = 1       # cynag.Parameter: slots
PARAM_CHAINER = 2     # chainer.Parameter (Chainer 7): instance dictionary
PARAM_UPDATE_OK = 8   # its update() is update_rule.update(self)
cdef enum:
    K_GENERIC = 0
    K_CYNAG = 1
    K_CHAINER = 2
    K_UPDATE_OK = 8

# Update rule classes (values of the ``rule_kinds`` dictionary).
RULE_OTHER = 0        # updated by the rule itself
RULE_NESTEROV_AG = 1  # NesterovAG: the multi-tensor kernel
cdef enum:
    R_OTHER = 0
    R_NAG = 1

cdef object _TRUE_OBJ = True   # (a bare True/False cast to a pointer would be 1/0)
cdef object _FALSE_OBJ = False

# Interned attribute names.
cdef object S_ARRAY = "array"
cdef object S_GRAD = "grad"
cdef object S_RULE = "update_rule"
cdef object S_LOSS_SCALE = "_loss_scale"
cdef object S_V = "v"
cdef object S_LR = "lr"
cdef object S_MOMENTUM = "momentum"
cdef object S_PARENT = "_parent"
cdef object S_DATA = "_data"
cdef object S_LAYOUT = "_layout"
cdef object S_CHAINERX = "_has_chainerx_array"
cdef object S_GRAD_VALID = "_grad_valid"
cdef object S_GRAD_VAR = "_grad_var"
cdef object S_GRAD_PRIV = "_grad"
cdef object S_UPDATE = "update"

# Slot offsets, set by configure().
cdef Py_ssize_t OFF_P_ARRAY = -1, OFF_P_GRAD = -1, OFF_P_RULE = -1, OFF_P_LS = -1
cdef Py_ssize_t OFF_P_UPDATE = -1
cdef Py_ssize_t OFF_R_ENABLED = -1, OFF_R_T = -1, OFF_R_STATE = -1, OFF_R_HP = -1
cdef Py_ssize_t OFF_R_HOOKABLE = -1, OFF_R_FP32 = -1, OFF_R_OVERRIDDEN = -1
cdef Py_ssize_t OFF_H_COUNT = -1
cdef bint _configured = False
# chainer.Variable (the class of a gradient variable), when Chainer 7 is in use.
cdef PyTypeObject* _chainer_variable_type = NULL
cdef object _chainer_variable_ref = None

# Classification of classes: {type: kind}; the callbacks fill missing entries.
cdef dict _param_kinds = {}
cdef dict _rule_kinds = {}
cdef object _classify_param = None
cdef object _classify_rule = None


cdef Py_ssize_t _member_offset(object cls, str name) except -1:
    descr = cls.__dict__[name]
    tp = type(descr)
    if <PyTypeObject*>tp is not &PyMemberDescr_Type:
        raise TypeError("%s.%s is not a slot" % (cls.__name__, name))
    return (<PyMemberDescrObject*>descr).d_member.offset


def configure(param_cls, rule_cls, hookable_cls, classify_param, classify_rule):
    """Record the slot layout of cynag's classes and the class classifiers."""
    global OFF_P_ARRAY, OFF_P_GRAD, OFF_P_RULE, OFF_P_LS, OFF_P_UPDATE
    global OFF_R_ENABLED, OFF_R_T, OFF_R_STATE, OFF_R_HP, OFF_R_HOOKABLE, OFF_R_FP32
    global OFF_R_OVERRIDDEN
    global OFF_H_COUNT, _configured, _classify_param, _classify_rule
    OFF_P_ARRAY = _member_offset(param_cls, "_array")
    OFF_P_GRAD = _member_offset(param_cls, "_grad")
    OFF_P_RULE = _member_offset(param_cls, "_update_rule")
    OFF_P_LS = _member_offset(param_cls, "_loss_scale_value")
    OFF_P_UPDATE = _member_offset(param_cls, "_update_override")
    OFF_R_ENABLED = _member_offset(rule_cls, "_enabled")
    OFF_R_T = _member_offset(rule_cls, "_t")
    OFF_R_STATE = _member_offset(rule_cls, "_state_dict")
    OFF_R_HP = _member_offset(rule_cls, "_hyperparam")
    OFF_R_HOOKABLE = _member_offset(rule_cls, "_hookable")
    OFF_R_FP32 = _member_offset(rule_cls, "_use_fp32_update")
    OFF_R_OVERRIDDEN = _member_offset(rule_cls, "_overridden")
    OFF_H_COUNT = _member_offset(hookable_cls, "_count")
    _classify_param = classify_param
    _classify_rule = classify_rule
    _param_kinds.clear()
    _rule_kinds.clear()
    _configured = True


def set_chainer_variable(cls):
    """Tell the reader Chainer's ``Variable`` class (its instances are read natively)."""
    global _chainer_variable_type, _chainer_variable_ref
    _chainer_variable_ref = cls
    _chainer_variable_type = <PyTypeObject*>cls if cls is not None else NULL


cdef inline PyObject* _slot(PyObject* o, Py_ssize_t off) noexcept:
    return (<PyObject**>((<char*>o) + off))[0]


cdef inline object _slot_or_raise(object o, Py_ssize_t off, str name):
    cdef PyObject* v = _slot(<PyObject*>o, off)
    if v is NULL:
        raise AttributeError("%r object has no attribute %r" % (type(o).__name__, name))
    return <object>v


# A class's kind is kept with the class's version tag, which CPython clears
# whenever the class or one of its bases is modified (a method patched or
# wrapped, even by mock.patch.object): such a class is classified again.  A
# tag of 0 (none assigned) is never taken as valid.
cdef inline int _cached_kind(dict kinds, PyTypeObject* tp, object classify) except -1:
    cdef PyObject* k = PyDict_GetItem(<PyObject*>kinds, <PyObject*>tp)
    cdef unsigned int tag = cynag_type_tag(tp)
    cdef long long packed
    if k is not NULL and tag != 0:
        packed = <long long><object>k
        if (packed >> 8) == <long long>tag:
            return <int>(packed & 0xff)
    kind = classify(<object>tp)
    tag = cynag_type_tag(tp)  # (classifying looks the class's attributes up)
    kinds[<object>tp] = (<long long>tag << 8) | (<int>kind & 0xff)
    return kind


cdef inline int _param_kind(PyTypeObject* tp) except -1:
    return _cached_kind(_param_kinds, tp, _classify_param)


cdef inline int _rule_kind(PyTypeObject* tp) except -1:
    return _cached_kind(_rule_kinds, tp, _classify_rule)


cdef bint _own_attr(object o, object name) except -1:
    """True if ``o``'s own dictionary holds ``name`` (a method set on the object)."""
    cdef PyObject* d
    if not cynag_type_has_dict(Py_TYPE(<PyObject*>o)):
        return False  # (__slots__ without __dict__: nothing to look up, nothing raised)
    try:
        dct = PyObject_GenericGetDict(o, NULL)
    except (AttributeError, TypeError):
        return False  # (no instance dictionary)
    d = <PyObject*>dct
    if not PyDict_Check(d) or PyDict_Size(d) == 0:
        return False
    return PyDict_GetItem(d, <PyObject*>name) is not NULL


# -- reading a parameter ---------------------------------------------------------
# cynag's Parameter: its slots; Chainer 7's Parameter: _chainer_read below, with
# the properties where it cannot vouch for the value; anything else: getattr.
cdef object _read_rule(object p, int kind):
    if kind == K_CYNAG:
        return _slot_or_raise(p, OFF_P_RULE, "_update_rule")
    return getattr(p, S_RULE, None)


cdef object _read_array(object p, int kind):
    if kind == K_CYNAG:
        return _slot_or_raise(p, OFF_P_ARRAY, "_array")
    return getattr(p, S_ARRAY)


cdef object _read_grad(object p, int kind):
    if kind == K_CYNAG:
        return _slot_or_raise(p, OFF_P_GRAD, "_grad")
    return getattr(p, S_GRAD)


cdef struct ChainerRead:
    PyObject* rule      # borrowed from the dictionary (NULL: read by getattr)
    PyObject* array
    PyObject* grad
    PyObject* loss_scale
    bint plain          # standard layout, no ChainerX: array and grad were read


cdef inline void _chainer_read(object d, ChainerRead* r, bint want_grad) noexcept:
    """Read a Chainer 7 parameter's attributes from its dictionary, once.

    Replicates ``Variable.array``/``grad`` for the common case (standard
    layout, no ChainerX, a gradient set and not held by a gradient
    variable); ``plain`` is false otherwise and the caller uses the
    properties.  Every pointer is borrowed from ``d``.
    """
    cdef PyObject* dp = <PyObject*>d
    cdef PyObject* x
    cdef PyObject* data
    r.rule = PyDict_GetItem(dp, <PyObject*>S_RULE)
    r.loss_scale = PyDict_GetItem(dp, <PyObject*>S_LOSS_SCALE)
    r.array = NULL
    r.grad = NULL
    r.plain = False
    x = PyDict_GetItem(dp, <PyObject*>S_LAYOUT)
    if x is NULL or x is not <PyObject*>None:
        return
    x = PyDict_GetItem(dp, <PyObject*>S_CHAINERX)
    if x is not NULL and x is not <PyObject*>_FALSE_OBJ:
        return
    data = PyDict_GetItem(dp, <PyObject*>S_DATA)
    if data is NULL or not PyList_CheckExact(data) or PyList_GET_SIZE(data) != 1:
        return
    r.array = PyList_GET_ITEM(data, 0)
    if want_grad:
        x = PyDict_GetItem(dp, <PyObject*>S_GRAD_VALID)
        if x is not <PyObject*>_TRUE_OBJ:
            return
        x = PyDict_GetItem(dp, <PyObject*>S_GRAD_VAR)
        if x is NULL:
            return
        if x is <PyObject*>None:
            r.grad = PyDict_GetItem(dp, <PyObject*>S_GRAD_PRIV)
        else:
            # After a backward pass the gradient is held by a gradient
            # variable: Variable.grad is its array.
            r.grad = _variable_data(x)
        if r.grad is NULL:
            return
    r.plain = True


cdef inline PyObject* _variable_data(PyObject* var) noexcept:
    """A chainer.Variable's array (borrowed), or NULL unless plainly stored."""
    cdef PyObject* x
    cdef PyObject* data
    if Py_TYPE(var) is not _chainer_variable_type:
        return NULL
    d = PyObject_GenericGetDict(<object>var, NULL)
    x = PyDict_GetItem(<PyObject*>d, <PyObject*>S_LAYOUT)
    if x is not <PyObject*>None:
        return NULL
    x = PyDict_GetItem(<PyObject*>d, <PyObject*>S_CHAINERX)
    if x is not NULL and x is not <PyObject*>_FALSE_OBJ:
        return NULL
    data = PyDict_GetItem(<PyObject*>d, <PyObject*>S_DATA)
    if data is NULL or not PyList_CheckExact(data) or PyList_GET_SIZE(data) != 1:
        return NULL
    return PyList_GET_ITEM(data, 0)  # kept alive by the variable, kept by the parameter


cdef object _read_loss_scale(object p, int kind):
    if kind == K_CYNAG:
        return _slot_or_raise(p, OFF_P_LS, "_loss_scale_value")
    return getattr(p, S_LOSS_SCALE, None)


# -- step counters ----------------------------------------------------------------
cdef class Counter:
    """The step count ``t`` of an update rule (incremented natively by the step).

    ``value`` gives back what was assigned, counted on: a Python int is held
    as a C integer (no object per increment); anything else (e.g. a NumPy
    integer loaded from a checkpoint, as Chainer keeps it) is incremented
    with ``+ 1``.
    """
    cdef long long n
    cdef object other

    def __init__(self, value=0):
        self.value = value

    @property
    def value(self):
        return self.n if self.other is None else self.other

    @value.setter
    def value(self, v):
        if type(v) is int and -(1 << 62) < v < (1 << 62):
            self.n = v
            self.other = None
        else:
            self.other = v

    cdef inline void bump(self) except *:
        if self.other is None and self.n < (1LL << 62):
            self.n += 1
        else:
            self.other = self.value + 1

    def __reduce__(self):
        return (Counter, (self.value,))

    def __repr__(self):
        return "Counter(%r)" % (self.value,)


# -- hyperparameters ---------------------------------------------------------------
cdef inline PyObject* _only_item(PyObject* d, PyObject* key) noexcept:
    """The value of ``key`` in ``d``, a dictionary of one entry (borrowed; NULL
    if its key is not ``key``).  Without hashing: the key is compared by
    identity (attribute names and cynag's state keys are interned), then as
    a string."""
    cdef Py_ssize_t pos = 0
    cdef PyObject* k
    cdef PyObject* v
    if not PyDict_Next(d, &pos, &k, &v):
        return NULL
    if k is key:
        return v
    if PyUnicode_CheckExact(k) and PyUnicode_Compare(<object>k, <object>key) == 0:
        return v
    return NULL


cdef object _MISSING = object()
cdef object _ZERO_OBJ = 0  # the small int 0 (one object in CPython)


cdef object _hp_lookup(object hp, object name):
    """Value of ``name`` along the Hyperparameter chain (``_MISSING`` if none)."""
    cdef PyObject* v
    cdef int depth = 0
    while hp is not None and depth < 64:
        d = PyObject_GenericGetDict(hp, NULL)
        v = PyDict_GetItem(<PyObject*>d, <PyObject*>name)
        if v is not NULL:
            return <object>v
        v = PyDict_GetItem(<PyObject*>d, <PyObject*>S_PARENT)
        if v is NULL:
            return _MISSING
        hp = <object>v
        depth += 1
    return _MISSING


# -- the table ---------------------------------------------------------------------
cdef struct Rec:
    uintptr_t owner
    int64_t lo
    int64_t hi
    Py_ssize_t row      # -1: an extra array


cdef class StepTable:
    """Rows of one step: codes, flags, addresses, sizes, coefficients (see module doc).

    Attributes (NumPy arrays of ``capacity`` rows; the first ``n`` are valid):
        codes (uint8), flags (uint8), ptrs (int64, 3 per row: param, grad,
        v), sizes (int64, elements), coef (float64, 6 per row; for ``GPU``
        rows the raw lr, momentum, loss scale and flag), type_nums (int32),
        owners (uint64, 3 per row: the allocation of each array, 0 if
        unknown).

    The table also holds a reference to the update rule of every ``FAST``
    and ``GPU`` row and to the arrays (param, grad, v) of every ``FAST``
    row, so that they stay alive while it points at them, until
    :meth:`release`: see :meth:`rule` and :meth:`kept`.  (A C array of
    references: filling Python lists cost as much as the rest of the scan.
    The garbage collector does not see them: a cycle through a table is
    collected only after :meth:`release`, which every step calls, on errors
    too.)
    """
    cdef public object codes, flags, ptrs, sizes, coef, type_nums, owners
    # The compacted table the kernel takes, (ptrs, cum, coef) with room for
    # every row: the scratch of step() and of the general path's runs.
    cdef public tuple kernel_scratch
    # 4 per row: the rule, then the param, grad and v arrays (owned; NULL if none).
    cdef PyObject** refs
    cdef Py_ssize_t n_refs
    cdef bint dirty     # refs may hold references (a scan ran since release())
    cdef public Py_ssize_t n
    # Rows of each code and cleared gradients, as counted by the last full scan.
    cdef public Py_ssize_t n_fast, n_cleared
    cdef Py_ssize_t capacity
    cdef uint8_t* c_codes
    cdef uint8_t* c_flags
    cdef int64_t* c_ptrs
    cdef int64_t* c_sizes
    cdef double* c_coef
    cdef int32_t* c_tnum
    cdef uintptr_t* c_owners
    # Scratch of mark_overlaps, kept from step to step (no allocation per step).
    cdef Rec* recs
    cdef Rec* tmp
    cdef uint32_t* slots
    cdef Py_ssize_t* nexts
    cdef Py_ssize_t* counts
    cdef Py_ssize_t* lasts
    cdef Py_ssize_t scratch_recs
    cdef Py_ssize_t scratch_cap
    cdef int64_t* k_ptrs
    cdef int64_t* k_cum
    cdef double* k_coef

    def __cinit__(self):
        self.recs = self.tmp = NULL
        self.slots = NULL
        self.nexts = self.counts = self.lasts = NULL
        self.scratch_recs = self.scratch_cap = 0
        self.k_ptrs = self.k_cum = NULL
        self.k_coef = NULL
        self.refs = NULL
        self.n_refs = 0
        self.dirty = False

    def __dealloc__(self):
        self._drop_refs()
        free(self.refs)
        free(self.recs)
        free(self.tmp)
        free(self.slots)
        free(self.nexts)
        free(self.counts)
        free(self.lasts)

    cdef int _scratch(self, Py_ssize_t nrec) except -1:
        cdef Py_ssize_t cap = 16
        if nrec >= 0x7fffffff:
            raise MemoryError("mark_overlaps: too many arrays (%d)" % nrec)
        while cap < 2 * nrec:
            cap *= 2
        if nrec > self.scratch_recs:
            free(self.recs)
            free(self.tmp)
            free(self.nexts)
            free(self.counts)
            free(self.lasts)
            self.counts = <Py_ssize_t*>malloc(sizeof(Py_ssize_t) * (nrec + 1))
            self.lasts = <Py_ssize_t*>malloc(sizeof(Py_ssize_t) * (nrec + 1))
            self.recs = <Rec*>malloc(sizeof(Rec) * (nrec + 1))
            self.tmp = <Rec*>malloc(sizeof(Rec) * (nrec + 1))
            self.nexts = <Py_ssize_t*>malloc(sizeof(Py_ssize_t) * (nrec + 1))
            self.scratch_recs = nrec
            if self.recs is NULL or self.tmp is NULL or self.nexts is NULL \
                    or self.counts is NULL or self.lasts is NULL:
                self.scratch_recs = 0
                raise MemoryError()
        if cap > self.scratch_cap:
            free(self.slots)
            self.slots = <uint32_t*>calloc(cap, sizeof(uint32_t))
            self.scratch_cap = cap
            if self.slots is NULL:
                self.scratch_cap = 0
                raise MemoryError()
        return 0

    def __init__(self):
        self.n = 0
        self.capacity = -1
        self.reserve(0)

    def reserve(self, Py_ssize_t n):
        """Make room for ``n`` rows (the contents are not kept).

        The table is used by one step at a time (the optimizer's plan holds
        a lock while a step uses it).
        """
        if n <= self.capacity:
            self.n = n
            return
        cap = max(n, 16)
        refs = <PyObject**>calloc(4 * cap, sizeof(PyObject*))
        if refs is NULL:
            raise MemoryError()
        self._drop_refs()
        free(self.refs)
        self.refs = refs
        self.n_refs = 4 * cap
        self.codes = numpy.zeros(cap, numpy.uint8)
        self.flags = numpy.zeros(cap, numpy.uint8)
        self.ptrs = numpy.zeros((cap, 3), numpy.int64)
        self.sizes = numpy.zeros(cap, numpy.int64)
        self.coef = numpy.zeros((cap, 6), numpy.float64)
        self.type_nums = numpy.zeros(cap, numpy.int32)
        self.owners = numpy.zeros((cap, 3), numpy.uint64)
        self.kernel_scratch = (numpy.zeros((cap, 3), numpy.int64),
                               numpy.zeros(cap + 1, numpy.int64),
                               numpy.zeros((cap, 6), numpy.float64))
        self.k_ptrs = <int64_t*>cnp.PyArray_DATA(self.kernel_scratch[0])
        self.k_cum = <int64_t*>cnp.PyArray_DATA(self.kernel_scratch[1])
        self.k_coef = <double*>cnp.PyArray_DATA(self.kernel_scratch[2])
        self.c_codes = <uint8_t*>cnp.PyArray_DATA(self.codes)
        self.c_flags = <uint8_t*>cnp.PyArray_DATA(self.flags)
        self.c_ptrs = <int64_t*>cnp.PyArray_DATA(self.ptrs)
        self.c_sizes = <int64_t*>cnp.PyArray_DATA(self.sizes)
        self.c_coef = <double*>cnp.PyArray_DATA(self.coef)
        self.c_tnum = <int32_t*>cnp.PyArray_DATA(self.type_nums)
        self.c_owners = <uintptr_t*>cnp.PyArray_DATA(self.owners)
        self.capacity = cap
        self.n = n

    def release(self):
        """Drop the references to rules and arrays; every row becomes ``SKIP``
        (its addresses may point at freed memory from now on)."""
        if self.dirty and self.capacity > 0:
            memset(self.c_codes, C_SKIP, self.capacity)
        self._drop_refs()

    cdef void _drop_refs(self) noexcept:
        cdef Py_ssize_t i
        cdef PyObject* o
        if not self.dirty:
            return
        self.dirty = False
        for i in range(self.n_refs):
            o = self.refs[i]
            if o is not NULL:
                self.refs[i] = NULL
                Py_DECREF(o)

    cdef inline void _hold(self, Py_ssize_t k, object value) noexcept:
        """refs[k] = value (a new reference; the old one dropped after)."""
        cdef PyObject* old = self.refs[k]
        Py_INCREF(<PyObject*>value)
        self.refs[k] = <PyObject*>value
        Py_XDECREF(old)

    def rule(self, Py_ssize_t i):
        """The update rule the last scan read for a row it made ``FAST`` or ``GPU``
        (kept if a later check moved the row; None for other rows)."""
        if i < 0 or i >= self.n or 4 * i + 3 >= self.n_refs:
            raise IndexError("StepTable.rule: row %d out of range" % i)
        o = self.refs[4 * i]
        return None if o is NULL else <object>o

    def kept(self, Py_ssize_t i, int j):
        """The param (``j=0``), grad (1) or v (2) array the last scan read for a
        row it made ``FAST`` (kept if a later check moved the row; None for
        other rows)."""
        if i < 0 or i >= self.n or 4 * i + 3 >= self.n_refs or j < 0 or j > 2:
            raise IndexError("StepTable.kept: (%d, %d) out of range" % (i, j))
        o = self.refs[4 * i + 1 + j]
        return None if o is NULL else <object>o


cdef inline uintptr_t _owner(cnp.ndarray a) noexcept:
    """Address of the object that owns ``a``'s memory, 0 if it cannot be told.

    NumPy arrays that own their memory never overlap one another; a view's
    base chain ends at the array that owns its memory.  A chain that ends at
    another kind of object (a buffer exported by something else) or at an
    array that does not own its memory gives 0.
    """
    cdef PyObject* obj = <PyObject*>a
    cdef PyObject* base
    cdef int depth = 0
    while depth < 1000:
        base = <PyObject*>cnp.PyArray_BASE(<cnp.ndarray>obj)
        if base is NULL:
            if cnp.PyArray_CHKFLAGS(<cnp.ndarray>obj, cnp.NPY_ARRAY_OWNDATA):
                return <uintptr_t>obj
            return 0
        if not cnp.PyArray_Check(<object>base):
            return 0
        obj = base
        depth += 1
    return 0


def scan(list params, StepTable table, object indices=None):
    """Fill the rows of ``params`` (all, or the rows listed in ``indices``).

    ``table`` must have room for ``len(params)`` rows (:meth:`StepTable.reserve`).
    Returns the number of ``FAST`` rows among those scanned.  Raises only
    what reading an attribute raises (e.g. Chainer's ``RuntimeError`` for a
    gradient that was never set); the checks themselves never raise: a row
    that fails one goes to ``REST``, where the rule's own check names the
    problem.
    """
    cdef Py_ssize_t n = len(params)
    cdef Py_ssize_t i, k, n_idx, n_fast = 0
    cdef int pkind, rkind, type_num, has_ls, ovf
    cdef PyTypeObject* last_ptype = NULL
    cdef PyTypeObject* last_rtype = NULL
    cdef int last_pkind = 0, last_rkind = 0
    cdef PyObject* rp
    cdef PyObject* hookable
    cdef PyObject* state
    cdef PyObject* vp
    cdef PyObject* hp
    cdef PyObject* hpd_parent
    cdef Py_ssize_t n_cleared = 0
    cdef ChainerRead cr
    cdef bint got_grad, got_ls
    cdef double lr, m, ls
    cdef long long ls_i
    cdef double* row
    cdef cnp.int64_t[::1] idx_view
    if not _configured:
        raise RuntimeError("cynag._step.configure() was not called")
    if table.capacity < n:
        raise ValueError("scan: the table has room for %d rows, not %d" % (table.capacity, n))
    if indices is None:
        n_idx = n
    else:
        idx_view = numpy.ascontiguousarray(indices, dtype=numpy.int64)
        n_idx = idx_view.shape[0]
    table.dirty = True
    memo_parent = _MISSING
    memo_lr = memo_m = _MISSING
    for k in range(n_idx):
        i = k if indices is None else idx_view[k]
        if i < 0 or i >= n:
            raise IndexError("scan: row %d out of range" % i)
        p = params[i]
        table.c_flags[i] = 0
        table.c_codes[i] = C_REST
        table.c_sizes[i] = 0
        table.c_tnum[i] = -1
        ptype = Py_TYPE(<PyObject*>p)
        if ptype is not last_ptype:
            last_pkind = _param_kind(ptype)
            last_ptype = ptype
        pkind = last_pkind & 7
        got_grad = False
        grad = None
        ls_obj = None
        got_ls = False
        if pkind == K_CHAINER:
            pd = PyObject_GenericGetDict(p, NULL)
            _chainer_read(pd, &cr, True)
            rule = <object>cr.rule if cr.rule is not NULL else getattr(p, S_RULE, None)
            array = <object>cr.array if cr.array is not NULL else getattr(p, S_ARRAY)
            if cr.plain:
                grad = <object>cr.grad
                got_grad = True
            if cr.loss_scale is not NULL:
                ls_obj = <object>cr.loss_scale
                got_ls = True
        else:
            rule = _read_rule(p, pkind)
            array = _read_array(p, pkind)
        if array is not None:
            if not got_grad:
                grad = _read_grad(p, pkind)
            if grad is None:
                table.c_flags[i] = F_CLEARED
                n_cleared += 1
            elif cnp.PyArray_Check(grad) and not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>grad):
                table.c_flags[i] = F_GRAD_READ_ONLY
        if rule is None:
            table.c_codes[i] = C_SKIP
            continue
        rtype = Py_TYPE(<PyObject*>rule)
        if rtype is not last_rtype:
            last_rkind = _rule_kind(rtype)
            last_rtype = rtype
        rkind = last_rkind
        if rkind != R_NAG or not (last_pkind & K_UPDATE_OK):
            continue  # REST: the rule updates it
        # update() or the rule's update methods set on the object itself
        # (the class's own are checked by the classifiers): the rule's path.
        if pkind == K_CYNAG:
            if _slot(<PyObject*>p, OFF_P_UPDATE) is not NULL:
                continue  # (assigned, None included: the call fails as in Chainer)
        elif pkind == K_CHAINER:
            if PyDict_GetItem(<PyObject*>pd, <PyObject*>S_UPDATE) is not NULL:
                continue
        elif _own_attr(p, S_UPDATE):
            continue
        rp = <PyObject*>rule
        vp = _slot(rp, OFF_R_OVERRIDDEN)  # (set by UpdateRule.__setattr__)
        if vp is not NULL and vp is not <PyObject*>_FALSE_OBJ:
            continue
        vp = _slot(rp, OFF_R_ENABLED)
        if vp is NULL:
            continue
        if not PyObject_IsTrue(vp):
            table.c_codes[i] = C_SKIP  # a disabled rule does nothing (reads nothing)
            continue
        if array is None:
            continue  # uninitialized: the rule's own update (Chainer's order)
        # Rule-level hooks, state and the float32 master copy.
        hookable = _slot(rp, OFF_R_HOOKABLE)
        if hookable is NULL:
            continue
        # The count add_hook/remove_hook keep; 0 means both dictionaries are empty.
        vp = _slot(hookable, OFF_H_COUNT)
        if vp is not <PyObject*>_ZERO_OBJ:
            continue
        state = _slot(rp, OFF_R_STATE)
        if state is NULL or not PyDict_Check(state) or PyDict_Size(state) != 1:
            continue  # no state yet (the first update creates it) or another state
        vp = _only_item(state, <PyObject*>S_V)
        if vp is NULL:
            continue
        v = <object>vp  # (owned from here: the Python reads below could replace the state)
        # Hyperparameters: Python floats found along the Hyperparameter chain.
        hp = _slot(rp, OFF_R_HP)
        if hp is NULL:
            continue
        hpd = PyObject_GenericGetDict(<object>hp, NULL)
        lr_o = _MISSING
        hpd_parent = NULL
        if PyDict_Size(<PyObject*>hpd) == 1:
            # Only a parent: every rule of the optimizer reads the same values.
            hpd_parent = _only_item(<PyObject*>hpd, <PyObject*>S_PARENT)
            if hpd_parent is not NULL and hpd_parent is <PyObject*>memo_parent:
                lr_o = memo_lr
                m_o = memo_m
        if lr_o is _MISSING:
            parent_o = None if hpd_parent is NULL else <object>hpd_parent  # (owned)
            lr_o = _hp_lookup(<object>hp, S_LR)
            m_o = _hp_lookup(<object>hp, S_MOMENTUM)
            if parent_o is not None:
                memo_parent = parent_o
                memo_lr = lr_o
                memo_m = m_o
        if not PyFloat_CheckExact(<PyObject*>lr_o) or not PyFloat_CheckExact(<PyObject*>m_o):
            continue
        lr = PyFloat_AS_DOUBLE(<PyObject*>lr_o)
        m = PyFloat_AS_DOUBLE(<PyObject*>m_o)
        # The loss scale of the backward pass that produced the gradient.
        if not got_ls:
            ls_obj = _read_loss_scale(p, pkind)
        has_ls = 0
        ls = 0.0
        if ls_obj is not None:
            if PyFloat_CheckExact(<PyObject*>ls_obj):
                ls = PyFloat_AS_DOUBLE(<PyObject*>ls_obj)
            elif PyLong_CheckExact(<PyObject*>ls_obj):
                ovf = 0
                ls_i = PyLong_AsLongLongAndOverflow(<PyObject*>ls_obj, &ovf)
                if ovf or ls_i > (1LL << 53) or ls_i < -(1LL << 53):
                    continue
                ls = <double>ls_i
            else:
                continue
            has_ls = 1
        if grad is None:
            # Zeros are allocated for it before the update; scanned again then.
            table.c_codes[i] = C_NEEDS_GRAD
            continue
        if not cnp.PyArray_CheckExact(array):
            # Not a NumPy array: the caller looks for a CuPy array here.
            table.c_codes[i] = C_GPU
            row = table.c_coef + 6 * i
            row[0] = lr
            row[1] = m
            row[4] = ls
            row[5] = has_ls
            table._hold(4 * i, rule)
            continue
        type_num = cynag_dense_type(array, grad, v, has_ls != 0)
        if type_num < 0:
            continue
        if type_num == NPY_HALF:
            vp = _slot(rp, OFF_R_FP32)
            if vp is NULL or PyObject_IsTrue(vp):
                continue  # the float32 master copy: the rule's path
        row = table.c_coef + 6 * i
        if not cynag_nag_coefficients(type_num, lr, m, has_ls, ls, row):
            continue
        table.c_ptrs[3 * i] = <int64_t>cnp.PyArray_DATA(<cnp.ndarray>array)
        table.c_ptrs[3 * i + 1] = <int64_t>cnp.PyArray_DATA(<cnp.ndarray>grad)
        table.c_ptrs[3 * i + 2] = <int64_t>cnp.PyArray_DATA(<cnp.ndarray>v)
        table.c_owners[3 * i] = _owner(<cnp.ndarray>array)
        table.c_owners[3 * i + 1] = _owner(<cnp.ndarray>grad)
        table.c_owners[3 * i + 2] = _owner(<cnp.ndarray>v)
        table.c_sizes[i] = cnp.PyArray_SIZE(<cnp.ndarray>array)
        table.c_tnum[i] = type_num
        table.c_codes[i] = C_FAST
        table._hold(4 * i, rule)
        table._hold(4 * i + 1, array)
        table._hold(4 * i + 2, grad)
        table._hold(4 * i + 3, v)
        n_fast += 1
    if indices is None:
        table.n_fast = n_fast
        table.n_cleared = n_cleared
    return n_fast


def step(list params, StepTable table, int n_threads, int64_t threshold,
         int items_per_thread, int item_align, object kernel_api):
    """The usual step in one call: :func:`scan`, then, if every row is ``FAST`` and
    no gradient is cleared, :func:`mark_overlaps`, the kernel over every
    dtype's rows and ``rule.t += 1`` of each.

    For an optimizer without ``'pre'`` hooks, ``'post'`` hooks that may
    write gradients or dynamic loss scaling, that is the whole update of its
    parameters (what ``scan`` reads decides
    everything else).  ``n_threads`` and ``threshold``: the kernel runs
    with ``n_threads`` threads on a dtype's rows of ``threshold`` elements or
    more, with one below (``cynag_kernels.threads.threads_for``);
    ``kernel_api``: ``cynag_kernels._nesterov_cpu.kernel_api()``.

    Returns True if it updated the parameters.  Otherwise nothing changed
    and the table is as :func:`scan` leaves it, except that rows an overlap
    moved to ``REST`` are there (counted out of ``n_fast``): the caller goes
    on with the general path from the scan.
    """
    cdef const cynag_kernel_api* api
    cdef Py_ssize_t n = len(params), i, m, moved
    cdef int types = 0, t, type_num, rc, threads
    cdef int64_t total
    cdef int[3] type_list
    api = <const cynag_kernel_api*>PyCapsule_GetPointer(kernel_api, CYNAG_KERNEL_API_NAME)
    if api is NULL:
        raise ValueError("step: not the kernel's C entry")
    if api.n_coef != CYNAG_N_COEF:
        raise ValueError("step: the kernel's coefficient rows do not match")
    scan(params, table)
    if table.n_fast != n or table.n_cleared != 0:
        return False
    moved = _mark_overlaps(table, [])
    if moved:
        table.n_fast -= moved
        return False
    for i in range(n):
        type_num = table.c_tnum[i]
        t = 0 if type_num == NPY_HALF else (1 if type_num == cnp.NPY_FLOAT else 2)
        types |= 1 << t
    type_list[0] = NPY_HALF
    type_list[1] = cnp.NPY_FLOAT
    type_list[2] = cnp.NPY_DOUBLE
    for t in range(3):
        if not (types >> t) & 1:
            continue
        type_num = type_list[t]
        m = api.compact(table.c_ptrs, table.c_sizes, table.c_coef, table.c_codes, C_FAST,
                        table.c_tnum, type_num, 0, n, table.k_ptrs, table.k_cum,
                        table.k_coef)
        if m <= 0:
            if m < 0:
                raise TypeError("step: the kernel does not take type number %d" % type_num)
            continue
        total = table.k_cum[m]
        threads = 1 if total < threshold or n_threads < 1 else n_threads
        with nogil:
            rc = api.run_table(table.k_ptrs, table.k_cum, table.k_coef, m, type_num,
                               threads, items_per_thread, item_align, NULL, 0, 0)
        if rc == -1:
            raise MemoryError()
        if rc != 0:
            raise TypeError("step: the kernel does not take type number %d" % type_num)
    _bump_t(table, 0, n, C_FAST)
    return True


cdef object _read_one(object p, int pkind, bint want_grad):
    """``p.grad`` (``want_grad``) or ``p.array``, read as :func:`scan` reads them."""
    cdef ChainerRead cr
    if pkind == K_CHAINER:
        pd = PyObject_GenericGetDict(p, NULL)
        _chainer_read(pd, &cr, want_grad)
        if cr.plain:
            return <object>(cr.grad if want_grad else cr.array)
    return _read_grad(p, pkind) if want_grad else _read_array(p, pkind)


cdef inline int _kind_of(object p, PyTypeObject** last_ptype, int* last_kind) except -1:
    cdef PyTypeObject* ptype = Py_TYPE(<PyObject*>p)
    if ptype is not last_ptype[0]:
        last_kind[0] = _param_kind(ptype) & 7
        last_ptype[0] = ptype
    return last_kind[0]


def cleared(list params, object out):
    """Indices of the initialized parameters whose gradient is ``None``, into ``out`` (a list).

    What Chainer's ``reallocate_cleared_grads`` looks for, read as
    :func:`scan` reads.  Returns the number found.
    """
    cdef Py_ssize_t i, n = len(params), found = 0
    cdef PyTypeObject* last_ptype = NULL
    cdef int pkind, last_kind = 0
    if not _configured:
        raise RuntimeError("cynag._step.configure() was not called")
    for i in range(n):
        p = params[i]
        pkind = _kind_of(p, &last_ptype, &last_kind)
        if _read_one(p, pkind, False) is not None and _read_one(p, pkind, True) is None:
            out.append(i)
            found += 1
    return found


def read_attribute(list params, str attr, list out):
    """``out[i] = params[i].array`` (``attr='array'``) or ``.grad`` (``attr='grad'``),
    read as :func:`scan` reads them (natively for cynag's and Chainer 7's
    parameters); ``out`` has at least ``len(params)`` entries."""
    cdef Py_ssize_t i, n = len(params)
    cdef PyTypeObject* last_ptype = NULL
    cdef int pkind, last_kind = 0
    cdef bint want_grad = attr == "grad"
    if attr != "grad" and attr != "array":
        raise ValueError("read_attribute: attr must be 'array' or 'grad', got %r" % (attr,))
    if not _configured:
        raise RuntimeError("cynag._step.configure() was not called")
    if len(out) < n:
        raise ValueError("read_attribute: out has %d entries for %d parameters" % (len(out), n))
    for i in range(n):
        p = params[i]
        pkind = _kind_of(p, &last_ptype, &last_kind)
        _list_set(out, i, _read_one(p, pkind, want_grad))


def bump_t(StepTable table, Py_ssize_t lo, Py_ssize_t hi, int code):
    """``rule.t += 1`` for the rules of the rows ``[lo, hi)`` whose code is ``code``."""
    _bump_t(table, lo, hi, code)


cdef int _bump_t(StepTable table, Py_ssize_t lo, Py_ssize_t hi, int code) except -1:
    cdef Py_ssize_t i
    cdef PyObject* rp
    cdef PyObject* c
    cdef Counter counter
    if hi > table.n:
        hi = table.n
    if hi > table.capacity:
        hi = table.capacity
    for i in range(max(lo, 0), hi):
        if table.c_codes[i] != code:
            continue
        rp = table.refs[4 * i]
        if rp is NULL:
            raise RuntimeError("bump_t: row %d has no update rule" % i)
        c = _slot(rp, OFF_R_T)
        if c is not NULL and Py_TYPE(c) is <PyTypeObject*>Counter:
            counter = <Counter>c
            counter.bump()
        else:
            rule = <object>rp
            rule.t = rule.t + 1
    return 0


# -- overlaps ----------------------------------------------------------------------
cdef int _cmp_rec(const void* a, const void* b) noexcept nogil:
    cdef const Rec* x = <const Rec*>a
    cdef const Rec* y = <const Rec*>b
    if x.lo != y.lo:
        return -1 if x.lo < y.lo else 1
    return 0


cdef inline uintptr_t _mix(uintptr_t x) noexcept nogil:
    x ^= x >> 33
    x *= <uintptr_t>0xff51afd7ed558ccdULL
    x ^= x >> 33
    return x


def mark_overlaps(StepTable table, list extras):
    """Move to ``REST`` the ``FAST`` rows whose arrays overlap another row's or an extra array.

    ``extras``: NumPy arrays of the parameters that are not ``FAST`` (their
    arrays, gradients and state).  Returns the number of rows moved.
    Linear in the number of arrays: arrays are grouped by the allocation
    that owns their memory and only arrays of one allocation are compared
    (all of them, sorted by address, if some array's owner cannot be told).
    """
    return _mark_overlaps(table, extras)


cdef Py_ssize_t _mark_overlaps(StepTable table, list extras) except -1:
    cdef Py_ssize_t n = table.n
    cdef Py_ssize_t i, j, k, nrec = 0, n_extra = len(extras), moved = 0
    cdef Py_ssize_t itemsize
    cdef bint unknown = False
    cdef cnp.ndarray a
    cdef Rec* recs
    cdef uint8_t* bad
    cdef int64_t lo, hi
    if n == 0:
        return 0
    table._scratch(3 * n + n_extra)
    recs = table.recs
    bad = <uint8_t*>table.c_flags  # bit 1 of the flags: overlaps (cleared below)
    for i in range(n):
        if table.c_codes[i] != C_FAST or table.c_sizes[i] == 0:
            continue
        itemsize = 2 if table.c_tnum[i] == NPY_HALF else (
            4 if table.c_tnum[i] == cnp.NPY_FLOAT else 8)
        for j in range(3):
            recs[nrec].owner = table.c_owners[3 * i + j]
            recs[nrec].lo = table.c_ptrs[3 * i + j]
            recs[nrec].hi = recs[nrec].lo + table.c_sizes[i] * itemsize
            recs[nrec].row = i
            if recs[nrec].owner == 0:
                unknown = True
            nrec += 1
    if nrec == 0:
        return 0
    for k in range(n_extra):
        x = extras[k]
        if not cnp.PyArray_Check(x):
            continue
        a = x
        if cnp.PyArray_SIZE(a) == 0:
            continue
        _bounds(a, &lo, &hi)
        recs[nrec].owner = _owner(a)
        recs[nrec].lo = lo
        recs[nrec].hi = hi
        recs[nrec].row = -1
        if recs[nrec].owner == 0:
            unknown = True
        nrec += 1
    if unknown:
        for k in range(nrec):
            recs[k].owner = 0
    with nogil:
        _mark(table, recs, nrec)
    for i in range(n):
        if table.c_flags[i] & F_OVERLAP:
            table.c_flags[i] &= ~F_OVERLAP
            if table.c_codes[i] == C_FAST:
                table.c_codes[i] = C_REST
                moved += 1
    return moved


cdef void _bounds(cnp.ndarray a, int64_t* lo_out, int64_t* hi_out) noexcept:
    """The bytes an array of any strides can touch: ``[lo, hi)``."""
    cdef int64_t lo = <int64_t>cnp.PyArray_DATA(a)
    cdef int64_t hi = lo
    cdef int d
    cdef Py_ssize_t dim, stride
    for d in range(cnp.PyArray_NDIM(a)):
        dim = cnp.PyArray_DIMS(a)[d]
        stride = cnp.PyArray_STRIDES(a)[d]
        if stride < 0:
            lo += stride * (dim - 1)
        else:
            hi += stride * (dim - 1)
    lo_out[0] = lo
    hi_out[0] = hi + cnp.PyArray_ITEMSIZE(a)


cdef void _mark_group(Rec* g, Py_ssize_t m, uint8_t* flags) noexcept nogil:
    """Mark the rows of the records of one allocation that overlap another record."""
    cdef Py_ssize_t k
    cdef bint in_order = True
    cdef int64_t runmax
    if m < 2:
        return
    for k in range(1, m):
        if g[k - 1].lo > g[k].lo:
            in_order = False
            break
    if not in_order:
        qsort(g, m, sizeof(Rec), _cmp_rec)
    # Sorted by start: a record overlaps another iff an earlier one ends
    # after it starts, or the next one starts before it ends.
    runmax = g[0].hi
    for k in range(1, m):
        if g[k].lo < runmax and g[k].row >= 0:
            flags[g[k].row] |= F_OVERLAP
        if g[k].hi > runmax:
            runmax = g[k].hi
    for k in range(m - 1):
        if g[k + 1].lo < g[k].hi and g[k].row >= 0:
            flags[g[k].row] |= F_OVERLAP


cdef bint _shared_owner(StepTable t, Rec* recs, Py_ssize_t nrec) noexcept nogil:
    """True if two records have the same owner (the hash table of :func:`_mark`,
    all zeros again on return)."""
    cdef Py_ssize_t mask = t.scratch_cap - 1, k, slot
    cdef uint32_t* table = t.slots
    cdef uint32_t e
    cdef uintptr_t owner
    cdef bint found = False
    for k in range(nrec):
        owner = recs[k].owner
        slot = _mix(owner) & mask
        while True:
            e = table[slot]
            if e == 0:
                table[slot] = <uint32_t>(k + 1)
                break
            if recs[e - 1].owner == owner:
                found = True
                break
            slot = (slot + 1) & mask
        if found:
            break
    memset(table, 0, sizeof(uint32_t) * t.scratch_cap)
    return found


cdef void _mark(StepTable t, Rec* recs, Py_ssize_t nrec) noexcept nogil:
    """Set ``F_OVERLAP`` in the flags of the rows of records that overlap another.

    Records are grouped by owner with a hash table (arrays of different
    owners cannot overlap); each group of two or more is checked by address.
    The table holds 4-byte record numbers (a small footprint: it is probed
    at random), and is all zeros between calls.
    """
    cdef Py_ssize_t mask = t.scratch_cap - 1, k, slot, m, j, h
    cdef uint32_t* table = t.slots
    cdef uint32_t e
    cdef Py_ssize_t* nexts = t.nexts
    cdef Py_ssize_t* counts = t.counts
    cdef Py_ssize_t* lasts = t.lasts
    cdef Rec* tmp = t.tmp
    cdef uintptr_t owner
    if not _shared_owner(t, recs, nrec):
        return  # (the usual case: every array its own allocation)
    for k in range(nrec):
        owner = recs[k].owner
        slot = _mix(owner) & mask
        while True:
            e = table[slot]
            if e == 0:  # the first record of this owner
                table[slot] = <uint32_t>(k + 1)
                counts[k] = 1
                lasts[k] = k
                nexts[k] = -1
                break
            h = e - 1
            if recs[h].owner == owner:
                counts[k] = 0
                nexts[k] = lasts[h]
                lasts[h] = k
                counts[h] += 1
                break
            slot = (slot + 1) & mask
    for h in range(nrec):
        m = counts[h]
        if m >= 2:
            j = lasts[h]
            k = m
            while j >= 0:
                k -= 1
                tmp[k] = recs[j]  # back in insertion order
                j = nexts[j]
            _mark_group(tmp, m, t.c_flags)
    memset(table, 0, sizeof(uint32_t) * t.scratch_cap)


# -- the parameters of Chainer's links ----------------------------------------
# Chainer's Link.params() and namedparams() sort the link's name set at every
# call (about 0.2 us per parameter for 2000 names).  link_params() and
# link_namedparams() give the same lists, keeping the sorted order of each
# name set (and the '/name' strings) from step to step, used only after the
# set is seen to hold the same name objects in the same iteration order (an
# exact set of exact str: the same contents, so the same sort).

cdef object _CHAIN = None         # chainer's Chain and ChainList
cdef object _CHAINLIST = None
cdef tuple _F_PARAMS = None       # (Link.params, Chain.params, ChainList.params)
cdef tuple _F_NAMED = None        # the same for namedparams
cdef object S_PARAMS = "_params"
cdef object S_CHILDREN = "_children"
cdef list _INDEX_PREFIX = []      # '/0', '/1', ...: ChainList's prefixes


def set_chainer_links(link, chain, chainlist):
    """Chainer's ``Link``, ``Chain`` and ``ChainList``, whose listings :func:`link_params` follows."""
    global _CHAIN, _CHAINLIST, _F_PARAMS, _F_NAMED
    _CHAIN, _CHAINLIST = chain, chainlist
    _F_PARAMS = (link.params, chain.params, chainlist.params)
    _F_NAMED = (link.namedparams, chain.namedparams, chainlist.namedparams)


cdef bint _next_is_link(object tp, object cls, str method, object f_link):
    """True if ``super(cls, obj).<method>`` is ``Link``'s for an ``obj`` of type ``tp``."""
    cdef tuple mro = tp.__mro__
    cdef Py_ssize_t i, n = len(mro)
    cdef bint after = False
    for i in range(n):
        c = mro[i]
        if after and method in c.__dict__:
            return c.__dict__[method] is f_link
        if c is cls:
            after = True
    return False


cdef int _link_kind(object link, str method, tuple fns) except -2:
    """0 Link, 1 Chain, 2 ChainList (Chainer's ``method`` throughout), -1 another
    (a class of its own, ``method`` set on the link object itself, or a class
    whose attribute lookup is its own: ``__getattribute__``/``__getattr__``)."""
    tp = type(link)
    if not cynag_generic_getattr(Py_TYPE(<PyObject*>link)) or _own_attr(link, method):
        return -1
    f = getattr(tp, method, None)
    if f is fns[0]:
        return 0
    if f is fns[1] and _next_is_link(tp, _CHAIN, method, fns[0]):
        return 1
    if f is fns[2] and _next_is_link(tp, _CHAINLIST, method, fns[0]):
        return 2
    return -1


cdef tuple _sorted_names(object names, dict old, dict new):
    """``(sorted names, the '/name' strings)``, kept while ``names`` is unchanged."""
    cdef tuple entry, snap
    cdef Py_ssize_t i
    cdef bint cacheable
    if type(names) is not set:
        srt = tuple(sorted(names))
        return srt, tuple(["/" + name for name in srt])
    key = id(names)
    e = old.get(key)
    if e is None:
        e = new.get(key)  # (a set listed twice in one call: a link reachable twice)
    if e is not None:
        entry = <tuple>e
        if entry[0] is names:
            snap = <tuple>entry[1]
            if len(snap) == len(<set>names):
                i = 0
                for name in <set>names:
                    if <PyObject*>name != <PyObject*>snap[i]:
                        break
                    i += 1
                else:
                    new[key] = entry
                    return <tuple>entry[2]
    snap = tuple(<set>names)
    cacheable = True
    for name in snap:
        if type(name) is not str:
            cacheable = False
            break
    srt = tuple(sorted(snap))
    result = (srt, tuple(["/" + name for name in srt]))
    if cacheable:
        new[key] = (names, snap, result)
    return result


cdef object _index_prefix(Py_ssize_t i):
    while len(_INDEX_PREFIX) <= i:
        _INDEX_PREFIX.append("/%d" % len(_INDEX_PREFIX))
    return _INDEX_PREFIX[i]


cdef inline object _join(object prefix, object path):
    return path if prefix is None else prefix + path


cdef int _walk(object link, bint named, object prefix, list out, dict old,
               dict new) except -1:
    """Append ``link.params()`` (``named``: ``(prefix + path, param)`` of
    ``link.namedparams()``; no prefix: None) to ``out``."""
    cdef int kind = (_link_kind(link, "namedparams", _F_NAMED) if named
                     else _link_kind(link, "params", _F_PARAMS))
    cdef tuple names, paths
    cdef Py_ssize_t i
    if kind < 0:  # a class of its own: its own method
        if not named:
            out.extend(link.params())
        elif prefix is None:
            out.extend(link.namedparams())
        else:
            for path, param in link.namedparams():
                out.append((prefix + path, param))
        return 0
    d = link.__dict__
    names, paths = _sorted_names(getattr(link, S_PARAMS), old, new)
    for i in range(len(names)):
        param = d[names[i]]
        out.append((_join(prefix, paths[i]), param) if named else param)
    if kind == 1:
        names, paths = _sorted_names(getattr(link, S_CHILDREN), old, new)
        for i in range(len(names)):
            _walk(d[names[i]], named, _join(prefix, paths[i]) if named else None, out, old,
                  new)
    elif kind == 2:
        i = 0
        for child in getattr(link, S_CHILDREN):
            _walk(child, named, _join(prefix, _index_prefix(i)) if named else None, out, old,
                  new)
            i += 1
    return 0


cdef list _list(object link, dict names, bint named):
    cdef list out = []
    cdef dict new = {}
    if _F_PARAMS is None:
        raise RuntimeError("link_params: set_chainer_links() was not called")
    _walk(link, named, None, out, names, new)
    names.clear()
    names.update(new)
    return out


def link_params(link, dict names):
    """``list(link.params())`` for a link of Chainer's classes.

    ``names``: the sorted name sets of the previous call (``{}`` at first);
    updated to those of this call.  A link whose class has a ``params`` of
    its own (not Chainer's ``Link``, ``Chain`` or ``ChainList`` one) is
    listed by calling it.
    """
    return _list(link, names, False)


def link_namedparams(link, dict names):
    """``list(link.namedparams())`` for a link of Chainer's classes (as :func:`link_params`)."""
    return _list(link, names, True)
