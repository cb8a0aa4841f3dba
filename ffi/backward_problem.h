// The FFI signatures of the backward products (samoyeds_jax/backward.py) and their shape
// checks, shared by the CPU and CUDA handlers so that both refuse exactly the same
// buffers with the same words. The checks that read group_sizes, indices or metadata
// (device memory on CUDA) stay with the CPU handler.
//
//   dx       (ct [R, M], values [E, Mk, K/2], indices, metadata, group_sizes [E];
//             n, v, sub_row)                    ->  float32 [R, K]
//   dvalues  (x [T, K], ct [R, M], indices, metadata, sel [R] or [0], group_sizes [E];
//             n, v, sub_row, has_sel)           ->  float32 [E, Mk, K/2]
#pragma once

#include <cstdint>
#include <string>

#include "format.h"
#include "problem.h"

namespace samoyeds {

inline ffi::Error BadBackward(const char* op, const std::string& what) {
  return ffi::Error::InvalidArgument(std::string("samoyeds_ragged_dot_") + op + ": " + what);
}

inline bool Is16Bit(ffi::DataType t) {
  return t == ffi::DataType::BF16 || t == ffi::DataType::F16;
}

// The stored weight as both handlers see it. `values` is optional (dvalues has none).
inline ffi::Error CheckWeight(const char* op, int64_t n, int64_t v, int64_t sub_row,
                              int64_t k, const ffi::Buffer<ffi::U8>& indices,
                              const ffi::Buffer<ffi::U32>& metadata,
                              const ffi::Buffer<ffi::S32>& group_sizes, Problem* p) {
  if (!IsSupported(n, v, sub_row))
    return BadBackward(op, "unsupported config n=" + std::to_string(n) + " v=" +
                               std::to_string(v) + " sub_row=" + std::to_string(sub_row));
  const auto id = indices.dimensions(), md = metadata.dimensions();
  if (id.size() != 3) return BadBackward(op, "indices must be [E, Mk, K/L], got " + Dims(id));
  p->n = n;
  p->v = v;
  p->sub_row = sub_row;
  p->k = k;
  p->experts = id[0];
  p->kept_rows = id[1];
  p->m = p->kept_rows / n * v;
  if (k % sub_row != 0 || k <= 0 || p->kept_rows % kRowTile != 0 || p->kept_rows % n != 0)
    return BadBackward(op, "K=" + std::to_string(k) + " must be a positive multiple of "
                           "sub_row and Mk=" + std::to_string(p->kept_rows) +
                           " a multiple of " + std::to_string(kRowTile));
  if (id[2] != k / sub_row)
    return BadBackward(op, "indices must be [E, Mk, K/L] with K=" + std::to_string(k) +
                               ", got " + Dims(id));
  if (md.size() != 3 || md[0] != p->experts || md[1] != p->kept_rows ||
      md[2] != k / kMetaColsPerWord)
    return BadBackward(op, "metadata must be [E, Mk, K/32] = [" +
                               std::to_string(p->experts) + ", " +
                               std::to_string(p->kept_rows) + ", " +
                               std::to_string(k / kMetaColsPerWord) + "], got " + Dims(md));
  const auto gd = group_sizes.dimensions();
  if (gd.size() != 1 || gd[0] != p->experts)
    return BadBackward(op, "group_sizes must be [E] = [" + std::to_string(p->experts) +
                               "], got " + Dims(gd));
  return ffi::Error::Success();
}

// dx's buffers: fills p (rows, dtype and the weight's shape).
inline ffi::Error CheckDxShapes(const ffi::AnyBuffer& ct, const ffi::AnyBuffer& values,
                                const ffi::Buffer<ffi::U8>& indices,
                                const ffi::Buffer<ffi::U32>& metadata,
                                const ffi::Buffer<ffi::S32>& group_sizes, int64_t n,
                                int64_t v, int64_t sub_row, const ffi::Buffer<ffi::F32>& out,
                                Problem* p) {
  constexpr const char* op = "dx";
  const auto cd = ct.dimensions(), vd = values.dimensions();
  if (cd.size() != 2) return BadBackward(op, "ct must be [R, M], got " + Dims(cd));
  if (!Is16Bit(ct.element_type()) || values.element_type() != ct.element_type())
    return BadBackward(op, "ct and values must both be bfloat16 or both float16");
  if (vd.size() != 3) return BadBackward(op, "values must be [E, Mk, K/2], got " + Dims(vd));
  if (ffi::Error err = CheckWeight(op, n, v, sub_row, vd[2] * 2, indices, metadata,
                                   group_sizes, p);
      err.failure())
    return err;
  if (vd[0] != p->experts || vd[1] != p->kept_rows)
    return BadBackward(op, "values " + Dims(vd) + " do not match indices");
  p->rows = cd[0];
  p->dtype = ct.element_type();
  if (cd[1] != p->m)
    return BadBackward(op, "ct must be [R, M] with M=" + std::to_string(p->m) + ", got " +
                               Dims(cd));
  const auto od = out.dimensions();
  if (od.size() != 2 || od[0] != p->rows || od[1] != p->k)
    return BadBackward(op, "out must be float32 [R, K], got " + Dims(od));
  return ffi::Error::Success();
}

// dvalues' buffers: fills p (tokens, rows, dtype, has_sel and the weight's shape).
inline ffi::Error CheckDvaluesShapes(const ffi::AnyBuffer& x, const ffi::AnyBuffer& ct,
                                     const ffi::Buffer<ffi::U8>& indices,
                                     const ffi::Buffer<ffi::U32>& metadata,
                                     const ffi::Buffer<ffi::S32>& sel,
                                     const ffi::Buffer<ffi::S32>& group_sizes, int64_t n,
                                     int64_t v, int64_t sub_row, int64_t has_sel,
                                     const ffi::Buffer<ffi::F32>& out, Problem* p) {
  constexpr const char* op = "dvalues";
  const auto xd = x.dimensions(), cd = ct.dimensions(), sd = sel.dimensions();
  if (xd.size() != 2) return BadBackward(op, "x must be [T, K], got " + Dims(xd));
  if (cd.size() != 2) return BadBackward(op, "ct must be [R, M], got " + Dims(cd));
  if (!Is16Bit(x.element_type()) || ct.element_type() != x.element_type())
    return BadBackward(op, "x and ct must both be bfloat16 or both float16");
  if (ffi::Error err = CheckWeight(op, n, v, sub_row, xd[1], indices, metadata, group_sizes,
                                   p);
      err.failure())
    return err;
  p->tokens = xd[0];
  p->rows = cd[0];
  p->dtype = x.element_type();
  p->has_sel = has_sel != 0;
  if (cd[1] != p->m)
    return BadBackward(op, "ct must be [R, M] with M=" + std::to_string(p->m) + ", got " +
                               Dims(cd));
  if (sd.size() != 1 || (has_sel ? sd[0] != p->rows : sd[0] != 0))
    return BadBackward(op, has_sel ? "sel must be [R] = [" + std::to_string(p->rows) +
                                         "], got " + Dims(sd)
                                   : "sel must be empty when has_sel=0");
  if (!has_sel && p->tokens != p->rows)
    return BadBackward(op, "without sel, x and ct must have the same rows, got " +
                               Dims(xd) + " and " + Dims(cd));
  const auto od = out.dimensions();
  if (od.size() != 3 || od[0] != p->experts || od[1] != p->kept_rows || od[2] != p->k / 2)
    return BadBackward(op, "out must be float32 [E, Mk, K/2], got " + Dims(od));
  return ffi::Error::Success();
}

}  // namespace samoyeds

// The bindings after the platform's context (the CPU thread pool, the CUDA stream).
// Macros, not templates: see SAMOYEDS_BIND_RAGGED_DOT in problem.h.
#define SAMOYEDS_BIND_DX(binding)                                           \
  (binding)                                                                 \
      .Arg<::xla::ffi::AnyBuffer>()               /* ct */                  \
      .Arg<::xla::ffi::AnyBuffer>()               /* values */              \
      .Arg<::xla::ffi::Buffer<::xla::ffi::U8>>()  /* indices */             \
      .Arg<::xla::ffi::Buffer<::xla::ffi::U32>>() /* metadata */            \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>() /* group_sizes */         \
      .Attr<int64_t>("n")                                                   \
      .Attr<int64_t>("v")                                                   \
      .Attr<int64_t>("sub_row")                                             \
      .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>() /* out */

#define SAMOYEDS_BIND_DVALUES(binding)                                      \
  (binding)                                                                 \
      .Arg<::xla::ffi::AnyBuffer>()               /* x */                   \
      .Arg<::xla::ffi::AnyBuffer>()               /* ct */                  \
      .Arg<::xla::ffi::Buffer<::xla::ffi::U8>>()  /* indices */             \
      .Arg<::xla::ffi::Buffer<::xla::ffi::U32>>() /* metadata */            \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>() /* sel */                 \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>() /* group_sizes */         \
      .Attr<int64_t>("n")                                                   \
      .Attr<int64_t>("v")                                                   \
      .Attr<int64_t>("sub_row")                                             \
      .Attr<int64_t>("has_sel")                                             \
      .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>() /* out */
