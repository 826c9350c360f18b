// The argument checks of every operator, one function per operator, called by its CPU kernel
// (csrc/<op>.cpp) and its CUDA kernel (csrc/cuda/<op>.cu) alike: both run the same checks in
// the same order and raise the same words. Checks of values that live in device memory (block
// indices, keep indices, per-row counts) are the *_values functions: the CPU kernels call them
// on their inputs; a CUDA kernel flags a bad value on the device and, only then, calls the same
// function on host copies, so the error it raises is the CPU's (cuda_common.cuh, DeviceCheck).
#pragma once

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "common.h"
#include "modes.h"

namespace cabattn {

// ---------------------------------------------------------------------------------- coarsen

inline void check_coarsen_args(const char* op, const at::Tensor& x, int64_t block_size,
                               int64_t mode) {
  check_rank(op, "x", x, 4, "[batch, heads, length, head_dim]");
  check_attention_dtype(op, "x", x);
  check_contiguous(op, "x", x);
  check_block_size(op, block_size);
  TORCH_CHECK(mode == kMaxL2 || mode == kMean, op, ": mode ", mode,
              " is not supported; valid: 0 (max_l2), 1 (mean)");
}

// ----------------------------------------------------------------------------- block_scores

inline void check_block_scores_args(const char* op, const at::Tensor& q, const at::Tensor& k,
                                    int64_t block_size, double scale, double softcap) {
  check_qk(op, q, k);
  check_block_size(op, block_size);
  TORCH_CHECK(q.size(2) == k.size(2), op, ": q and k must have the same length (causal "
              "self-attention), got ", q.size(2), " and ", k.size(2));
  check_scale(op, scale);
  check_softcap(op, softcap);
}

// ------------------------------------------------------------------------------- frc_scores

inline void check_frc_scores_args(const char* op, const at::Tensor& qc, const at::Tensor& kc,
                                  double scale, double lam, int64_t formula,
                                  int64_t normalization) {
  check_qk(op, qc, kc);
  TORCH_CHECK(qc.size(2) == kc.size(2), op, ": qc and kc must have the same number of blocks, "
              "got ", qc.size(2), " and ", kc.size(2));
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  TORCH_CHECK(std::isfinite(lam) && lam >= 0, op, ": lam (lambda_redundancy) must be a finite "
              "number >= 0, got ", lam);
  TORCH_CHECK(formula == kAdditive || formula == kMultiplicative, op, ": formula ", formula,
              " is not supported; valid: 0 (additive), 1 (multiplicative)");
  TORCH_CHECK(normalization == kRowMinmax || normalization == kGlobalMinmax, op,
              ": normalization ", normalization,
              " is not supported; valid: 0 (row_minmax), 1 (global_minmax)");
}

// ---------------------------------------------------------------------------- select_blocks

// The per-row counts are int32 [num_blocks] (every batch row and head alike), [heads,
// num_blocks] (a count per head: per-head budgets) or [batch, heads, num_blocks]; all four
// share one shape (callers broadcast them).
inline void check_count_vector(const char* op, const char* name, const at::Tensor& t,
                               const at::Tensor& n_recent) {
  TORCH_CHECK(t.dim() >= 1 && t.dim() <= 3, op, ": ", name, " must be 1-D [num_blocks], 2-D "
              "[heads, num_blocks] or 3-D [batch, heads, num_blocks] per-row counts, got shape ",
              t.sizes());
  check_dtype(op, name, t, at::kInt);
  check_same_device(op, name, t, n_recent, "n_recent");
  check_contiguous(op, name, t);
  TORCH_CHECK(t.sizes() == n_recent.sizes(), op, ": ", name, " has shape ", t.sizes(),
              " but n_recent has ", n_recent.sizes(), "; the four counts must share one shape");
}

inline void check_scores(const char* op, const char* name, const at::Tensor& s,
                         const at::Tensor& n_recent) {
  const int64_t blocks = n_recent.size(-1);
  check_rank(op, name, s, 4, "[batch, heads, num_blocks, num_blocks]");
  const auto dtype = s.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, ": ", name, " has dtype ", dtype,
              "; supported: float32, float64, float16, bfloat16");
  check_same_device(op, name, s, n_recent, "n_recent");
  check_contiguous(op, name, s);
  TORCH_CHECK(s.size(2) == blocks && s.size(3) == blocks, op, ": ", name, " must be [batch, "
              "heads, ", blocks, ", ", blocks, "] to match n_recent's ", blocks, " rows, got ",
              s.sizes());
  // per-head counts: [heads, M] must match the scores' heads, [batch, heads, M] both
  const int64_t rank = n_recent.dim();
  TORCH_CHECK(rank == 1 || (s.size(1) == n_recent.size(rank - 2) &&
                            (rank == 2 || s.size(0) == n_recent.size(0))),
              op, ": per-head counts of shape ", n_recent.sizes(), " do not match ", name,
              "'s [batch, heads] ", s.sizes().slice(0, 2));
}

// Shapes, dtypes and devices; the counts' values are check_select_blocks_values'.
inline void check_select_blocks_args(const char* op, const std::optional<at::Tensor>& score1,
                                     const std::optional<at::Tensor>& score2,
                                     const at::Tensor& n_recent, const at::Tensor& n_sink,
                                     const at::Tensor& n_score1, const at::Tensor& n_score2,
                                     int64_t shift, int64_t max_count) {
  TORCH_CHECK(score1.has_value() || score2.has_value(), op,
              ": give score1 or score2 (they fix batch and heads); both are None");
  TORCH_CHECK(shift == 0 || shift == 1, op, ": shift ", shift,
              " is not supported; valid: 1 (strict causal selection), 0 (block)");
  TORCH_CHECK(max_count >= 1, op, ": max_count must be >= 1, got ", max_count);
  check_count_vector(op, "n_recent", n_recent, n_recent);
  check_count_vector(op, "n_sink", n_sink, n_recent);
  check_count_vector(op, "n_score1", n_score1, n_recent);
  check_count_vector(op, "n_score2", n_score2, n_recent);
  if (score1) check_scores(op, "score1", *score1, n_recent);
  if (score2) check_scores(op, "score2", *score2, n_recent);
  if (score1 && score2) {
    TORCH_CHECK(score1->sizes() == score2->sizes() &&
                    score1->scalar_type() == score2->scalar_type(),
                op, ": score1 and score2 must share shape and dtype, got ", score1->sizes(), " ",
                score1->scalar_type(), " and ", score2->sizes(), " ", score2->scalar_type());
  }
}

// How many blocks each rule of a row contributes depends only on the per-row counts, not on
// the scores, so it is planned once per row (and checked against max_count) before any score
// is read.
struct RowPlan {
  int64_t source;   // row whose candidates 0..source the rule ranks (row - shift); < 0: none
  int64_t recent_from, sinks_to;  // forced: [recent_from, source] and [0, sinks_to)
  int64_t by_score1, by_score2;   // picks, already clamped to the free candidates
  int64_t count;
};

// The blocks a row keeps whatever the scores: its diagonal, the recent ones, the sinks.
inline void mark_forced(const RowPlan& p, int64_t row, char* kept) {
  kept[row] = 1;
  for (int64_t j = p.recent_from; j <= p.source; ++j) kept[j] = 1;
  for (int64_t j = 0; j < p.sinks_to; ++j) kept[j] = 1;
}

// "[i]", "[h, i]" or "[b, h, i]": where flat entry `flat` of counts shaped like `t` sits.
inline std::string count_position(const at::Tensor& t, int64_t flat) {
  std::string where = "]";
  for (int64_t dim = t.dim() - 1; dim >= 0; --dim) {
    where = std::to_string(flat % t.size(dim)) + (dim == t.dim() - 1 ? "" : ", ") + where;
    flat /= t.size(dim);
  }
  return "[" + where;
}

// The counts' values (CPU tensors, already through check_select_blocks_args): none negative,
// no picks by a score tensor that is None, no row over max_count. Returns each row's plan,
// count row after count row (plans[c * num_blocks + row] for count row c: 0 for [num_blocks]
// counts, the head for [heads, num_blocks], batch * heads + head for [batch, heads,
// num_blocks]).
inline std::vector<RowPlan> check_select_blocks_values(
    const char* op, bool has_score1, bool has_score2, const at::Tensor& n_recent,
    const at::Tensor& n_sink, const at::Tensor& n_score1, const at::Tensor& n_score2,
    int64_t shift, int64_t max_count) {
  const int64_t blocks = n_recent.size(-1), entries = n_recent.numel();
  const std::pair<const char*, const at::Tensor*> vectors[] = {
      {"n_recent", &n_recent}, {"n_sink", &n_sink}, {"n_score1", &n_score1},
      {"n_score2", &n_score2}};
  for (const auto& [name, t] : vectors) {
    TORCH_CHECK(t->device().is_cpu(), op, ": check_select_blocks_values reads CPU tensors");
    const int32_t* v = t->const_data_ptr<int32_t>();
    for (int64_t i = 0; i < entries; ++i)
      TORCH_CHECK(v[i] >= 0, op, ": ", name, count_position(*t, i), " = ", v[i],
                  " is negative; counts are >= 0");
  }
  const int32_t* recent = n_recent.const_data_ptr<int32_t>();
  const int32_t* sink = n_sink.const_data_ptr<int32_t>();
  const int32_t* picks1 = n_score1.const_data_ptr<int32_t>();
  const int32_t* picks2 = n_score2.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < entries; ++i) {
    TORCH_CHECK(has_score1 || picks1[i] == 0, op, ": n_score1", count_position(n_score1, i),
                " = ", picks1[i], " asks for picks by score1, but score1 is None");
    TORCH_CHECK(has_score2 || picks2[i] == 0, op, ": n_score2", count_position(n_score2, i),
                " = ", picks2[i], " asks for picks by score2, but score2 is None");
  }
  std::vector<RowPlan> plans(entries);
  std::vector<char> kept(blocks);
  for (int64_t i = 0; i < entries; ++i) {
    const int64_t row = i % blocks;
    RowPlan& p = plans[i];
    p.source = row - shift;
    p.recent_from = std::max<int64_t>(p.source + 1 - recent[i], 0);
    p.sinks_to = std::min<int64_t>(sink[i], p.source + 1);
    std::fill(kept.begin(), kept.end(), 0);
    mark_forced(p, row, kept.data());
    const int64_t forced = std::count(kept.begin(), kept.begin() + row + 1, 1);
    const int64_t candidates = std::max<int64_t>(p.source + 1, 0);  // 0..source
    const int64_t free = candidates - std::count(kept.begin(), kept.begin() + candidates, 1);
    p.by_score1 = std::min<int64_t>(picks1[i], free);
    p.by_score2 = std::min<int64_t>(picks2[i], free - p.by_score1);
    p.count = forced + p.by_score1 + p.by_score2;
    TORCH_CHECK(p.count <= max_count, op, ": row ", row,
                n_recent.dim() == 1 ? std::string() : " of counts" + count_position(n_recent, i),
                " keeps ", p.count, " blocks, more than max_count=", max_count);
  }
  return plans;
}

// ------------------------------------------------------------------- block_sparse_attention

// Shapes, dtypes and devices; the layout's values are check_block_layout_values' (common.h).
inline void check_block_sparse_attention_args(const char* op, const at::Tensor& q,
                                              const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& block_count,
                                              const at::Tensor& block_index,
                                              int64_t block_size, double scale,
                                              double softcap) {
  check_qkv(op, q, k, v);
  TORCH_CHECK(q.size(2) == k.size(2), op, ": q and k must have the same length (causal "
              "self-attention), got ", q.size(2), " and ", k.size(2));
  check_block_size(op, block_size);
  check_scale(op, scale);
  check_softcap(op, softcap);
  check_block_layout(op, q, block_count, block_index, num_blocks(q.size(2), block_size));
}

// -------------------------------------------------------------------- attention_with_scores

// window: 0 (none) or the sliding window W >= 1 of the chunk's queries (query t sees the keys
// Lk - Lq + t - W < j <= Lk - Lq + t).
inline void check_attention_with_scores_args(const char* op, const at::Tensor& q,
                                             const at::Tensor& k, const at::Tensor& v,
                                             double scale, double softcap, int64_t window) {
  check_qkv(op, q, k, v);
  TORCH_CHECK(k.size(2) >= q.size(2), op, ": k/v length (", k.size(2), ") must be at least the ",
              "query chunk length (", q.size(2), "): the chunk's own keys are the last ones");
  check_scale(op, scale);
  check_softcap(op, softcap);
  TORCH_CHECK(window >= 0, op, ": window must be 0 (no sliding window) or the number of keys a "
              "query sees, itself included (>= 1), got ", window);
}

// ------------------------------------------------------------------------------ kv_compact_

// Shapes, dtypes and devices; the indices' values are check_keep_values'.
inline void check_kv_compact_args(const char* op, const at::Tensor& x, const at::Tensor& keep) {
  TORCH_CHECK(x.dim() >= 3, op, ": x must be [batch, heads, length, ...] (3-D or more), got "
              "shape ", x.sizes());
  check_rank(op, "keep", keep, 3, "[batch, heads, kept] int64 indices");
  check_dtype(op, "keep", keep, at::kLong);
  check_same_device(op, "keep", keep, x, "x");
  check_contiguous(op, "x", x);
  check_contiguous(op, "keep", keep);
  TORCH_CHECK(keep.size(0) == x.size(0) && keep.size(1) == x.size(1), op,
              ": keep's [batch, heads] ", keep.sizes().slice(0, 2), " must match x's ",
              x.sizes().slice(0, 2));
  TORCH_CHECK(keep.size(2) <= x.size(2), op, ": keep has ", keep.size(2),
              " indices per head but x holds only ", x.size(2), " rows");
}

// keep (a CPU tensor, through check_kv_compact_args): each [b, h] row sorted ascending, unique,
// within [0, length).
inline void check_keep_values(const char* op, const at::Tensor& keep, int64_t length) {
  TORCH_CHECK(keep.device().is_cpu(), op, ": check_keep_values reads CPU tensors");
  const int64_t heads = keep.size(1), kept = keep.size(2);
  const int64_t* idx = keep.const_data_ptr<int64_t>();
  for (int64_t head = 0; head < keep.size(0) * heads; ++head) {
    const int64_t* row = idx + head * kept;
    for (int64_t i = 0; i < kept; ++i) {
      TORCH_CHECK(row[i] >= 0 && row[i] < length, op, ": keep[", head / heads, ", ",
                  head % heads, ", ", i, "] = ", row[i], " is out of range [0, ", length, ")");
      TORCH_CHECK(i == 0 || row[i] > row[i - 1], op, ": keep[", head / heads, ", ", head % heads,
                  "] must be sorted ascending and unique, but entry ", i, " (", row[i],
                  ") follows ", row[i - 1]);
    }
  }
}

}  // namespace cabattn
