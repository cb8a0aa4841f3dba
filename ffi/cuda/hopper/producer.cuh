// The Hopper kernel's producer warpgroup: cp.async copies of one K stage (compressed
// values, SEL-gathered activation rows, metadata) into a ring buffer.
#pragma once

#include <cstdint>

#include "cuda/ptx.cuh"
#include "cuda/tile.cuh"

namespace samoyeds::cuda {

// The producer warpgroup's loader. It runs on few registers (setmaxnreg) and must issue
// a stage's copies with few instructions and few L1 wavefronts: in every warp-wide
// copy, 8 consecutive lanes cover one 128-byte line of a row (4 full lines per
// instruction, the minimum for 512 bytes); lane (s = lane / 8, q = lane % 8) copies
// chunk q of rows 4i + s of its warp's rows, i = 0, 1, ...; all rows of one lane share
// r & 3, so their swizzle needs only two XORs. Row pointers and the B rows' tokens are
// fixed at construction and a stage adds its K offset; every copy's shared address is
// an immediate offset from a per-thread base.
template <typename Cfg, typename T>
class ProducerLoader {
 public:
  static constexpr int kWarps = Cfg::kLoadThreads / 32;
  static constexpr int kARows = Cfg::kBM / kWarps;   // per warp
  static constexpr int kBRows = Cfg::kBN / kWarps;
  static constexpr int kAI = kARows / 4;             // A copies per thread and stage
  static constexpr int kBI = kBRows / 4;             // B rows per thread (2 copies each)
  static constexpr int kMI = kARows / 8;             // metadata: 4 lanes per row
  static_assert(Cfg::kARow == 128 && Cfg::kBK * 2 == 256, "A rows are one line, B rows two");
  static_assert(kAI * 4 * kWarps == Cfg::kBM && kBI * 4 * kWarps == Cfg::kBN &&
                    kMI * 8 * kWarps == Cfg::kBM && Cfg::kSteps == 4,
                "tile rows divide over the producer's lanes");
  static_assert((Cfg::kBM / 2) % kARows == 0, "a warp's A and metadata rows lie in one tile half");

  __device__ __forceinline__ ProducerLoader(const Args& a, const T* values,
                                            const uint32_t* meta, const int* src_row,
                                            const RowTile& tile, int tid) {
    const int half_k = a.k / 2, words = a.k / kMetaColsPerWord;
    const int warp = tid / 32, lane = tid % 32, s = lane / 8, q = lane % 8;
    // The tile half of this warp's rows: rows below `present` (half-relative) exist.
    const int half0 = warp * kARows >= Cfg::kBM / 2 ? Cfg::kBM / 2 : 0;
    const int present = half0 ? tile.hi : tile.lo;
    // Kept row of half-relative row r, clamped to a present row (pointers stay in range).
    auto kept = [&](int r) { return KeptRow<Cfg::kBM>(tile, half0 + max(min(r, present - 1), 0)); };
    // A: rows warp * kARows + 4i + s, chunk q; 4 rows apart = 4 * half_k values.
    const int a_row = warp * kARows + s;
    a_rows_ = max(0, (present - (a_row - half0) + 3) / 4);  // copies i < a_rows_ are present
    a_src_ = values + static_cast<int64_t>(kept(a_row - half0)) * half_k + q * 8;
    a_step_ = 4 * half_k;
    // Copy i goes to Cfg::AOffset(a_row + 4i, q) = a_dst_[i & 1] + 512 i: rows 4 apart
    // alternate between two swizzle phases.
#pragma unroll
    for (int p = 0; p < 2; ++p) a_dst_[p] = Cfg::AOffset(a_row + 4 * p, q) - 512 * p;
    // B: rows warp * kBRows + 4i + s, chunks q (first half) and 8 + q (second half).
    const int b_row = warp * kBRows + s;
    b_ok_ = 0;
#pragma unroll
    for (int i = 0; i < kBI; ++i) {
      const int t = src_row[b_row + 4 * i];
      if (t >= 0) b_ok_ |= 1u << i;
      b_src_[i] = static_cast<const T*>(a.x) + static_cast<int64_t>(max(t, 0)) * a.k + q * 8;
    }
#pragma unroll
    for (int p = 0; p < 2; ++p) b_dst_[p] = Cfg::BOffset(b_row + 4 * p, q) - 512 * p;
    // Metadata: rows warp * kARows + 8i + lane / 4, word lane % 4 of the stage's 4.
    const int m_row = warp * kARows + lane / 4;
    m_rows_ = max(0, (present - (m_row - half0) + 7) / 8);
    m_src_ = meta + static_cast<int64_t>(kept(m_row - half0)) * words + lane % 4;
    m_step_ = 8 * words;
    m_dst_ = m_row * Cfg::kMetaRow + (lane % 4) * 4;
    m_word_ = lane % 4;
    q8_ = q * 8;
  }

  // Issues the copies of K stage `stage` into the stage buffer at shared address `dst`.
  __device__ __forceinline__ void Load(const Args& a, uint32_t dst, int stage) const {
    const uint32_t sa = dst, sb = sa + Cfg::kABytes, sm = sb + Cfg::kBBytes;
    const int k0 = stage * Cfg::kBK;
    // Dense columns left; K is a multiple of 32, and only the last stage of a K that
    // is not a multiple of kBK has fewer than kBK (its missing k-steps are not issued).
    const int left = a.k - k0;
    // Chunk q holds dense columns [16q, 16q + 16) of an A row, [8q, 8q + 8) (and
    // 64 more) of a B row.
    const bool a_col = 2 * q8_ < left, b_col0 = q8_ < left, b_col1 = 64 + q8_ < left;
#pragma unroll
    for (int i = 0; i < kAI; ++i) {
      const T* src = a_src_ + static_cast<int64_t>(i) * a_step_ + k0 / 2;
      CpAsync16(sa + a_dst_[i & 1] + i * 512, src, i < a_rows_ && a_col ? 16 : 0);
    }
#pragma unroll
    for (int i = 0; i < kBI; ++i) {
      const T* src = b_src_[i] + k0;
      const bool ok = (b_ok_ >> i) & 1;
      // Chunk 8 + q of a row sits one K half (kBHalf) after chunk q: Cfg::BOffset.
      CpAsync16If(sb + b_dst_[i & 1] + i * 512, src, ok && b_col0);
      CpAsync16If(sb + Cfg::kBHalf + b_dst_[i & 1] + i * 512, src + 64, ok && b_col1);
    }
#pragma unroll
    for (int i = 0; i < kMI; ++i) {
      const uint32_t* src = m_src_ + static_cast<int64_t>(i) * m_step_ + k0 / kMetaColsPerWord;
      const bool ok = i < m_rows_ && m_word_ * kMetaColsPerWord < left;
      CpAsync4(sm + m_dst_ + i * 8 * Cfg::kMetaRow, src, ok ? 4 : 0);
    }
  }

 private:
  const T* a_src_;
  const T* b_src_[kBI];
  const uint32_t* m_src_;
  int a_rows_, a_step_, m_rows_, m_step_, m_word_, q8_;
  uint32_t b_ok_;
  uint32_t a_dst_[2], b_dst_[2], m_dst_;
};

}  // namespace samoyeds::cuda
