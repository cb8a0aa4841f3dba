// What the backward kernels (dx_kernel.cuh, dvalues_kernel.cuh) share: the block shape,
// the dense tensor-core MMA, the B operand from shared memory, the 2:4 decoding.
//
// Both kernels compute, per block, a 64 x 128 float32 tile C[i, c] = sum_k A[i, k] B[k, c]
// with mma.sync m16n8k16 (16-bit inputs, float32 accumulation) over chunks of 32 k:
//   * C's 128 columns are 128 dense columns of K (whole sub-row windows, or part of one);
//   * A comes from a shared "slab" of cotangent columns through per-lane column offsets
//     (the sub-row gather m(kr, w) = (kr / N) * V + indices[kr, w]: never a dense copy);
//   * B is a row-major [32][128] 16-bit tile in shared memory, read with ldmatrix.trans.
// 4 warps as 2 (rows) x 2 (columns), 32 x 64 each: 2 m16 x 8 n8 fragments. A warp's 64
// columns span WPW = max(1, 64 / L) windows; each n8 fragment lies in one window.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "cuda/ptx.cuh"
#include "cuda/tile.cuh"
#include "format.h"

namespace samoyeds::cuda::bwd {

constexpr int kThreads = 128;
constexpr int kTileRows = 64;   // C rows per block
constexpr int kTileCols = 128;  // C columns per block (dense K columns)
constexpr int kChunk = 32;      // k per pipeline stage
constexpr int kWarpCols = kTileCols / 2;
constexpr int kFragsN = kWarpCols / 8;
constexpr int kBStride = kTileCols + 8;  // halves per B row: ldmatrix rows hit distinct banks
constexpr int kWindowsPerTile = kTileCols / 32;  // at most (sub_row >= 32)
static_assert(kTileCols % MaxSubRow() == 0, "a tile holds whole windows");
static_assert(kTileCols / kMetaColsPerWord == kThreads / kChunk,
              "one thread per (k row, metadata word) of a chunk");

// Windows spanned by one warp's columns.
constexpr int WindowsPerWarp(int sub_row) { return sub_row >= kWarpCols ? 1 : kWarpCols / sub_row; }

struct BwdArgs {
  Args a;          // group_sizes, sel, indices, metadata, values (dx), x (dvalues), shapes
  const void* ct;  // [R, M]
  float* out;
};

template <typename T>
__device__ __forceinline__ void Mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Like LdMatrixX4, transposed: lane l receives, per matrix, column l / 4, rows
// 2 (l % 4) + {0, 1}; from a row-major [k][n] tile that is the mma B fragment.
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ uint32_t Pack(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// The warp's 32 x 64 accumulators: [m16 fragment][n8 fragment][c0..c3].
using Acc = float[2][kFragsN][4];

__device__ __forceinline__ void ZeroAcc(Acc& acc) {
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int f = 0; f < kFragsN; ++f)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][f][q] = 0.0f;
}

// One k16 step of the warp tile: af[w][i] is the A fragment of m16 fragment i in the
// warp's window slot w, bf[f] the B fragment of n8 fragment f (window slot f * WPW / 8).
template <typename T, int WPW>
__device__ __forceinline__ void MmaStep(Acc& acc, const uint32_t (&af)[WPW][2][4],
                                        const uint32_t (&bf)[kFragsN][2]) {
#pragma unroll
  for (int f = 0; f < kFragsN; ++f)
#pragma unroll
    for (int i = 0; i < 2; ++i)
      Mma16816<T>(acc[i][f], af[f * WPW / kFragsN][i], bf[f][0], bf[f][1]);
}

// B fragments of k rows [k0, k0 + 16) for the warp's 8 n8 fragments from columns col0
// of a [kChunk][kBStride] tile at shared address `tile`: b[f] = {b0, b1} of fragment f.
__device__ __forceinline__ void LoadB(uint32_t tile, int k0, int col0, int lane,
                                      uint32_t (&b)[kFragsN][2]) {
  // Matrices of one x4: (k0..7, n), (k8..15, n), (k0..7, n + 8), (k8..15, n + 8).
  const int k = k0 + ((lane >> 3) & 1) * 8 + (lane & 7);
  const int n = col0 + (lane >> 4) * 8;
#pragma unroll
  for (int p = 0; p < kFragsN / 2; ++p) {
    uint32_t r[4];
    LdMatrixX4Trans(tile + (k * kBStride + n + p * 16) * 2, r);
    b[2 * p][0] = r[0];
    b[2 * p][1] = r[1];
    b[2 * p + 1][0] = r[2];
    b[2 * p + 1][1] = r[3];
  }
}

// The canonical metadata word (format.h) of kept row `row`, column word c, from the
// stored (hardware-order) words of one expert, [kept rows, words].
__device__ __forceinline__ uint32_t CanonicalMetaWord(const uint32_t* meta, int words,
                                                      int row, int c) {
  const int r = row % kRowTile, lo = row - r + (r % 8);
  const uint32_t a = __ldg(meta + static_cast<int64_t>(lo) * words + c);
  const uint32_t b = __ldg(meta + static_cast<int64_t>(lo + 8) * words + c);
  return r < 8 ? SwapMetaLow(a, b) : SwapMetaHigh(a, b);
}

// The 32 dense 16-bit columns of one metadata word: `kept` holds the word's 16 stored
// values (2 per uint32, first in the low half), `word` its canonical metadata. A
// repeated position keeps the second value (samoyeds_jax.decode's reading).
__device__ __forceinline__ void Decode24(uint32_t word, const uint32_t (&kept)[8],
                                         uint32_t (&dense)[16]) {
#pragma unroll
  for (int g = 0; g < 8; ++g) {
    const uint32_t p0 = (word >> (4 * g)) & 3u, p1 = (word >> (4 * g + 2)) & 3u;
    const uint32_t v0 = kept[g] & 0xFFFFu, v1 = kept[g] >> 16;
    uint32_t h[4];
#pragma unroll
    for (uint32_t q = 0; q < 4; ++q) h[q] = q == p1 ? v1 : q == p0 ? v0 : 0u;
    dense[2 * g] = h[0] | (h[1] << 16);
    dense[2 * g + 1] = h[2] | (h[3] << 16);
  }
}

}  // namespace samoyeds::cuda::bwd
