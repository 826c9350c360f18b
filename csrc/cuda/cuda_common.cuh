// Helpers shared by the CUDA kernels (csrc/cuda/*.cu): launch setup, dtype dispatch, warp
// reductions and 4-wide loads that turn float, half and bfloat16 into float4.
//
// Every kernel source is built twice: by nvcc for the GPU (operators torch.ops.cabattn.<op>,
// CUDA tensors) and with -DCABATTN_EMU by the host compiler against the emulation layer
// (csrc/emu/cuda_emu.h; operators torch.ops.cabattn_emu.<op>, CPU tensors).
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>
#ifdef CABATTN_EMU
#include "emu/cuda_emu.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#endif

#include <cmath>
#include <cstdint>

#include "checks.h"

// Where the kernels' operators are registered (TORCH_LIBRARY_IMPL(CABATTN_CUDA_LIBRARY,
// CABATTN_CUDA_KEY, m)).
#ifdef CABATTN_EMU
#define CABATTN_CUDA_LIBRARY cabattn_emu
#define CABATTN_CUDA_KEY CPU
#else
#define CABATTN_CUDA_LIBRARY cabattn
#define CABATTN_CUDA_KEY CUDA
#endif

namespace cabattn {
namespace cuda {

#ifdef CABATTN_EMU
inline void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cpu(), op, ": ", name, " must be a CPU tensor for the emulated CUDA kernel, "
              "got ", t.device());
}
#else
inline void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor for the CUDA kernel, got ",
              t.device());
}
#endif

// kernel<<<grid, block, dynamic_shared, stream>>>(args...) and its launch check; in the
// emulated build, the emulated launch (`op` names the operator in its errors). Internal
// linkage: the emulated launch uses its translation unit's shared memory.
namespace {
template <typename... Params, typename... Args>
inline void launch_kernel(const char* op, void (*kernel)(Params...), dim3 grid, dim3 block,
                          size_t dynamic_shared, cudaStream_t stream, Args&&... args) {
#ifdef CABATTN_EMU
  (void)stream;
  emulated_launch(op, kernel, grid, block, dynamic_shared, std::forward<Args>(args)...);
#else
  (void)op;
  kernel<<<grid, block, dynamic_shared, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}
}  // namespace

// The CUDA operators that validate index inputs on the device, each with its word of the
// deferred status (device_checks.cu).
enum class CheckedOp : int { kSelectBlocks = 0, kBlockSparseAttention = 1, kKvCompact = 2 };
constexpr int kCheckedOps = 3;

// Deferred checks (cabattn.ops.deferred_checks(), device_checks.cu): while on, flags go to a
// persistent per-device status that is read back once, when the mode is left, instead of
// after every call: a forward then has no host synchronisation and can be captured in a CUDA
// graph (the status tensor's address never changes). The word of `op` remembers `name` (the
// operator's kOp) for the error raised when it is found set.
bool deferred_checks_enabled();
at::Tensor deferred_status_word(const at::Tensor& like, CheckedOp op, const char* name);

// A device word in which a kernel flags an input value the host could not check without a copy
// (an index out of range, a negative count). After the launch the host reads the word back once
// and, only when it is set, runs the CPU kernel's value check (checks.h) on host copies, which
// raises the CPU's error word for word. Never a device assert: that would poison the context
// for every later CUDA call in the process. Under deferred checks the word is the operator's
// word of the deferred status and nothing is read back here.
class DeviceCheck {
 public:
  // `name`: the operator's kOp (a string literal), used in its errors.
  DeviceCheck(const char* name, const at::Tensor& like, CheckedOp op)
      : name_(name),
        deferred_(deferred_checks_enabled()),
        flag_(deferred_ ? deferred_status_word(like, op, name)
                        : at::zeros({1}, like.options().dtype(at::kInt))) {}
  int* flag() { return flag_.data_ptr<int>(); }
  // Calls host_check() (which must raise) when a kernel set the flag.
  template <typename HostCheck>
  void raise_if_flagged(HostCheck&& host_check) {
    if (deferred_ || flag_.item<int>() == 0) return;
    host_check();
    TORCH_CHECK(false, name_, ": the CUDA kernel flagged a bad input that the CPU checks "
                "accept (a bug in cabattn; please report it)");
  }

 private:
  const char* name_;
  bool deferred_;
  at::Tensor flag_;
};

// The kernels move 16-byte chunks; a contiguous view that starts inside its storage can break
// that alignment.
inline void check_aligned16(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 == 0, op, ": ", name,
              " must start on a 16-byte boundary (it is a view with a storage offset; "
              "call .clone() first)");
}

// Kernels with more than 48 KiB of dynamic shared memory must opt in; fail clearly when the
// device cannot give that much.
template <typename Kernel>
inline void set_dynamic_smem(const char* op, Kernel kernel, size_t bytes) {
  int device = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= static_cast<size_t>(optin), op, ": needs ", bytes,
              " bytes of shared memory per block, the device allows ", optin,
              " (use a larger block_size or a shorter sequence)");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

// float32, float16, bfloat16 (the CUDA attention dtypes); `scalar_t` is the c10 type.
#define CABATTN_DISPATCH_ATTENTION_TYPES(TYPE, NAME, ...)            \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)              \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// head_dim 64, 128 and 256 (Gemma 3) only; `kHeadDim` is the constant. Other head dims run on
// the CPU kernels or the reference path (--kernels reference).
#define CABATTN_DISPATCH_HEAD_DIM(OP, D, ...)                                             \
  [&] {                                                                                   \
    if ((D) == 64) {                                                                      \
      constexpr int kHeadDim = 64;                                                        \
      return __VA_ARGS__();                                                               \
    } else if ((D) == 128) {                                                              \
      constexpr int kHeadDim = 128;                                                       \
      return __VA_ARGS__();                                                               \
    } else if ((D) == 256) {                                                              \
      constexpr int kHeadDim = 256;                                                       \
      return __VA_ARGS__();                                                               \
    }                                                                                     \
    TORCH_CHECK(false, OP, ": head_dim ", (D), " is not supported by the CUDA kernel; "   \
                "supported: 64, 128, 256 (any head dim: the CPU kernels, or the "          \
                "reference path, --kernels reference)");                                  \
  }()

// FlashAttention-2's BOOL_SWITCH: CONST_NAME is the compile-time value of COND, so that an
// instantiation without a feature (its Is_softcap, Is_local: here kSoftcap, kWindow) carries
// none of that feature's code.
#define CABATTN_BOOL_SWITCH(COND, CONST_NAME, ...)                                        \
  [&] {                                                                                   \
    if (COND) {                                                                           \
      constexpr bool CONST_NAME = true;                                                   \
      return __VA_ARGS__();                                                               \
    }                                                                                     \
    constexpr bool CONST_NAME = false;                                                    \
    return __VA_ARGS__();                                                                 \
  }()

template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

// Four consecutive elements (4-element aligned) as float4.
template <typename T>
__device__ __forceinline__ float4 load4(const T* p) {
  const Pack4<T> pk = *reinterpret_cast<const Pack4<T>*>(p);
  return make_float4(static_cast<float>(pk.v[0]), static_cast<float>(pk.v[1]),
                     static_cast<float>(pk.v[2]), static_cast<float>(pk.v[3]));
}

// Reductions over `width` consecutive lanes (a power of two <= 32, groups aligned to it). The
// xor butterfly leaves the bitwise-same result in every lane of the group.
template <int width>
__device__ __forceinline__ float group_max(float x) {
#pragma unroll
  for (int offset = width / 2; offset > 0; offset /= 2)
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

template <int width>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
  for (int offset = width / 2; offset > 0; offset /= 2)
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

}  // namespace cuda
}  // namespace cabattn
