// Epilogues shared by the kernels: accumulators -> a shared fp32 tile -> out (with a fused
// GLU), zero rows past sum(group_sizes), and the fixed-order sum of a K-split cluster's
// partial tiles through distributed shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>

#include <cstdint>
#include <type_traits>

#include "cuda/schedule.cuh"
#include "cuda/tile.cuh"
#include "glu.h"

namespace samoyeds::cuda {

// Walks the 8-column groups of a [rows, vec] grid from item `first` in strides of
// `step` items, calling f(row, group): one division per thread, not per item.
template <typename F>
__device__ __forceinline__ void ForEachGroup(int rows, int vec, int first, int step, F&& f) {
  int n = first / vec, g = first % vec;
  const int dn = step / vec, dg = step % vec;
  while (n < rows) {
    f(n, g);
    n += dn;
    g += dg;
    if (g >= vec) {
      g -= vec;
      ++n;
    }
  }
}

// Rows past sum(group_sizes) are zero (written by the first block of a K-split cluster).
template <typename T, int kThreads>
__device__ void ZeroFillTile(const Args& a, const Work& work, int out0, int out_here) {
  if (blockIdx.z != 0) return;
  T* out = static_cast<T*>(a.out) + static_cast<int64_t>(work.row_begin) * a.out_cols + out0;
  ForEachGroup(work.row_end - work.row_begin, out_here / 8, threadIdx.x, kThreads,
               [&](int n, int g) {
                 *reinterpret_cast<uint4*>(out + static_cast<int64_t>(n) * a.out_cols + g * 8) =
                     make_uint4(0, 0, 0, 0);
               });
}
// A block's tile (grid y: kept rows) and routed rows (grid x). False when it has nothing
// to compute: no rows, or rows past sum(group_sizes), which it zero-fills. Every block of a
// K-split cluster shares the tile, so the early exits are cluster-uniform.
template <typename T, int BM, int BN, int N, int V, int kThreads>
__device__ __forceinline__ bool BlockWork(const Args& a, RowTile& tile, Work& work) {
  const TileIndex block = BlockTile(a);
  tile = TileRows<BM, N, V>(a, block.m);
  work = FindWork<BN>(a, block.row);
  if (work.row_begin >= work.row_end) return false;
  if (work.expert < 0) {
    ZeroFillTile<T, kThreads>(a, work, tile.out0, tile.out_here);
    return false;
  }
  return true;
}

// Epilogue, part 1: one m16 fragment row of accumulators -> shared c_tile[routed row]
// [output row] (fp32). kept: the lane's two kept rows (block-relative); n0: the first
// routed column of the lane's fragments; slot_n: which of the N kept rows of a block
// is written in this pass (the N passes add up, separated by barriers).
template <int N, int V, int kFrags, int kCStride, typename Slot>
__device__ __forceinline__ void AccToShared(const float (&acc)[V][kFrags][4],
                                            const Slot (&slot)[2][V], const int (&kept)[2],
                                            int n0, int tq, int slot_n, float* c_tile) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (kept[h] % N != slot_n) continue;
    const int block_row = kept[h] / N * V;
#pragma unroll
    for (int j = 0; j < kFrags; ++j)
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int n = n0 + j * 8 + 2 * tq + q;
#pragma unroll
        for (int c = 0; c < V; ++c) {
          float& dst = c_tile[n * kCStride + block_row + (V > 1 ? slot[h][c] : 0)];
          dst = (slot_n == 0 ? 0.0f : dst) + acc[c][j][2 * h + q];
        }
      }
  }
}

// kN consecutive outputs converted to T, one kN * sizeof(T)-byte store (dst aligned to it).
template <typename T, int kN>
__device__ __forceinline__ void StoreVec(T* dst, const float (&v)[kN]) {
  static_assert(sizeof(T) == 2 && (kN == 2 || kN == 4 || kN == 8), "4-, 8- or 16-byte stores");
  using Vec = std::conditional_t<kN == 2, uint32_t, std::conditional_t<kN == 4, uint2, uint4>>;
  alignas(sizeof(Vec)) T packed[kN];
#pragma unroll
  for (int q = 0; q < kN; ++q) packed[q] = static_cast<T>(v[q]);
  *reinterpret_cast<Vec*>(dst) = *reinterpret_cast<const Vec*>(packed);
}

// Epilogue, part 2: shared fp32 tile -> out rows with 16-byte stores. With a fused GLU
// output column c is act(tile column c) * tile column c + kPair (TileRows).
// tid: the thread's index among the kThreads that store.
template <typename T, int kThreads, int kCStride, int kPair, bool kGlu>
__device__ __forceinline__ void StoreTile(const Args& a, const Work& work, int out0,
                                          int out_here, const float* c_tile, int tid) {
  T* out = static_cast<T*>(a.out) + static_cast<int64_t>(work.row_begin) * a.out_cols + out0;
  ForEachGroup(work.row_end - work.row_begin, out_here / 8, tid, kThreads, [&](int n, int g) {
    const float* src = c_tile + n * kCStride + g * 8;
    float v[8];
#pragma unroll
    for (int q = 0; q < 8; ++q)
      v[q] = kGlu ? GluActivation(src[q], a.glu) * src[kPair + q] : src[q];
    StoreVec<T, 8>(out + static_cast<int64_t>(n) * a.out_cols + g * 8, v);
  });
}
template <typename T, int kThreads, int kCStride, int kPair>
__device__ __forceinline__ void SharedToOut(const Args& a, const Work& work, int out0,
                                            int out_here, const float* c_tile, int tid) {
  if (a.glu == kGluNone)
    StoreTile<T, kThreads, kCStride, kPair, false>(a, work, out0, out_here, c_tile, tid);
  else
    StoreTile<T, kThreads, kCStride, kPair, true>(a, work, out0, out_here, c_tile, tid);
}
// Epilogue of a K-split cluster (sm_90, dims (1, 1, splits)): every block holds a
// partial fp32 tile at the same shared-memory offset; each block takes a share of the
// tile's 8-column groups, sums the splits through distributed shared memory (in rank
// order: the result does not depend on scheduling), applies a fused GLU (columns c and
// c + kPair, as SharedToOut) and stores. Called by kThreads threads (tid in
// [0, kThreads)) of every block, after ClusterSync; the caller syncs the cluster again
// before any block exits.
template <typename T, int kThreads, int kCStride, int kPair>
__device__ __forceinline__ void ClusterEpilogue(const Args& a, const Work& work, int out0,
                                                int out_here, float* c_tile, int tid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int splits = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const bool glu = a.glu != kGluNone;
  T* out = static_cast<T*>(a.out) + static_cast<int64_t>(work.row_begin) * a.out_cols + out0;
  ForEachGroup(work.row_end - work.row_begin, out_here / 8, rank * kThreads + tid,
               splits * kThreads, [&](int n, int g) {
    float sum[2][8] = {};  // [gate or plain, up]
    for (int z = 0; z < splits; ++z) {
      const float* tile = z == rank ? c_tile : cluster.map_shared_rank(c_tile, z);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (h == 1 && !glu) break;
        const float4* src =
            reinterpret_cast<const float4*>(tile + n * kCStride + g * 8 + h * kPair);
        const float4 lo = src[0], hi = src[1];
        sum[h][0] += lo.x; sum[h][1] += lo.y; sum[h][2] += lo.z; sum[h][3] += lo.w;
        sum[h][4] += hi.x; sum[h][5] += hi.y; sum[h][6] += hi.z; sum[h][7] += hi.w;
      }
    }
    float v[8];
#pragma unroll
    for (int q = 0; q < 8; ++q)
      v[q] = glu ? GluActivation(sum[0][q], a.glu) * sum[1][q] : sum[0][q];
    StoreVec<T, 8>(out + static_cast<int64_t>(n) * a.out_cols + g * 8, v);
  });
#endif
}
}  // namespace samoyeds::cuda
