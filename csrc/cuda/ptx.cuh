// Every inline-PTX instruction (and register-packing intrinsic) the tensor-core kernels use,
// each in one small wrapper with two definitions: the PTX for nvcc, and under CABATTN_EMU a
// plain C++ one written from the PTX ISA's fragment layouts, so that the same kernel source runs
// on the CPU emulation layer. The emulated definitions use only threadIdx, __shfl_sync, plain
// memory and c10::Half / c10::BFloat16 (the emulation header, included first, declares the
// first two), so they keep the warp-wide semantics: every lane of the warp must call them
// together, as on the GPU.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"),
// with lane = 4 * group + quad (group = lane / 4, quad = lane % 4), and each 32-bit register
// holding two 16-bit elements, the lower-indexed one in the low half:
//   A, 16 x 16 row-major:  a0 = A[group][2q, 2q+1]      a1 = A[group+8][2q, 2q+1]
//                          a2 = A[group][2q+8, 2q+9]    a3 = A[group+8][2q+8, 2q+9]
//   B, 16 x 8 (k x n):     b0 = B[2q, 2q+1][group]      b1 = B[2q+8, 2q+9][group]
//   C/D, 16 x 8, fp32:     c0, c1 = C[group][2q, 2q+1]  c2, c3 = C[group+8][2q, 2q+1]
// ldmatrix .m8n8 .x4: lanes 8i .. 8i+7 give the row addresses of matrix i (8 rows of 16 bytes);
// register i of lane l receives M_i[l/4][2(l%4), 2(l%4)+1], or with .trans
// M_i[2(l%4)][l/4] and M_i[2(l%4)+1][l/4].
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#ifndef CABATTN_EMU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace cabattn {
namespace cuda {
namespace ptx {

constexpr unsigned kFullMask = 0xffffffffu;

// Two floats rounded to nearest-even into one 32-bit register of T pairs (lo in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

#ifndef CABATTN_EMU

template <typename T>
struct MmaInstruction;
template <>
struct MmaInstruction<c10::Half> {
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};
template <>
struct MmaInstruction<c10::BFloat16> {
  __device__ __forceinline__ static void run(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

// d += a * b for one warp's 16x8x16 tile (fp32 accumulation).
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
  MmaInstruction<T>::run(d, a, b);
}

__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 matrices of 16-bit elements from shared memory; `row` is this lane's row address.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}

// 16 bytes global -> shared, asynchronously (L2 only); zeros when !valid (no global read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)),
               "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}

// Waits until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

template <>
__device__ __forceinline__ uint32_t pack2<c10::Half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <>
__device__ __forceinline__ uint32_t pack2<c10::BFloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

#else  // CABATTN_EMU: the same contracts in plain C++, one call per lane of a warp.

inline int lane_id() { return static_cast<int>(threadIdx.x) & 31; }

template <>
inline uint32_t pack2<c10::Half>(float lo, float hi) {
  return uint32_t(c10::Half(lo).x) | (uint32_t(c10::Half(hi).x) << 16);
}

template <>
inline uint32_t pack2<c10::BFloat16>(float lo, float hi) {
  return uint32_t(c10::BFloat16(lo).x) | (uint32_t(c10::BFloat16(hi).x) << 16);
}

template <typename T>
inline float unpack_lo(uint32_t r) {
  return static_cast<float>(T(static_cast<uint16_t>(r & 0xffffu), T::from_bits()));
}
template <typename T>
inline float unpack_hi(uint32_t r) {
  return static_cast<float>(T(static_cast<uint16_t>(r >> 16), T::from_bits()));
}
// a.lo * b.lo + a.hi * b.hi, the products exact in fp32 as in the tensor core.
template <typename T>
inline float dot2(uint32_t a, uint32_t b) {
  return unpack_lo<T>(a) * unpack_lo<T>(b) + unpack_hi<T>(a) * unpack_hi<T>(b);
}

// Lane (group, quad) computes D[group][2quad, 2quad+1] and D[group+8][...]: it needs row group
// and group+8 of A (held by lanes 4group .. 4group+3) and columns 2quad, 2quad+1 of B (held by
// lanes 8quad .. 8quad+3 and 8quad+4 .. 8quad+7), gathered one k-slice (owner quad q) at a time.
template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const int lane = lane_id(), group = lane >> 2, quad = lane & 3;
  for (int q = 0; q < 4; ++q) {
    const uint32_t a0 = __shfl_sync(kFullMask, a[0], 4 * group + q);
    const uint32_t a1 = __shfl_sync(kFullMask, a[1], 4 * group + q);
    const uint32_t a2 = __shfl_sync(kFullMask, a[2], 4 * group + q);
    const uint32_t a3 = __shfl_sync(kFullMask, a[3], 4 * group + q);
    const uint32_t b00 = __shfl_sync(kFullMask, b[0], 8 * quad + q);      // column 2quad
    const uint32_t b01 = __shfl_sync(kFullMask, b[1], 8 * quad + q);
    const uint32_t b10 = __shfl_sync(kFullMask, b[0], 8 * quad + 4 + q);  // column 2quad+1
    const uint32_t b11 = __shfl_sync(kFullMask, b[1], 8 * quad + 4 + q);
    d[0] += dot2<T>(a0, b00) + dot2<T>(a2, b01);
    d[1] += dot2<T>(a0, b10) + dot2<T>(a2, b11);
    d[2] += dot2<T>(a1, b00) + dot2<T>(a3, b01);
    d[3] += dot2<T>(a1, b10) + dot2<T>(a3, b11);
  }
}

inline const unsigned char* row_of_lane(const void* row, int src_lane) {
  const unsigned long long mine = reinterpret_cast<unsigned long long>(row);
  return reinterpret_cast<const unsigned char*>(__shfl_sync(kFullMask, mine, src_lane));
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  const int lane = lane_id();
  for (int i = 0; i < 4; ++i) {
    const unsigned char* src = row_of_lane(row, 8 * i + lane / 4);
    std::memcpy(&r[i], src + 4 * (lane % 4), 4);
  }
}

inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  const int lane = lane_id();
  for (int i = 0; i < 4; ++i) {
    const unsigned char* even = row_of_lane(row, 8 * i + 2 * (lane % 4));
    const unsigned char* odd = row_of_lane(row, 8 * i + 2 * (lane % 4) + 1);
    uint16_t lo, hi;
    std::memcpy(&lo, even + 2 * (lane / 4), 2);
    std::memcpy(&hi, odd + 2 * (lane / 4), 2);
    r[i] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
}

// Synchronous: the copy has landed when the call returns, so commit and wait have nothing to
// do. (A read before the wait therefore goes unnoticed here; compute-sanitizer's racecheck
// covers that on the GPU.)
inline void cp_async_16(void* dst, const void* src, bool valid) {
  if (valid) {
    std::memcpy(dst, src, 16);
  } else {
    std::memset(dst, 0, 16);
  }
}

inline void cp_async_commit() {}

template <int kPending>
inline void cp_async_wait() {}

#endif  // CABATTN_EMU

}  // namespace ptx
}  // namespace cuda
}  // namespace cabattn
