// The CPU handler's compute: routed x rows as float32 panels, the stored weight decoded a
// window at a time, and a register-blocked loop over the kept values only.
//
// Panel: the x rows of one tile (up to `width` routed rows of one expert, gathered
// through SEL) as float32 [K, width], so that one kept value w at column c updates all
// the tile's rows with vector FMAs: s[0:width] += w * panel[c, 0:width].
//
// Item: one expert, a run of its tiles and a block of kept rows (with a fused GLU, the
// same block of the gate half and of the up half). Per K window in order, the block's
// kept values are decoded once (float32 value, panel offset of its column) and reused
// by every tile of the item; each kept row's window sum then goes to the float32
// accumulator of the output row its sub-row index names. So every output element is
// summed in one fixed order (windows in order, kept values in order inside a window)
// by the one thread that owns its item: the bits depend neither on the thread count nor
// on the tile width or the blocking.
#pragma once

#include <cstdint>
#include <cstring>

#include "format.h"
#include "glu.h"

// Everything the dispatched entry points (cpu_ops.cc) call is inlined into them, so that
// it is compiled once per instruction set.
#define SAMOYEDS_CPU_INLINE inline __attribute__((always_inline))

namespace samoyeds {
namespace cpu {

inline constexpr int kLanes = 8;         // floats per vector (AVX2; narrower ISAs split it)
inline constexpr int kAccumulators = 8;  // vector accumulators of the inner loop
// Tile widths (routed rows per tile): width / kLanes vectors per kept row, so each step
// of the inner loop covers kAccumulators * kLanes / width kept rows. Wider tiles load
// fewer decoded values per FMA; narrower ones waste fewer lanes on small experts.
inline constexpr int kTileWidths[] = {8, 16, 32};
inline constexpr int kMaxTileWidth = 32;
inline constexpr int kItemRows = 128;    // routed rows per item, at most
inline constexpr int kRowBlock = 64;     // kept rows per item (per segment), at most
inline constexpr int kMaxSegments = 2;   // gate and up with a GLU
inline constexpr int kMaxPerWindow = MaxSubRow() / kKeptPerGroup;
// Blocks hold whole row tiles, and a row tile splits into whole steps at every width.
static_assert(kRowBlock % kRowTile == 0 &&
              kRowTile % (kAccumulators * kLanes / kTileWidths[0]) == 0);
// A kept value's column is stored as its byte offset in the window's panel rows, uint16.
static_assert(MaxSubRow() * kMaxTileWidth * sizeof(float) <= 65535);

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
typedef uint32_t U32Vec __attribute__((vector_size(kLanes * sizeof(uint32_t))));
typedef uint16_t U16Vec __attribute__((vector_size(kLanes * sizeof(uint16_t))));

// --- 16-bit floats <-> float32, bit-exact, branch-free (vectorisable) ------------------

SAMOYEDS_CPU_INLINE float BitsToFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

SAMOYEDS_CPU_INLINE uint32_t FloatToBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

SAMOYEDS_CPU_INLINE float Bf16ToFloat(uint16_t h) { return BitsToFloat(uint32_t{h} << 16); }

SAMOYEDS_CPU_INLINE uint16_t FloatToBf16(float f) {
  const uint32_t u = FloatToBits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // to nearest even
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return static_cast<uint16_t>(nan ? (u >> 16) | 0x40u : rounded);  // NaN stays quiet
}

SAMOYEDS_CPU_INLINE float F16ToFloat(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16, em = h & 0x7FFFu;
  const uint32_t normal = (em << 13) + (112u << 23);    // rebias the exponent by +112
  const uint32_t special = (em << 13) | 0x7F800000u;    // inf / NaN, payload kept
  // Subnormal: mantissa * 2^-24 is exact and a normal float32.
  const uint32_t sub = FloatToBits(static_cast<float>(static_cast<int32_t>(em)) * 0x1p-24f);
  return BitsToFloat(sign | (em >= 0x7C00u ? special : em < 0x0400u ? sub : normal));
}

SAMOYEDS_CPU_INLINE uint16_t FloatToF16(float f) {
  const uint32_t x = FloatToBits(f);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7FFFFFFFu;
  const uint32_t special = ax > 0x7F800000u ? 0x7E00u : 0x7C00u;  // NaN quiet, or inf
  // Rebias the exponent by -112, round to nearest even at bit 13.
  const uint32_t normal = (ax + 0xC8000FFFu + ((ax >> 13) & 1u)) >> 13;
  // Half subnormal: |f| * 2^24 < 1024, rounded to nearest even by the float adder.
  const uint32_t sub = FloatToBits(BitsToFloat(ax) * 0x1p24f + 0x1p23f) - 0x4B000000u;
  return static_cast<uint16_t>(
      sign | (ax >= 0x7F800000u ? special
              : ax >= 0x477FF000u ? 0x7C00u   // rounds to inf
              : ax < 0x38800000u  ? sub
                                  : normal));
}

template <bool kBf16>
SAMOYEDS_CPU_INLINE float ToFloat(uint16_t h) {
  return kBf16 ? Bf16ToFloat(h) : F16ToFloat(h);
}

template <bool kBf16>
SAMOYEDS_CPU_INLINE uint16_t FromFloat(float f) {
  return kBf16 ? FloatToBf16(f) : FloatToF16(f);
}

// glu.h's SiLU, g / (1 + exp(-g)), with an exp that vectorises: exp(x) = 2^n exp(r),
// n = x / ln 2 rounded, |r| <= ln 2 / 2, exp(r) by its Taylor series to degree 7
// (truncation below 1e-8 relative; within 2 ulp of exp on [-87, 88.3]). x is clamped
// to that range, where 2^n is a normal float; past ln(FLT_MAX) the result is inf, as
// expf's, and NaN propagates.
SAMOYEDS_CPU_INLINE float Exp(float x) {
  const bool overflow = x > 88.7228f;
  x = x < -87.0f ? -87.0f : x > 88.3f ? 88.3f : x;
  const float shifter = 0x1.8p23f;  // adding it rounds to an integer (to nearest even)
  const float t = x * 1.44269504f + shifter;
  const float n = t - shifter;
  const int32_t ni = static_cast<int32_t>(FloatToBits(t) - FloatToBits(shifter));
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln 2 in two parts
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float e = p * BitsToFloat(static_cast<uint32_t>(ni + 127) << 23);
  return overflow ? BitsToFloat(0x7F800000u) : e;
}

SAMOYEDS_CPU_INLINE float Silu(float g) { return g / (1.0f + Exp(-g)); }

// --- the problem as the kernel sees it --------------------------------------------------

struct Weights {  // one expert's stored arrays
  const uint16_t* values;    // [Mk, K/2]
  const uint8_t* indices;    // [Mk, K/L]
  const uint32_t* metadata;  // [Mk, K/32], hardware order
};

struct Shape {
  int64_t k, kept_rows, out_cols;  // K, Mk, M or M/2 (GLU)
  int n, v, sub_row, glu;
};

struct Tile {
  int64_t row0;  // first output row (index into x, or into sel)
  int rows;      // routed rows in the tile, 1..width
  int expert;
};

struct Item {
  int64_t tile0;  // first tile, in the chunk's panels
  int tiles;      // consecutive tiles of one expert
  int kept0;      // first kept row of the block (of the gate half with a GLU)
  int kept;       // kept rows in the block: a multiple of kRowTile, <= kRowBlock
};

// Per-thread scratch of one item (64-byte aligned by the caller).
struct Scratch {
  float* vals;      // [kMaxSegments * kRowBlock][kMaxPerWindow] decoded kept values
  uint16_t* offs;   // same layout: byte offset of each value's column in its window's panel
  int32_t* obase;   // [kMaxSegments * kRowBlock]: accumulator row of each kept row's
                    //   block (its sub-row 0)
  int32_t* orow;    // same layout: accumulator row of each kept row in the window
  float* acc;       // [tiles][accumulator rows][width]
  uint16_t* stage;  // [output columns][width]: one tile's rounded outputs
};

inline constexpr int64_t kScratchValues = int64_t{kMaxSegments} * kRowBlock * kMaxPerWindow;

// Accumulator rows of an item with `kept` kept rows per segment (its output rows).
inline int64_t AccRows(const Shape& s, int kept) {
  return int64_t{kept} / s.n * s.v * (s.glu != kGluNone ? 2 : 1);
}

// --- panel -----------------------------------------------------------------------------

// panel[c * kWidth + t] = x[token of row t][c], zero for t >= tile.rows.
template <bool kBf16, int kWidth>
SAMOYEDS_CPU_INLINE void BuildPanelImpl(const uint16_t* x, const int32_t* sel, int64_t k,
                                        const Tile& tile, float* panel) {
  for (int t = 0; t < kWidth; ++t) {
    if (t >= tile.rows) {
      for (int64_t c = 0; c < k; ++c) panel[c * kWidth + t] = 0.0f;
      continue;
    }
    const int64_t r = tile.row0 + t;
    const uint16_t* src = x + (sel ? sel[r] : r) * k;
    for (int64_t c = 0; c < k; ++c) panel[c * kWidth + t] = ToFloat<kBf16>(src[c]);
  }
}

// --- decode -----------------------------------------------------------------------------

// A metadata word read one kept value at a time (a form that vectorises): kept value
// `slot` of the word (group slot / 2, its first or second value) has its position at bit
// slot * kBitsPerKept. Checked here against MetaNibble, whose low half is the first
// value's position and high half the second's.
inline constexpr int kKeptPerWord = kGroupsPerWord * kKeptPerGroup;
inline constexpr int kBitsPerKept = kMetaBitsPerGroup / kKeptPerGroup;
inline constexpr uint32_t kPositionMask = (1u << kBitsPerKept) - 1;
constexpr bool KeptBitsMatchMetaNibble(uint32_t word) {
  for (int slot = 0; slot < kKeptPerWord; ++slot) {
    const uint32_t nib = MetaNibble(word, slot / kKeptPerGroup);
    const uint32_t pos = slot % kKeptPerGroup ? nib >> kBitsPerKept : nib & kPositionMask;
    if (((word >> (slot * kBitsPerKept)) & kPositionMask) != pos) return false;
  }
  return true;
}
static_assert(KeptBitsMatchMetaNibble(0xE4B1D872u) && KeptBitsMatchMetaNibble(0x1F2E3D4Cu));
static_assert(kKeptPerWord % kLanes == 0);

// The kept values of kept rows [kept0, kept0 + kept) in window w: vals and offs get, per
// kept row, its float32 values and their columns' byte offsets in the window's panel
// ([kept][per_window]);
// orow gets each row's accumulator row, obase (the accumulator row of its block's first
// output row) plus its sub-row index.
template <bool kBf16, int kWidth>
SAMOYEDS_CPU_INLINE void DecodeWindow(const Weights& wt, const Shape& s, int kept0, int kept,
                                      int64_t w, const int32_t* obase, float* vals,
                                      uint16_t* offs, int32_t* orow) {
  const int64_t half_k = s.k / 2, windows = s.k / s.sub_row, words = s.k / kMetaColsPerWord;
  const int per_window = s.sub_row / kKeptPerGroup;
  const int words_per_window = s.sub_row / kMetaColsPerWord;
  constexpr uint32_t kPanelRowBytes = kWidth * sizeof(float);
  for (int i = 0; i < kept; ++i) {
    const int64_t kr = kept0 + i;
    orow[i] = obase[i] + wt.indices[kr * windows + w];
    const uint16_t* v = wt.values + kr * half_k + w * per_window;
    // The rows of a block are far apart in memory and each gives only a window's bytes
    // at a time, which the hardware prefetchers do not follow: fetch the row's window
    // after next into L2 now.
    if (w + 2 < windows) {
      const char* ahead = reinterpret_cast<const char*>(v + 2 * per_window);
      for (int b = 0; b < per_window * 2; b += 64) __builtin_prefetch(ahead + b, 0, 2);
      __builtin_prefetch(wt.metadata + kr * words + (w + 2) * words_per_window, 0, 2);
    }
    float* val = vals + i * per_window;
    for (int slot = 0; slot < per_window; ++slot) val[slot] = ToFloat<kBf16>(v[slot]);
    for (int wc = 0; wc < words_per_window; ++wc) {
      const uint32_t word = SwappedMetaWord(wt.metadata, words, kr, w * words_per_window + wc);
      // One lane per kept value: column = its group's first column + its position.
      for (int part = 0; part < kKeptPerWord / kLanes; ++part) {
        U32Vec slot;
        for (int l = 0; l < kLanes; ++l) slot[l] = static_cast<uint32_t>(part * kLanes + l);
        const U32Vec pos = ((U32Vec{} + word) >> (slot * kBitsPerKept)) & kPositionMask;
        const U32Vec col = wc * kMetaColsPerWord + slot / kKeptPerGroup * kGroupWidth + pos;
        const U16Vec off = __builtin_convertvector(col * kPanelRowBytes, U16Vec);
        std::memcpy(offs + i * per_window + wc * kKeptPerWord + part * kLanes, &off,
                    sizeof(off));
      }
    }
  }
}

// --- the inner loop ----------------------------------------------------------------------

SAMOYEDS_CPU_INLINE void LoadVec(Vec* v, const float* p) { std::memcpy(v, p, sizeof(Vec)); }

SAMOYEDS_CPU_INLINE void AddVec(float* p, const Vec* a) {
  Vec v;
  std::memcpy(&v, p, sizeof(Vec));
  v += *a;
  std::memcpy(p, &v, sizeof(Vec));
}

// kRows kept rows (vals, offs: [kRows][per_window]) x kWidth routed rows of one window:
// s[j] = the sum of row j's kept values times their panel rows, in order; then
// acc[orow[j]] += s[j]. Unrolled over j and u, so that the accumulators stay in registers.
template <int kWidth>
SAMOYEDS_CPU_INLINE void Step(const float* vals, const uint16_t* offs, int per_window,
                              const float* panel, const int32_t* orow, float* acc) {
  constexpr int kVecs = kWidth / kLanes, kRows = kAccumulators / kVecs;
  const char* panel_bytes = reinterpret_cast<const char*>(panel);
  Vec s[kRows][kVecs] = {};
  for (int i = 0; i < per_window; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < kRows; ++j) {
      const float w = vals[j * per_window + i];
      const float* p = reinterpret_cast<const float*>(panel_bytes + offs[j * per_window + i]);
#pragma GCC unroll 8
      for (int u = 0; u < kVecs; ++u) {
        Vec x;
        LoadVec(&x, p + u * kLanes);
        s[j][u] += w * x;
      }
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < kRows; ++j)
#pragma GCC unroll 8
    for (int u = 0; u < kVecs; ++u)
      AddVec(acc + int64_t{orow[j]} * kWidth + u * kLanes, &s[j][u]);
}

// --- one item ------------------------------------------------------------------------------

// out: [R, out_cols] in x's dtype; panels: the chunk's panels ([tiles][K][kWidth]).
template <bool kBf16, int kWidth>
SAMOYEDS_CPU_INLINE void RunItemImpl(const Weights& wt, const Shape& s, const Tile* tiles,
                                     const float* panels, const Item& it, const Scratch& sc,
                                     uint16_t* out) {
  constexpr int kRows = kAccumulators * kLanes / kWidth;  // kept rows per step
  const int segments = s.glu != kGluNone ? 2 : 1;
  const int64_t seg_rows = int64_t{it.kept} / s.n * s.v;  // accumulator rows per segment
  const int64_t acc_rows = seg_rows * segments;
  const int per_window = s.sub_row / kKeptPerGroup;
  const int64_t windows = s.k / s.sub_row, panel_floats = s.k * kWidth;
  const int64_t step_values = int64_t{per_window} * kRows;
  std::memset(sc.acc, 0, sizeof(float) * it.tiles * acc_rows * kWidth);
  // With a GLU the up half's kept rows start at Mk / 2; its accumulators follow the gate's.
  for (int g = 0; g < segments; ++g)
    for (int i = 0; i < it.kept; ++i)
      sc.obase[g * it.kept + i] = static_cast<int32_t>(g * seg_rows + i / s.n * s.v);
  for (int64_t w = 0; w < windows; ++w) {
    for (int g = 0; g < segments; ++g)
      DecodeWindow<kBf16, kWidth>(wt, s, it.kept0 + static_cast<int>(g * (s.kept_rows / 2)),
                                  it.kept, w, sc.obase + g * it.kept,
                                  sc.vals + g * it.kept * per_window,
                                  sc.offs + g * it.kept * per_window, sc.orow + g * it.kept);
    for (int t = 0; t < it.tiles; ++t) {
      const float* panel = panels + (it.tile0 + t) * panel_floats + w * s.sub_row * kWidth;
      float* acc = sc.acc + t * acc_rows * kWidth;
      for (int q = 0; q < it.kept / kRows * segments; ++q)
        Step<kWidth>(sc.vals + q * step_values, sc.offs + q * step_values, per_window, panel,
                     sc.orow + q * kRows, acc);
    }
  }
  // Epilogue per tile: round [columns][width] in memory order (vectorisable), then
  // transpose into the output rows.
  const int64_t col0 = int64_t{it.kept0} / s.n * s.v, n_stage = seg_rows * kWidth;
  for (int t = 0; t < it.tiles; ++t) {
    const Tile& tile = tiles[it.tile0 + t];
    const float* acc = sc.acc + t * acc_rows * kWidth;
    if (s.glu == kGluNone) {
      for (int64_t i = 0; i < n_stage; ++i) sc.stage[i] = FromFloat<kBf16>(acc[i]);
    } else if (s.glu == kGluSilu) {
      for (int64_t i = 0; i < n_stage; ++i)
        sc.stage[i] = FromFloat<kBf16>(Silu(acc[i]) * acc[n_stage + i]);
    } else {
      for (int64_t i = 0; i < n_stage; ++i)
        sc.stage[i] = FromFloat<kBf16>(GluActivation(acc[i], s.glu) * acc[n_stage + i]);
    }
    for (int r = 0; r < tile.rows; ++r) {
      uint16_t* o = out + (tile.row0 + r) * s.out_cols + col0;
      for (int64_t c = 0; c < seg_rows; ++c) o[c] = sc.stage[c * kWidth + r];
    }
  }
}

}  // namespace cpu
}  // namespace samoyeds
