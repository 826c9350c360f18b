// The integer modes the operators take, defined once: the CPU and CUDA kernels include this
// header, and cabattn._C exports kModeNames to Python (module.cpp), where cabattn.reference
// and cabattn.ops take them.
#pragma once

#include <cstdint>
#include <limits>

namespace cabattn {

// coarsen(mode): a block's representative is its largest-L2 token, or its mean.
constexpr int64_t kMaxL2 = 0, kMean = 1;
// MAX_L2 picks, per block, the first token whose squared L2 norm (summed in double) is within
// a relative tolerance of the block's largest: n_t >= (1 - tol) * max_t n_t. The tolerance
// depends on the input dtype: wide enough that tokens of mathematically equal norm (a repeated
// token under RoPE) fall inside whatever rounding produced them, so the rounding of the inputs
// and the summation order never pick the representative (docs/block_statistics.md,
// Coarsening, has the measurements behind each value).
constexpr double kMaxL2ToleranceFloat64 = 1e-9;
constexpr double kMaxL2ToleranceFloat32 = 1e-4;
constexpr double kMaxL2ToleranceHalf = 4e-3;
constexpr double kMaxL2ToleranceBFloat16 = 2.5e-2;

// The tolerance of inputs of type T, told apart by their significand bits (53, 24, 11, 8).
template <typename T>
constexpr double max_l2_tolerance() {
  constexpr int digits = std::numeric_limits<T>::digits;
  static_assert(digits == 53 || digits == 24 || digits == 11 || digits == 8,
                "max_l2_tolerance: an input type other than float64/32/16 or bfloat16");
  return digits == 53 ? kMaxL2ToleranceFloat64
         : digits == 24 ? kMaxL2ToleranceFloat32
         : digits == 11 ? kMaxL2ToleranceHalf
                        : kMaxL2ToleranceBFloat16;
}

// frc_scores(formula): how the 2-hop redundancy corrects the direct affinity.
constexpr int64_t kAdditive = 0, kMultiplicative = 1;
// frc_scores(normalization): min-max normalise the affinity per row or per head.
constexpr int64_t kRowMinmax = 0, kGlobalMinmax = 1;

struct ModeName {
  const char* python_name;
  int64_t value;
};

inline constexpr ModeName kModeNames[] = {
    {"MAX_L2", kMaxL2},       {"MEAN", kMean},
    {"ADDITIVE", kAdditive},  {"MULTIPLICATIVE", kMultiplicative},
    {"ROW_MINMAX", kRowMinmax}, {"GLOBAL_MINMAX", kGlobalMinmax},
};

struct ToleranceName {
  const char* python_name;
  double value;
};

// Exported as cabattn._C.MAX_L2_TOLERANCE_<dtype>, the names of torch's dtypes.
inline constexpr ToleranceName kToleranceNames[] = {
    {"MAX_L2_TOLERANCE_FLOAT64", kMaxL2ToleranceFloat64},
    {"MAX_L2_TOLERANCE_FLOAT32", kMaxL2ToleranceFloat32},
    {"MAX_L2_TOLERANCE_FLOAT16", kMaxL2ToleranceHalf},
    {"MAX_L2_TOLERANCE_BFLOAT16", kMaxL2ToleranceBFloat16},
};

}  // namespace cabattn
