// The register micro-kernel behind qk_panels and add_pv (cpu_gemm.h), compiled per vector ISA
// level (cpu_vector.h).
#include "cpu_gemm.h"

#include <cstring>

#include "cpu_vector.h"

namespace cabattn {
namespace {

// c[r, 0:kKeyPanel] (+)= sum over d < depth of a[r * lda + d] * b[d * ldb + 0:kKeyPanel] for
// r < R, the block held in registers throughout. Each step over the depth loads one row of b
// (kKeyPanel values) once and broadcasts one value of a per row: 6 rows x 2 AVX2 vectors = 12
// accumulators, the classic AVX2 SGEMM shape.
template <int R, bool kAccumulate, typename T>
[[gnu::always_inline]] inline void micro_tile(const T* a, int64_t lda, int64_t depth, const T* b,
                                              int64_t ldb, T* c, int64_t ldc) {
  typedef T vec __attribute__((vector_size(32)));
  constexpr int kLanesPerVec = sizeof(vec) / sizeof(T);
  constexpr int kVecs = kKeyPanel / kLanesPerVec;
  // One vector per memcpy: whole-array copies make GCC bounce the registers through the stack.
  vec acc[R][kVecs];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVecs; ++v) {
      if constexpr (kAccumulate)
        std::memcpy(&acc[r][v], c + r * ldc + v * kLanesPerVec, sizeof(vec));
      else
        acc[r][v] = vec{};
    }
  for (int64_t d = 0; d < depth; ++d) {
    vec row[kVecs];
    for (int v = 0; v < kVecs; ++v)
      std::memcpy(&row[v], b + d * ldb + v * kLanesPerVec, sizeof(vec));
    for (int r = 0; r < R; ++r) {
      const vec value = a[r * lda + d] - vec{};  // broadcast (x - 0 is exactly x)
      for (int v = 0; v < kVecs; ++v) acc[r][v] += value * row[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < kVecs; ++v)
      std::memcpy(c + r * ldc + v * kLanesPerVec, &acc[r][v], sizeof(vec));
}

// The micro-kernel over `rows` rows: blocks of 6, then one block of the rest.
template <bool kAccumulate, typename T>
[[gnu::always_inline]] inline void row_tiles(const T* a, int64_t lda, int64_t rows, int64_t depth,
                                             const T* b, int64_t ldb, T* c, int64_t ldc) {
  constexpr int kRows = 6;
  int64_t r = 0;
  for (; r + kRows <= rows; r += kRows)
    micro_tile<kRows, kAccumulate>(a + r * lda, lda, depth, b, ldb, c + r * ldc, ldc);
  a += r * lda;
  c += r * ldc;
  switch (rows - r) {
    case 5: micro_tile<5, kAccumulate>(a, lda, depth, b, ldb, c, ldc); break;
    case 4: micro_tile<4, kAccumulate>(a, lda, depth, b, ldb, c, ldc); break;
    case 3: micro_tile<3, kAccumulate>(a, lda, depth, b, ldb, c, ldc); break;
    case 2: micro_tile<2, kAccumulate>(a, lda, depth, b, ldb, c, ldc); break;
    case 1: micro_tile<1, kAccumulate>(a, lda, depth, b, ldb, c, ldc); break;
    default: break;
  }
}

template <typename T>
[[gnu::always_inline]] inline void qk_panels_impl(const T* q, int64_t rows, int64_t dim,
                                                  const T* panels, int64_t count, T* logits,
                                                  int64_t ld) {
  for (int64_t p = 0; p < count; ++p)
    row_tiles<false>(q, dim, rows, dim, panels + p * dim * kKeyPanel, kKeyPanel,
                     logits + p * kKeyPanel, ld);
}

template <typename T>
[[gnu::always_inline]] inline void add_pv_impl(const T* p, int64_t rows, int64_t ld,
                                               int64_t keys, const T* v, int64_t dim, T* out) {
  const int64_t slabs_end = dim / kKeyPanel * kKeyPanel;
  for (int64_t col = 0; col < slabs_end; col += kKeyPanel)
    row_tiles<true>(p, ld, rows, keys, v + col, dim, out + col, dim);
  // Head dims that are not a multiple of kKeyPanel: the last columns one by one.
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < keys; ++j)
      for (int64_t col = slabs_end; col < dim; ++col)
        out[r * dim + col] += p[r * ld + j] * v[j * dim + col];
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
void add_pv(const float* p, int64_t rows, int64_t ld, int64_t keys, const float* v, int64_t dim,
            float* out) {
  add_pv_impl(p, rows, ld, keys, v, dim, out);
}

void add_pv(const double* p, int64_t rows, int64_t ld, int64_t keys, const double* v,
            int64_t dim, double* out) {
  add_pv_impl(p, rows, ld, keys, v, dim, out);
}

}  // namespace cabattn
