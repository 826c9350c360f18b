// The one register-tiled GEMM micro-kernel of the CPU kernels (cpu_gemm.cpp), behind the two
// products they need: QK^T of a tile of query rows against packed keys (block_scores and the
// attention tiles of attention_cpu.h) and O += P V (the attention tiles). A BLAS call per tile
// would repack its operands, clear its output and, inside at::parallel_for, start a nested
// thread team; the micro-kernel reads the operands where they lie.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu_kernels.h"

namespace cabattn {

// panels [key_panels(keys), dim, kKeyPanel] from k [keys, dim] (row-major, any input dtype).
template <typename acc_t, typename scalar_t>
void pack_key_panels(const scalar_t* k, int64_t keys, int64_t dim, acc_t* panels) {
  for (int64_t p = 0; p < key_panels(keys); ++p) {
    acc_t* panel = panels + p * dim * kKeyPanel;
    for (int64_t t = 0; t < kKeyPanel; ++t) {
      const int64_t key = p * kKeyPanel + t;
      for (int64_t d = 0; d < dim; ++d)
        panel[d * kKeyPanel + t] = key < keys ? static_cast<acc_t>(k[key * dim + d]) : acc_t(0);
    }
  }
}

// Packed K panels of every head of k [heads, keys, dim]: head h starts at
// h * key_panels(keys) * dim * kKeyPanel. Heads are packed in parallel only in pieces of about
// a million values: waking the thread pool costs more than packing a decode step's cache.
template <typename acc_t, typename scalar_t>
std::vector<acc_t> pack_heads(const scalar_t* k, int64_t heads, int64_t keys, int64_t dim) {
  const int64_t head_panels = key_panels(keys) * dim * kKeyPanel;
  std::vector<acc_t> panels(heads * head_panels);
  const int64_t grain = std::max<int64_t>(1, (1 << 20) / std::max<int64_t>(1, keys * dim));
  at::parallel_for(0, heads, grain, [&](int64_t begin, int64_t end) {
    for (int64_t head = begin; head < end; ++head)
      pack_key_panels(k + head * keys * dim, keys, dim, panels.data() + head * head_panels);
  });
  return panels;
}

// logits[r, j] = q[r, :] . key j for r < rows and j < count * kKeyPanel: q [rows, dim]
// row-major, `count` consecutive panels, logits with row stride ld >= count * kKeyPanel.
void qk_panels(const float* q, int64_t rows, int64_t dim, const float* panels, int64_t count,
               float* logits, int64_t ld);
void qk_panels(const double* q, int64_t rows, int64_t dim, const double* panels, int64_t count,
               double* logits, int64_t ld);

// out[r, :] += sum over j < keys of p[r, j] * v[j, :] for r < rows: p with row stride ld,
// v [keys, dim] and out [rows, dim] row-major.
void add_pv(const float* p, int64_t rows, int64_t ld, int64_t keys, const float* v, int64_t dim,
            float* out);
void add_pv(const double* p, int64_t rows, int64_t ld, int64_t keys, const double* v,
            int64_t dim, double* out);

}  // namespace cabattn
