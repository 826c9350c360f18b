// CUDA kernel of cabattn::coarsen (docs/block_statistics.md): one warp per (batch, head, block)
// picks the block's largest-L2 token (first on ties) or averages the block.
#include "cuda_common.cuh"
#include "modes.h"

#include <limits>

namespace cabattn {
namespace cuda {
namespace {

constexpr const char* kOp = "cabattn::coarsen";
constexpr int kWarpsPerBlock = 4;

template <typename T, bool kMeanMode>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
coarsen_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t groups, int64_t length,
               int64_t dim, int block_size, int64_t num_blocks) {
  const int64_t unit = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (unit >= groups * num_blocks) return;
  const int lane = threadIdx.x % 32;
  const int64_t group = unit / num_blocks, block = unit % num_blocks;
  const int64_t first = block * block_size;
  const int64_t last = min(first + block_size, length);
  const T* rows = x + group * length * dim;
  T* dst = out + unit * dim;

  if (kMeanMode) {
    // Summed in double like the CPU kernel: a float32 sum of 128 tokens one by one loses
    // about sqrt(128) roundings, more than the reference's pairwise float32 sum.
    const double count = static_cast<double>(last - first);
    for (int64_t c = lane; c < dim; c += 32) {
      double sum = 0.0;
      for (int64_t t = first; t < last; ++t) sum += static_cast<double>(rows[t * dim + c]);
      dst[c] = static_cast<T>(sum / count);
    }
    return;
  }
  // Squared norms in double, like the reference, so near-equal norms order the same way.
  int64_t best = first;
  double best_norm = -1.0;
  for (int64_t t = first; t < last; ++t) {
    double norm = 0.0;
    for (int64_t c = lane; c < dim; c += 32) {
      const double value = static_cast<double>(static_cast<float>(rows[t * dim + c]));
      norm += value * value;
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2)
      norm += __shfl_xor_sync(0xffffffffu, norm, offset);
    if (norm > best_norm) {  // strict: the first maximal token wins
      best_norm = norm;
      best = t;
    }
  }
  for (int64_t c = lane; c < dim; c += 32) dst[c] = rows[best * dim + c];
}

at::Tensor coarsen_cuda(const at::Tensor& x, int64_t block_size, int64_t mode) {
  check_coarsen_args(kOp, x, block_size, mode);
  check_cuda(kOp, "x", x);

  const at::cuda::CUDAGuard guard(x.device());
  const int64_t length = x.size(2), dim = x.size(3);
  const int64_t blocks = num_blocks(length, block_size);
  auto out = at::empty({x.size(0), x.size(1), blocks, dim}, x.options());
  if (out.numel() == 0) return out;

  const int64_t groups = x.size(0) * x.size(1);
  const int64_t units = groups * blocks;
  const int64_t grid = (units + kWarpsPerBlock - 1) / kWarpsPerBlock;
  TORCH_CHECK(grid <= std::numeric_limits<int>::max(), kOp, ": input too large (", units,
              " blocks)");
  const auto stream = at::cuda::getCurrentCUDAStream();
  CABATTN_DISPATCH_ATTENTION_TYPES(x.scalar_type(), kOp, [&] {
    auto kernel = mode == kMean ? coarsen_kernel<scalar_t, true> : coarsen_kernel<scalar_t, false>;
    launch_kernel(kOp, kernel, static_cast<unsigned>(grid), kWarpsPerBlock * 32, 0, stream,
                  x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), groups, length, dim,
                  static_cast<int>(block_size), blocks);
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace cabattn

TORCH_LIBRARY_IMPL(CABATTN_CUDA_LIBRARY, CABATTN_CUDA_KEY, m) {
  m.impl("coarsen", &cabattn::cuda::coarsen_cuda);
}
