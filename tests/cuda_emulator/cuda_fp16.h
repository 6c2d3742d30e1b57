// cynag CUDA emulator: stand-in for CUDA's <cuda_fp16.h> on the host.
//
// Found before any other cuda_fp16.h because tests/test_cuda_emulation.py puts
// tests/cuda_emulator first on the include path (-I).  Only what the emulated
// sources use is provided, over GCC's _Float16 (IEEE binary16, x86-64, GCC 12+):
//
//   __half                         2 bytes, 2-byte aligned, trivially copyable;
//                                  no arithmetic and no implicit conversions
//                                  (a kernel relying on CUDA's half operators
//                                  or conversions fails to compile here rather
//                                  than being emulated with other semantics);
//   __half2float(__half)           exact;
//   __float2half_rn(float)         round to nearest, ties to even (inf on
//                                  overflow, subnormals kept), which is how
//                                  GCC converts float to _Float16 in the
//                                  default rounding mode;
//   __float2half(float)            CUDA documents it as round-to-nearest-even too;
//   __half_as_ushort, __ushort_as_half   bit casts.
//
// Everything else of CUDA's header (__half2, half intrinsics and math) is
// deliberately absent: using it is an undeclared-name error.
#ifndef CYNAG_CUDA_EMU_CUDA_FP16_H
#define CYNAG_CUDA_EMU_CUDA_FP16_H

#ifndef CYNAG_CUDA_EMU_PRELUDE_H
#error "cynag emulator: cuda_fp16.h stub included without the prelude (-include cuda_emu_prelude.h)"
#endif

#include <cstring>
#include <type_traits>

struct __half {
    _Float16 cynag_emu_value;  // not CUDA's layout name: host code must not poke at it
};

static_assert(sizeof(__half) == 2 && alignof(__half) == 2, "__half must be 2 bytes");
static_assert(std::is_trivially_copyable<__half>::value, "__half must be trivially copyable");
static_assert(std::is_standard_layout<__half>::value, "__half must be standard layout");

__host__ __device__ inline float __half2float(__half h) {
    return static_cast<float>(h.cynag_emu_value);
}

__host__ __device__ inline __half __float2half_rn(float f) {
    __half h;
    h.cynag_emu_value = static_cast<_Float16>(f);
    return h;
}

__host__ __device__ inline __half __float2half(float f) {
    return __float2half_rn(f);
}

__host__ __device__ inline unsigned short __half_as_ushort(__half h) {
    unsigned short u;
    std::memcpy(&u, &h, sizeof u);
    return u;
}

__host__ __device__ inline __half __ushort_as_half(unsigned short u) {
    __half h;
    std::memcpy(&h, &u, sizeof h);
    return h;
}

#endif  // CYNAG_CUDA_EMU_CUDA_FP16_H
