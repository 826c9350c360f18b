// The CPU attention engine shared by block_sparse_attention and attention_with_scores: one tile
// of query rows attends to chunks of keys with FlashAttention-2's online softmax. QK^T and PV
// run through the register micro-kernel of cpu_gemm.h on a [rows, keys] logits tile, so no
// L x L buffer ever exists; the exp/max/sum row passes are vectorised loops (attention_cpu.cpp).
//
// Masking is causal in one shape that covers both operators: in a chunk of `keys` keys, row r
// sees the first clamp(first_visible + r % rows_per_head, 0, keys) of them (the chunk's keys are
// in token order and the masked ones are always a suffix). rows_per_head lets the query heads
// of one GQA group be stacked into one tile: their rows share the KV head and the mask. A
// sliding window W (attention_with_scores) also hides the keys before the row's last W, a
// prefix: row r sees chunk keys [clamp(end - W, 0, keys), end) where end = first_visible +
// r % rows_per_head, clamped likewise. A soft-cap c turns every logit s into c tanh(s / c)
// before the softmax (docs/operators.md, Model features).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <span>
#include <utility>
#include <vector>

#include "common.h"
#include "cpu_gemm.h"

namespace cabattn {

// Row passes over one logits row, float32 (vectorised) and float64.
float row_max(const float* x, int64_t n);
double row_max(const double* x, int64_t n);
// x[j] = exp(x[j] - shift) for j < visible, 0 for visible <= j < n; returns the sum.
float exp_row(float* x, int64_t visible, int64_t n, float shift);
double exp_row(double* x, int64_t visible, int64_t n, double shift);
void scale_row(float* x, int64_t n, float factor);
void scale_row(double* x, int64_t n, double factor);
// dst[j] += factor * src[j]
void add_scaled_row(float* dst, const float* src, int64_t n, float factor);
void add_scaled_row(double* dst, const double* src, int64_t n, double factor);
// x[j] = cap * tanh(x[j] / cap), the logit soft-cap.
void softcap_row(float* x, int64_t n, float cap);
void softcap_row(double* x, int64_t n, double cap);

// dst[i] = acc_t(src[i]) * factor, converting from the input dtype.
template <typename acc_t, typename scalar_t>
void load_scaled(const scalar_t* src, acc_t* dst, int64_t n, acc_t factor) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]) * factor;
}

template <typename scalar_t, typename acc_t>
void store_rows(const acc_t* src, scalar_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

// `keys` consecutive keys of one KV head: their packed K panels (pack_key_panels, from the
// run's first key) and their V rows [keys, dim], both in acc_t.
template <typename acc_t>
struct KeyRun {
  const acc_t* panels;
  const acc_t* v;
  int64_t keys;
};

// One tile of up to max_rows query rows and its online-softmax state: running max m and sum l
// per row, the unnormalised output O [rows, dim], and a logits/probabilities tile
// [rows, max_keys] (rows padded to whole key panels). Allocated once per thread and reused for
// every tile that thread runs. softcap: the logit soft-cap (0: none); window: the sliding
// window in keys (0: none).
template <typename acc_t>
class FlashTile {
 public:
  FlashTile(int64_t max_rows, int64_t max_keys, int64_t dim, acc_t softcap = 0,
            int64_t window = 0)
      : max_keys_(max_keys), ld_(key_panels(max_keys) * kKeyPanel), dim_(dim),
        window_(window), softcap_(softcap), q_(max_rows * dim), out_(max_rows * dim),
        logits_(max_rows * ld_), row_max_(max_rows), row_sum_(max_rows), lse_(max_rows) {}

  // Starts a tile of `rows` rows (query rows to be written with query_row()).
  void start(int64_t rows, int64_t rows_per_head) {
    rows_ = rows;
    rows_per_head_ = rows_per_head;
    std::fill(out_.begin(), out_.begin() + rows * dim_, acc_t(0));
    std::fill(row_max_.begin(), row_max_.begin() + rows, -std::numeric_limits<acc_t>::infinity());
    std::fill(row_sum_.begin(), row_sum_.begin() + rows, acc_t(0));
  }

  acc_t* query_row(int64_t r) { return q_.data() + r * dim_; }

  // Online-softmax step over one chunk of at most max_keys keys, given as runs of consecutive
  // keys in token order; every run but the last holds a multiple of kKeyPanel keys.
  void attend(std::span<const KeyRun<acc_t>> runs, int64_t first_visible) {
    const int64_t keys = logits(runs);
    for (int64_t r = 0; r < rows_; ++r) {
      acc_t* x = logits_.data() + r * ld_;
      const auto [begin, end] = visible_keys(r, keys, first_visible);
      if (begin == end) {
        std::fill(x, x + keys, acc_t(0));
        continue;
      }
      std::fill(x, x + begin, acc_t(0));
      const acc_t new_max = std::max(row_max_[r], row_max(x + begin, end - begin));
      const acc_t sum = exp_row(x + begin, end - begin, keys - begin, new_max);
      if (new_max != row_max_[r] && row_sum_[r] > 0) {
        const acc_t rescale = std::exp(row_max_[r] - new_max);
        row_sum_[r] *= rescale;
        scale_row(out_.data() + r * dim_, dim_, rescale);
      }
      row_max_[r] = new_max;
      row_sum_[r] += sum;
    }
    int64_t column = 0;
    for (const KeyRun<acc_t>& run : runs) {
      add_pv(logits_.data() + column, rows_, ld_, run.keys, run.v, dim_, out_.data());
      column += run.keys;
    }
  }

  void attend(const KeyRun<acc_t>& run, int64_t first_visible) {
    attend(std::span<const KeyRun<acc_t>>(&run, 1), first_visible);
  }

  // Normalises the output (out / l) and computes each row's log-sum-exp m + log l.
  void finish() {
    for (int64_t r = 0; r < rows_; ++r) {
      scale_row(out_.data() + r * dim_, dim_, acc_t(1) / row_sum_[r]);
      lse_[r] = row_max_[r] + std::log(row_sum_[r]);
    }
  }

  const acc_t* out_row(int64_t r) const { return out_.data() + r * dim_; }
  acc_t lse(int64_t r) const { return lse_[r]; }

  // After finish(): refills the probability tile of a chunk with exp(logit - m), masked as in
  // attend(), for add_key_mass(). Not needed when the tile's only chunk was the last attend().
  void recompute(const KeyRun<acc_t>& run, int64_t first_visible) {
    const int64_t keys = logits(std::span<const KeyRun<acc_t>>(&run, 1));
    for (int64_t r = 0; r < rows_; ++r) {
      acc_t* x = logits_.data() + r * ld_;
      const auto [begin, end] = visible_keys(r, keys, first_visible);
      std::fill(x, x + begin, acc_t(0));
      exp_row(x + begin, end - begin, keys - begin, row_max_[r]);
    }
  }

  // After finish(): mass[j] += sum over rows of the probability exp(logit - lse) = tile / l.
  void add_key_mass(acc_t* mass, int64_t keys) const {
    for (int64_t r = 0; r < rows_; ++r)
      add_scaled_row(mass, logits_.data() + r * ld_, keys, acc_t(1) / row_sum_[r]);
  }

 private:
  // The chunk keys [begin, end) row r sees (see the top of this file).
  std::pair<int64_t, int64_t> visible_keys(int64_t r, int64_t keys, int64_t first_visible) const {
    const int64_t end = first_visible + r % rows_per_head_;
    const int64_t begin = window_ > 0 ? end - window_ : 0;
    return {std::clamp<int64_t>(begin, 0, keys), std::clamp<int64_t>(end, 0, keys)};
  }

  // logits [rows, keys] = Q K^T over the runs, side by side (the softmax scale is folded into
  // Q), soft-capped; returns keys, the runs' total.
  int64_t logits(std::span<const KeyRun<acc_t>> runs) {
    int64_t column = 0;
    for (const KeyRun<acc_t>& run : runs) {
      TORCH_INTERNAL_ASSERT(column % kKeyPanel == 0 && column + run.keys <= max_keys_);
      qk_panels(q_.data(), rows_, dim_, run.panels, key_panels(run.keys),
                logits_.data() + column, ld_);
      column += run.keys;
    }
    if (softcap_ > 0)
      for (int64_t r = 0; r < rows_; ++r) softcap_row(logits_.data() + r * ld_, column, softcap_);
    return column;
  }

  int64_t max_keys_, ld_, dim_, window_, rows_ = 0, rows_per_head_ = 1;
  acc_t softcap_;
  std::vector<acc_t> q_, out_, logits_, row_max_, row_sum_, lse_;
};

// Keys per chunk: a logits tile of about kTileElements values (256 KiB in float32) stays in a
// core's L2 cache; at least `granule` keys, in multiples of it.
inline int64_t chunk_keys(int64_t rows, int64_t granule) {
  constexpr int64_t kTileElements = 64 * 1024;
  return std::max<int64_t>(granule, kTileElements / std::max<int64_t>(rows, 1) / granule * granule);
}

}  // namespace cabattn
