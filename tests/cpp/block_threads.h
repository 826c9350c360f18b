// A stand-in for the CUDA execution model in the host tests of the tensor-core code
// (tests/cpp/*.cpp), until the emulation layer (csrc/emu) runs them: the threads of one block
// are std::threads, __syncthreads is a barrier of the block, and the warp shuffles are
// barriers of the warp around a slot exchange (every lane of the warp calls them together, as
// the kernels do). One block runs at a time; each has the shared buffer `smem`.
#pragma once

#include <barrier>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__

struct BlockIndex {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local BlockIndex threadIdx;
inline BlockIndex blockIdx;

template <class A, class B>
inline auto min(A a, B b) {
  return a < b ? a : b;
}
template <class A, class B>
inline auto max(A a, B b) {
  return a < b ? b : a;
}
template <class T>
inline T __ldg(const T* p) {
  return *p;
}

namespace block_threads {
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline unsigned long long slots[32][32];

template <class V>
V exchange(V mine, int src_lane) {
  static_assert(sizeof(V) <= sizeof(unsigned long long));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  unsigned long long bits = 0;
  std::memcpy(&bits, &mine, sizeof(V));
  slots[warp][lane] = bits;
  warp_barriers[warp]->arrive_and_wait();
  const unsigned long long got = slots[warp][src_lane & 31];
  warp_barriers[warp]->arrive_and_wait();
  V out;
  std::memcpy(&out, &got, sizeof(V));
  return out;
}

// Runs body() as block (x, y, z) of `threads` threads (a multiple of 32, at most 1024).
inline void run_block(BlockIndex block, int threads, const std::function<void()>& body) {
  blockIdx = block;
  std::barrier<> barrier(threads);
  block_barrier = &barrier;
  warp_barriers.clear();
  for (int w = 0; w < threads / 32; ++w) warp_barriers.emplace_back(new std::barrier<>(32));
  std::vector<std::thread> team;
  for (int t = 0; t < threads; ++t)
    team.emplace_back([&, t] {
      threadIdx.x = unsigned(t);
      body();
    });
  for (auto& thread : team) thread.join();
}
}  // namespace block_threads

inline void __syncthreads() { block_threads::block_barrier->arrive_and_wait(); }
template <class V>
V __shfl_sync(unsigned, V var, int src_lane) {
  return block_threads::exchange(var, src_lane);
}
template <class V>
V __shfl_xor_sync(unsigned, V var, int lane_mask) {
  return block_threads::exchange(var, int(threadIdx.x % 32) ^ lane_mask);
}

// The dynamic shared memory of the kernels (`extern __shared__ ... smem[]` in their bodies).
namespace cabattn {
namespace cuda {
namespace {
alignas(128) char smem[1 << 18];
}
}  // namespace cuda
}  // namespace cabattn

#define CABATTN_EMU
