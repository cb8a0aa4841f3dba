// The one nanobind module: FFI handler capsules per platform and the format's facts
// (from format.h), so that Python never restates them.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>

#include "format.h"
#include "glu.h"
#include "kernel_choice.h"
#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;

extern "C" XLA_FFI_Error* SamoyedsRaggedDotCpu(XLA_FFI_CallFrame*);
extern "C" XLA_FFI_Error* SamoyedsRaggedDotDxCpu(XLA_FFI_CallFrame*);
extern "C" XLA_FFI_Error* SamoyedsRaggedDotDvaluesCpu(XLA_FFI_CallFrame*);
#ifdef SAMOYEDS_WITH_CUDA
extern "C" XLA_FFI_Error* SamoyedsRaggedDotCuda(XLA_FFI_CallFrame*);
extern "C" XLA_FFI_Error* SamoyedsRaggedDotDxCuda(XLA_FFI_CallFrame*);
extern "C" XLA_FFI_Error* SamoyedsRaggedDotDvaluesCuda(XLA_FFI_CallFrame*);
#endif

namespace {

template <typename Fn>
nb::capsule Capsule(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

using MetaArray = nb::ndarray<uint32_t, nb::ndim<2>, nb::c_contig, nb::device::cpu>;

// dst = src with every 16-row tile's metadata words swapped between canonical and
// hardware order (the swap is its own inverse).
void SwapMetadata(MetaArray src, MetaArray dst) {
  const int64_t rows = src.shape(0), words = src.shape(1);
  if (dst.shape(0) != rows || dst.shape(1) != words)
    throw nb::value_error("swap_metadata: dst must have src's shape");
  if (rows % samoyeds::kRowTile != 0)
    throw nb::value_error("swap_metadata: rows must be a multiple of ROW_TILE");
  const uint32_t* s = src.data();
  uint32_t* d = dst.data();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < words; ++c)
      d[r * words + c] = samoyeds::SwappedMetaWord(s, words, r, c);
}

}  // namespace

NB_MODULE(_samoyeds, m) {
  m.def("cpu_targets", []() {
    nb::dict d;
    d["samoyeds_ragged_dot"] = Capsule(SamoyedsRaggedDotCpu);
    d["samoyeds_ragged_dot_dx"] = Capsule(SamoyedsRaggedDotDxCpu);
    d["samoyeds_ragged_dot_dvalues"] = Capsule(SamoyedsRaggedDotDvaluesCpu);
    return d;
  });
  m.def("cuda_targets", []() {
    nb::dict d;
#ifdef SAMOYEDS_WITH_CUDA
    d["samoyeds_ragged_dot"] = Capsule(SamoyedsRaggedDotCuda);
    d["samoyeds_ragged_dot_dx"] = Capsule(SamoyedsRaggedDotDxCuda);
    d["samoyeds_ragged_dot_dvalues"] = Capsule(SamoyedsRaggedDotDvaluesCuda);
#endif
    return d;
  });
#ifdef SAMOYEDS_WITH_CUDA
  m.attr("HAS_CUDA") = true;
#else
  m.attr("HAS_CUDA") = false;
#endif
  m.attr("FFI_API_VERSION") =
      nb::make_tuple(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR);
  nb::list nv;
  for (const auto& p : samoyeds::kSupportedNV) nv.append(nb::make_tuple(p.n, p.v));
  m.attr("SUPPORTED_NV") = nb::tuple(nv);
  nb::list sub_rows;
  for (int s : samoyeds::kSupportedSubRows) sub_rows.append(s);
  m.attr("SUPPORTED_SUB_ROWS") = nb::tuple(sub_rows);
  m.attr("GROUP_WIDTH") = samoyeds::kGroupWidth;
  m.attr("KEPT_PER_GROUP") = samoyeds::kKeptPerGroup;
  m.attr("META_COLS_PER_WORD") = samoyeds::kMetaColsPerWord;
  m.attr("META_BITS_PER_GROUP") = samoyeds::kMetaBitsPerGroup;
  m.attr("ROW_TILE") = samoyeds::kRowTile;
  nb::dict glu;
  glu["silu"] = samoyeds::kGluSilu;
  glu["gelu"] = samoyeds::kGluGelu;
  m.attr("GLU_CODES") = glu;
  nb::dict kernels;
  for (int i = 0; i < samoyeds::kKernelChoiceCount; ++i)
    kernels[samoyeds::kKernelChoiceNames[i]] = i;
  m.attr("KERNEL_CODES") = kernels;
  m.attr("MAX_FORCED_SPLITS") = samoyeds::kMaxForcedSplits;
  m.def("swap_metadata", &SwapMetadata, nb::arg("src"), nb::arg("dst"));
}
