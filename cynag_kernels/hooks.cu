// Gradient operations of the optimizer hooks, and the partial sums of squares
// of GradientClipping and GradientLARS, on the GPU.
//
// Compiled in one RawModule after nesterov_ag.cu (cynag_kernels/cuda.py,
// ``SOURCE_FILES``: the files are concatenated in that order), and not
// compilable alone: the folded update kernels at the end of this file
// (cynag_nesterov_ag_multi_ops_*) use, from nesterov_ag.cu, the device
// template ``cynag::nesterov_ag_multi<T, Pre>`` (the multi-tensor update,
// with a functor ``Pre`` run on each gradient element first; OpsPre below)
// and the table layout it reads.  Everything else here (the operation
// programs, the sums of squares) uses nothing of nesterov_ag.cu.
//
// Operation programs
// ------------------
// ``ops`` holds n_ops rows of 4 doubles in device memory, {kind, a, b, flags},
// with the meaning of _hook_ops.h (the CPU side) and the coefficients already
// rounded to the array dtype by cynag_kernels.hooks.op_row:
//     1 weight decay   g = g + a * p
//     2 lasso          g = g + a * sign(p)
//     3 clip           g = min(max(g, a), b)   flags bit 0: lower bound a, bit 1: upper bound b
//     4 scale          g = g * a
//     5 add            g = g + p               (p is the noise of GradientNoise)
// Other kinds leave the value unchanged.  sign is NumPy's (1, -1, +0 for
// either zero, NaN for NaN), max and min are NumPy's clip (a NaN gradient stays
// NaN; a NaN bound gives NaN; for float16 NumPy keeps the value on a tie with a
// bound, e.g. -0.0 against +0.0).  Every row reads the same ``p`` (the parameter,
// or the noise): a program needing both is two launches.
//
// Each thread loads g[i] (and p[i], once, if a row reads it), runs every row
// of the program on the value in registers and stores it once.  a and b are
// converted from double to the compute type as _hook_ops.h converts them.
// float16 is computed in float and rounded to float16 after every operation
// exactly as _hook_ops.h does, so float16 results equal the CPU's bit for bit
// (every intermediate is a float16 value, a sum of two or an exact product of
// two, none a float subnormal, so neither contraction nor -ftz changes them).
// float32 and float64 compute in their own type; NVRTC contracts
// ``g + a * p`` into a fused multiply-add (as it does in the CuPy elementwise
// kernel ``g += decay * p`` of Chainer's WeightDecay), and CuPy passes
// -ftz=true (float32 subnormals flush to zero), so they agree with the CPU to
// rounding; compiled without contraction (the emulator's -ffp-contract=off)
// they are bit-identical to cynag_kernels.hooks.apply_ops.
//
// Entry points (extern "C", no name mangling), one per array dtype:
//     cynag_hook_ops_f16(__half* g, const __half* p, long long n,
//                        const double* ops, long long n_ops)
//     cynag_hook_ops_f32(float* g, const float* p, ...)
//     cynag_hook_ops_f64(double* g, const double* p, ...)
// g and p contiguous, n elements each, not overlapping; p may be any valid
// pointer (g itself) when no row reads it.  Grid-stride loop with 64-bit
// indices; any grid covers any n.
//
// Sums of squares
// ---------------
//     cynag_sum_squares_partial_f16(const __half* x, long long n, double* partial)
//     cynag_sum_squares_partial_f32(const float* x, ...)
//     cynag_sum_squares_partial_f64(const double* x, ...)
// Thread k (global index blockIdx.x * blockDim.x + threadIdx.x) adds the
// squares, each computed in double, of its grid-stride elements and writes the
// sum to partial[k]; every thread of the grid writes its entry (0 if it has no
// element), so ``partial`` (gridDim.x * blockDim.x doubles) needs no clearing.
// No shared memory and no atomics: the launcher sums ``partial`` afterwards.
//
//     cynag_sum_squares_multi_partial_f16(const long long* table, double* partial,
//                                         long long n_tensors, long long n_items)
//     cynag_sum_squares_multi_partial_f32(...), cynag_sum_squares_multi_partial_f64(...)
// The same over many arrays of one dtype in one launch.  table, for n arrays
// and k work items (cynag_kernels.cuda.multi_table with one pointer per
// array), holds in this order:
//     ptrs[n]        addresses of the arrays
//     cum[n + 1]     element offsets of the arrays in their concatenation
//     bounds[k + 1]  work item boundaries (indices into the concatenation)
//     first[k]       first array of each work item
// Each block takes work items blockIdx.x, blockIdx.x + gridDim.x, ...; its
// threads stride over the item's elements, array by array, and each thread
// writes the sum of its squares to partial[blockIdx.x * blockDim.x + threadIdx.x].
//
// The squares of float16 and float32 values are exact in double; the order of
// the additions (per thread, then the launcher's reduction) is not NumPy's, so
// the total agrees with a NumPy float64 sum to rounding, not bit for bit.

#include <cuda_fp16.h>

namespace cynag {
namespace hooks {

// Row layout and operation codes of _hook_ops.h.
const int kOpWords = 4;
const int kWeightDecay = 1;
const int kLasso = 2;
const int kClip = 3;
const int kScale = 4;
const int kAdd = 5;

// Compute type C of each storage type, the conversions, and ``round``: the
// rounding of a computed value to the storage type, kept in C.
template <typename T> struct Elem;

template <> struct Elem<float> {
    static const bool kTieKeep = false;
    typedef float C;
    static __device__ __forceinline__ float load(float x) { return x; }
    static __device__ __forceinline__ float store(float x) { return x; }
    static __device__ __forceinline__ float round(float x) { return x; }
};

template <> struct Elem<double> {
    static const bool kTieKeep = false;
    typedef double C;
    static __device__ __forceinline__ double load(double x) { return x; }
    static __device__ __forceinline__ double store(double x) { return x; }
    static __device__ __forceinline__ double round(double x) { return x; }
};

template <> struct Elem<__half> {
    static const bool kTieKeep = true;
    typedef float C;
    static __device__ __forceinline__ float load(__half x) { return __half2float(x); }
    static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
    static __device__ __forceinline__ float round(float x)
    {
        return __half2float(__float2half_rn(x));
    }
};

// NumPy's sign, and the maximum and minimum of NumPy's clip.
template <typename C>
__device__ __forceinline__ C np_sign(C x)
{
    return x > C(0) ? C(1) : (x < C(0) ? C(-1) : (x == x ? C(0) : x));
}

template <typename C>
__device__ __forceinline__ C np_max(C x, C y)
{
    return x != x ? x : (x > y ? x : y);
}

template <typename C>
__device__ __forceinline__ C np_min(C x, C y)
{
    return x != x ? x : (x < y ? x : y);
}

// NumPy's float16 clip keeps x on a tie (x == bound, e.g. -0.0 against +0.0).
template <typename C>
__device__ __forceinline__ C np_max_tie_keep(C x, C y)
{
    return (x != x || x >= y) ? x : y;
}

template <typename C>
__device__ __forceinline__ C np_min_tie_keep(C x, C y)
{
    return (x != x || x <= y) ? x : y;
}

__device__ __forceinline__ bool reads_p(int kind)
{
    return kind == kWeightDecay || kind == kLasso || kind == kAdd;
}

// One row of the program on the value x of an element whose p value is pv.
template <typename T>
__device__ __forceinline__ typename Elem<T>::C apply_op(
        const double* __restrict__ op, typename Elem<T>::C x, typename Elem<T>::C pv)
{
    typedef Elem<T> E;
    typedef typename E::C C;
    const int kind = (int)op[0];
    const C a = (C)op[1];
    if (kind == kWeightDecay) {
        x = E::round(x + E::round(a * pv));
    } else if (kind == kLasso) {
        x = E::round(x + E::round(a * np_sign<C>(pv)));
    } else if (kind == kClip) {
        const int flags = (int)op[3];
        if (flags & 1) {
            x = E::kTieKeep ? np_max_tie_keep<C>(x, a) : np_max<C>(x, a);
        }
        if (flags & 2) {
            x = E::kTieKeep ? np_min_tie_keep<C>(x, (C)op[2]) : np_min<C>(x, (C)op[2]);
        }
        x = E::round(x);
    } else if (kind == kScale) {
        x = E::round(x * a);
    } else if (kind == kAdd) {
        x = E::round(x + pv);
    }
    return x;
}

template <typename T>
__device__ __forceinline__ void hook_ops(
        T* __restrict__ g, const T* __restrict__ p, long long n,
        const double* __restrict__ ops, long long n_ops)
{
    typedef Elem<T> E;
    typedef typename E::C C;
    bool need_p = false;
    for (long long k = 0; k < n_ops; ++k) {
        if (reads_p((int)ops[kOpWords * k])) {
            need_p = true;
            break;
        }
    }
    const long long stride = (long long)blockDim.x * (long long)gridDim.x;
    for (long long i = (long long)blockIdx.x * (long long)blockDim.x + (long long)threadIdx.x;
         i < n; i += stride) {
        C x = E::load(g[i]);
        const C pv = need_p ? E::load(p[i]) : C(0);
        for (long long k = 0; k < n_ops; ++k) {
            x = apply_op<T>(ops + kOpWords * k, x, pv);
        }
        g[i] = E::store(x);
    }
}

template <typename T>
__device__ __forceinline__ double square(T v)
{
    const double x = (double)Elem<T>::load(v);
    return x * x;
}

template <typename T>
__device__ __forceinline__ void sum_squares_partial(
        const T* __restrict__ x, long long n, double* __restrict__ partial)
{
    const long long start = (long long)blockIdx.x * (long long)blockDim.x
                            + (long long)threadIdx.x;
    const long long stride = (long long)blockDim.x * (long long)gridDim.x;
    double acc = 0.0;
    for (long long i = start; i < n; i += stride) {
        acc += square<T>(x[i]);
    }
    partial[start] = acc;
}

template <typename T>
__device__ __forceinline__ void sum_squares_multi_partial(
        const long long* __restrict__ table, double* __restrict__ partial,
        long long n_tensors, long long n_items)
{
    const long long* ptrs = table;
    const long long* cum = ptrs + n_tensors;
    const long long* bounds = cum + n_tensors + 1;
    const long long* first = bounds + n_items + 1;
    double acc = 0.0;
    for (long long item = blockIdx.x; item < n_items; item += gridDim.x) {
        const long long b0 = bounds[item];
        const long long b1 = bounds[item + 1];
        for (long long t = first[item]; t < n_tensors && cum[t] < b1; ++t) {
            const long long base = cum[t];
            const long long start = b0 > base ? b0 - base : 0;
            const long long stop = (cum[t + 1] < b1 ? cum[t + 1] : b1) - base;
            const T* x = reinterpret_cast<const T*>(ptrs[t]);
            for (long long i = start + threadIdx.x; i < stop; i += blockDim.x) {
                acc += square<T>(x[i]);
            }
        }
    }
    partial[(long long)blockIdx.x * (long long)blockDim.x + (long long)threadIdx.x] = acc;
}

// The operation program on element i of a gradient, before the update of
// the multi-tensor kernel (cynag_nesterov_ag_multi_ops_*): the hook
// operations folded into the update pass.
template <typename T>
struct OpsPre {
    const double* ops;
    long long n_ops;
    bool need_p;
    __device__ __forceinline__ void operator()(T* g, const T* p, long long i) const
    {
        typedef Elem<T> E;
        typedef typename E::C C;
        C x = E::load(g[i]);
        const C pv = need_p ? E::load(p[i]) : C(0);
        for (long long k = 0; k < n_ops; ++k) {
            x = apply_op<T>(ops + kOpWords * k, x, pv);
        }
        g[i] = E::store(x);
    }
};

__device__ __forceinline__ bool program_reads_p(const double* ops, long long n_ops)
{
    for (long long k = 0; k < n_ops; ++k) {
        if (reads_p((int)ops[kOpWords * k])) {
            return true;
        }
    }
    return false;
}

}  // namespace hooks
}  // namespace cynag

extern "C" __global__ void cynag_hook_ops_f16(
        __half* __restrict__ g, const __half* __restrict__ p, long long n,
        const double* __restrict__ ops, long long n_ops)
{
    cynag::hooks::hook_ops<__half>(g, p, n, ops, n_ops);
}

extern "C" __global__ void cynag_hook_ops_f32(
        float* __restrict__ g, const float* __restrict__ p, long long n,
        const double* __restrict__ ops, long long n_ops)
{
    cynag::hooks::hook_ops<float>(g, p, n, ops, n_ops);
}

extern "C" __global__ void cynag_hook_ops_f64(
        double* __restrict__ g, const double* __restrict__ p, long long n,
        const double* __restrict__ ops, long long n_ops)
{
    cynag::hooks::hook_ops<double>(g, p, n, ops, n_ops);
}

extern "C" __global__ void cynag_sum_squares_partial_f16(
        const __half* __restrict__ x, long long n, double* __restrict__ partial)
{
    cynag::hooks::sum_squares_partial<__half>(x, n, partial);
}

extern "C" __global__ void cynag_sum_squares_partial_f32(
        const float* __restrict__ x, long long n, double* __restrict__ partial)
{
    cynag::hooks::sum_squares_partial<float>(x, n, partial);
}

extern "C" __global__ void cynag_sum_squares_partial_f64(
        const double* __restrict__ x, long long n, double* __restrict__ partial)
{
    cynag::hooks::sum_squares_partial<double>(x, n, partial);
}

extern "C" __global__ void cynag_sum_squares_multi_partial_f16(
        const long long* __restrict__ table, double* __restrict__ partial,
        long long n_tensors, long long n_items)
{
    cynag::hooks::sum_squares_multi_partial<__half>(table, partial, n_tensors, n_items);
}

extern "C" __global__ void cynag_sum_squares_multi_partial_f32(
        const long long* __restrict__ table, double* __restrict__ partial,
        long long n_tensors, long long n_items)
{
    cynag::hooks::sum_squares_multi_partial<float>(table, partial, n_tensors, n_items);
}

extern "C" __global__ void cynag_sum_squares_multi_partial_f64(
        const long long* __restrict__ table, double* __restrict__ partial,
        long long n_tensors, long long n_items)
{
    cynag::hooks::sum_squares_multi_partial<double>(table, partial, n_tensors, n_items);
}

// The multi-tensor update of nesterov_ag.cu with an operation program run on
// every gradient element first (optimizer hooks folded into the pass):
//     cynag_nesterov_ag_multi_ops_f16(const long long* table, const float* coef,
//                                     long long n_tensors, long long n_items,
//                                     const double* ops, long long n_ops)
// (f32: float coef, f64: double coef); table and coef as for
// cynag_nesterov_ag_multi_*, ops as for cynag_hook_ops_* (p is the parameter).
extern "C" __global__ void cynag_nesterov_ag_multi_ops_f16(
        const long long* __restrict__ table, const float* __restrict__ coef,
        long long n_tensors, long long n_items, const double* __restrict__ ops, long long n_ops)
{
    const cynag::hooks::OpsPre<__half> pre = {ops, n_ops,
                                              cynag::hooks::program_reads_p(ops, n_ops)};
    cynag::nesterov_ag_multi<__half>(table, coef, n_tensors, n_items, pre);
}

extern "C" __global__ void cynag_nesterov_ag_multi_ops_f32(
        const long long* __restrict__ table, const float* __restrict__ coef,
        long long n_tensors, long long n_items, const double* __restrict__ ops, long long n_ops)
{
    const cynag::hooks::OpsPre<float> pre = {ops, n_ops,
                                             cynag::hooks::program_reads_p(ops, n_ops)};
    cynag::nesterov_ag_multi<float>(table, coef, n_tensors, n_items, pre);
}

extern "C" __global__ void cynag_nesterov_ag_multi_ops_f64(
        const long long* __restrict__ table, const double* __restrict__ coef,
        long long n_tensors, long long n_items, const double* __restrict__ ops, long long n_ops)
{
    const cynag::hooks::OpsPre<double> pre = {ops, n_ops,
                                              cynag::hooks::program_reads_p(ops, n_ops)};
    cynag::nesterov_ag_multi<double>(table, coef, n_tensors, n_items, pre);
}
