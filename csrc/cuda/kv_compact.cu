// CUDA path of cabattn::kv_compact_: x[b, h, :K] = x[b, h, keep[b, h]] in place.
//
// keep[i] >= i, so an in-place forward gather could read a row another thread block has
// already overwritten. Gathering into a temporary and copying back is race-free and keeps the
// whole chip busy (a per-(b, h) in-order walk would use only B * H thread blocks, often 8).
// Both steps are one kernel that moves rows in the widest aligned unit, 16 bytes for K/V rows.
#include "cuda_common.cuh"

#include <limits>

namespace cabattn {
namespace cuda {
namespace {

constexpr const char* kOp = "cabattn::kv_compact_";
constexpr int kThreads = 256;

// dst[g, i, :] = src[g, keep ? keep[g, i] : i, :] for i < kept, rows of row_units units.
template <typename Unit>
__global__ void __launch_bounds__(kThreads)
gather_rows_kernel(Unit* __restrict__ dst, const Unit* __restrict__ src,
                   const int64_t* __restrict__ keep, int64_t total, int64_t kept,
                   int64_t src_rows, int64_t dst_rows, int64_t row_units) {
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * kThreads) {
    const int64_t unit = e % row_units;
    const int64_t slot = e / row_units;  // g * kept + i
    const int64_t g = slot / kept, i = slot % kept;
    int64_t from = i;
    if (keep != nullptr) {
      from = keep[slot];
      CUDA_KERNEL_ASSERT(from >= 0 && from < src_rows);
      if (from < 0 || from >= src_rows) continue;
    }
    dst[(g * dst_rows + i) * row_units + unit] = src[(g * src_rows + from) * row_units + unit];
  }
}

template <typename Unit>
void gather_rows(void* dst, const void* src, const int64_t* keep, int64_t groups, int64_t kept,
                 int64_t src_rows, int64_t dst_rows, int64_t row_bytes) {
  const int64_t row_units = row_bytes / int64_t(sizeof(Unit));
  const int64_t total = groups * kept * row_units;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads,
                                           std::numeric_limits<int>::max());
  launch_kernel(kOp, gather_rows_kernel<Unit>, static_cast<unsigned>(blocks), kThreads, 0,
                at::cuda::getCurrentCUDAStream(), static_cast<Unit*>(dst),
                static_cast<const Unit*>(src), keep, total, kept, src_rows, dst_rows, row_units);
}

// The widest unit (16, 8, 4, 2 or 1 bytes) that divides the row and both pointers.
void gather_rows_widest(void* dst, const void* src, const int64_t* keep, int64_t groups,
                        int64_t kept, int64_t src_rows, int64_t dst_rows, int64_t row_bytes) {
  const auto fits = [&](int64_t width) {
    return row_bytes % width == 0 && reinterpret_cast<std::uintptr_t>(dst) % width == 0 &&
           reinterpret_cast<std::uintptr_t>(src) % width == 0;
  };
  if (fits(16)) {
    gather_rows<uint4>(dst, src, keep, groups, kept, src_rows, dst_rows, row_bytes);
  } else if (fits(8)) {
    gather_rows<uint2>(dst, src, keep, groups, kept, src_rows, dst_rows, row_bytes);
  } else if (fits(4)) {
    gather_rows<uint32_t>(dst, src, keep, groups, kept, src_rows, dst_rows, row_bytes);
  } else if (fits(2)) {
    gather_rows<uint16_t>(dst, src, keep, groups, kept, src_rows, dst_rows, row_bytes);
  } else {
    gather_rows<uint8_t>(dst, src, keep, groups, kept, src_rows, dst_rows, row_bytes);
  }
}

// x is const like the CPU kernel's signature (the dispatcher needs one C++ signature per op);
// the schema's Tensor(a!) says it is written.
void kv_compact_cuda(const at::Tensor& x, const at::Tensor& keep) {
  TORCH_CHECK(x.dim() >= 3, kOp, ": x must be [batch, heads, length, ...], got shape ",
              x.sizes());
  check_rank(kOp, "keep", keep, 3, "[batch, heads, kept]");
  check_cuda(kOp, "x", x);
  check_same_device(kOp, "keep", keep, x, "x");
  check_dtype(kOp, "keep", keep, at::kLong);
  check_contiguous(kOp, "x", x);
  check_contiguous(kOp, "keep", keep);
  TORCH_CHECK(keep.size(0) == x.size(0) && keep.size(1) == x.size(1), kOp,
              ": keep's batch and heads ", keep.sizes().slice(0, 2), " must match x's ",
              x.sizes().slice(0, 2));
  TORCH_CHECK(keep.size(2) <= x.size(2), kOp, ": keep holds ", keep.size(2),
              " indices per row but x has only ", x.size(2), " entries");

  const at::cuda::CUDAGuard guard(x.device());
  const int64_t groups = x.size(0) * x.size(1), kept = keep.size(2), length = x.size(2);
  if (groups == 0 || kept == 0 || x.numel() == 0) return;
  const int64_t row_bytes = x.numel() / (groups * length) * x.element_size();

  auto gathered = at::empty({groups, kept, row_bytes}, x.options().dtype(at::kByte));
  gather_rows_widest(gathered.data_ptr(), x.data_ptr(), keep.data_ptr<int64_t>(), groups, kept,
                     length, kept, row_bytes);
  gather_rows_widest(x.data_ptr(), gathered.data_ptr(), nullptr, groups, kept, kept, length,
                     row_bytes);
}

}  // namespace
}  // namespace cuda
}  // namespace cabattn

TORCH_LIBRARY_IMPL(CABATTN_CUDA_LIBRARY, CABATTN_CUDA_KEY, m) {
  m.impl("kv_compact_", &cabattn::cuda::kv_compact_cuda);
}
