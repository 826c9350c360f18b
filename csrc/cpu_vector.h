// The CPU kernels' vectorised row passes (exp, max, sum over logits) are written with GCC
// vector types of kLanes = 8 floats and compiled once per x86 vector ISA level: the loader picks
// the best clone the CPU has. Plain loops are not enough: GCC turns the clamp in exp_nonpositive
// into a branch and leaves the loop scalar. 8 lanes, not 16: an AVX2 clone lowers the selects
// (a < b ? a : b) of a 16-float vector lane by lane through the stack, which is slower than
// scalar code; 8 floats are one AVX2 register.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

// ISA levels, not CPU names: a clone for "arch=haswell" is only chosen on Intel Haswell-family
// CPUs (the resolver tests the CPU model), never on an AVX2 AMD EPYC. Resolving ISA levels needs
// GCC 12.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define CABATTN_VECTOR_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CABATTN_VECTOR_CLONES
#endif

// The helpers below are always inlined into the clones, so no vector value crosses a call
// boundary and GCC's note about the AVX-512 calling convention does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace cabattn {

constexpr int kLanes = 8;
typedef float vfloat __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(kLanes * sizeof(int32_t))));

// exp(x) for x <= 0 within about 2 ulp (Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, degree-6
// polynomial, 2^n from the exponent bits). Below -87 it returns exp(-87) ~ 1.6e-38 instead of
// underflowing, which no sum or maximum of probabilities can notice.
[[gnu::always_inline]] inline vfloat exp_nonpositive(vfloat x) {
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
  // A vector cast reinterprets the bits. Not std::bit_cast: unoptimised builds call it out of
  // line, and a vector passed between an AVX2 clone and a default-ISA function is corrupted.
  return p * (vfloat)exponent;
}

// The lanes of x[0 .. min(size, kLanes)); missing ones read as `fill`.
[[gnu::always_inline]] inline vfloat load_lanes(const float* x, int64_t size, float fill) {
  vfloat v;
  if (size >= kLanes) {
    std::memcpy(&v, x, sizeof(vfloat));  // a constant size: one unaligned vector load
  } else {
    v = vfloat{} + fill;
    std::memcpy(&v, x, size * sizeof(float));
  }
  return v;
}

// Writes the first min(size, kLanes) lanes of v to x.
[[gnu::always_inline]] inline void store_lanes(float* x, vfloat v, int64_t size) {
  if (size >= kLanes)
    std::memcpy(x, &v, sizeof(vfloat));
  else
    std::memcpy(x, &v, size * sizeof(float));
}

// Lanes t < count keep v, the others become 0.
[[gnu::always_inline]] inline vfloat first_lanes(vfloat v, int64_t count) {
  vint lane;
  for (int t = 0; t < kLanes; ++t) lane[t] = t;
  const int32_t n = count > kLanes ? kLanes : static_cast<int32_t>(count);
  return lane < n ? v : vfloat{};
}

[[gnu::always_inline]] inline float lanes_max(vfloat v) {
  float best = v[0];
  for (int t = 1; t < kLanes; ++t) best = v[t] > best ? v[t] : best;
  return best;
}

[[gnu::always_inline]] inline float lanes_sum(vfloat v) {
  float sum = 0.0f;
  for (int t = 0; t < kLanes; ++t) sum += v[t];
  return sum;
}

}  // namespace cabattn
