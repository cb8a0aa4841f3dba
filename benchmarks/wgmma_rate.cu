// Issue rate of wgmma from shared memory with no loads at all: the ceiling a kernel's
// MMA loop can reach on this GPU, per SM, for the instruction shapes the Hopper kernel
// uses (sparse m64n128k32, m64n64k32) against dense m64n128k16.
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -DSAMOYEDS_SM90A -Iffi \
//        -I$(jax ffi include) benchmarks/wgmma_rate.cu -o wgmma_rate && ./wgmma_rate
// Prints cycles per instruction per SM; the tensor pipe's rate is 64 cycles for a
// m64n128k16 dense or m64n128k32 sparse (same dense-equivalent work) at the datasheet's
// 990 dense TFLOP/s at 1.83 GHz over 132 SMs.
#include <cstdio>
#include <vector>

#include "../ffi/wgmma_sp.cuh"

using namespace samoyeds::cuda;

#ifdef SAMOYEDS_HOPPER_DEVICE_PASS
__device__ __forceinline__ void WgmmaDense128(float (&d)[16][4], uint64_t desc_a, uint64_t desc_b) {
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
               "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " SAMOYEDS_REGS64
               ", %64, %65, p, 1, 1, 0, 0;\n}\n"
               : SAMOYEDS_ACC64(d)
               : "l"(desc_a), "l"(desc_b));
}
#endif

// kind 0: sparse m64n128k32; 1: dense m64n128k16; 2: sparse m64n64k32;
// 3: sparse m64n128k32, two A tiles per B (the shape of an expanded 1:2 tile).
template <int kKind>
__global__ void Rate(long long* cycles, float* sink, int iters) {
#ifdef SAMOYEDS_HOPPER_DEVICE_PASS
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (SmemAddr(smem_raw) & 1023u)) & 1023u);
  // Small random-looking bf16 values (never zeros: zeros can run faster).
  for (int i = threadIdx.x; i < 96 * 1024 / 4; i += blockDim.x) {
    uint32_t h = i * 2654435761u;
    reinterpret_cast<uint32_t*>(smem)[i] = (0x3C003C00u ^ (h & 0x80FF80FFu));
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  const uint32_t base = SmemAddr(smem);
  const uint32_t a0 = base, b0 = base + 32768;
  float acc[2][16][4] = {};
  float acc64[8][4] = {};
  __syncthreads();
  const long long t0 = clock64();
  for (int i = 0; i < iters; ++i) {
    WgmmaFence();
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const uint64_t da = Desc128(a0 + s * 32), db = Desc128(b0 + (s >> 1) * 16384 + (s & 1) * 64);
      if constexpr (kKind == 0 || kKind == 3) {
        if (s % 2 == 0) WgmmaSp128<__nv_bfloat16, 0>(acc[0], da, db, kFillerMeta);
        else WgmmaSp128<__nv_bfloat16, 1>(acc[0], da, db, kFillerMeta);
      }
      if constexpr (kKind == 3) {
        const uint64_t da1 = Desc128(a0 + 8192 + s * 32);
        if (s % 2 == 0) WgmmaSp128<__nv_bfloat16, 0>(acc[1], da1, db, kFillerMeta);
        else WgmmaSp128<__nv_bfloat16, 1>(acc[1], da1, db, kFillerMeta);
      }
      if constexpr (kKind == 1) WgmmaDense128(acc[0], Desc128(a0 + s * 32), db);
      if constexpr (kKind == 2) {
        if (s % 2 == 0) WgmmaSp64<__nv_bfloat16, 0>(acc64, da, db, kFillerMeta);
        else WgmmaSp64<__nv_bfloat16, 1>(acc64, da, db, kFillerMeta);
      }
    }
    WgmmaCommit();
    WgmmaWait<1>();
  }
  WgmmaWait<0>();
  const long long t1 = clock64();
  float s = 0;
  for (int j = 0; j < 16; ++j)
    for (int q = 0; q < 4; ++q) s += acc[0][j][q] + acc[1][j][q] + (j < 8 ? acc64[j][q] : 0.f);
  sink[blockIdx.x * blockDim.x + threadIdx.x] = s;
  if (threadIdx.x == 0) cycles[blockIdx.x] = t1 - t0;
#endif
}

template <int kKind>
void Run(const char* name, int warpgroups, int per_iter) {
  const int blocks = 132, iters = 2000, smem = 97 * 1024;
  long long* cycles;
  float* sink;
  cudaMalloc(&cycles, blocks * sizeof(long long));
  cudaMalloc(&sink, blocks * 128 * warpgroups * sizeof(float));
  cudaFuncSetAttribute(Rate<kKind>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  Rate<kKind><<<blocks, 128 * warpgroups, smem>>>(cycles, sink, iters);
  Rate<kKind><<<blocks, 128 * warpgroups, smem>>>(cycles, sink, iters);
  cudaError_t err = cudaDeviceSynchronize();
  std::vector<long long> h(blocks);
  cudaMemcpy(h.data(), cycles, blocks * sizeof(long long), cudaMemcpyDeviceToHost);
  double mean = 0;
  for (long long c : h) mean += double(c) / blocks;
  std::printf("%-34s warpgroups %d  %6.1f cycles per instruction per SM  (%s)\n", name,
              warpgroups, mean / (double(iters) * per_iter * warpgroups),
              cudaGetErrorString(err));
  cudaFree(cycles);
  cudaFree(sink);
}

int main() {
  Run<1>("dense  m64n128k16", 1, 4);
  Run<1>("dense  m64n128k16", 2, 4);
  Run<0>("sparse m64n128k32", 1, 4);
  Run<0>("sparse m64n128k32", 2, 4);
  Run<0>("sparse m64n128k32", 3, 4);
  Run<2>("sparse m64n64k32", 2, 4);
  Run<3>("sparse m64n128k32, 2 A tiles per B", 1, 8);
  Run<3>("sparse m64n128k32, 2 A tiles per B", 2, 8);
  return 0;
}
