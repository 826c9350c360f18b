// The tile machinery shared by the attention-style kernels (block_sparse_attention,
// attention_with_scores, block_scores): 128 threads hold a query tile of kRows rows in shared
// memory as float (pre-scaled to log2 units), stream key/value tiles of 64 rows through shared
// memory in the input dtype, and compute S = Q K^T and O += P V on the CUDA cores with fp32
// accumulation.
//
// Thread layout: tid = row_group * TC + col_group. A thread owns the 4 query rows
// row_group + TR * i (i < 4) and, in S, the keys col_group + TC * j (j < 64 / TC); in O the
// head-dim columns col_group + TC * t. The TC threads of a row group are consecutive lanes, so
// row reductions are warp shuffles within the group.
#pragma once

#include "cuda_common.cuh"
#include "flash_params.cuh"

namespace cabattn {
namespace cuda {

constexpr int kTileThreads = 128;
constexpr int kTileKeys = 64;

template <typename T, int D, int TC>
struct TileGeometry {
  static_assert(TC == 8 || TC == 16 || TC == 32, "TC must be 8, 16 or 32");
  static_assert(D % TC == 0 && D % 8 == 0, "head dim must divide into the column groups");
  static constexpr int kThreads = kTileThreads;
  static constexpr int kTR = kThreads / TC;          // row groups
  static constexpr int kRows = 4 * kTR;              // query rows of the tile
  static constexpr int kKeys = kTileKeys;            // keys of the tile
  static constexpr int kKeysPerThread = kKeys / TC;  // S columns per thread
  static constexpr int kColsPerThread = D / TC;      // O columns per thread
  // Row strides padded by 16 bytes so rows start in different banks and stay 16-byte aligned.
  static constexpr int kQStride = D + 4;                        // floats
  static constexpr int kKStride = D + 16 / int(sizeof(T));      // elements of T
  static constexpr int kPStride = kKeys + 1;                    // floats
  static constexpr size_t kQBytes = size_t(kRows) * kQStride * sizeof(float);
  static constexpr size_t kKBytes = size_t(kKeys) * kKStride * sizeof(T);
  static constexpr size_t kPBytes = size_t(kRows) * kPStride * sizeof(float);
  static constexpr int kChunksPerRow = D * int(sizeof(T)) / 16;  // 16-byte chunks of a row
};

// Qs[r] = q[row0 + r] * scale_log2 (float); rows at or past `rows_end` become zeros.
template <typename T, int D, int TC>
__device__ __forceinline__ void load_query_tile(float* Qs, const T* q, int64_t row0,
                                                int64_t rows_end, float scale_log2) {
  using G = TileGeometry<T, D, TC>;
  constexpr int kElemsPerChunk = 16 / sizeof(T);
  for (int chunk = threadIdx.x; chunk < G::kRows * G::kChunksPerRow; chunk += G::kThreads) {
    const int r = chunk / G::kChunksPerRow;
    const int c = (chunk % G::kChunksPerRow) * kElemsPerChunk;
    float* dst = Qs + r * G::kQStride + c;
    const int64_t row = row0 + r;
    if (row < rows_end) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(q + row * D + c));
      const T* vals = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int e = 0; e < kElemsPerChunk; ++e) dst[e] = static_cast<float>(vals[e]) * scale_log2;
    } else {
#pragma unroll
      for (int e = 0; e < kElemsPerChunk; ++e) dst[e] = 0.f;
    }
  }
}

// Copies 64 rows of `src` ([rows, D], the rows given by key_of(r), negative = absent) into
// smem (zeros for absent rows, so that 0 * garbage never makes a NaN).
template <typename T, int D, int TC, typename KeyOf>
__device__ __forceinline__ void load_key_tile(T* dst, const T* src, KeyOf key_of) {
  using G = TileGeometry<T, D, TC>;
  constexpr int kElemsPerChunk = 16 / sizeof(T);
  for (int chunk = threadIdx.x; chunk < G::kKeys * G::kChunksPerRow; chunk += G::kThreads) {
    const int r = chunk / G::kChunksPerRow;
    const int c = (chunk % G::kChunksPerRow) * kElemsPerChunk;
    const int64_t key = key_of(r);
    uint4 raw = make_uint4(0u, 0u, 0u, 0u);
    if (key >= 0) raw = __ldg(reinterpret_cast<const uint4*>(src + key * D + c));
    *reinterpret_cast<uint4*>(dst + r * G::kKStride + c) = raw;
  }
}

// s[i][j] = Qs[row_group + TR i] . Ks[col_group + TC j] (Qs already carries the scale).
template <typename T, int D, int TC>
__device__ __forceinline__ void tile_scores(
    const float* Qs, const T* Ks, int row_group, int col_group,
    float (&s)[4][TileGeometry<T, D, TC>::kKeysPerThread]) {
  using G = TileGeometry<T, D, TC>;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < G::kKeysPerThread; ++j) s[i][j] = 0.f;
#pragma unroll 4
  for (int c = 0; c < D; c += 4) {
    float4 qv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      qv[i] = *reinterpret_cast<const float4*>(Qs + (row_group + G::kTR * i) * G::kQStride + c);
#pragma unroll
    for (int j = 0; j < G::kKeysPerThread; ++j) {
      const float4 kv = load4(Ks + (col_group + TC * j) * G::kKStride + c);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s[i][j] = fmaf(qv[i].x, kv.x, s[i][j]);
        s[i][j] = fmaf(qv[i].y, kv.y, s[i][j]);
        s[i][j] = fmaf(qv[i].z, kv.z, s[i][j]);
        s[i][j] = fmaf(qv[i].w, kv.w, s[i][j]);
      }
    }
  }
}

// The logit soft-cap on a thread's scores (log2 units, as tile_scores leaves them).
template <int N>
__device__ __forceinline__ void softcap_scores(float (&s)[4][N], float softcap_log2) {
  const SoftcapLog2 softcap(softcap_log2);
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < N; ++j) s[i][j] = softcap(s[i][j]);
}

// acc[i][t] += sum_key Ps[row_group + TR i][key] * Vs[key][col_group + TC t].
template <typename T, int D, int TC>
__device__ __forceinline__ void tile_accumulate_pv(
    const float* Ps, const T* Vs, int row_group, int col_group,
    float (&acc)[4][TileGeometry<T, D, TC>::kColsPerThread]) {
  using G = TileGeometry<T, D, TC>;
#pragma unroll 4
  for (int key = 0; key < G::kKeys; ++key) {
    float p[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) p[i] = Ps[(row_group + G::kTR * i) * G::kPStride + key];
#pragma unroll
    for (int t = 0; t < G::kColsPerThread; ++t) {
      const float v = static_cast<float>(Vs[key * G::kKStride + col_group + TC * t]);
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[i][t] = fmaf(p[i], v, acc[i][t]);
    }
  }
}

// Where a query tile's keys come from. Positions 0, 1, ... of the tile's key sequence map to
// key indices; -1 means no key (padding, past the end, or an empty layout slot).
struct LayoutKeys {
  const int* index;  // this (batch, head, query block)'s row of block_index, max_count slots
  int count;         // kept blocks, already clamped to [0, max_count]
  int block_size;
  int num_blocks;
  int64_t length;
  __device__ __forceinline__ int64_t positions() const { return int64_t(count) * block_size; }
  __device__ __forceinline__ int64_t key(int64_t pos) const {
    if (pos >= positions()) return -1;
    const int block = index[pos / block_size];
    if (block < 0 || block >= num_blocks) return -1;  // flagged by check_layout_row
    const int64_t k = int64_t(block) * block_size + pos % block_size;
    return k < length ? k : -1;
  }
};

struct KeyRange {
  int64_t begin, end;  // keys begin .. end-1 (none when end <= begin)
  __device__ __forceinline__ int64_t positions() const { return end > begin ? end - begin : 0; }
  __device__ __forceinline__ int64_t key(int64_t pos) const {
    return pos < positions() ? begin + pos : -1;
  }
};

// FlashAttention-2 style forward of one query tile over the keys `keys` yields, with the causal
// rule key <= row + causal_offset and, with kWindow, key > row + causal_offset - window. kSoftcap:
// the logits are soft-capped (softcap_log2, QkvParams). Both are static switches, as
// FlashAttention-2's Is_local and Is_softcap. Writes out rows [row0, min(row0 + kRows,
// rows_end)) and their lse (natural log; -inf and a zero output for a row that sees no key).
// OutT is T, or float for a split-K partial that a merge combines.
template <typename T, int D, int TC, bool kSoftcap, bool kWindow, typename Keys, typename OutT>
__device__ __forceinline__ void flash_forward_tile(
    const T* q, const T* k, const T* v, OutT* out, float* lse, int64_t row0, int64_t rows_end,
    int64_t causal_offset, int64_t window, float scale_log2, float softcap_log2,
    const Keys& keys, char* smem) {
  using G = TileGeometry<T, D, TC>;
  float* Qs = reinterpret_cast<float*>(smem);
  T* Ks = reinterpret_cast<T*>(smem + G::kQBytes);
  T* Vs = reinterpret_cast<T*>(smem + G::kQBytes + G::kKBytes);
  float* Ps = reinterpret_cast<float*>(smem + G::kQBytes + 2 * G::kKBytes);
  int64_t* key_of = reinterpret_cast<int64_t*>(smem + G::kQBytes + 2 * G::kKBytes + G::kPBytes);

  const int row_group = threadIdx.x / TC;
  const int col_group = threadIdx.x % TC;

  load_query_tile<T, D, TC>(Qs, q, row0, rows_end, scale_log2);

  float m[4], l[4], acc[4][G::kColsPerThread];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int t = 0; t < G::kColsPerThread; ++t) acc[i][t] = 0.f;
  }

  const int64_t positions = keys.positions();
  for (int64_t pos0 = 0; pos0 < positions; pos0 += G::kKeys) {
    __syncthreads();  // the previous tile's readers are done with Ks, Vs, Ps, key_of
    if (threadIdx.x < G::kKeys) key_of[threadIdx.x] = keys.key(pos0 + threadIdx.x);
    auto key_at = [&](int r) { return keys.key(pos0 + r); };
    load_key_tile<T, D, TC>(Ks, k, key_at);
    load_key_tile<T, D, TC>(Vs, v, key_at);
    __syncthreads();

    float s[4][G::kKeysPerThread];
    tile_scores<T, D, TC>(Qs, Ks, row_group, col_group, s);
    if constexpr (kSoftcap) softcap_scores(s, softcap_log2);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = row0 + row_group + G::kTR * i;
      float row_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < G::kKeysPerThread; ++j) {
        const int64_t key = key_of[col_group + TC * j];
        const bool visible = row < rows_end && key >= 0 && key <= row + causal_offset &&
                             (!kWindow || key > row + causal_offset - window);
        s[i][j] = visible ? s[i][j] : -INFINITY;
        row_max = fmaxf(row_max, s[i][j]);
      }
      row_max = group_max<TC>(row_max);
      const float m_new = fmaxf(m[i], row_max);
      // A row that has seen no key yet keeps m = -inf; subtract 0 then so no inf - inf occurs.
      const float m_ref = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m[i] - m_ref);
      float row_sum = 0.f;
#pragma unroll
      for (int j = 0; j < G::kKeysPerThread; ++j) {
        const float p = exp2f(s[i][j] - m_ref);
        row_sum += p;
        Ps[(row_group + G::kTR * i) * G::kPStride + col_group + TC * j] = p;
      }
      l[i] = l[i] * alpha + group_sum<TC>(row_sum);
      m[i] = m_new;
#pragma unroll
      for (int t = 0; t < G::kColsPerThread; ++t) acc[i][t] *= alpha;
    }
    __syncthreads();
    tile_accumulate_pv<T, D, TC>(Ps, Vs, row_group, col_group, acc);
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = row0 + row_group + G::kTR * i;
    if (row >= rows_end) continue;
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
#pragma unroll
    for (int t = 0; t < G::kColsPerThread; ++t)
      out[row * D + col_group + TC * t] = static_cast<OutT>(acc[i][t] * inv);
    if (col_group == 0) lse[row] = l[i] > 0.f ? (m[i] + log2f(l[i])) * kLn2 : -INFINITY;
  }
}

template <typename T, int D, int TC>
constexpr size_t flash_forward_smem_bytes() {
  using G = TileGeometry<T, D, TC>;
  return G::kQBytes + 2 * G::kKBytes + G::kPBytes + G::kKeys * sizeof(int64_t);
}

}  // namespace cuda
}  // namespace cabattn
