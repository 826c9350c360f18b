// kv_compact_: in-place compaction of a KV cache (or any per-(batch, head) buffer) to sorted
// keep indices, x[b, h, :K] = x[b, h, keep[b, h]]. Because keep is sorted and unique,
// keep[i] >= i: walking i upwards only ever reads rows that have not been overwritten yet, so
// one forward pass per (b, h) needs no scratch copy. Runs of consecutive kept rows move as one
// memmove (a run may overlap its destination).
#include <ATen/Parallel.h>

#include <cstring>

#include "checks.h"

namespace cabattn {
namespace {

void kv_compact_cpu(const at::Tensor& x, const at::Tensor& keep) {
  const char* op = "cabattn::kv_compact_";
  check_kv_compact_args(op, x, keep);
  check_keep_values(op, keep, x.size(2));
  const int64_t heads = x.size(0) * x.size(1), length = x.size(2), kept = keep.size(2);
  const int64_t* idx = keep.const_data_ptr<int64_t>();
  if (x.numel() == 0) return;

  const int64_t row_bytes = x.numel() / (heads * length) * x.element_size();
  char* data = static_cast<char*>(x.data_ptr());
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t head = begin; head < end; ++head) {
      const int64_t* row = idx + head * kept;
      char* base = data + head * length * row_bytes;
      for (int64_t i = 0; i < kept;) {
        int64_t run = 1;
        while (i + run < kept && row[i + run] == row[i] + run) ++run;
        if (row[i] != i)
          std::memmove(base + i * row_bytes, base + row[i] * row_bytes, run * row_bytes);
        i += run;
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cabattn, m) { m.def("kv_compact_(Tensor(a!) x, Tensor keep) -> ()"); }

TORCH_LIBRARY_IMPL(cabattn, CPU, m) { m.impl("kv_compact_", &kv_compact_cpu); }

}  // namespace cabattn
