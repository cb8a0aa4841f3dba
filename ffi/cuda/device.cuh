// Host side of a launch: what the launchers need to know of the device, and cluster
// launches.
#pragma once

#include <cuda_runtime.h>

#include "cuda/tile.cuh"

namespace samoyeds::cuda {

// What the launchers need to know of the current device, queried once per device.
struct DeviceFacts {
  int major = 0, minor = 0, sms = 0;
};
inline const DeviceFacts& CurrentDevice() {
  constexpr int kMaxDevices = 64;
  static DeviceFacts cached[kMaxDevices];
  static DeviceFacts unknown;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= kMaxDevices) return unknown;
  DeviceFacts& f = cached[dev];
  if (f.sms == 0) {
    cudaDeviceGetAttribute(&f.major, cudaDevAttrComputeCapabilityMajor, dev);
    cudaDeviceGetAttribute(&f.minor, cudaDevAttrComputeCapabilityMinor, dev);
    cudaDeviceGetAttribute(&f.sms, cudaDevAttrMultiProcessorCount, dev);
  }
  return f;
}

// Launches `kernel` on `grid` in clusters of `cluster` blocks (a plain launch for 1x1x1;
// clusters need sm_90), with programmatic stream serialization if `programmatic` (the
// kernel then waits for the previous one itself: GridDependencyWait).
template <typename Kernel, typename... Params>
cudaError_t LaunchClusters(cudaStream_t stream, Kernel kernel, dim3 grid, int threads,
                           int smem, dim3 cluster, bool programmatic, const Params&... params) {
  if (cluster.x * cluster.y * cluster.z == 1 && !programmatic) {
    kernel<<<grid, threads, smem, stream>>>(params...);
    return cudaGetLastError();
  }
  cudaLaunchAttribute attrs[2];
  unsigned n = 0;
  if (cluster.x * cluster.y * cluster.z > 1) {
    attrs[n].id = cudaLaunchAttributeClusterDimension;
    attrs[n].val.clusterDim.x = cluster.x;
    attrs[n].val.clusterDim.y = cluster.y;
    attrs[n].val.clusterDim.z = cluster.z;
    ++n;
  }
  if (programmatic) {
    attrs[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[n].val.programmaticStreamSerializationAllowed = 1;
    ++n;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attrs;
  cfg.numAttrs = n;
  return cudaLaunchKernelEx(&cfg, kernel, params...);
}
}  // namespace samoyeds::cuda
