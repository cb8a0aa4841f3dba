// Per-block operand metadata staged before a K loop: the token row of each routed row
// (SEL) and the sub-row indices of the block's kept rows.
#pragma once

#include <cstdint>

#include "cuda/ptx.cuh"
#include "cuda/schedule.cuh"
#include "cuda/tile.cuh"

namespace samoyeds::cuda {

// Token id of each routed row of the tile, -1 when absent or an invalid SEL entry (read
// as a zero row: never an out-of-bounds read).
template <int BN, int kThreads>
__device__ void LoadSourceRows(const Args& a, const Work& work, int (&src_row)[BN]) {
  for (int i = threadIdx.x; i < BN; i += kThreads) {
    const int r = work.row_begin + i;
    int t = -1;
    if (r < work.row_end) {
      t = a.has_sel ? __ldg(a.sel + r) : r;
      if (t < 0 || t >= a.tokens) t = -1;
    }
    src_row[i] = t;
  }
}
// The block's sub-row indices for windows [w0, w0 + wc) of its tile's kept rows (idx:
// the expert's [Mk, windows] bytes), staged in shared memory once as [tile row, wc] when
// they fit, so per-window reads never wait on global memory. Every load of a thread is
// issued before its first store (one memory round trip instead of one per byte: the
// block's K loop waits on this). Returns whether they were staged (the caller syncs
// before reading). `capacity`: bytes reserved at idx_smem, at most kIndexStageBytes.
// Threads tid = 0 .. kThreads - 1 of the block share the work.
template <int BM, int kThreads>
__device__ bool StageIndices(const uint8_t* idx, const RowTile& t, uint8_t* idx_smem,
                             int windows, int w0, int wc, int capacity, int tid) {
  const int rows = t.hi > 0 ? BM / 2 + t.hi : t.lo;  // tile rows spanned
  if (rows * wc > capacity) return false;
  // Byte i of the staged tile: the lower half's span below n_lo, the upper's from it
  // (selects, not a runtime-indexed array, which would live in local memory).
  const uint8_t* src_lo = idx + static_cast<int64_t>(KeptRow<BM>(t, 0)) * windows + w0;
  const uint8_t* src_hi = idx + static_cast<int64_t>(KeptRow<BM>(t, BM / 2)) * windows + w0;
  uint8_t* dst_hi = idx_smem + BM / 2 * wc;
  const int n_lo = t.lo * wc, n = n_lo + t.hi * wc;  // bytes: lower half, both halves
  if (wc == windows && windows % 16 == 0) {
    // Whole rows of 16-byte multiples: both halves are contiguous, 16-byte aligned spans.
    constexpr int kPer = (kIndexStageBytes / 16 + kThreads - 1) / kThreads;
    uint4 v[kPer];
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int i = (tid + u * kThreads) * 16;
      const uint8_t* p = i < n_lo ? src_lo + i : src_hi + (i - n_lo);
      if (i < n) v[u] = __ldg(reinterpret_cast<const uint4*>(p));
    }
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int i = (tid + u * kThreads) * 16;
      uint8_t* p = i < n_lo ? idx_smem + i : dst_hi + (i - n_lo);
      if (i < n) *reinterpret_cast<uint4*>(p) = v[u];
    }
    return true;
  }
  constexpr int kBatch = 8;
  for (int first = tid; first < n; first += kBatch * kThreads) {
    uint8_t v[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = first + u * kThreads, j = i < n_lo ? i : i - n_lo;
      if (i < n) v[u] = __ldg((i < n_lo ? src_lo : src_hi) + j / wc * windows + j % wc);
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = first + u * kThreads;
      if (i < n) *(i < n_lo ? idx_smem + i : dst_hi + (i - n_lo)) = v[u];
    }
  }
  return true;
}

// The windows StageIndicesAsync stages for windows [w0, w0 + wc): whole 16-byte chunks
// of each row, [w0 rounded down, w0 + wc rounded up) to multiples of 16.
struct IndexSpan {
  int base;   // first staged window
  int width;  // staged windows per tile row (the shared-memory row stride)
};
__host__ __device__ constexpr IndexSpan IndexSpanOf(int w0, int wc) {
  return {w0 / 16 * 16, (w0 + wc + 15) / 16 * 16 - w0 / 16 * 16};
}
// Bytes StageIndicesAsync needs for BM rows and any split of at most wc windows.
__host__ __device__ constexpr int IndexSpanBytes(int bm, int wc) {
  return bm * ((wc + 15) / 16 * 16 + 16);
}
// StageIndices by cp.async: the block's sub-row indices for windows [w0, w0 + wc) as
// [tile row, span.width] (span = IndexSpanOf(w0, wc)), copied without waiting, so the
// copies fly while the block reads its routed rows and fills its first stages (a load
// would stall the thread for a round trip that queues behind every block's first weight
// stages). Needs 16-byte aligned rows (windows % 16 == 0); returns false, copying
// nothing, when not possible or when the span exceeds `capacity` (the caller then uses
// StageIndices). The caller waits (CpAsyncWaitAll) and syncs before reading.
template <int BM, int kThreads>
__device__ bool StageIndicesAsync(const uint8_t* idx, const RowTile& t, uint32_t idx_smem,
                                  int windows, IndexSpan span, int capacity, int tid) {
  const int rows = t.hi > 0 ? BM / 2 + t.hi : t.lo;
  if (windows % 16 != 0 || (reinterpret_cast<uintptr_t>(idx) & 15) != 0 ||
      rows * span.width > capacity)
    return false;
  const int chunks = span.width / 16;
  const uint8_t* src_lo = idx + static_cast<int64_t>(KeptRow<BM>(t, 0)) * windows + span.base;
  const uint8_t* src_hi = idx + static_cast<int64_t>(KeptRow<BM>(t, BM / 2)) * windows + span.base;
  for (int i = tid; i < (t.lo + t.hi) * chunks; i += kThreads) {
    const int r = i / chunks, c = i - r * chunks;
    const bool upper = r >= t.lo;
    const int ru = upper ? r - t.lo : r;
    const uint8_t* src = (upper ? src_hi : src_lo) + static_cast<int64_t>(ru) * windows + c * 16;
    CpAsync16(idx_smem + ((upper ? BM / 2 : 0) + ru) * span.width + c * 16, src, 16);
  }
  return true;
}
}  // namespace samoyeds::cuda
