// CUDA handler of the sparse ragged dot: the Samoyeds dual-side sparse x sparse kernels.
//
// out[r, :] = x[src(r), :] @ W_e(r) for every routed row r, all experts in one launch,
// computed as C^T[M, R] = A[M, K] * X^T[K, R] with the compressed 2:4 + N:V weight as
// the sparse A operand and the routed rows (gathered through SEL inside the kernel) as N.
// cuda/dispatch.cuh picks the kernel per call; the kernels live under cuda/ (warp/,
// hopper/), built on the shared pieces there. The handler never allocates or syncs.
#include <string>

#include "cuda/dispatch.cuh"
#include "problem.h"

namespace samoyeds {
namespace {

ffi::Error RaggedDotCuda(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer values,
                         ffi::Buffer<ffi::U8> indices, ffi::Buffer<ffi::U32> metadata,
                         ffi::Buffer<ffi::S32> sel, ffi::Buffer<ffi::S32> group_sizes,
                         int64_t n, int64_t v, int64_t sub_row, int64_t has_sel,
                         int64_t glu, int64_t kernel, int64_t splits,
                         ffi::Result<ffi::AnyBuffer> out) {
  Problem p;
  if (ffi::Error err = CheckProblem(x, values, indices, metadata, sel, group_sizes, n, v,
                                    sub_row, has_sel, glu, kernel, splits, *out, &p);
      err.failure())
    return err;
  if (p.rows == 0 || p.m == 0) return ffi::Error::Success();
  if (p.experts == 0 || p.kept_rows == 0 || p.k == 0) {
    // No expert or an empty weight: every output row is zero.
    if (cudaMemsetAsync(out->untyped_data(), 0, out->size_bytes(), stream) != cudaSuccess)
      return ffi::Error::Internal("samoyeds_ragged_dot: cudaMemsetAsync failed");
    return ffi::Error::Success();
  }
  if ((p.kernel == KernelChoice::kHopper || p.kernel == KernelChoice::kStream) &&
      !cuda::DeviceIsHopper())
    return ffi::Error::InvalidArgument(
        "samoyeds_ragged_dot: kernel='hopper' and 'stream' need an sm_90 GPU and a build "
        "for sm_90a");
  cuda::Args a{x.untyped_data(),        values.untyped_data(),
               indices.typed_data(),    metadata.typed_data(),
               sel.typed_data(),        group_sizes.typed_data(),
               out->untyped_data(),     static_cast<int>(p.tokens),
               static_cast<int>(p.k),   static_cast<int>(p.m),
               static_cast<int>(p.experts), static_cast<int>(p.kept_rows),
               static_cast<int>(p.rows), static_cast<int>(p.sub_row),
               p.has_sel,               p.glu,
               static_cast<int>(p.out_cols)};
  a.splits = p.splits;
  const int ni = static_cast<int>(n), vi = static_cast<int>(v);
  const cudaError_t err = p.dtype == ffi::DataType::BF16
                              ? cuda::Dispatch<__nv_bfloat16>(stream, a, ni, vi, p.kernel)
                              : cuda::Dispatch<__half>(stream, a, ni, vi, p.kernel);
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("samoyeds_ragged_dot: kernel launch failed: ") +
                                cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace
}  // namespace samoyeds

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    SamoyedsRaggedDotCuda, samoyeds::RaggedDotCuda,
    SAMOYEDS_BIND_RAGGED_DOT(
        xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()),
    {xla::ffi::Traits::kCmdBufferCompatible});
