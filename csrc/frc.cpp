// frc_scores: block Forman-Ricci curvature from coarse queries and keys (METHODS.md 2.3).
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

constexpr double kEps = 1e-8;

// ---------------------------------------------------------------------------------------------
// frc_scores. The matrices are [M, M] per head (M ~ 64 blocks), so the whole computation runs in
// float64 as the reference does: the kernel then equals the reference up to summation order and
// the selection built on it does not depend on the input precision.

// In place on r [heads, M, M]: A = (R - lo) / (hi - lo + 1e-8) over the causal part J <= I,
// 0 above the diagonal; lo/hi are each row's (row_minmax) or each head's (global_minmax).
void minmax_normalise(double* r, int64_t heads, int64_t blocks, int64_t normalization) {
  at::parallel_for(0, heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t head = begin; head < end; ++head) {
      double* a = r + head * blocks * blocks;
      double lo = std::numeric_limits<double>::infinity(), hi = -lo;
      if (normalization == kGlobalMinmax) {
        for (int64_t i = 0; i < blocks; ++i)
          for (int64_t j = 0; j <= i; ++j) {
            lo = std::min(lo, a[i * blocks + j]);
            hi = std::max(hi, a[i * blocks + j]);
          }
      }
      for (int64_t i = 0; i < blocks; ++i) {
        double* row = a + i * blocks;
        if (normalization == kRowMinmax) {
          lo = *std::min_element(row, row + i + 1);
          hi = *std::max_element(row, row + i + 1);
        }
        for (int64_t j = 0; j <= i; ++j) row[j] = (row[j] - lo) / (hi - lo + kEps);
        std::fill(row + i + 1, row + blocks, 0.0);
      }
    }
  });
}

at::Tensor frc_scores_cpu(const at::Tensor& qc, const at::Tensor& kc, double scale, double lam,
                          int64_t formula, int64_t normalization) {
  const char* op = "cabattn::frc_scores";
  check_frc_scores_args(op, qc, kc, scale, lam, formula, normalization);
  const int64_t batch = qc.size(0), q_heads = qc.size(1), blocks = qc.size(2), dim = qc.size(3);
  const int64_t kv_heads = kc.size(1), group = q_heads / kv_heads;
  at::Tensor out = at::empty({batch, q_heads, blocks, blocks}, qc.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;

  // GQA without copies: the `group` query heads of a KV head form one [group * M, d] operand.
  const at::Tensor q64 = qc.to(at::kDouble).view({batch, kv_heads, group * blocks, dim});
  const at::Tensor k64 = kc.to(at::kDouble);
  at::Tensor a = at::matmul(q64, k64.transpose(-1, -2)).mul_(scale)
                     .view({batch, q_heads, blocks, blocks}).contiguous();
  minmax_normalise(a.mutable_data_ptr<double>(), batch * q_heads, blocks, normalization);
  const at::Tensor t = at::matmul(a, a).contiguous();  // 2-hop paths I -> K -> J

  const double* a_data = a.const_data_ptr<double>();
  const double* t_data = t.const_data_ptr<double>();
  float* f = out.mutable_data_ptr<float>();
  at::parallel_for(0, batch * q_heads * blocks, 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % blocks;
      const double* a_row = a_data + row * blocks;
      const double* t_row = t_data + row * blocks;
      float* f_row = f + row * blocks;
      for (int64_t j = 0; j <= i; ++j) {
        const double value = formula == kMultiplicative
                                 ? a_row[j] / (1.0 + lam * t_row[j] / (a_row[j] + kEps))
                                 : a_row[j] - lam * t_row[j] / static_cast<double>(i + 1);
        f_row[j] = static_cast<float>(value);
      }
      std::fill(f_row + i + 1, f_row + blocks, 0.0f);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// select_blocks: each row planned by check_select_blocks_values (checks.h), then its top-k picks.

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
  check_select_blocks_args(op, score1, score2, n_recent, n_sink, n_score1, n_score2, shift,
                           max_count);
  const std::vector<RowPlan> plans =
      check_select_blocks_values(op, score1.has_value(), score2.has_value(), n_recent, n_sink,
                                 n_score1, n_score2, shift, max_count);
  const int64_t blocks = n_recent.size(0);

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
  m.def("frc_scores(Tensor qc, Tensor kc, float scale, float lam, int formula, "
        "int normalization) -> Tensor");
  m.def("select_blocks(Tensor? score1, Tensor? score2, Tensor n_recent, Tensor n_sink, "
        "Tensor n_score1, Tensor n_score2, int shift, int max_count) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cabattn, CPU, m) {
  m.impl("frc_scores", &frc_scores_cpu);
  m.impl("select_blocks", &select_blocks_cpu);
}

}  // namespace cabattn
