// Host side of the bulk tensor copies: the tensor map (TMA descriptor) of the compressed
// values, encoded per call (buffer addresses change between calls; encoding is a host
// computation, no device work). The driver's encoder is reached through the runtime's
// entry-point query, so the module links no driver library.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include "cuda/tile.cuh"

namespace samoyeds::cuda {

inline PFN_cuTensorMapEncodeTiled_v12000 TensorMapEncoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000,
                                         cudaEnableDefault, &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  return encode;
}

// The values of every expert, [E * Mk, K / 2] 16-bit elements, read in boxes of
// `box_cols` values (box_cols * 2 bytes: one 128-byte swizzle row) by `box_rows` kept rows
// and stored with the 128-byte swizzle the wgmma descriptors describe. Reads past either
// edge fill zeros.
inline cudaError_t EncodeValuesMap(CUtensorMap* map, const Args& a, int box_cols,
                                   int box_rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = TensorMapEncoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(a.k / 2),
                              static_cast<cuuint64_t>(a.experts) * a.kept_rows};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(a.k / 2) * 2};  // bytes, rows
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_cols),
                             static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t unit[2] = {1, 1};
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, const_cast<void*>(a.values),
                            dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace samoyeds::cuda
