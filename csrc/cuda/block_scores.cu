// CUDA kernel of cabattn::block_scores (METHODS.md 2.2): one thread block per (batch, query
// head, query block I), one QK^T pass over the causal keys, never materialising P.
//
// For each row r and key block J the kernel keeps, in log2 units, the block's local maximum
// m_rJ and s_rJ = sum_j exp2(logit_j - m_rJ). When the row's keys are done,
// lse_r = log2 sum_J s_rJ exp2(m_rJ), and the query block gathers
//   Sblk[I, J] = sum_r s_rJ exp2(m_rJ - lse_r),   Gblk[I, J] = max_r exp2(m_rJ - lse_r).
// Rows are processed 16 at a time so the per-(row, J) state fits in shared memory.
#include "attention_tile.cuh"
#include "tensor_core.cuh"

namespace cabattn {
namespace cuda {
namespace {

constexpr const char* kOp = "cabattn::block_scores";
constexpr int kTC = 32;  // 16-row query chunks
constexpr int kWarps = kTileThreads / 32;

struct ScoreParams {
  int64_t q_heads, kv_heads, length;
  int block_size, num_blocks;
  float scale_log2;
};

template <typename T, int D>
struct ScoreLayout {
  using G = TileGeometry<T, D, kTC>;
  // Qs, Ks, the masked logit tile, then per-(row, J) max and sum, per-row lse, per-J results.
  static size_t bytes(int num_blocks) {
    return G::kQBytes + G::kKBytes + G::kPBytes +
           (2 * size_t(G::kRows) * num_blocks + G::kRows + 2 * size_t(num_blocks)) *
               sizeof(float);
  }
};

// Folds a partial (max, sum) into the running (max, sum) of one (row, key block).
__device__ __forceinline__ void merge_block_stats(float& m, float& s, float m_part,
                                                  float s_part) {
  if (m_part == -INFINITY) return;
  const float m_new = fmaxf(m, m_part);
  s = s * exp2f(m - m_new) + s_part * exp2f(m_part - m_new);
  m = m_new;
}

template <typename T, int D>
__global__ void __launch_bounds__(kTileThreads)
block_scores_kernel(const T* __restrict__ q, const T* __restrict__ k, float* __restrict__ sblk,
                    float* __restrict__ gblk, ScoreParams p) {
  using G = TileGeometry<T, D, kTC>;
  static_assert(G::kRows == 16 && G::kRows % kWarps == 0, "16-row chunks, 4 rows per warp");
  extern __shared__ __align__(16) char smem[];
  const int M = p.num_blocks;
  float* Qs = reinterpret_cast<float*>(smem);
  T* Ks = reinterpret_cast<T*>(smem + G::kQBytes);
  float* logits = reinterpret_cast<float*>(smem + G::kQBytes + G::kKBytes);
  float* block_max = reinterpret_cast<float*>(smem + G::kQBytes + G::kKBytes + G::kPBytes);
  float* block_sum = block_max + G::kRows * M;  // [kRows][M] each
  float* row_lse2 = block_sum + G::kRows * M;
  float* sum_acc = row_lse2 + G::kRows;
  float* max_acc = sum_acc + M;

  // The largest query blocks carry the most work: schedule them first.
  const int I = M - 1 - blockIdx.x;
  const int64_t batch = blockIdx.z, head = blockIdx.y;
  const int64_t bh = batch * p.q_heads + head;
  const int64_t kv_bh = batch * p.kv_heads + head / (p.q_heads / p.kv_heads);
  const T* q_bh = q + bh * p.length * D;
  const T* k_bh = k + kv_bh * p.length * D;
  const int row_group = threadIdx.x / kTC;
  const int col_group = threadIdx.x % kTC;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int bs = p.block_size;

  for (int J = threadIdx.x; J <= I; J += G::kThreads) {
    sum_acc[J] = 0.f;
    max_acc[J] = 0.f;
  }

  const int64_t block_end = min(int64_t(I + 1) * bs, p.length);
  for (int64_t row0 = int64_t(I) * bs; row0 < block_end; row0 += G::kRows) {
    __syncthreads();  // the previous chunk's readers of Qs and the stats are done
    load_query_tile<T, D, kTC>(Qs, q_bh, row0, block_end, p.scale_log2);
    for (int e = threadIdx.x; e < G::kRows * (I + 1); e += G::kThreads) {
      const int r = e / (I + 1), J = e % (I + 1);
      block_max[r * M + J] = -INFINITY;
      block_sum[r * M + J] = 0.f;
    }

    const int64_t keys_end = min(row0 + G::kRows, block_end);  // causal: no key past the chunk
    for (int64_t key0 = 0; key0 < keys_end; key0 += G::kKeys) {
      __syncthreads();  // previous readers of Ks and logits are done
      load_key_tile<T, D, kTC>(Ks, k_bh, [&](int r) {
        return key0 + r < keys_end ? key0 + r : int64_t(-1);
      });
      __syncthreads();

      float s[4][G::kKeysPerThread];
      tile_scores<T, D, kTC>(Qs, Ks, row_group, col_group, s);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = row_group + G::kTR * i;
        const int64_t row = row0 + r;
#pragma unroll
        for (int j = 0; j < G::kKeysPerThread; ++j) {
          const int c = col_group + kTC * j;
          const bool visible = row < block_end && key0 + c <= row;
          logits[r * G::kPStride + c] = visible ? s[i][j] : -INFINITY;
        }
      }
      __syncthreads();

      // Warp w reduces rows 4w..4w+3. Lane l holds keys key0 + l and key0 + 32 + l; a key
      // block covers whole aligned groups of min(bs, 32) lanes because key0 is a multiple of
      // 64 and bs a power of two.
      for (int r = warp * (G::kRows / kWarps); r < (warp + 1) * (G::kRows / kWarps); ++r) {
        float lo = logits[r * G::kPStride + lane];
        float hi = logits[r * G::kPStride + 32 + lane];
        float lo_max, hi_max;
        if (bs == 16) {
          lo_max = group_max<16>(lo);
          hi_max = group_max<16>(hi);
        } else {
          lo_max = group_max<32>(lo);
          hi_max = group_max<32>(hi);
        }
        lo = lo == -INFINITY ? 0.f : exp2f(lo - lo_max);
        hi = hi == -INFINITY ? 0.f : exp2f(hi - hi_max);
        float lo_sum, hi_sum;
        if (bs == 16) {
          lo_sum = group_sum<16>(lo);
          hi_sum = group_sum<16>(hi);
        } else {
          lo_sum = group_sum<32>(lo);
          hi_sum = group_sum<32>(hi);
        }
        const int64_t row = row0 + r;
        if (row >= block_end) continue;
        if (bs <= 32) {
          if (lane % bs == 0) {
            const int J_lo = static_cast<int>((key0 + lane) / bs);
            const int J_hi = static_cast<int>((key0 + 32 + lane) / bs);
            if (J_lo <= I)
              merge_block_stats(block_max[r * M + J_lo], block_sum[r * M + J_lo], lo_max,
                                lo_sum);
            if (J_hi <= I)
              merge_block_stats(block_max[r * M + J_hi], block_sum[r * M + J_hi], hi_max,
                                hi_sum);
          }
        } else if (lane == 0) {  // both halves lie in one key block
          const int J = static_cast<int>(key0 / bs);
          merge_block_stats(block_max[r * M + J], block_sum[r * M + J], lo_max, lo_sum);
          merge_block_stats(block_max[r * M + J], block_sum[r * M + J], hi_max, hi_sum);
        }
      }
    }
    __syncthreads();

    // Each row's lse from its block stats (warp per row).
    for (int r = warp; r < G::kRows; r += kWarps) {
      float row_max = -INFINITY;
      for (int J = lane; J <= I; J += 32) row_max = fmaxf(row_max, block_max[r * M + J]);
      row_max = group_max<32>(row_max);
      float total = 0.f;
      if (row_max != -INFINITY)
        for (int J = lane; J <= I; J += 32)
          total += block_sum[r * M + J] * exp2f(block_max[r * M + J] - row_max);
      total = group_sum<32>(total);
      if (lane == 0)
        row_lse2[r] = (row0 + r < block_end && total > 0.f) ? row_max + log2f(total) : -INFINITY;
    }
    __syncthreads();

    // Fold the chunk's rows into the per-J results (thread per J: deterministic order).
    for (int J = threadIdx.x; J <= I; J += G::kThreads) {
      float sum = sum_acc[J], mx = max_acc[J];
      for (int r = 0; r < G::kRows; ++r) {
        if (row_lse2[r] == -INFINITY || block_max[r * M + J] == -INFINITY) continue;
        const float g = exp2f(block_max[r * M + J] - row_lse2[r]);
        sum += block_sum[r * M + J] * g;
        mx = fmaxf(mx, g);
      }
      sum_acc[J] = sum;
      max_acc[J] = mx;
    }
  }
  __syncthreads();

  float* sblk_row = sblk + (bh * M + I) * int64_t(M);
  float* gblk_row = gblk + (bh * M + I) * int64_t(M);
  for (int J = threadIdx.x; J < M; J += G::kThreads) {
    sblk_row[J] = J <= I ? sum_acc[J] : 0.f;
    gblk_row[J] = J <= I ? max_acc[J] : 0.f;
  }
}

template <typename T, int D>
void launch(const at::Tensor& q, const at::Tensor& k, at::Tensor& sblk, at::Tensor& gblk,
            const ScoreParams& p) {
  const size_t smem = ScoreLayout<T, D>::bytes(p.num_blocks);
  auto kernel = block_scores_kernel<T, D>;
  set_dynamic_smem(kOp, kernel, smem);
  const dim3 grid(p.num_blocks, p.q_heads, q.size(0));
  launch_kernel(kOp, kernel, grid, kTileThreads, smem, at::cuda::getCurrentCUDAStream(),
                q.data_ptr<T>(), k.data_ptr<T>(), sblk.data_ptr<float>(), gblk.data_ptr<float>(),
                p);
}

std::tuple<at::Tensor, at::Tensor> block_scores_cuda(const at::Tensor& q, const at::Tensor& k,
                                                     int64_t block_size, double scale) {
  check_qk(kOp, q, k);
  check_cuda(kOp, "q", q);
  check_block_size(kOp, block_size);
  TORCH_CHECK(k.size(2) == q.size(2), kOp, ": q has ", q.size(2), " tokens but k has ",
              k.size(2), "; they must match");
  check_scale(kOp, scale);
  check_aligned16(kOp, "q", q);
  check_aligned16(kOp, "k", k);

  const at::cuda::CUDAGuard guard(q.device());
  const int64_t blocks = num_blocks(q.size(2), block_size);
  auto options = q.options().dtype(at::kFloat);
  auto sblk = at::empty({q.size(0), q.size(1), blocks, blocks}, options);
  auto gblk = at::empty({q.size(0), q.size(1), blocks, blocks}, options);
  if (sblk.numel() == 0) return {sblk, gblk};

  ScoreParams p;
  p.q_heads = q.size(1);
  p.kv_heads = k.size(1);
  p.length = q.size(2);
  p.block_size = static_cast<int>(block_size);
  p.num_blocks = static_cast<int>(blocks);
  p.scale_log2 = static_cast<float>(scale) * kLog2e;
  if (uses_tensor_cores(q))  // fp16/bf16: tensor cores; fp32 stays on the CUDA cores
    block_scores_tensor_core(q, k, block_size, scale, sblk, gblk);
  else  // fp32: the CUDA-core kernels
  AT_DISPATCH_SWITCH(q.scalar_type(), kOp, AT_DISPATCH_CASE(at::kFloat, [&] {
    CABATTN_DISPATCH_HEAD_DIM(kOp, q.size(3), [&] {
      launch<scalar_t, kHeadDim>(q, k, sblk, gblk, p);
    });
  }));
  return {sblk, gblk};
}

}  // namespace
}  // namespace cuda
}  // namespace cabattn

TORCH_LIBRARY_IMPL(CABATTN_CUDA_LIBRARY, CABATTN_CUDA_KEY, m) {
  m.impl("block_scores", &cabattn::cuda::block_scores_cuda);
}
