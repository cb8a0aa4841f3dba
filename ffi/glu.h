// Gated linear units fused into the sparse ragged dot's epilogue, shared by the CPU
// handler and the CUDA kernels. With glu != kGluNone the weight's M = 2F output rows are
// concat([gate, up]) and out[r, j] = act(y[r, j]) * y[r, F + j], computed in float32 from
// the accumulators (not from rounded outputs) and rounded once to the output dtype.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define SAMOYEDS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SAMOYEDS_HOST_DEVICE inline
#endif

namespace samoyeds {

inline constexpr int kGluNone = 0;
inline constexpr int kGluSilu = 1;  // SwiGLU: silu(g) = g * sigmoid(g)
inline constexpr int kGluGelu = 2;  // GeGLU: exact (erf) GELU
inline constexpr int kGluCount = 3;

SAMOYEDS_HOST_DEVICE float GluActivation(float g, int glu) {
  if (glu == kGluSilu) return g / (1.0f + expf(-g));
  return 0.5f * g * (1.0f + erff(g * 0.7071067811865476f));
}

}  // namespace samoyeds
