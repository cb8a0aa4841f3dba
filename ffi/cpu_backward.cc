// CPU handlers of the sparse ragged dot's backward products, with the weight's pattern
// fixed (samoyeds_jax/backward.py binds them):
//
//   dx       out[r] = ct[r] @ W[e(r)]^T           ct [R, M]  ->  float32 [R, K]
//   dvalues  out[e, kr, j] = sum over the rows r of expert e of
//              ct[r, m(kr, w)] * x[src(r), k(kr, j)]         ->  float32 [E, Mk, K/2]
//
// where kept value j of kept row kr sits in window w = j / (L/2) at column k(kr, j) (its
// 2:4 position, from the metadata) and belongs to output column m(kr, w) = (kr / N) * V +
// indices[kr, w] (its sub-row); src(r) = sel[r] with SEL, else r. Both read the stored
// compressed weight (indices and metadata; values for dx), never a dense copy: the work
// is proportional to the kept sub-rows times the routed rows. dvalues is the SDDMM of the
// pattern: only the stored positions are produced.
//
// Routing: group_sizes come clipped from Python (the forward's in-bounds reading), so
// negative sizes or sizes past R are refused as a caller error. A sel entry outside
// [0, T) is a zero row (the CUDA forward's meaning; the CPU forward refuses it).
//
// Every output element is summed in one fixed order by the one thread that owns it:
// dx over kept rows in order; dvalues over chunks of the expert's rows in order, rows in
// order inside a chunk. The bits depend neither on the thread count nor on the ISA
// clone's vector width (the clones differ in the last bits only through FMA).
#include <algorithm>
#include <cstdint>
#include <new>
#include <string>
#include <vector>

#include "backward_problem.h"
#include "cpu_kernel.h"
#include "cpu_threads.h"
#include "format.h"
#include "problem.h"

#if defined(__x86_64__) && defined(__linux__) && defined(__has_attribute) && \
    !defined(SAMOYEDS_NO_CPU_DISPATCH)
#if __has_attribute(target_clones)
#define SAMOYEDS_BACKWARD_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
#endif
#ifndef SAMOYEDS_BACKWARD_CLONES
#define SAMOYEDS_BACKWARD_CLONES
#endif

namespace samoyeds {
namespace {

using cpu::ToFloat;

constexpr int kDxTile = 16;         // routed rows per dx item (one expert)
constexpr int kDvalBlock = kRowTile;  // kept rows per dvalues item
constexpr int kDvalChunk = 32;      // routed rows per dvalues panel
constexpr int kMaxColsPerBlock = kDvalBlock * kMaxV;

// The stored pattern of the experts that own rows (problem.h's rule, as the forward
// checks it), and the experts' row offsets: the sizes must be the clipped ones (none
// negative, sum <= R).
ffi::Error CheckGroups(const char* op, const ffi::Buffer<ffi::U8>& indices,
                       const ffi::Buffer<ffi::U32>& metadata,
                       const ffi::Buffer<ffi::S32>& group_sizes, const Problem& p,
                       std::vector<int64_t>& offset) {
  if (ffi::Error err = CheckPattern(indices, metadata, group_sizes, p); err.failure())
    return err;
  const int32_t* gs = group_sizes.typed_data();
  offset.assign(p.experts + 1, 0);
  for (int64_t e = 0; e < p.experts; ++e) {
    if (gs[e] < 0)
      return BadBackward(op, "group_sizes[" + std::to_string(e) + "] is negative");
    offset[e + 1] = offset[e] + gs[e];
  }
  if (offset[p.experts] > p.rows)
    return BadBackward(op, "sum(group_sizes)=" + std::to_string(offset[p.experts]) +
                               " exceeds the R=" + std::to_string(p.rows) + " rows");
  return ffi::Error::Success();
}

// The dense columns of kept row `kr`'s stored values in window w: col[j] for the window's
// L/2 values j, relative to the window's first column (canonical metadata order).
inline void WindowColumns(const uint32_t* meta_e, int64_t words, int64_t kr, int64_t w,
                          int sub_row, int* col) {
  const int64_t word0 = w * sub_row / kMetaColsPerWord;
  for (int c = 0; c < sub_row / kMetaColsPerWord; ++c) {
    const uint32_t word = SwappedMetaWord(meta_e, words, kr, word0 + c);
    for (int slot = 0; slot < cpu::kKeptPerWord; ++slot) {
      const int j = c * cpu::kKeptPerWord + slot;
      const int group = j / kKeptPerGroup;
      col[j] = group * kGroupWidth +
               static_cast<int>((word >> (slot * cpu::kBitsPerKept)) & cpu::kPositionMask);
    }
  }
}

// --- dx --------------------------------------------------------------------------------

struct DxShape {
  int64_t k, m, kept_rows;
  int n, v, sub_row;
};

// Rows [r0, r0 + rows) of expert e: out rows = ct rows @ W_e^T. ctT is scratch
// [M][kDxTile]; seg scratch [L].
template <bool kBf16>
inline void DxItemImpl(const DxShape& s, const uint16_t* ct, const uint16_t* vals_e,
                       const uint8_t* idx_e, const uint32_t* meta_e, int64_t r0, int rows,
                       float* ctT, float* out) {
  for (int64_t mcol = 0; mcol < s.m; ++mcol)
    for (int i = 0; i < kDxTile; ++i)
      ctT[mcol * kDxTile + i] = i < rows ? ToFloat<kBf16>(ct[(r0 + i) * s.m + mcol]) : 0.0f;
  for (int i = 0; i < rows; ++i) std::fill(out + (r0 + i) * s.k, out + (r0 + i + 1) * s.k, 0.0f);
  const int64_t windows = s.k / s.sub_row, words = s.k / kMetaColsPerWord;
  const int L = s.sub_row, per_window = L / kKeptPerGroup;
  float seg[MaxSubRow()];
  int col[MaxSubRow() / kKeptPerGroup];
  for (int64_t kr = 0; kr < s.kept_rows; ++kr) {
    const int64_t block_col = kr / s.n * s.v;
    for (int64_t w = 0; w < windows; ++w) {
      WindowColumns(meta_e, words, kr, w, L, col);
      std::fill(seg, seg + L, 0.0f);
      const uint16_t* vw = vals_e + kr * (s.k / 2) + w * per_window;
      // A repeated position keeps the second value (samoyeds_jax.decode's reading).
      for (int j = 0; j < per_window; ++j) seg[col[j]] = ToFloat<kBf16>(vw[j]);
      const float* c = ctT + (block_col + idx_e[kr * windows + w]) * kDxTile;
      for (int i = 0; i < rows; ++i) {
        const float ci = c[i];
        float* o = out + (r0 + i) * s.k + w * L;
        for (int l = 0; l < L; ++l) o[l] += ci * seg[l];
      }
    }
  }
}

SAMOYEDS_BACKWARD_CLONES void DxItem(bool bf16, const DxShape& s, const uint16_t* ct,
                                     const uint16_t* vals_e, const uint8_t* idx_e,
                                     const uint32_t* meta_e, int64_t r0, int rows, float* ctT,
                                     float* out) {
  if (bf16)
    DxItemImpl<true>(s, ct, vals_e, idx_e, meta_e, r0, rows, ctT, out);
  else
    DxItemImpl<false>(s, ct, vals_e, idx_e, meta_e, r0, rows, ctT, out);
}

ffi::Error DxCpu(ffi::ThreadPool pool, ffi::AnyBuffer ct, ffi::AnyBuffer values,
                 ffi::Buffer<ffi::U8> indices, ffi::Buffer<ffi::U32> metadata,
                 ffi::Buffer<ffi::S32> group_sizes, int64_t n, int64_t v, int64_t sub_row,
                 ffi::Result<ffi::Buffer<ffi::F32>> out) {
  constexpr const char* op = "dx";
  Problem p;
  if (ffi::Error err = CheckDxShapes(ct, values, indices, metadata, group_sizes, n, v,
                                     sub_row, *out, &p);
      err.failure())
    return err;
  try {
    std::vector<int64_t> offset;
    if (ffi::Error err = CheckGroups(op, indices, metadata, group_sizes, p, offset);
        err.failure())
      return err;
    float* o = out->typed_data();
    std::fill(o + offset[p.experts] * p.k, o + p.rows * p.k, 0.0f);
    struct Tile {
      int64_t r0;
      int rows, expert;
    };
    std::vector<Tile> tiles;
    for (int64_t e = 0; e < p.experts; ++e)
      for (int64_t r = offset[e]; r < offset[e + 1]; r += kDxTile)
        tiles.push_back(
            Tile{r, static_cast<int>(std::min<int64_t>(kDxTile, offset[e + 1] - r)),
                 static_cast<int>(e)});
    const int workers = CpuWorkers(pool);
    std::vector<float> scratch(static_cast<size_t>(workers) * p.m * kDxTile);
    const DxShape s{p.k, p.m, p.kept_rows, static_cast<int>(n), static_cast<int>(v),
                    static_cast<int>(sub_row)};
    const bool bf16 = ct.element_type() == ffi::DataType::BF16;
    const uint16_t* c = static_cast<const uint16_t*>(ct.untyped_data());
    const uint16_t* vals = static_cast<const uint16_t*>(values.untyped_data());
    const int64_t windows = p.k / sub_row, words = p.k / kMetaColsPerWord;
    ParallelFor(pool, workers, static_cast<int64_t>(tiles.size()), [&](int64_t t, int wk) {
      const Tile& tl = tiles[t];
      const int64_t e = tl.expert;
      DxItem(bf16, s, c, vals + e * p.kept_rows * (p.k / 2),
             indices.typed_data() + e * p.kept_rows * windows,
             metadata.typed_data() + e * p.kept_rows * words, tl.r0, tl.rows,
             scratch.data() + static_cast<size_t>(wk) * p.m * kDxTile, o);
    });
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      "samoyeds_ragged_dot_dx: out of host memory for the CPU work buffers");
  }
  return ffi::Error::Success();
}

// --- dvalues ---------------------------------------------------------------------------

struct DvalShape {
  int64_t tokens, k, m, kept_rows;
  int n, v, sub_row;
};

// Kept rows [kb, kb + kDvalBlock) of expert e over its rows [r0, r1). xp is scratch
// [kDvalChunk][K], cp [kDvalChunk][kMaxColsPerBlock]; out points at the expert's
// [Mk, K/2] (already zero).
template <bool kBf16>
inline void DvalItemImpl(const DvalShape& s, const uint16_t* x, const uint16_t* ct,
                         const int32_t* sel, const uint8_t* idx_e, const uint32_t* meta_e,
                         int64_t r0, int64_t r1, int64_t kb, float* xp, float* cp,
                         float* out_e) {
  const int64_t windows = s.k / s.sub_row, words = s.k / kMetaColsPerWord;
  const int L = s.sub_row, per_window = L / kKeptPerGroup;
  const int64_t m0 = kb / s.n * s.v, mcols = int64_t{kDvalBlock} / s.n * s.v;
  float acc[MaxSubRow()];
  int col[MaxSubRow() / kKeptPerGroup];
  for (int64_t c0 = r0; c0 < r1; c0 += kDvalChunk) {
    // The chunk's rows whose token exists (a sel entry outside [0, T) is a zero row).
    int rows = 0;
    for (int64_t r = c0; r < std::min(r1, c0 + kDvalChunk); ++r) {
      const int64_t src = sel ? sel[r] : r;
      if (src < 0 || src >= s.tokens) continue;
      const uint16_t* xr = x + src * s.k;
      for (int64_t kk = 0; kk < s.k; ++kk) xp[rows * s.k + kk] = ToFloat<kBf16>(xr[kk]);
      const uint16_t* cr = ct + r * s.m + m0;
      for (int64_t mm = 0; mm < mcols; ++mm)
        cp[rows * kMaxColsPerBlock + mm] = ToFloat<kBf16>(cr[mm]);
      ++rows;
    }
    if (rows == 0) continue;
    for (int64_t kr = kb; kr < kb + kDvalBlock; ++kr) {
      const int64_t block_col = kr / s.n * s.v - m0;
      float* ok = out_e + kr * (s.k / 2);
      for (int64_t w = 0; w < windows; ++w) {
        const int64_t mm = block_col + idx_e[kr * windows + w];
        std::fill(acc, acc + L, 0.0f);
        for (int i = 0; i < rows; ++i) {
          const float ci = cp[i * kMaxColsPerBlock + mm];
          const float* xr = xp + i * s.k + w * L;
          for (int l = 0; l < L; ++l) acc[l] += ci * xr[l];
        }
        WindowColumns(meta_e, words, kr, w, L, col);
        float* ow = ok + w * per_window;
        for (int j = 0; j < per_window; ++j) ow[j] += acc[col[j]];
      }
    }
  }
}

SAMOYEDS_BACKWARD_CLONES void DvalItem(bool bf16, const DvalShape& s, const uint16_t* x,
                                       const uint16_t* ct, const int32_t* sel,
                                       const uint8_t* idx_e, const uint32_t* meta_e,
                                       int64_t r0, int64_t r1, int64_t kb, float* xp,
                                       float* cp, float* out_e) {
  if (bf16)
    DvalItemImpl<true>(s, x, ct, sel, idx_e, meta_e, r0, r1, kb, xp, cp, out_e);
  else
    DvalItemImpl<false>(s, x, ct, sel, idx_e, meta_e, r0, r1, kb, xp, cp, out_e);
}

ffi::Error DvaluesCpu(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer ct,
                      ffi::Buffer<ffi::U8> indices, ffi::Buffer<ffi::U32> metadata,
                      ffi::Buffer<ffi::S32> sel, ffi::Buffer<ffi::S32> group_sizes,
                      int64_t n, int64_t v, int64_t sub_row, int64_t has_sel,
                      ffi::Result<ffi::Buffer<ffi::F32>> out) {
  constexpr const char* op = "dvalues";
  Problem p;
  if (ffi::Error err = CheckDvaluesShapes(x, ct, indices, metadata, sel, group_sizes, n, v,
                                          sub_row, has_sel, *out, &p);
      err.failure())
    return err;
  try {
    std::vector<int64_t> offset;
    if (ffi::Error err = CheckGroups(op, indices, metadata, group_sizes, p, offset);
        err.failure())
      return err;
    float* o = out->typed_data();
    std::fill(o, o + p.experts * p.kept_rows * (p.k / 2), 0.0f);
    struct Item {
      int expert;
      int64_t kb;
    };
    std::vector<Item> items;
    for (int64_t e = 0; e < p.experts; ++e)
      if (offset[e + 1] > offset[e])
        for (int64_t kb = 0; kb < p.kept_rows; kb += kDvalBlock)
          items.push_back(Item{static_cast<int>(e), kb});
    const int workers = CpuWorkers(pool);
    const size_t per_worker =
        static_cast<size_t>(kDvalChunk) * (p.k + kMaxColsPerBlock);
    std::vector<float> scratch(static_cast<size_t>(workers) * per_worker);
    const DvalShape s{p.tokens, p.k, p.m, p.kept_rows, static_cast<int>(n),
                      static_cast<int>(v), static_cast<int>(sub_row)};
    const bool bf16 = x.element_type() == ffi::DataType::BF16;
    const uint16_t* xs = static_cast<const uint16_t*>(x.untyped_data());
    const uint16_t* c = static_cast<const uint16_t*>(ct.untyped_data());
    const int32_t* sl = has_sel ? sel.typed_data() : nullptr;
    const int64_t windows = p.k / sub_row, words = p.k / kMetaColsPerWord;
    ParallelFor(pool, workers, static_cast<int64_t>(items.size()), [&](int64_t i, int wk) {
      const Item& it = items[i];
      const int64_t e = it.expert;
      float* xp = scratch.data() + static_cast<size_t>(wk) * per_worker;
      DvalItem(bf16, s, xs, c, sl, indices.typed_data() + e * p.kept_rows * windows,
               metadata.typed_data() + e * p.kept_rows * words, offset[e], offset[e + 1],
               it.kb, xp, xp + static_cast<size_t>(kDvalChunk) * p.k,
               o + e * p.kept_rows * (p.k / 2));
    });
  } catch (const std::bad_alloc&) {
    return ffi::Error(
        ffi::ErrorCode::kResourceExhausted,
        "samoyeds_ragged_dot_dvalues: out of host memory for the CPU work buffers");
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace samoyeds

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    SamoyedsRaggedDotDxCpu, samoyeds::DxCpu,
    SAMOYEDS_BIND_DX(xla::ffi::Ffi::Bind().Ctx<xla::ffi::ThreadPool>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    SamoyedsRaggedDotDvaluesCpu, samoyeds::DvaluesCpu,
    SAMOYEDS_BIND_DVALUES(xla::ffi::Ffi::Bind().Ctx<xla::ffi::ThreadPool>()));
