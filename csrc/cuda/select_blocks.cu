// CUDA kernel of cabattn::select_blocks: one thread block per (batch, head, query-block row).
// The row's forced blocks (diagonal, recent, sink) are marked in shared memory; each top-k
// picks the n best free candidates by a bitonic sort of (score descending, index ascending)
// in shared memory, so ties go to the lower index exactly as in the reference; a warp ballot
// then writes the kept blocks as a sorted, -1 padded CSR row.
#include "cuda_common.cuh"

#include <limits>

namespace cabattn {
namespace cuda {
namespace {

constexpr const char* kOp = "cabattn::select_blocks";
constexpr int kThreads = 256;

struct SelectParams {
  int64_t heads, num_blocks;
  int64_t count_rows;  // rows of the counts: 1, heads or batch * heads (checks.h)
  int shift, max_count, sort_size;  // sort_size: num_blocks rounded up to a power of two
};

__device__ __forceinline__ bool ranks_before(double value_a, int index_a, double value_b,
                                             int index_b) {
  if (index_a < 0) return false;  // non-candidates sort last
  if (index_b < 0) return true;
  return value_a > value_b || (value_a == value_b && index_a < index_b);
}

// Marks in `kept` the n best candidates of `scores` (a row of M values) among columns 0..src
// not yet kept.
template <typename S>
__device__ void keep_top(const S* scores, int n, int src, int M, int sort_size,
                         unsigned char* kept, double* values, int* indices) {
  int free = 0;
  for (int base = 0; base < M; base += kThreads) {
    const int j = base + threadIdx.x;
    free += __syncthreads_count(j < M && j <= src && !kept[j]);
  }
  n = min(n, free);
  if (n <= 0) return;
  for (int j = threadIdx.x; j < sort_size; j += kThreads) {
    const bool candidate = j < M && j <= src && !kept[j];
    const double value = candidate ? static_cast<double>(scores[j]) : 0.0;
    // NaN ranks lowest, as -inf (reference.select_blocks): a NaN compares neither before nor
    // after anything, which would break the sort.
    values[j] = isnan(value) ? -INFINITY : value;
    indices[j] = candidate ? j : -1;
  }
  __syncthreads();
  for (int size = 2; size <= sort_size; size *= 2) {
    for (int stride = size / 2; stride > 0; stride /= 2) {
      for (int i = threadIdx.x; i < sort_size; i += kThreads) {
        const int partner = i ^ stride;
        if (partner <= i) continue;
        const bool ascending = (i & size) == 0;
        const bool swap = ascending
                              ? ranks_before(values[partner], indices[partner], values[i],
                                             indices[i])
                              : ranks_before(values[i], indices[i], values[partner],
                                             indices[partner]);
        if (swap) {
          const double v = values[i];
          values[i] = values[partner];
          values[partner] = v;
          const int x = indices[i];
          indices[i] = indices[partner];
          indices[partner] = x;
        }
      }
      __syncthreads();
    }
  }
  for (int r = threadIdx.x; r < n; r += kThreads) kept[indices[r]] = 1;
  __syncthreads();
}

template <typename S>
__global__ void __launch_bounds__(kThreads)
select_blocks_kernel(const S* __restrict__ score1, const S* __restrict__ score2,
                     const int* __restrict__ n_recent, const int* __restrict__ n_sink,
                     const int* __restrict__ n_score1, const int* __restrict__ n_score2,
                     int* __restrict__ block_count, int* __restrict__ block_index,
                     int* __restrict__ bad, SelectParams p) {
  extern __shared__ __align__(16) char smem[];
  const int M = static_cast<int>(p.num_blocks);
  double* values = reinterpret_cast<double*>(smem);
  int* indices = reinterpret_cast<int*>(values + p.sort_size);
  unsigned char* kept = reinterpret_cast<unsigned char*>(indices + p.sort_size);

  const int row = blockIdx.x;
  const int64_t bh = int64_t(blockIdx.z) * p.heads + blockIdx.y;
  const int src = row - p.shift;
  const int64_t counts_at = (bh % p.count_rows) * M + row;
  const int recent = n_recent[counts_at], sink = n_sink[counts_at];
  const S* rows[2] = {score1, score2};
  const int wanted[2] = {n_score1[counts_at], n_score2[counts_at]};
  // The counts check_select_blocks_values rejects: negative ones, picks by a missing score.
  if (threadIdx.x == 0 && (recent < 0 || sink < 0 || wanted[0] < 0 || wanted[1] < 0 ||
                           (wanted[0] > 0 && score1 == nullptr) ||
                           (wanted[1] > 0 && score2 == nullptr)))
    atomicOr(bad, 1);
  for (int j = threadIdx.x; j < M; j += kThreads) {
    const bool eligible = src >= 0 && j <= src;
    kept[j] = j == row || (eligible && (j > src - recent || j < sink));
  }
  __syncthreads();

  if (src >= 0) {
    for (int s = 0; s < 2; ++s) {
      if (wanted[s] <= 0 || rows[s] == nullptr) continue;
      keep_top(rows[s] + (bh * M + src) * int64_t(M), wanted[s], src, M, p.sort_size, kept,
               values, indices);
    }
  }

  // Warp 0 writes the kept columns in ascending order.
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int* out = block_index + (bh * M + row) * int64_t(p.max_count);
    int count = 0;
    for (int base = 0; base < M; base += 32) {
      const int j = base + lane;
      const bool keep = j < M && kept[j];
      const unsigned ballot = __ballot_sync(0xffffffffu, keep);
      const int slot = count + __popc(ballot & ((1u << lane) - 1u));
      if (keep && slot < p.max_count) out[slot] = j;
      count += __popc(ballot);
    }
    for (int slot = count + lane; slot < p.max_count; slot += 32) out[slot] = -1;
    if (lane == 0) {
      block_count[bh * M + row] = min(count, p.max_count);
      if (count > p.max_count) atomicOr(bad, 1);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> select_blocks_cuda(
    const std::optional<at::Tensor>& score1, const std::optional<at::Tensor>& score2,
    const at::Tensor& n_recent, const at::Tensor& n_sink, const at::Tensor& n_score1,
    const at::Tensor& n_score2, int64_t shift, int64_t max_count) {
  check_select_blocks_args(kOp, score1, score2, n_recent, n_sink, n_score1, n_score2, shift,
                           max_count);
  check_cuda(kOp, "n_recent", n_recent);
  const int64_t blocks = n_recent.size(-1);
  TORCH_CHECK(max_count <= std::numeric_limits<int>::max(), kOp, ": max_count ", max_count,
              " is more than this kernel's ", std::numeric_limits<int>::max());
  TORCH_CHECK(blocks <= 8192, kOp, ": ", blocks, " blocks per row is more than this kernel's "
              "8192; use a larger block_size");
  const at::Tensor& ref = score1.has_value() ? *score1 : *score2;
  const auto dtype = ref.scalar_type();

  const at::cuda::CUDAGuard guard(n_recent.device());
  const int64_t batch = ref.size(0), heads = ref.size(1);
  auto count = at::empty({batch, heads, blocks}, n_recent.options());
  auto index = at::empty({batch, heads, blocks, max_count}, n_recent.options());
  const auto check_counts_on_host = [&] {
    check_select_blocks_values(kOp, score1.has_value(), score2.has_value(), n_recent.cpu(),
                               n_sink.cpu(), n_score1.cpu(), n_score2.cpu(), shift, max_count);
  };
  if (count.numel() == 0) {  // no (batch, head) to select for: the counts are still checked
    check_counts_on_host();
    return {count, index};
  }
  TORCH_CHECK(heads <= 65535 && batch <= 65535, kOp, ": batch and heads must be <= 65535");

  SelectParams p;
  p.heads = heads;
  p.num_blocks = blocks;
  p.count_rows = blocks == 0 ? 1 : n_recent.numel() / blocks;
  p.shift = static_cast<int>(std::min<int64_t>(shift, std::numeric_limits<int>::max()));
  p.max_count = static_cast<int>(max_count);
  p.sort_size = 1;
  while (p.sort_size < blocks) p.sort_size *= 2;
  const size_t smem = size_t(p.sort_size) * (sizeof(double) + sizeof(int)) + blocks;

  DeviceCheck check(kOp, n_recent, CheckedOp::kSelectBlocks);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(blocks, heads, batch);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, kOp, [&] {
    auto kernel = select_blocks_kernel<scalar_t>;
    set_dynamic_smem(kOp, kernel, smem);
    launch_kernel(kOp, kernel, grid, kThreads, smem, stream,
        score1.has_value() ? score1->data_ptr<scalar_t>() : nullptr,
        score2.has_value() ? score2->data_ptr<scalar_t>() : nullptr, n_recent.data_ptr<int>(),
        n_sink.data_ptr<int>(), n_score1.data_ptr<int>(), n_score2.data_ptr<int>(),
        count.data_ptr<int>(), index.data_ptr<int>(), check.flag(), p);
  });

  // A bad count raises here, like on the CPU, instead of giving a silently truncated layout.
  check.raise_if_flagged(check_counts_on_host);
  return {count, index};
}

}  // namespace
}  // namespace cuda
}  // namespace cabattn

TORCH_LIBRARY_IMPL(CABATTN_CUDA_LIBRARY, CABATTN_CUDA_KEY, m) {
  m.impl("select_blocks", &cabattn::cuda::select_blocks_cuda);
}
