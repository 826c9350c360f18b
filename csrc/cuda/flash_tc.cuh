// Tensor-core (fp16/bf16) kernels on the FlashAttention-2 design: block_sparse_attention and
// block_scores (the latter at the end of this file; it shares the Q K^T machinery).
//
// A thread block owns one query block (block_size rows, one warp per 16 rows) and walks the key
// blocks of that block's CSR row in tiles of kBlockN keys:
//   - Q (kept in registers as mma A fragments for the whole walk), K and V tiles come to shared
//     memory by cp.async; K and V are double-buffered, the next tile's copy overlapping this
//     tile's math;
//   - S = Q K^T by mma.sync m16n8k16 (fp32 accumulation), K fragments by ldmatrix.x4;
//   - online softmax on the accumulator fragments: a thread holds 2 rows (group, group + 8) of
//     its warp's 16, and the row's 4 holders are one quad, so row reductions are 2 shuffles;
//   - P is rounded to T pairs in registers and is directly the A operand of O += P V, whose V
//     fragments come from ldmatrix.x4.trans (no shared-memory round trip for P);
//   - only tiles that may hold a key past a row (the diagonal block, a partial tile, an
//     out-of-range index) are masked; interior tiles skip the per-element test;
//   - kSoftcap (a static switch, as FlashAttention-2's Is_softcap) soft-caps the scores before
//     the mask (docs/operators.md, Model features); without it the kernel has none of that code.
// Shared-memory rows are swizzled (16-byte chunk c of row r lives at chunk c ^ (r % 8)), so the
// 8 row addresses of an ldmatrix phase hit 8 different bank groups.
//
// Every PTX instruction goes through ptx.cuh, so this header also builds for the CPU emulation
// (CABATTN_EMU); it includes no ATen.
#pragma once

#include <cmath>
#include <cstdint>

#include "flash_params.cuh"
#include "ptx.cuh"

namespace cabattn {
namespace cuda {

// Kernel traits: element type, head dim and warps (= block_size / 16) fix everything else.
// Head dim 256 (Gemma 3) takes tiles of 32 keys in every shape: double-buffered K and V then
// need 96 KiB (4 warps; 128 KiB for 8), so two 4-warp blocks share an SM as at 64 and 128.
template <typename T, int kHeadDim_, int kWarps_>
struct FlashTcTraits {
  using Element = T;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  // Thread blocks per SM the register budget must allow: 8 warps per SM in every shape
  // (255 registers a thread at most, as FlashAttention-2 plans its tiles).
  static constexpr int kMinBlocksPerSm = 8 / kWarps;
  static constexpr int kBlockM = 16 * kWarps;  // query rows = the query block
  // Keys per tile: 64, or 32 for the 1- and 2-warp blocks, which have fewer threads to load
  // and share a tile among fewer warps, and at head dim 256 (shared memory, above).
  static constexpr int kBlockN = kWarps >= 4 && kHeadDim <= 128 ? 64 : 32;
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks of a row
  static constexpr int kKSteps = kHeadDim / 16;  // k-slices of Q K^T
  static constexpr int kSTiles = kBlockN / 8;    // n-tiles of S per warp
  static constexpr int kOTiles = kHeadDim / 8;   // n-tiles of O per warp
  static constexpr int kQElems = kBlockM * kHeadDim;
  static constexpr int kTileElems = kBlockN * kHeadDim;
  static constexpr int kStages = 2;
  // block_sparse_attention: Q, then K and V for each stage.
  static constexpr size_t kSmemBytes = size_t(kQElems + 2 * kStages * kTileElems) * sizeof(T);
  // block_scores: a key tile covers kSlots key blocks (or part of one), kSlotKeys keys each;
  // Q, K for each stage, then each warp's (sum, max) per slot.
  static constexpr int kSlotKeys = kBlockM < kBlockN ? kBlockM : kBlockN;
  static constexpr int kSlots = kBlockN / kSlotKeys;
  static constexpr size_t kScoresSmemBytes =
      size_t(kQElems + kStages * kTileElems) * sizeof(T) + size_t(kWarps) * kSlots * 2 * sizeof(float);
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256, "head dim 64, 128, 256");
  static_assert(kChunks >= 8, "the swizzle permutes 8 chunks");
  static_assert(kThreads % kChunks == 0 && (kBlockN * kChunks) % kThreads == 0,
                "whole rows per loader pass");
};

// Element offset of (row, 16-byte chunk) in a swizzled [rows][kHeadDim] tile.
template <int kHeadDim>
__device__ __forceinline__ int swizzled(int row, int chunk) {
  return row * kHeadDim + ((chunk ^ (row & 7)) << 3);
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(ptx::kFullMask, x, 1));
  return fmaxf(x, __shfl_xor_sync(ptx::kFullMask, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(ptx::kFullMask, x, 1);
  return x + __shfl_xor_sync(ptx::kFullMask, x, 2);
}

// The running maximum m (log2 units) of fragment row h (0: lo, s[.][0..1]; 1: hi, s[.][2..3])
// once the tile's scores s are seen: the online softmax's step shared by both kernels.
template <int kSTiles>
__device__ __forceinline__ float updated_row_max(const float (&s)[kSTiles][4], int h, float m,
                                                 float scale_log2) {
  float row_max = -INFINITY;
#pragma unroll
  for (int j = 0; j < kSTiles; ++j) row_max = fmaxf(row_max, fmaxf(s[j][2 * h], s[j][2 * h + 1]));
  return fmaxf(m, quad_max(row_max) * scale_log2);
}

// The logit soft-cap on a warp's raw scores s = q . k: each becomes cap * tanh(s * scale_log2 /
// cap) (SoftcapLog2), already in log2 units, so the caller scales by 1, not scale_log2, after.
template <int kSTiles>
__device__ __forceinline__ void softcap_scores(float (&s)[kSTiles][4], float scale_log2,
                                               float softcap_log2) {
  const SoftcapLog2 softcap(softcap_log2);
#pragma unroll
  for (int j = 0; j < kSTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[j][e] = softcap(s[j][e] * scale_log2);
}

// The keys of one query block's CSR row: position pos (0 .. positions - 1) of the walk is key
// index[pos / block_size] * block_size + pos % block_size; -1 for a key that does not exist
// (an out-of-range block index, or past the sequence end).
struct LayoutRow {
  const int* index;
  int positions;
  int block_size_log2, num_blocks, length;
  int query_block;

  __device__ __forceinline__ int block_at(int pos) const {
    return __ldg(index + (pos >> block_size_log2));
  }
  __device__ __forceinline__ int key(int pos) const {
    if (pos >= positions) return -1;
    const int block = block_at(pos);
    const int k = (block << block_size_log2) + (pos & ((1 << block_size_log2) - 1));
    return block >= 0 && block < num_blocks && k < length ? k : -1;
  }
  // True when every position of [pos0, pos0 + n) exists and lies in a block before the query
  // block, so every row of the query block sees every key of the tile.
  __device__ __forceinline__ bool interior(int pos0, int n) const {
    if (pos0 + n > positions) return false;
    for (int pos = pos0; pos < pos0 + n; pos += 1 << block_size_log2) {
      const int block = block_at(pos);
      if (block < 0 || block >= query_block) return false;
    }
    return true;
  }
};

// Copies rows of a [*, kHeadDim] tensor into a swizzled shared tile with cp.async: tile row r
// comes from source row row_of(r), or is zero-filled when row_of(r) < 0.
template <typename Traits, int kRows, typename RowOf>
__device__ __forceinline__ void copy_tile_async(typename Traits::Element* tile,
                                                const typename Traits::Element* src,
                                                int64_t row_stride, RowOf row_of) {
  constexpr int kRowsPerPass = Traits::kThreads / Traits::kChunks;
  static_assert(kRows % kRowsPerPass == 0, "whole passes");
  const int chunk = threadIdx.x % Traits::kChunks;
#pragma unroll
  for (int r = threadIdx.x / Traits::kChunks; r < kRows; r += kRowsPerPass) {
    const int source = row_of(r);
    const typename Traits::Element* from = source >= 0 ? src + source * row_stride + chunk * 8 : src;
    ptx::cp_async_16(tile + swizzled<Traits::kHeadDim>(r, chunk), from, source >= 0);
  }
}

// Lane roles of ldmatrix .x4: lanes 8i .. 8i+7 give the row addresses of matrix i.
struct LdmatrixLane {
  int row, matrix;
  __device__ __forceinline__ LdmatrixLane() : row(threadIdx.x % 8), matrix(threadIdx.x % 32 / 8) {}
};

// The A operand of Q K^T: the m16n8k16 fragments of this warp's 16 query rows of the swizzled
// Q tile, one per k-slice. Up to head dim 128 they stay in registers for the whole walk (loaded
// once, 64 registers at 128); at 256 they would take 128 registers beside O's 128 accumulators
// and ptxas spills, so each k-slice is read again from the Q tile where it is used (as
// FlashAttention-2 reads Q from shared memory).
template <typename Traits>
struct QFragments {
  static constexpr bool kInRegisters = Traits::kHeadDim <= 128;
  const typename Traits::Element* Qs;
  int warp;
  uint32_t frag[kInRegisters ? Traits::kKSteps : 1][4];

  __device__ __forceinline__ QFragments(const typename Traits::Element* Qs, int warp)
      : Qs(Qs), warp(warp) {}

  // Once the Q tile has landed in shared memory.
  __device__ __forceinline__ void load() {
    if constexpr (kInRegisters) {
#pragma unroll
      for (int ks = 0; ks < Traits::kKSteps; ++ks) load_slice(frag[ks], ks);
    }
  }

  // The fragment of k-slice ks (a compile-time index in the unrolled loops that call it).
  __device__ __forceinline__ const uint32_t (&slice(int ks))[4] {
    if constexpr (kInRegisters) {
      return frag[ks];
    } else {
      load_slice(frag[0], ks);
      return frag[0];
    }
  }

 private:
  __device__ __forceinline__ void load_slice(uint32_t (&f)[4], int ks) const {
    const LdmatrixLane ld;
    ptx::ldmatrix_x4(f, Qs + swizzled<Traits::kHeadDim>(16 * warp + ld.row + 8 * (ld.matrix % 2),
                                                        2 * ks + ld.matrix / 2));
  }
};

// s = Q K^T for this warp's 16 rows and the kBlockN keys of the swizzled K tile Kt:
// s[j] is the m16n8 accumulator of keys 8j .. 8j+7.
template <typename Traits>
__device__ __forceinline__ void warp_scores(float (&s)[Traits::kSTiles][4],
                                            QFragments<Traits>& q_frag,
                                            const typename Traits::Element* Kt) {
  const LdmatrixLane ld;
#pragma unroll
  for (int j = 0; j < Traits::kSTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
#pragma unroll
  for (int ks = 0; ks < Traits::kKSteps; ++ks) {
    const uint32_t(&a)[4] = q_frag.slice(ks);
#pragma unroll
    for (int np = 0; np < Traits::kSTiles / 2; ++np) {
      uint32_t kb[4];
      ptx::ldmatrix_x4(kb, Kt + swizzled<Traits::kHeadDim>(16 * np + ld.row + 8 * (ld.matrix / 2),
                                                           2 * ks + ld.matrix % 2));
      const uint32_t b0[2] = {kb[0], kb[1]}, b1[2] = {kb[2], kb[3]};
      ptx::mma_m16n8k16<typename Traits::Element>(s[2 * np], a, b0);
      ptx::mma_m16n8k16<typename Traits::Element>(s[2 * np + 1], a, b1);
    }
  }
}

// -inf where key_at(column) is absent (< 0) or after the row: columns 8j + 2quad + e of rows
// row_lo (s[j][0..1]) and row_hi (s[j][2..3]).
template <typename Traits, typename KeyAt>
__device__ __forceinline__ void mask_scores(float (&s)[Traits::kSTiles][4], int row_lo,
                                            int row_hi, KeyAt key_at) {
  const int quad = threadIdx.x % 4;
#pragma unroll
  for (int j = 0; j < Traits::kSTiles; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int key = key_at(8 * j + 2 * quad + e);
      if (key < 0 || key > row_lo) s[j][e] = -INFINITY;
      if (key < 0 || key > row_hi) s[j][2 + e] = -INFINITY;
    }
}

// In the anonymous namespace, as every kernel with dynamic shared memory: under CABATTN_EMU
// `extern __shared__ ... smem[]` names the translation unit's emulated buffer.
namespace {

template <typename Traits, bool kSoftcap>
__global__ void __launch_bounds__(Traits::kThreads, Traits::kMinBlocksPerSm)
block_sparse_attention_tc_kernel(const FlashFwdParams p) {
  using T = typename Traits::Element;
  constexpr int D = Traits::kHeadDim, kBlockN = Traits::kBlockN;
  extern __shared__ __align__(16) char smem[];
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = Qs + Traits::kQElems;                           // kStages tiles
  T* Vs = Ks + Traits::kStages * Traits::kTileElems;      // kStages tiles

  const int query_block = blockIdx.x, head = blockIdx.y, batch = blockIdx.z;
  const int kv_head = head / p.q_per_kv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int group = lane / 4, quad = lane % 4;
  const int row0 = query_block * Traits::kBlockM;  // kBlockM == block_size

  const T* q = static_cast<const T*>(p.q) + batch * p.q_batch_stride + head * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + batch * p.k_batch_stride + kv_head * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + batch * p.v_batch_stride + kv_head * p.v_head_stride;

  const int64_t layout_row = (int64_t(batch) * p.q_heads + head) * p.num_blocks + query_block;
  LayoutRow keys;
  keys.index = p.block_index + layout_row * p.max_count;
  const int count = min(max(__ldg(p.block_count + layout_row), 0), p.max_count);
  keys.positions = count << p.block_size_log2;
  keys.block_size_log2 = p.block_size_log2;
  keys.num_blocks = p.num_blocks;
  keys.length = p.length;
  keys.query_block = query_block;
  const int tiles = (keys.positions + kBlockN - 1) / kBlockN;

  auto load_kv = [&](int tile) {
    const int stage = tile % Traits::kStages;
    const int pos0 = tile * kBlockN;
    auto key_of = [&](int r) { return keys.key(pos0 + r); };
    copy_tile_async<Traits, kBlockN>(Ks + stage * Traits::kTileElems, k, p.k_row_stride, key_of);
    copy_tile_async<Traits, kBlockN>(Vs + stage * Traits::kTileElems, v, p.v_row_stride, key_of);
  };

  copy_tile_async<Traits, Traits::kBlockM>(Qs, q, p.q_row_stride, [&](int r) {
    return row0 + r < p.length ? row0 + r : -1;
  });
  if (tiles > 0) load_kv(0);
  ptx::cp_async_commit();

  // This thread's rows of the query block (group and group + 8 of its warp's 16).
  const int row_lo = row0 + 16 * warp + group, row_hi = row_lo + 8;
  const int warp_last_row = row0 + 16 * warp + 15;
  QFragments<Traits> q_frag(Qs, warp);
  float o[Traits::kOTiles][4];
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // l: this thread's partial sums
#pragma unroll
  for (int t = 0; t < Traits::kOTiles; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[t][e] = 0.f;

  const LdmatrixLane ld;
  // The factor that takes a score to log2 units: scale_log2, or 1 once soft-capped.
  const float score_scale = kSoftcap ? 1.f : p.scale_log2;

  for (int tile = 0; tile < tiles; ++tile) {
    if (tile + 1 < tiles) load_kv(tile + 1);
    ptx::cp_async_commit();
    ptx::cp_async_wait<1>();  // everything but the tile just issued has landed
    __syncthreads();
    if (tile == 0) q_frag.load();
    const int pos0 = tile * kBlockN;
    const bool masked = !keys.interior(pos0, kBlockN);
    // A warp whose rows all precede the tile's first key has nothing to add (keys ascend).
    const int first_key = masked ? keys.key(pos0) : -1;
    if (!(masked && first_key > warp_last_row)) {
      const T* Kt = Ks + (tile % Traits::kStages) * Traits::kTileElems;
      const T* Vt = Vs + (tile % Traits::kStages) * Traits::kTileElems;
      float s[Traits::kSTiles][4];
      warp_scores<Traits>(s, q_frag, Kt);
      if constexpr (kSoftcap) softcap_scores(s, p.scale_log2, p.softcap_log2);
      if (masked)
        mask_scores<Traits>(s, row_lo, row_hi, [&](int c) { return keys.key(pos0 + c); });

      // Online softmax, rows lo (h = 0: s[.][0..1]) and hi (h = 1: s[.][2..3]).
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float m_new = updated_row_max(s, h, m[h], score_scale);
        // A row that has seen no key keeps m = -inf; subtract 0 then so no inf - inf occurs.
        const float m_ref = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = exp2f(m[h] - m_ref);
        m[h] = m_new;
        float row_sum = 0.f;
#pragma unroll
        for (int j = 0; j < Traits::kSTiles; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pr = exp2f(fmaf(s[j][2 * h + e], score_scale, -m_ref));
            s[j][2 * h + e] = pr;
            row_sum += pr;
          }
        l[h] = l[h] * alpha + row_sum;
#pragma unroll
        for (int t = 0; t < Traits::kOTiles; ++t) {
          o[t][2 * h] *= alpha;
          o[t][2 * h + 1] *= alpha;
        }
      }

      // O += P V: the S accumulators of key slice kk are the A fragment of P's slice kk.
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        const uint32_t a[4] = {ptx::pack2<T>(s[2 * kk][0], s[2 * kk][1]),
                               ptx::pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                               ptx::pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                               ptx::pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int dp = 0; dp < Traits::kOTiles / 2; ++dp) {
          uint32_t vb[4];
          ptx::ldmatrix_x4_trans(vb, Vt + swizzled<D>(16 * kk + ld.row + 8 * (ld.matrix % 2),
                                                      2 * dp + ld.matrix / 2));
          const uint32_t b0[2] = {vb[0], vb[1]}, b1[2] = {vb[2], vb[3]};
          ptx::mma_m16n8k16<T>(o[2 * dp], a, b0);
          ptx::mma_m16n8k16<T>(o[2 * dp + 1], a, b1);
        }
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }
  ptx::cp_async_wait<0>();

  T* out = static_cast<T*>(p.out) + batch * p.o_batch_stride + head * p.o_head_stride;
  float* lse = p.lse + batch * p.lse_batch_stride + head * p.lse_head_stride;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = h == 0 ? row_lo : row_hi;
    const float sum = quad_sum(l[h]);
    if (row >= p.length) continue;
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    T* out_row = out + row * p.o_row_stride + 2 * quad;
#pragma unroll
    for (int t = 0; t < Traits::kOTiles; ++t)
      *reinterpret_cast<uint32_t*>(out_row + 8 * t) =
          ptx::pack2<T>(o[t][2 * h] * inv, o[t][2 * h + 1] * inv);
    if (quad == 0) lse[row] = sum > 0.f ? (m[h] + log2f(sum)) * 0.6931471805599453f : -INFINITY;
  }
}

// block_scores (docs/block_statistics.md) on the tensor cores: a thread block owns query block I
// (block_size rows, a warp per 16) and walks its causal keys 0 .. min((I + 1) * bs, L) - 1
// twice. The first walk gives each row's log-sum-exp (online max and sum of exp2, no P V); the
// second recomputes the scores and sums (Sblk[I, J]) and maxes (Gblk[I, J]) the probabilities
// p = exp2(s - lse) over the rows and the keys of each key block J. Two walks keep the state
// per row, never per (row, key block), so shared memory does not grow with the length.
template <typename Traits, bool kSoftcap>
__global__ void __launch_bounds__(Traits::kThreads, Traits::kMinBlocksPerSm)
block_scores_tc_kernel(const FlashFwdParams p) {
  using T = typename Traits::Element;
  constexpr int kBlockN = Traits::kBlockN, kBlockSize = Traits::kBlockM;
  constexpr int kSlots = Traits::kSlots, kSlotKeys = Traits::kSlotKeys;
  extern __shared__ __align__(16) char smem[];
  T* Qs = reinterpret_cast<T*>(smem);
  T* Ks = Qs + Traits::kQElems;  // kStages tiles
  float* partial = reinterpret_cast<float*>(Ks + Traits::kStages * Traits::kTileElems);

  const int I = p.num_blocks - 1 - blockIdx.x;  // the largest query blocks first
  const int head = blockIdx.y, batch = blockIdx.z;
  const int kv_head = head / p.q_per_kv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row0 = I * kBlockSize;
  const int keys_end = min(row0 + kBlockSize, p.length);
  const int tiles = (keys_end + kBlockN - 1) / kBlockN;

  const T* q = static_cast<const T*>(p.q) + batch * p.q_batch_stride + head * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + batch * p.k_batch_stride + kv_head * p.k_head_stride;
  float* sum_row = p.block_sum + batch * p.scores_batch_stride + head * p.scores_head_stride +
                   I * p.scores_row_stride;
  float* max_row = p.block_max + batch * p.scores_batch_stride + head * p.scores_head_stride +
                   I * p.scores_row_stride;

  // Step t of the two walks reads key tile t % tiles.
  auto load_k = [&](int step) {
    const int key0 = step % tiles * kBlockN;
    copy_tile_async<Traits, kBlockN>(Ks + step % Traits::kStages * Traits::kTileElems, k,
                                     p.k_row_stride,
                                     [&](int r) { return key0 + r < keys_end ? key0 + r : -1; });
  };
  copy_tile_async<Traits, kBlockSize>(Qs, q, p.q_row_stride, [&](int r) {
    return row0 + r < p.length ? row0 + r : -1;
  });
  load_k(0);
  ptx::cp_async_commit();

  const int row_lo = row0 + 16 * warp + lane / 4, row_hi = row_lo + 8;
  const int warp_last_row = row0 + 16 * warp + 15;
  QFragments<Traits> q_frag(Qs, warp);
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, lse2[2];
  float slot_sum = 0.f, slot_max = 0.f;  // thread `slot`'s running totals of its key block
  // The factor that takes a score to log2 units: scale_log2, or 1 once soft-capped.
  const float score_scale = kSoftcap ? 1.f : p.scale_log2;

  for (int step = 0; step < 2 * tiles; ++step) {
    if (step + 1 < 2 * tiles) load_k(step + 1);
    ptx::cp_async_commit();
    ptx::cp_async_wait<1>();
    __syncthreads();
    if (step == 0) q_frag.load();
    const bool first_walk = step < tiles;
    if (step == tiles) {  // every row's lse, log2 units; +inf past the end makes p = 0 there
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float total = quad_sum(l[h]);
        const int row = h == 0 ? row_lo : row_hi;
        lse2[h] = row < p.length && total > 0.f ? m[h] + log2f(total) : INFINITY;
      }
    }
    const int key0 = step % tiles * kBlockN;
    const bool masked = key0 + kBlockN - 1 > row0 || key0 + kBlockN > keys_end;
    float part_sum[kSlots], part_max[kSlots];
#pragma unroll
    for (int sl = 0; sl < kSlots; ++sl) part_sum[sl] = part_max[sl] = 0.f;
    if (!(masked && key0 > warp_last_row)) {
      float s[Traits::kSTiles][4];
      warp_scores<Traits>(s, q_frag, Ks + step % Traits::kStages * Traits::kTileElems);
      if constexpr (kSoftcap) softcap_scores(s, p.scale_log2, p.softcap_log2);
      if (masked)
        mask_scores<Traits>(s, row_lo, row_hi,
                            [&](int c) { return key0 + c < keys_end ? key0 + c : -1; });
      if (first_walk) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float m_new = updated_row_max(s, h, m[h], score_scale);
          const float m_ref = m_new == -INFINITY ? 0.f : m_new;
          float row_sum = 0.f;
#pragma unroll
          for (int j = 0; j < Traits::kSTiles; ++j)
            row_sum += exp2f(fmaf(s[j][2 * h], score_scale, -m_ref)) +
                       exp2f(fmaf(s[j][2 * h + 1], score_scale, -m_ref));
          l[h] = l[h] * exp2f(m[h] - m_ref) + row_sum;
          m[h] = m_new;
        }
      } else {
#pragma unroll
        for (int j = 0; j < Traits::kSTiles; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float prob = exp2f(fmaf(s[j][e], score_scale, -lse2[e / 2]));
            part_sum[8 * j / kSlotKeys] += prob;
            part_max[8 * j / kSlotKeys] = fmaxf(part_max[8 * j / kSlotKeys], prob);
          }
      }
    }
    if (!first_walk) {
      // The warp's totals per slot (every lane ends with them), then the block's, in warp
      // order so that the result does not depend on timing.
#pragma unroll
      for (int sl = 0; sl < kSlots; ++sl) {
#pragma unroll
        for (int offset = 1; offset < 32; offset *= 2) {
          part_sum[sl] += __shfl_xor_sync(ptx::kFullMask, part_sum[sl], offset);
          part_max[sl] = fmaxf(part_max[sl], __shfl_xor_sync(ptx::kFullMask, part_max[sl], offset));
        }
        if (lane == 0) {
          partial[2 * (warp * kSlots + sl)] = part_sum[sl];
          partial[2 * (warp * kSlots + sl) + 1] = part_max[sl];
        }
      }
      __syncthreads();
      const int sl = threadIdx.x;
      if (sl < kSlots) {
        for (int w = 0; w < Traits::kWarps; ++w) {
          slot_sum += partial[2 * (w * kSlots + sl)];
          slot_max = fmaxf(slot_max, partial[2 * (w * kSlots + sl) + 1]);
        }
        const int slot_begin = key0 + sl * kSlotKeys, slot_end = slot_begin + kSlotKeys;
        const int J = slot_begin / kBlockSize;
        if (J <= I && (slot_end % kBlockSize == 0 || slot_end >= keys_end)) {
          sum_row[J] = slot_sum;
          max_row[J] = slot_max;
          slot_sum = slot_max = 0.f;
        }
      }
    }
    __syncthreads();  // every warp is done with this stage (and `partial`) before reuse
  }
  ptx::cp_async_wait<0>();
  for (int J = I + 1 + threadIdx.x; J < p.num_blocks; J += Traits::kThreads) {
    sum_row[J] = 0.f;
    max_row[J] = 0.f;
  }
}

}  // namespace
}  // namespace cuda
}  // namespace cabattn
