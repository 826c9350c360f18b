// The tensor-core kernels of csrc/cuda/flash_tc.cuh (block_sparse_attention, block_scores),
// run on the CPU by the emulation layer (csrc/emu) through ptx.cuh's emulated definitions and
// launched as their operators launch them (launch_flash), against a float64 reference on the
// same fp16/bf16 inputs: random CSR layouts (with and without the diagonal block, and all
// blocks), L not a multiple of the block size, GQA, head dims 64, 128 and 256, soft-capped
// logits (softcap > 0: s -> softcap tanh(s / softcap)), NaN-poisoned outputs. Small shapes of
// 1- and 2-warp blocks (block size 16 and 32) keep it fast; the emulated operator tests (the
// `emu` cases of tests/kernels) cover the rest. Exit status 0 and "ok" on success.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cuda/flash_launch.cuh"
#include "cuda/flash_tc.cuh"

using namespace cabattn::cuda;

constexpr double kLog2eDouble = 1.4426950408889634;  // log2(e), as the tests computed it

// The scaled logit, soft-capped when softcap > 0.
double logit(double dot, double scale, double softcap) {
  return softcap > 0 ? softcap * std::tanh(dot * scale / softcap) : dot * scale;
}

template <typename T, int D, int W>
int attention_case(int B, int Hq, int Hkv, int L, int seed, bool all_blocks, double softcap) {
  using Tr = FlashTcTraits<T, D, W>;
  const int bs = 16 * W, M = (L + bs - 1) / bs, maxc = M;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<T> q(size_t(B) * Hq * L * D), k(size_t(B) * Hkv * L * D), v(k.size()), o(q.size());
  for (auto& x : q) x = T(nd(rng)); for (auto& x : k) x = T(nd(rng)); for (auto& x : v) x = T(nd(rng));
  for (auto& x : o) x = T(NAN);
  std::vector<float> lse(size_t(B) * Hq * L, NAN);
  std::vector<int> cnt(size_t(B) * Hq * M), idx(size_t(B) * Hq * M * maxc, -7);
  for (int r = 0; r < B * Hq * M; ++r) {
    int I = r % M; std::vector<int> bl;
    for (int j = 0; j <= I; ++j) if (all_blocks || j == I || rng() % 2) bl.push_back(j);
    if (!all_blocks && rng() % 4 == 0 && bl.size() > 1) bl.pop_back();  // sometimes no diagonal
    cnt[r] = bl.size();
    for (size_t s = 0; s < bl.size(); ++s) idx[size_t(r) * maxc + s] = bl[s];
  }
  const double scale = 1.0 / std::sqrt(double(D));
  FlashFwdParams p{};
  p.q = q.data(); p.k = k.data(); p.v = v.data(); p.out = o.data(); p.lse = lse.data();
  p.q_row_stride = p.k_row_stride = p.v_row_stride = p.o_row_stride = D;
  p.q_head_stride = p.o_head_stride = int64_t(L) * D; p.q_batch_stride = p.o_batch_stride = int64_t(Hq) * L * D;
  p.k_head_stride = p.v_head_stride = int64_t(L) * D; p.k_batch_stride = p.v_batch_stride = int64_t(Hkv) * L * D;
  p.lse_head_stride = L; p.lse_batch_stride = int64_t(Hq) * L;
  p.q_heads = Hq; p.kv_heads = Hkv; p.q_per_kv = Hq / Hkv; p.length = L;
  p.scale_log2 = float(scale * kLog2eDouble);
  p.softcap_log2 = float(softcap * kLog2eDouble);
  p.block_count = cnt.data(); p.block_index = idx.data(); p.block_size = bs;
  p.block_size_log2 = __builtin_ctz(bs); p.num_blocks = M; p.max_count = maxc;
  if (softcap > 0)
    launch_flash("flash_tc_emulation_test", block_sparse_attention_tc_kernel<Tr, true>,
                 dim3(M, Hq, B), Tr::kThreads, Tr::kSmemBytes, p);
  else
    launch_flash("flash_tc_emulation_test", block_sparse_attention_tc_kernel<Tr, false>,
                 dim3(M, Hq, B), Tr::kThreads, Tr::kSmemBytes, p);
  // reference in double
  double max_err = 0, max_ref = 0, lse_err = 0;
  for (int b = 0; b < B; ++b) for (int h = 0; h < Hq; ++h) for (int i = 0; i < L; ++i) {
    const int hk = h / (Hq / Hkv); const int r = (b * Hq + h) * M + i / bs;
    std::vector<double> s; std::vector<int> ks;
    for (int c = 0; c < cnt[r]; ++c) { int J = idx[size_t(r) * maxc + c];
      for (int j = J * bs; j < std::min(L, J * bs + bs); ++j) if (j <= i) {
        double acc = 0; for (int d = 0; d < D; ++d) acc += double(float(q[((size_t(b) * Hq + h) * L + i) * D + d])) * double(float(k[((size_t(b) * Hkv + hk) * L + j) * D + d]));
        s.push_back(logit(acc, scale, softcap)); ks.push_back(j); } }
    double mx = -INFINITY; for (double x : s) mx = std::max(mx, x);
    double sum = 0; for (double x : s) sum += std::exp(x - mx);
    const double want_lse = s.empty() ? -INFINITY : mx + std::log(sum);
    const float got_lse = lse[(size_t(b) * Hq + h) * L + i];
    if (s.empty() ? got_lse != -INFINITY : !(std::fabs(got_lse - want_lse) < 1e-3)) { if (lse_err++ < 5) std::printf("lse [%d,%d,%d] got %g want %g\n", b, h, i, got_lse, want_lse); }
    for (int d = 0; d < D; ++d) {
      double want = 0; for (size_t t = 0; t < s.size(); ++t) want += std::exp(s[t] - mx) / sum * double(float(v[((size_t(b) * Hkv + hk) * L + ks[t]) * D + d]));
      const float got = float(o[((size_t(b) * Hq + h) * L + i) * D + d]);
      const double e = std::isnan(got) ? 1e9 : std::fabs(got - want);
      max_err = std::max(max_err, e); max_ref = std::max(max_ref, std::fabs(want));
    }
  }
  std::printf("%s D=%d bs=%d B=%d Hq=%d Hkv=%d L=%d all=%d softcap=%g: max_err %.3g (max|ref| %.3g) lse_bad %g\n",
              sizeof(T) == 2 && std::is_same_v<T, c10::Half> ? "f16" : "bf16", D, bs, B, Hq, Hkv, L, all_blocks, softcap, max_err, max_ref, lse_err);
  const double tol = std::is_same_v<T, c10::Half> ? 4e-3 : 3e-2;
  return (max_err <= tol && lse_err == 0) ? 0 : 1;
}


template <typename T, int D, int W>
int scores_case(int B, int Hq, int Hkv, int L, int seed, double softcap) {
  using Tr = FlashTcTraits<T, D, W>;
  const int bs = 16 * W, M = (L + bs - 1) / bs;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<T> q(size_t(B) * Hq * L * D), k(size_t(B) * Hkv * L * D);
  for (auto& x : q) x = T(nd(rng) * 2); for (auto& x : k) x = T(nd(rng));
  std::vector<float> S(size_t(B) * Hq * M * M, NAN), G(S.size(), NAN);
  const double scale = 1.0 / std::sqrt(double(D));
  FlashFwdParams p{};
  p.q = q.data(); p.k = k.data();
  p.q_row_stride = p.k_row_stride = D;
  p.q_head_stride = int64_t(L) * D; p.q_batch_stride = int64_t(Hq) * L * D;
  p.k_head_stride = int64_t(L) * D; p.k_batch_stride = int64_t(Hkv) * L * D;
  p.q_heads = Hq; p.kv_heads = Hkv; p.q_per_kv = Hq / Hkv; p.length = L;
  p.scale_log2 = float(scale * kLog2eDouble);
  p.softcap_log2 = float(softcap * kLog2eDouble);
  p.block_size = bs; p.block_size_log2 = __builtin_ctz(bs); p.num_blocks = M;
  p.block_sum = S.data(); p.block_max = G.data();
  p.scores_row_stride = M; p.scores_head_stride = int64_t(M) * M; p.scores_batch_stride = int64_t(Hq) * M * M;
  if (softcap > 0)
    launch_flash("flash_tc_emulation_test", block_scores_tc_kernel<Tr, true>, dim3(M, Hq, B),
                 Tr::kThreads, Tr::kScoresSmemBytes, p);
  else
    launch_flash("flash_tc_emulation_test", block_scores_tc_kernel<Tr, false>, dim3(M, Hq, B),
                 Tr::kThreads, Tr::kScoresSmemBytes, p);
  double max_err = 0; int bad = 0;
  for (int b = 0; b < B; ++b) for (int h = 0; h < Hq; ++h) {
    const int hk = h / (Hq / Hkv);
    std::vector<double> Sw(size_t(M) * M, 0), Gw(size_t(M) * M, 0);
    for (int i = 0; i < L; ++i) {
      std::vector<double> s(i + 1);
      double mx = -INFINITY;
      for (int j = 0; j <= i; ++j) { double acc = 0; for (int d = 0; d < D; ++d) acc += double(float(q[((size_t(b) * Hq + h) * L + i) * D + d])) * double(float(k[((size_t(b) * Hkv + hk) * L + j) * D + d])); s[j] = logit(acc, scale, softcap); mx = std::max(mx, s[j]); }
      double sum = 0; for (double x : s) sum += std::exp(x - mx);
      for (int j = 0; j <= i; ++j) { double pr = std::exp(s[j] - mx) / sum; Sw[(i / bs) * M + j / bs] += pr; Gw[(i / bs) * M + j / bs] = std::max(Gw[(i / bs) * M + j / bs], pr); }
    }
    for (int e = 0; e < M * M; ++e) {
      const float gs = S[(size_t(b) * Hq + h) * M * M + e], gg = G[(size_t(b) * Hq + h) * M * M + e];
      const double es = std::isnan(gs) ? 1e9 : std::fabs(gs - Sw[e]), eg = std::isnan(gg) ? 1e9 : std::fabs(gg - Gw[e]);
      max_err = std::max({max_err, es / std::max(1.0, Sw[e]), eg});
      if ((es > 1e-4 * std::max(1.0, Sw[e]) || eg > 1e-4) && bad++ < 5) std::printf("  [%d,%d,%d,%d] S %g want %g, G %g want %g\n", b, h, e / M, e % M, gs, Sw[e], gg, Gw[e]);
    }
  }
  std::printf("scores %s D=%d bs=%d B=%d Hq=%d Hkv=%d L=%d softcap=%g: max_err %.3g bad %d\n", std::is_same_v<T, c10::Half> ? "f16" : "bf16", D, bs, B, Hq, Hkv, L, softcap, max_err, bad);
  return bad ? 1 : 0;
}

int main() {
  int bad = 0;
  // attention: dtype, d, warps; batch, q heads, kv heads, L, seed, all blocks, softcap
  bad += attention_case<c10::Half, 64, 1>(2, 3, 1, 40, 1, false, 0);      // GQA 3, batch 2
  bad += attention_case<c10::BFloat16, 128, 1>(1, 4, 1, 72, 3, true, 0);  // GQA 4, all blocks
  bad += attention_case<c10::BFloat16, 64, 2>(1, 2, 2, 100, 4, false, 0); // GQA 1, bs 32
  bad += attention_case<c10::Half, 128, 2>(1, 1, 1, 40, 5, false, 0);
  bad += attention_case<c10::Half, 256, 1>(1, 4, 1, 40, 9, true, 0);      // Gemma 3's heads
  bad += attention_case<c10::BFloat16, 256, 2>(1, 2, 1, 72, 10, false, 0.5);  // capped hard
  bad += attention_case<c10::Half, 64, 1>(1, 2, 1, 40, 11, true, 1.0);
  bad += scores_case<c10::Half, 64, 1>(1, 2, 1, 72, 7, 0);
  bad += scores_case<c10::BFloat16, 128, 2>(1, 1, 1, 72, 8, 0);
  bad += scores_case<c10::Half, 256, 1>(1, 4, 1, 40, 12, 0);
  bad += scores_case<c10::BFloat16, 64, 2>(1, 2, 1, 72, 13, 1.0);
  std::printf(bad ? "FAILED %d\n" : "ok\n", bad);
  return bad ? 1 : 0;
}
