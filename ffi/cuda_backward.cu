// CUDA handlers of the sparse ragged dot's backward products (samoyeds_jax/backward.py),
// with the CPU handlers' signatures, attributes and shape checks (backward_problem.h):
//
//   dx       out[r] = ct[r] @ W[e(r)]^T                          ->  float32 [R, K]
//   dvalues  out[e, kr, j] = sum over the rows r of expert e of
//              ct[r, m(kr, w)] * x[src(r), k(kr, j)]             ->  float32 [E, Mk, K/2]
//
// The kernels (cuda/backward/) read the compressed weight and write every output element,
// in a fixed order (no atomics). group_sizes stay on the device: they are read clipped,
// as the forward kernels read them; the handlers never allocate or sync, so they cannot
// refuse routing or a pattern that the CPU handler would (Python clips the sizes and
// checks weights where they enter).
#include <cuda_runtime.h>

#include <string>

#include "backward_problem.h"
#include "cuda/backward/dvalues_kernel.cuh"
#include "cuda/backward/dx_kernel.cuh"
#include "format.h"

namespace samoyeds {
namespace {

using cuda::bwd::BwdArgs;

template <typename Kernel>
cudaError_t LaunchBwd(cudaStream_t stream, Kernel kernel, dim3 grid, int smem,
                      const BwdArgs& b) {
  if (cudaError_t err = cudaFuncSetAttribute(
          kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      err != cudaSuccess)
    return err;
  kernel<<<grid, cuda::bwd::kThreads, smem, stream>>>(b);
  return cudaGetLastError();
}

template <typename T, int N, int V, int WPW>
cudaError_t LaunchDx(cudaStream_t stream, const BwdArgs& b) {
  const dim3 grid(cuda::RowTiles<cuda::bwd::kTileRows>(b.a),
                  (b.a.k + cuda::bwd::kTileCols - 1) / cuda::bwd::kTileCols);
  return LaunchBwd(stream, cuda::bwd::DxKernel<T, N, V, WPW>, grid,
                   cuda::bwd::DxShape<N, V>::kSmemBytes, b);
}

template <typename T, int N, int V, int WPW>
cudaError_t LaunchDvalues(cudaStream_t stream, const BwdArgs& b) {
  const dim3 grid((b.a.kept_rows + cuda::bwd::kTileRows - 1) / cuda::bwd::kTileRows,
                  (b.a.k + cuda::bwd::kTileCols - 1) / cuda::bwd::kTileCols, b.a.experts);
  return LaunchBwd(stream, cuda::bwd::DvaluesKernel<T, N, V, WPW>, grid,
                   cuda::bwd::DvaluesShape<N, V>::kSmemBytes, b);
}

enum class Product { kDx, kDvalues };

// One instantiation per dtype, N:V of format.h's list and windows per warp.
template <Product P, typename T, int N, int V>
cudaError_t LaunchFor(cudaStream_t stream, const BwdArgs& b) {
  constexpr int kMany = cuda::bwd::WindowsPerWarp(32);
  static_assert(cuda::bwd::WindowsPerWarp(64) == 1 && kSupportedSubRows[0] == 32,
                "sub_row 32 is the only one whose windows split a warp's columns");
  const bool many = cuda::bwd::WindowsPerWarp(b.a.sub_row) > 1;
  if constexpr (P == Product::kDx)
    return many ? LaunchDx<T, N, V, kMany>(stream, b) : LaunchDx<T, N, V, 1>(stream, b);
  else
    return many ? LaunchDvalues<T, N, V, kMany>(stream, b)
                : LaunchDvalues<T, N, V, 1>(stream, b);
}

// Any config outside format.h's list is unreachable: CheckWeight refused it.
template <Product P, typename T>
cudaError_t Dispatch(cudaStream_t stream, const BwdArgs& b, int n, int v) {
  return WithSupportedNV(
      n, v,
      [&](auto nc, auto vc) {
        return LaunchFor<P, T, decltype(nc)::value, decltype(vc)::value>(stream, b);
      },
      cudaErrorInvalidValue);
}

// The kernels index rows and columns with 32-bit integers and put E and the column tiles
// on grid axes.
ffi::Error CheckCudaLimits(const char* op, const Problem& p) {
  constexpr int64_t kMax32 = int64_t{1} << 31, kMaxGridYZ = 65535;
  if (p.rows >= kMax32 || p.tokens >= kMax32 || p.k >= kMax32 || p.m >= kMax32)
    return BadBackward(op, "T, R, K and M must each be below 2^31");
  if (p.experts > kMaxGridYZ || (p.k + cuda::bwd::kTileCols - 1) / cuda::bwd::kTileCols >
                                    kMaxGridYZ)
    return BadBackward(op, "E and K/128 must each be at most 65535 on CUDA");
  return ffi::Error::Success();
}

template <Product P>
ffi::Error Run(const char* op, cudaStream_t stream, const Problem& p, const BwdArgs& b) {
  const int n = static_cast<int>(p.n), v = static_cast<int>(p.v);
  const cudaError_t err = p.dtype == ffi::DataType::BF16
                              ? Dispatch<P, __nv_bfloat16>(stream, b, n, v)
                              : Dispatch<P, __half>(stream, b, n, v);
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("samoyeds_ragged_dot_") + op +
                                ": kernel launch failed: " + cudaGetErrorString(err));
  return ffi::Error::Success();
}

cuda::Args WeightArgs(const Problem& p, const ffi::Buffer<ffi::U8>& indices,
                      const ffi::Buffer<ffi::U32>& metadata,
                      const ffi::Buffer<ffi::S32>& group_sizes) {
  cuda::Args a{};
  a.indices = indices.typed_data();
  a.metadata = metadata.typed_data();
  a.group_sizes = group_sizes.typed_data();
  a.tokens = static_cast<int>(p.tokens);
  a.k = static_cast<int>(p.k);
  a.m = static_cast<int>(p.m);
  a.experts = static_cast<int>(p.experts);
  a.kept_rows = static_cast<int>(p.kept_rows);
  a.rows = static_cast<int>(p.rows);
  a.sub_row = static_cast<int>(p.sub_row);
  return a;
}

ffi::Error DxCuda(cudaStream_t stream, ffi::AnyBuffer ct, ffi::AnyBuffer values,
                  ffi::Buffer<ffi::U8> indices, ffi::Buffer<ffi::U32> metadata,
                  ffi::Buffer<ffi::S32> group_sizes, int64_t n, int64_t v, int64_t sub_row,
                  ffi::Result<ffi::Buffer<ffi::F32>> out) {
  constexpr const char* op = "dx";
  Problem p;
  if (ffi::Error err = CheckDxShapes(ct, values, indices, metadata, group_sizes, n, v,
                                     sub_row, *out, &p);
      err.failure())
    return err;
  p.tokens = p.rows;
  if (ffi::Error err = CheckCudaLimits(op, p); err.failure()) return err;
  if (p.rows == 0) return ffi::Error::Success();
  BwdArgs b{WeightArgs(p, indices, metadata, group_sizes), ct.untyped_data(),
            out->typed_data()};
  b.a.values = values.untyped_data();
  return Run<Product::kDx>(op, stream, p, b);
}

ffi::Error DvaluesCuda(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer ct,
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
  if (ffi::Error err = CheckCudaLimits(op, p); err.failure()) return err;
  if (p.experts == 0 || p.kept_rows == 0) return ffi::Error::Success();
  BwdArgs b{WeightArgs(p, indices, metadata, group_sizes), ct.untyped_data(),
            out->typed_data()};
  b.a.x = x.untyped_data();
  b.a.sel = sel.typed_data();
  b.a.has_sel = p.has_sel;
  return Run<Product::kDvalues>(op, stream, p, b);
}

}  // namespace
}  // namespace samoyeds

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    SamoyedsRaggedDotDxCuda, samoyeds::DxCuda,
    SAMOYEDS_BIND_DX(xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()),
    {xla::ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    SamoyedsRaggedDotDvaluesCuda, samoyeds::DvaluesCuda,
    SAMOYEDS_BIND_DVALUES(xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()),
    {xla::ffi::Traits::kCmdBufferCompatible});
