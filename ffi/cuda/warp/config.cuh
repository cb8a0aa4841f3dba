// The warp-level kernel's block shapes and the host-side choices made from shapes alone
// (group sizes stay on the device): which tile, and how many K splits.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cuda/device.cuh"
#include "cuda/schedule.cuh"
#include "cuda/tile.cuh"

namespace samoyeds::cuda {

// A tile configuration; every size below derives from these.
template <int BM, int BN, int Stages, int WarpsM, int WarpsN>
struct TileCfg {
  static constexpr int kBM = BM;   // kept rows per block
  static constexpr int kBN = BN;   // routed rows per block
  static constexpr int kBK = 128;  // dense K per pipeline stage
  static constexpr int kStages = Stages;
  static constexpr int kWarpsM = WarpsM, kWarpsN = WarpsN;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kFragsM = kBM / kWarpsM / 16;  // m16 fragments per warp
  static constexpr int kFragsN = kBN / kWarpsN / 8;   // n8 fragments per warp
  static constexpr int kSteps = kBK / kStepK;         // mma k-steps per stage
  static constexpr int kARow = kBK / 2 * 2;           // bytes of one compressed row per stage
  static constexpr int kBRow = kBK * 2;               // bytes of one activation row per stage
  static constexpr int kMetaRow = kSteps * 4;         // bytes of metadata per kept row per stage
  static constexpr int kABytes = kBM * kARow;
  static constexpr int kBBytes = kBN * kBRow;
  static constexpr int kMetaBytes = kBM * kMetaRow;
  static constexpr int kStageBytes = kABytes + kBBytes + kMetaBytes;
  static constexpr int kPipeBytes = kStages * kStageBytes;
  static constexpr int kBRowStride = kBRow;
  static_assert(kSteps % 2 == 0, "metadata words are consumed in selector pairs");
  // XOR swizzles of 16-byte chunks: ldmatrix's 8 row addresses land in distinct banks.
  static __device__ __forceinline__ int AOffset(int row, int chunk) {
    return row * kARow + ((chunk ^ (row & 7)) << 4);
  }
  static __device__ __forceinline__ int BOffset(int row, int chunk) {
    return row * kBRow + ((chunk ^ (row & 7)) << 4);
  }
};
// Prefill: 64 kept rows x 64 routed rows, 4 warps of 32 x 32.
using TileLarge = TileCfg<64, 64, 3, 2, 2>;
// Decode (few rows per expert): 32 kept rows x 16 routed rows, 4 warps of 16 x 8, a
// deeper pipeline; twice the blocks of the prefill tile so one expert fills the GPU.
using TileSmall = TileCfg<32, 16, 4, 2, 2>;
// Dynamic shared memory of a launch: the pipeline, then the sub-row indices of the K range
// one block covers (V > 1), sized at launch (a Mixtral decode block needs 0.5 KB of the
// 16 KB kIndexStageBytes; indices beyond that are read from global memory).
template <typename Tile, int V>
int SmemBytes(const Args& a, int splits) {
  if (V == 1) return Tile::kPipeBytes;
  const int k_stages = (a.k + Tile::kBK - 1) / Tile::kBK;
  const int per_split = (k_stages + splits - 1) / splits;
  const int64_t windows =
      std::min<int64_t>(a.k / a.sub_row, int64_t{per_split} * Tile::kBK / a.sub_row);
  const int64_t bytes = (Tile::kBM * windows + 15) / 16 * 16;
  return Tile::kPipeBytes + static_cast<int>(std::min<int64_t>(kIndexStageBytes, bytes));
}
// Mean routed rows per expert up to which the decode tile is used (host-side choice
// from shapes only: group sizes stay on the device).
constexpr int64_t kSmallTileMaxRowsPerExpert = 32;

// K splits for decode shapes: a block's K loop is latency-bound (few routed rows, one
// stage in flight per few hundred cycles), so when the M tiles alone leave the SMs short
// of blocks, the blocks of one cluster share a tile's K range (a cluster holds at most 8
// blocks, the portable size). Only on sm_90 (clusters, distributed shared memory);
// Args::splits forces a count (tests and benchmarks).
constexpr int kMaxSplits = 8;
constexpr int kSplitTargetBlocksPerSm = 4;
constexpr int kMinStagesPerSplit = 4;

template <typename Tile>
int SplitsFor(const Args& a, int m_tiles) {
  const DeviceFacts& dev = CurrentDevice();
  if (dev.major < 9) return 1;
  const int k_stages = (a.k + Tile::kBK - 1) / Tile::kBK;
  if (a.splits > 0) return std::min(a.splits, k_stages);
  const int64_t row_tiles = BusyRowTiles<Tile::kBN>(a);
  const int64_t target = int64_t{kSplitTargetBlocksPerSm} * dev.sms;
  int s = 1;
  while (s < kMaxSplits && row_tiles * m_tiles * s * 2 <= target &&
         k_stages >= 2 * s * kMinStagesPerSplit)
    s *= 2;
  return s;
}

}  // namespace samoyeds::cuda
