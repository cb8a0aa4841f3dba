// Standalone driver of the CUDA kernel (no JAX) for ncu and kernel-only timing:
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -Iffi -I$(jax ffi include) \
//        benchmarks/kernel_harness.cu -o harness
//   ./harness K M TOKENS N V SUB_ROW [EXPERTS] [REPS]
// Random values, metadata (valid sorted 2:4 pairs) and sub-row indices; one expert stack
// with TOKENS rows split evenly over EXPERTS; CUDA-event timing, median of REPS launches
// rotating over enough weight copies to defeat the L2.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../ffi/cuda_ops.cu"

#define CHECK(x)                                                                    \
  do {                                                                              \
    cudaError_t e_ = (x);                                                           \
    if (e_ != cudaSuccess) {                                                        \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

int main(int argc, char** argv) {
  if (argc < 7) {
    std::fprintf(stderr, "usage: %s K M TOKENS N V SUB_ROW [EXPERTS] [REPS]\n", argv[0]);
    return 2;
  }
  const int K = std::atoi(argv[1]), M = std::atoi(argv[2]), T = std::atoi(argv[3]);
  const int n = std::atoi(argv[4]), v = std::atoi(argv[5]), L = std::atoi(argv[6]);
  const int E = argc > 7 ? std::atoi(argv[7]) : 1, reps = argc > 8 ? std::atoi(argv[8]) : 50;
  const int Mk = M / v * n;
  const size_t vals = size_t(E) * Mk * (K / 2), words = size_t(E) * Mk * (K / 32),
               idxs = size_t(E) * Mk * (K / L);
  const size_t wbytes = vals * 2 + words * 4 + idxs;
  const int copies = std::max<int>(1, int((200u << 20) / wbytes) + 1);  // > L2
  std::mt19937 rng(0);
  std::vector<uint16_t> hv(vals), hx(size_t(T) * K);
  for (auto& h : hv) h = 0x3C00 ^ (rng() & 0x80FF);  // bf16 values near +-1
  for (auto& h : hx) h = 0x3C00 ^ (rng() & 0x80FF);
  const uint32_t nibbles[6] = {0x4, 0x8, 0xC, 0x9, 0xD, 0xE};
  std::vector<uint32_t> hm(words);
  for (auto& w : hm) {
    w = 0;
    for (int g = 0; g < 8; ++g) w |= nibbles[rng() % 6] << (4 * g);
  }
  std::vector<uint8_t> hi(idxs);
  for (auto& i : hi) i = rng() % v;
  std::vector<int32_t> gs(E, T / E);
  gs[0] += T - (T / E) * E;

  std::vector<void*> dv(copies), dm(copies), di(copies);
  for (int c = 0; c < copies; ++c) {
    CHECK(cudaMalloc(&dv[c], vals * 2));
    CHECK(cudaMalloc(&dm[c], words * 4));
    CHECK(cudaMalloc(&di[c], idxs));
    CHECK(cudaMemcpy(dv[c], hv.data(), vals * 2, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(dm[c], hm.data(), words * 4, cudaMemcpyHostToDevice));
    CHECK(cudaMemcpy(di[c], hi.data(), idxs, cudaMemcpyHostToDevice));
  }
  void *dx, *dout, *dgs;
  CHECK(cudaMalloc(&dx, hx.size() * 2));
  CHECK(cudaMalloc(&dout, size_t(T) * M * 2));
  CHECK(cudaMalloc(&dgs, E * 4));
  CHECK(cudaMemcpy(dx, hx.data(), hx.size() * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(dgs, gs.data(), E * 4, cudaMemcpyHostToDevice));

  auto args = [&](int c) {
    return samoyeds::Args{dx, dv[c], static_cast<uint8_t*>(di[c]), static_cast<uint32_t*>(dm[c]),
                          nullptr, static_cast<int32_t*>(dgs), dout, T, K, M, E, Mk, T, L,
                          false};
  };
  auto launch = [&](int c) {
    cudaError_t err = samoyeds::Dispatch<__nv_bfloat16>(0, args(c), n, v);
    CHECK(err);
  };
  for (int i = 0; i < 3; ++i) launch(i % copies);
  CHECK(cudaDeviceSynchronize());
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  std::vector<float> ms;
  for (int i = 0; i < reps; ++i) {
    CHECK(cudaEventRecord(a));
    launch(i % copies);
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float t;
    CHECK(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  const double med = ms[ms.size() / 2] * 1e-3;
  const double bytes = double(wbytes) + double(T) * K * 2 + double(T) * M * 2;
  std::printf("K=%d M=%d T=%d E=%d %d:%d L=%d  median %.2f us  %.0f GB/s  %.1f dense-equiv TFLOP/s\n",
              K, M, T, E, n, v, L, med * 1e6, bytes / med / 1e9, 2.0 * T * K * M / med / 1e12);
  return 0;
}
