// The Samoyeds dual-side sparse weight format: every constant and every piece of index
// math that the encoder (through the nanobind module), the CPU handler and the CUDA
// kernels share. Python reads these values from the module; nothing is restated there.
//
// An expert weight is used as y = x @ W with W [K, M] (in, out). The sparse tensor cores
// take the sparse operand as A = W^T [M, K], sparse along K:
//   * N:V  : A's rows form blocks of V consecutive rows; K forms windows of L = sub_row
//            columns. In every (block, window) exactly N of the V sub-rows (row segments
//            of length L) are stored, the other V - N are zero.
//   * 2:4  : inside a kept sub-row every aligned group of 4 columns holds at most 2
//            nonzeros; both slots are stored (a zero fills a slot that has no nonzero).
//
// Stored arrays (leading expert axis E optional), with Mk = M * N / V kept rows:
//   values   [E, Mk, K/2]   the 2 kept values of each group, in increasing column order
//   indices  [E, Mk, K/L]   uint8 sub-row index in [0, V): kept row r = b*N + j holds, in
//                           window w, row b*V + indices[r, w] of A; per block and window
//                           the N indices are distinct and increasing
//   metadata [E, Mk, K/32]  uint32, 2 bits per kept value, in hardware order (below)
#pragma once

#include <cstddef>
#include <cstdint>
#include <iterator>
#include <type_traits>
#include <utility>

namespace samoyeds {

inline constexpr int kGroupWidth = 4;    // 2:4 groups along K
inline constexpr int kKeptPerGroup = 2;  // values stored per group
inline constexpr int kMetaBitsPerGroup = 4;
inline constexpr int kMetaColsPerWord = 32;  // dense columns covered by one metadata word
inline constexpr int kGroupsPerWord = kMetaColsPerWord / kGroupWidth;
// Kept rows come in tiles of 16 rows (the M of one sparse MMA); the hardware metadata
// order permutes inside these tiles, so Mk must be a multiple of it.
inline constexpr int kRowTile = 16;
inline constexpr int kMaxV = 4;

struct NV {
  int n;
  int v;
};
inline constexpr NV kSupportedNV[] = {{1, 1}, {1, 2}, {1, 4}, {2, 4}};
inline constexpr int kSupportedSubRows[] = {32, 64, 128};
constexpr int MaxSubRow() {
  int m = 0;
  for (int s : kSupportedSubRows) m = s > m ? s : m;
  return m;
}

// The one dispatch over the list: f(std::integral_constant<int, N>{},
// std::integral_constant<int, V>{}) for the supported config n:v, else `missing`. Every
// kernel family instantiates exactly the configs of kSupportedNV through it.
template <size_t I = 0, typename F, typename R>
R WithSupportedNV(int64_t n, int64_t v, F&& f, R missing) {
  if constexpr (I < std::size(kSupportedNV)) {
    constexpr NV nv = kSupportedNV[I];
    if (n == nv.n && v == nv.v)
      return f(std::integral_constant<int, nv.n>{}, std::integral_constant<int, nv.v>{});
    return WithSupportedNV<I + 1>(n, v, std::forward<F>(f), missing);
  } else {
    return missing;
  }
}

constexpr bool IsSupported(int64_t n, int64_t v, int64_t sub_row) {
  bool nv = false, l = false;
  for (const NV& p : kSupportedNV) nv = nv || (p.n == n && p.v == v);
  for (int s : kSupportedSubRows) l = l || s == sub_row;
  return nv && l;
}

// Shape requirements: K a multiple of L (itself a multiple of 32), M a multiple of
// 16 * V / N (so that M % V == 0 and Mk % 16 == 0).
constexpr int64_t KMultiple(int64_t sub_row) { return sub_row; }
constexpr int64_t MMultiple(int64_t n, int64_t v) { return kRowTile * v / n; }
constexpr int64_t KeptRows(int64_t m, int64_t n, int64_t v) { return m / v * n; }

// Canonical metadata word (row, c) covers dense columns [32c, 32c + 32) of kept row
// `row`; group g (columns 32c + 4g .. +3) sits in bits [4g, 4g + 4): low 2 bits the
// position of the first kept value, high 2 bits the second (first < second).
constexpr uint32_t MetaNibble(uint32_t canonical_word, int group) {
  return (canonical_word >> (kMetaBitsPerGroup * group)) & 0xFu;
}

// Hardware order: mma.sp m16n8k32 (16-bit types, sparsity selector 0) wants lane
// (g = lane / 4, t = lane % 4 in {0, 1}) to hold the metadata of rows g and g + 8 for
// dense columns [16t, 16t + 16) of one 32-column step: the low half from row g, the
// high half from row g + 8. Inside every 16-row tile, the canonical word of row r < 8
// therefore trades its high 16 bits with the low 16 bits of row r + 8, after which
// lane (g, t) reads word (tile_row g + 8t) with one aligned 32-bit load. The swap is
// an involution: the same function maps hardware order back to canonical.
//   word_r, word_r8: the words of rows r and r + 8 (r < 8) of one tile, same column.
constexpr uint32_t SwapMetaLow(uint32_t word_r, uint32_t word_r8) {
  return (word_r & 0xFFFFu) | (word_r8 << 16);
}
constexpr uint32_t SwapMetaHigh(uint32_t word_r, uint32_t word_r8) {
  return (word_r >> 16) | (word_r8 & 0xFFFF0000u);
}

// The word at (row, c) of the other order, read from `meta` ([rows, words_per_row]).
inline uint32_t SwappedMetaWord(const uint32_t* meta, int64_t words_per_row, int64_t row,
                                int64_t c) {
  const int64_t r = row % kRowTile;
  const int64_t lo_row = row - r + (r % 8);  // row r of the tile's pair (r, r + 8)
  const uint32_t a = meta[lo_row * words_per_row + c];
  const uint32_t b = meta[(lo_row + 8) * words_per_row + c];
  return r < 8 ? SwapMetaLow(a, b) : SwapMetaHigh(a, b);
}

}  // namespace samoyeds
