// attention_with_scores: a chunk of Lq queries against Lk keys whose last Lq are the chunk itself
// (query t sees keys j <= Lk - Lq + t; with a sliding window W only those with
// j > Lk - Lq + t - W), returning the output, the log-sum-exp and, per KV head, the softmax
// probability each key received summed over the chunk's queries and the query heads that share
// the KV head (the H2O accumulator of the kv protocol's eviction). The logits may be soft-capped
// (docs/operators.md, Model features).
//
// CPU: K is packed into key panels (cpu_gemm.h) and V converted to float32 (half types) once per
// call; then one task per (batch, KV head, block of queries), the group's query heads stacked
// into one tile so each key chunk is read once for all of them. The mass needs each row's final
// log-sum-exp, so it is a second pass over the keys; when all keys fit one chunk (always for
// Lq = 1, the token-by-token decode this op runs 30 layers x every token) the first pass's
// probability tile is reused and QK^T runs once. Query blocks write their mass into separate
// rows that are summed at the end, so the result does not depend on the thread count. With a
// window a query block reads only the keys from its first query's window on, so a long chunk
// costs O(Lq W), not O(Lq Lk).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "attention_cpu.h"
#include "checks.h"

namespace cabattn {
namespace {

// Queries per task; with GQA the tile holds group x this many rows.
constexpr int64_t kQueryBlock = 64;

// k [B, Hkv, Lk, d] in any input dtype, v_acc its values in acc_t (v itself for float32).
template <typename scalar_t, typename acc_t>
void attention_with_scores_kernel(const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v_acc, double scale, double softcap,
                                  int64_t window, at::Tensor& out, at::Tensor& lse,
                                  float* mass_rows) {
  const int64_t batch = q.size(0), q_heads = q.size(1), queries = q.size(2), dim = q.size(3);
  const int64_t kv_heads = k.size(1), keys_total = k.size(2), group = q_heads / kv_heads;
  const int64_t query_block = std::min(queries, kQueryBlock);
  const int64_t query_blocks = num_blocks(queries, query_block);
  // Chunks start at multiples of max_keys: whole key panels, or one chunk of all the keys.
  const int64_t max_keys = std::min(chunk_keys(group * query_block, kKeyPanel), keys_total);
  const scalar_t* q_data = q.const_data_ptr<scalar_t>();
  const acc_t* v_data = v_acc.const_data_ptr<acc_t>();
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  float* lse_data = lse.mutable_data_ptr<float>();
  // Query t's keys end at keys_total - queries + t + 1.
  const int64_t cache_keys = keys_total - queries;
  const int64_t head_panels = key_panels(keys_total) * dim * kKeyPanel;
  const std::vector<acc_t> panels =
      pack_heads<acc_t>(k.const_data_ptr<scalar_t>(), batch * kv_heads, keys_total, dim);

  // A task's cost grows with its query block (more visible keys), and tasks are ordered
  // (batch, KV head, query block), so the contiguous ranges at::parallel_for hands the threads
  // carry about equal work. Small calls (decode) run on the calling thread.
  const int64_t grain =
      std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, group * query_block * keys_total));
  at::parallel_for(0, batch * kv_heads * query_blocks, grain, [&](int64_t begin, int64_t end) {
    FlashTile<acc_t> tile(group * query_block, max_keys, dim, static_cast<acc_t>(softcap),
                          window);
    std::vector<acc_t> mass;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t kv_index = task / query_blocks, qb = task % query_blocks;  // b * Hkv + g
      const int64_t first_query = qb * query_block;
      const int64_t n = std::min(query_block, queries - first_query);
      const int64_t key_end = cache_keys + first_query + n;  // keys the block's last query sees
      // The first key the block's first query sees, rounded down to a key panel (chunks start
      // on whole panels); 0 without a window.
      const int64_t key_begin =
          window > 0 ? std::max<int64_t>(0, cache_keys + first_query + 1 - window) / kKeyPanel *
                           kKeyPanel
                     : 0;
      const int64_t first_head = kv_index * group;  // b * Hq + g * group
      // Keys [start, start + keys) of the task's KV head; start is a multiple of kKeyPanel.
      auto key_run = [&](int64_t start, int64_t keys) {
        return KeyRun<acc_t>{panels.data() + kv_index * head_panels + start * dim,
                             v_data + (kv_index * keys_total + start) * dim, keys};
      };

      tile.start(group * n, n);
      for (int64_t hh = 0; hh < group; ++hh)
        for (int64_t t = 0; t < n; ++t)
          load_scaled(q_data + ((first_head + hh) * queries + first_query + t) * dim,
                      tile.query_row(hh * n + t), dim, static_cast<acc_t>(scale));

      for (int64_t start = key_begin; start < key_end; start += max_keys) {
        const int64_t keys = std::min(max_keys, key_end - start);
        tile.attend(key_run(start, keys), cache_keys + first_query + 1 - start);
      }
      tile.finish();
      for (int64_t hh = 0; hh < group; ++hh)
        for (int64_t t = 0; t < n; ++t) {
          const int64_t row = (first_head + hh) * queries + first_query + t;
          store_rows(tile.out_row(hh * n + t), out_data + row * dim, dim);
          lse_data[row] = static_cast<float>(tile.lse(hh * n + t));
        }

      mass.assign(key_end, acc_t(0));
      if (key_end - key_begin <= max_keys) {
        tile.add_key_mass(mass.data() + key_begin, key_end - key_begin);
      } else {
        for (int64_t start = key_begin; start < key_end; start += max_keys) {
          const int64_t keys = std::min(max_keys, key_end - start);
          tile.recompute(key_run(start, keys), cache_keys + first_query + 1 - start);
          tile.add_key_mass(mass.data() + start, keys);
        }
      }
      float* mass_row = mass_rows + task * keys_total;
      store_rows(mass.data(), mass_row, key_end);
      std::fill(mass_row + key_end, mass_row + keys_total, 0.0f);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_with_scores_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, double softcap,
    int64_t window) {
  const char* op = "cabattn::attention_with_scores";
  check_attention_with_scores_args(op, q, k, v, scale, softcap, window);

  const int64_t batch = q.size(0), kv_heads = k.size(1), queries = q.size(2), keys = k.size(2);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({batch, q.size(1), queries}, q.options().dtype(at::kFloat));
  const auto float_options = q.options().dtype(at::kFloat);
  if (q.numel() == 0 || keys == 0)
    return {out, lse, at::zeros({batch, kv_heads, keys}, float_options)};
  // One mass row per (batch, KV head, query block), summed in a fixed order afterwards.
  const int64_t query_blocks = num_blocks(queries, std::min(queries, kQueryBlock));
  at::Tensor mass_rows = at::empty({batch, kv_heads, query_blocks, keys}, float_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(),
                                  "attention_with_scores", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // float32, or float64 for float64 inputs
    const at::Tensor v_acc = v.to(c10::CppTypeToScalarType<acc_t>::value);
    attention_with_scores_kernel<scalar_t, acc_t>(q, k, v_acc, scale, softcap, window, out, lse,
                                                  mass_rows.mutable_data_ptr<float>());
  });
  at::Tensor mass = query_blocks == 1 ? mass_rows.squeeze(2) : mass_rows.sum(2);
  return {out, lse, mass};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cabattn, m) {
  m.def("attention_with_scores(Tensor q, Tensor k, Tensor v, float scale, float softcap=0.0, "
        "int window=0) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cabattn, CPU, m) {
  m.impl("attention_with_scores", &attention_with_scores_cpu);
}

}  // namespace cabattn
