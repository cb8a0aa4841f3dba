// Which kernel runs a call: chosen per call from shapes and the device (never from
// group_sizes, which stay on the device), or forced by the call's `kernel` attribute
// (tests and benchmarks). One instantiation per N:V of format.h's list.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstddef>

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

// The automatic choice on sm_90a, from the H200 measurements in BENCHMARKS.md: the
// serving kernel up to 16 routed rows per expert (it beat the warp-level kernel at every
// such shape measured); past that the prefill kernel where its blocks alone fill the GPU
// (many experts, or many M tiles), or from kHopperMinRowsPerExpert rows per expert while
// its blocks fill at least a quarter of the SMs (its 128-row activation tiles reuse each
// weight tile over more rows: 1 expert x 256 rows, up, 112 blocks: 27.6 us against 62
// us); else the serving kernel, whose K splits fill the SMs that the prefill kernel's
// few tiles leave idle (1 expert, down: 64 rows 40.7 against 79.7 us; 256 rows, 32
// prefill blocks, 60.1 against 83.6 us).
template <int V>
bool UseStreamFor(const Args& a) {
  if (a.rows <= kStreamNarrowMaxRowsPerExpert * a.experts) return true;
  using Cfg = HopperCfgFor<V>;
  const int64_t blocks = BusyRowTiles<Cfg::kBN>(a) * MTiles<Cfg::kBM>(a);
  const int sms = CurrentDevice().sms;
  return UseHopperFor(a) ? 4 * blocks < sms : blocks < sms;
}

template <typename T, int N, int V>
cudaError_t LaunchBest(cudaStream_t stream, const Args& a, KernelChoice kernel) {
  const bool hopper = DeviceIsHopper();
  if ((kernel == KernelChoice::kHopper || kernel == KernelChoice::kStream) && !hopper)
    return cudaErrorNotSupported;
  if (kernel == KernelChoice::kAuto) {
    kernel = !hopper           ? KernelChoice::kWarp
             : UseStreamFor<V>(a) ? KernelChoice::kStream
                               : KernelChoice::kHopper;
  }
  if (kernel == KernelChoice::kStream) return LaunchStream<T, N, V>(stream, a);
  if (kernel == KernelChoice::kHopper) return LaunchHopper<T, N, V>(stream, a);
  return LaunchWarpLevel<T, N, V>(stream, a);
}

// The launch for config n:v, found in format.h's list of supported configs (any other
// is unreachable: CheckProblem refused it).
template <typename T>
cudaError_t Dispatch(cudaStream_t stream, const Args& a, int n, int v,
                     KernelChoice kernel = KernelChoice::kAuto) {
  return WithSupportedNV(
      n, v,
      [&](auto nc, auto vc) {
        return LaunchBest<T, decltype(nc)::value, decltype(vc)::value>(stream, a, kernel);
      },
      cudaErrorInvalidValue);
}

}  // namespace samoyeds::cuda
