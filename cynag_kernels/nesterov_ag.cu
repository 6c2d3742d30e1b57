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
