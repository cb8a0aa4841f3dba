// What one launch and one block compute, shared by every CUDA kernel of the sparse ragged
// dot: the launch arguments and the kept rows of a block's tile. Every kernel computes
// C^T[M, R] = A[M, K] * X^T[K, R] per expert, with the compressed weight as the sparse A
// operand and the routed rows (gathered through SEL) as the N dimension.
#pragma once

#include <cstdint>

#include "format.h"
#include "glu.h"

namespace samoyeds::cuda {

struct Args {
  const void* x;
  const void* values;
  const uint8_t* indices;
  const uint32_t* metadata;
  const int32_t* sel;
  const int32_t* group_sizes;
  void* out;
  int tokens, k, m, experts, kept_rows, rows, sub_row;
  bool has_sel;
  int glu;       // kGluNone, or the activation of a fused GLU (glu.h)
  int out_cols;  // columns of out: M, or M / 2 with a fused GLU
  bool m_fast = false;  // grid order, set by TileGrid: M tiles along x, row tiles along y
  int raster = 0;       // row tiles per raster group (BlockTile); 0: TileGrid picks
  int splits = 0;       // K splits per tile; 0: the launcher picks (tests force a count)
};

// The kept rows one block computes and the output columns it owns. A tile has BM rows
// in two halves: tile row r < BM / 2 is kept row kept0 + r, and r >= BM / 2 is kept row
// kept0 + skip + r. Without a GLU skip is 0 (BM consecutive kept rows). With a fused
// GLU the kept rows are [gate | up] halves of Mk / 2 rows, and the upper half holds the
// up rows behind the same output columns as the lower half's gate rows
// (skip = Mk / 2 - BM / 2), so one block finds both factors of act(gate) * up in its
// own epilogue tile: tile columns c (gate) and c + GluPairCols (up).
struct RowTile {
  int kept0, skip;
  int lo, hi;     // kept rows present in the lower / upper half (multiples of kRowTile)
  int out0;       // first column of out
  int out_here;   // columns of out the tile owns
};
template <int BM, int N, int V>
__device__ __forceinline__ RowTile TileRows(const Args& a, int y) {
  static_assert(BM % (2 * kRowTile) == 0, "tile halves are whole row tiles");
  constexpr int kHalf = BM / 2;
  if (a.glu == kGluNone) {
    const int kept0 = y * BM, here = min(BM, a.kept_rows - kept0);
    return {kept0, 0, min(here, kHalf), max(here - kHalf, 0), kept0 / N * V, here / N * V};
  }
  const int half = a.kept_rows / 2, kept0 = y * kHalf, here = min(kHalf, half - kept0);
  return {kept0, half - kHalf, here, here, kept0 / N * V, here / N * V};
}
template <int BM>
__device__ __forceinline__ bool RowPresent(const RowTile& t, int r) {
  return r < BM / 2 ? r < t.lo : r - BM / 2 < t.hi;
}
template <int BM>
__device__ __forceinline__ int KeptRow(const RowTile& t, int r) {
  return t.kept0 + r + (r >= BM / 2 ? t.skip : 0);
}
// Distance in epilogue-tile columns between an output column's gate and up factors.
template <int BM, int N, int V>
constexpr int GluPairCols() { return BM / 2 / N * V; }
// Grid y extent of TileRows.
template <int BM>
inline int MTiles(const Args& a) {
  if (a.glu == kGluNone) return (a.kept_rows + BM - 1) / BM;
  return (a.kept_rows / 2 + BM / 2 - 1) / (BM / 2);
}
// Metadata for MMA rows that hold no kept row (their values are zero): positions 0 and 1
// in every group, a valid ordered pattern.
constexpr uint32_t kFillerMeta = 0x44444444u;
// Shared memory for the block's sub-row indices (N:V with V > 1), after the pipeline: at
// most this much (the warp-level kernel reserves only what its launch needs).
constexpr int kIndexStageBytes = 16 * 1024;
// Dense K of one sparse MMA k-step (m16n8k32 and m64nNk32 alike): one metadata word.
constexpr int kStepK = 32;
static_assert(kStepK == kMetaColsPerWord, "one metadata word per MMA k-step");
}  // namespace samoyeds::cuda
