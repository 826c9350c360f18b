// What the attention launchers share: the params of q, k, v taken from tensors (every
// attention kernel), and for the tensor-core launchers (csrc/cuda/*_tc.cu) the block-size
// switch and their launch.
#pragma once

#include "cuda_common.cuh"
#include "flash_params.cuh"

#include <limits>

namespace cabattn {
namespace cuda {

// block_size 16, 32, 64, 128 -> one warp per 16 rows of the query block; `kWarps` is the
// constant.
#define CABATTN_BLOCK_SIZE_SWITCH(OP, BLOCK_SIZE, ...)                               \
  [&] {                                                                              \
    switch (BLOCK_SIZE) {                                                            \
      case 16: { constexpr int kWarps = 1; return __VA_ARGS__(); }                   \
      case 32: { constexpr int kWarps = 2; return __VA_ARGS__(); }                   \
      case 64: { constexpr int kWarps = 4; return __VA_ARGS__(); }                   \
      case 128: { constexpr int kWarps = 8; return __VA_ARGS__(); }                  \
      default: TORCH_CHECK(false, OP, ": block_size ", BLOCK_SIZE,                   \
                           " is not supported; valid: 16, 32, 64, 128");              \
    }                                                                                \
  }()

// fp16 and bf16 (`scalar_t`), head dim 64, 128 and 256 (`kHeadDim`), block size (`kWarps`),
// soft-capping or not (`kSoftcap`).
#define CABATTN_TENSOR_CORE_SWITCH(OP, TYPE, HEAD_DIM, BLOCK_SIZE, SOFTCAP, ...)          \
  AT_DISPATCH_SWITCH(TYPE, OP, AT_DISPATCH_CASE(at::kHalf, [&] {                        \
    CABATTN_DISPATCH_HEAD_DIM(OP, HEAD_DIM, [&] {                                       \
      CABATTN_BLOCK_SIZE_SWITCH(OP, BLOCK_SIZE, [&] {                                   \
        CABATTN_BOOL_SWITCH((SOFTCAP) > 0, kSoftcap, __VA_ARGS__);                      \
      });                                                                               \
    });                                                                                 \
  }) AT_DISPATCH_CASE(at::kBFloat16, [&] {                                              \
    CABATTN_DISPATCH_HEAD_DIM(OP, HEAD_DIM, [&] {                                       \
      CABATTN_BLOCK_SIZE_SWITCH(OP, BLOCK_SIZE, [&] {                                   \
        CABATTN_BOOL_SWITCH((SOFTCAP) > 0, kSoftcap, __VA_ARGS__);                      \
      });                                                                               \
    });                                                                                 \
  }))

// Strides, shape, scale and soft-cap of checked q [B, Hq, Lq, d] and k, v [B, Hkv, L, d] (v
// may be undefined): the QkvParams of every attention kernel.
inline QkvParams qkv_params(const char* op, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, double scale, double softcap) {
  TORCH_CHECK(k.size(2) <= std::numeric_limits<int>::max(), op, ": length ", k.size(2),
              " is more than the CUDA kernels' ", std::numeric_limits<int>::max(), " tokens");
  QkvParams p{};
  p.q_batch_stride = q.stride(0), p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(2);
  if (v.defined()) {
    p.v_batch_stride = v.stride(0), p.v_head_stride = v.stride(1), p.v_row_stride = v.stride(2);
  }
  p.batch = static_cast<int>(q.size(0));
  p.q_heads = static_cast<int>(q.size(1));
  p.kv_heads = static_cast<int>(k.size(1));
  p.q_per_kv = p.q_heads / p.kv_heads;
  p.length = static_cast<int>(k.size(2));
  p.head_dim = static_cast<int>(q.size(3));
  p.scale_log2 = static_cast<float>(scale) * kLog2e;
  p.softcap_log2 = static_cast<float>(softcap) * kLog2e;
  return p;
}

// The tensor-core kernels' params: qkv_params, the pointers of q, k, v and the block size.
inline FlashFwdParams flash_params(const char* op, const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, int64_t block_size, double scale,
                                   double softcap) {
  TORCH_CHECK(q.size(2) < (int64_t(1) << 30), op, ": length ", q.size(2),
              " is too long for the tensor-core kernel; at most 2^30 tokens");
  FlashFwdParams p{qkv_params(op, q, k, v, scale, softcap)};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  if (v.defined()) p.v = v.data_ptr();
  p.block_size = static_cast<int>(block_size);
  while ((1 << p.block_size_log2) < block_size) ++p.block_size_log2;
  p.num_blocks = static_cast<int>(num_blocks(q.size(2), block_size));
  return p;
}

// Raises the kernel's dynamic shared memory limit and launches it on the current stream (or
// on the emulation layer under CABATTN_EMU).
template <typename Kernel>
void launch_flash(const char* op, Kernel kernel, dim3 grid, int threads, size_t smem,
                  const FlashFwdParams& p) {
  set_dynamic_smem(op, kernel, smem);
  launch_kernel(op, kernel, grid, threads, smem, at::cuda::getCurrentCUDAStream(), p);
}

}  // namespace cuda
}  // namespace cabattn
