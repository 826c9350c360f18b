// CUDA kernel of cabattn::block_sparse_attention: one thread block per (batch, query head,
// query tile), the tile inside one query block, walking only the key blocks of that block's
// CSR row (attention_tile.cuh does the FlashAttention-2 style work); kSoftcap soft-caps the
// logits (a static switch, docs/operators.md, Model features).
#include "attention_tile.cuh"
#include "flash_launch.cuh"
#include "tensor_core.cuh"

namespace cabattn {
namespace cuda {
namespace {

constexpr const char* kOp = "cabattn::block_sparse_attention";

struct SparseParams : QkvParams {
  int block_size, num_blocks, max_count, tiles_per_block;
};

// Flags in *bad a layout row that breaks check_block_layout_values' contract (count in
// 1..min(I + 1, max_count), indices strictly ascending within 0..I), one thread per row. The
// attention kernel still reads such a row safely (LayoutKeys skips indices out of range); the
// host then raises the CPU's error. A kernel of its own, so the attention kernel's registers
// do not pay for it.
__global__ void __launch_bounds__(256)
check_layout_kernel(const int* __restrict__ block_count, const int* __restrict__ block_index,
                    int64_t rows, int num_blocks, int max_count, int* __restrict__ bad) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const int I = static_cast<int>(row % num_blocks), count = block_count[row];
  bool wrong = count < 1 || count > min(I + 1, max_count);
  const int* index = block_index + row * max_count;
  for (int slot = 0, previous = -1; !wrong && slot < count; ++slot) {
    wrong = index[slot] <= previous || index[slot] > I;
    previous = index[slot];
  }
  if (wrong) atomicOr(bad, 1);
}

template <typename T, int D, int TC, bool kSoftcap>
__global__ void __launch_bounds__(kTileThreads)
block_sparse_attention_kernel(const T* __restrict__ q, const T* __restrict__ k,
                              const T* __restrict__ v, const int* __restrict__ block_count,
                              const int* __restrict__ block_index, T* __restrict__ out,
                              float* __restrict__ lse, SparseParams p) {
  using G = TileGeometry<T, D, TC>;
  extern __shared__ __align__(16) char smem[];
  const int64_t batch = blockIdx.z, length = p.length;
  const int head = blockIdx.y;  // an int: head / q_per_kv is a 32-bit division, no subroutine
  const int query_block = blockIdx.x / p.tiles_per_block;
  const int64_t row0 =
      int64_t(query_block) * p.block_size + int64_t(blockIdx.x % p.tiles_per_block) * G::kRows;
  if (row0 >= length) return;  // the unused tail of a partial last block

  const int64_t bh = batch * p.q_heads + head;
  const int64_t kv_bh = batch * p.kv_heads + head / p.q_per_kv;
  const int64_t layout_row = bh * p.num_blocks + query_block;
  LayoutKeys keys;
  keys.index = block_index + layout_row * p.max_count;
  keys.count = min(max(block_count[layout_row], 0), p.max_count);
  keys.block_size = p.block_size;
  keys.num_blocks = p.num_blocks;
  keys.length = length;
  flash_forward_tile<T, D, TC, kSoftcap, /*kWindow=*/false>(
      q + bh * length * D, k + kv_bh * length * D, v + kv_bh * length * D,
      out + bh * length * D, lse + bh * length, row0, length, /*causal_offset=*/0,
      /*window=*/0, p.scale_log2, p.softcap_log2, keys, smem);
}

template <typename T, int D, int TC, bool kSoftcap>
void launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
            const at::Tensor& block_count, const at::Tensor& block_index, at::Tensor& out,
            at::Tensor& lse, SparseParams p) {
  using G = TileGeometry<T, D, TC>;
  p.tiles_per_block = p.block_size / G::kRows;
  const dim3 grid(p.num_blocks * p.tiles_per_block, p.q_heads, p.batch);
  const size_t smem = flash_forward_smem_bytes<T, D, TC>();
  auto kernel = block_sparse_attention_kernel<T, D, TC, kSoftcap>;
  set_dynamic_smem(kOp, kernel, smem);
  launch_kernel(kOp, kernel, grid, G::kThreads, smem, at::cuda::getCurrentCUDAStream(),
                q.data_ptr<T>(), k.data_ptr<T>(), v.data_ptr<T>(), block_count.data_ptr<int>(),
                block_index.data_ptr<int>(), out.data_ptr<T>(), lse.data_ptr<float>(), p);
}

std::tuple<at::Tensor, at::Tensor> block_sparse_attention_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& block_count,
    const at::Tensor& block_index, int64_t block_size, double scale, double softcap) {
  check_block_sparse_attention_args(kOp, q, k, v, block_count, block_index, block_size, scale,
                                    softcap);
  check_cuda(kOp, "q", q);
  check_aligned16(kOp, "q", q);
  check_aligned16(kOp, "k", k);
  check_aligned16(kOp, "v", v);
  const int64_t batch = q.size(0), q_heads = q.size(1), length = q.size(2);
  const int64_t blocks = num_blocks(length, block_size);

  const at::cuda::CUDAGuard guard(q.device());
  auto out = at::empty_like(q);
  auto lse = at::empty({batch, q_heads, length}, q.options().dtype(at::kFloat));
  const auto check_layout_on_host = [&] {
    check_block_layout_values(kOp, block_count.cpu(), block_index.cpu());
  };
  if (q.numel() == 0) {  // head_dim 0: nothing to compute, the layout is still checked
    check_layout_on_host();
    return {out, lse};
  }
  DeviceCheck check(kOp, q, CheckedOp::kBlockSparseAttention);
  const int64_t rows = block_count.numel();
  launch_kernel(kOp, check_layout_kernel, static_cast<unsigned>((rows + 255) / 256), 256, 0,
                at::cuda::getCurrentCUDAStream(), block_count.data_ptr<int>(),
                block_index.data_ptr<int>(), rows, static_cast<int>(blocks),
                static_cast<int>(block_index.size(3)), check.flag());

  SparseParams p{qkv_params(kOp, q, k, v, scale, softcap)};
  p.block_size = static_cast<int>(block_size);
  p.num_blocks = static_cast<int>(blocks);
  p.max_count = static_cast<int>(block_index.size(3));
  p.tiles_per_block = 1;

  if (uses_tensor_cores(q))  // fp16/bf16: tensor cores; fp32 stays on the CUDA cores
    block_sparse_attention_tensor_core(q, k, v, block_count, block_index, block_size, scale,
                                       softcap, out, lse);
  else  // fp32: the CUDA-core kernels
  AT_DISPATCH_SWITCH(q.scalar_type(), kOp, AT_DISPATCH_CASE(at::kFloat, [&] {
    CABATTN_DISPATCH_HEAD_DIM(kOp, p.head_dim, [&] {
      CABATTN_BOOL_SWITCH(softcap > 0, kSoftcap, [&] {
        // The query tile must stay inside one query block: 16 rows for block_size 16, 32 for
        // 32, 64 otherwise.
        if (block_size == 16) {
          launch<scalar_t, kHeadDim, 32, kSoftcap>(q, k, v, block_count, block_index, out, lse,
                                                   p);
        } else if (block_size == 32) {
          launch<scalar_t, kHeadDim, 16, kSoftcap>(q, k, v, block_count, block_index, out, lse,
                                                   p);
        } else {
          launch<scalar_t, kHeadDim, 8, kSoftcap>(q, k, v, block_count, block_index, out, lse,
                                                  p);
        }
      });
    });
  }));
  check.raise_if_flagged(check_layout_on_host);
  return {out, lse};
}

}  // namespace
}  // namespace cuda
}  // namespace cabattn

TORCH_LIBRARY_IMPL(CABATTN_CUDA_LIBRARY, CABATTN_CUDA_KEY, m) {
  m.impl("block_sparse_attention", &cabattn::cuda::block_sparse_attention_cuda);
}
