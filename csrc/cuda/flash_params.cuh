// The parameter structs of the attention kernels, in the manner of FlashAttention-2's flash.h:
// one base, QkvParams (its Qkv_params), with what every attention kernel reads of q, k and v,
// which the per-kernel structs extend (FlashFwdParams here for the tensor-core kernels of
// flash_tc.cuh; ScoreParams, SparseParams and ChunkParams in the CUDA-core kernels' sources).
// Plain values and raw pointers, filled by the host launcher (qkv_params, flash_launch.cuh),
// passed by value; and SoftcapLog2, the device side of QkvParams::softcap_log2. No ATen here, so
// the emulated build includes it as it is (after the emulation header).
#pragma once

#include <cmath>
#include <cstdint>

namespace cabattn {
namespace cuda {

struct QkvParams {
  // q: [batch, q_heads, q tokens, head_dim]; k, v: [batch, kv_heads, length, head_dim]. Strides
  // in elements; the last dim is contiguous. The tensor-core kernels index by the strides; the
  // CUDA-core tiles (attention_tile.cuh) take contiguous tensors and index by the shape. The
  // pointers are the derived structs' (FlashFwdParams) or kernel arguments (the CUDA-core
  // kernels take them typed and __restrict__).
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int batch, q_heads, kv_heads, q_per_kv;  // q_per_kv = q_heads / kv_heads (grouped-query)
  // Tokens of k and v, and of q except in attention_with_scores' chunk (ChunkParams::q_len).
  int length;
  int head_dim;
  float scale_log2;  // softmax scale * log2(e): scores live in log2 units
  // The logit soft-cap (docs/operators.md, Model features) in those units, softcap * log2(e):
  // a score x becomes softcap_log2 * tanh(x / softcap_log2). 0: none; the kernels then run
  // their instantiation without it (CABATTN_BOOL_SWITCH, cuda_common.cuh).
  float softcap_log2;
};

// The logit soft-cap on scores in log2 units (docs/operators.md, Model features):
// x -> cap * tanh(x / cap) with cap = QkvParams::softcap_log2. tanhf (2 ulp), not
// tanh.approx.f32, whose 2^-11 relative error would exceed the float32 correctness bar.
struct SoftcapLog2 {
  float cap, inverse;
  __device__ __forceinline__ explicit SoftcapLog2(float cap_log2)
      : cap(cap_log2), inverse(1.f / cap_log2) {}
  __device__ __forceinline__ float operator()(float x) const { return cap * tanhf(x * inverse); }
};

struct FlashFwdParams : QkvParams {
  // q, k, v as the strides above; out: like q; lse: [batch, q_heads, length] (float).
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  int64_t o_batch_stride, o_head_stride, o_row_stride;
  int64_t lse_batch_stride, lse_head_stride;

  // The block layout (CSR): block_count [batch, q_heads, num_blocks], block_index
  // [batch, q_heads, num_blocks, max_count], strictly ascending key blocks per row.
  const int* block_count;
  const int* block_index;
  int block_size, block_size_log2, num_blocks, max_count;

  // block_scores: Sblk and Gblk [batch, q_heads, num_blocks, num_blocks] (float).
  float* block_sum;
  float* block_max;
  int64_t scores_batch_stride, scores_head_stride, scores_row_stride;
};

}  // namespace cuda
}  // namespace cabattn
