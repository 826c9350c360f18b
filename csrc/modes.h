// The integer modes the operators take, defined once: the CPU and CUDA kernels include this
// header, and cabattn._C exports kModeNames to Python (module.cpp), where cabattn.reference
// and cabattn.ops take them.
#pragma once

#include <cstdint>

namespace cabattn {

// coarsen(mode): a block's representative is its largest-L2 token, or its mean.
constexpr int64_t kMaxL2 = 0, kMean = 1;
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

}  // namespace cabattn
