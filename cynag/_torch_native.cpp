// The per-step reading of cynag.torch.NesterovAG, compiled against the
// installed PyTorch on first use (torch.utils.cpp_extension.load_inline; see
// cynag/_torch_native.py).  It reads each parameter's gradient, dtype,
// device, shape, contiguity and data pointers from the tensors themselves
// instead of through PyTorch's Python attributes (about 100 ns per parameter
// instead of a few microseconds) and fills the kernel's address table.  It
// decides and reads; it never changes a tensor or a state except in
// bump_steps.
//
// collect_groups(groups, state) -> (codes, ptrs, sizes, kinds, states, offsets),
// one row per parameter of every list of groups, one list after the other
// (offsets[k]: the first row of groups[k]):
//   codes: 0 no gradient (skipped); 1 the kernel takes it (CPU, float32 or
//   float64, at least 1-d, parameter, gradient and state v contiguous, its
//   arrays overlapping no other array of the table, in any group); 2 the Python path
//   updates it (no state yet, float16/bfloat16, not on the CPU (CUDA; the
//   Python checks refuse other devices), non-contiguous, 0-d, overlapping, a
//   negative view or an efficient zero tensor); 3 something does not fit
//   (the Python path names it and raises), among them a state whose "step"
//   is not an int, an inference tensor outside inference mode and a CPU
//   tensor without memory (a subclass without storage, such as DTensor).
//   ptrs (n, 3) int64: param, grad, v addresses of code-1 rows; sizes (n,)
//   int64 their elements; kinds (n,) int8: 0 float32, 1 float64.
//   state: the optimizer's state (a dict keyed by parameter); states[i]: the
//   parameter's entry in it, or None.
//
// step_groups(groups, state, lrs, momenta, weight_decays, n_threads, threshold,
//             items_per_thread, item_align, kernel_api) -> None or the tuple above:
// the usual step in one call.  When every row is code 0 or 1 and the kernel
// takes every group's lr, momentum and weight decay (Python floats that fit
// the dtype), it updates the code-1 rows through the kernel's C entry
// (cynag_kernels._nesterov_cpu.kernel_api(): the coefficient and weight
// decay rules and the table runner of cynag.functional.nesterov_ag_addresses;
// weight decay on copies of the gradients, which are only read), one call per
// dtype and one per decayed group, bumps the version counters of their params and vs (as an
// in-place operation does), adds 1 to their states' "step" and returns None.
// Otherwise it changes nothing and returns what collect_groups returns, for
// the general path.  One call instead of a dozen NumPy and PyTorch operations:
// after a backward pass their code is cold, and each costs tens of
// microseconds, more than the whole update of a small model.
#include <torch/extension.h>

#include <climits>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <new>
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

    // The slot where a lookup of key starts (for a prefetch hint).
    const void* first_slot(PyObject* key) const { return &slots_[hash(key)]; }

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

// Every cache line of the object [p, p + bytes): an object need not start
// on a line (malloc aligns to 16 bytes), so a TensorImpl (176 bytes in
// PyTorch 2.x) can span four.
inline void prefetch_object(const void* p, size_t bytes)
{
    const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63);
    const uintptr_t last = reinterpret_cast<uintptr_t>(p) + bytes - 1;
    for (uintptr_t a = first; a <= last; a += 64)
        CYNAG_PREFETCH(reinterpret_cast<const void*>(a));
}

// What collect reads of each object (the fields it reads lie within these
// bytes of the object's start).
constexpr size_t IMPL_BYTES = sizeof(c10::TensorImpl);
constexpr size_t META_BYTES = 64;     // AutogradMeta up to its grad_
constexpr size_t STORAGE_BYTES = 64;  // StorageImpl up to its data pointer
constexpr size_t OBJECT_BYTES = 32;   // a tensor's PyObject: header and its at::Tensor
constexpr size_t DICT_BYTES = 48;     // PyDictObject
constexpr size_t KEYS_BYTES = 128;    // the keys of a small dict ({"v", "step"})

inline c10::TensorImpl* impl_of(PyObject* obj)
{
    return THPVariable_Unpack(obj).unsafeGetTensorImpl();
}

// A tensor whose memory does not hold its values as they read: a negative
// view (the sign is a bit of the tensor) or an efficient zero tensor (no
// memory).  The Python path takes it through copies, which resolve both.
inline bool lazy(const at::Tensor& t)
{
    return t.is_neg() || t._is_zerotensor();
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
        prefetch_object(objs[lo + k], OBJECT_BYTES);
        CYNAG_PREFETCH(by_param.first_slot(objs[lo + k]));
    }
    for (int64_t k = 0; k < m; k++) {
        PyObject* obj = objs[lo + k];
        impls[k] = is_tensor(obj) ? impl_of(obj) : nullptr;
        if (impls[k] != nullptr)
            prefetch_object(impls[k], IMPL_BYTES);
        sts[k] = by_param.find(obj);
        if (sts[k] != nullptr)
            prefetch_object(sts[k], DICT_BYTES);
    }
    for (int64_t k = 0; k < m; k++) {
        if (impls[k] != nullptr) {
            prefetch_object(impls[k]->autograd_meta(), META_BYTES);
            prefetch_object(impls[k]->unsafe_storage().unsafeGetStorageImpl(), STORAGE_BYTES);
        }
        if (sts[k] != nullptr && PyDict_CheckExact(sts[k]))
            prefetch_object(reinterpret_cast<PyDictObject*>(sts[k])->ma_keys, KEYS_BYTES);
    }
    for (int64_t k = 0; k < m; k++) {
        if (impls[k] != nullptr) {
            const at::Tensor& g = impls[k]->grad();  // (Tensor::grad() may warn: read once)
            impls[k] = g.defined() ? g.unsafeGetTensorImpl() : nullptr;
            if (impls[k] != nullptr)
                prefetch_object(impls[k], IMPL_BYTES);
        }
        PyObject* vo = nullptr;
        if (sts[k] != nullptr && PyDict_CheckExact(sts[k]))
            vo = PyDict_GetItem(sts[k], v_key);  // (borrowed; no error set)
        sts[k] = vo;
        if (vo != nullptr)
            prefetch_object(vo, OBJECT_BYTES);
    }
    for (int64_t k = 0; k < m; k++) {
        if (impls[k] != nullptr)
            prefetch_object(impls[k]->unsafe_storage().unsafeGetStorageImpl(), STORAGE_BYTES);
        PyObject* vo = sts[k];
        impls[k] = vo != nullptr && is_tensor(vo) ? impl_of(vo) : nullptr;
        if (impls[k] != nullptr)
            prefetch_object(impls[k], IMPL_BYTES);
    }
    for (int64_t k = 0; k < m; k++)
        if (impls[k] != nullptr)
            prefetch_object(impls[k]->unsafe_storage().unsafeGetStorageImpl(), STORAGE_BYTES);
}

}  // namespace

// The rows of every param group in one table (one allocation, one index of
// the state, one overlap check across the groups): a model with a group
// per layer has hundreds of groups.
namespace {

struct Rows {
    std::vector<uint8_t> codes;
    std::vector<int64_t> ptrs;  // (n, 3)
    std::vector<int64_t> sizes;
    std::vector<int8_t> kinds;
    std::vector<c10::TensorImpl*> impls;  // (n, 3): param, grad, v of code-1 rows
};

// The table of collect_groups, in vectors; states and offsets as it returns them.
void collect_rows(py::list lists, py::dict state, Rows& rows, py::list& states_out,
                  py::list& offsets_out)
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
    rows.codes.assign(n, 0);
    rows.ptrs.assign(3 * n, 0);
    rows.sizes.assign(n, 0);
    rows.kinds.assign(n, 0);
    rows.impls.assign(3 * n, nullptr);
    uint8_t* c = rows.codes.data();
    int64_t* pt = rows.ptrs.data();
    int64_t* sz = rows.sizes.data();
    int8_t* kd = rows.kinds.data();
    PyObject* v_key = PyUnicode_InternFromString("v");
    PyObject* step_key = PyUnicode_InternFromString("step");
    const bool inference = c10::InferenceMode::is_enabled();
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
        if (p.is_inference() && !inference) {
            c[i] = 3;  // (updated in place only in inference mode)
            continue;
        }
        if (st == Py_None || !PyDict_Check(st) || PyDict_Size(st) == 0) {
            c[i] = 2;  // no state yet: created by the Python path
            continue;
        }
        PyObject* vo = PyDict_GetItemWithError(st, v_key);
        if (vo == nullptr) {
            // Entries of the user's own but neither "v" nor "step": not started
            // (the Python path adds them); "step" without "v" does not fit.
            PyErr_Clear();
            PyObject* so = PyDict_GetItemWithError(st, step_key);
            PyErr_Clear();
            c[i] = so == nullptr ? 2 : 3;
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
        PyObject* step = PyDict_GetItemWithError(st, step_key);
        if (step == nullptr || !PyLong_CheckExact(step) || (v.is_inference() && !inference)) {
            PyErr_Clear();
            c[i] = 3;  // (the Python path names what does not fit)
            continue;
        }
        const auto t = p.scalar_type();
        if (!p.device().is_cpu() || (t != at::kFloat && t != at::kDouble) || p.dim() == 0
                || !p.is_contiguous() || !g.is_contiguous() || !v.is_contiguous()
                || lazy(p) || lazy(g) || lazy(v)) {
            c[i] = 2;
            continue;
        }
        // A CPU tensor without memory (a subclass without storage, such as
        // DTensor): the Python checks name it.
        if (!p.unsafeGetTensorImpl()->has_storage() || !g.unsafeGetTensorImpl()->has_storage()
                || !v.unsafeGetTensorImpl()->has_storage()) {
            c[i] = 3;
            continue;
        }
        const int64_t pp = reinterpret_cast<int64_t>(p.data_ptr());
        const int64_t gp = reinterpret_cast<int64_t>(g.data_ptr());
        const int64_t vp = reinterpret_cast<int64_t>(v.data_ptr());
        const int64_t numel = p.numel();
        if (numel > 0 && (pp == 0 || gp == 0 || vp == 0)) {
            c[i] = 3;
            continue;
        }
        c[i] = 1;
        rows.impls[3 * i] = p.unsafeGetTensorImpl();
        rows.impls[3 * i + 1] = g.unsafeGetTensorImpl();
        rows.impls[3 * i + 2] = v.unsafeGetTensorImpl();
        pt[3 * i] = pp;
        pt[3 * i + 1] = gp;
        pt[3 * i + 2] = vp;
        sz[i] = numel;
        kd[i] = t == at::kFloat ? 0 : 1;
    }
    Py_DECREF(v_key);
    Py_DECREF(step_key);
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
    states_out = states;
    offsets_out = offsets;
}

py::tuple as_tuple(const Rows& rows, const py::list& states, const py::list& offsets)
{
    const int64_t n = static_cast<int64_t>(rows.codes.size());
    auto codes = at::empty({n}, at::kByte);
    auto ptrs = at::empty({n, 3}, at::kLong);
    auto sizes = at::empty({n}, at::kLong);
    auto kinds = at::empty({n}, at::kChar);
    std::copy(rows.codes.begin(), rows.codes.end(), codes.data_ptr<uint8_t>());
    std::copy(rows.ptrs.begin(), rows.ptrs.end(), ptrs.data_ptr<int64_t>());
    std::copy(rows.sizes.begin(), rows.sizes.end(), sizes.data_ptr<int64_t>());
    std::copy(rows.kinds.begin(), rows.kinds.end(), kinds.data_ptr<int8_t>());
    return py::make_tuple(codes, ptrs, sizes, kinds, states, offsets);
}

// state["step"] += 1 for each state dict (Python ints); prefetching ahead (see
// warm_block: the dicts are cold after the kernel).
void bump(PyObject* const* sts, Py_ssize_t n)
{
    PyObject* key = PyUnicode_InternFromString("step");
    constexpr Py_ssize_t AHEAD = 8;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i + AHEAD < n) {
            PyObject* later = sts[i + AHEAD];
            CYNAG_PREFETCH(later);
            if (i + 2 * AHEAD < n)
                CYNAG_PREFETCH(sts[i + 2 * AHEAD]);
            if (PyDict_CheckExact(later))
                CYNAG_PREFETCH(reinterpret_cast<PyDictObject*>(later)->ma_keys);
        }
        PyObject* st = sts[i];
        PyObject* old = PyDict_Check(st) ? PyDict_GetItemWithError(st, key) : nullptr;
        if (old == nullptr) {
            Py_DECREF(key);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_KeyError, "step");
            throw py::error_already_set();
        }
        Py_INCREF(old);
        PyObject* one = PyLong_FromLong(1);
        PyObject* nw = PyNumber_Add(old, one);
        Py_DECREF(one);
        Py_DECREF(old);
        if (nw == nullptr || PyDict_SetItem(st, key, nw) < 0) {
            Py_XDECREF(nw);
            Py_DECREF(key);
            throw py::error_already_set();
        }
        Py_DECREF(nw);
    }
    Py_DECREF(key);
}

// cynag_kernels._nesterov_cpu's C entry: cynag_kernel_api and its capsule's
// name, from cynag_kernels/_kernel_api.h (put in front of this source by
// cynag/_torch_native.py).
using KernelAPI = cynag_kernel_api;
constexpr const char* KERNEL_API_NAME = CYNAG_KERNEL_API_NAME;
constexpr int NPY_FLOAT_NUM = 11, NPY_DOUBLE_NUM = 12;
// Elements from which the kernel runs without the GIL (about a millisecond of work).
constexpr int64_t RELEASE_GIL_ELEMENTS = int64_t(1) << 20;

// The tensors' version counters, as an in-place operation bumps them (autograd
// then refuses a graph that saved their old values), prefetching ahead: the
// counters are objects of their own, cold.  VariableVersion holds one
// pointer, to its shared counter.
static_assert(sizeof(c10::VariableVersion) == sizeof(void*),
              "c10::VariableVersion is expected to hold one pointer");

void bump_versions(const std::vector<c10::TensorImpl*>& impls)
{
    constexpr size_t AHEAD = 8;
    const size_t n = impls.size();
    for (size_t i = 0; i < n; i++) {
        if (i + AHEAD < n)
            CYNAG_PREFETCH(*reinterpret_cast<void* const*>(
                &impls[i + AHEAD]->version_counter()));
        impls[i]->bump_version();
    }
}

}  // namespace

py::tuple collect_groups(py::list lists, py::dict state)
{
    Rows rows;
    py::list states, offsets;
    collect_rows(lists, state, rows, states, offsets);
    return as_tuple(rows, states, offsets);
}

py::object step_groups(py::list lists, py::dict state, py::list lrs, py::list momenta,
                       py::list decays, int n_threads, int64_t threshold,
                       int items_per_thread, int item_align, py::capsule kernel_api)
{
    Rows rows;
    py::list states, offsets;
    collect_rows(lists, state, rows, states, offsets);
    const int64_t n = static_cast<int64_t>(rows.codes.size());
    const Py_ssize_t n_groups = PyList_GET_SIZE(lists.ptr());
    auto general = [&]() -> py::object { return as_tuple(rows, states, offsets); };
    if (PyList_GET_SIZE(lrs.ptr()) != n_groups || PyList_GET_SIZE(momenta.ptr()) != n_groups
            || PyList_GET_SIZE(decays.ptr()) != n_groups)
        throw py::value_error("step_groups: one lr, momentum and weight decay per group");
    const auto* api = static_cast<const KernelAPI*>(
        PyCapsule_GetPointer(kernel_api.ptr(), KERNEL_API_NAME));
    if (api == nullptr)
        throw py::error_already_set();
    if (api->n_coef != 6 || api->n_op_words != 4)
        throw py::value_error("step_groups: the kernel's rows do not match");
    std::vector<int32_t> group_of(n);
    for (Py_ssize_t k = 0; k < n_groups; k++) {
        const int64_t lo = py::cast<int64_t>(offsets[k]), hi = py::cast<int64_t>(offsets[k + 1]);
        for (int64_t i = lo; i < hi; i++)
            group_of[i] = static_cast<int32_t>(k);
    }
    // The (group, dtype) pairs that have rows, and their coefficients and
    // weight decay rows.
    std::vector<int8_t> wanted(static_cast<size_t>(2 * n_groups), 0);
    for (int64_t i = 0; i < n; i++) {
        if (rows.codes[i] == 0)
            continue;
        if (rows.codes[i] != 1)
            return general();
        wanted[2 * group_of[i] + rows.kinds[i]] = 1;
    }
    std::vector<double> coef(static_cast<size_t>(2 * n_groups * 6));
    std::vector<double> decay(static_cast<size_t>(2 * n_groups * 4));
    std::vector<int8_t> decayed(static_cast<size_t>(n_groups), 0);
    for (Py_ssize_t gi = 0; gi < n_groups; gi++) {
        PyObject* lr = PyList_GET_ITEM(lrs.ptr(), gi);
        PyObject* m = PyList_GET_ITEM(momenta.ptr(), gi);
        PyObject* wd = PyList_GET_ITEM(decays.ptr(), gi);
        if (!wanted[2 * gi] && !wanted[2 * gi + 1])
            continue;
        if (!PyFloat_CheckExact(lr) || !PyFloat_CheckExact(m) || !PyFloat_CheckExact(wd))
            return general();  // (the general path's rule for other numbers)
        decayed[gi] = PyFloat_AS_DOUBLE(wd) != 0.0;
        for (int kind = 0; kind < 2; kind++) {
            if (!wanted[2 * gi + kind])
                continue;
            const int type_num = kind == 0 ? NPY_FLOAT_NUM : NPY_DOUBLE_NUM;
            if (!api->coefficients(type_num, PyFloat_AS_DOUBLE(lr), PyFloat_AS_DOUBLE(m), 0,
                                   0.0, &coef[6 * (2 * gi + kind)]))
                return general();  // (a coefficient the dtype cannot hold)
            if (decayed[gi]
                    && !api->weight_decay(type_num, PyFloat_AS_DOUBLE(wd),
                                          &decay[4 * (2 * gi + kind)]))
                return general();
        }
    }
    // Every check passed: nothing below refuses.  One batch (one kernel call)
    // for the undecayed rows of each dtype, one for each decayed (group,
    // dtype), all made before any runs.  Their arrays overlap no other row's,
    // so the order does not matter.
    struct Batch {
        int kind = 0;
        const double* ops = nullptr;
        std::vector<int64_t> ptrs, cum{0};
        std::vector<double> coef;
    };
    std::vector<Batch> batches;
    std::vector<int32_t> batch_of(static_cast<size_t>(2 * n_groups + 2), -1);
    std::vector<PyObject*> done;
    std::vector<c10::TensorImpl*> touched;  // the params and vs the kernel writes
    for (int64_t i = 0; i < n; i++) {
        if (rows.codes[i] != 1)
            continue;
        const int32_t gi = group_of[i];
        const int kind = rows.kinds[i];
        const size_t key = decayed[gi] ? 2 + 2 * gi + kind : kind;
        if (batch_of[key] < 0) {
            batch_of[key] = static_cast<int32_t>(batches.size());
            batches.emplace_back();
            batches.back().kind = kind;
            if (decayed[gi])
                batches.back().ops = &decay[4 * (2 * gi + kind)];
        }
        Batch& b = batches[batch_of[key]];
        b.ptrs.insert(b.ptrs.end(), &rows.ptrs[3 * i], &rows.ptrs[3 * i] + 3);
        b.cum.push_back(b.cum.back() + rows.sizes[i]);
        const double* k = &coef[6 * (2 * gi + kind)];
        b.coef.insert(b.coef.end(), k, k + 6);
        done.push_back(PyList_GET_ITEM(states.ptr(), i));
        touched.push_back(rows.impls[3 * i]);
        touched.push_back(rows.impls[3 * i + 2]);
    }
    // Large work runs without the GIL, holding references to its tensors
    // (another thread could drop a gradient meanwhile); small work keeps it.
    int64_t total = 0;
    for (const Batch& b : batches)
        total += b.cum.back();
    const bool release = total >= RELEASE_GIL_ELEMENTS;
    std::vector<at::Tensor> held;
    if (release) {
        held.reserve(static_cast<size_t>(3 * done.size()));
        for (int64_t i = 0; i < n; i++)
            if (rows.codes[i] == 1)
                for (int j = 0; j < 3; j++)
                    held.push_back(at::Tensor(
                        c10::intrusive_ptr<c10::TensorImpl>::reclaim_copy(rows.impls[3 * i + j])));
    }
    for (const Batch& b : batches) {
        const int64_t m = static_cast<int64_t>(b.cum.size()) - 1;
        const int threads = b.cum.back() < threshold ? 1 : std::max(1, n_threads);
        const int type_num = b.kind == 0 ? NPY_FLOAT_NUM : NPY_DOUBLE_NUM;
        const int n_ops = b.ops != nullptr ? 1 : 0;
        int rc;
        if (release) {
            Py_BEGIN_ALLOW_THREADS
            rc = api->run_table(b.ptrs.data(), b.cum.data(), b.coef.data(), m, type_num,
                                threads, items_per_thread, item_align, b.ops, n_ops, 1);
            Py_END_ALLOW_THREADS
        } else {
            rc = api->run_table(b.ptrs.data(), b.cum.data(), b.coef.data(), m, type_num,
                                threads, items_per_thread, item_align, b.ops, n_ops, 1);
        }
        if (rc != 0)  // (-1: over 512 work items, 256 threads; the type numbers are the kernel's)
            throw std::bad_alloc();
    }
    bump_versions(touched);
    bump(done.data(), static_cast<Py_ssize_t>(done.size()));
    return py::none();
}

// state["step"] += 1 for every state dict of the list (Python ints).
void bump_steps(py::list states)
{
    // (a copy of the items: bump runs Python code, which could resize the list)
    const Py_ssize_t n = PyList_GET_SIZE(states.ptr());
    std::vector<PyObject*> items(static_cast<size_t>(n));
    std::vector<py::object> refs;
    refs.reserve(static_cast<size_t>(n));
    for (Py_ssize_t i = 0; i < n; i++) {
        items[i] = PyList_GET_ITEM(states.ptr(), i);
        refs.push_back(py::reinterpret_borrow<py::object>(items[i]));
    }
    bump(items.data(), n);
}
