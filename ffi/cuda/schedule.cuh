// The device-side tile schedule: which (expert, row tile, M tile) a block computes, found
// from group_sizes on the device (never read on the host), and the launch grid's order.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cuda/tile.cuh"

namespace samoyeds::cuda {

// Which (expert, row tile) this block computes, from group_sizes on the device.
// Negative sizes count as 0 and ranges are clipped to the R output rows, so a bad
// group_sizes can never make the kernel touch memory outside its buffers.
struct Work {
  int expert;     // -1: a zero-fill tile of rows past sum(group_sizes)
  int row_begin;  // first output row of this tile
  int row_end;    // one past the last valid output row of this tile
};

template <int BN>
__device__ Work FindWork(const Args& a, int tile) {
  int seen = 0, row = 0;
  for (int e = 0; e < a.experts; ++e) {
    const int size = min(max(__ldg(a.group_sizes + e), 0), a.rows - row);
    const int tiles = (size + BN - 1) / BN;
    if (tile < seen + tiles) {
      const int begin = row + (tile - seen) * BN;
      return {e, begin, min(begin + BN, row + size)};
    }
    seen += tiles;
    row += size;
  }
  const int begin = row + (tile - seen) * BN;
  return {-1, begin, min(begin + BN, a.rows)};
}

// Row tiles of BN for any group sizes: sum_e ceil(size_e / BN) expert tiles plus
// ceil((R - sum) / BN) zero-fill tiles is at most (R + (E + 1)(BN - 1)) / BN, and at most
// R (no needed tile is empty).
template <int BN>
inline unsigned RowTiles(const Args& a) {
  const int64_t r = a.rows;
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min(r, (r + (int64_t{a.experts} + 1) * (BN - 1)) / BN)));
}

// Row tiles of BN that hold rows, assuming the routed rows spread over as many experts
// as they can (host-side: the group sizes stay on the device). The launchers size their
// K splits and choose their kernel from it.
template <int BN>
inline int64_t BusyRowTiles(const Args& a) {
  return std::max<int64_t>((a.rows + BN - 1) / BN, std::min(a.experts, a.rows));
}

// Activation bytes one raster group of row tiles keeps hot in the L2 (BlockTile).
constexpr int64_t kRasterBytes = int64_t{8} << 20;

// The launch grid (x, y, splits) of BN x BM tiles, and its order (a.m_fast, a.raster).
// Prefill shapes run in raster groups: the blocks of a group cover `raster` row tiles
// (~kRasterBytes of activations) and every M tile, row tiles fastest, so the blocks
// running together share weight tiles and the group's activation rows stay in the L2
// while its weights stream past (one group over every row tile re-reads the activations
// from DRAM at every wave: 1:2 at 4096 tokens then reads ~620 MB for ~180 MB of data).
// Decode shapes have few row tiles per expert and most of the bound's tiles turn out
// empty; there the M tiles run along x, so the empty blocks come last in the launch
// instead of holding SM slots between the busy ones (decode_order = false keeps the
// raster order: kernels whose row tiles of one expert should share weight tiles in the L2).
template <int BN, int BM>
inline dim3 TileGrid(Args& a, unsigned splits = 1, bool decode_order = true) {
  const unsigned rows = RowTiles<BN>(a), ms = static_cast<unsigned>(MTiles<BM>(a));
  a.m_fast = decode_order && static_cast<int64_t>(a.rows) <= int64_t{2} * BN * a.experts &&
             rows <= 65535;
  if (a.raster <= 0) {
    const int64_t tile_bytes = int64_t{BN} * a.k * 2;  // bf16 / fp16 rows
    a.raster = static_cast<int>(std::max<int64_t>(1, kRasterBytes / tile_bytes));
  }
  a.raster = std::min<int>(a.raster, static_cast<int>(rows));
  return a.m_fast ? dim3(ms, rows, splits) : dim3(rows, ms, splits);
}

// This block's row tile and M tile (TileGrid's order).
struct TileIndex {
  int row, m;
};
__device__ __forceinline__ TileIndex BlockTile(const Args& a) {
  if (a.m_fast) return {static_cast<int>(blockIdx.y), static_cast<int>(blockIdx.x)};
  // Launch order is x fastest: block `lin` of the (row tile, M tile) grid is item `in`
  // of raster group `group`, whose n row tiles run fastest.
  const int rows = gridDim.x, ms = gridDim.y;
  const int lin = blockIdx.y * rows + blockIdx.x;
  const int group = lin / (a.raster * ms), in = lin - group * a.raster * ms;
  const int row0 = group * a.raster, n = min(a.raster, rows - row0);
  return {row0 + in % n, in / n};
}
}  // namespace samoyeds::cuda
