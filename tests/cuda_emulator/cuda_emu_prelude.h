// cynag CUDA emulator: prelude force-included (g++ -include) before a CUDA
// source so that the host C++ compiler builds its kernels as plain functions.
//
// Used by tests/test_cuda_emulation.py, which compiles the CUDA source of cynag_kernels
// (nesterov_ag.cu and hooks.cu, as cynag_kernels.cuda.kernel_source() joins them)
// with
//     g++ -std=c++17 -O1 -ffp-contract=off -fPIC -shared
//         -I tests/cuda_emulator -include cuda_emu_prelude.h ...
// and runs every block and every thread of a launch one after the other
// (see cuda_emu_driver.h).  tests/cuda_emulator/cuda_fp16.h stands in for
// CUDA's header of the same name.
//
// What is emulated:
//   * __global__, __device__, __host__, __forceinline__, __noinline__;
//     __restrict__ is GCC's own keyword;
//   * threadIdx, blockIdx (uint3) and blockDim, gridDim (dim3): read-only
//     views of thread-local values that the launcher sets before it calls the
//     kernel for each (block, thread);
//   * uint3 and dim3.
//
// What cannot be emulated by running threads one after the other -- shared
// memory, barriers, atomics, warp-level primitives, memory fences, device
// code selected by __CUDA_ARCH__ -- is made a compile error with a message
// naming the construct ("cynag emulator: ... is not supported"), so that a
// kernel using it fails loudly instead of being emulated wrongly.  Anything
// else of CUDA's that is not defined here (intrinsics, math functions,
// vector types, inline PTX) is an undeclared name or an assembler error:
// loud as well.
#ifndef CYNAG_CUDA_EMU_PRELUDE_H
#define CYNAG_CUDA_EMU_PRELUDE_H

#if !defined(__cplusplus) || __cplusplus < 201703L
#error "cynag emulator: compile as C++17 or later (-std=c++17)"
#endif
#if defined(__FAST_MATH__)
#error "cynag emulator: -ffast-math changes floating-point results; do not use it"
#endif
#if defined(__FLT_EVAL_METHOD__) && __FLT_EVAL_METHOD__ != 0
#error "cynag emulator: float arithmetic must be evaluated in its own type (FLT_EVAL_METHOD 0)"
#endif
#if defined(__CUDACC__) || defined(__CUDA_ARCH__) || defined(__NVCC__) || defined(__CUDACC_RTC__)
#error "cynag emulator: this prelude is for a host C++ compiler, not a CUDA compiler"
#endif

// ---------------------------------------------------------------------------
// Execution-space and inlining qualifiers
// ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))

// ---------------------------------------------------------------------------
// Built-in variables
// ---------------------------------------------------------------------------
struct uint3 {
    unsigned int x, y, z;
};

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1)
        : x(vx), y(vy), z(vz) {}
};

namespace cynag_emu {

// Set by cynag_emu::launch (cuda_emu_driver.h) before each call of a kernel.
// Thread-local so that launches from several host threads do not interfere.
struct Builtins {
    uint3 thread_idx;
    uint3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
};

inline thread_local Builtins builtins = {{0, 0, 0}, {0, 0, 0}, dim3(), dim3()};

}  // namespace cynag_emu

// Read-only, like CUDA's built-ins (assigning to threadIdx.x does not compile).
#define threadIdx (static_cast<const ::uint3&>(::cynag_emu::builtins.thread_idx))
#define blockIdx (static_cast<const ::uint3&>(::cynag_emu::builtins.block_idx))
#define blockDim (static_cast<const ::dim3&>(::cynag_emu::builtins.block_dim))
#define gridDim (static_cast<const ::dim3&>(::cynag_emu::builtins.grid_dim))

// ---------------------------------------------------------------------------
// Constructs that need threads running together: compile errors.
// (_Pragma("GCC error") fires wherever the macro is expanded, in a
// declaration or an expression alike; the expression forms still parse.)
// ---------------------------------------------------------------------------
#define CYNAG_EMU_UNSUPPORTED_EXPR(pragma_text) (_Pragma(pragma_text) 0)

// Memory spaces
#define __shared__ _Pragma("GCC error \"cynag emulator: __shared__ is not supported (threads run one at a time)\"")
#define __constant__ _Pragma("GCC error \"cynag emulator: __constant__ is not supported (the launcher does not set constant memory)\"")
#define __managed__ _Pragma("GCC error \"cynag emulator: __managed__ is not supported\"")
#define warpSize CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: warpSize is not supported (no warps)\"")

// Barriers and fences
#define __syncthreads(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: __syncthreads is not supported (threads run one at a time)\"")
#define __syncthreads_count(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: __syncthreads_count is not supported\"")
#define __syncthreads_and(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: __syncthreads_and is not supported\"")
#define __syncthreads_or(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: __syncthreads_or is not supported\"")
#define __syncwarp(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: __syncwarp is not supported\"")
#define __threadfence(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: __threadfence is not supported\"")
#define __threadfence_block(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: __threadfence_block is not supported\"")
#define __threadfence_system(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: __threadfence_system is not supported\"")

// Atomics
#define atomicAdd(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: atomicAdd is not supported (atomics)\"")
#define atomicSub(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: atomicSub is not supported (atomics)\"")
#define atomicExch(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: atomicExch is not supported (atomics)\"")
#define atomicMin(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: atomicMin is not supported (atomics)\"")
#define atomicMax(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: atomicMax is not supported (atomics)\"")
#define atomicInc(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: atomicInc is not supported (atomics)\"")
#define atomicDec(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: atomicDec is not supported (atomics)\"")
#define atomicCAS(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: atomicCAS is not supported (atomics)\"")
#define atomicAnd(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: atomicAnd is not supported (atomics)\"")
#define atomicOr(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: atomicOr is not supported (atomics)\"")
#define atomicXor(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: atomicXor is not supported (atomics)\"")
#define atomicAdd_block(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: atomicAdd_block is not supported (atomics)\"")
#define atomicAdd_system(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: atomicAdd_system is not supported (atomics)\"")

// Warp-level primitives
#define __shfl(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: __shfl is not supported (warp shuffles)\"")
#define __shfl_up(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: __shfl_up is not supported (warp shuffles)\"")
#define __shfl_down(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: __shfl_down is not supported (warp shuffles)\"")
#define __shfl_xor(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: __shfl_xor is not supported (warp shuffles)\"")
#define __shfl_sync(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: __shfl_sync is not supported (warp shuffles)\"")
#define __shfl_up_sync(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: __shfl_up_sync is not supported (warp shuffles)\"")
#define __shfl_down_sync(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: __shfl_down_sync is not supported (warp shuffles)\"")
#define __shfl_xor_sync(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: __shfl_xor_sync is not supported (warp shuffles)\"")
#define __ballot(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: __ballot is not supported (warp votes)\"")
#define __ballot_sync(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: __ballot_sync is not supported (warp votes)\"")
#define __any_sync(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: __any_sync is not supported (warp votes)\"")
#define __all_sync(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: __all_sync is not supported (warp votes)\"")
#define __uni_sync(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: __uni_sync is not supported (warp votes)\"")
#define __match_any_sync(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: __match_any_sync is not supported (warp primitives)\"")
#define __match_all_sync(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: __match_all_sync is not supported (warp primitives)\"")
#define __activemask(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: __activemask is not supported (warp primitives)\"")
#define __reduce_add_sync(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: __reduce_add_sync is not supported (warp primitives)\"")
#define __reduce_min_sync(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: __reduce_min_sync is not supported (warp primitives)\"")
#define __reduce_max_sync(...) CYNAG_EMU_UNSUPPORTED_EXPR("GCC error \"cynag emulator: __reduce_max_sync is not supported (warp primitives)\"")

#endif  // CYNAG_CUDA_EMU_PRELUDE_H
