// qk_panels and add_pv (cpu_gemm.h): the register micro-kernel of the ISA path this process runs
// (cpu_kernels.h; the kernel itself is in cpu_kernels_impl.h).
#include "cpu_gemm.h"

#include "cpu_kernels.h"

namespace cabattn {

void qk_panels(const float* q, int64_t rows, int64_t dim, const float* panels, int64_t count,
               float* logits, int64_t ld) {
  cpu_kernels().qk_panels_f32(q, rows, dim, panels, count, logits, ld);
}

void qk_panels(const double* q, int64_t rows, int64_t dim, const double* panels, int64_t count,
               double* logits, int64_t ld) {
  cpu_kernels().qk_panels_f64(q, rows, dim, panels, count, logits, ld);
}

void add_pv(const float* p, int64_t rows, int64_t ld, int64_t keys, const float* v, int64_t dim,
            float* out) {
  cpu_kernels().add_pv_f32(p, rows, ld, keys, v, dim, out);
}

void add_pv(const double* p, int64_t rows, int64_t ld, int64_t keys, const double* v,
            int64_t dim, double* out) {
  cpu_kernels().add_pv_f64(p, rows, ld, keys, v, dim, out);
}

}  // namespace cabattn
