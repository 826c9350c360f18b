// frc_scores: block Forman-Ricci curvature from coarse queries and keys (docs/block_statistics.md).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "checks.h"
#include "modes.h"

namespace cabattn {
namespace {

constexpr double kEps = 1e-8;

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

}  // namespace

TORCH_LIBRARY_FRAGMENT(cabattn, m) {
  m.def("frc_scores(Tensor qc, Tensor kc, float scale, float lam, int formula, "
        "int normalization) -> Tensor");
}

TORCH_LIBRARY_IMPL(cabattn, CPU, m) { m.impl("frc_scores", &frc_scores_cpu); }

}  // namespace cabattn
