// Row passes of the CPU attention engine (attention_cpu.h). The float32 versions are the
// non-GEMM cost of attention: they run the vector code of the process's ISA path
// (cpu_kernels.h); the float64 ones, for reference runs, are plain loops.
#include "attention_cpu.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "cpu_kernels.h"

namespace cabattn {

float row_max(const float* x, int64_t n) { return cpu_kernels().row_max(x, n); }

double row_max(const double* x, int64_t n) {
  double best = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) best = std::max(best, x[j]);
  return best;
}

float exp_row(float* x, int64_t visible, int64_t n, float shift) {
  return cpu_kernels().exp_row(x, visible, n, shift);
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

void scale_row(float* x, int64_t n, float factor) { cpu_kernels().scale_row(x, n, factor); }

void scale_row(double* x, int64_t n, double factor) {
  for (int64_t j = 0; j < n; ++j) x[j] *= factor;
}

void add_scaled_row(float* dst, const float* src, int64_t n, float factor) {
  cpu_kernels().add_scaled_row(dst, src, n, factor);
}

void add_scaled_row(double* dst, const double* src, int64_t n, double factor) {
  for (int64_t j = 0; j < n; ++j) dst[j] += factor * src[j];
}

void softcap_row(float* x, int64_t n, float cap) { cpu_kernels().softcap_row(x, n, cap); }

void softcap_row(double* x, int64_t n, double cap) {
  for (int64_t j = 0; j < n; ++j) x[j] = cap * std::tanh(x[j] / cap);
}

}  // namespace cabattn
