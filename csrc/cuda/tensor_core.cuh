// Host entry points of the tensor-core (fp16/bf16) kernels, called by the operators' CUDA
// implementations after their checks; fp32 stays on the CUDA-core kernels.
#pragma once

#include <ATen/ATen.h>

namespace cabattn {
namespace cuda {

inline bool uses_tensor_cores(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// block_sparse_attention for checked, contiguous, 16-byte-aligned CUDA q, k, v (fp16/bf16,
// head dim 64/128/256) and layout, softcap 0 (none) or > 0; writes out and lse.
void block_sparse_attention_tensor_core(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& block_count,
                                        const at::Tensor& block_index, int64_t block_size,
                                        double scale, double softcap, at::Tensor& out,
                                        at::Tensor& lse);

// block_scores for checked, contiguous, 16-byte-aligned CUDA q, k (fp16/bf16, head dim
// 64/128/256), softcap 0 (none) or > 0; writes Sblk (block_sum) and Gblk (block_max),
// [batch, q_heads, blocks, blocks].
void block_scores_tensor_core(const at::Tensor& q, const at::Tensor& k, int64_t block_size,
                              double scale, double softcap, at::Tensor& block_sum,
                              at::Tensor& block_max);

}  // namespace cuda
}  // namespace cabattn
