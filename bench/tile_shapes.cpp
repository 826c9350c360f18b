// Micro-benchmark of the register tile shapes of the CPU micro-kernel (csrc/cpu_kernels_impl.h)
// for one ISA path: QK^T (logits [rows, keys] = Q [rows, dim] K^T from packed key panels) and
// O += P V ([rows, keys] x [keys, dim]) at the sizes of one attention tile, for each candidate
// (rows x key panels) shape. bench/bench_tiles.py compiles and runs it once per ISA path:
//
//   g++ -O3 -std=c++20 -Icsrc -DCABATTN_ISA_TARGET='"arch=x86-64-v4"' -DVECTOR_BYTES=64 \
//       bench/tile_shapes.cpp -o tile_shapes && ./tile_shapes ROWS DIM KEYS ROUNDS
//
// The candidates run in interleaved rounds (each candidate once per round), so a shared
// machine's changing load hits all of them alike; it prints the best and the median GFLOP/s
// over the rounds. Every candidate's output is checked against the first one's.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cpu_kernels_impl.h"

namespace {

using cabattn::kKeyPanel;
namespace vk = cabattn::vector_kernels;

template <int R, int P>
struct Shape {
  static constexpr int kVectorBytes = VECTOR_BYTES;
  static constexpr vk::TileShape kQkTile{R, P}, kPvTile{R, P};
};

struct Candidate {
  int rows, panels;
  void (*qk)(const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t);
  void (*pv)(const float*, int64_t, int64_t, int64_t, const float*, int64_t, float*);
};

template <int R, int P>
Candidate candidate() {
  return {R, P, &vk::qk_panels<Shape<R, P>, float>, &vk::add_pv<Shape<R, P>, float>};
}

// Accumulators (vectors): rows x panels x 16 / lanes; registers: 32 zmm (AVX-512), 16 ymm
// (AVX2). Each list keeps a few registers for the panel rows and the broadcast.
std::vector<Candidate> candidates() {
#if VECTOR_BYTES == 64
  return {candidate<6, 4>(),  candidate<7, 4>(),  candidate<8, 3>(), candidate<12, 2>(),
          candidate<14, 2>(), candidate<8, 2>(),  candidate<28, 1>(), candidate<16, 1>(),
          candidate<6, 2>(),  candidate<6, 1>()};
#else
  return {candidate<6, 1>(), candidate<5, 1>(), candidate<4, 1>(), candidate<3, 2>(),
          candidate<2, 3>(), candidate<2, 2>()};
#endif
}

double seconds(auto&& fn, int calls) {
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < calls; ++i) fn();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / calls;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::fprintf(stderr, "usage: %s ROWS DIM KEYS ROUNDS\n", argv[0]);
    return 2;
  }
  const int64_t rows = std::atoll(argv[1]), dim = std::atoll(argv[2]), keys = std::atoll(argv[3]);
  const int rounds = std::atoi(argv[4]);
  if (rows < 1 || dim < 1 || keys < kKeyPanel || keys % kKeyPanel != 0 || rounds < 1) {
    std::fprintf(stderr, "ROWS, DIM, ROUNDS >= 1 and KEYS a positive multiple of %ld\n",
                 static_cast<long>(kKeyPanel));
    return 2;
  }
  std::mt19937 gen(0);
  std::normal_distribution<float> normal;
  auto random = [&](int64_t n) {
    std::vector<float> x(n);
    for (float& value : x) value = normal(gen);
    return x;
  };
  const std::vector<float> q = random(rows * dim), panels = random(keys * dim),
                           p = random(rows * keys), v = random(keys * dim);
  std::vector<float> logits(rows * keys), out(rows * dim), want_logits, want_out;

  const std::vector<Candidate> list = candidates();
  std::vector<std::vector<double>> qk_times(list.size()), pv_times(list.size());
  // About 2 ms per timing: long enough for the clock, short enough to interleave finely.
  const double flops = 2.0 * rows * keys * dim;
  const int calls = std::max(1, static_cast<int>(2e-3 * 20e9 / flops));
  for (int round = -1; round < rounds; ++round) {  // round -1 warms up and checks
    for (size_t c = 0; c < list.size(); ++c) {
      const Candidate& cand = list[c];
      auto qk = [&] { cand.qk(q.data(), rows, dim, panels.data(), keys / kKeyPanel,
                              logits.data(), keys); };
      auto pv = [&] { cand.pv(p.data(), rows, keys, keys, v.data(), dim, out.data()); };
      if (round < 0) {
        qk();
        std::fill(out.begin(), out.end(), 0.0f);
        pv();
        if (c == 0) {
          want_logits = logits;
          want_out = out;
        }
        for (size_t i = 0; i < logits.size(); ++i)
          if (std::abs(logits[i] - want_logits[i]) > 1e-3f * (1 + std::abs(want_logits[i]))) {
            std::fprintf(stderr, "%dx%d: QK^T differs at %zu\n", cand.rows, cand.panels, i);
            return 1;
          }
        for (size_t i = 0; i < out.size(); ++i)
          if (std::abs(out[i] - want_out[i]) > 1e-3f * (1 + std::abs(want_out[i]))) {
            std::fprintf(stderr, "%dx%d: PV differs at %zu\n", cand.rows, cand.panels, i);
            return 1;
          }
        continue;
      }
      qk_times[c].push_back(seconds(qk, calls));
      pv_times[c].push_back(seconds(pv, calls));  // out grows; the values do not matter
    }
  }
  auto gflops = [&](std::vector<double> times, bool best) {
    std::sort(times.begin(), times.end());
    return flops / (best ? times.front() : times[times.size() / 2]) * 1e-9;
  };
  std::printf("| tile (rows x panels) | accumulators | QK^T GFLOP/s best | median | "
              "PV GFLOP/s best | median |\n|---|---|---|---|---|---|\n");
  for (size_t c = 0; c < list.size(); ++c)
    std::printf("| %d x %d | %d | %.1f | %.1f | %.1f | %.1f |\n", list[c].rows, list[c].panels,
                list[c].rows * list[c].panels * static_cast<int>(kKeyPanel * 4 / VECTOR_BYTES),
                gflops(qk_times[c], true), gflops(qk_times[c], false),
                gflops(pv_times[c], true), gflops(pv_times[c], false));
  return 0;
}
