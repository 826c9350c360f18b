// CUDA kernels of cabattn::attention_with_scores: a chunk of Lq queries against Lk keys whose
// last Lq are the chunk itself, optionally through a sliding window and with soft-capped logits
// (docs/operators.md, Model features; kWindow and kSoftcap are static switches).
//   pass 1: FlashAttention-2 style forward per (key split, 64-query tile, query head, batch)
//           -> out, lse. A short chunk (the kv protocol's c = 1..16) has one query tile per
//           head, too few thread blocks to fill the GPU, so its keys are split across thread
//           blocks (split-K, as in Flash-Decoding): each split writes float partials normalised
//           over its own keys and merge_splits_kernel combines them exactly. With a window W a
//           query tile reads only its W + 63 keys (its first row's window to its last row), so
//           a long chunk costs O(Lq W), not O(Lq Lk).
//   pass 2: per (batch, KV head, 64-key tile) recompute the logits of every query head of the
//           group against that key tile, turn them into probabilities with pass 1's lse and sum
//           them per key. Each key's mass is owned by one thread block: no atomics, and the sum
//           is deterministic. With a window a key tile visits only the query rows that see it.
#include "attention_tile.cuh"
#include "flash_launch.cuh"

namespace cabattn {
namespace cuda {
namespace {

constexpr const char* kOp = "cabattn::attention_with_scores";
constexpr int kTC = 8;  // 64-row query tiles
// A split of fewer key tiles costs more in its merge and its query load than it saves.
constexpr int64_t kMinTilesPerSplit = 2;

// QkvParams::length is the number of keys, Lk; q_len (Lq) counts the chunk's queries. The
// kernels take the window (query t sees keys Lk - Lq + t - window < j <= Lk - Lq + t; 0: none)
// as an argument of its own: a field would grow these params past 128 bytes, and nvcc then
// reads them through their address, which moved the plain kernels' registers (168 -> 128 at
// head dim 64, with spills).
struct ChunkParams : QkvParams {
  int64_t q_len;
  int64_t q_tiles;         // query tiles per (batch, head)
  int64_t keys_per_split;  // a multiple of kTileKeys; >= a tile's keys when they are not split
};

// blockIdx.x = split * q_tiles + query tile. out, lse: [splits][batch][q_heads][q_len](x D).
template <typename T, int D, bool kSoftcap, bool kWindow, typename OutT>
__global__ void __launch_bounds__(kTileThreads)
chunk_forward_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                     OutT* __restrict__ out, float* __restrict__ lse, ChunkParams p,
                     int64_t window) {
  using G = TileGeometry<T, D, kTC>;
  extern __shared__ __align__(16) char smem[];
  const int64_t batch = blockIdx.z, head = blockIdx.y, k_len = p.length;
  const int64_t split = blockIdx.x / p.q_tiles;
  const int64_t row0 = (blockIdx.x % p.q_tiles) * G::kRows;
  const int64_t bh = batch * p.q_heads + head;
  const int64_t kv_bh = batch * p.kv_heads + head / p.q_per_kv;
  const int64_t split_rows = int64_t(gridDim.z) * p.q_heads * p.q_len;
  const int64_t causal_offset = k_len - p.q_len;
  const int64_t last_row = min(row0 + G::kRows, p.q_len) - 1;
  // The tile's keys start at its first row's window (at key 0 without one); splits cut them.
  const int64_t tile_begin =
      kWindow ? max(int64_t(0), row0 + causal_offset - window + 1) : int64_t(0);
  KeyRange keys;
  keys.begin = tile_begin + split * p.keys_per_split;
  keys.end = min(min(k_len, last_row + causal_offset + 1), keys.begin + p.keys_per_split);
  const int64_t rows = split * split_rows + bh * p.q_len;
  flash_forward_tile<T, D, kTC, kSoftcap, kWindow>(
      q + bh * p.q_len * D, k + kv_bh * k_len * D, v + kv_bh * k_len * D, out + rows * D,
      lse + rows, row0, p.q_len, causal_offset, window, p.scale_log2, p.softcap_log2, keys,
      smem);
}

// One thread block per query row, a thread per head-dim column: lse = log sum_s exp(lse_s) and
// out = sum_s exp(lse_s - lse) out_s over the splits' partials. A split that saw none of the
// row's keys has lse_s = -inf and weighs nothing.
template <typename T, int D>
__global__ void __launch_bounds__(D)
merge_splits_kernel(const float* __restrict__ part_out, const float* __restrict__ part_lse,
                    T* __restrict__ out, float* __restrict__ lse, int splits, int64_t rows) {
  const int64_t row = blockIdx.x;
  float max_lse = -INFINITY;
  for (int s = 0; s < splits; ++s) max_lse = fmaxf(max_lse, part_lse[s * rows + row]);
  const float ref = max_lse == -INFINITY ? 0.f : max_lse;
  float sum = 0.f, acc = 0.f;
  for (int s = 0; s < splits; ++s) {
    const float w = expf(part_lse[s * rows + row] - ref);
    sum += w;
    acc = fmaf(w, part_out[(s * rows + row) * D + threadIdx.x], acc);
  }
  out[row * D + threadIdx.x] = static_cast<T>(sum > 0.f ? acc / sum : 0.f);
  if (threadIdx.x == 0) lse[row] = sum > 0.f ? ref + logf(sum) : -INFINITY;
}

// Key splits for `blocks` (query tile, head, batch) thread blocks over `key_tiles` tiles: about
// two waves of thread blocks on the device, each split at least kMinTilesPerSplit tiles.
int64_t split_count(int64_t blocks, int64_t key_tiles) {
  int device = 0, sm_count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  if (blocks >= sm_count) return 1;
  const int64_t wanted = (2 * int64_t(sm_count) + blocks - 1) / blocks;
  return std::max<int64_t>(1, std::min(wanted, key_tiles / kMinTilesPerSplit));
}

template <typename T, int D>
constexpr size_t key_mass_smem_bytes() {
  using G = TileGeometry<T, D, kTC>;
  return G::kQBytes + G::kKBytes + G::kRows * sizeof(float) +
         size_t(G::kTR) * G::kKeys * sizeof(float);
}

template <typename T, int D, bool kSoftcap, bool kWindow>
__global__ void __launch_bounds__(kTileThreads)
key_mass_kernel(const T* __restrict__ q, const T* __restrict__ k, const float* __restrict__ lse,
                float* __restrict__ mass, ChunkParams p, int64_t window) {
  using G = TileGeometry<T, D, kTC>;
  extern __shared__ __align__(16) char smem[];
  float* Qs = reinterpret_cast<float*>(smem);
  T* Ks = reinterpret_cast<T*>(smem + G::kQBytes);
  float* lse2_of_row = reinterpret_cast<float*>(smem + G::kQBytes + G::kKBytes);
  float* partial = lse2_of_row + G::kRows;  // [kTR][kKeys] per-row-group key sums

  const int64_t batch = blockIdx.z, kv_head = blockIdx.y, k_len = p.length;
  const int64_t key0 = int64_t(blockIdx.x) * G::kKeys;
  const int64_t kv_bh = batch * p.kv_heads + kv_head;
  const int64_t group = p.q_per_kv;
  const int64_t causal_offset = k_len - p.q_len;
  const int row_group = threadIdx.x / kTC;
  const int col_group = threadIdx.x % kTC;

  load_key_tile<T, D, kTC>(Ks, k + kv_bh * k_len * D, [&](int r) {
    return key0 + r < k_len ? key0 + r : int64_t(-1);
  });

  float key_sum[G::kKeysPerThread];
#pragma unroll
  for (int j = 0; j < G::kKeysPerThread; ++j) key_sum[j] = 0.f;

  // Query row t sees key j iff j <= t + causal_offset (and, with a window, j > t +
  // causal_offset - window): rows before first_row, or from rows_end on, see none of ours.
  const int64_t first_row = max(int64_t(0), key0 - causal_offset);
  const int64_t rows_end =
      kWindow ? min(p.q_len, key0 + G::kKeys - 1 - causal_offset + window) : p.q_len;
  for (int64_t head = kv_head * group; head < (kv_head + 1) * group; ++head) {
    const int64_t bh = batch * p.q_heads + head;
    for (int64_t row0 = first_row / G::kRows * G::kRows; row0 < rows_end; row0 += G::kRows) {
      __syncthreads();  // Ks is loaded; the previous query tile's readers are done
      load_query_tile<T, D, kTC>(Qs, q + bh * p.q_len * D, row0, p.q_len, p.scale_log2);
      if (threadIdx.x < G::kRows) {
        const int64_t row = row0 + threadIdx.x;
        lse2_of_row[threadIdx.x] = row < p.q_len ? lse[bh * p.q_len + row] * kLog2e : -INFINITY;
      }
      __syncthreads();

      float s[4][G::kKeysPerThread];
      tile_scores<T, D, kTC>(Qs, Ks, row_group, col_group, s);
      if constexpr (kSoftcap) softcap_scores(s, p.softcap_log2);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = row_group + G::kTR * i;
        const int64_t row = row0 + r;
        const float row_lse2 = lse2_of_row[r];
#pragma unroll
        for (int j = 0; j < G::kKeysPerThread; ++j) {
          const int64_t key = key0 + col_group + kTC * j;
          const bool visible = row < p.q_len && key < k_len && key <= row + causal_offset &&
                               (!kWindow || key > row + causal_offset - window) &&
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
  if (threadIdx.x < G::kKeys && key0 + threadIdx.x < k_len) {
    float total = 0.f;
    for (int g = 0; g < G::kTR; ++g) total += partial[g * G::kKeys + threadIdx.x];
    mass[kv_bh * k_len + key0 + threadIdx.x] = total;
  }
}

// Pass 1 into out and lse: OutT is T for the final output, float for the partials of a key
// split (out, lse: [splits][batch][q_heads][q_len](x D)).
template <typename T, int D, bool kSoftcap, bool kWindow, typename OutT>
void launch_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, OutT* out,
                    float* lse, int64_t splits, const ChunkParams& p, int64_t window,
                    cudaStream_t stream) {
  const size_t smem = flash_forward_smem_bytes<T, D, kTC>();
  auto kernel = chunk_forward_kernel<T, D, kSoftcap, kWindow, OutT>;
  set_dynamic_smem(kOp, kernel, smem);
  launch_kernel(kOp, kernel, dim3(p.q_tiles * splits, p.q_heads, p.batch), kTileThreads, smem,
                stream, q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), out, lse, p, window);
}

template <typename T, int D, bool kSoftcap, bool kWindow>
void launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
            at::Tensor& lse, at::Tensor& mass, ChunkParams p, int64_t window) {
  using G = TileGeometry<T, D, kTC>;
  const auto stream = at::cuda::getCurrentCUDAStream();

  p.q_tiles = (p.q_len + G::kRows - 1) / G::kRows;
  // The keys one query tile reads: all of them, or its first row's window up to its last row.
  const int64_t tile_keys =
      kWindow ? std::min<int64_t>(p.length, window + G::kRows - 1) : p.length;
  const int64_t key_tiles = (tile_keys + G::kKeys - 1) / G::kKeys;
  int64_t splits = split_count(p.q_tiles * p.q_heads * p.batch, key_tiles);
  const int64_t tiles_per_split = (key_tiles + splits - 1) / splits;
  splits = (key_tiles + tiles_per_split - 1) / tiles_per_split;  // no split left empty
  p.keys_per_split = tiles_per_split * G::kKeys;
  TORCH_CHECK(p.q_tiles * splits <= std::numeric_limits<int>::max(), kOp, ": ", p.q_len,
              " queries are more than this kernel's grid holds");

  if (splits == 1) {
    launch_forward<T, D, kSoftcap, kWindow>(q, k, v, out.data_ptr<T>(), lse.data_ptr<float>(),
                                            splits, p, window, stream);
  } else {
    const int64_t rows = p.batch * p.q_heads * p.q_len;
    auto part_out = at::empty({splits, rows, D}, q.options().dtype(at::kFloat));
    auto part_lse = at::empty({splits, rows}, q.options().dtype(at::kFloat));
    launch_forward<T, D, kSoftcap, kWindow>(q, k, v, part_out.data_ptr<float>(),
                                            part_lse.data_ptr<float>(), splits, p, window,
                                            stream);
    launch_kernel(kOp, merge_splits_kernel<T, D>, dim3(rows), dim3(D), 0, stream,
                  part_out.data_ptr<float>(), part_lse.data_ptr<float>(), out.data_ptr<T>(),
                  lse.data_ptr<float>(), static_cast<int>(splits), rows);
  }

  // Every key's mass is written, 0 for keys no query sees.
  const dim3 mass_grid((int64_t(p.length) + G::kKeys - 1) / G::kKeys, p.kv_heads, p.batch);
  const size_t mass_smem = key_mass_smem_bytes<T, D>();
  auto key_mass = key_mass_kernel<T, D, kSoftcap, kWindow>;
  set_dynamic_smem(kOp, key_mass, mass_smem);
  launch_kernel(kOp, key_mass, mass_grid, G::kThreads, mass_smem, stream, q.data_ptr<T>(),
                k.data_ptr<T>(), lse.data_ptr<float>(), mass.data_ptr<float>(), p, window);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_with_scores_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, double softcap,
    int64_t window) {
  check_attention_with_scores_args(kOp, q, k, v, scale, softcap, window);
  check_cuda(kOp, "q", q);
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

  ChunkParams p{qkv_params(kOp, q, k, v, scale, softcap)};
  p.q_len = q_len;
  CABATTN_DISPATCH_ATTENTION_TYPES(q.scalar_type(), kOp, [&] {
    CABATTN_DISPATCH_HEAD_DIM(kOp, p.head_dim, [&] {
      CABATTN_BOOL_SWITCH(softcap > 0, kSoftcap, [&] {
        CABATTN_BOOL_SWITCH(window > 0, kWindow, [&] {
          launch<scalar_t, kHeadDim, kSoftcap, kWindow>(q, k, v, out, lse, mass, p, window);
        });
      });
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
