// CPU handler of the sparse ragged dot: works on the stored compressed form (work
// proportional to the kept values times the routed rows), float32 accumulation. It is
// the reference the CUDA kernel is checked against and what CI and CPU users run.
#include <cmath>
#include <cstring>
#include <vector>

#include "format.h"
#include "problem.h"

namespace samoyeds {
namespace {

float Bf16ToFloat(uint16_t h) {
  uint32_t bits = uint32_t{h} << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t FloatToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(u >> 16);
}

float F16ToFloat(uint16_t h) {
  const uint32_t sign = uint32_t{h & 0x8000u} << 16;
  const uint32_t e = (h >> 10) & 0x1Fu, mant = h & 0x3FFu;
  uint32_t bits;
  if (e == 0) {
    float f = std::ldexp(static_cast<float>(mant), -24);
    return sign ? -f : f;
  }
  bits = e == 31 ? sign | 0x7F800000u | (mant << 13) : sign | ((e + 112) << 23) | (mant << 13);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t FloatToF16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return static_cast<uint16_t>(sign | 0x7C00u | (ax > 0x7F800000u ? 0x200u : 0));
  if (ax >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to inf
  if (ax < 0x38800000u) {  // half subnormal (or zero): exact scale, round to nearest even
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(std::fabs(f) * 16777216.0f)));
  }
  ax += 0xC8000FFFu + ((ax >> 13) & 1u);  // rebias exponent by -112, round to nearest even
  return static_cast<uint16_t>(sign | (ax >> 13));
}

ffi::Error RaggedDotCpu(ffi::AnyBuffer x, ffi::AnyBuffer values, ffi::Buffer<ffi::U8> indices,
                        ffi::Buffer<ffi::U32> metadata, ffi::Buffer<ffi::S32> sel,
                        ffi::Buffer<ffi::S32> group_sizes, int64_t n, int64_t v,
                        int64_t sub_row, int64_t has_sel, int64_t glu, int64_t kernel,
                        int64_t splits,
                        ffi::Result<ffi::AnyBuffer> out) {
  Problem p;
  if (ffi::Error err = CheckProblem(x, values, indices, metadata, sel, group_sizes, n, v,
                                    sub_row, has_sel, glu, kernel, splits, *out, &p);
      err.failure())
    return err;
  if (ffi::Error err = CheckPattern(indices, metadata, group_sizes, p); err.failure())
    return err;
  const bool bf16 = p.dtype == ffi::DataType::BF16;
  auto to_float = bf16 ? Bf16ToFloat : F16ToFloat;
  auto from_float = bf16 ? FloatToBf16 : FloatToF16;

  // Group offsets: the CPU can afford to refuse bad routing instead of clamping it.
  const int32_t* gs = group_sizes.typed_data();
  std::vector<int64_t> offset(p.experts + 1, 0);
  for (int64_t e = 0; e < p.experts; ++e) {
    if (gs[e] < 0) return Bad("group_sizes[" + std::to_string(e) + "] is negative");
    offset[e + 1] = offset[e] + gs[e];
  }
  if (offset[p.experts] > p.rows)
    return Bad("sum(group_sizes)=" + std::to_string(offset[p.experts]) +
               " exceeds the R=" + std::to_string(p.rows) + " output rows");
  const int32_t* sel_data = sel.typed_data();
  if (p.has_sel) {
    for (int64_t r = 0; r < offset[p.experts]; ++r)
      if (sel_data[r] < 0 || sel_data[r] >= p.tokens)
        return Bad("sel[" + std::to_string(r) + "]=" + std::to_string(sel_data[r]) +
                   " is not a token id in [0, " + std::to_string(p.tokens) + ")");
  }

  const uint16_t* xs = static_cast<const uint16_t*>(x.untyped_data());
  const uint16_t* vals = static_cast<const uint16_t*>(values.untyped_data());
  const uint8_t* idx = indices.typed_data();
  const uint32_t* meta = metadata.typed_data();
  uint16_t* o = static_cast<uint16_t*>(out->untyped_data());
  const int64_t K = p.k, M = p.m, half_k = K / 2, windows = K / p.sub_row;
  const int64_t words = K / kMetaColsPerWord, words_per_window = p.sub_row / kMetaColsPerWord;
  const int64_t per_window = p.sub_row / 2;  // kept values per sub-row segment

  std::vector<float> xf, acc, wval(per_window);
  std::vector<int32_t> wcol(per_window);
  for (int64_t e = 0; e < p.experts; ++e) {
    const int64_t r0 = offset[e], rows = offset[e + 1] - r0;
    if (rows == 0) continue;
    xf.resize(rows * K);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = p.has_sel ? sel_data[r0 + r] : r0 + r;
      for (int64_t c = 0; c < K; ++c) xf[r * K + c] = to_float(xs[t * K + c]);
    }
    acc.assign(rows * M, 0.0f);
    const uint16_t* ve = vals + e * p.kept_rows * half_k;
    const uint8_t* ie = idx + e * p.kept_rows * windows;
    const uint32_t* me = meta + e * p.kept_rows * words;
    for (int64_t kr = 0; kr < p.kept_rows; ++kr) {
      const int64_t block = kr / p.n;
      for (int64_t w = 0; w < windows; ++w) {
        const uint8_t sub = ie[kr * windows + w];
        if (sub >= p.v)
          return Bad("indices value " + std::to_string(sub) + " at expert " +
                     std::to_string(e) + ", kept row " + std::to_string(kr) + ", window " +
                     std::to_string(w) + " is not below V=" + std::to_string(p.v));
        const int64_t row = block * p.v + sub;
        // Decode this segment's (column, value) pairs once, then reuse them for all rows.
        for (int64_t wc = 0; wc < words_per_window; ++wc) {
          const int64_t c = w * words_per_window + wc;
          const uint32_t word = SwappedMetaWord(me, words, kr, c);
          for (int g = 0; g < kGroupsPerWord; ++g) {
            const uint32_t nib = MetaNibble(word, g);
            const int64_t slot = (wc * kGroupsPerWord + g) * kKeptPerGroup;
            const int32_t col = static_cast<int32_t>(c * kMetaColsPerWord + g * kGroupWidth);
            wcol[slot] = col + static_cast<int32_t>(nib & 3u);
            wcol[slot + 1] = col + static_cast<int32_t>(nib >> 2);
            wval[slot] = to_float(ve[kr * half_k + w * per_window + slot]);
            wval[slot + 1] = to_float(ve[kr * half_k + w * per_window + slot + 1]);
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          const float* xr = xf.data() + r * K;
          float s = 0.0f;
          for (int64_t i = 0; i < per_window; ++i) s += wval[i] * xr[wcol[i]];
          acc[r * M + row] += s;
        }
      }
    }
    const int64_t C = p.out_cols;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < C; ++c) {
        const float* a = acc.data() + r * M;
        o[(r0 + r) * C + c] = from_float(
            p.glu == kGluNone ? a[c] : GluActivation(a[c], p.glu) * a[C + c]);
      }
  }
  std::memset(o + offset[p.experts] * p.out_cols, 0,
              static_cast<size_t>((p.rows - offset[p.experts]) * p.out_cols) * sizeof(uint16_t));
  return ffi::Error::Success();
}

}  // namespace
}  // namespace samoyeds

XLA_FFI_DEFINE_HANDLER_SYMBOL(SamoyedsRaggedDotCpu, samoyeds::RaggedDotCpu,
                              SAMOYEDS_BIND_RAGGED_DOT(xla::ffi::Ffi::Bind()));
