// NesterovAG update on the GPU, one element per thread in a grid-stride loop.
//
// Same arithmetic, in the same order, as Chainer's elementwise kernel
// ``nesterov_ag`` (chainer/optimizers/nesterov_ag.py), with T the array type:
//
//     v = v * momentum - lr * grad;
//     param += momentum * momentum * v - (1 + momentum) * lr * grad;
//
// lr and momentum arrive as kernel arguments of the compute type (float for
// float16 and float32 arrays, double for float64 arrays); the launcher rounds
// them to the array dtype first, as Chainer's kernel receives them.  float16
// arrays are computed in float and stored with round-to-nearest-even; the
// parameter update reads ``v`` after it has been stored as float16, as in
// Chainer's kernel where ``v`` is a half variable.  NVRTC contracts a * b + c
// into fused multiply-adds by default, so GPU results agree with the CPU path
// to rounding, not bit for bit.
//
// Entry points (extern "C", no name mangling), one per array dtype:
//     cynag_nesterov_ag_f16(__half*, const __half*, __half*, float, float, long long)
//     cynag_nesterov_ag_f32(float*, const float*, float*, float, float, long long)
//     cynag_nesterov_ag_f64(double*, const double*, double*, double, double, long long)
// Arguments: param, grad, v (contiguous, n elements each), lr, momentum, n.
// Indices are 64-bit; any grid size covers any n; n == 0 does nothing.
//
// Multi-tensor entry points: one launch updates every tensor of a table
// (apex's multi-tensor-apply design, with the table in device memory so
// that there is no limit on the number of tensors per launch):
//     cynag_nesterov_ag_multi_f16(const long long* table, const float* coef,
//                                 long long n_tensors, long long n_items)
//     cynag_nesterov_ag_multi_f32(const long long* table, const float* coef, ...)
//     cynag_nesterov_ag_multi_f64(const long long* table, const double* coef, ...)
// table, for n tensors and k work items, holds in this order:
//     ptrs[3 * n]    addresses of param, grad, v of each tensor
//     cum[n + 1]     element offsets of the tensors in their concatenation
//     bounds[k + 1]  work item boundaries (indices into the concatenation)
//     first[k]       first tensor of each work item
// coef[4 * t + {0, 1, 2, 3}]: lr, momentum, loss scale, loss-scale flag of
// tensor t, in the compute type.  With the flag set the gradient is first
// divided by the loss scale and stored (Chainer's ``grad /= loss_scale``).
// Each block takes work items blockIdx.x, blockIdx.x + gridDim.x, ...; its
// threads stride over the item's elements, tensor by tensor.  The element
// update is the one of the single-tensor kernels.

#include <cuda_fp16.h>

namespace cynag {

// Compute type of each storage type, with the conversions between them.
template <typename T> struct Arith;

template <> struct Arith<float> {
    typedef float compute;
    static __device__ __forceinline__ float load(float x) { return x; }
    static __device__ __forceinline__ float store(float x) { return x; }
};

template <> struct Arith<double> {
    typedef double compute;
    static __device__ __forceinline__ double load(double x) { return x; }
    static __device__ __forceinline__ double store(double x) { return x; }
};

template <> struct Arith<__half> {
    typedef float compute;
    static __device__ __forceinline__ float load(__half x) { return __half2float(x); }
    static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
};

template <typename T>
__device__ __forceinline__ void nesterov_ag_element(
        T* __restrict__ param, const T* __restrict__ grad, T* __restrict__ v, long long i,
        typename Arith<T>::compute lr, typename Arith<T>::compute momentum)
{
    typedef Arith<T> A;
    typedef typename A::compute C;
    const C g = A::load(grad[i]);
    const T v_new = A::store(A::load(v[i]) * momentum - lr * g);
    v[i] = v_new;
    const C vv = A::load(v_new);
    param[i] = A::store(A::load(param[i])
                        + (momentum * momentum * vv - (1 + momentum) * lr * g));
}

template <typename T>
__device__ __forceinline__ void nesterov_ag_grid_stride(
        T* __restrict__ param, const T* __restrict__ grad, T* __restrict__ v,
        typename Arith<T>::compute lr, typename Arith<T>::compute momentum, long long n)
{
    const long long stride = (long long)blockDim.x * (long long)gridDim.x;
    for (long long i = (long long)blockIdx.x * (long long)blockDim.x + (long long)threadIdx.x;
         i < n; i += stride) {
        nesterov_ag_element<T>(param, grad, v, i, lr, momentum);
    }
}

// What runs on an element's gradient before its update (nothing here; the
// hook operations of hooks.cu for the cynag_nesterov_ag_multi_ops entries).
struct NoPre {
    template <typename T>
    __device__ __forceinline__ void operator()(T*, const T*, long long) const {}
};

template <typename T, typename Pre>
__device__ __forceinline__ void nesterov_ag_multi(
        const long long* __restrict__ table, const typename Arith<T>::compute* __restrict__ coef,
        long long n_tensors, long long n_items, const Pre& pre)
{
    typedef Arith<T> A;
    typedef typename A::compute C;
    const long long* ptrs = table;
    const long long* cum = ptrs + 3 * n_tensors;
    const long long* bounds = cum + n_tensors + 1;
    const long long* first = bounds + n_items + 1;
    for (long long item = blockIdx.x; item < n_items; item += gridDim.x) {
        const long long b0 = bounds[item];
        const long long b1 = bounds[item + 1];
        for (long long t = first[item]; t < n_tensors && cum[t] < b1; ++t) {
            const long long base = cum[t];
            const long long start = b0 > base ? b0 - base : 0;
            const long long stop = (cum[t + 1] < b1 ? cum[t + 1] : b1) - base;
            T* param = reinterpret_cast<T*>(ptrs[3 * t]);
            T* grad = reinterpret_cast<T*>(ptrs[3 * t + 1]);
            T* v = reinterpret_cast<T*>(ptrs[3 * t + 2]);
            const C lr = coef[4 * t];
            const C momentum = coef[4 * t + 1];
            const C loss_scale = coef[4 * t + 2];
            const bool scaled = coef[4 * t + 3] != 0;
            for (long long i = start + threadIdx.x; i < stop; i += blockDim.x) {
                pre(grad, param, i);
                if (scaled) {
                    grad[i] = A::store(A::load(grad[i]) / loss_scale);
                }
                nesterov_ag_element<T>(param, grad, v, i, lr, momentum);
            }
        }
    }
}

}  // namespace cynag

extern "C" __global__ void cynag_nesterov_ag_f16(
        __half* __restrict__ param, const __half* __restrict__ grad, __half* __restrict__ v,
        float lr, float momentum, long long n)
{
    cynag::nesterov_ag_grid_stride<__half>(param, grad, v, lr, momentum, n);
}

extern "C" __global__ void cynag_nesterov_ag_f32(
        float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ v,
        float lr, float momentum, long long n)
{
    cynag::nesterov_ag_grid_stride<float>(param, grad, v, lr, momentum, n);
}

extern "C" __global__ void cynag_nesterov_ag_f64(
        double* __restrict__ param, const double* __restrict__ grad, double* __restrict__ v,
        double lr, double momentum, long long n)
{
    cynag::nesterov_ag_grid_stride<double>(param, grad, v, lr, momentum, n);
}

extern "C" __global__ void cynag_nesterov_ag_multi_f16(
        const long long* __restrict__ table, const float* __restrict__ coef,
        long long n_tensors, long long n_items)
{
    cynag::nesterov_ag_multi<__half>(table, coef, n_tensors, n_items, cynag::NoPre());
}

extern "C" __global__ void cynag_nesterov_ag_multi_f32(
        const long long* __restrict__ table, const float* __restrict__ coef,
        long long n_tensors, long long n_items)
{
    cynag::nesterov_ag_multi<float>(table, coef, n_tensors, n_items, cynag::NoPre());
}

extern "C" __global__ void cynag_nesterov_ag_multi_f64(
        const long long* __restrict__ table, const double* __restrict__ coef,
        long long n_tensors, long long n_items)
{
    cynag::nesterov_ag_multi<double>(table, coef, n_tensors, n_items, cynag::NoPre());
}
