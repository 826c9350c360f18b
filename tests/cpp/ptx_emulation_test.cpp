// Unit test of csrc/cuda/ptx.cuh's emulated definitions (CABATTN_EMU) against a naive matmul
// and against the PTX ISA's fragment tables, written out here independently of the wrappers;
// also cp.async's copy and zero-fill and pack2's rounding and order.
// The 32 lanes of a warp run as one block of the emulation layer (csrc/emu/cuda_emu.h), which
// ptx.cuh's emulated definitions are written for. Exit status 0 and "ok".
#include "emu/cuda_emu.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

#include "cuda/ptx.cuh"

namespace ptx = cabattn::cuda::ptx;

__global__ void lanes_kernel(const std::function<void(int)>* body) { (*body)(int(threadIdx.x)); }

// body(lane) on the 32 lanes of one warp.
static void warp_run(const std::function<void(int)>& body) {
  cabattn::cuda::emulated_launch("ptx_emulation_test", lanes_kernel, dim3(1), dim3(32), 0,
                                 &body);
}

static int failures = 0;
static void expect(bool ok, const char* what, int i, int j, double got, double want) {
  if (!ok && failures++ < 10)
    std::printf("FAIL %s [%d][%d]: got %.7g, want %.7g\n", what, i, j, got, want);
}

template <typename T>
static uint16_t bits_of(T x) {
  return x.x;
}
template <typename T>
static uint32_t pair(T lo, T hi) {
  return uint32_t(bits_of(lo)) | (uint32_t(bits_of(hi)) << 16);
}

// The ISA's mma.m16n8k16 fragment tables, applied directly: fragments built from A, B, C by
// the tables, one emulated mma, D read back by the table, compared with the naive product.
template <typename T>
static void test_mma_fragments(std::mt19937& rng, const char* name) {
  std::normal_distribution<float> normal;
  T A[16][16], B[16][8];
  float C[16][8];
  for (auto& row : A) for (auto& x : row) x = T(normal(rng));
  for (auto& row : B) for (auto& x : row) x = T(normal(rng));
  for (auto& row : C) for (auto& x : row) x = normal(rng);
  float D[16][8];
  warp_run([&](int lane) {
    const int g = lane / 4, q = lane % 4;
    const uint32_t a[4] = {pair(A[g][2 * q], A[g][2 * q + 1]),
                           pair(A[g + 8][2 * q], A[g + 8][2 * q + 1]),
                           pair(A[g][2 * q + 8], A[g][2 * q + 9]),
                           pair(A[g + 8][2 * q + 8], A[g + 8][2 * q + 9])};
    const uint32_t b[2] = {pair(B[2 * q][g], B[2 * q + 1][g]),
                           pair(B[2 * q + 8][g], B[2 * q + 9][g])};
    float d[4] = {C[g][2 * q], C[g][2 * q + 1], C[g + 8][2 * q], C[g + 8][2 * q + 1]};
    ptx::mma_m16n8k16<T>(d, a, b);
    D[g][2 * q] = d[0];
    D[g][2 * q + 1] = d[1];
    D[g + 8][2 * q] = d[2];
    D[g + 8][2 * q + 1] = d[3];
  });
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      double want = C[i][j];
      for (int k = 0; k < 16; ++k) want += double(float(A[i][k])) * double(float(B[k][j]));
      expect(std::fabs(D[i][j] - want) <= 1e-5 * (1 + std::fabs(want)), name, i, j, D[i][j],
             want);
    }
}

// ldmatrix .x4 and .x4.trans against the ISA's description, with rows scattered in memory
// (each lane points at its own row, in a permuted order with padding between rows).
static void test_ldmatrix(std::mt19937& rng) {
  std::vector<uint16_t> memory(32 * 24);
  for (auto& x : memory) x = uint16_t(rng());
  int row_start[32];
  std::vector<int> order(32);
  for (int i = 0; i < 32; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), rng);
  for (int l = 0; l < 32; ++l) row_start[l] = order[l] * 24 + 8 * (l % 2);  // 16-byte aligned
  auto M = [&](int i, int r, int c) { return memory[row_start[8 * i + r] + c]; };
  uint32_t plain[32][4], trans[32][4];
  warp_run([&](int lane) {
    ptx::ldmatrix_x4(plain[lane], memory.data() + row_start[lane]);
    ptx::ldmatrix_x4_trans(trans[lane], memory.data() + row_start[lane]);
  });
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < 4; ++i) {
      const uint32_t want = M(i, l / 4, 2 * (l % 4)) | (uint32_t(M(i, l / 4, 2 * (l % 4) + 1)) << 16);
      const uint32_t want_t = M(i, 2 * (l % 4), l / 4) | (uint32_t(M(i, 2 * (l % 4) + 1, l / 4)) << 16);
      expect(plain[l][i] == want, "ldmatrix_x4", l, i, plain[l][i], want);
      expect(trans[l][i] == want_t, "ldmatrix_x4_trans", l, i, trans[l][i], want_t);
    }
}

// The kernels' own use: A (16 x 32, row-major) by ldmatrix_x4, B given row-major as [k][n]
// (16 x 16 per step: V's layout) by ldmatrix_x4_trans and given as [n][k] (K's layout) by
// ldmatrix_x4; two k-steps of mma into a 16 x 16 product, against the naive matmul.
template <typename T>
static void test_matmul_through_ldmatrix(std::mt19937& rng, const char* name) {
  std::normal_distribution<float> normal;
  constexpr int M = 16, N = 16, K = 32;
  T A[M][K], Bkn[K][N], Bnk[N][K];
  for (auto& row : A) for (auto& x : row) x = T(normal(rng));
  for (int k = 0; k < K; ++k)
    for (int n = 0; n < N; ++n) Bnk[n][k] = Bkn[k][n] = T(normal(rng));
  float D1[M][N], D2[M][N];
  warp_run([&](int lane) {
    const int g = lane / 4, q = lane % 4, i = lane / 8, r = lane % 8;
    float acc1[2][4] = {}, acc2[2][4] = {};
    for (int ks = 0; ks < K / 16; ++ks) {
      uint32_t a[4];
      ptx::ldmatrix_x4(a, &A[r + 8 * (i % 2)][16 * ks + 8 * (i / 2)]);
      uint32_t bt[4], bn[4];
      ptx::ldmatrix_x4_trans(bt, &Bkn[16 * ks + r + 8 * (i % 2)][8 * (i / 2)]);
      ptx::ldmatrix_x4(bn, &Bnk[r + 8 * (i / 2)][16 * ks + 8 * (i % 2)]);
      for (int nt = 0; nt < 2; ++nt) {
        const uint32_t b1[2] = {bt[2 * nt], bt[2 * nt + 1]};
        const uint32_t b2[2] = {bn[2 * nt], bn[2 * nt + 1]};
        ptx::mma_m16n8k16<T>(acc1[nt], a, b1);
        ptx::mma_m16n8k16<T>(acc2[nt], a, b2);
      }
    }
    for (int nt = 0; nt < 2; ++nt)
      for (int h = 0; h < 2; ++h)
        for (int e = 0; e < 2; ++e) {
          D1[g + 8 * h][8 * nt + 2 * q + e] = acc1[nt][2 * h + e];
          D2[g + 8 * h][8 * nt + 2 * q + e] = acc2[nt][2 * h + e];
        }
  });
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      double want = 0;
      for (int k = 0; k < K; ++k) want += double(float(A[m][k])) * double(float(Bkn[k][n]));
      expect(std::fabs(D1[m][n] - want) <= 1e-5 * (1 + std::fabs(want)), name, m, n, D1[m][n],
             want);
      expect(std::fabs(D2[m][n] - want) <= 1e-5 * (1 + std::fabs(want)), name, m, n, D2[m][n],
             want);
    }
}

template <typename T>
static void test_pack2(const char* name) {
  const float lo = 1.0f + 1.0f / 4096, hi = -3.14159f;  // lo rounds (ties to even) to 1.0
  const uint32_t r = ptx::pack2<T>(lo, hi);
  expect((r & 0xffffu) == T(1.0f).x, name, 0, 0, r & 0xffffu, T(1.0f).x);
  expect((r >> 16) == T(hi).x, name, 0, 1, r >> 16, T(hi).x);
}

// cp.async: 16 bytes copied when valid, zeros (no read) when not; commit/wait complete it.
static void test_cp_async() {
  alignas(16) unsigned char src[16], dst[2][16];
  for (int i = 0; i < 16; ++i) src[i] = static_cast<unsigned char>(i + 1);
  std::memset(dst, 0xff, sizeof(dst));
  ptx::cp_async_16(dst[0], src, true);
  ptx::cp_async_16(dst[1], nullptr, false);
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  for (int i = 0; i < 16; ++i) {
    expect(dst[0][i] == src[i], "cp_async_16 copy", 0, i, dst[0][i], src[i]);
    expect(dst[1][i] == 0, "cp_async_16 zero-fill", 1, i, dst[1][i], 0);
  }
}

int main() {
  std::mt19937 rng(12);
  for (int rep = 0; rep < 3; ++rep) {
    test_mma_fragments<c10::Half>(rng, "mma f16");
    test_mma_fragments<c10::BFloat16>(rng, "mma bf16");
    test_ldmatrix(rng);
    test_matmul_through_ldmatrix<c10::Half>(rng, "ldmatrix+mma f16");
    test_matmul_through_ldmatrix<c10::BFloat16>(rng, "ldmatrix+mma bf16");
  }
  test_cp_async();
  test_pack2<c10::Half>("pack2 f16");
  test_pack2<c10::BFloat16>("pack2 bf16");
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
