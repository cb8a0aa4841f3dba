// Which kernel runs a call: chosen per call from shapes and the device (never from
// group_sizes, which stay on the device), or forced by the call's `kernel` attribute
// (tests and benchmarks). One instantiation per N:V of format.h's list.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <iterator>

#include "cuda/device.cuh"
#include "cuda/hopper/config.cuh"
#include "cuda/hopper/kernel.cuh"
#include "cuda/hopper/stream_config.cuh"
#include "cuda/hopper/stream_kernel.cuh"
#include "cuda/tile.cuh"
#include "cuda/warp/kernel.cuh"
#include "format.h"
#include "kernel_choice.h"

namespace samoyeds::cuda {

// Whether the current device runs the sm_90a kernels (compute capability exactly 9.0: the
// arch-specific instructions do not carry over to later majors).
inline bool DeviceIsHopper() {
  const DeviceFacts& dev = CurrentDevice();
  return HopperKernelBuilt() && dev.major == 9 && dev.minor == 0;
}

template <typename T, int N, int V>
cudaError_t LaunchBest(cudaStream_t stream, const Args& a, KernelChoice kernel) {
  const bool hopper = DeviceIsHopper();
  if ((kernel == KernelChoice::kHopper || kernel == KernelChoice::kStream) && !hopper)
    return cudaErrorNotSupported;
  if (kernel == KernelChoice::kAuto) {
    kernel = !hopper           ? KernelChoice::kWarp
             : UseStreamFor(a) ? KernelChoice::kStream
                               : KernelChoice::kHopper;
  }
  if (kernel == KernelChoice::kStream) return LaunchStream<T, N, V>(stream, a);
  if (kernel == KernelChoice::kHopper) return LaunchHopper<T, N, V>(stream, a);
  return LaunchWarpLevel<T, N, V>(stream, a);
}

// The launch for config n:v, found in format.h's list of supported configs.
template <typename T, size_t I = 0>
cudaError_t Dispatch(cudaStream_t stream, const Args& a, int n, int v,
                     KernelChoice kernel = KernelChoice::kAuto) {
  if constexpr (I < std::size(kSupportedNV)) {
    constexpr NV nv = kSupportedNV[I];
    if (n == nv.n && v == nv.v) return LaunchBest<T, nv.n, nv.v>(stream, a, kernel);
    return Dispatch<T, I + 1>(stream, a, n, v, kernel);
  } else {
    return cudaErrorInvalidValue;  // unreachable: CheckProblem refused the config
  }
}

}  // namespace samoyeds::cuda
