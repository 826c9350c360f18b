// block_sparse_attention: forward attention of query block I over the key blocks a layout keeps
// for it (block_index[b, h, I, :block_count[b, h, I]], ascending, within 0..I), causal inside
// the diagonal block, with GQA (query head h reads KV head h / (Hq / Hkv)). Returns the output
// in q's dtype and the log-sum-exp in float32. The logits may be soft-capped (docs/operators.md,
// Model features).
//
// CPU: K is packed into key panels (cpu_gemm.h) and V converted to float32 (half types) once per
// call; then one task per (batch, query head, query block). Its kept key blocks are cut into
// chunks of about chunk_keys() keys, attended in place with the online softmax of
// attention_cpu.h. Since a row's blocks are ascending, the diagonal block
// can only be the last of the last chunk, so masking is always a suffix of the chunk.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "attention_cpu.h"
#include "checks.h"

namespace cabattn {
namespace {

// k [B, Hkv, L, d] in any input dtype, v_acc its values in acc_t (v itself for float32).
template <typename scalar_t, typename acc_t>
void block_sparse_attention_kernel(const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v_acc, const at::Tensor& block_count,
                                   const at::Tensor& block_index, int64_t block_size, double scale,
                                   double softcap, at::Tensor& out, at::Tensor& lse) {
  const int64_t batch = q.size(0), q_heads = q.size(1), length = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), group = q_heads / kv_heads;
  const int64_t blocks = num_blocks(length, block_size), max_count = block_index.size(3);
  const int64_t max_keys = chunk_keys(block_size, block_size);
  const scalar_t* q_data = q.const_data_ptr<scalar_t>();
  const acc_t* v_data = v_acc.const_data_ptr<acc_t>();
  const int32_t* count_data = block_count.const_data_ptr<int32_t>();
  const int32_t* index_data = block_index.const_data_ptr<int32_t>();
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  float* lse_data = lse.mutable_data_ptr<float>();
  auto block_tokens = [&](int64_t J) { return std::min(block_size, length - J * block_size); };
  const int64_t head_panels = key_panels(length) * dim * kKeyPanel;
  const std::vector<acc_t> panels =
      pack_heads<acc_t>(k.const_data_ptr<scalar_t>(), batch * kv_heads, length, dim);

  // Row I of a dense (s = 0) layout costs I + 1 blocks, so each head's rows are visited as
  // 0, M-1, 1, M-2, ...: the contiguous task ranges at::parallel_for hands the threads then
  // carry about equal work.
  at::parallel_for(0, batch * q_heads * blocks, 1, [&](int64_t begin, int64_t end) {
    FlashTile<acc_t> tile(block_size, max_keys, dim, static_cast<acc_t>(softcap));
    std::vector<KeyRun<acc_t>> runs;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head_index = task / blocks, pos = task % blocks;  // head_index = b * Hq + h
      const int64_t I = pos % 2 == 0 ? pos / 2 : blocks - 1 - pos / 2;
      const int64_t b = head_index / q_heads, h = head_index % q_heads;
      const int64_t first_row = I * block_size, rows = block_tokens(I);
      const int64_t kv_head = b * kv_heads + h / group;
      const acc_t* head_keys = panels.data() + kv_head * head_panels;
      const acc_t* head_values = v_data + kv_head * length * dim;
      const scalar_t* q_rows = q_data + (head_index * length + first_row) * dim;

      tile.start(rows, rows);
      for (int64_t r = 0; r < rows; ++r)
        load_scaled(q_rows + r * dim, tile.query_row(r), dim, static_cast<acc_t>(scale));

      // Kept blocks in chunks of at most max_keys keys, each chunk a list of runs of
      // consecutive blocks, read in place. Only the sequence's last block can be partial, and
      // it can only be the last of its row, so every other run holds whole key panels.
      const int64_t row = head_index * blocks + I;
      const int32_t* kept = index_data + row * max_count;
      const int64_t count = count_data[row];
      for (int64_t slot = 0; slot < count;) {
        runs.clear();
        int64_t keys = 0;
        while (slot < count && keys + block_tokens(kept[slot]) <= max_keys) {
          const int64_t J = kept[slot], n = block_tokens(J);
          if (!runs.empty() && J == kept[slot - 1] + 1)
            runs.back().keys += n;
          else
            runs.push_back({head_keys + J * block_size * dim, head_values + J * block_size * dim,
                            n});
          keys += n;
          ++slot;
        }
        // Row r of the diagonal block sees its block's first r + 1 keys.
        const int64_t first_visible = kept[slot - 1] == I ? keys - rows + 1 : keys;
        tile.attend(runs, first_visible);
      }

      tile.finish();
      for (int64_t r = 0; r < rows; ++r) {
        store_rows(tile.out_row(r), out_data + (head_index * length + first_row + r) * dim, dim);
        lse_data[head_index * length + first_row + r] = static_cast<float>(tile.lse(r));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& block_count,
    const at::Tensor& block_index, int64_t block_size, double scale, double softcap) {
  const char* op = "cabattn::block_sparse_attention";
  check_block_sparse_attention_args(op, q, k, v, block_count, block_index, block_size, scale,
                                    softcap);
  check_block_layout_values(op, block_count, block_index);

  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "block_sparse_attention", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // float32, or float64 for float64 inputs
    const at::Tensor v_acc = v.to(c10::CppTypeToScalarType<acc_t>::value);
    block_sparse_attention_kernel<scalar_t, acc_t>(q, k, v_acc, block_count, block_index,
                                                   block_size, scale, softcap, out, lse);
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cabattn, m) {
  m.def("block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor block_count, "
        "Tensor block_index, int block_size, float scale, float softcap=0.0) -> "
        "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cabattn, CPU, m) {
  m.impl("block_sparse_attention", &block_sparse_attention_cpu);
}

}  // namespace cabattn
