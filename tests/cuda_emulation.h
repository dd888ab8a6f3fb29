// Runs cuda_kernels.py's CUDA C on the CPU (g++ -std=c++20), for tests/test_cuda_kernels.py.
// Every CUDA thread of a block is a std::thread; blockIdx / threadIdx are thread-locals, gridDim / blockDim are
// set per launch. __shfl_xor_sync is done in lockstep: the 32 lanes of a warp post their value, meet at a barrier,
// read their partner's value and meet again, so a kernel whose lanes diverge at a shuffle would hang, not pass.
// The two PTX conversions are replaced by _Float16 conversions, which also round to nearest even.
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#define CHATGLM_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline

struct Dim3 { unsigned int x = 1, y = 1, z = 1; };
inline Dim3 gridDim, blockDim;
inline thread_local Dim3 blockIdx, threadIdx;

struct Warp {
    std::barrier<> meet{32};
    float posted[32];
};
inline thread_local Warp* this_warp;

inline float __shfl_xor_sync(unsigned int mask, float value, int lane_mask) {
    if (mask != 0xffffffffu) std::abort();  // the kernels only shuffle full warps
    const unsigned int lane = threadIdx.x % 32;
    this_warp->posted[lane] = value;
    this_warp->meet.arrive_and_wait();
    const float got = this_warp->posted[lane ^ lane_mask];
    this_warp->meet.arrive_and_wait();
    return got;
}
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float half_to_float(unsigned short h) { _Float16 v; std::memcpy(&v, &h, 2); return (float)v; }
inline unsigned short float_to_half(float f) {
    const _Float16 v = (_Float16)f;
    unsigned short h;
    std::memcpy(&h, &v, 2);
    return h;
}

// Launch like cuLaunchKernel (args[i] points at argument i), running blocks [first, first + count) of the grid.
template <typename... A, std::size_t... I>
void call_kernel(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<A*>(args[I])...);
}
template <typename... A>
int emulate(void (*kernel)(A...), unsigned int grid, unsigned int block, void** args, unsigned int first,
            unsigned int count) {
    if (block == 0 || block % 32 || block > 1024 || grid == 0 || grid > 2147483647u) return 1;  // invalid launch
    gridDim.x = grid;
    blockDim.x = block;
    for (unsigned int b = first; b < grid && b - first < count; ++b) {
        std::vector<std::unique_ptr<Warp>> warps;
        for (unsigned int w = 0; w < block / 32; ++w) warps.emplace_back(new Warp);
        std::vector<std::thread> threads;
        for (unsigned int t = 0; t < block; ++t)
            threads.emplace_back([&, b, t] {
                blockIdx.x = b;
                threadIdx.x = t;
                this_warp = warps[t / 32].get();
                call_kernel(kernel, args, std::index_sequence_for<A...>{});
            });
        for (auto& thread : threads) thread.join();
    }
    return 0;
}
#define EMULATE(name)                                                                                     \
    extern "C" int launch_##name(unsigned int grid, unsigned int block, void** args, unsigned int first,  \
                                 unsigned int count) {                                                    \
        return emulate(name, grid, block, args, first, count);                                            \
    }
