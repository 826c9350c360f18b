// Test-only kernels of the emulation layer (tests/kernels/test_emulation.py), written as CUDA
// kernels and launched like csrc/cuda's: torch.ops.cabattn_emu_test.<op>, CPU tensors.
#include "cuda/cuda_common.cuh"

namespace cabattn {
namespace cuda {
namespace {

constexpr const char* kOp = "cabattn_emu_test";

// out[t] = sum over `rounds` of the neighbour's value x[(t + 1) % n] + round, exchanged through
// shared memory. Without the barriers a thread may read its neighbour's slot before the
// neighbour wrote it (poison), or after it moved on to the next round.
__global__ void neighbour_kernel(const float* x, float* out, int rounds, bool barriers) {
  extern __shared__ __align__(16) char smem[];
  float* slot = reinterpret_cast<float*>(smem);
  const int n = blockDim.x, t = threadIdx.x;
  float sum = 0.f;
  for (int round = 0; round < rounds; ++round) {
    slot[t] = x[blockIdx.x * n + t] + round;
    if (barriers) __syncthreads();
    sum += slot[(t + 1) % n];
    if (barriers) __syncthreads();
  }
  out[blockIdx.x * n + t] = sum;
}

at::Tensor neighbour_sum(const at::Tensor& x, int64_t rounds, bool barriers) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "neighbour_sum: x must be contiguous float32 [blocks, threads]");
  auto out = at::empty_like(x);
  launch_kernel(kOp, neighbour_kernel, dim3(x.size(0)), dim3(x.size(1)),
                x.size(1) * sizeof(float), nullptr, x.data_ptr<float>(), out.data_ptr<float>(),
                static_cast<int>(rounds), barriers);
  return out;
}

// out[w, lane] = the chosen warp intrinsic with every lane passing (value[w, lane], b, width).
enum ShuffleMode { kIdx = 0, kUp = 1, kDown = 2, kXor = 3, kBallot = 4 };

template <typename T>
__global__ void shuffle_kernel(const T* value, T* out, int mode, int b, int width) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const T v = value[i];
  T r{};
  switch (mode) {
    case kIdx: r = __shfl_sync(0xffffffffu, v, b, width); break;
    case kUp: r = __shfl_up_sync(0xffffffffu, v, unsigned(b), width); break;
    case kDown: r = __shfl_down_sync(0xffffffffu, v, unsigned(b), width); break;
    case kXor: r = __shfl_xor_sync(0xffffffffu, v, b, width); break;
    case kBallot: r = static_cast<T>(__ballot_sync(0xffffffffu, v != T(0))); break;
  }
  out[i] = r;
}

at::Tensor shuffle(const at::Tensor& value, int64_t mode, int64_t b, int64_t width) {
  TORCH_CHECK(value.dim() == 1 && value.numel() % 32 == 0 && value.is_contiguous(),
              "shuffle: value must be contiguous, one value per lane of whole warps");
  auto out = at::empty_like(value);
  AT_DISPATCH_SWITCH(value.scalar_type(), "shuffle",
                     AT_DISPATCH_CASE(at::kInt, [&] {
                       launch_kernel(kOp, shuffle_kernel<int32_t>, dim3(1),
                                     dim3(value.numel()), 0, nullptr,
                                     value.data_ptr<int32_t>(), out.data_ptr<int32_t>(),
                                     int(mode), int(b), int(width));
                     }) AT_DISPATCH_CASE(at::kLong, [&] {
                       launch_kernel(kOp, shuffle_kernel<int64_t>, dim3(1),
                                     dim3(value.numel()), 0, nullptr,
                                     value.data_ptr<int64_t>(), out.data_ptr<int64_t>(),
                                     int(mode), int(b), int(width));
                     }) AT_DISPATCH_CASE(at::kDouble, [&] {
                       launch_kernel(kOp, shuffle_kernel<double>, dim3(1),
                                     dim3(value.numel()), 0, nullptr,
                                     value.data_ptr<double>(), out.data_ptr<double>(),
                                     int(mode), int(b), int(width));
                     }));
  return out;
}

// A pointer through __shfl_sync (as ptx.cuh's ldmatrix emulation passes row addresses):
// out[lane] = *(the pointer of lane src_lane) = value[src_lane].
__global__ void pointer_shuffle_kernel(const int64_t* value, int64_t* out, int src_lane) {
  const int64_t* mine = value + threadIdx.x;
  out[threadIdx.x] = *__shfl_sync(0xffffffffu, mine, src_lane);
}

at::Tensor pointer_shuffle(const at::Tensor& value, int64_t src_lane) {
  TORCH_CHECK(value.numel() == 32 && value.scalar_type() == at::kLong,
              "pointer_shuffle: 32 int64 values");
  auto out = at::empty_like(value);
  launch_kernel(kOp, pointer_shuffle_kernel, dim3(1), dim3(32), 0, nullptr,
                value.data_ptr<int64_t>(), out.data_ptr<int64_t>(), int(src_lane));
  return out;
}

// __syncthreads_count over the block: out[t] = number of threads with flag != 0.
__global__ void count_kernel(const int* flag, int* out) {
  out[threadIdx.x] = __syncthreads_count(flag[threadIdx.x]);
}

at::Tensor syncthreads_count(const at::Tensor& flag) {
  auto out = at::empty_like(flag);
  launch_kernel(kOp, count_kernel, dim3(1), dim3(flag.numel()), 0, nullptr,
                flag.data_ptr<int>(), out.data_ptr<int>());
  return out;
}

// Writes out[block] = the block's linear index; the launch configuration is the test's.
__global__ void config_kernel(int* out) {
  if (threadIdx.x == 0 && threadIdx.y == 0 && threadIdx.z == 0)
    out[(blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x] = 1;
}

at::Tensor launch_config(at::IntArrayRef grid, at::IntArrayRef block, int64_t dynamic_shared,
                         int64_t opt_in) {
  TORCH_CHECK(grid.size() == 3 && block.size() == 3, "launch_config: 3-D grid and block");
  if (opt_in > 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(config_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(opt_in)));
  } else {
    C10_CUDA_CHECK(cudaFuncSetAttribute(config_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        emu::kMaxDynamicSharedDefault));
  }
  const int64_t blocks = grid[0] * grid[1] * grid[2];
  auto out = at::zeros({std::min<int64_t>(blocks, 1 << 20)}, at::kInt);
  launch_kernel(kOp, config_kernel, dim3(grid[0], grid[1], grid[2]),
                dim3(block[0], block[1], block[2]), size_t(dynamic_shared), nullptr,
                out.data_ptr<int>());
  return out;
}

// A device-side assertion that fails in one thread of one block.
__global__ void assert_kernel(const int* x, int* out) {
  const int v = x[blockIdx.x * blockDim.x + threadIdx.x];
  CUDA_KERNEL_ASSERT(v >= 0);
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

at::Tensor assert_nonnegative(const at::Tensor& x) {
  auto out = at::empty_like(x);
  launch_kernel(kOp, assert_kernel, dim3(x.size(0)), dim3(x.size(1)), 0, nullptr,
                x.data_ptr<int>(), out.data_ptr<int>());
  return out;
}

// Lanes at or past `exit_from` return before the warp's __shfl_xor_sync: a hang or undefined
// result on a GPU.
__global__ void early_exit_kernel(float* out, int exit_from) {
  if (int(threadIdx.x) >= exit_from) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, float(threadIdx.x), 1);
}

at::Tensor early_exit_shuffle(int64_t exit_from) {
  auto out = at::zeros({32}, at::kFloat);
  launch_kernel(kOp, early_exit_kernel, dim3(1), dim3(32), 0, nullptr, out.data_ptr<float>(),
                int(exit_from));
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace cabattn

TORCH_LIBRARY(cabattn_emu_test, m) {
  m.def("neighbour_sum(Tensor x, int rounds, bool barriers) -> Tensor",
        &cabattn::cuda::neighbour_sum);
  m.def("shuffle(Tensor value, int mode, int b, int width) -> Tensor", &cabattn::cuda::shuffle);
  m.def("pointer_shuffle(Tensor value, int src_lane) -> Tensor",
        &cabattn::cuda::pointer_shuffle);
  m.def("syncthreads_count(Tensor flag) -> Tensor", &cabattn::cuda::syncthreads_count);
  m.def("launch_config(int[] grid, int[] block, int dynamic_shared, int opt_in) -> Tensor",
        &cabattn::cuda::launch_config);
  m.def("assert_nonnegative(Tensor x) -> Tensor", &cabattn::cuda::assert_nonnegative);
  m.def("early_exit_shuffle(int exit_from) -> Tensor", &cabattn::cuda::early_exit_shuffle);
}
