// The CUDA emulation layer: lets the host compiler build the kernel sources of csrc/cuda
// unchanged, for the CPU. cuda_common.cuh includes this header instead of the CUDA headers
// when CABATTN_EMU is defined (setup.py builds every csrc/cuda/*.cu that way into cabattn._emu,
// whose operators are torch.ops.cabattn_emu.<op>).
//
// What it models: the threads of a block run as fibers on one OS thread (runtime.cpp), each
// until it reaches a barrier, a warp collective or its end; between those points the threads
// run in a shuffled order that changes at every step and launch, so a missing __syncthreads or
// __syncwarp shows up as a wrong or changing result. __syncthreads waits for every thread of
// the block that has not exited; warp collectives (__shfl*_sync, __ballot_sync, __syncwarp)
// wait for every lane of their mask and follow the PTX ISA's shfl.sync definition. Every block
// has its own shared memory (static __shared__ variables are thread_local; the dynamic
// `extern __shared__` buffer comes poisoned with 0xff bytes); blocks run in parallel on
// at::parallel_for threads. A launch is checked against H100/H200 limits; CUDA_KERNEL_ASSERT
// and a lane that reads from an exited or non-member lane raise a Python error.
//
// What it cannot model (the GPU run and compute-sanitizer must check these): timing and
// occupancy; races between blocks (each block runs start to finish on one OS thread; global
// atomics are real atomics); the weak memory model within a block (a fiber's writes are
// visible at once, so a missing __threadfence or volatile goes unseen); bank conflicts,
// alignment faults and out-of-bounds accesses (no memcheck; the dynamic shared buffer has no
// guard at its requested size); __launch_bounds__, register use and the static shared memory
// size in the launch check; exact GPU rounding of exp2f/log2f/__expf (the host libm is used)
// and nvcc's fused multiply-add contraction of a * b + c; uninitialised static __shared__
// arrays (they keep the previous block's values instead of garbage).
//
// To add a kernel to the emulated build: write it in csrc/cuda/<name>.cu as usual (include
// cuda_common.cuh, launch with cabattn::cuda::launch_kernel, register with
// TORCH_LIBRARY_IMPL(CABATTN_CUDA_LIBRARY, CABATTN_CUDA_KEY, m)); setup.py compiles every
// csrc/cuda/*.cu into both builds. Inline PTX goes only into csrc/cuda/ptx.cuh wrappers with an
// emulated definition. A kernel's dynamic shared buffer must be `extern __shared__ ... smem[]`
// declared in a kernel of the anonymous namespace inside cabattn::cuda (the buffer is defined
// below).
#pragma once

#ifndef CABATTN_EMU
#error "cuda_emu.h is the CPU emulation of CUDA; build with -DCABATTN_EMU"
#endif

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ------------------------------------------------------------------------------ qualifiers
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Block-scope thread_local is static: one copy per OS thread, and one OS thread runs one block
// at a time, so each block has its own.
#define __shared__ thread_local
// __restrict__ is a keyword of GCC and Clang already.

// --------------------------------------------------------------------------- vector types
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
struct __align__(8) float2 { float x, y; };
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(8) int2 { int x, y; };
struct __align__(16) int4 { int x, y, z, w; };
struct __align__(8) uint2 { unsigned x, y; };
struct __align__(16) uint4 { unsigned x, y, z, w; };

inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// ------------------------------------------------------------------------- runtime hooks
namespace cabattn {
namespace emu {

// Set by the scheduler before it resumes a thread (fibers share their OS thread's variables).
extern thread_local uint3 current_thread;     // threadIdx
extern thread_local uint3 current_block;      // blockIdx
extern thread_local dim3 current_block_dim;   // blockDim
extern thread_local dim3 current_grid_dim;    // gridDim

// Largest dynamic shared memory per block with the opt-in attribute (H100/H200: 227 KB).
constexpr int kMaxDynamicSharedOptin = 232448;
// Streaming multiprocessors (H100/H200 SXM: 132), for the kernels that size their grid by them.
constexpr int kMultiProcessorCount = 132;
constexpr int kMaxDynamicSharedDefault = 49152;

void syncthreads();
int syncthreads_reduce(int kind, int predicate);  // kind: 0 count, 1 and, 2 or
enum class WarpOp { kSync, kShflIdx, kShflUp, kShflDown, kShflBfly, kBallot };
uint64_t warp_collective(WarpOp op, unsigned mask, uint64_t value, int b, int c);
[[noreturn]] void kernel_assert_failed(const char* condition, const char* file, int line);

template <typename T>
inline T shuffle(WarpOp op, unsigned mask, T var, int b, int width) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "warp shuffles move 32- or 64-bit values");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  // The c operand of shfl.sync as the CUDA headers build it: segment mask in bits 8..12, the
  // clamp lane in bits 0..4 (0 for up, 31 otherwise).
  const int c = ((32 - width) << 8) | (op == WarpOp::kShflUp ? 0 : 0x1f);
  bits = warp_collective(op, mask, bits, b, c);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace emu
}  // namespace cabattn

// ----------------------------------------------------------------------- built-in variables
#define threadIdx (::cabattn::emu::current_thread)
#define blockIdx (::cabattn::emu::current_block)
#define blockDim (::cabattn::emu::current_block_dim)
#define gridDim (::cabattn::emu::current_grid_dim)
constexpr int warpSize = 32;

// ------------------------------------------------------------------ barriers, warp intrinsics
inline void __syncthreads() { cabattn::emu::syncthreads(); }
inline int __syncthreads_count(int predicate) {
  return cabattn::emu::syncthreads_reduce(0, predicate);
}
inline int __syncthreads_and(int predicate) {
  return cabattn::emu::syncthreads_reduce(1, predicate);
}
inline int __syncthreads_or(int predicate) {
  return cabattn::emu::syncthreads_reduce(2, predicate);
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  cabattn::emu::warp_collective(cabattn::emu::WarpOp::kSync, mask, 0, 0, 0);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return static_cast<unsigned>(cabattn::emu::warp_collective(
      cabattn::emu::WarpOp::kBallot, mask, predicate != 0, 0, 0));
}
inline int __all_sync(unsigned mask, int predicate) {
  return __ballot_sync(mask, predicate) == mask;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }

template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  return cabattn::emu::shuffle(cabattn::emu::WarpOp::kShflIdx, mask, var, src_lane, width);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return cabattn::emu::shuffle(cabattn::emu::WarpOp::kShflUp, mask, var, int(delta), width);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return cabattn::emu::shuffle(cabattn::emu::WarpOp::kShflDown, mask, var, int(delta), width);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  return cabattn::emu::shuffle(cabattn::emu::WarpOp::kShflBfly, mask, var, lane_mask, width);
}

// Fences order memory on the GPU; a fiber's writes are visible at once here.
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() {}

// ------------------------------------------------------------------------- memory, atomics
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// Blocks run in parallel on OS threads, so global atomics must be real ones.
template <typename T>
inline T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value);
}
template <typename T>
inline T atomicSub(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_sub(value);
}
template <typename T>
inline T atomicExch(T* address, T value) {
  return std::atomic_ref<T>(*address).exchange(value);
}
template <typename T>
inline T atomicMax(T* address, T value) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (old < value && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}
template <typename T>
inline T atomicMin(T* address, T value) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load();
  while (value < old && !ref.compare_exchange_weak(old, value)) {
  }
  return old;
}
template <typename T>
inline T atomicCAS(T* address, T compare, T value) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, value);
  return compare;
}
template <typename T>
inline T atomicOr(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_or(value);
}
template <typename T>
inline T atomicAnd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_and(value);
}

// ------------------------------------------------------------------------- integer, math
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}

// CUDA's min/max overloads for mixed integer types: the common type, as CUDA's promotions.
template <typename A, typename B>
  requires std::is_arithmetic_v<A> && std::is_arithmetic_v<B>
inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <typename A, typename B>
  requires std::is_arithmetic_v<A> && std::is_arithmetic_v<B>
inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}

// Fast-math intrinsics: the accurate host functions (the GPU's are a few ulp off).
inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float exp10f(float x) { return std::pow(10.f, x); }
inline int __float2int_rn(float x) { return static_cast<int>(std::nearbyint(x)); }
// CUDA's math library declares these in the global namespace, as functions of any float type.
using std::isfinite;
using std::isinf;
using std::isnan;

// ---------------------------------------------------------------------- half and bfloat16
using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline c10::Half __float2half_rn(float x) { return c10::Half(x); }
inline c10::Half __float2half(float x) { return c10::Half(x); }
inline float __half2float(c10::Half x) { return static_cast<float>(x); }
inline c10::BFloat16 __float2bfloat16_rn(float x) { return c10::BFloat16(x); }
inline c10::BFloat16 __float2bfloat16(float x) { return c10::BFloat16(x); }
inline float __bfloat162float(c10::BFloat16 x) { return static_cast<float>(x); }

// ---------------------------------------------------------------------------- assertions
#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond)                                               \
  do {                                                                         \
    if (C10_UNLIKELY(!(cond))) ::cabattn::emu::kernel_assert_failed(#cond, __FILE__, __LINE__); \
  } while (0)

// ---------------------------------------------------------------- the CUDA runtime's face
using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
using cudaStream_t = struct CUstream_emu*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};

namespace cabattn {
namespace emu {
const char* error_string(cudaError_t error);
cudaError_t set_max_dynamic_shared(const void* kernel, int bytes);
int max_dynamic_shared(const void* kernel);
}  // namespace emu
}  // namespace cabattn

inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount:
      *value = cabattn::emu::kMultiProcessorCount;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = cabattn::emu::kMaxDynamicSharedOptin;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}
template <typename... Params>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attr,
                                        int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return cabattn::emu::set_max_dynamic_shared(reinterpret_cast<const void*>(kernel), value);
}
inline const char* cudaGetErrorString(cudaError_t error) {
  return cabattn::emu::error_string(error);
}

#define C10_CUDA_CHECK(EXPR)                                                            \
  do {                                                                                  \
    const cudaError_t cabattn_emu_status = (EXPR);                                      \
    TORCH_CHECK(cabattn_emu_status == cudaSuccess, "CUDA error: ",                      \
                cudaGetErrorString(cabattn_emu_status), " (", #EXPR, ")");              \
  } while (0)

namespace at {
namespace cuda {
// The emulated kernels take CPU tensors: no device to select, one implicit stream.
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace cuda
}  // namespace at

// ------------------------------------------------------------------------------- launches
namespace cabattn {
namespace emu {

// What a launch runs: `run(closure)` in every thread of every block; `dynamic_shared()` is the
// running OS thread's dynamic shared buffer of the kernel's translation unit.
struct KernelBody {
  void (*run)(const void* closure);
  const void* closure;
  char* (*dynamic_shared)();
};
void launch(const char* op, const void* kernel, dim3 grid, dim3 block, size_t dynamic_shared,
            KernelBody body);

}  // namespace emu

namespace cuda {
namespace {  // internal linkage: each translation unit launches with its own `smem`

// The dynamic shared memory of the kernels in this translation unit (`extern __shared__ ...
// smem[]` in their bodies refers to it); each OS thread, so each running block, has its own.
__attribute__((aligned(128))) thread_local char smem[emu::kMaxDynamicSharedOptin];

// The emulated `kernel<<<grid, block, dynamic_shared>>>(args...)`: the arguments become the
// kernel's parameter types once, as at a launch, and every thread calls the kernel with them.
template <typename... Params, typename... Args>
void emulated_launch(const char* op, void (*kernel)(Params...), dim3 grid, dim3 block,
                     size_t dynamic_shared, Args&&... args) {
  struct Closure {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
  };
  const Closure closure{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
  const emu::KernelBody body{[](const void* c) {
                               const auto* self = static_cast<const Closure*>(c);
                               std::apply(self->kernel, self->params);
                             },
                             &closure, []() -> char* { return smem; }};
  emu::launch(op, reinterpret_cast<const void*>(kernel), grid, block, dynamic_shared, body);
}

}  // namespace
}  // namespace cuda
}  // namespace cabattn
