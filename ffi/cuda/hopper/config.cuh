// The Hopper kernel's block shapes (HopperCfg) and the host-side choice between it and
// the other kernels, from shapes alone.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda/hopper/stage.cuh"
#include "cuda/tile.cuh"

namespace samoyeds::cuda {

// Whether the build contains sm_90a code (CMake defines SAMOYEDS_SM90A with arch 90a).
constexpr bool HopperKernelBuilt() {
#ifdef SAMOYEDS_SM90A
  return true;
#else
  return false;
#endif
}

// Block shape: Consumers warpgroups of 64 kept rows each, BN routed rows (the wgmma N),
// Stages ring buffers. HopperCfgFor<V> below picks the shape each N:V class runs with.
template <int V, int Consumers = 2, int BN = (V == 4 ? 64 : 128), int Stages = 4, int Halves = 1>
struct HopperCfg : WgmmaStage<64 * Consumers, BN, Stages> {
  using Stage = WgmmaStage<64 * Consumers, BN, Stages>;
  using Stage::kBM, Stage::kBN, Stage::kStages, Stage::kPipeBytes;
  static constexpr int kV = V;
  // Halves = 2: each consumer runs its BN routed rows as two wgmma N = BN / 2 halves with
  // their own MMA groups, steering one half while the other's MMAs run (V > 1 only).
  static constexpr int kHalves = Halves;
  static_assert(Halves == 1 || (Halves == 2 && V > 1), "halves are for sub-row steering");
  // Stages per drain of the halves loop (1:2 at 4096 tokens: 8 beat 2 and 4 by 2-5 %).
  static constexpr int kHalvesUnroll = 8;
  static constexpr int kConsumers = Consumers;       // MMA warpgroups
  static constexpr int kConsumerThreads = 128 * kConsumers;
  static constexpr int kLoadThreads = 128;           // one producer warpgroup
  static constexpr int kThreads = kLoadThreads + kConsumerThreads;
  // setmaxnreg: the producer hands registers to the consumers' accumulators. The block
  // starts with kLaunchRegs per thread (the launch bound's share, in units of 8); an
  // `inc` waits for registers that a `dec` released, so it must ask for no more than
  // that, or it never returns.
  static constexpr int kLaunchRegs = 65536 / kThreads / 8 * 8;
  static constexpr int kProducerRegs = 56;
  static constexpr int kConsumerRegs = std::min(
      240, (kLaunchRegs + kLoadThreads * (kLaunchRegs - kProducerRegs) / kConsumerThreads) / 8 * 8);
  static_assert(kLoadThreads * (kLaunchRegs - kProducerRegs) >=
                    kConsumerThreads * (kConsumerRegs - kLaunchRegs),
                "consumers ask for no more registers than the producer releases");
  // The halves loop reads each stage's compressed A fragments once into registers
  // (ldmatrix) and issues both halves from them (sparse wgmma with A in registers), so A
  // leaves shared memory once per stage instead of once per half.
  static constexpr bool kARegs = false;
  static constexpr int kFrags = kBN / 8 / Halves;  // n8 column groups of one half's accumulators
  // Dynamic shared memory: pipeline, staged sub-row indices (none for V = 1), SEL rows,
  // the full and empty mbarriers of every stage, alignment slack.
  static constexpr int kIndexBytes = V > 1 ? kIndexStageBytes : 0;
  static constexpr int kBarrierOffset = kPipeBytes + kIndexBytes + kBN * 4;
  static constexpr int kSmemBytes = kBarrierOffset + 2 * kStages * 8 + 1024;
  static_assert(kSmemBytes <= 227 * 1024, "fits an H100 block's shared memory");
};

// Mean routed rows per expert above which the Hopper kernel is used: below it the
// warp-level kernel's smaller tiles win (H100, 1 Mixtral expert: 128 rows 49 us warp vs
// 64 us Hopper; 512 rows 161 us vs 126 us; the Mixtral stack at 256 rows/expert ran
// 0.90x the dense capacity einsum with the warp-level kernel).
constexpr int64_t kHopperMinRowsPerExpert = 128;
inline bool UseHopperFor(const Args& a) {
  return a.rows > kHopperMinRowsPerExpert * a.experts;
}

// The shape each N:V class runs with (measured; docs/kernel_history.md). Plain 2:4 has no
// sub-row steering, so its registers go to a third consumer warpgroup (BM 192) and to
// N = 192 routed rows per block (the B tile is read once per 192 x 192 outputs instead of
// per 192 x 128; three stages of 75 KB fill shared memory).
template <int V>
using HopperCfgFor = std::conditional_t<V == 1, HopperCfg<1, 3, 192, 3>, HopperCfg<V>>;
// Plain 2:4 where N = 192 blocks would not fill one wave of the GPU: more, smaller blocks
// win there (4 experts x 150 rows, K = 2048, M = 1408: 20.4 vs 24.5 us).
using HopperPlainNarrowCfg = HopperCfg<1, 3, 128, 3>;
// 1:2 with every stage one window (sub_row 128) steers each N half while the other's MMAs
// run, both halves from one A fragment in registers (A leaves shared memory once per
// stage instead of once per half).
struct HopperHalvesCfg : HopperCfg<2, 2, 128, 4, 2> {
  static constexpr bool kARegs = true;
};

}  // namespace samoyeds::cuda
