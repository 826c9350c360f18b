// One cabattn::block_sparse_attention call on fixed sizes, through the dispatcher, for
// Nsight Compute (bench/profile_ncu.sh) and the CMake build test. Links libtorch only.
//
//   ncu_driver [cpu|cuda] [length] [head_dim] [kept_blocks] [--check]
//
// Defaults: cuda (cpu when built without CUDA), length 16384 (cuda) / 1024 (cpu), head_dim
// 128, bf16 on cuda / float32 on cpu, 32 query heads on 8 KV heads (cuda) or 4 on 2 (cpu),
// block size 128 (cuda) / 64 (cpu), each row keeping its first block, its diagonal and the
// blocks just before it, kept_blocks in all (default: a tenth of the row's blocks, at least 2).
// --check also runs the all-blocks layout and compares it with ATen's causal
// scaled_dot_product_attention (exit code 1 beyond tolerance).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>

namespace {

// The schema's arguments, the last the logit soft-cap (0: none, docs/operators.md).
using Attention = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, const at::Tensor&,
                                                     const at::Tensor&, int64_t, double, double);

// Row I keeps block 0, then I, I-1, ... until `kept` blocks (or all of 0..I).
std::tuple<at::Tensor, at::Tensor> sink_and_local_layout(int64_t batch, int64_t heads,
                                                         int64_t blocks, int64_t kept) {
  auto count = at::empty({batch, heads, blocks}, at::kInt);
  auto index = at::full({batch, heads, blocks, kept}, -1, at::kInt);
  auto* c = count.data_ptr<int>();
  auto* idx = index.data_ptr<int>();
  for (int64_t row = 0; row < batch * heads * blocks; ++row) {
    const int64_t I = row % blocks;
    const int64_t n = std::min(I + 1, kept);
    int* slots = idx + row * kept;
    int64_t slot = 0;
    if (n < I + 1) slots[slot++] = 0;  // the sink block, when the window does not reach it
    for (int64_t J = I - (n - slot) + 1; J <= I; ++J) slots[slot++] = static_cast<int>(J);
    c[row] = static_cast<int>(n);
  }
  return {count, index};
}

}  // namespace

int main(int argc, char** argv) {
  bool check = false;
  std::string args[4];
  int positional = 0;
  for (int a = 1; a < argc; ++a) {
    if (std::strcmp(argv[a], "--check") == 0) {
      check = true;
    } else if (positional < 4) {
      args[positional++] = argv[a];
    } else {
      std::fprintf(stderr, "usage: %s [cpu|cuda] [length] [head_dim] [kept_blocks] [--check]\n",
                   argv[0]);
      return 2;
    }
  }
#ifdef CABATTN_WITH_CUDA
  const std::string device_name = args[0].empty() ? "cuda" : args[0];
#else
  const std::string device_name = args[0].empty() ? "cpu" : args[0];
#endif
  if (device_name != "cpu" && device_name != "cuda") {
    std::fprintf(stderr, "device must be cpu or cuda, got %s\n", device_name.c_str());
    return 2;
  }
  const bool cuda = device_name == "cuda";
  const int64_t length = args[1].empty() ? (cuda ? 16384 : 1024) : std::atoll(args[1].c_str());
  const int64_t head_dim = args[2].empty() ? 128 : std::atoll(args[2].c_str());
  const int64_t block_size = cuda ? 128 : 64;
  const int64_t batch = 1, q_heads = cuda ? 32 : 4, kv_heads = cuda ? 8 : 2;
  const int64_t blocks = (length + block_size - 1) / block_size;
  const int64_t kept = args[3].empty() ? std::max<int64_t>(2, blocks / 10)
                                       : std::atoll(args[3].c_str());
  if (length < 1 || head_dim < 1 || kept < 1) {
    std::fprintf(stderr, "length, head_dim and kept_blocks must be >= 1\n");
    return 2;
  }

  const auto options = at::TensorOptions()
                           .device(cuda ? at::kCUDA : at::kCPU)
                           .dtype(cuda ? at::kBFloat16 : at::kFloat);
  at::manual_seed(0);
  auto q = at::randn({batch, q_heads, length, head_dim}, options);
  auto k = at::randn({batch, kv_heads, length, head_dim}, options);
  auto v = at::randn({batch, kv_heads, length, head_dim}, options);
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  auto attention = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("cabattn::block_sparse_attention", "")
                       .typed<Attention>();

  auto [count, index] = sink_and_local_layout(batch, q_heads, blocks, kept);
  count = count.to(options.device());
  index = index.to(options.device());
  auto [out, lse] = attention.call(q, k, v, count, index, block_size, scale, /*softcap=*/0.0);
  const double checksum = out.to(at::kDouble).sum().item<double>();
  const bool finite = out.isfinite().all().item<bool>() && lse.isfinite().all().item<bool>();
  std::printf("block_sparse_attention %s: B=%lld Hq=%lld Hkv=%lld L=%lld d=%lld bs=%lld "
              "kept=%lld/%lld blocks, checksum %.6e, %s\n",
              device_name.c_str(), (long long)batch, (long long)q_heads, (long long)kv_heads,
              (long long)length, (long long)head_dim, (long long)block_size, (long long)kept,
              (long long)blocks, checksum, finite ? "finite" : "NON-FINITE");
  if (!finite) return 1;

  if (check) {
    auto [all_count, all_index] = sink_and_local_layout(batch, q_heads, blocks, blocks);
    auto [dense_out, dense_lse] = attention.call(q, k, v, all_count.to(options.device()),
                                                 all_index.to(options.device()), block_size,
                                                 scale, /*softcap=*/0.0);
    const int64_t group = q_heads / kv_heads;
    auto expected = at::scaled_dot_product_attention(
        q.to(at::kDouble), k.to(at::kDouble).repeat_interleave(group, 1),
        v.to(at::kDouble).repeat_interleave(group, 1), {}, 0.0, /*is_causal=*/true, scale);
    const double error = (dense_out.to(at::kDouble) - expected).norm().item<double>() /
                         expected.norm().item<double>();
    const double tolerance = cuda ? 1e-2 : 1e-5;
    std::printf("all blocks vs causal SDPA (float64): relative error %.3e (tolerance %.0e)\n",
                error, tolerance);
    if (!(error <= tolerance)) return 1;
  }
  return 0;
}
