// The Hopper kernels' epilogue without shared memory: wgmma accumulators (the m16n8
// fragment layout per warp) straight to `out`, for one kept row per block and no fused GLU.
#pragma once

#include <cstdint>

#include "cuda/epilogue.cuh"
#include "cuda/schedule.cuh"
#include "cuda/tile.cuh"

namespace samoyeds::cuda {

// Epilogue without shared memory for one kept row per block (N = 1) and no fused GLU.
// The lane holds tile rows kept[h] (g and g + 8 of its fragment) for routed rows
// 8j + 2tq + {0, 1}, and every store of a warp writes whole 32-byte sectors:
//   V > 1: a kept row is a block of V output rows whose V accumulator sets the lane holds
//     (slot: which sub-row each set holds): V adjacent outputs per routed row, and the
//     8 lanes of a quad column write 8 consecutive blocks (16 V bytes);
//   V = 1: lanes g, g ^ 1 trade one value, so that even lanes hold rows g, g + 1 and odd
//     lanes rows g + 7, g + 8 of one routed row: 8 lanes write the fragment's 16 rows.
template <typename T, int V, int kFrags>
__device__ __forceinline__ void StoreAccDirect(const Args& a, const Work& work, int out0, int n0,
                                               const float (&acc)[V][kFrags][4],
                                               const int (&slot)[2][V], const int (&kept)[2],
                                               int g, int tq) {
  const int rows_here = work.row_end - work.row_begin;
  const bool odd = g & 1;
  // The lane's first routed row n0 + 2 tq; routed row 8j + q further is (8j + q) rows of
  // `row_bytes` on (32-bit offsets: a tile spans at most kFrags * 8 output rows).
  const uint32_t row_bytes = static_cast<uint32_t>(a.out_cols) * sizeof(T);
  char* lane_out = reinterpret_cast<char*>(static_cast<T*>(a.out) +
                                           static_cast<int64_t>(work.row_begin + n0 + 2 * tq) *
                                               a.out_cols + out0);
  // Output column of the lane's store per row h (V = 1: one pair of rows per lane).
  char* col_out[2];
#pragma unroll
  for (int h = 0; h < 2; ++h)
    col_out[h] = lane_out + sizeof(T) * (V == 1 ? (odd ? kept[1] - 1 : kept[0]) : kept[h] * V);
  // Every routed row of this half present (all tiles but an expert's last): no checks.
  const bool full = n0 + 8 * kFrags <= rows_here;
  const int rows_left = rows_here - n0 - 2 * tq;  // routed rows 8j + q < rows_left exist
#pragma unroll
  for (int j = 0; j < kFrags; ++j)
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const uint32_t off = (8 * j + q) * row_bytes;
      const bool ok = full || 8 * j + q < rows_left;
      if constexpr (V == 1) {
        const float lo = acc[0][j][q], hi = acc[0][j][2 + q];  // rows g, g + 8
        const float other = __shfl_xor_sync(0xffffffffu, odd ? lo : hi, 4);
        const float w[2] = {odd ? other : lo, odd ? hi : other};
        if (ok) StoreVec<T, 2>(reinterpret_cast<T*>(col_out[0] + off), w);
      } else {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float v[V];  // by sub-row
#pragma unroll
          for (int s = 0; s < V; ++s) {
            float x = acc[0][j][2 * h + q];
#pragma unroll
            for (int c = 1; c < V; ++c) x = slot[h][c] == s ? acc[c][j][2 * h + q] : x;
            v[s] = x;
          }
          if (ok) StoreVec<T, V>(reinterpret_cast<T*>(col_out[h] + off), v);
        }
      }
    }
}

}  // namespace samoyeds::cuda
