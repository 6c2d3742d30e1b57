// The per-step reading of cynag.torch.NesterovAG, compiled against the
// installed PyTorch on first use (torch.utils.cpp_extension.load_inline; see
// cynag/_torch_native.py).  It reads each parameter's gradient, dtype,
// device, shape, contiguity and data pointers from the tensors themselves
// instead of through PyTorch's Python attributes (about 100 ns per parameter
// instead of a few microseconds) and fills the kernel's address table.  It
// decides and reads; it never changes a tensor or a state except in
// bump_steps.
//
// collect(params, state) -> (codes, ptrs, sizes, kinds, states, uniform), one row per
// parameter (uniform: the kind of every row if all are code 1 of one kind, else -1):
//   codes: 0 no gradient (skipped); 1 the kernel takes it (CPU, float32 or
//   float64, at least 1-d, parameter, gradient and state v contiguous, its
//   arrays overlapping no other array of the table); 2 the Python path
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
#include <tuple>
#include <unordered_map>
#include <vector>

namespace {

bool is_float(c10::ScalarType t)
{
    return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, py::list, int> collect(
    py::list params, py::dict state)
{
    const int64_t n = static_cast<int64_t>(py::len(params));
    // The optimizer's state by parameter object (identity, as the dictionary's
    // keys compare: Tensor.__hash__ is id()), without calling Python's hash.
    std::unordered_map<PyObject*, PyObject*> by_param;
    {
        PyObject *key, *value;
        Py_ssize_t pos = 0;
        by_param.reserve(static_cast<size_t>(PyDict_Size(state.ptr())) * 2 + 1);
        while (PyDict_Next(state.ptr(), &pos, &key, &value))
            by_param[key] = value;
    }
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
    for (int64_t i = 0; i < n; i++) {
        PyObject* obj = PyList_GET_ITEM(params.ptr(), i);
        auto found = by_param.find(obj);
        PyObject* st = found == by_param.end() ? Py_None : found->second;
        Py_INCREF(st);
        PyList_SET_ITEM(states.ptr(), i, st);  // (every slot of the new list is set here)
        if (!THPVariable_Check(obj)) {
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
        if (!THPVariable_Check(vo)) {
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
    struct Span {
        int64_t lo, hi, row;
    };
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
    std::sort(spans.begin(), spans.end(),
              [](const Span& a, const Span& b) { return a.lo < b.lo; });
    // Sorted by start: a span overlaps another iff it starts before an earlier
    // one ends, or the next one starts before it ends.
    int64_t runmax = INT64_MIN;
    const size_t m = spans.size();
    for (size_t k = 0; k < m; k++) {
        if (spans[k].lo < runmax || (k + 1 < m && spans[k + 1].lo < spans[k].hi))
            c[spans[k].row] = 2;
        runmax = std::max(runmax, spans[k].hi);
    }
    // uniform: the kind of every row when all are code 1 of one kind, else -1.
    int uniform = n > 0 ? kd[0] : -1;
    for (int64_t i = 0; i < n && uniform >= 0; i++)
        if (c[i] != 1 || kd[i] != uniform)
            uniform = -1;
    return std::make_tuple(codes, ptrs, sizes, kinds, states, uniform);
}

// state["step"] += 1 for every state dict of the list (Python ints).
void bump_steps(py::list states)
{
    PyObject* key = PyUnicode_InternFromString("step");
    const Py_ssize_t n = PyList_GET_SIZE(states.ptr());
    for (Py_ssize_t i = 0; i < n; i++) {
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
