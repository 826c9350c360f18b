// CUDA kernels of cabattn::attention_with_scores: a chunk of Lq queries against Lk keys whose
// last Lq are the chunk itself.
//   pass 1: FlashAttention-2 style forward per (batch, query head, 64-query tile) -> out, lse;
//   pass 2: per (batch, KV head, 64-key tile) recompute the logits of every query head of the
//           group against that key tile, turn them into probabilities with pass 1's lse and sum
//           them per key. Each key's mass is owned by one thread block: no atomics, and the sum
//           is deterministic.
#include "attention_tile.cuh"

namespace cabattn {
namespace cuda {
namespace {

constexpr const char* kOp = "cabattn::attention_with_scores";
constexpr int kTC = 8;  // 64-row query tiles

struct ChunkParams {
  int64_t q_heads, kv_heads, q_len, k_len;
  float scale_log2;
};

template <typename T, int D>
__global__ void __launch_bounds__(kTileThreads)
chunk_forward_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                     T* __restrict__ out, float* __restrict__ lse, ChunkParams p) {
  using G = TileGeometry<T, D, kTC>;
  extern __shared__ __align__(16) char smem[];
  const int64_t batch = blockIdx.z, head = blockIdx.y;
  const int64_t row0 = int64_t(blockIdx.x) * G::kRows;
  const int64_t bh = batch * p.q_heads + head;
  const int64_t kv_bh = batch * p.kv_heads + head / (p.q_heads / p.kv_heads);
  const int64_t causal_offset = p.k_len - p.q_len;
  const int64_t last_row = min(row0 + G::kRows, p.q_len) - 1;
  DenseKeys keys;
  keys.end = min(p.k_len, last_row + causal_offset + 1);
  flash_forward_tile<T, D, kTC>(q + bh * p.q_len * D, k + kv_bh * p.k_len * D,
                                v + kv_bh * p.k_len * D, out + bh * p.q_len * D,
                                lse + bh * p.q_len, row0, p.q_len, causal_offset, p.scale_log2,
                                keys, smem);
}

template <typename T, int D>
constexpr size_t key_mass_smem_bytes() {
  using G = TileGeometry<T, D, kTC>;
  return G::kQBytes + G::kKBytes + G::kRows * sizeof(float) +
         size_t(G::kTR) * G::kKeys * sizeof(float);
}

template <typename T, int D>
__global__ void __launch_bounds__(kTileThreads)
key_mass_kernel(const T* __restrict__ q, const T* __restrict__ k, const float* __restrict__ lse,
                float* __restrict__ mass, ChunkParams p) {
  using G = TileGeometry<T, D, kTC>;
  extern __shared__ __align__(16) char smem[];
  float* Qs = reinterpret_cast<float*>(smem);
  T* Ks = reinterpret_cast<T*>(smem + G::kQBytes);
  float* lse2_of_row = reinterpret_cast<float*>(smem + G::kQBytes + G::kKBytes);
  float* partial = lse2_of_row + G::kRows;  // [kTR][kKeys] per-row-group key sums

  const int64_t batch = blockIdx.z, kv_head = blockIdx.y;
  const int64_t key0 = int64_t(blockIdx.x) * G::kKeys;
  const int64_t kv_bh = batch * p.kv_heads + kv_head;
  const int64_t group = p.q_heads / p.kv_heads;
  const int64_t causal_offset = p.k_len - p.q_len;
  const int row_group = threadIdx.x / kTC;
  const int col_group = threadIdx.x % kTC;

  load_key_tile<T, D, kTC>(Ks, k + kv_bh * p.k_len * D, [&](int r) {
    return key0 + r < p.k_len ? key0 + r : int64_t(-1);
  });

  float key_sum[G::kKeysPerThread];
#pragma unroll
  for (int j = 0; j < G::kKeysPerThread; ++j) key_sum[j] = 0.f;

  // Query row t sees key j iff j <= t + causal_offset: rows before first_row see none of ours.
  const int64_t first_row = max(int64_t(0), key0 - causal_offset);
  for (int64_t head = kv_head * group; head < (kv_head + 1) * group; ++head) {
    const int64_t bh = batch * p.q_heads + head;
    for (int64_t row0 = first_row / G::kRows * G::kRows; row0 < p.q_len; row0 += G::kRows) {
      __syncthreads();  // Ks is loaded; the previous query tile's readers are done
      load_query_tile<T, D, kTC>(Qs, q + bh * p.q_len * D, row0, p.q_len, p.scale_log2);
      if (threadIdx.x < G::kRows) {
        const int64_t row = row0 + threadIdx.x;
        lse2_of_row[threadIdx.x] = row < p.q_len ? lse[bh * p.q_len + row] * kLog2e : -INFINITY;
      }
      __syncthreads();

      float s[4][G::kKeysPerThread];
      tile_scores<T, D, kTC>(Qs, Ks, row_group, col_group, s);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = row_group + G::kTR * i;
        const int64_t row = row0 + r;
        const float row_lse2 = lse2_of_row[r];
#pragma unroll
        for (int j = 0; j < G::kKeysPerThread; ++j) {
          const int64_t key = key0 + col_group + kTC * j;
          const bool visible = row < p.q_len && key < p.k_len && key <= row + causal_offset &&
                               row_lse2 != -INFINITY;
          key_sum[j] += visible ? exp2f(s[i][j] - row_lse2) : 0.f;
        }
      }
    }
  }

#pragma unroll
  for (int j = 0; j < G::kKeysPerThread; ++j)
    partial[row_group * G::kKeys + col_group + kTC * j] = key_sum[j];
  __syncthreads();
  if (threadIdx.x < G::kKeys && key0 + threadIdx.x < p.k_len) {
    float total = 0.f;
    for (int g = 0; g < G::kTR; ++g) total += partial[g * G::kKeys + threadIdx.x];
    mass[kv_bh * p.k_len + key0 + threadIdx.x] = total;
  }
}

template <typename T, int D>
void launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
            at::Tensor& lse, at::Tensor& mass, const ChunkParams& p) {
  using G = TileGeometry<T, D, kTC>;
  const auto stream = at::cuda::getCurrentCUDAStream();

  const dim3 forward_grid((p.q_len + G::kRows - 1) / G::kRows, p.q_heads, q.size(0));
  const size_t forward_smem = flash_forward_smem_bytes<T, D, kTC>();
  auto forward = chunk_forward_kernel<T, D>;
  set_dynamic_smem(kOp, forward, forward_smem);
  launch_kernel(kOp, forward, forward_grid, G::kThreads, forward_smem, stream, q.data_ptr<T>(),
                k.data_ptr<T>(), v.data_ptr<T>(), out.data_ptr<T>(), lse.data_ptr<float>(), p);

  const dim3 mass_grid((p.k_len + G::kKeys - 1) / G::kKeys, p.kv_heads, q.size(0));
  const size_t mass_smem = key_mass_smem_bytes<T, D>();
  auto key_mass = key_mass_kernel<T, D>;
  set_dynamic_smem(kOp, key_mass, mass_smem);
  launch_kernel(kOp, key_mass, mass_grid, G::kThreads, mass_smem, stream, q.data_ptr<T>(),
                k.data_ptr<T>(), lse.data_ptr<float>(), mass.data_ptr<float>(), p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_with_scores_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  check_qkv(kOp, q, k, v);
  check_cuda(kOp, "q", q);
  TORCH_CHECK(k.size(2) >= q.size(2), kOp, ": the keys (", k.size(2),
              ") must include the chunk's ", q.size(2), " queries as their last entries");
  check_scale(kOp, scale);
  check_aligned16(kOp, "q", q);
  check_aligned16(kOp, "k", k);
  check_aligned16(kOp, "v", v);

  const at::cuda::CUDAGuard guard(q.device());
  const int64_t batch = q.size(0), q_heads = q.size(1), q_len = q.size(2);
  auto out = at::empty_like(q);
  auto lse = at::empty({batch, q_heads, q_len}, q.options().dtype(at::kFloat));
  if (q_len == 0 || batch == 0 || q_heads == 0) {
    return {out, lse, at::zeros({batch, k.size(1), k.size(2)}, q.options().dtype(at::kFloat))};
  }
  auto mass = at::empty({batch, k.size(1), k.size(2)}, q.options().dtype(at::kFloat));

  ChunkParams p;
  p.q_heads = q_heads;
  p.kv_heads = k.size(1);
  p.q_len = q_len;
  p.k_len = k.size(2);
  p.scale_log2 = static_cast<float>(scale) * kLog2e;
  CABATTN_DISPATCH_ATTENTION_TYPES(q.scalar_type(), kOp, [&] {
    CABATTN_DISPATCH_HEAD_DIM(kOp, q.size(3), [&] {
      launch<scalar_t, kHeadDim>(q, k, v, out, lse, mass, p);
    });
  });
  return {out, lse, mass};
}

}  // namespace
}  // namespace cuda
}  // namespace cabattn

TORCH_LIBRARY_IMPL(CABATTN_CUDA_LIBRARY, CABATTN_CUDA_KEY, m) {
  m.impl("attention_with_scores", &cabattn::cuda::attention_with_scores_cuda);
}
