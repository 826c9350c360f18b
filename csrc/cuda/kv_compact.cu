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
// With keep, it also validates it: an index out of [0, src_rows) or not above its predecessor
// sets *bad (its row is skipped). Without keep (the copy back), it does nothing once *bad is
// set, so a bad keep leaves x untouched.
template <typename Unit>
__global__ void __launch_bounds__(kThreads)
gather_rows_kernel(Unit* __restrict__ dst, const Unit* __restrict__ src,
                   const int64_t* __restrict__ keep, int* __restrict__ bad, int64_t total,
                   int64_t kept, int64_t src_rows, int64_t dst_rows, int64_t row_units) {
  if (keep == nullptr && *bad != 0) return;
  for (int64_t e = int64_t(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * kThreads) {
    const int64_t unit = e % row_units;
    const int64_t slot = e / row_units;  // g * kept + i
    const int64_t g = slot / kept, i = slot % kept;
    int64_t from = i;
    if (keep != nullptr) {
      from = keep[slot];
      if (from < 0 || from >= src_rows || (i > 0 && from <= keep[slot - 1])) {
        if (unit == 0) atomicOr(bad, 1);
        continue;
      }
    }
    dst[(g * dst_rows + i) * row_units + unit] = src[(g * src_rows + from) * row_units + unit];
  }
}

template <typename Unit>
void gather_rows(void* dst, const void* src, const int64_t* keep, int* bad, int64_t groups,
                 int64_t kept, int64_t src_rows, int64_t dst_rows, int64_t row_bytes) {
  const int64_t row_units = row_bytes / int64_t(sizeof(Unit));
  const int64_t total = groups * kept * row_units;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads,
                                           std::numeric_limits<int>::max());
  launch_kernel(kOp, gather_rows_kernel<Unit>, static_cast<unsigned>(blocks), kThreads, 0,
                at::cuda::getCurrentCUDAStream(), static_cast<Unit*>(dst),
                static_cast<const Unit*>(src), keep, bad, total, kept, src_rows, dst_rows,
                row_units);
}

// The widest unit (16, 8, 4, 2 or 1 bytes) that divides the row and both pointers.
void gather_rows_widest(void* dst, const void* src, const int64_t* keep, int* bad,
                        int64_t groups, int64_t kept, int64_t src_rows, int64_t dst_rows,
                        int64_t row_bytes) {
  const auto fits = [&](int64_t width) {
    return row_bytes % width == 0 && reinterpret_cast<std::uintptr_t>(dst) % width == 0 &&
           reinterpret_cast<std::uintptr_t>(src) % width == 0;
  };
  if (fits(16)) {
    gather_rows<uint4>(dst, src, keep, bad, groups, kept, src_rows, dst_rows, row_bytes);
  } else if (fits(8)) {
    gather_rows<uint2>(dst, src, keep, bad, groups, kept, src_rows, dst_rows, row_bytes);
  } else if (fits(4)) {
    gather_rows<uint32_t>(dst, src, keep, bad, groups, kept, src_rows, dst_rows, row_bytes);
  } else if (fits(2)) {
    gather_rows<uint16_t>(dst, src, keep, bad, groups, kept, src_rows, dst_rows, row_bytes);
  } else {
    gather_rows<uint8_t>(dst, src, keep, bad, groups, kept, src_rows, dst_rows, row_bytes);
  }
}

// x is const like the CPU kernel's signature (the dispatcher needs one C++ signature per op);
// the schema's Tensor(a!) says it is written.
void kv_compact_cuda(const at::Tensor& x, const at::Tensor& keep) {
  check_kv_compact_args(kOp, x, keep);
  check_cuda(kOp, "x", x);

  const at::cuda::CUDAGuard guard(x.device());
  const int64_t groups = x.size(0) * x.size(1), kept = keep.size(2), length = x.size(2);
  if (groups == 0 || kept == 0) return;
  if (x.numel() == 0) return check_keep_values(kOp, keep.cpu(), length);  // nothing to move
  const int64_t row_bytes = x.numel() / (groups * length) * x.element_size();

  DeviceCheck check(kOp, keep, CheckedOp::kKvCompact);
  auto gathered = at::empty({groups, kept, row_bytes}, x.options().dtype(at::kByte));
  gather_rows_widest(gathered.data_ptr(), x.data_ptr(), keep.data_ptr<int64_t>(), check.flag(),
                     groups, kept, length, kept, row_bytes);
  gather_rows_widest(x.data_ptr(), gathered.data_ptr(), nullptr, check.flag(), groups, kept,
                     kept, length, row_bytes);
  check.raise_if_flagged([&] { check_keep_values(kOp, keep.cpu(), length); });
}

}  // namespace
}  // namespace cuda
}  // namespace cabattn

TORCH_LIBRARY_IMPL(CABATTN_CUDA_LIBRARY, CABATTN_CUDA_KEY, m) {
  m.impl("kv_compact_", &cabattn::cuda::kv_compact_cuda);
}
