// Row passes of the CPU attention engine (attention_cpu.h). The float32 versions are the
// non-GEMM cost of attention, so they use the vector types of cpu_vector.h and are compiled per
// vector ISA level.
#include "attention_cpu.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "cpu_vector.h"

namespace cabattn {
namespace {

// A [R, kKeyPanel] block of logits in registers: R rows of q against one key panel. Each step
// over the head dimension loads the panel's kKeyPanel keys once and broadcasts one q value per
// row (6 rows x 2 AVX2 vectors = 12 accumulators, the classic AVX2 SGEMM shape).
template <int R, typename T>
[[gnu::always_inline]] inline void qk_micro_tile(const T* q, int64_t dim, const T* panel,
                                                 T* logits, int64_t ld) {
  typedef T vec __attribute__((vector_size(32)));
  constexpr int kVecs = kKeyPanel * sizeof(T) / sizeof(vec);
  vec acc[R][kVecs];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVecs; ++v) acc[r][v] = vec{};
  constexpr int kLanesPerVec = sizeof(vec) / sizeof(T);
  // One vector per memcpy: whole-array copies make GCC bounce the registers through the stack.
  for (int64_t d = 0; d < dim; ++d) {
    vec keys[kVecs];
    for (int v = 0; v < kVecs; ++v)
      std::memcpy(&keys[v], panel + d * kKeyPanel + v * kLanesPerVec, sizeof(vec));
    for (int r = 0; r < R; ++r) {
      const vec value = q[r * dim + d] - vec{};  // broadcast (x - 0 is exactly x)
      for (int v = 0; v < kVecs; ++v) acc[r][v] += value * keys[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVecs; ++v)
      std::memcpy(logits + r * ld + v * kLanesPerVec, &acc[r][v], sizeof(vec));
}

template <typename T>
[[gnu::always_inline]] inline void qk_panels_impl(const T* q, int64_t rows, int64_t dim,
                                                  const T* panels, int64_t count, T* logits,
                                                  int64_t ld) {
  constexpr int kRows = 6;
  for (int64_t p = 0; p < count; ++p) {
    const T* panel = panels + p * dim * kKeyPanel;
    T* out = logits + p * kKeyPanel;
    int64_t r = 0;
    for (; r + kRows <= rows; r += kRows)
      qk_micro_tile<kRows>(q + r * dim, dim, panel, out + r * ld, ld);
    const T* q_rest = q + r * dim;
    T* out_rest = out + r * ld;
    switch (rows - r) {
      case 5: qk_micro_tile<5>(q_rest, dim, panel, out_rest, ld); break;
      case 4: qk_micro_tile<4>(q_rest, dim, panel, out_rest, ld); break;
      case 3: qk_micro_tile<3>(q_rest, dim, panel, out_rest, ld); break;
      case 2: qk_micro_tile<2>(q_rest, dim, panel, out_rest, ld); break;
      case 1: qk_micro_tile<1>(q_rest, dim, panel, out_rest, ld); break;
      default: break;
    }
  }
}

}  // namespace

CABATTN_VECTOR_CLONES
void qk_panels(const float* q, int64_t rows, int64_t dim, const float* panels, int64_t count,
               float* logits, int64_t ld) {
  qk_panels_impl(q, rows, dim, panels, count, logits, ld);
}

void qk_panels(const double* q, int64_t rows, int64_t dim, const double* panels, int64_t count,
               double* logits, int64_t ld) {
  qk_panels_impl(q, rows, dim, panels, count, logits, ld);
}

CABATTN_VECTOR_CLONES
float row_max(const float* x, int64_t n) {
  constexpr float lowest = -std::numeric_limits<float>::infinity();
  vfloat best = vfloat{} + lowest;
  for (int64_t j = 0; j < n; j += kLanes) {
    const vfloat v = load_lanes(x + j, n - j, lowest);
    best = v > best ? v : best;
  }
  return lanes_max(best);
}

double row_max(const double* x, int64_t n) {
  double best = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) best = std::max(best, x[j]);
  return best;
}

CABATTN_VECTOR_CLONES
float exp_row(float* x, int64_t visible, int64_t n, float shift) {
  vfloat sum = {};
  int64_t j = 0;
  for (; j < visible; j += kLanes) {
    // Lanes at or past `visible` are masked keys: they become 0 (their logits may exceed the
    // shift, so their exp is not computed to be used).
    const vfloat e = first_lanes(exp_nonpositive(load_lanes(x + j, n - j, 0.0f) - shift),
                                 visible - j);
    store_lanes(x + j, e, n - j);
    sum += e;
  }
  if (j < n) std::memset(x + j, 0, (n - j) * sizeof(float));
  return lanes_sum(sum);
}

double exp_row(double* x, int64_t visible, int64_t n, double shift) {
  double sum = 0.0;
  for (int64_t j = 0; j < visible; ++j) {
    x[j] = std::exp(x[j] - shift);
    sum += x[j];
  }
  for (int64_t j = visible; j < n; ++j) x[j] = 0.0;
  return sum;
}

CABATTN_VECTOR_CLONES
void scale_row(float* x, int64_t n, float factor) {
  for (int64_t j = 0; j < n; j += kLanes)
    store_lanes(x + j, load_lanes(x + j, n - j, 0.0f) * factor, n - j);
}

void scale_row(double* x, int64_t n, double factor) {
  for (int64_t j = 0; j < n; ++j) x[j] *= factor;
}

CABATTN_VECTOR_CLONES
void add_scaled_row(float* dst, const float* src, int64_t n, float factor) {
  for (int64_t j = 0; j < n; j += kLanes) {
    const vfloat sum = load_lanes(dst + j, n - j, 0.0f) + factor * load_lanes(src + j, n - j, 0.0f);
    store_lanes(dst + j, sum, n - j);
  }
}

void add_scaled_row(double* dst, const double* src, int64_t n, double factor) {
  for (int64_t j = 0; j < n; ++j) dst[j] += factor * src[j];
}

}  // namespace cabattn
