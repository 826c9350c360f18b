// select_blocks: the per-row block selection every mask-protocol method ends in, returned as a
// padded CSR layout (reference.select_blocks).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

namespace cabattn {
namespace {

// How many blocks each rule contributes depends only on the per-row counts, not
// on the scores, so it is planned once per row (and checked against max_count) before any
// scores are read.

struct RowPlan {
  int64_t source;   // row whose candidates 0..source the rule ranks (row - shift); < 0: none
  int64_t recent_from, sinks_to;  // forced: [recent_from, source] and [0, sinks_to)
  int64_t by_score1, by_score2;   // picks, already clamped to the free candidates
  int64_t count;
};

void check_count_vector(const char* op, const char* name, const at::Tensor& t,
                        const at::Tensor& ref, int64_t blocks) {
  check_rank(op, name, t, 1, "[num_blocks] per-row counts");
  check_dtype(op, name, t, at::kInt);
  check_same_device(op, name, t, ref, "n_recent");
  check_contiguous(op, name, t);
  TORCH_CHECK(t.size(0) == blocks, op, ": ", name, " has ", t.size(0), " rows but n_recent has ",
              blocks);
  const int32_t* v = t.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < blocks; ++i)
    TORCH_CHECK(v[i] >= 0, op, ": ", name, "[", i, "] = ", v[i], " is negative; counts are >= 0");
}

void check_scores(const char* op, const char* name, const at::Tensor& s, const at::Tensor& ref,
                  int64_t blocks) {
  check_rank(op, name, s, 4, "[batch, heads, num_blocks, num_blocks]");
  const auto dtype = s.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, ": ", name, " has dtype ", dtype,
              "; supported: float32, float64, float16, bfloat16");
  check_same_device(op, name, s, ref, "n_recent");
  check_contiguous(op, name, s);
  TORCH_CHECK(s.size(2) == blocks && s.size(3) == blocks, op, ": ", name, " must be [batch, "
              "heads, ", blocks, ", ", blocks, "] to match n_recent's ", blocks, " rows, got ",
              s.sizes());
}

// The blocks a row keeps whatever the scores: its diagonal, the recent ones, the sinks.
void mark_forced(const RowPlan& p, int64_t row, char* kept) {
  kept[row] = 1;
  for (int64_t j = p.recent_from; j <= p.source; ++j) kept[j] = 1;
  for (int64_t j = 0; j < p.sinks_to; ++j) kept[j] = 1;
}

std::vector<RowPlan> plan_rows(const char* op, const int32_t* n_recent, const int32_t* n_sink,
                               const int32_t* n_score1, const int32_t* n_score2,
                               int64_t blocks, int64_t shift, int64_t max_count) {
  std::vector<RowPlan> plans(blocks);
  std::vector<char> kept(blocks);
  for (int64_t row = 0; row < blocks; ++row) {
    RowPlan& p = plans[row];
    p.source = row - shift;
    p.recent_from = std::max<int64_t>(p.source + 1 - n_recent[row], 0);
    p.sinks_to = std::min<int64_t>(n_sink[row], p.source + 1);
    std::fill(kept.begin(), kept.end(), 0);
    mark_forced(p, row, kept.data());
    const int64_t forced = std::count(kept.begin(), kept.begin() + row + 1, 1);
    const int64_t candidates = std::max<int64_t>(p.source + 1, 0);  // 0..source
    const int64_t free = candidates - std::count(kept.begin(), kept.begin() + candidates, 1);
    p.by_score1 = std::min<int64_t>(n_score1[row], free);
    p.by_score2 = std::min<int64_t>(n_score2[row], free - p.by_score1);
    p.count = forced + p.by_score1 + p.by_score2;
    TORCH_CHECK(p.count <= max_count, op, ": row ", row, " keeps ", p.count,
                " blocks, more than max_count=", max_count);
  }
  return plans;
}

template <typename score_t>
void select_kernel(const score_t* score1, const score_t* score2,
                   const std::vector<RowPlan>& plans, int64_t heads, int64_t blocks,
                   int64_t max_count, int32_t* count_out, int32_t* index_out) {
  at::parallel_for(0, heads * blocks, 16, [&](int64_t begin, int64_t end) {
    std::vector<char> kept(blocks);
    std::vector<int64_t> candidates;
    candidates.reserve(blocks);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head = task / blocks, row = task % blocks;
      const RowPlan& p = plans[row];
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
  TORCH_CHECK(score1.has_value() || score2.has_value(), op,
              ": give score1 or score2 (they fix batch and heads); both are None");
  TORCH_CHECK(shift == 0 || shift == 1, op, ": shift ", shift,
              " is not supported; valid: 1 (strict causal selection), 0 (block)");
  TORCH_CHECK(max_count >= 1, op, ": max_count must be >= 1, got ", max_count);
  check_rank(op, "n_recent", n_recent, 1, "[num_blocks] per-row counts");
  const int64_t blocks = n_recent.size(0);
  check_count_vector(op, "n_recent", n_recent, n_recent, blocks);
  check_count_vector(op, "n_sink", n_sink, n_recent, blocks);
  check_count_vector(op, "n_score1", n_score1, n_recent, blocks);
  check_count_vector(op, "n_score2", n_score2, n_recent, blocks);
  if (score1) check_scores(op, "score1", *score1, n_recent, blocks);
  if (score2) check_scores(op, "score2", *score2, n_recent, blocks);
  if (score1 && score2) {
    TORCH_CHECK(score1->sizes() == score2->sizes() &&
                    score1->scalar_type() == score2->scalar_type(),
                op, ": score1 and score2 must share shape and dtype, got ", score1->sizes(), " ",
                score1->scalar_type(), " and ", score2->sizes(), " ", score2->scalar_type());
  }
  const int32_t* picks1 = n_score1.const_data_ptr<int32_t>();
  const int32_t* picks2 = n_score2.const_data_ptr<int32_t>();
  for (int64_t row = 0; row < blocks; ++row) {
    TORCH_CHECK(score1 || picks1[row] == 0, op, ": n_score1[", row, "] = ", picks1[row],
                " asks for picks by score1, but score1 is None");
    TORCH_CHECK(score2 || picks2[row] == 0, op, ": n_score2[", row, "] = ", picks2[row],
                " asks for picks by score2, but score2 is None");
  }
  const std::vector<RowPlan> plans =
      plan_rows(op, n_recent.const_data_ptr<int32_t>(), n_sink.const_data_ptr<int32_t>(), picks1,
                picks2, blocks, shift, max_count);

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
