// The per-step reading of cynag.torch.NesterovAG, compiled against the
// installed PyTorch on first use (torch.utils.cpp_extension.load_inline; see
// cynag/_torch_native.py).  It reads each parameter's gradient, dtype,
// device, shape, contiguity and data pointers from the tensors themselves
// instead of through PyTorch's Python attributes (about 100 ns per parameter
// instead of a few microseconds) and fills the kernel's address table.  It
// decides and reads; it never changes a tensor or a state except in
// bump_steps.
//
// collect_groups(groups, state) -> (codes, ptrs, sizes, kinds, states, uniform, offsets),
// one row per parameter of every list of groups, one list after the other
// (offsets[k]: the first row of groups[k]; uniform: the kind of every row if all
// are code 1 of one kind, else -1):
//   codes: 0 no gradient (skipped); 1 the kernel takes it (CPU, float32 or
//   float64, at least 1-d, parameter, gradient and state v contiguous, its
//   arrays overlapping no other array of the table, in any group); 2 the Python path
//   updates it (no state yet, float16/bfloat16, CUDA, non-contiguous, 0-d,
//   overlapping); 3 something does not fit (the Python path names it and
//   raises).
//   ptrs (n, 3) int64: param, grad, v addresses of code-1 rows; sizes (n,)
//   int64 their elements; kinds (n,) int8: 0 float32, 1 float64.
//   state: the optimizer's state (a dict keyed by parameter); states[i]: the
//   parameter's entry in it, or None.
#include <torch/extension.h>

#include <climits>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

bool is_float(c10::ScalarType t)
{
    return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// A tensor object (torch.Tensor or a subclass such as nn.Parameter): the
// type check of THPVariable_Check without its call of __instancecheck__.
inline bool is_tensor(PyObject* obj)
{
    return Py_TYPE(obj) == reinterpret_cast<PyTypeObject*>(THPVariableClass)
           || PyType_IsSubtype(Py_TYPE(obj), reinterpret_cast<PyTypeObject*>(THPVariableClass));
}

// The optimizer's state by parameter object, by identity (as the state
// dictionary's keys compare: Tensor.__hash__ is id()), without calling
// Python's hash: open addressing over one array, no allocation per entry.
class ByIdentity {
public:
    void build(PyObject* dict)
    {
        size_t want = 2 * static_cast<size_t>(PyDict_Size(dict)) + 2, cap = 16;
        while (cap < want)
            cap <<= 1;
        slots_.assign(cap, Slot{nullptr, nullptr});
        mask_ = cap - 1;
        PyObject *key, *value;
        Py_ssize_t pos = 0;
        while (PyDict_Next(dict, &pos, &key, &value)) {
            size_t h = hash(key);
            while (slots_[h].key != nullptr)
                h = (h + 1) & mask_;
            slots_[h] = Slot{key, value};
        }
    }

    PyObject* find(PyObject* key) const
    {
        for (size_t h = hash(key);; h = (h + 1) & mask_) {
            if (slots_[h].key == key)
                return slots_[h].value;
            if (slots_[h].key == nullptr)
                return nullptr;
        }
    }

private:
    struct Slot {
        PyObject* key;
        PyObject* value;
    };
    size_t hash(PyObject* p) const
    {
        return static_cast<size_t>(
                   (reinterpret_cast<uint64_t>(p) >> 4) * 0x9E3779B97F4A7C15ull >> 32) & mask_;
    }
    std::vector<Slot> slots_;
    size_t mask_ = 0;
};

struct Span {
    int64_t lo, hi, row;
};

// order: the indices of spans sorted by start address.  An LSD radix sort
// (11-bit digits of lo - min(lo), passes only over the digits that vary):
// linear, where a comparison sort of a few thousand spans costs about
// 0.1 us per parameter.
void sort_by_start(const std::vector<Span>& spans, std::vector<uint32_t>& order,
                   std::vector<uint32_t>& scratch)
{
    const size_t m = spans.size();
    order.resize(m);
    scratch.resize(m);
    for (size_t k = 0; k < m; k++)
        order[k] = static_cast<uint32_t>(k);
    if (m < 2)
        return;
    uint64_t lo = UINT64_MAX, hi = 0;
    for (const Span& s : spans) {
        lo = std::min(lo, static_cast<uint64_t>(s.lo));
        hi = std::max(hi, static_cast<uint64_t>(s.lo));
    }
    const uint64_t range = hi - lo;
    constexpr int BITS = 11;
    constexpr size_t RADIX = size_t(1) << BITS;
    std::vector<uint32_t> count(RADIX);
    for (int shift = 0; shift < 64 && (range >> shift) != 0; shift += BITS) {
        std::fill(count.begin(), count.end(), 0);
        for (size_t k = 0; k < m; k++)
            count[((static_cast<uint64_t>(spans[order[k]].lo) - lo) >> shift) & (RADIX - 1)]++;
        uint32_t sum = 0;
        for (size_t d = 0; d < RADIX; d++) {
            const uint32_t c = count[d];
            count[d] = sum;
            sum += c;
        }
        for (size_t k = 0; k < m; k++) {
            const uint32_t i = order[k];
            scratch[count[((static_cast<uint64_t>(spans[i].lo) - lo) >> shift) & (RADIX - 1)]++] = i;
        }
        order.swap(scratch);
    }
}

// Prefetch hints (no-ops where the compiler has none): see warm_block.
#if defined(__GNUC__) || defined(__clang__)
#define CYNAG_PREFETCH(addr) __builtin_prefetch((const void*)(addr), 0, 3)
#else
#define CYNAG_PREFETCH(addr) ((void)(addr))
#endif

inline void prefetch_object(const void* p, int lines)
{
    for (int k = 0; k < lines; k++)
        CYNAG_PREFETCH(static_cast<const char*>(p) + 64 * k);
}

inline c10::TensorImpl* impl_of(PyObject* obj)
{
    return THPVariable_Unpack(obj).unsafeGetTensorImpl();
}

constexpr int64_t BLOCK = 64;

// Ask for what collect reads of the rows [lo, hi) before it reads it.  Each
// row is a chain of objects (the parameter's tensor, its autograd metadata,
// its gradient's tensor and storage, the state dict, v's tensor and
// storage), new gradients are cold, and read one row after another each
// link waits for the previous one: a few hundred nanoseconds of latency
// per row.  Walking the block link by link instead, every pass asks for
// the next link of all its rows at once, and the memory system fetches them
// in parallel.  Only reads of what collect itself reads; hints only.
void warm_block(PyObject* const* objs, const ByIdentity& by_param, PyObject* v_key,
                int64_t lo, int64_t hi, PyObject** sts, c10::TensorImpl** impls)
{
    const int64_t m = hi - lo;
    for (int64_t k = 0; k < m; k++) {
        PyObject* obj = objs[lo + k];
        impls[k] = is_tensor(obj) ? impl_of(obj) : nullptr;
        if (impls[k] != nullptr)
            prefetch_object(impls[k], 3);
        sts[k] = by_param.find(obj);
        if (sts[k] != nullptr)
            CYNAG_PREFETCH(sts[k]);
    }
    for (int64_t k = 0; k < m; k++) {
        if (impls[k] != nullptr) {
            CYNAG_PREFETCH(impls[k]->autograd_meta());
            CYNAG_PREFETCH(impls[k]->unsafe_storage().unsafeGetStorageImpl());
        }
        if (sts[k] != nullptr && PyDict_CheckExact(sts[k]))
            CYNAG_PREFETCH(reinterpret_cast<PyDictObject*>(sts[k])->ma_keys);
    }
    for (int64_t k = 0; k < m; k++) {
        if (impls[k] != nullptr) {
            const at::Tensor& g = impls[k]->grad();  // (Tensor::grad() may warn: read once)
            impls[k] = g.defined() ? g.unsafeGetTensorImpl() : nullptr;
            if (impls[k] != nullptr)
                prefetch_object(impls[k], 3);
        }
        PyObject* vo = nullptr;
        if (sts[k] != nullptr && PyDict_CheckExact(sts[k]))
            vo = PyDict_GetItem(sts[k], v_key);  // (borrowed; no error set)
        sts[k] = vo;
        if (vo != nullptr)
            CYNAG_PREFETCH(vo);
    }
    for (int64_t k = 0; k < m; k++) {
        if (impls[k] != nullptr)
            CYNAG_PREFETCH(impls[k]->unsafe_storage().unsafeGetStorageImpl());
        PyObject* vo = sts[k];
        impls[k] = vo != nullptr && is_tensor(vo) ? impl_of(vo) : nullptr;
        if (impls[k] != nullptr)
            prefetch_object(impls[k], 3);
    }
    for (int64_t k = 0; k < m; k++)
        if (impls[k] != nullptr)
            CYNAG_PREFETCH(impls[k]->unsafe_storage().unsafeGetStorageImpl());
}

}  // namespace

// The rows of every param group in one table (one allocation, one index of
// the state, one overlap check across the groups): a model with a group
// per layer has hundreds of groups.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, py::list, int, py::list>
collect_groups(py::list lists, py::dict state)
{
    ByIdentity by_param;
    by_param.build(state.ptr());
    std::vector<PyObject*> objs;
    py::list offsets(PyList_GET_SIZE(lists.ptr()) + 1);
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(lists.ptr()); k++) {
        PyObject* lst = PyList_GET_ITEM(lists.ptr(), k);
        if (!PyList_CheckExact(lst))
            throw py::type_error("collect_groups: each group's parameters must be a list");
        offsets[k] = py::int_(objs.size());
        for (Py_ssize_t j = 0; j < PyList_GET_SIZE(lst); j++)
            objs.push_back(PyList_GET_ITEM(lst, j));
    }
    offsets[PyList_GET_SIZE(lists.ptr())] = py::int_(objs.size());
    const int64_t n = static_cast<int64_t>(objs.size());
    py::list states(n);
    auto codes = at::zeros({n}, at::kByte);
    auto ptrs = at::zeros({n, 3}, at::kLong);
    auto sizes = at::zeros({n}, at::kLong);
    auto kinds = at::zeros({n}, at::kChar);
    uint8_t* c = codes.data_ptr<uint8_t>();
    int64_t* pt = ptrs.data_ptr<int64_t>();
    int64_t* sz = sizes.data_ptr<int64_t>();
    int8_t* kd = kinds.data_ptr<int8_t>();
    PyObject* v_key = PyUnicode_InternFromString("v");
    PyObject* warm_sts[BLOCK];
    c10::TensorImpl* warm_impls[BLOCK];
    for (int64_t i = 0; i < n; i++) {
        if (i % BLOCK == 0)
            warm_block(objs.data(), by_param, v_key, i, std::min(n, i + BLOCK), warm_sts,
                       warm_impls);
        PyObject* obj = objs[i];
        PyObject* st = by_param.find(obj);
        if (st == nullptr)
            st = Py_None;
        Py_INCREF(st);
        PyList_SET_ITEM(states.ptr(), i, st);  // (every slot of the new list is set here)
        if (!is_tensor(obj)) {
            c[i] = 3;
            continue;
        }
        const at::Tensor& p = THPVariable_Unpack(obj);
        const at::Tensor& g = p.grad();
        if (!g.defined()) {
            c[i] = 0;
            continue;
        }
        if (g.layout() != at::kStrided || p.layout() != at::kStrided
                || g.scalar_type() != p.scalar_type() || !is_float(p.scalar_type())
                || g.device() != p.device() || g.sizes() != p.sizes()) {
            c[i] = 3;
            continue;
        }
        if (st == Py_None || !PyDict_Check(st) || PyDict_Size(st) == 0) {
            c[i] = 2;  // no state yet: created by the Python path
            continue;
        }
        PyObject* vo = PyDict_GetItemWithError(st, v_key);
        if (vo == nullptr) {
            PyErr_Clear();
            c[i] = 3;
            continue;
        }
        if (!is_tensor(vo)) {
            c[i] = 3;
            continue;
        }
        const at::Tensor& v = THPVariable_Unpack(vo);
        if (v.layout() != at::kStrided || v.scalar_type() != p.scalar_type()
                || v.device() != p.device() || v.sizes() != p.sizes()) {
            c[i] = 3;
            continue;
        }
        const auto t = p.scalar_type();
        if (!p.device().is_cpu() || (t != at::kFloat && t != at::kDouble) || p.dim() == 0
                || !p.is_contiguous() || !g.is_contiguous() || !v.is_contiguous()) {
            c[i] = 2;
            continue;
        }
        c[i] = 1;
        pt[3 * i] = reinterpret_cast<int64_t>(p.data_ptr());
        pt[3 * i + 1] = reinterpret_cast<int64_t>(g.data_ptr());
        pt[3 * i + 2] = reinterpret_cast<int64_t>(v.data_ptr());
        sz[i] = p.numel();
        kd[i] = t == at::kFloat ? 0 : 1;
    }
    Py_DECREF(v_key);
    // Rows whose arrays overlap (another row's, or one another's) go to the
    // Python path, which updates them one by one in order, as Chainer's loop.
    std::vector<Span> spans;
    spans.reserve(static_cast<size_t>(3 * n));
    for (int64_t i = 0; i < n; i++) {
        if (c[i] != 1)
            continue;
        const int64_t nb = sz[i] * (kd[i] == 0 ? 4 : 8);
        if (nb == 0)
            continue;
        for (int j = 0; j < 3; j++)
            spans.push_back({pt[3 * i + j], pt[3 * i + j] + nb, i});
    }
    std::vector<uint32_t> order, scratch;
    sort_by_start(spans, order, scratch);
    // Sorted by start: a span overlaps another iff it starts before an earlier
    // one ends, or the next one starts before it ends.
    int64_t runmax = INT64_MIN;
    const size_t m = spans.size();
    for (size_t k = 0; k < m; k++) {
        const Span& s = spans[order[k]];
        if (s.lo < runmax || (k + 1 < m && spans[order[k + 1]].lo < s.hi))
            c[s.row] = 2;
        runmax = std::max(runmax, s.hi);
    }
    // uniform: the kind of every row when all are code 1 of one kind, else -1.
    int uniform = n > 0 ? kd[0] : -1;
    for (int64_t i = 0; i < n && uniform >= 0; i++)
        if (c[i] != 1 || kd[i] != uniform)
            uniform = -1;
    return std::make_tuple(codes, ptrs, sizes, kinds, states, uniform, offsets);
}

// state["step"] += 1 for every state dict of the list (Python ints).
void bump_steps(py::list states)
{
    PyObject* key = PyUnicode_InternFromString("step");
    const Py_ssize_t n = PyList_GET_SIZE(states.ptr());
    constexpr Py_ssize_t AHEAD = 8;  // (see warm_block: the dicts are cold after the kernel)
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i + AHEAD < n) {
            PyObject* later = PyList_GET_ITEM(states.ptr(), i + AHEAD);
            CYNAG_PREFETCH(later);
            if (i + 2 * AHEAD < n)
                CYNAG_PREFETCH(PyList_GET_ITEM(states.ptr(), i + 2 * AHEAD));
            if (PyDict_CheckExact(later))
                CYNAG_PREFETCH(reinterpret_cast<PyDictObject*>(later)->ma_keys);
        }
        PyObject* st = PyList_GET_ITEM(states.ptr(), i);
        PyObject* old = PyDict_GetItemWithError(st, key);
        if (old == nullptr) {
            Py_DECREF(key);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_KeyError, "step");
            throw py::error_already_set();
        }
        PyObject* one = PyLong_FromLong(1);
        PyObject* nw = PyNumber_Add(old, one);
        Py_DECREF(one);
        if (nw == nullptr || PyDict_SetItem(st, key, nw) < 0) {
            Py_XDECREF(nw);
            Py_DECREF(key);
            throw py::error_already_set();
        }
        Py_DECREF(nw);
    }
    Py_DECREF(key);
}
