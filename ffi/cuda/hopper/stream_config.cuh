// The serving-path kernel's block shapes (StreamCfg) and its host-side choices, from shapes
// alone: which block shape, and how many K splits. The kernel is in stream_kernel.cuh.
//
// A call with few routed rows per expert is bound by reading the compressed weight once:
// every SM must keep enough weight bytes in flight to cover HBM latency, and every SM must
// have work. So the tiles are narrow in N (the routed rows), two blocks share an SM, and
// K is split over the blocks of a cluster when the tiles alone would leave SMs idle.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda/device.cuh"
#include "cuda/hopper/stage.cuh"
#include "cuda/schedule.cuh"
#include "cuda/tile.cuh"

namespace samoyeds::cuda {

// Shared memory of an sm_90 SM and what the driver reserves per resident block: a block
// of a shape with BlocksPerSm blocks per SM gets at most StreamSmemPerBlock bytes.
constexpr int kSmemPerSm = 228 * 1024;
constexpr int kSmemReservedPerBlock = 1024;
template <int BlocksPerSm>
constexpr int StreamSmemPerBlock() {
  return kSmemPerSm / BlocksPerSm - kSmemReservedPerBlock;
}
// Shared memory kept for the staged sub-row indices at least (more when the ring leaves it).
constexpr int kStreamIndexReserve = 2 * 1024;

// A block's shared memory before the staged sub-row indices: the 1024-byte alignment
// slack, then from the aligned base the ring of `stages` buffers, the tile's token rows
// (bn ints) and the full and empty mbarriers; the indices start at the returned offset
// less the slack.
constexpr int StreamFixedSmemBytes(int stage_bytes, int bn, int stages) {
  return (stages * stage_bytes + bn * 4 + 2 * stages * 8 + 15) / 16 * 16 + 1024;
}

// Consumers warpgroups of 64 kept rows each, BN routed rows (the wgmma N), Stages ring
// buffers, BlocksPerSm blocks resident per SM; one producer warp after the consumer
// warpgroups issues the loads.
template <int V, int Consumers, int BN, int Stages, int BlocksPerSm>
struct StreamCfg : WgmmaStage<64 * Consumers, BN, Stages> {
  using Stage = WgmmaStage<64 * Consumers, BN, Stages>;
  using Stage::kBM, Stage::kBN, Stage::kBK, Stage::kStages, Stage::kARow, Stage::kABytes,
      Stage::kPipeBytes;
  static constexpr int kV = V;
  static constexpr int kConsumers = Consumers;
  static constexpr int kConsumerThreads = 128 * Consumers;
  static constexpr int kProducerThreads = 32;
  static constexpr int kThreads = kConsumerThreads + kProducerThreads;
  static constexpr int kBlocksPerSm = BlocksPerSm;
  // Launched with programmatic stream serialization (a harness variant so far): the
  // blocks may start during the previous kernel's tail and wait for it before any global
  // access; the next kernel may start once every block's MMAs are done.
  static constexpr bool kProgrammatic = false;
  // Ablations for the kernel harness only (timing, wrong results): bit 0 skips the
  // producer's metadata copies, bit 1 its routed-row copies, bit 2 the consumers' MMAs
  // and steering, bit 3 the K-split sum (cluster barriers included). Zero in every
  // kernel the library launches.
  static constexpr int kSkip = 0;
  // Each tile half of the values is one bulk tensor copy of kBM / 2 rows.
  static constexpr int kAHalfBytes = kBM / 2 * kARow;
  static constexpr int kFrags = kBN / 8;  // n8 column groups of the accumulators
  // The routed rows as two N halves with MMA groups of their own, so that steering one
  // overlaps the other's MMAs (sub_row 128; the harness's variants so far).
  static constexpr bool kHalves = false;
  // Shared memory after the 1024-byte aligned base: the ring, the tile's token rows, the
  // full and empty mbarriers, then the staged sub-row indices (sized at launch).
  static constexpr int kSrcRowOffset = kPipeBytes;
  static constexpr int kBarrierOffset = kSrcRowOffset + kBN * 4;
  static constexpr int kFixedSmemBytes = StreamFixedSmemBytes(Stage::kStageBytes, kBN, kStages);
  static constexpr int kIndexOffset = kFixedSmemBytes - 1024;
  static_assert(kAHalfBytes % 1024 == 0, "each half's box starts on a swizzle atom");
  static_assert(kBN % 16 == 0 && kBN <= 64, "wgmma N of 16, 32 or 64");
  static_assert(kFixedSmemBytes + kStreamIndexReserve <= StreamSmemPerBlock<BlocksPerSm>(),
                "BlocksPerSm blocks fit an SM's shared memory");
};

// As many stages as fit the block's share of the SM next to the fixed parts (alignment
// slack, token rows, barriers) and the index reserve, at most 8: the weight bytes in
// flight per SM are what keeps HBM streaming.
template <int Consumers, int BN, int BlocksPerSm>
constexpr int StreamStages() {
  constexpr int stage = WgmmaStage<64 * Consumers, BN, 1>::kStageBytes;
  int stages = 8;
  while (stages > 1 && StreamFixedSmemBytes(stage, BN, stages) + kStreamIndexReserve >
                           StreamSmemPerBlock<BlocksPerSm>())
    --stages;
  return stages;
}
template <int V, int Consumers, int BN, int BlocksPerSm>
using StreamCfgOf =
    StreamCfg<V, Consumers, BN, StreamStages<Consumers, BN, BlocksPerSm>(), BlocksPerSm>;
// The narrow block (up to 16 routed rows per expert): 64 kept rows x 16 routed rows, two
// blocks per SM, an 8-deep ring. The wide block: 64 kept rows x 64 routed rows, two
// blocks per SM, a 4-deep ring, for V <= 2; on the H200 it beat 128 x 64 blocks (two consumer warpgroups, one
// block per SM) in every case measured (1 expert 1:2, 64 rows: up 22.5 vs 33.1 us, down
// 40.7 vs 63.3 us; 8 experts x 32 rows: 244 vs 377 us). V = 4 keeps 128 x 32 blocks, one
// per SM: four accumulator sets of 64 routed rows would not fit two blocks' registers.
template <int V>
using StreamNarrowCfg = StreamCfgOf<V, 1, 16, 2>;
template <int V>
using StreamWideCfg =
    std::conditional_t<V == 4, StreamCfgOf<V, 2, 32, 1>, StreamCfgOf<V, 1, 64, 2>>;

// Mean routed rows per expert up to which the narrow block is used.
constexpr int64_t kStreamNarrowMaxRowsPerExpert = 16;

// K splits: as many as the block slots of the GPU hold for the busy tiles, while each
// split keeps at least kStreamMinStagesPerSplit K stages. The blocks of one tile's splits
// form a cluster and sum their partial tiles through distributed shared memory in a fixed
// order. At most 6: clusters of 8 were slower than of 6 wherever both fit (down
// projection, 16 rows: 22.6 against 16.4 us; 64 rows: 40.2 against 28.4 us; H200).
// Args::splits forces a count.
constexpr int kStreamMaxSplits = 6;
constexpr int kStreamMinStagesPerSplit = 4;

template <typename Cfg>
int StreamSplitsFor(const Args& a, int m_tiles) {
  const int k_stages = (a.k + Cfg::kBK - 1) / Cfg::kBK;
  if (a.splits > 0) return std::min(a.splits, k_stages);
  const int64_t row_tiles = BusyRowTiles<Cfg::kBN>(a);
  const int64_t slots = int64_t{Cfg::kBlocksPerSm} * CurrentDevice().sms;
  const int64_t fit = slots / std::max<int64_t>(1, row_tiles * m_tiles);
  const int s = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>({fit, kStreamMaxSplits, k_stages / kStreamMinStagesPerSplit})));
  // The count the rounded-up stages per split use, so that no split is empty.
  const int per_split = (k_stages + s - 1) / s;
  return (k_stages + per_split - 1) / per_split;
}

}  // namespace samoyeds::cuda
