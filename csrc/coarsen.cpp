// coarsen: one representative vector per block of tokens (docs/block_statistics.md), the token of
// largest L2 norm (first on ties) or the block mean. Accumulates in double: the cost is one read of
// x, and the argmax then matches the float64 reference exactly on tie-free inputs.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "checks.h"
#include "common.h"
#include "modes.h"

namespace cabattn {
namespace {

template <typename scalar_t>
void coarsen_blocks(const scalar_t* x, scalar_t* out, int64_t heads, int64_t length,
                    int64_t dim, int64_t block_size, int64_t mode) {
  const int64_t blocks = num_blocks(length, block_size);
  at::parallel_for(0, heads * blocks, 16, [&](int64_t begin, int64_t end) {
    std::vector<double> sums(dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head = task / blocks, block = task % blocks;
      const int64_t first = block * block_size;
      const int64_t size = std::min(block_size, length - first);
      const scalar_t* tokens = x + (head * length + first) * dim;
      scalar_t* rep = out + task * dim;
      if (mode == kMean) {
        std::fill(sums.begin(), sums.end(), 0.0);
        for (int64_t t = 0; t < size; ++t)
          for (int64_t c = 0; c < dim; ++c) sums[c] += static_cast<double>(tokens[t * dim + c]);
        for (int64_t c = 0; c < dim; ++c) rep[c] = static_cast<scalar_t>(sums[c] / size);
      } else {
        int64_t best = 0;
        double best_norm = -1.0;
        for (int64_t t = 0; t < size; ++t) {
          double norm = 0.0;
          for (int64_t c = 0; c < dim; ++c) {
            const double v = static_cast<double>(tokens[t * dim + c]);
            norm += v * v;
          }
          if (norm > best_norm) {  // strict: the first maximal token wins ties
            best_norm = norm;
            best = t;
          }
        }
        std::copy(tokens + best * dim, tokens + (best + 1) * dim, rep);
      }
    }
  });
}

at::Tensor coarsen_cpu(const at::Tensor& x, int64_t block_size, int64_t mode) {
  const char* op = "cabattn::coarsen";
  check_coarsen_args(op, x, block_size, mode);
  const int64_t batch = x.size(0), heads = x.size(1), length = x.size(2), dim = x.size(3);
  at::Tensor out = at::empty({batch, heads, num_blocks(length, block_size), dim}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "coarsen", [&] {
    coarsen_blocks<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                             batch * heads, length, dim, block_size, mode);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cabattn, m) {
  m.def("coarsen(Tensor x, int block_size, int mode) -> Tensor");
}

TORCH_LIBRARY_IMPL(cabattn, CPU, m) { m.impl("coarsen", &coarsen_cpu); }

}  // namespace cabattn
