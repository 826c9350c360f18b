// Row passes of the CPU attention engine (attention_cpu.h). The float32 versions are the
// non-GEMM cost of attention, so they are written with kLanes independent accumulators (the
// compiler turns them into vector registers without -ffast-math) and compiled per vector ISA.
#include "attention_cpu.h"

#include <cmath>
#include <limits>

namespace cabattn {
namespace {
constexpr int kLanes = 16;
}

CABATTN_VECTOR_CLONES
float row_max(const float* x, int64_t n) {
  float lanes[kLanes];
  for (int t = 0; t < kLanes; ++t) lanes[t] = -std::numeric_limits<float>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int t = 0; t < kLanes; ++t) lanes[t] = x[j + t] > lanes[t] ? x[j + t] : lanes[t];
  float best = lanes[0];
  for (int t = 1; t < kLanes; ++t) best = lanes[t] > best ? lanes[t] : best;
  for (; j < n; ++j) best = x[j] > best ? x[j] : best;
  return best;
}

double row_max(const double* x, int64_t n) {
  double best = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) best = std::max(best, x[j]);
  return best;
}

CABATTN_VECTOR_CLONES
float exp_row(float* x, int64_t visible, int64_t n, float shift) {
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= visible; j += kLanes)
    for (int t = 0; t < kLanes; ++t) {
      x[j + t] = exp_nonpositive(x[j + t] - shift);
      lanes[t] += x[j + t];
    }
  float sum = 0.0f;
  for (; j < visible; ++j) {
    x[j] = exp_nonpositive(x[j] - shift);
    sum += x[j];
  }
  for (int t = 0; t < kLanes; ++t) sum += lanes[t];
  for (; j < n; ++j) x[j] = 0.0f;
  return sum;
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
  for (int64_t j = 0; j < n; ++j) x[j] *= factor;
}

void scale_row(double* x, int64_t n, double factor) {
  for (int64_t j = 0; j < n; ++j) x[j] *= factor;
}

CABATTN_VECTOR_CLONES
void add_scaled_row(float* dst, const float* src, int64_t n, float factor) {
  for (int64_t j = 0; j < n; ++j) dst[j] += factor * src[j];
}

void add_scaled_row(double* dst, const double* src, int64_t n, double factor) {
  for (int64_t j = 0; j < n; ++j) dst[j] += factor * src[j];
}

}  // namespace cabattn
