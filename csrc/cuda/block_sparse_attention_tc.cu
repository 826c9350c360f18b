// Launcher of the tensor-core block_sparse_attention kernel (flash_tc.cuh): one thread block
// per (query block, query head, batch).
#include "flash_launch.cuh"
#include "flash_tc.cuh"
#include "tensor_core.cuh"

namespace cabattn {
namespace cuda {

void block_sparse_attention_tensor_core(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& v, const at::Tensor& block_count,
                                        const at::Tensor& block_index, int64_t block_size,
                                        double scale, double softcap, at::Tensor& out,
                                        at::Tensor& lse) {
  constexpr const char* kOp = "cabattn::block_sparse_attention";
  FlashFwdParams p = flash_params(kOp, q, k, v, block_size, scale, softcap);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.o_batch_stride = out.stride(0), p.o_head_stride = out.stride(1);
  p.o_row_stride = out.stride(2);
  p.lse_batch_stride = lse.stride(0), p.lse_head_stride = lse.stride(1);
  p.block_count = block_count.data_ptr<int>();
  p.block_index = block_index.data_ptr<int>();
  p.max_count = static_cast<int>(block_index.size(3));
  const dim3 grid(p.num_blocks, p.q_heads, p.batch);
  CABATTN_TENSOR_CORE_SWITCH(kOp, q.scalar_type(), p.head_dim, block_size, softcap, [&] {
    using Traits = FlashTcTraits<scalar_t, kHeadDim, kWarps>;
    launch_flash(kOp, block_sparse_attention_tc_kernel<Traits, kSoftcap>, grid, Traits::kThreads,
                 Traits::kSmemBytes, p);
  });
}

}  // namespace cuda
}  // namespace cabattn
