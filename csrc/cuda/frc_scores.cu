// CUDA path of cabattn::frc_scores (docs/block_statistics.md). The two matrix products (R = Qc Kc^T
// and T = A A) go through ATen's batched matmul; the min-max normalisation and the curvature are
// our kernels. Everything runs in float64, like the reference: the matrices are only M x M (M ~
// 64..256 blocks) per head, and float64 keeps the products clear of TF32 (which a caller's
// torch.set_float32_matmul_precision could switch on) and of near-ties that would change the
// selection.
#include "cuda_common.cuh"
#include "modes.h"

#include <limits>

namespace cabattn {
namespace cuda {
namespace {

constexpr const char* kOp = "cabattn::frc_scores";
constexpr double kEps = 1e-8;
constexpr int kThreads = 256;

__device__ __forceinline__ double warp_min(double x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    x = fmin(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ double warp_max(double x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2)
    x = fmax(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Row-wise min-max over the causal part J <= I, one warp per row of [rows, M]; in place.
__global__ void __launch_bounds__(kThreads)
row_minmax_kernel(double* __restrict__ r, int64_t rows, int64_t M) {
  const int64_t row = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const int64_t I = row % M;
  double* values = r + row * M;
  double lo = INFINITY, hi = -INFINITY;
  for (int64_t J = lane; J <= I; J += 32) {
    lo = fmin(lo, values[J]);
    hi = fmax(hi, values[J]);
  }
  lo = warp_min(lo);
  hi = warp_max(hi);
  const double denom = hi - lo + kEps;
  for (int64_t J = lane; J < M; J += 32) values[J] = J <= I ? (values[J] - lo) / denom : 0.0;
}

// Min-max over all causal entries of one head's [M, M] matrix, one thread block per head.
__global__ void __launch_bounds__(kThreads)
global_minmax_kernel(double* __restrict__ r, int64_t M) {
  __shared__ double lo_of_warp[kThreads / 32], hi_of_warp[kThreads / 32];
  double* values = r + int64_t(blockIdx.x) * M * M;
  double lo = INFINITY, hi = -INFINITY;
  for (int64_t e = threadIdx.x; e < M * M; e += kThreads) {
    if (e % M <= e / M) {
      lo = fmin(lo, values[e]);
      hi = fmax(hi, values[e]);
    }
  }
  lo = warp_min(lo);
  hi = warp_max(hi);
  if (threadIdx.x % 32 == 0) {
    lo_of_warp[threadIdx.x / 32] = lo;
    hi_of_warp[threadIdx.x / 32] = hi;
  }
  __syncthreads();
  lo = INFINITY;
  hi = -INFINITY;
  for (int w = 0; w < kThreads / 32; ++w) {
    lo = fmin(lo, lo_of_warp[w]);
    hi = fmax(hi, hi_of_warp[w]);
  }
  const double denom = hi - lo + kEps;
  for (int64_t e = threadIdx.x; e < M * M; e += kThreads)
    values[e] = e % M <= e / M ? (values[e] - lo) / denom : 0.0;
}

// F from A and T = A @ A, 0 above the diagonal.
template <bool kMultiplicativeFormula>
__global__ void __launch_bounds__(kThreads)
curvature_kernel(const double* __restrict__ a, const double* __restrict__ t,
                 float* __restrict__ f, int64_t total, int64_t M, double lam) {
  const int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (e >= total) return;
  const int64_t I = (e / M) % M, J = e % M;
  double value = 0.0;
  if (J <= I) {
    value = kMultiplicativeFormula ? a[e] / (1.0 + lam * t[e] / (a[e] + kEps))
                                   : a[e] - lam * t[e] / double(I + 1);
  }
  f[e] = static_cast<float>(value);
}

unsigned grid_for(int64_t units, int64_t per_block) {
  const int64_t grid = (units + per_block - 1) / per_block;
  TORCH_CHECK(grid <= std::numeric_limits<int>::max(), kOp, ": input too large");
  return static_cast<unsigned>(grid);
}

at::Tensor frc_scores_cuda(const at::Tensor& qc, const at::Tensor& kc, double scale, double lam,
                           int64_t formula, int64_t normalization) {
  check_frc_scores_args(kOp, qc, kc, scale, lam, formula, normalization);
  check_cuda(kOp, "qc", qc);

  const at::cuda::CUDAGuard guard(qc.device());
  const int64_t batch = qc.size(0), q_heads = qc.size(1), M = qc.size(2), dim = qc.size(3);
  const int64_t kv_heads = kc.size(1), group = q_heads / kv_heads;
  auto f = at::empty({batch, q_heads, M, M}, qc.options().dtype(at::kFloat));
  if (f.numel() == 0) return f;

  // Query head h reads KV head h / group: view the group's query heads as one taller matrix
  // instead of repeating the keys.
  auto qd = qc.to(at::kDouble).view({batch, kv_heads, group * M, dim});
  auto kd = kc.to(at::kDouble);
  auto a = at::matmul(qd, kd.transpose(-1, -2)).mul_(scale).view({batch, q_heads, M, M});
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (normalization == kRowMinmax) {
    const int64_t rows = batch * q_heads * M;
    launch_kernel(kOp, row_minmax_kernel, grid_for(rows, kThreads / 32), kThreads, 0, stream,
                  a.data_ptr<double>(), rows, M);
  } else {
    launch_kernel(kOp, global_minmax_kernel, grid_for(batch * q_heads, 1), kThreads, 0, stream,
                  a.data_ptr<double>(), M);
  }

  auto t = at::matmul(a, a);
  const int64_t total = f.numel();
  auto curvature = formula == kMultiplicative ? curvature_kernel<true> : curvature_kernel<false>;
  launch_kernel(kOp, curvature, grid_for(total, kThreads), kThreads, 0, stream,
                a.data_ptr<double>(), t.data_ptr<double>(), f.data_ptr<float>(), total, M, lam);
  return f;
}

}  // namespace
}  // namespace cuda
}  // namespace cabattn

TORCH_LIBRARY_IMPL(CABATTN_CUDA_LIBRARY, CABATTN_CUDA_KEY, m) {
  m.impl("frc_scores", &cabattn::cuda::frc_scores_cuda);
}
