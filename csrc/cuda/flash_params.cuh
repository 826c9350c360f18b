// The one parameter struct of the tensor-core attention kernels (flash_tc.cuh), in the manner
// of FlashAttention-2's Flash_fwd_params: raw pointers and element strides, filled by the host
// launcher, passed by value. No ATen here, so the emulated build includes it as it is.
#pragma once

#include <cstdint>

namespace cabattn {
namespace cuda {

struct FlashFwdParams {
  // q, out: [batch, q_heads, length, head_dim]; k, v: [batch, kv_heads, length, head_dim];
  // lse: [batch, q_heads, length] (float). Strides in elements; the last dim is contiguous.
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t o_batch_stride, o_head_stride, o_row_stride;
  int64_t lse_batch_stride, lse_head_stride;
  int q_heads, kv_heads, q_per_kv;  // q_per_kv = q_heads / kv_heads (grouped-query attention)
  int length;                        // tokens of q and of k/v
  float scale_log2;                  // softmax scale * log2(e): scores live in log2 units

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
