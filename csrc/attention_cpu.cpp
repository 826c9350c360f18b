// Row passes of the CPU attention engine (attention_cpu.h). The float32 versions are the
// non-GEMM cost of attention, so they use the vector types of cpu_vector.h and are compiled per
// vector ISA level.
#include "attention_cpu.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "cpu_vector.h"

namespace cabattn {

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
