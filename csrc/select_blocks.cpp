// select_blocks: the per-row block selection every mask-protocol method ends in, returned as a
// padded CSR layout (reference.select_blocks).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "checks.h"

namespace cabattn {
namespace {

// select_blocks: each row planned by check_select_blocks_values (checks.h), then its top-k picks.
// The plans come per count row (count_rows of them: 1, heads or batch * heads); the (batch,
// head) `bh` reads count row bh % count_rows.

template <typename score_t>
void select_kernel(const score_t* score1, const score_t* score2,
                   const std::vector<RowPlan>& plans, int64_t heads, int64_t blocks,
                   int64_t max_count, int32_t* count_out, int32_t* index_out) {
  const int64_t count_rows = blocks == 0 ? 1 : static_cast<int64_t>(plans.size()) / blocks;
  at::parallel_for(0, heads * blocks, 16, [&](int64_t begin, int64_t end) {
    std::vector<char> kept(blocks);
    std::vector<int64_t> candidates;
    candidates.reserve(blocks);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head = task / blocks, row = task % blocks;
      const RowPlan& p = plans[(head % count_rows) * blocks + row];
      std::fill(kept.begin(), kept.end(), 0);
      mark_forced(p, row, kept.data());
      const std::pair<const score_t*, int64_t> rules[] = {{score1, p.by_score1},
                                                          {score2, p.by_score2}};
      for (const auto& [scores, picks] : rules) {
        if (picks <= 0) continue;
        const score_t* s = scores + (head * blocks + p.source) * blocks;
        // NaN ranks lowest (as -inf); among equal scores the lower index wins.
        auto rank = [s](int64_t j) {
          const double v = static_cast<double>(s[j]);
          return std::isnan(v) ? -std::numeric_limits<double>::infinity() : v;
        };
        auto better = [&rank](int64_t a, int64_t b) {
          const double ra = rank(a), rb = rank(b);
          return ra != rb ? ra > rb : a < b;
        };
        candidates.clear();
        for (int64_t j = 0; j <= p.source; ++j)
          if (!kept[j]) candidates.push_back(j);
        std::nth_element(candidates.begin(), candidates.begin() + (picks - 1), candidates.end(),
                         better);
        for (int64_t c = 0; c < picks; ++c) kept[candidates[c]] = 1;
      }
      int32_t* index = index_out + task * max_count;
      int64_t n = 0;
      for (int64_t j = 0; j <= row; ++j)
        if (kept[j]) index[n++] = static_cast<int32_t>(j);
      TORCH_INTERNAL_ASSERT(n == p.count, "select_blocks planned ", p.count, " blocks, kept ", n);
      std::fill(index + n, index + max_count, -1);
      count_out[task] = static_cast<int32_t>(n);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> select_blocks_cpu(
    const std::optional<at::Tensor>& score1, const std::optional<at::Tensor>& score2,
    const at::Tensor& n_recent, const at::Tensor& n_sink, const at::Tensor& n_score1,
    const at::Tensor& n_score2, int64_t shift, int64_t max_count) {
  const char* op = "cabattn::select_blocks";
  check_select_blocks_args(op, score1, score2, n_recent, n_sink, n_score1, n_score2, shift,
                           max_count);
  const std::vector<RowPlan> plans =
      check_select_blocks_values(op, score1.has_value(), score2.has_value(), n_recent, n_sink,
                                 n_score1, n_score2, shift, max_count);
  const int64_t blocks = n_recent.size(-1);

  const at::Tensor& ref = score1 ? *score1 : *score2;
  const int64_t batch = ref.size(0), heads = ref.size(1);
  const auto int_options = n_recent.options().dtype(at::kInt);
  at::Tensor count = at::empty({batch, heads, blocks}, int_options);
  at::Tensor index = at::empty({batch, heads, blocks, max_count}, int_options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ref.scalar_type(), "select_blocks",
                                  [&] {
    select_kernel<scalar_t>(score1 ? score1->const_data_ptr<scalar_t>() : nullptr,
                            score2 ? score2->const_data_ptr<scalar_t>() : nullptr, plans,
                            batch * heads, blocks, max_count, count.mutable_data_ptr<int32_t>(),
                            index.mutable_data_ptr<int32_t>());
  });
  return {count, index};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cabattn, m) {
  m.def("select_blocks(Tensor? score1, Tensor? score2, Tensor n_recent, Tensor n_sink, "
        "Tensor n_score1, Tensor n_score2, int shift, int max_count) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cabattn, CPU, m) { m.impl("select_blocks", &select_blocks_cpu); }

}  // namespace cabattn
