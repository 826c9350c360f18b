// Launcher of the tensor-core block_sparse_attention kernel (flash_tc.cuh): fills the params
// struct and picks the instantiation by static switches on dtype, head dim and block size.
#include "cuda_common.cuh"
#include "flash_tc.cuh"
#include "tensor_core.h"

namespace cabattn {
namespace cuda {
namespace {

constexpr const char* kOp = "cabattn::block_sparse_attention";

// block_size 16, 32, 64, 128 -> one warp per 16 rows of the query block; `kWarps` is the constant.
#define CABATTN_BLOCK_SIZE_SWITCH(BLOCK_SIZE, ...)                                  \
  [&] {                                                                             \
    switch (BLOCK_SIZE) {                                                           \
      case 16: { constexpr int kWarps = 1; return __VA_ARGS__(); }                  \
      case 32: { constexpr int kWarps = 2; return __VA_ARGS__(); }                  \
      case 64: { constexpr int kWarps = 4; return __VA_ARGS__(); }                  \
      case 128: { constexpr int kWarps = 8; return __VA_ARGS__(); }                 \
      default: TORCH_CHECK(false, kOp, ": block_size ", BLOCK_SIZE,                 \
                           " is not supported; valid: 16, 32, 64, 128");             \
    }                                                                               \
  }()

template <typename Traits>
void launch(const FlashFwdParams& p, int batch) {
  auto kernel = block_sparse_attention_tc_kernel<Traits>;
  set_dynamic_smem(kOp, kernel, Traits::kSmemBytes);
  const dim3 grid(p.num_blocks, p.q_heads, batch);
  kernel<<<grid, Traits::kThreads, Traits::kSmemBytes, at::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void block_sparse_attention_tensor_core(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& block_count,
                                        const at::Tensor& block_index, int64_t block_size,
                                        double scale, at::Tensor& out, at::Tensor& lse) {
  TORCH_CHECK(q.size(2) < (int64_t(1) << 30), kOp, ": length ", q.size(2),
              " is too long for the tensor-core kernel; at most 2^30 tokens");
  FlashFwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_batch_stride = q.stride(0), p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_head_stride = v.stride(1), p.v_row_stride = v.stride(2);
  p.o_batch_stride = out.stride(0), p.o_head_stride = out.stride(1);
  p.o_row_stride = out.stride(2);
  p.lse_batch_stride = lse.stride(0), p.lse_head_stride = lse.stride(1);
  p.q_heads = static_cast<int>(q.size(1));
  p.kv_heads = static_cast<int>(k.size(1));
  p.q_per_kv = p.q_heads / p.kv_heads;
  p.length = static_cast<int>(q.size(2));
  p.scale_log2 = static_cast<float>(scale) * kLog2e;
  p.block_count = block_count.data_ptr<int>();
  p.block_index = block_index.data_ptr<int>();
  p.block_size = static_cast<int>(block_size);
  p.block_size_log2 = 0;
  while ((1 << p.block_size_log2) < block_size) ++p.block_size_log2;
  p.num_blocks = static_cast<int>(block_count.size(2));
  p.max_count = static_cast<int>(block_index.size(3));
  const int batch = static_cast<int>(q.size(0));

  AT_DISPATCH_SWITCH(q.scalar_type(), kOp,
      AT_DISPATCH_CASE(at::kHalf, [&] {
        CABATTN_DISPATCH_HEAD_DIM(kOp, q.size(3), [&] {
          CABATTN_BLOCK_SIZE_SWITCH(block_size, [&] {
            launch<FlashTcTraits<scalar_t, kHeadDim, kWarps>>(p, batch);
          });
        });
      })
      AT_DISPATCH_CASE(at::kBFloat16, [&] {
        CABATTN_DISPATCH_HEAD_DIM(kOp, q.size(3), [&] {
          CABATTN_BLOCK_SIZE_SWITCH(block_size, [&] {
            launch<FlashTcTraits<scalar_t, kHeadDim, kWarps>>(p, batch);
          });
        });
      }));
}

}  // namespace cuda
}  // namespace cabattn
