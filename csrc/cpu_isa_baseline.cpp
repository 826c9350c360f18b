// The baseline path of the CPU kernels (docs/cpu_kernels.md): the build's default ISA (SSE2 on
// x86-64, or whatever the compiler targets elsewhere), 4 floats per vector. Used on CPUs
// without AVX2, by builds without the x86 paths, and on request (CABATTN_CPU_ISA=baseline).
#include "cpu_kernels_impl.h"

namespace cabattn {
namespace {

// 16 xmm registers: 3 rows x 1 key panel (4 vectors) = 12 accumulators.
struct Baseline {
  static constexpr int kVectorBytes = 16;
  static constexpr vector_kernels::TileShape kQkTile{3, 1}, kPvTile{3, 1};
};

}  // namespace

constinit const CpuKernels kBaselineKernels = vector_kernels::kernels_for<Baseline>();

}  // namespace cabattn
