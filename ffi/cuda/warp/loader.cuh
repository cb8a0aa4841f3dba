// The warp-level kernel's stage loader: every thread of the block issues cp.async copies
// of the compressed values, the SEL-gathered activation rows and the metadata.
#pragma once

#include <cstdint>

#include "cuda/ptx.cuh"
#include "cuda/tile.cuh"

namespace samoyeds::cuda {

// A loader's kPer copies of tile rows are BM / kPer rows apart, from a first row r0
// below that step. With kPer even, copy c lies in the tile's upper half iff
// c >= kPer / 2, known at compile time (UpperCopy); a single copy lies where r0 does, and
// its kept row and bound are resolved once (FirstKept, FirstLimit).
template <int kPer>
__device__ __forceinline__ constexpr bool UpperCopy(int c) {
  static_assert(kPer == 1 || kPer % 2 == 0, "copies split evenly over the tile halves");
  return kPer > 1 && c >= kPer / 2;
}
template <int kPer, int BM>
__device__ __forceinline__ int FirstKept(const RowTile& t, int r0) {
  return t.kept0 + r0 + (kPer == 1 && r0 >= BM / 2 ? t.skip : 0);
}
// The row bound of the lower half's copies (of a single copy: of r0's half).
template <int kPer, int BM>
__device__ __forceinline__ int FirstLimit(const RowTile& t, int r0) {
  return kPer == 1 && r0 >= BM / 2 ? BM / 2 + t.hi : t.lo;
}

// The warp-level kernel's loader (every thread loads; the Hopper kernel's producer
// warpgroup has its own, ProducerLoader in wgmma_sp.cuh). Copies one K stage of a
// block's tiles into shared memory with cp.async: the compressed values of its kept
// rows (A), the routed activation rows gathered through SEL (B), and the metadata
// words. Each thread's rows, columns and shared-memory offsets are fixed once, at
// construction; a stage only adds its K offset. Cfg gives the tile sizes and the
// shared-memory layouts: AOffset/BOffset(row, chunk) place 16-byte chunk `chunk` of a
// row, kBRowStride is the distance between rows 8 apart divided by 8 (the swizzles
// repeat every 8 rows), and a stage holds [A | B | metadata].
template <typename Cfg, typename T>
class StageLoader {
 public:
  static constexpr int kAChunks = Cfg::kARow / 16, kBChunks = Cfg::kBK * 2 / 16;
  static constexpr int kAPer = Cfg::kBM * kAChunks / Cfg::kThreads;     // 16-byte copies
  static constexpr int kBPer = Cfg::kBN * kBChunks / Cfg::kThreads;     // 16-byte copies
  static constexpr int kMPer = Cfg::kBM * Cfg::kSteps / Cfg::kThreads;  // 4-byte copies
  static_assert(kAPer * Cfg::kThreads == Cfg::kBM * kAChunks, "A copies divide evenly");
  static_assert(kBPer * Cfg::kThreads == Cfg::kBN * kBChunks, "B copies divide evenly");
  static_assert(kMPer * Cfg::kThreads == Cfg::kBM * Cfg::kSteps, "meta copies divide evenly");
  static constexpr int kARowStep = Cfg::kThreads / kAChunks;  // rows between a thread's copies
  static constexpr int kBRowStep = Cfg::kThreads / kBChunks;
  static constexpr int kMRowStep = Cfg::kThreads / Cfg::kSteps;
  static_assert(kARowStep % 8 == 0 && kBRowStep % 8 == 0, "row steps keep the swizzle");

  // values/meta: this expert's arrays; src_row: the tile's token ids (-1: absent).
  // Every copy's source row pointer and presence bit are resolved here, so a stage costs
  // an offset add and the copy itself per 16 bytes (the decode tile's K loop is an
  // instruction-latency chain).
  __device__ __forceinline__ StageLoader(const Args& a, const T* values, const uint32_t* meta,
                                         const int* src_row, const RowTile& tile, int rows_here)
      : a_(a) {
    const int half_k = a.k / 2, words = a.k / kMetaColsPerWord;
    const int tid = threadIdx.x;
    const int a_row = tid / kAChunks, a_chunk = tid % kAChunks;
    const int m_row = tid / Cfg::kSteps;
    m_word_ = tid % Cfg::kSteps;
    b_chunk_ = tid % kBChunks;
    a_col_ = a_chunk * 16;
    const int b_row = tid / kBChunks;
    a_dst_ = Cfg::AOffset(a_row, a_chunk);
    b_dst_ = Cfg::BOffset(b_row, b_chunk_);
    m_dst_ = m_row * Cfg::kMetaRow + m_word_ * 4;
    // Copies of the upper half start from a second base, the first moved by skip rows;
    // copy c's row is present iff row < limit of its half: the lower half holds rows
    // [0, lo), the upper [BM / 2, BM / 2 + hi). Absent rows keep a valid pointer and
    // copy zeros.
    const T* a_first =
        values + static_cast<int64_t>(FirstKept<kAPer, Cfg::kBM>(tile, a_row)) * half_k + a_chunk * 8;
    const uint32_t* m_first =
        meta + static_cast<int64_t>(FirstKept<kMPer, Cfg::kBM>(tile, m_row)) * words + m_word_;
    a_ok_ = ResolveCopies<kAPer, kARowStep>(tile, a_row, a_first, values, half_k, a_src_);
    m_ok_ = ResolveCopies<kMPer, kMRowStep>(tile, m_row, m_first, meta, words, m_src_);
#pragma unroll
    for (int c = 0; c < kBPer; ++c) {
      const int row = b_row + c * kBRowStep;
      b_tok_[c] = row < rows_here ? src_row[row] : -1;
    }
  }

  // Issues the copies of K stage `stage` into the stage buffer at shared address `dst`.
  __device__ __forceinline__ void Load(uint32_t dst, int stage) const {
    const uint32_t sa = dst, sb = sa + Cfg::kABytes, sm = sb + Cfg::kBBytes;
    // Sizes are read from the kernel parameters (constant bank), not kept in registers.
    const int k = a_.k;
    const int k0 = stage * Cfg::kBK;
    // Columns past K: only in the last stage of a K that is not a multiple of kBK (a
    // 16-byte A chunk covers 16 dense columns, a B chunk 8, a metadata word 32).
    const bool a_col_ok = k0 + a_col_ < k;
#pragma unroll
    for (int c = 0; c < kAPer; ++c) {
      const bool ok = ((a_ok_ >> c) & 1) && a_col_ok;
      CpAsync16(sa + a_dst_ + c * kARowStep * Cfg::kARow, a_src_[c] + k0 / 2, ok ? 16 : 0);
    }
    // Absent routed rows are not copied at all: their output columns are never stored,
    // so decode shapes move only the rows they have.
    const T* x = static_cast<const T*>(a_.x) + k0 + b_chunk_ * 8;
    const bool b_col_ok = k0 + b_chunk_ * 8 < k;
#pragma unroll
    for (int c = 0; c < kBPer; ++c) {
      const int t = b_tok_[c];
      CpAsync16If(sb + b_dst_ + c * kBRowStep * Cfg::kBRowStride,
                  x + static_cast<int64_t>(max(t, 0)) * k, t >= 0 && b_col_ok);
    }
    const bool m_col_ok = k0 + m_word_ * kMetaColsPerWord < k;
    const int word0 = k0 / kMetaColsPerWord;
#pragma unroll
    for (int c = 0; c < kMPer; ++c) {
      const bool ok = ((m_ok_ >> c) & 1) && m_col_ok;
      CpAsync4(sm + m_dst_ + c * kMRowStep * Cfg::kMetaRow, m_src_[c] + word0, ok ? 4 : 0);
    }
  }

 private:
  const Args& a_;  // the kernel's parameters
  // kPer copies of rows r0 + c * kRowStep from `first` (r0's row; rows of `row_len`
  // elements): each copy's source, or `base` when its row is absent; returns the presence
  // bits (bit c: copy c).
  template <int kPer, int kRowStep, typename E>
  static __device__ __forceinline__ uint32_t ResolveCopies(const RowTile& tile, int r0,
                                                           const E* first, const E* base,
                                                           int row_len, const E* (&src)[kPer]) {
    const int lim[2] = {FirstLimit<kPer, Cfg::kBM>(tile, r0), Cfg::kBM / 2 + tile.hi};
    uint32_t ok_bits = 0;
#pragma unroll
    for (int c = 0; c < kPer; ++c) {
      const bool up = UpperCopy<kPer>(c);
      const bool ok = r0 + c * kRowStep < lim[up];
      ok_bits |= static_cast<uint32_t>(ok) << c;
      src[c] = ok ? first + (static_cast<int64_t>(up ? tile.skip : 0) + c * kRowStep) * row_len
                  : base;
    }
    return ok_bits;
  }

  const T* a_src_[kAPer];  // per copy: its row's first column of this thread's chunk
  const uint32_t* m_src_[kMPer];
  uint32_t a_ok_, m_ok_;   // bit c: copy c's row is present
  int a_col_, b_chunk_, m_word_;
  uint32_t a_dst_, b_dst_, m_dst_;
  int b_tok_[kBPer];
};
}  // namespace samoyeds::cuda
