// block_scores: Sblk (sum) and Gblk (max) of the dense causal softmax P per (query block, key
// block) pair (docs/block_statistics.md), in one QK^T pass that never holds more than a
// [block_size, kKeyChunk] tile of logits; of the soft-capped logits when softcap > 0
// (docs/operators.md, Model features).
//
// For query row r and key block J it keeps the block-local max logit m_rJ and
// s_rJ = sum_{j in J, j <= r} exp(logit_rj - m_rJ). With lse_r = logsumexp_J(m_rJ + log s_rJ):
//   sum_{j in J} P_rj = s_rJ * exp(m_rJ - lse_r),   max_{j in J} P_rj = exp(m_rJ - lse_r),
// so Sblk[I, J] and Gblk[I, J] are a sum and a max of those over the rows r of block I. The
// per-block maxima make the scheme exact without a running max or any rescaling.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "attention_cpu.h"
#include "checks.h"
#include "common.h"
#include "cpu_gemm.h"
#include "cpu_kernels.h"

namespace cabattn {
namespace {

// Logits are computed in [kRowTile, kKeyChunk] tiles (512 KiB of float32, within a core's L2
// cache) by the packed-key micro-kernel of cpu_gemm.h. A row tile spans several query
// blocks when block_size < 128: the few masked logits it wastes cost less than more, shorter
// passes over the key panels.
constexpr int64_t kRowTile = 128;
constexpr int64_t kKeyChunk = 1024;
static_assert(kKeyChunk % kRowTile == 0, "key chunks must start at row-tile boundaries");
static_assert(kKeyChunk % kKeyPanel == 0, "key chunks must start at key-panel boundaries");

// For one row of `count` logits cut into blocks of block_size: each block's max m[J] and
// s[J] = sum exp(logit - m[J]). The exp is this operator's whole non-GEMM cost, so the float32
// pass is the vector code of the process's ISA path (cpu_kernels.h).
void row_block_stats(const float* logits, int64_t count, int64_t block_size, float* m,
                     float* s) {
  cpu_kernels().row_block_stats(logits, count, block_size, m, s);
}

// float64 inputs exist for reference runs only: plain loops.
void row_block_stats(const double* logits, int64_t count, int64_t block_size, double* m,
                     double* s) {
  for (int64_t start = 0, block = 0; start < count; start += block_size, ++block) {
    const int64_t size = std::min(block_size, count - start);
    const double* x = logits + start;
    double block_max = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < size; ++j) block_max = std::max(block_max, x[j]);
    double block_sum = 0.0;
    for (int64_t j = 0; j < size; ++j) block_sum += std::exp(x[j] - block_max);
    m[block] = block_max;
    s[block] = block_sum;
  }
}

// q_scaled [B, Hq, L, d] (softmax scale folded in) and k [B, Hkv, L, d], both contiguous in
// acc_t; sum_out and max_out [B, Hq, M, M] float32, zero-filled (J > I stays zero). softcap:
// the logit soft-cap (0: none).
template <typename acc_t>
void block_scores_kernel(const at::Tensor& q_scaled, const at::Tensor& k, int64_t block_size,
                         acc_t softcap, float* sum_out, float* max_out) {
  const int64_t batch = q_scaled.size(0), q_heads = q_scaled.size(1);
  const int64_t length = q_scaled.size(2), dim = q_scaled.size(3), kv_heads = k.size(1);
  const int64_t group = q_heads / kv_heads;
  const int64_t blocks = num_blocks(length, block_size);
  const int64_t tiles = num_blocks(length, kRowTile);
  const acc_t* q_data = q_scaled.const_data_ptr<acc_t>();
  const int64_t head_panels = key_panels(length) * dim * kKeyPanel;
  const std::vector<acc_t> panels =
      pack_heads<acc_t>(k.const_data_ptr<acc_t>(), batch * kv_heads, length, dim);

  // Task t is a (batch, head, row tile) triple. Tile T costs about T + 1 key chunks, so each
  // head's tiles are visited as 0, last, 1, last - 1, ...: the contiguous task ranges
  // at::parallel_for hands to the threads then carry about equal work.
  at::parallel_for(0, batch * q_heads * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile(kRowTile * kKeyChunk);
    std::vector<acc_t> row_max(kRowTile * blocks), row_sum(kRowTile * blocks);
    std::vector<double> block_sum(blocks), block_max(blocks), weight(blocks);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head_index = task / tiles, pos = task % tiles;  // head_index = b * Hq + h
      const int64_t row_tile = pos % 2 == 0 ? pos / 2 : tiles - 1 - pos / 2;
      const int64_t b = head_index / q_heads, h = head_index % q_heads;
      const int64_t first_row = row_tile * kRowTile;
      const int64_t rows = std::min(kRowTile, length - first_row);
      const int64_t key_end = first_row + rows;  // causal: keys up to the tile's last row
      const acc_t* q_rows = q_data + (head_index * length + first_row) * dim;
      const acc_t* head_keys = panels.data() + (b * kv_heads + h / group) * head_panels;

      // Chunks start at multiples of kKeyChunk, tiles at multiples of kRowTile (which divides
      // it), so every chunk starts at or before the tile's first row: each row sees >= 1 key.
      for (int64_t chunk_start = 0; chunk_start < key_end; chunk_start += kKeyChunk) {
        const int64_t keys = std::min(kKeyChunk, key_end - chunk_start);
        const int64_t ld = key_panels(keys) * kKeyPanel;  // whole panels, <= kKeyChunk
        qk_panels(q_rows, rows, dim, head_keys + chunk_start * dim, key_panels(keys),
                  tile.data(), ld);
        const int64_t chunk_block = chunk_start / block_size;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t visible = std::min(keys, first_row + r + 1 - chunk_start);
          if (softcap > 0) softcap_row(tile.data() + r * ld, visible, softcap);
          row_block_stats(tile.data() + r * ld, visible, block_size,
                          row_max.data() + r * blocks + chunk_block,
                          row_sum.data() + r * blocks + chunk_block);
        }
      }

      // Per query block of the tile: each row's lse from its per-block (max, sum) pairs, then
      // each key block's share of the row, summed and maxed over the block's rows.
      for (int64_t block_row = 0; block_row < rows; block_row += block_size) {
        const int64_t row_block = (first_row + block_row) / block_size;
        const int64_t block_rows = std::min(block_size, rows - block_row);
        std::fill(block_sum.begin(), block_sum.begin() + row_block + 1, 0.0);
        std::fill(block_max.begin(), block_max.begin() + row_block + 1, 0.0);
        for (int64_t r = block_row; r < block_row + block_rows; ++r) {
          const acc_t* m = row_max.data() + r * blocks;
          const acc_t* s = row_sum.data() + r * blocks;
          double top = -std::numeric_limits<double>::infinity();
          for (int64_t J = 0; J <= row_block; ++J) top = std::max(top, static_cast<double>(m[J]));
          double total = 0.0;
          for (int64_t J = 0; J <= row_block; ++J) {
            weight[J] = std::exp(static_cast<double>(m[J]) - top);
            total += s[J] * weight[J];
          }
          for (int64_t J = 0; J <= row_block; ++J) {
            const double peak = weight[J] / total;  // exp(m_rJ - lse_r)
            block_sum[J] += s[J] * peak;
            block_max[J] = std::max(block_max[J], peak);
          }
        }
        const int64_t out_row = (head_index * blocks + row_block) * blocks;
        for (int64_t J = 0; J <= row_block; ++J) {
          sum_out[out_row + J] = static_cast<float>(block_sum[J]);
          max_out[out_row + J] = static_cast<float>(block_max[J]);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> block_scores_cpu(const at::Tensor& q, const at::Tensor& k,
                                                    int64_t block_size, double scale,
                                                    double softcap) {
  const char* op = "cabattn::block_scores";
  check_block_scores_args(op, q, k, block_size, scale, softcap);
  const int64_t blocks = num_blocks(q.size(2), block_size);
  const auto out_options = q.options().dtype(at::kFloat);
  at::Tensor sum_out = at::zeros({q.size(0), q.size(1), blocks, blocks}, out_options);
  at::Tensor max_out = at::zeros({q.size(0), q.size(1), blocks, blocks}, out_options);
  if (q.numel() == 0) return {sum_out, max_out};
  // Compute in float32 (float64 for float64 inputs); half inputs are converted once here.
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor q_scaled = (q.to(acc) * scale).contiguous();
  const at::Tensor k_acc = k.to(acc).contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "block_scores", [&] {
    block_scores_kernel<scalar_t>(q_scaled, k_acc, block_size, static_cast<scalar_t>(softcap),
                                  sum_out.mutable_data_ptr<float>(),
                                  max_out.mutable_data_ptr<float>());
  });
  return {sum_out, max_out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cabattn, m) {
  m.def("block_scores(Tensor q, Tensor k, int block_size, float scale, float softcap=0.0) -> "
        "(Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cabattn, CPU, m) { m.impl("block_scores", &block_scores_cpu); }

}  // namespace cabattn
