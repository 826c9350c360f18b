// The CPU attention engine shared by block_sparse_attention and attention_with_scores: one tile
// of query rows attends to chunks of keys with FlashAttention-2's online softmax. QK^T and PV
// are GEMMs (ATen's mm_out / addmm_out, i.e. MKL) on a [rows, keys] logits tile, so no L x L
// buffer ever exists; the exp/max/sum row passes are vectorised loops (attention_cpu.cpp).
//
// Masking is causal in one shape that covers both operators: in a chunk of `keys` keys, row r
// sees the first clamp(first_visible + r % rows_per_head, 0, keys) of them (the chunk's keys are
// in token order and the masked ones are always a suffix). rows_per_head lets the query heads
// of one GQA group be stacked into one tile: their rows share the KV head and the mask.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"

// ATen turns MKL's dynamic threading off, so an MKL call made inside at::parallel_for starts a
// nested team of threads per call, which spin against ours. MKL's C API for a thread-local
// thread count, declared weak: where the torch build exports no MKL it stays null and unused.
extern "C" int MKL_Set_Num_Threads_Local(int nthreads) __attribute__((weak));

namespace cabattn {

// Single-threaded BLAS in the calling thread for the scope's lifetime: every task body of an
// at::parallel_for that runs GEMM tiles opens one.
class SequentialBlasScope {
 public:
  SequentialBlasScope() {
    if (MKL_Set_Num_Threads_Local != nullptr) previous_ = MKL_Set_Num_Threads_Local(1);
  }
  ~SequentialBlasScope() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_);
  }
  SequentialBlasScope(const SequentialBlasScope&) = delete;
  SequentialBlasScope& operator=(const SequentialBlasScope&) = delete;

 private:
  int previous_ = 0;  // 0: the global setting
};

// QK^T without a BLAS call: the keys are packed once per operator call into panels of
// kKeyPanel keys, each [dim][kKeyPanel] (key index fastest), zero-padded past the last key, so a
// register-tiled micro-kernel reads them with plain vector loads. A BLAS GEMM would repack its
// operands and clear its output on every tile instead.
constexpr int64_t kKeyPanel = 16;

inline int64_t key_panels(int64_t keys) { return (keys + kKeyPanel - 1) / kKeyPanel; }

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

// logits[r, j] = q[r, :] . key j for r < rows and j < count * kKeyPanel: q [rows, dim]
// row-major, `count` consecutive panels, logits with row stride ld >= count * kKeyPanel.
void qk_panels(const float* q, int64_t rows, int64_t dim, const float* panels, int64_t count,
               float* logits, int64_t ld);
void qk_panels(const double* q, int64_t rows, int64_t dim, const double* panels, int64_t count,
               double* logits, int64_t ld);

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

// dst[i] = acc_t(src[i]) * factor, converting from the input dtype.
template <typename acc_t, typename scalar_t>
void load_scaled(const scalar_t* src, acc_t* dst, int64_t n, acc_t factor) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]) * factor;
}

template <typename acc_t, typename scalar_t>
void load_rows(const scalar_t* src, acc_t* dst, int64_t n) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::memcpy(dst, src, n * sizeof(acc_t));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
  }
}

template <typename scalar_t, typename acc_t>
void store_rows(const acc_t* src, scalar_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

// One tile of up to max_rows query rows and its online-softmax state: running max m and sum l
// per row, the unnormalised output O [rows, dim], and a logits/probabilities tile
// [rows, max_keys]. Allocated once per thread and reused for every tile that thread runs.
template <typename acc_t>
class FlashTile {
 public:
  FlashTile(int64_t max_rows, int64_t max_keys, int64_t dim)
      : max_keys_(max_keys), dim_(dim), q_(max_rows * dim), out_(max_rows * dim),
        logits_(max_rows * max_keys), row_max_(max_rows), row_sum_(max_rows), lse_(max_rows) {}

  // Starts a tile of `rows` rows (query rows to be written with query_row()).
  void start(int64_t rows, int64_t rows_per_head) {
    rows_ = rows;
    rows_per_head_ = rows_per_head;
    std::fill(out_.begin(), out_.begin() + rows * dim_, acc_t(0));
    std::fill(row_max_.begin(), row_max_.begin() + rows, -std::numeric_limits<acc_t>::infinity());
    std::fill(row_sum_.begin(), row_sum_.begin() + rows, acc_t(0));
  }

  acc_t* query_row(int64_t r) { return q_.data() + r * dim_; }

  // Online-softmax step over `keys` (<= max_keys) keys k, v [keys, dim], contiguous.
  void attend(const acc_t* k, const acc_t* v, int64_t keys, int64_t first_visible) {
    logits(k, keys);
    for (int64_t r = 0; r < rows_; ++r) {
      acc_t* x = logits_.data() + r * keys;
      const int64_t visible = visible_keys(r, keys, first_visible);
      if (visible == 0) {
        std::fill(x, x + keys, acc_t(0));
        continue;
      }
      const acc_t new_max = std::max(row_max_[r], row_max(x, visible));
      const acc_t sum = exp_row(x, visible, keys, new_max);
      if (new_max != row_max_[r] && row_sum_[r] > 0) {
        const acc_t rescale = std::exp(row_max_[r] - new_max);
        row_sum_[r] *= rescale;
        scale_row(out_.data() + r * dim_, dim_, rescale);
      }
      row_max_[r] = new_max;
      row_sum_[r] += sum;
    }
    // out += P @ V
    at::Tensor out = view(out_.data(), rows_, dim_);
    at::addmm_out(out, out, view(logits_.data(), rows_, keys), view(v, keys, dim_));
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
  void recompute(const acc_t* k, int64_t keys, int64_t first_visible) {
    logits(k, keys);
    for (int64_t r = 0; r < rows_; ++r)
      exp_row(logits_.data() + r * keys, visible_keys(r, keys, first_visible), keys, row_max_[r]);
  }

  // After finish(): mass[j] += sum over rows of the probability exp(logit - lse) = tile / l.
  void add_key_mass(acc_t* mass, int64_t keys) const {
    for (int64_t r = 0; r < rows_; ++r)
      add_scaled_row(mass, logits_.data() + r * keys, keys, acc_t(1) / row_sum_[r]);
  }

 private:
  int64_t visible_keys(int64_t r, int64_t keys, int64_t first_visible) const {
    return std::clamp<int64_t>(first_visible + r % rows_per_head_, 0, keys);
  }

  static at::Tensor view(const acc_t* data, int64_t rows, int64_t cols) {
    return at::from_blob(const_cast<acc_t*>(data), {rows, cols},
                         at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  }

  // logits [rows, keys] = Q K^T (the softmax scale is folded into Q).
  void logits(const acc_t* k, int64_t keys) {
    TORCH_INTERNAL_ASSERT(keys <= max_keys_);
    at::Tensor out = view(logits_.data(), rows_, keys);
    at::mm_out(out, view(q_.data(), rows_, dim_), view(k, keys, dim_).t());
  }

  int64_t max_keys_, dim_, rows_ = 0, rows_per_head_ = 1;
  std::vector<acc_t> q_, out_, logits_, row_max_, row_sum_, lse_;
};

// Keys per chunk: a logits tile of about kTileElements values (256 KiB in float32) stays in a
// core's L2 cache; at least `granule` keys, in multiples of it.
inline int64_t chunk_keys(int64_t rows, int64_t granule) {
  constexpr int64_t kTileElements = 64 * 1024;
  return std::max<int64_t>(granule, kTileElements / std::max<int64_t>(rows, 1) / granule * granule);
}

}  // namespace cabattn
