// The CPU kernels' vector code, chosen at run time per x86 vector ISA (docs/cpu_kernels.md).
//
// One source, csrc/cpu_kernels_impl.h, holds the register micro-kernel of QK^T and PV and the
// float32 row passes (exp, max, sum). Each ISA path is one translation unit that includes it
// under its own target ISA, vector width and tile shapes, and exports the result as a
// CpuKernels table: cpu_isa_avx512.cpp (16 floats per zmm register), cpu_isa_avx2.cpp (8 per
// ymm register) and cpu_isa_baseline.cpp (the build's default ISA, for CPUs without AVX2 and
// builds that are not x86-64 with GCC >= 12). cpu_kernels() picks one table per process: the
// best the CPU supports, or the one CABATTN_CPU_ISA names.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

// The AVX2 and AVX-512 paths need GCC's target pragmas and ISA-level names in
// __builtin_cpu_supports (GCC 12).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && __GNUC__ >= 12
#define CABATTN_X86_ISA_PATHS 1
#else
#define CABATTN_X86_ISA_PATHS 0
#endif

namespace cabattn {

// Keys are packed once per operator call into panels of kKeyPanel keys, each [dim][kKeyPanel]
// (key index fastest), zero-padded past the last key (pack_key_panels in cpu_gemm.h), so the
// micro-kernel reads a panel row with plain vector loads: one zmm or two ymm registers.
constexpr int64_t kKeyPanel = 16;

inline int64_t key_panels(int64_t keys) { return (keys + kKeyPanel - 1) / kKeyPanel; }

// The vector kernels of one ISA path. The GEMM entries are those of cpu_gemm.h, the row passes
// those of attention_cpu.h, row_block_stats that of block_scores.cpp.
struct CpuKernels {
  void (*qk_panels_f32)(const float* q, int64_t rows, int64_t dim, const float* panels,
                        int64_t count, float* logits, int64_t ld);
  void (*qk_panels_f64)(const double* q, int64_t rows, int64_t dim, const double* panels,
                        int64_t count, double* logits, int64_t ld);
  void (*add_pv_f32)(const float* p, int64_t rows, int64_t ld, int64_t keys, const float* v,
                     int64_t dim, float* out);
  void (*add_pv_f64)(const double* p, int64_t rows, int64_t ld, int64_t keys, const double* v,
                     int64_t dim, double* out);
  float (*row_max)(const float* x, int64_t n);
  float (*exp_row)(float* x, int64_t visible, int64_t n, float shift);
  void (*scale_row)(float* x, int64_t n, float factor);
  void (*add_scaled_row)(float* dst, const float* src, int64_t n, float factor);
  // x[j] = cap * tanh(x[j] / cap): the logit soft-cap (docs/operators.md, Model features).
  void (*softcap_row)(float* x, int64_t n, float cap);
  // For one row of `count` logits cut into blocks of block_size: each block's max m[J] and
  // s[J] = sum exp(logit - m[J]).
  void (*row_block_stats)(const float* logits, int64_t count, int64_t block_size, float* m,
                          float* s);
};

extern const CpuKernels kBaselineKernels;
#if CABATTN_X86_ISA_PATHS
extern const CpuKernels kAvx2Kernels;
extern const CpuKernels kAvx512Kernels;
#endif

// The table this process runs, chosen at the first call: CABATTN_CPU_ISA = auto (or unset:
// the best path the CPU supports), avx512, avx2 or baseline. A name that is not a path of this
// build, or a path the CPU lacks, raises an error naming the valid ones.
const CpuKernels& cpu_kernels();
// The name of the path cpu_kernels() runs.
const std::string& cpu_isa_name();
// The paths this CPU and build support, best first.
std::vector<std::string> supported_cpu_isas();

}  // namespace cabattn
