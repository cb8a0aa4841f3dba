// CUDA handler of the sparse ragged dot: the Samoyeds dual-side sparse x sparse kernel.
//
// out[r, :] = x[src(r), :] @ W_e(r) for every routed row r, all experts in one launch,
// computed as C^T[M, R] = A[M, K] * X^T[K, R] with the compressed 2:4 + N:V weight as
// the sparse A operand and the routed rows (gathered through SEL inside the kernel) as N.
// Two kernels implement it (the handler picks one per call from shapes and the device,
// never from group_sizes, which stay on the device):
//   * wgmma_sp.cuh: Hopper (sm_90a) warpgroup wgmma.mma_async.sp, for prefill shapes;
//   * mma_sp.cuh: warp-level mma.sp (sm_80+), for decode shapes and older GPUs.
// SAMOYEDS_KERNEL=warp|hopper (environment, read once) forces one, for benchmarks and
// tests; the Hopper kernel is never used on a device that cannot run it. On sm_90 the
// warp-level kernel splits K across a cluster for decode shapes (mma_sp.cuh, SplitsFor;
// SAMOYEDS_SPLIT_K=1|2|4|8 forces the count).
#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda_common.cuh"
#include "mma_sp.cuh"
#include "problem.h"
#include "wgmma_sp.cuh"

namespace samoyeds {
namespace cuda {

enum class Path { kAuto, kWarp, kHopper };

inline Path ForcedPath() {
  static const Path forced = [] {
    const char* env = std::getenv("SAMOYEDS_KERNEL");
    if (env && std::strcmp(env, "warp") == 0) return Path::kWarp;
    if (env && std::strcmp(env, "hopper") == 0) return Path::kHopper;
    return Path::kAuto;
  }();
  return forced;
}

// Whether the current device runs the sm_90a kernel (compute capability exactly 9.0: the
// arch-specific instructions do not carry over to later majors).
inline bool DeviceIsHopper() {
  const DeviceFacts& dev = CurrentDevice();
  return HopperKernelBuilt() && dev.major == 9 && dev.minor == 0;
}

template <typename T, int N, int V>
cudaError_t LaunchBest(cudaStream_t stream, const Args& a, Path path) {
  if (path == Path::kAuto) path = ForcedPath();
  const bool hopper = DeviceIsHopper();
  if (path == Path::kHopper && !hopper) return cudaErrorNotSupported;
  if (path == Path::kAuto)
    path = hopper && UseHopperFor(a) ? Path::kHopper : Path::kWarp;
  if (path == Path::kHopper) return LaunchHopper<T, N, V>(stream, a);
  return LaunchWarpLevel<T, N, V>(stream, a);
}

template <typename T>
cudaError_t Dispatch(cudaStream_t stream, const Args& a, int n, int v, Path path = Path::kAuto) {
  if (n == 1 && v == 1) return LaunchBest<T, 1, 1>(stream, a, path);
  if (n == 1 && v == 2) return LaunchBest<T, 1, 2>(stream, a, path);
  if (n == 1 && v == 4) return LaunchBest<T, 1, 4>(stream, a, path);
  if (n == 2 && v == 4) return LaunchBest<T, 2, 4>(stream, a, path);
  return cudaErrorInvalidValue;  // unreachable: CheckProblem refused it
}

}  // namespace cuda

namespace {

ffi::Error RaggedDotCuda(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer values,
                         ffi::Buffer<ffi::U8> indices, ffi::Buffer<ffi::U32> metadata,
                         ffi::Buffer<ffi::S32> sel, ffi::Buffer<ffi::S32> group_sizes,
                         int64_t n, int64_t v, int64_t sub_row, int64_t has_sel,
                         int64_t glu, ffi::Result<ffi::AnyBuffer> out) {
  Problem p;
  if (ffi::Error err = CheckProblem(x, values, indices, metadata, sel, group_sizes, n, v,
                                    sub_row, has_sel, glu, *out, &p);
      err.failure())
    return err;
  if (p.rows == 0 || p.m == 0) return ffi::Error::Success();
  if (p.experts == 0 || p.kept_rows == 0 || p.k == 0) {
    // No expert or an empty weight: every output row is zero.
    if (cudaMemsetAsync(out->untyped_data(), 0, out->size_bytes(), stream) != cudaSuccess)
      return ffi::Error::Internal("samoyeds_ragged_dot: cudaMemsetAsync failed");
    return ffi::Error::Success();
  }
  if (cuda::ForcedPath() == cuda::Path::kHopper && !cuda::DeviceIsHopper())
    return ffi::Error::InvalidArgument(
        "samoyeds_ragged_dot: SAMOYEDS_KERNEL=hopper needs an sm_90 GPU and a build for "
        "sm_90a");
  const cuda::Args a{x.untyped_data(),        values.untyped_data(),
                     indices.typed_data(),    metadata.typed_data(),
                     sel.typed_data(),        group_sizes.typed_data(),
                     out->untyped_data(),     static_cast<int>(p.tokens),
                     static_cast<int>(p.k),   static_cast<int>(p.m),
                     static_cast<int>(p.experts), static_cast<int>(p.kept_rows),
                     static_cast<int>(p.rows), static_cast<int>(p.sub_row),
                     p.has_sel,               p.glu,
                     static_cast<int>(p.out_cols)};
  const int ni = static_cast<int>(n), vi = static_cast<int>(v);
  const cudaError_t err = p.dtype == ffi::DataType::BF16
                              ? cuda::Dispatch<__nv_bfloat16>(stream, a, ni, vi)
                              : cuda::Dispatch<__half>(stream, a, ni, vi);
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
