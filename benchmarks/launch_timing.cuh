// Kernel-only timing shared by the CUDA microbenchmarks (kernel_harness.cu, stream_floor.cu).
#pragma once

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <cuda_runtime.h>

#define CHECK(x)                                                                        \
  do {                                                                                  \
    cudaError_t e_ = (x);                                                               \
    if (e_ != cudaSuccess) {                                                            \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_));   \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

// Seconds per launch: `reps` launches back to back between two events (so the host's
// launch cost overlaps the previous kernel, as in a jitted program), launch i using copy
// i % copies of the inputs (copies rotated past the L2); the median of 5 such batches.
template <typename F>
double SecondsPerLaunch(F&& launch_copy, int copies, int reps) {
  for (int i = 0; i < 3; ++i) launch_copy(i % copies);
  CHECK(cudaDeviceSynchronize());
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  std::vector<float> ms;
  for (int batch = 0; batch < 5; ++batch) {
    CHECK(cudaEventRecord(a));
    for (int i = 0; i < reps; ++i) launch_copy((batch * reps + i) % copies);
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float t;
    CHECK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t / reps);
  }
  CHECK(cudaEventDestroy(a));
  CHECK(cudaEventDestroy(b));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2] * 1e-3;
}
