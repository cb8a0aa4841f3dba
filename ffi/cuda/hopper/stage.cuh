// One K stage of the Hopper kernels' shared-memory ring, and the consumer side's view of
// it: [A: BM compressed rows | B: two K halves of BN routed rows | metadata], A and B in
// the 128-byte swizzled K-major layout the wgmma descriptors describe (chunk c of row r
// at chunk c ^ (r % 8)); the descriptors of a k-step's operands; its metadata registers.
#pragma once

#include <cstdint>

#include "cuda/hopper/wgmma.cuh"
#include "cuda/tile.cuh"

namespace samoyeds::cuda {

template <int BM, int BN, int Stages>
struct WgmmaStage {
  static constexpr int kBM = BM;                 // kept rows per block
  static constexpr int kBN = BN;                 // routed rows per block (wgmma N)
  static constexpr int kBK = 128;                // dense K per stage
  static constexpr int kStages = Stages;
  static constexpr int kSteps = kBK / kStepK;    // wgmma k-steps per stage
  // One stage of a compressed A row is kBK / 2 values = 128 bytes = one swizzle row.
  static constexpr int kARow = kBK / 2 * 2;
  static constexpr int kABytes = kBM * kARow;
  // B is stored as two K halves of 64 values (128 bytes) for every routed row.
  static constexpr int kBHalf = kBN * 128;
  static constexpr int kBBytes = 2 * kBHalf;
  static constexpr int kMetaRow = kSteps * 4;
  static constexpr int kMetaBytes = kBM * kMetaRow;
  static constexpr int kStageBytes = kABytes + kBBytes + kMetaBytes;
  static constexpr int kPipeBytes = kStages * kStageBytes;
  // B's two K halves are separate [kBN x 128 B] slabs.
  static __device__ __forceinline__ uint32_t AOffset(int row, int chunk) {
    return row * 128 + ((chunk ^ (row & 7)) << 4);
  }
  static __device__ __forceinline__ uint32_t BOffset(int row, int chunk) {
    return (chunk >> 3) * kBHalf + AOffset(row, chunk & 7);
  }
  static_assert(kARow == 128, "A stage rows are one 128-byte swizzle row");
  static_assert(kABytes % 1024 == 0 && kBHalf % 1024 == 0 && kStageBytes % 1024 == 0,
                "swizzled tiles start on 1024-byte boundaries");
};

// Operand descriptors: the low word of Desc128 holds the start address / 16 (14 bits, no
// carry out for shared addresses), so a tile's descriptor is its stage's plus a constant;
// the high word is the same for every tile. a_desc0 / b_desc0: the low words of buffer
// 0's A rows of the warpgroup and B slab; b_rows: the byte offset of the first routed
// row in each B slab (whole swizzle atoms).
template <typename Cfg>
__device__ __forceinline__ uint64_t StageDescA(uint32_t a_desc0, int buf, int s) {
  const uint32_t a_lo = a_desc0 + buf * (Cfg::kStageBytes >> 4) + ((s * 32) >> 4);
  return (static_cast<uint64_t>(kDesc128Hi) << 32) | a_lo;
}
template <typename Cfg>
__device__ __forceinline__ uint64_t StageDescB(uint32_t b_desc0, int buf, int s, int b_rows) {
  const uint32_t b_lo = b_desc0 + buf * (Cfg::kStageBytes >> 4) +
                        (((s >> 1) * Cfg::kBHalf + b_rows + (s & 1) * 64) >> 4);
  return (static_cast<uint64_t>(kDesc128Hi) << 32) | b_lo;
}

// The stage's metadata, one register per k-step. Lane (g, t) supplies rows g + 8 (t & 1)
// of k-step s + (t >> 1): selector 0 for the even step, 1 for the odd one (the mma.sp
// m16n8k32 per-warp layout). meta_offset: StageMetaOffset of the lane; absent fragments
// get a valid filler pattern.
template <typename Cfg>
__device__ __forceinline__ int StageMetaOffset(int row0, int g, int tq) {
  return Cfg::kABytes + Cfg::kBBytes + (row0 + g + 8 * (tq & 1)) * Cfg::kMetaRow;
}
template <typename Cfg>
__device__ __forceinline__ void LoadStageMeta(const uint8_t* smem, int buf, int meta_offset,
                                              bool frag_ok, int tq,
                                              uint32_t (&mw)[Cfg::kSteps]) {
  const uint32_t* words =
      reinterpret_cast<const uint32_t*>(smem + buf * Cfg::kStageBytes + meta_offset);
#pragma unroll
  for (int s = 0; s < Cfg::kSteps; ++s)
    mw[s] = frag_ok ? words[(s & ~1) + (tq >> 1)] : kFillerMeta;
}

// A consumer thread's place in its block's tile: warp w of warpgroup wg holds 16 kept rows
// (row0 ...) of the warpgroup's 64; lane (g, t) accumulates rows g and g + 8 of them,
// columns 8j + 2t + {0, 1} (the m16n8 fragment layout per warp). The warpgroup index goes
// through a shuffle so the compiler knows it is warp-uniform and keeps the descriptor
// arithmetic in uniform registers. ctid: the thread's index among the consumers.
template <int BM>
struct ConsumerLane {
  int lane, wg, g, tq, row0;
  bool frag_ok;  // the warp's rows are present (tile halves hold whole fragments)
  int kept[2];   // the lane's two rows, block-relative
  __device__ __forceinline__ ConsumerLane(int ctid, const RowTile& tile) {
    lane = ctid & 31;
    const int warp = ctid >> 5;
    wg = __shfl_sync(0xffffffffu, warp / 4, 0);
    g = lane >> 2;
    tq = lane & 3;
    row0 = wg * 64 + (warp % 4) * 16;
    frag_ok = RowPresent<BM>(tile, row0);
    kept[0] = row0 + g;
    kept[1] = row0 + g + 8;
  }
};

// k-step s's sparse wgmma (A and B by descriptor): selector s % 2 picks its metadata half.
template <typename T, int kFrags>
__device__ __forceinline__ void IssueStep(float (&d)[kFrags][4], uint64_t da, uint64_t db,
                                          uint32_t mw, int s) {
  if (s % 2 == 0)
    WgmmaSp<T, 0, kFrags>(d, da, db, mw);
  else
    WgmmaSp<T, 1, kFrags>(d, da, db, mw);
}

}  // namespace samoyeds::cuda
