// Launcher of the tensor-core block_scores kernel (flash_tc.cuh): one thread block per
// (query block, query head, batch).
#include "flash_launch.cuh"
#include "flash_tc.cuh"
#include "tensor_core.cuh"

namespace cabattn {
namespace cuda {

void block_scores_tensor_core(const at::Tensor& q, const at::Tensor& k, int64_t block_size,
                              double scale, double softcap, at::Tensor& block_sum,
                              at::Tensor& block_max) {
  constexpr const char* kOp = "cabattn::block_scores";
  FlashFwdParams p = flash_params(kOp, q, k, at::Tensor(), block_size, scale, softcap);
  p.block_sum = block_sum.data_ptr<float>();
  p.block_max = block_max.data_ptr<float>();
  p.scores_batch_stride = block_sum.stride(0), p.scores_head_stride = block_sum.stride(1);
  p.scores_row_stride = block_sum.stride(2);
  const dim3 grid(p.num_blocks, p.q_heads, p.batch);
  CABATTN_TENSOR_CORE_SWITCH(kOp, q.scalar_type(), p.head_dim, block_size, softcap, [&] {
    using Traits = FlashTcTraits<scalar_t, kHeadDim, kWarps>;
    launch_flash(kOp, block_scores_tc_kernel<Traits, kSoftcap>, grid, Traits::kThreads,
                 Traits::kScoresSmemBytes, p);
  });
}

}  // namespace cuda
}  // namespace cabattn
