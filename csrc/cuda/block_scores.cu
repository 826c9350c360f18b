// CUDA kernel of cabattn::block_scores (docs/block_statistics.md): one thread block per (batch,
// query head, query block I), never materialising P.
//
// For each row r and key block J the kernel keeps, in log2 units, the block's local maximum
// m_rJ and s_rJ = sum_j exp2(logit_j - m_rJ). With lse_r = log2 sum_J s_rJ exp2(m_rJ), the
// query block gathers
//   Sblk[I, J] = sum_r s_rJ exp2(m_rJ - lse_r),   Gblk[I, J] = max_r exp2(m_rJ - lse_r).
// Rows are processed 16 at a time; their (m_rJ, s_rJ) live in shared memory for a window of at
// most kMaxWindow key blocks, so shared memory stops growing with the number of blocks. A row
// of one window (I < kMaxWindow: L up to 8K at block size 16, 64K at 128) takes one QK^T pass;
// a longer one takes two: the first folds its windows into lse_r, the second gathers Sblk and
// Gblk window by window. kSoftcap (a static switch) soft-caps the logits first (docs/
// operators.md, Model features).
#include "attention_tile.cuh"
#include "flash_launch.cuh"
#include "tensor_core.cuh"

namespace cabattn {
namespace cuda {
namespace {

constexpr const char* kOp = "cabattn::block_scores";
constexpr int kTC = 32;  // 16-row query chunks
constexpr int kWarps = kTileThreads / 32;
// Key blocks per window: a multiple of 4, so that a window of 16-token blocks starts on a
// 64-key tile.
constexpr int kMaxWindow = 512;
constexpr int kMaxBlockRows = 128;  // the largest block_size

struct ScoreParams : QkvParams {
  int block_size, num_blocks;
  int window;  // key blocks per window: min(num_blocks, kMaxWindow)
};

template <typename T, int D>
struct ScoreLayout {
  using G = TileGeometry<T, D, kTC>;
  // Qs, Ks, the masked logit tile, then per-(row, J) max and sum over a window, each block row's
  // lse, per-J results of a window.
  static size_t bytes(int window) {
    return G::kQBytes + G::kKBytes + G::kPBytes +
           (2 * size_t(G::kRows) * window + kMaxBlockRows + 2 * size_t(window)) * sizeof(float);
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

template <typename T, int D, bool kSoftcap>
struct BlockScoresCta {
  using G = TileGeometry<T, D, kTC>;
  static_assert(G::kRows == 16 && G::kRows % kWarps == 0, "16-row chunks, 4 rows per warp");
  static_assert(kMaxWindow % 4 == 0, "a window must start on a 64-key tile at block size 16");

  float* Qs;
  T* Ks;
  float* logits;
  float* block_max;  // [kRows][window], key block J at column J - J0
  float* block_sum;
  float* row_lse2;   // [block_size], lse of the block's rows (log2 units)
  float* sum_acc;    // [window]
  float* max_acc;
  const T* q_bh;
  const T* k_bh;
  ScoreParams p;
  int I;
  int64_t block_start, block_end;

  __device__ __forceinline__ BlockScoresCta(char* smem, const T* q_bh, const T* k_bh,
                                            const ScoreParams& p, int I)
      : q_bh(q_bh), k_bh(k_bh), p(p), I(I) {
    Qs = reinterpret_cast<float*>(smem);
    Ks = reinterpret_cast<T*>(smem + G::kQBytes);
    logits = reinterpret_cast<float*>(smem + G::kQBytes + G::kKBytes);
    block_max = reinterpret_cast<float*>(smem + G::kQBytes + G::kKBytes + G::kPBytes);
    block_sum = block_max + G::kRows * p.window;
    row_lse2 = block_sum + G::kRows * p.window;
    sum_acc = row_lse2 + kMaxBlockRows;
    max_acc = sum_acc + p.window;
    block_start = int64_t(I) * p.block_size;
    block_end = min(block_start + p.block_size, int64_t(p.length));
  }

  // (m_rJ, s_rJ) of the chunk's rows row0.. for the key blocks J0 <= J < J1 (all <= I).
  __device__ __forceinline__ void window_stats(int64_t row0, int J0, int J1) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int bs = p.block_size, width = J1 - J0;
    __syncthreads();  // the previous readers of Qs and the stats are done
    load_query_tile<T, D, kTC>(Qs, q_bh, row0, block_end, p.scale_log2);
    for (int e = threadIdx.x; e < G::kRows * width; e += G::kThreads) {
      block_max[(e / width) * p.window + e % width] = -INFINITY;
      block_sum[(e / width) * p.window + e % width] = 0.f;
    }
    // Causal: no key past the chunk's last row. J0 * bs is a multiple of 64 (kMaxWindow % 4).
    // Key indices fit in int (the [M, M] outputs could not be allocated otherwise): 32-bit
    // divisions below, not the 64-bit division subroutine whose calls made ptxas spill.
    const int keys_end = static_cast<int>(min(min(row0 + G::kRows, block_end), int64_t(J1) * bs));
    for (int key0 = J0 * bs; key0 < keys_end; key0 += G::kKeys) {
      __syncthreads();  // previous readers of Ks and logits are done
      load_key_tile<T, D, kTC>(Ks, k_bh, [&](int r) {
        return key0 + r < keys_end ? int64_t(key0 + r) : int64_t(-1);
      });
      __syncthreads();

      float s[4][G::kKeysPerThread];
      tile_scores<T, D, kTC>(Qs, Ks, threadIdx.x / kTC, threadIdx.x % kTC, s);
      if constexpr (kSoftcap) softcap_scores(s, p.softcap_log2);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = threadIdx.x / kTC + G::kTR * i;
        const int64_t row = row0 + r;
#pragma unroll
        for (int j = 0; j < G::kKeysPerThread; ++j) {
          const int c = threadIdx.x % kTC + kTC * j;
          const bool visible = row < block_end && key0 + c <= row && key0 + c < keys_end;
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
        if (row0 + r >= block_end) continue;
        float* m = block_max + r * p.window - J0;  // indexed by J
        float* sum = block_sum + r * p.window - J0;
        if (bs <= 32) {
          if (lane % bs == 0) {
            const int J_lo = (key0 + lane) / bs;
            const int J_hi = (key0 + 32 + lane) / bs;
            if (J_lo < J1) merge_block_stats(m[J_lo], sum[J_lo], lo_max, lo_sum);
            if (J_hi < J1) merge_block_stats(m[J_hi], sum[J_hi], hi_max, hi_sum);
          }
        } else if (lane == 0) {  // both halves lie in one key block
          const int J = key0 / bs;
          merge_block_stats(m[J], sum[J], lo_max, lo_sum);
          merge_block_stats(m[J], sum[J], hi_max, hi_sum);
        }
      }
    }
    __syncthreads();
  }

  // row_lse2 of the chunk's rows += (log2-sum-exp2) the window's (m_rJ, s_rJ) (warp per row).
  __device__ __forceinline__ void fold_lse(int64_t row0, int width) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int r = warp; r < G::kRows; r += kWarps) {
      const float* m = block_max + r * p.window;
      const float* sum = block_sum + r * p.window;
      float row_max = -INFINITY;
      for (int J = lane; J < width; J += 32) row_max = fmaxf(row_max, m[J]);
      row_max = group_max<32>(row_max);
      float total = 0.f;
      if (row_max != -INFINITY)
        for (int J = lane; J < width; J += 32) total += sum[J] * exp2f(m[J] - row_max);
      total = group_sum<32>(total);
      if (lane != 0 || row0 + r >= block_end || total <= 0.f) continue;
      const float part = row_max + log2f(total);
      float& lse = row_lse2[row0 + r - block_start];
      const float top = fmaxf(lse, part);
      lse = top + log2f(exp2f(lse - top) + exp2f(part - top));
    }
    __syncthreads();
  }

  // Folds the chunk's rows into the window's per-J results (thread per J: deterministic order).
  __device__ __forceinline__ void fold_blocks(int64_t row0, int width) {
    for (int J = threadIdx.x; J < width; J += G::kThreads) {
      float sum = sum_acc[J], mx = max_acc[J];
      for (int r = 0; r < G::kRows; ++r) {
        if (row0 + r >= block_end) break;
        const float lse = row_lse2[row0 + r - block_start];
        const float m = block_max[r * p.window + J];
        if (lse == -INFINITY || m == -INFINITY) continue;
        const float g = exp2f(m - lse);
        sum += block_sum[r * p.window + J] * g;
        mx = fmaxf(mx, g);
      }
      sum_acc[J] = sum;
      max_acc[J] = mx;
    }
  }

  __device__ __forceinline__ void run(float* sblk_row, float* gblk_row) {
    const int blocks = I + 1;  // causal: key blocks 0..I
    const int windows = (blocks + p.window - 1) / p.window;
    for (int r = threadIdx.x; r < kMaxBlockRows; r += G::kThreads) row_lse2[r] = -INFINITY;
    if (windows > 1) {  // first pass: each row's lse over all its windows
      for (int64_t row0 = block_start; row0 < block_end; row0 += G::kRows)
        for (int J0 = 0; J0 < blocks; J0 += p.window) {
          const int J1 = min(J0 + p.window, blocks);
          window_stats(row0, J0, J1);
          fold_lse(row0, J1 - J0);
        }
    }
    for (int J0 = 0; J0 < blocks; J0 += p.window) {
      const int J1 = min(J0 + p.window, blocks);
      __syncthreads();  // the previous window's results are written out
      for (int J = threadIdx.x; J < J1 - J0; J += G::kThreads) {
        sum_acc[J] = 0.f;
        max_acc[J] = 0.f;
      }
      for (int64_t row0 = block_start; row0 < block_end; row0 += G::kRows) {
        window_stats(row0, J0, J1);
        if (windows == 1) fold_lse(row0, J1 - J0);
        fold_blocks(row0, J1 - J0);
      }
      __syncthreads();
      for (int J = threadIdx.x; J < J1 - J0; J += G::kThreads) {
        sblk_row[J0 + J] = sum_acc[J];
        gblk_row[J0 + J] = max_acc[J];
      }
    }
    for (int J = blocks + threadIdx.x; J < p.num_blocks; J += G::kThreads) {
      sblk_row[J] = 0.f;
      gblk_row[J] = 0.f;
    }
  }
};

template <typename T, int D, bool kSoftcap>
__global__ void __launch_bounds__(kTileThreads)
block_scores_kernel(const T* __restrict__ q, const T* __restrict__ k, float* __restrict__ sblk,
                    float* __restrict__ gblk, ScoreParams p) {
  extern __shared__ __align__(16) char smem[];
  // The largest query blocks carry the most work: schedule them first.
  const int I = p.num_blocks - 1 - blockIdx.x;
  const int64_t batch = blockIdx.z, head = blockIdx.y, length = p.length;
  const int64_t bh = batch * p.q_heads + head;
  const int64_t kv_bh = batch * p.kv_heads + head / p.q_per_kv;
  BlockScoresCta<T, D, kSoftcap> cta(smem, q + bh * length * D, k + kv_bh * length * D, p, I);
  const int64_t out_row = (bh * p.num_blocks + I) * int64_t(p.num_blocks);
  cta.run(sblk + out_row, gblk + out_row);
}

template <typename T, int D, bool kSoftcap>
void launch(const at::Tensor& q, const at::Tensor& k, at::Tensor& sblk, at::Tensor& gblk,
            const ScoreParams& p) {
  const size_t smem = ScoreLayout<T, D>::bytes(p.window);
  auto kernel = block_scores_kernel<T, D, kSoftcap>;
  set_dynamic_smem(kOp, kernel, smem);
  const dim3 grid(p.num_blocks, p.q_heads, p.batch);
  launch_kernel(kOp, kernel, grid, kTileThreads, smem, at::cuda::getCurrentCUDAStream(),
                q.data_ptr<T>(), k.data_ptr<T>(), sblk.data_ptr<float>(), gblk.data_ptr<float>(),
                p);
}

std::tuple<at::Tensor, at::Tensor> block_scores_cuda(const at::Tensor& q, const at::Tensor& k,
                                                     int64_t block_size, double scale,
                                                     double softcap) {
  check_block_scores_args(kOp, q, k, block_size, scale, softcap);
  check_cuda(kOp, "q", q);
  check_aligned16(kOp, "q", q);
  check_aligned16(kOp, "k", k);

  const at::cuda::CUDAGuard guard(q.device());
  const int64_t blocks = num_blocks(q.size(2), block_size);
  auto options = q.options().dtype(at::kFloat);
  auto sblk = at::empty({q.size(0), q.size(1), blocks, blocks}, options);
  auto gblk = at::empty({q.size(0), q.size(1), blocks, blocks}, options);
  if (sblk.numel() == 0) return {sblk, gblk};

  ScoreParams p{qkv_params(kOp, q, k, at::Tensor(), scale, softcap)};
  p.block_size = static_cast<int>(block_size);
  p.num_blocks = static_cast<int>(blocks);
  p.window = static_cast<int>(std::min<int64_t>(blocks, kMaxWindow));
  if (uses_tensor_cores(q))  // fp16/bf16: tensor cores; fp32 stays on the CUDA cores
    block_scores_tensor_core(q, k, block_size, scale, softcap, sblk, gblk);
  else  // fp32: the CUDA-core kernels
  AT_DISPATCH_SWITCH(q.scalar_type(), kOp, AT_DISPATCH_CASE(at::kFloat, [&] {
    CABATTN_DISPATCH_HEAD_DIM(kOp, p.head_dim, [&] {
      CABATTN_BOOL_SWITCH(softcap > 0, kSoftcap, [&] {
        launch<scalar_t, kHeadDim, kSoftcap>(q, k, sblk, gblk, p);
      });
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
