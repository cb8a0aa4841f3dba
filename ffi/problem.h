// The FFI signature of the sparse ragged dot and its argument checks, shared by the CPU
// and CUDA handlers so that both refuse exactly the same buffers with the same words.
#pragma once

#include <cstdint>
#include <string>

#include "format.h"
#include "glu.h"
#include "kernel_choice.h"
#include "xla/ffi/api/ffi.h"

namespace samoyeds {

namespace ffi = xla::ffi;

// out[r] = x[sel[r] or r] @ W[e(r)], e(r) the expert whose row range holds r
// (ranges from the exclusive cumsum of group_sizes); rows past sum(group_sizes) are 0.
//   x [T, K] f16|bf16, values [E, Mk, K/2], indices u8 [E, Mk, K/L],
//   metadata u32 [E, Mk, K/32], sel s32 [R] (empty when has_sel == 0),
//   group_sizes s32 [E]  ->  out [R, M] in x's dtype, or [R, M/2] when glu != 0 (glu.h:
//   act(gate) * up over the halves of M).
// A macro rather than a template: nvcc's front end rejects the `.template Arg<...>()`
// chain that a generic function over the binding type would need.
#define SAMOYEDS_BIND_RAGGED_DOT(binding)                                   \
  (binding)                                                                 \
      .Arg<::xla::ffi::AnyBuffer>()            /* x */                      \
      .Arg<::xla::ffi::AnyBuffer>()            /* values */                 \
      .Arg<::xla::ffi::Buffer<::xla::ffi::U8>>()  /* indices */             \
      .Arg<::xla::ffi::Buffer<::xla::ffi::U32>>() /* metadata */            \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>() /* sel */                 \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>() /* group_sizes */         \
      .Attr<int64_t>("n")                                                   \
      .Attr<int64_t>("v")                                                   \
      .Attr<int64_t>("sub_row")                                             \
      .Attr<int64_t>("has_sel")                                             \
      .Attr<int64_t>("glu")                                                 \
      .Attr<int64_t>("kernel")                                              \
      .Attr<int64_t>("splits")                                              \
      .Ret<::xla::ffi::AnyBuffer>() /* out */

struct Problem {
  int64_t tokens;     // T, rows of x
  int64_t k;          // K
  int64_t m;          // M
  int64_t experts;    // E
  int64_t kept_rows;  // Mk = M * N / V
  int64_t rows;       // R, rows of out
  int64_t out_cols;   // M, or M/2 with a fused GLU
  int glu;            // kGluNone, kGluSilu or kGluGelu
  KernelChoice kernel;  // CUDA only: the kernel a call forces (kAuto: chosen by shape)
  int splits;           // CUDA only: forced K splits (0: chosen by the launcher)
  int64_t n, v, sub_row;
  bool has_sel;
  ffi::DataType dtype;
};

inline std::string Dims(ffi::Span<const int64_t> d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

inline ffi::Error Bad(const std::string& what) {
  return ffi::Error::InvalidArgument("samoyeds_ragged_dot: " + what);
}

inline ffi::Error CheckProblem(const ffi::AnyBuffer& x, const ffi::AnyBuffer& values,
                               const ffi::Buffer<ffi::U8>& indices,
                               const ffi::Buffer<ffi::U32>& metadata,
                               const ffi::Buffer<ffi::S32>& sel,
                               const ffi::Buffer<ffi::S32>& group_sizes, int64_t n,
                               int64_t v, int64_t sub_row, int64_t has_sel, int64_t glu,
                               int64_t kernel, int64_t splits, const ffi::AnyBuffer& out,
                               Problem* p) {
  if (!IsSupported(n, v, sub_row))
    return Bad("unsupported config n=" + std::to_string(n) + " v=" + std::to_string(v) +
               " sub_row=" + std::to_string(sub_row));
  const auto xd = x.dimensions(), vd = values.dimensions();
  if (xd.size() != 2) return Bad("x must be [T, K], got " + Dims(xd));
  if (x.element_type() != ffi::DataType::BF16 && x.element_type() != ffi::DataType::F16)
    return Bad("x must be bfloat16 or float16");
  if (values.element_type() != x.element_type() || out.element_type() != x.element_type())
    return Bad("values and out must have x's dtype");
  if (vd.size() != 3) return Bad("values must be [E, Mk, K/2], got " + Dims(vd));
  p->tokens = xd[0];
  p->k = xd[1];
  p->experts = vd[0];
  p->kept_rows = vd[1];
  p->n = n;
  p->v = v;
  p->sub_row = sub_row;
  p->m = p->kept_rows / n * v;
  p->dtype = x.element_type();
  p->has_sel = has_sel != 0;
  if (p->k % KMultiple(sub_row) != 0 || vd[2] * 2 != p->k)
    return Bad("values " + Dims(vd) + " do not match K=" + std::to_string(p->k) +
               " (K must be a multiple of sub_row=" + std::to_string(sub_row) + ")");
  if (p->kept_rows % kRowTile != 0 || p->kept_rows % n != 0)
    return Bad("kept rows Mk=" + std::to_string(p->kept_rows) + " must be a multiple of " +
               std::to_string(kRowTile));
  const auto id = indices.dimensions(), md = metadata.dimensions();
  if (id.size() != 3 || id[0] != p->experts || id[1] != p->kept_rows ||
      id[2] != p->k / sub_row)
    return Bad("indices must be [E, Mk, K/L] = [" + std::to_string(p->experts) + ", " +
               std::to_string(p->kept_rows) + ", " + std::to_string(p->k / sub_row) +
               "], got " + Dims(id));
  if (md.size() != 3 || md[0] != p->experts || md[1] != p->kept_rows ||
      md[2] != p->k / kMetaColsPerWord)
    return Bad("metadata must be [E, Mk, K/32] = [" + std::to_string(p->experts) + ", " +
               std::to_string(p->kept_rows) + ", " +
               std::to_string(p->k / kMetaColsPerWord) + "], got " + Dims(md));
  const auto gd = group_sizes.dimensions(), sd = sel.dimensions();
  if (gd.size() != 1 || gd[0] != p->experts)
    return Bad("group_sizes must be [E] = [" + std::to_string(p->experts) + "], got " +
               Dims(gd));
  if (sd.size() != 1) return Bad("sel must be [R], got " + Dims(sd));
  if (p->has_sel) {
    p->rows = sd[0];
  } else {
    if (sd[0] != 0) return Bad("sel must be empty when has_sel=0");
    p->rows = p->tokens;
  }
  if (glu < 0 || glu >= kGluCount) return Bad("unknown glu=" + std::to_string(glu));
  p->glu = static_cast<int>(glu);
  if (kernel < 0 || kernel >= kKernelChoiceCount)
    return Bad("unknown kernel=" + std::to_string(kernel));
  if (!ValidSplits(splits))
    return Bad("splits=" + std::to_string(splits) + " must be 0 (automatic) or at most " +
               std::to_string(kMaxForcedSplits));
  p->kernel = static_cast<KernelChoice>(kernel);
  p->splits = static_cast<int>(splits);
  p->out_cols = p->m;
  if (p->glu != kGluNone) {
    // Each half (gate, up) must be whole kept-row tiles, like a weight of its own.
    if (p->kept_rows % (2 * kRowTile) != 0)
      return Bad("a fused GLU needs M=" + std::to_string(p->m) +
                 " = 2F with F a multiple of " + std::to_string(MMultiple(n, v)));
    p->out_cols = p->m / 2;
  }
  const auto od = out.dimensions();
  if (od.size() != 2 || od[0] != p->rows || od[1] != p->out_cols)
    return Bad(std::string("out must be [R, ") + (p->glu ? "M/2" : "M") + "] = [" +
               std::to_string(p->rows) + ", " + std::to_string(p->out_cols) + "], got " +
               Dims(od));
  // Index arithmetic in the kernels is 64-bit for buffers, 32-bit for rows and columns.
  constexpr int64_t kMax32 = int64_t{1} << 31;
  if (p->tokens >= kMax32 || p->rows >= kMax32 || p->k >= kMax32 || p->m >= kMax32)
    return Bad("T, R, K and M must each be below 2^31");
  return ffi::Error::Success();
}

// The format's validity rule on the stored arrays of the experts that own rows (the only
// ones a call reads): every sub-row index below V and the N indices of each block
// increasing; every metadata nibble an ordered 2:4 pair (first < second). The kernels,
// samoyeds_jax.decode and the gradient agree on weights that keep it; the sparse tensor
// cores leave other metadata undefined. Python checks weights where they enter; the CPU
// handler also refuses, on every call, a weight that breaks the rule (the CUDA handler
// cannot report it without a host sync).
inline ffi::Error CheckPattern(const ffi::Buffer<ffi::U8>& indices,
                               const ffi::Buffer<ffi::U32>& metadata,
                               const ffi::Buffer<ffi::S32>& group_sizes, const Problem& p) {
  const int64_t windows = p.k / p.sub_row, words = p.k / kMetaColsPerWord;
  const int32_t* gs = group_sizes.typed_data();
  for (int64_t e = 0; e < p.experts; ++e) {
    if (gs[e] <= 0) continue;
    const uint8_t* ie = indices.typed_data() + e * p.kept_rows * windows;
    for (int64_t i = 0; i < p.kept_rows * windows; ++i) {
      const int64_t row = i / windows;
      const bool high = ie[i] >= p.v, repeated = row % p.n != 0 && ie[i] <= ie[i - windows];
      if (high || repeated)
        return Bad("indices value " + std::to_string(ie[i]) + " at expert " +
                   std::to_string(e) + ", kept row " + std::to_string(row) + ", window " +
                   std::to_string(i % windows) +
                   (high ? " is not below V=" + std::to_string(p.v)
                         : std::string(" does not increase over the previous kept row of "
                                       "its block")));
    }
    // Per nibble, (high | 4) - low - 1 is in [0, 6] (no borrow between nibbles) and has
    // bit 2 set exactly when high > low; the hardware order moves whole nibbles.
    const uint32_t* me = metadata.typed_data() + e * p.kept_rows * words;
    for (int64_t i = 0; i < p.kept_rows * words; ++i) {
      const uint32_t lo = me[i] & 0x33333333u, hi = (me[i] >> 2) & 0x33333333u;
      if ((((hi | 0x44444444u) - lo - 0x11111111u) & 0x44444444u) != 0x44444444u)
        return Bad("metadata word of expert " + std::to_string(e) + ", row " +
                   std::to_string(i / words) + ", column " + std::to_string(i % words) +
                   " (hardware order) holds a 2:4 group whose two positions are not "
                   "increasing");
    }
  }
  return ffi::Error::Success();
}

}  // namespace samoyeds
