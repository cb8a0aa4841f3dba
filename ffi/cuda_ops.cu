// CUDA handler of the sparse ragged dot. Placeholder until the mma.sp kernel lands: it
// checks its arguments like the CPU handler and then refuses to run, loudly.
#include <cuda_runtime.h>

#include "problem.h"

namespace samoyeds {
namespace {

ffi::Error RaggedDotCuda(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer values,
                         ffi::Buffer<ffi::U8> indices, ffi::Buffer<ffi::U32> metadata,
                         ffi::Buffer<ffi::S32> sel, ffi::Buffer<ffi::S32> group_sizes,
                         int64_t n, int64_t v, int64_t sub_row, int64_t has_sel,
                         ffi::Result<ffi::AnyBuffer> out) {
  Problem p;
  if (ffi::Error err = CheckProblem(x, values, indices, metadata, sel, group_sizes, n, v,
                                    sub_row, has_sel, *out, &p);
      err.failure())
    return err;
  (void)stream;
  return ffi::Error(ffi::ErrorCode::kUnimplemented,
                    "samoyeds_ragged_dot: the CUDA kernel is not built yet");
}

}  // namespace
}  // namespace samoyeds

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    SamoyedsRaggedDotCuda, samoyeds::RaggedDotCuda,
    SAMOYEDS_BIND_RAGGED_DOT(
        xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()),
    {xla::ffi::Traits::kCmdBufferCompatible});
