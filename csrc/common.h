// Input checks and small helpers shared by the CPU (csrc/*.cpp) and CUDA (csrc/cuda/*.cu)
// kernels. Every check names the operator, the argument and the valid values, so a caller
// sees what is wrong without reading the kernel.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

namespace cabattn {

inline int64_t num_blocks(int64_t length, int64_t block_size) {
  return (length + block_size - 1) / block_size;
}

inline void check_rank(const char* op, const char* name, const at::Tensor& t, int64_t rank,
                       const char* layout) {
  TORCH_CHECK(t.dim() == rank, op, ": ", name, " must be ", rank, "-D ", layout, ", got shape ",
              t.sizes());
}

inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name,
              " must be contiguous (call .contiguous() first); got strides ", t.strides());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device(), "; move them to one device");
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t,
                        at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, op, ": ", name, " must be ", want, ", got ",
              t.scalar_type());
}

// Attention inputs: float32, float16 or bfloat16 (float64 too on the CPU, for references).
inline void check_attention_dtype(const char* op, const char* name, const at::Tensor& t) {
  auto s = t.scalar_type();
  bool ok = s == at::kFloat || s == at::kHalf || s == at::kBFloat16 ||
            (s == at::kDouble && t.device().is_cpu());
  TORCH_CHECK(ok, op, ": ", name, " has dtype ", s,
              "; supported: float32, float16, bfloat16 (and float64 on the CPU)");
}

// q [B, Hq, Lq, d] and k [B, Hkv, Lk, d]: same dtype and device, contiguous, Hq a multiple of
// Hkv (grouped-query attention), matching batch and head dim.
inline void check_qk(const char* op, const at::Tensor& q, const at::Tensor& k) {
  check_rank(op, "q", q, 4, "[batch, q_heads, length, head_dim]");
  check_rank(op, "k", k, 4, "[batch, kv_heads, length, head_dim]");
  check_attention_dtype(op, "q", q);
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), op, ": q and k must share one dtype, got ",
              q.scalar_type(), " and ", k.scalar_type());
  check_same_device(op, "k", k, q, "q");
  check_contiguous(op, "q", q);
  check_contiguous(op, "k", k);
  TORCH_CHECK(q.size(0) == k.size(0), op, ": batch of q (", q.size(0), ") and k (", k.size(0),
              ") differ");
  TORCH_CHECK(q.size(3) == k.size(3), op, ": head_dim of q (", q.size(3), ") and k (", k.size(3),
              ") differ");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": q_heads (", q.size(1),
              ") must be a multiple of kv_heads (", k.size(1), ")");
}

// check_qk, plus v [B, Hkv, Lk, d] of k's shape, dtype and device, contiguous.
inline void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v) {
  check_qk(op, q, k);
  check_rank(op, "v", v, 4, "[batch, kv_heads, length, head_dim]");
  TORCH_CHECK(v.scalar_type() == q.scalar_type(), op, ": v must have q's dtype ",
              q.scalar_type(), ", got ", v.scalar_type());
  check_same_device(op, "v", v, q, "q");
  check_contiguous(op, "v", v);
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(),
              " and ", v.sizes());
}

inline void check_block_size(const char* op, int64_t block_size) {
  TORCH_CHECK(block_size == 16 || block_size == 32 || block_size == 64 || block_size == 128, op,
              ": block_size ", block_size, " is not supported; valid: 16, 32, 64, 128");
}

inline void check_scale(const char* op, double scale) {
  TORCH_CHECK(std::isfinite(scale) && scale > 0, op, ": scale must be a positive finite number, "
              "got ", scale);
}

// The logit soft-cap c of the attention operators (docs/operators.md, Model features): 0 for
// none, else a positive finite number.
inline void check_softcap(const char* op, double softcap) {
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, op, ": softcap must be 0 (no "
              "soft-capping) or a positive finite number, got ", softcap);
}

// A block layout for q [B, Hq, L, d] cut into M blocks: block_count int32 [B, Hq, M] and
// block_index int32 [B, Hq, M, max_count], contiguous, on q's device. Shapes only; the values
// are check_block_layout_values' (the CUDA kernel flags a bad row on the device, then calls it).
inline void check_block_layout(const char* op, const at::Tensor& q, const at::Tensor& block_count,
                               const at::Tensor& block_index, int64_t blocks) {
  check_rank(op, "block_count", block_count, 3, "[batch, q_heads, blocks]");
  check_rank(op, "block_index", block_index, 4, "[batch, q_heads, blocks, max_count]");
  check_dtype(op, "block_count", block_count, at::kInt);
  check_dtype(op, "block_index", block_index, at::kInt);
  check_same_device(op, "block_count", block_count, q, "q");
  check_same_device(op, "block_index", block_index, q, "q");
  check_contiguous(op, "block_count", block_count);
  check_contiguous(op, "block_index", block_index);
  const std::vector<int64_t> want{q.size(0), q.size(1), blocks};
  TORCH_CHECK(block_count.sizes() == at::IntArrayRef(want), op, ": block_count must have shape ",
              at::IntArrayRef(want), " = [batch, q_heads, ceil(length / block_size)], got ",
              block_count.sizes());
  TORCH_CHECK(block_index.sizes().slice(0, 3) == at::IntArrayRef(want) && block_index.size(3) > 0,
              op, ": block_index must have shape [", want[0], ", ", want[1], ", ", want[2],
              ", max_count >= 1], got ", block_index.sizes());
}

// Values of a CPU block layout: row I keeps 1..min(I + 1, max_count) blocks, listed strictly
// ascending within 0..I (padding after the count is ignored).
inline void check_block_layout_values(const char* op, const at::Tensor& block_count,
                                      const at::Tensor& block_index) {
  TORCH_CHECK(block_count.device().is_cpu(), op, ": check_block_layout_values reads CPU tensors");
  const int64_t rows = block_count.numel(), blocks = block_count.size(2);
  const int64_t max_count = block_index.size(3);
  const int32_t* count = block_count.const_data_ptr<int32_t>();
  const int32_t* index = block_index.const_data_ptr<int32_t>();
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t I = row % blocks, c = count[row];
    TORCH_CHECK(c >= 1 && c <= std::min(I + 1, max_count), op, ": block_count[",
                row / blocks / block_count.size(1), ", ", row / blocks % block_count.size(1), ", ",
                I, "] = ", c, "; a row I keeps 1..min(I + 1, max_count = ", max_count,
                ") blocks");
    const int32_t* idx = index + row * max_count;
    for (int64_t slot = 0; slot < c; ++slot) {
      TORCH_CHECK(idx[slot] >= 0 && idx[slot] <= I && (slot == 0 || idx[slot] > idx[slot - 1]),
                  op, ": block_index[", row / blocks / block_count.size(1), ", ",
                  row / blocks % block_count.size(1), ", ", I, "] lists ",
                  at::IntArrayRef(std::vector<int64_t>(idx, idx + c)),
                  "; the first block_count entries must be strictly ascending within 0..", I);
    }
  }
}

}  // namespace cabattn
