// cynag CUDA emulator: sequential launch of one kernel on the host.
//
// tests/test_cuda_emulation.py generates, after the kernel source in the same
// translation unit, one extern "C" launcher per __global__ entry point:
//
//     extern "C" int cynag_emu_launch__NAME(const long long* dims,
//                                           const long long* block_order,
//                                           const long long* thread_order,
//                                           <the kernel's parameters>)
//     {
//         return ::cynag_emu::launch(dims, block_order, thread_order,
//                                    [&]() { NAME(<the parameters>); });
//     }
//
// dims = {grid.x, grid.y, grid.z, block.x, block.y, block.z}.  block_order
// lists the linear block indices (x fastest) in the order the blocks run;
// thread_order does the same for the threads of each block; a null pointer
// means 0, 1, 2, ...  Every thread of a block runs to completion before the
// next one starts, and every block before the next block, which is a valid
// schedule for any kernel that needs neither barriers nor inter-thread
// communication (the prelude rejects those at compile time).  Running the
// same launch in several block orders shows that the result does not depend
// on the schedule.
#ifndef CYNAG_CUDA_EMU_DRIVER_H
#define CYNAG_CUDA_EMU_DRIVER_H

#ifndef CYNAG_CUDA_EMU_PRELUDE_H
#error "cynag emulator: cuda_emu_driver.h needs the prelude (-include cuda_emu_prelude.h)"
#endif

#include <cstddef>
#include <vector>

namespace cynag_emu {

enum LaunchStatus {
    kLaunchOk = 0,
    kBadGrid = 1,          // a grid dimension outside CUDA's limits
    kBadBlock = 2,         // a block dimension or size outside CUDA's limits
    kBadBlockOrder = 3,    // block_order is not a permutation of the blocks
    kBadThreadOrder = 4,   // thread_order is not a permutation of a block's threads
    kTooLarge = 5          // more threads than the emulator agrees to run
};

// Largest number of threads (grid size times block size) one launch may have.
static const long long kMaxThreads = 1LL << 31;

inline bool is_permutation(const long long* order, long long n) {
    if (order == nullptr) {
        return true;
    }
    std::vector<char> seen(static_cast<std::size_t>(n), 0);
    for (long long k = 0; k < n; ++k) {
        const long long o = order[k];
        if (o < 0 || o >= n || seen[static_cast<std::size_t>(o)]) {
            return false;
        }
        seen[static_cast<std::size_t>(o)] = 1;
    }
    return true;
}

template <class Body>
int launch(const long long* dims, const long long* block_order, const long long* thread_order,
           Body&& body) {
    const long long gx = dims[0], gy = dims[1], gz = dims[2];
    const long long bx = dims[3], by = dims[4], bz = dims[5];
    // CUDA's limits (compute capability 3.0 and later).
    if (gx < 1 || gx > 2147483647LL || gy < 1 || gy > 65535 || gz < 1 || gz > 65535) {
        return kBadGrid;
    }
    if (bx < 1 || bx > 1024 || by < 1 || by > 1024 || bz < 1 || bz > 64 || bx * by * bz > 1024) {
        return kBadBlock;
    }
    const long long threads_per_block = bx * by * bz;
    if (gx > kMaxThreads / threads_per_block
        || gx * gy > kMaxThreads / threads_per_block
        || gx * gy * gz > kMaxThreads / threads_per_block) {
        return kTooLarge;
    }
    const long long blocks = gx * gy * gz;
    if (!is_permutation(block_order, blocks)) {
        return kBadBlockOrder;
    }
    if (!is_permutation(thread_order, threads_per_block)) {
        return kBadThreadOrder;
    }

    const Builtins saved = builtins;
    builtins.grid_dim = dim3(static_cast<unsigned int>(gx), static_cast<unsigned int>(gy),
                             static_cast<unsigned int>(gz));
    builtins.block_dim = dim3(static_cast<unsigned int>(bx), static_cast<unsigned int>(by),
                              static_cast<unsigned int>(bz));
    for (long long k = 0; k < blocks; ++k) {
        const long long b = block_order ? block_order[k] : k;
        builtins.block_idx.x = static_cast<unsigned int>(b % gx);
        builtins.block_idx.y = static_cast<unsigned int>((b / gx) % gy);
        builtins.block_idx.z = static_cast<unsigned int>(b / (gx * gy));
        for (long long s = 0; s < threads_per_block; ++s) {
            const long long t = thread_order ? thread_order[s] : s;
            builtins.thread_idx.x = static_cast<unsigned int>(t % bx);
            builtins.thread_idx.y = static_cast<unsigned int>((t / bx) % by);
            builtins.thread_idx.z = static_cast<unsigned int>(t / (bx * by));
            body();
        }
    }
    builtins = saved;
    return kLaunchOk;
}

}  // namespace cynag_emu

#endif  // CYNAG_CUDA_EMU_DRIVER_H
