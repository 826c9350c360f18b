// block_sparse_attention: forward attention of query block I over the key blocks a layout keeps
// for it (block_index[b, h, I, :block_count[b, h, I]], ascending, within 0..I), causal inside
// the diagonal block, with GQA (query head h reads KV head h / (Hq / Hkv)). Returns the output
// in q's dtype and the log-sum-exp in float32.
//
// CPU: one task per (batch, query head, query block). Its kept key blocks are cut into chunks
// of about chunk_keys() keys; a chunk of consecutive blocks is read in place, any other is
// gathered (and converted from half types) into a small per-thread buffer, then attended with
// the online softmax of attention_cpu.h. Since a row's blocks are ascending, the diagonal block
// can only be the last of the last chunk, so masking is always a suffix of the chunk.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "attention_cpu.h"
#include "checks.h"

namespace cabattn {
namespace {

template <typename scalar_t>
void block_sparse_attention_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& block_count, const at::Tensor& block_index,
                                   int64_t block_size, double scale, at::Tensor& out,
                                   at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;  // float32, or float64 for float64 inputs
  const int64_t batch = q.size(0), q_heads = q.size(1), length = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), group = q_heads / kv_heads;
  const int64_t blocks = num_blocks(length, block_size), max_count = block_index.size(3);
  const int64_t max_keys = chunk_keys(block_size, block_size);
  const scalar_t* q_data = q.const_data_ptr<scalar_t>();
  const scalar_t* k_data = k.const_data_ptr<scalar_t>();
  const scalar_t* v_data = v.const_data_ptr<scalar_t>();
  const int32_t* count_data = block_count.const_data_ptr<int32_t>();
  const int32_t* index_data = block_index.const_data_ptr<int32_t>();
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  float* lse_data = lse.mutable_data_ptr<float>();
  auto block_tokens = [&](int64_t J) { return std::min(block_size, length - J * block_size); };

  // Row I of a dense (s = 0) layout costs I + 1 blocks, so each head's rows are visited as
  // 0, M-1, 1, M-2, ...: the contiguous task ranges at::parallel_for hands the threads then
  // carry about equal work.
  at::parallel_for(0, batch * q_heads * blocks, 1, [&](int64_t begin, int64_t end) {
    const SequentialBlasScope sequential_blas;
    FlashTile<acc_t> tile(block_size, max_keys, dim);
    std::vector<acc_t> k_chunk(max_keys * dim), v_chunk(max_keys * dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head_index = task / blocks, pos = task % blocks;  // head_index = b * Hq + h
      const int64_t I = pos % 2 == 0 ? pos / 2 : blocks - 1 - pos / 2;
      const int64_t b = head_index / q_heads, h = head_index % q_heads;
      const int64_t first_row = I * block_size, rows = block_tokens(I);
      const int64_t kv_offset = (b * kv_heads + h / group) * length * dim;
      const scalar_t* q_rows = q_data + (head_index * length + first_row) * dim;

      tile.start(rows, rows);
      for (int64_t r = 0; r < rows; ++r)
        load_scaled(q_rows + r * dim, tile.query_row(r), dim, static_cast<acc_t>(scale));

      const int64_t row = head_index * blocks + I;
      const int32_t* kept = index_data + row * max_count;
      const int64_t count = count_data[row];
      for (int64_t slot = 0; slot < count;) {
        const int64_t first_slot = slot;
        int64_t keys = 0;
        while (slot < count && keys + block_tokens(kept[slot]) <= max_keys)
          keys += block_tokens(kept[slot++]);
        const int64_t first_block = kept[first_slot], last_block = kept[slot - 1];
        const acc_t* k_keys;
        const acc_t* v_keys;
        if (std::is_same_v<acc_t, scalar_t> && last_block - first_block == slot - 1 - first_slot) {
          const int64_t offset = kv_offset + first_block * block_size * dim;
          k_keys = reinterpret_cast<const acc_t*>(k_data + offset);
          v_keys = reinterpret_cast<const acc_t*>(v_data + offset);
        } else {
          for (int64_t s = first_slot, at_key = 0; s < slot; ++s) {
            const int64_t offset = kv_offset + kept[s] * block_size * dim;
            const int64_t n = block_tokens(kept[s]) * dim;
            load_rows(k_data + offset, k_chunk.data() + at_key * dim, n);
            load_rows(v_data + offset, v_chunk.data() + at_key * dim, n);
            at_key += block_tokens(kept[s]);
          }
          k_keys = k_chunk.data();
          v_keys = v_chunk.data();
        }
        // Row r of the diagonal block sees its block's first r + 1 keys.
        const int64_t first_visible = last_block == I ? keys - rows + 1 : keys;
        tile.attend(k_keys, v_keys, keys, first_visible);
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
    const at::Tensor& block_index, int64_t block_size, double scale) {
  const char* op = "cabattn::block_sparse_attention";
  check_block_sparse_attention_args(op, q, k, v, block_count, block_index, block_size, scale);
  check_block_layout_values(op, block_count, block_index);

  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "block_sparse_attention", [&] {
    block_sparse_attention_kernel<scalar_t>(q, k, v, block_count, block_index, block_size, scale,
                                            out, lse);
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cabattn, m) {
  m.def("block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor block_count, "
        "Tensor block_index, int block_size, float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cabattn, CPU, m) {
  m.impl("block_sparse_attention", &block_sparse_attention_cpu);
}

}  // namespace cabattn
