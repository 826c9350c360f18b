// The vector code of the CPU kernels, written once for every ISA path (cpu_kernels.h,
// docs/cpu_kernels.md): the register micro-kernel behind qk_panels and add_pv (cpu_gemm.h) and
// the float32 row passes (attention_cpu.h, block_scores.cpp).
//
// A path's translation unit (cpu_isa_*.cpp) may define CABATTN_ISA_TARGET, the GCC target its
// copy is compiled for (e.g. "arch=x86-64-v4"; undefined: the build's default ISA), includes
// this header once, and instantiates kernels_for<Isa>() with a struct Isa that gives
//   kVectorBytes      the width of one vector register: 64 (zmm) or 32 (ymm);
//   kQkTile, kPvTile  the float32 register tiles of QK^T and PV (rows x key panels, micro_tile).
// Everything here is in an anonymous namespace: each path's copy has internal linkage, so the
// linker never hands one path's instantiation (AVX-512 code) to another path's caller. The
// standard headers come before the target pragma, so library code keeps the default ISA.
//
// Written with GCC vector types, not intrinsics: the same source then compiles for 8 and 16
// lanes. Plain loops are not enough: GCC turns the clamp in exp_nonpositive into a branch and
// leaves the loop scalar.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "cpu_kernels.h"

// No vector value crosses a call boundary between paths (the helpers are always inlined, the
// tables hold pointer-and-integer signatures), so GCC's note on the AVX-512 calling convention
// does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

#ifdef CABATTN_ISA_TARGET
#define CABATTN_PRAGMA(text) _Pragma(#text)
#define CABATTN_TARGET_PRAGMA(isa) CABATTN_PRAGMA(GCC target(isa))
#pragma GCC push_options
CABATTN_TARGET_PRAGMA(CABATTN_ISA_TARGET)
#endif

namespace cabattn::vector_kernels {
namespace {

struct TileShape {
  int rows;
  int panels;
};

// float64 runs exist for reference checks only: one small tile that fits 16 registers.
constexpr TileShape kFloat64Tile{3, 1};

template <typename T, int kBytes>
struct Vector {
  typedef T type __attribute__((vector_size(kBytes)));
};

// ------------------------------------------------------------------------------ micro-kernel

// c[r, 0 : P * kKeyPanel] (+)= sum over d < depth of a[r * lda + d] * row d of B, for r < R,
// where B is P panels of kKeyPanel columns side by side: panel p's row d at
// b + p * panel_stride + d * ldb. The R x P panel block of c stays in registers throughout
// (R * P * kKeyPanel / lanes accumulators): each step over the depth loads the P panel rows
// once and broadcasts one value of a per row.
template <int kBytes, int R, int P, bool kAccumulate, typename T>
[[gnu::always_inline]] inline void micro_tile(const T* a, int64_t lda, int64_t depth, const T* b,
                                              int64_t ldb, int64_t panel_stride, T* c,
                                              int64_t ldc) {
  using vec = typename Vector<T, kBytes>::type;
  constexpr int kLanes = kBytes / sizeof(T);
  static_assert(kKeyPanel % kLanes == 0, "a key panel is a whole number of vectors");
  constexpr int kPanelVecs = kKeyPanel / kLanes;
  constexpr int kVecs = P * kPanelVecs;  // per row; column i * kLanes of c is vector i
  // One vector per memcpy: whole-array copies make GCC bounce the registers through the stack.
  vec acc[R][kVecs];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < kVecs; ++i) {
      if constexpr (kAccumulate)
        std::memcpy(&acc[r][i], c + r * ldc + i * kLanes, sizeof(vec));
      else
        acc[r][i] = vec{};
    }
  for (int64_t d = 0; d < depth; ++d) {
    vec row[kVecs];
    for (int p = 0; p < P; ++p)
      for (int v = 0; v < kPanelVecs; ++v)
        std::memcpy(&row[p * kPanelVecs + v], b + p * panel_stride + d * ldb + v * kLanes,
                    sizeof(vec));
    for (int r = 0; r < R; ++r) {
      const vec value = a[r * lda + d] - vec{};  // broadcast (x - 0 is exactly x)
      for (int i = 0; i < kVecs; ++i) acc[r][i] += value * row[i];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < kVecs; ++i)
      std::memcpy(c + r * ldc + i * kLanes, &acc[r][i], sizeof(vec));
}

// The last rows < R of a panel group, in one tile of exactly that many rows.
template <int kBytes, int R, int P, bool kAccumulate, typename T>
[[gnu::always_inline]] inline void last_rows(int64_t rows, const T* a, int64_t lda,
                                             int64_t depth, const T* b, int64_t ldb,
                                             int64_t panel_stride, T* c, int64_t ldc) {
  if constexpr (R > 0) {
    if (rows == R)
      micro_tile<kBytes, R, P, kAccumulate>(a, lda, depth, b, ldb, panel_stride, c, ldc);
    else
      last_rows<kBytes, R - 1, P, kAccumulate>(rows, a, lda, depth, b, ldb, panel_stride, c,
                                              ldc);
  }
}

// c[rows, panels * kKeyPanel] (+)= a[rows, depth] B[depth, panels * kKeyPanel] (B as in
// micro_tile) in R x P tiles: panel groups outside (a group's panel rows stay in L1 while every
// row tile reads them), then the last panels in narrower tiles.
template <int kBytes, int R, int P, bool kAccumulate, typename T>
void gemm_panels(const T* a, int64_t lda, int64_t rows, int64_t depth, const T* b, int64_t ldb,
                 int64_t panel_stride, int64_t panels, T* c, int64_t ldc) {
  int64_t p = 0;
  for (; p + P <= panels; p += P) {
    const T* group = b + p * panel_stride;
    T* out = c + p * kKeyPanel;
    int64_t r = 0;
    for (; r + R <= rows; r += R)
      micro_tile<kBytes, R, P, kAccumulate>(a + r * lda, lda, depth, group, ldb, panel_stride,
                                            out + r * ldc, ldc);
    last_rows<kBytes, R - 1, P, kAccumulate>(rows - r, a + r * lda, lda, depth, group, ldb,
                                            panel_stride, out + r * ldc, ldc);
  }
  if constexpr (P > 1) {
    if (p < panels)
      gemm_panels<kBytes, R, P - 1, kAccumulate>(a, lda, rows, depth, b + p * panel_stride, ldb,
                                                 panel_stride, panels - p, c + p * kKeyPanel,
                                                 ldc);
  }
}

template <typename T>
constexpr TileShape tile_for(TileShape float_tile) {
  return std::is_same_v<T, float> ? float_tile : kFloat64Tile;
}

// logits[r, j] = q[r, :] . key j (cpu_gemm.h, qk_panels).
template <class Isa, typename T>
void qk_panels(const T* q, int64_t rows, int64_t dim, const T* panels, int64_t count, T* logits,
               int64_t ld) {
  constexpr TileShape tile = tile_for<T>(Isa::kQkTile);
  gemm_panels<Isa::kVectorBytes, tile.rows, tile.panels, false>(
      q, dim, rows, dim, panels, kKeyPanel, dim * kKeyPanel, count, logits, ld);
}

// out[r, :] += sum over j of p[r, j] * v[j, :] (cpu_gemm.h, add_pv): V's columns in slabs of
// kKeyPanel are the panels, one column apart; head dims that are not a multiple of kKeyPanel
// do their last columns one by one.
template <class Isa, typename T>
void add_pv(const T* p, int64_t rows, int64_t ld, int64_t keys, const T* v, int64_t dim,
            T* out) {
  constexpr TileShape tile = tile_for<T>(Isa::kPvTile);
  const int64_t slabs = dim / kKeyPanel;
  gemm_panels<Isa::kVectorBytes, tile.rows, tile.panels, true>(p, ld, rows, keys, v, dim,
                                                               kKeyPanel, slabs, out, dim);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < keys; ++j)
      for (int64_t col = slabs * kKeyPanel; col < dim; ++col)
        out[r * dim + col] += p[r * ld + j] * v[j * dim + col];
}

// --------------------------------------------------------------------------- float32 lanes

// Vectors of kBytes / 4 floats and the helpers the row passes share.
template <int kBytes>
struct Lanes {
  static constexpr int kCount = kBytes / sizeof(float);
  typedef typename Vector<float, kBytes>::type vfloat;
  typedef typename Vector<int32_t, kBytes>::type vint;

  // exp(x) for x <= 0 within about 2 ulp (Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, degree-6
  // polynomial, 2^n from the exponent bits). Below -87 it returns exp(-87) ~ 1.6e-38 instead
  // of underflowing, which no sum or maximum of probabilities can notice.
  [[gnu::always_inline]] static vfloat exp_nonpositive(vfloat x) {
    const vfloat floor_x = vfloat{} - 87.0f;
    x = x < floor_x ? floor_x : x;
    const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const vfloat n = (x * 1.44269504088896341f + round_magic) - round_magic;
    const vfloat r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    vfloat p = vfloat{} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const vint exponent = (__builtin_convertvector(n, vint) + 127) << 23;
    return p * (vfloat)exponent;  // a vector cast reinterprets the bits
  }

  // tanh(x) within a few ulp (Cephes tanhf): an odd polynomial for |x| < 0.625, where
  // 1 - exp(-2|x|) would cancel, else (1 - e) / (1 + e) with e = exp(-2|x|) <= 1, signed.
  [[gnu::always_inline]] static vfloat tanh(vfloat x) {
    const vfloat magnitude = x < 0.0f ? -x : x;
    const vfloat z = x * x;
    vfloat poly = vfloat{} - 5.70498872745e-3f;
    poly = poly * z + 2.06390887954e-2f;
    poly = poly * z - 5.37397155531e-2f;
    poly = poly * z + 1.33314422036e-1f;
    poly = poly * z - 3.33332819422e-1f;
    const vfloat small = poly * z * x + x;
    const vfloat e = exp_nonpositive(magnitude * -2.0f);
    const vfloat large = (1.0f - e) / (1.0f + e);
    return magnitude < 0.625f ? small : (x < 0.0f ? -large : large);
  }

  // The lanes of x[0 .. min(size, kCount)); missing ones read as `fill`. The partial vector at
  // a row's end is built in memory out of line, so the full vectors stay in registers.
  [[gnu::always_inline]] static vfloat load(const float* x, int64_t size, float fill) {
    if (size < kCount) return load_partial(x, size, fill);
    vfloat v;
    std::memcpy(&v, x, sizeof(vfloat));  // a constant size: one unaligned vector load
    return v;
  }

  [[gnu::noinline, gnu::cold]] static vfloat load_partial(const float* x, int64_t size,
                                                          float fill) {
    vfloat v = vfloat{} + fill;
    std::memcpy(&v, x, size * sizeof(float));
    return v;
  }

  // Writes the first min(size, kCount) lanes of v to x.
  [[gnu::always_inline]] static void store(float* x, vfloat v, int64_t size) {
    if (size < kCount)
      store_partial(x, v, size);
    else
      std::memcpy(x, &v, sizeof(vfloat));
  }

  [[gnu::noinline, gnu::cold]] static void store_partial(float* x, vfloat v, int64_t size) {
    std::memcpy(x, &v, size * sizeof(float));
  }

  // Lanes t < count keep v, the others become 0.
  [[gnu::always_inline]] static vfloat first(vfloat v, int64_t count) {
    vint lane;
    for (int t = 0; t < kCount; ++t) lane[t] = t;
    const int32_t n = count > kCount ? kCount : static_cast<int32_t>(count);
    return lane < n ? v : vfloat{};
  }

  [[gnu::always_inline]] static float max(vfloat v) {
    return reduce<kCount>(v, [](auto a, auto b) { return a > b ? a : b; });
  }

  [[gnu::always_inline]] static float sum(vfloat v) {
    return reduce<kCount>(v, [](auto a, auto b) { return a + b; });
  }

  // Halves the vector until one lane is left (log2 steps, not one per lane: block_scores
  // reduces two vectors per key block of every row). The halves are register shuffles: halves
  // taken through memory would keep the caller's accumulator in memory for its whole loop.
  template <int N, typename Op>
  [[gnu::always_inline]] static float reduce(typename Vector<float, N * sizeof(float)>::type v,
                                             Op op) {
    if constexpr (N == 1) {
      return v[0];
    } else {
      return reduce<N / 2>(op(low_half(v, std::make_index_sequence<N / 2>()),
                              high_half(v, std::make_index_sequence<N / 2>())),
                           op);
    }
  }

  template <typename V, size_t... kLane>
  [[gnu::always_inline]] static auto low_half(V v, std::index_sequence<kLane...>) {
    return __builtin_shufflevector(v, v, kLane...);
  }

  template <typename V, size_t... kLane>
  [[gnu::always_inline]] static auto high_half(V v, std::index_sequence<kLane...>) {
    return __builtin_shufflevector(v, v, (kLane + sizeof...(kLane))...);
  }
};

// ------------------------------------------------------------------------ float32 row passes

template <class Isa>
float row_max(const float* x, int64_t n) {
  using L = Lanes<Isa::kVectorBytes>;
  constexpr float lowest = -std::numeric_limits<float>::infinity();
  typename L::vfloat best = typename L::vfloat{} + lowest;
  for (int64_t j = 0; j < n; j += L::kCount) {
    const typename L::vfloat v = L::load(x + j, n - j, lowest);
    best = v > best ? v : best;
  }
  return L::max(best);
}

template <class Isa>
float exp_row(float* x, int64_t visible, int64_t n, float shift) {
  using L = Lanes<Isa::kVectorBytes>;
  typename L::vfloat sum = {};
  int64_t j = 0;
  for (; j < visible; j += L::kCount) {
    // Lanes at or past `visible` are masked keys: they become 0 (their logits may exceed the
    // shift, so their exp is not computed to be used).
    const typename L::vfloat e =
        L::first(L::exp_nonpositive(L::load(x + j, n - j, 0.0f) - shift), visible - j);
    L::store(x + j, e, n - j);
    sum += e;
  }
  if (j < n) std::memset(x + j, 0, (n - j) * sizeof(float));
  return L::sum(sum);
}

template <class Isa>
void scale_row(float* x, int64_t n, float factor) {
  using L = Lanes<Isa::kVectorBytes>;
  for (int64_t j = 0; j < n; j += L::kCount)
    L::store(x + j, L::load(x + j, n - j, 0.0f) * factor, n - j);
}

template <class Isa>
void add_scaled_row(float* dst, const float* src, int64_t n, float factor) {
  using L = Lanes<Isa::kVectorBytes>;
  for (int64_t j = 0; j < n; j += L::kCount)
    L::store(dst + j, L::load(dst + j, n - j, 0.0f) + factor * L::load(src + j, n - j, 0.0f),
             n - j);
}

template <class Isa>
void softcap_row(float* x, int64_t n, float cap) {
  using L = Lanes<Isa::kVectorBytes>;
  const float inverse = 1.0f / cap;
  for (int64_t j = 0; j < n; j += L::kCount)
    L::store(x + j, cap * L::tanh(L::load(x + j, n - j, 0.0f) * inverse), n - j);
}

template <class Isa>
void row_block_stats(const float* logits, int64_t count, int64_t block_size, float* m,
                     float* s) {
  using L = Lanes<Isa::kVectorBytes>;
  constexpr float lowest = -std::numeric_limits<float>::infinity();
  for (int64_t start = 0, block = 0; start < count; start += block_size, ++block) {
    const int64_t size = std::min(block_size, count - start);
    const float* x = logits + start;
    typename L::vfloat lane_max = typename L::vfloat{} + lowest;
    for (int64_t j = 0; j < size; j += L::kCount) {
      const typename L::vfloat v = L::load(x + j, size - j, lowest);
      lane_max = v > lane_max ? v : lane_max;
    }
    const float block_max = L::max(lane_max);
    typename L::vfloat lane_sum = {};
    for (int64_t j = 0; j < size; j += L::kCount)
      lane_sum += L::first(L::exp_nonpositive(L::load(x + j, size - j, lowest) - block_max),
                           size - j);
    m[block] = block_max;
    s[block] = L::sum(lane_sum);
  }
}

template <class Isa>
constexpr CpuKernels kernels_for() {
  return {&qk_panels<Isa, float>, &qk_panels<Isa, double>, &add_pv<Isa, float>,
          &add_pv<Isa, double>,   &row_max<Isa>,           &exp_row<Isa>,
          &scale_row<Isa>,        &add_scaled_row<Isa>,    &softcap_row<Isa>,
          &row_block_stats<Isa>};
}

}  // namespace
}  // namespace cabattn::vector_kernels

#ifdef CABATTN_ISA_TARGET
#pragma GCC pop_options
#endif
