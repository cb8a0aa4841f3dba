// Standalone driver of the CUDA kernel (no JAX) for ncu and kernel-only timing:
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -DSAMOYEDS_SM90A -Iffi \
//        benchmarks/kernel_harness.cu -o harness
//   [HARNESS_RASTER=n] [HARNESS_SPLITS=s] [HARNESS_ABLATE=1] ./harness K M TOKENS N V SUB_ROW [EXPERTS] [REPS] [GLU]
// (GLU 1: SwiGLU fused into the epilogue, out [T, M/2] = silu(gate) * up of M = [gate | up])
// Random values, metadata (valid sorted 2:4 pairs) and sub-row indices; one expert stack
// with TOKENS rows split evenly over EXPERTS; CUDA-event timing, median of 5 batches of REPS back-to-back launches
// rotating over enough weight copies to defeat the L2, of every kernel (warp-level and,
// on Hopper, the prefill and serving wgmma.sp kernels), and a comparison of their outputs.
// Built with -DSAMOYEDS_TIMELINE (and -Ibenchmarks): the serving kernel's phase timeline too
// (timeline_report.cuh).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "cuda/dispatch.cuh"
#include "launch_timing.cuh"
#ifdef SAMOYEDS_TIMELINE
#include "timeline_report.cuh"
#endif

#ifdef HARNESS_VARIANTS
// The serving blocks launched with programmatic stream serialization: each launch's blocks
// start during the previous launch's tail (StreamCfg::kProgrammatic).
struct NarrowPdl : samoyeds::cuda::StreamNarrowCfg<2> {
  static constexpr bool kProgrammatic = true;
};
struct WidePdl : samoyeds::cuda::StreamWideCfg<2> {
  static constexpr bool kProgrammatic = true;
};
// Two producer warps sharing a stage's routed-row and metadata copies.
template <typename Base>
struct TwoProducers : Base {
  static constexpr int kProducerThreads = 64;
  static constexpr int kThreads = Base::kConsumerThreads + kProducerThreads;
};
// The wide block's routed rows as two N = 32 halves (StreamCfg::kHalves).
template <typename Base>
struct Halves : Base {
  static constexpr bool kHalves = true;
};
// Ablations (StreamCfg::kSkip; outputs not checked): where a block's time goes.
template <typename Base, int Skip>
struct Skipping : Base {
  static constexpr int kSkip = Skip;
};
#endif

int main(int argc, char** argv) {
  if (argc < 7) {
    std::fprintf(stderr, "usage: %s K M TOKENS N V SUB_ROW [EXPERTS] [REPS] [GLU]\n", argv[0]);
    return 2;
  }
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // lines show up even if a kernel hangs later
  const int K = std::atoi(argv[1]), M = std::atoi(argv[2]), T = std::atoi(argv[3]);
  const int n = std::atoi(argv[4]), v = std::atoi(argv[5]), L = std::atoi(argv[6]);
  const int E = argc > 7 ? std::atoi(argv[7]) : 1, reps = argc > 8 ? std::atoi(argv[8]) : 50;
  const int glu = argc > 9 ? std::atoi(argv[9]) : 0;
  const int out_cols = glu ? M / 2 : M;
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
  // Sub-row indices as encode makes them: per block and window, N distinct increasing.
  std::vector<uint8_t> hi(idxs);
  const int windows = K / L;
  for (size_t blk = 0; blk < size_t(E) * Mk / n; ++blk)
    for (int w = 0; w < windows; ++w) {
      int pick[2] = {int(rng() % v), 0};
      if (n == 2) {
        pick[1] = int(rng() % (v - 1));
        if (pick[1] >= pick[0]) ++pick[1];
        if (pick[1] < pick[0]) std::swap(pick[0], pick[1]);
      }
      for (int j = 0; j < n; ++j) hi[(blk * n + j) * windows + w] = uint8_t(pick[j]);
    }
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

  // HARNESS_RASTER=n: raster groups of n row tiles instead of TileGrid's choice (a huge n
  // is the order before v18: one group).
  const int raster = std::getenv("HARNESS_RASTER") ? std::atoi(std::getenv("HARNESS_RASTER")) : 0;
  // HARNESS_SPLITS=s: K splits forced on the warp-level and serving kernels (Args::splits).
  const int splits = std::getenv("HARNESS_SPLITS") ? std::atoi(std::getenv("HARNESS_SPLITS")) : 0;
  auto args = [&](int c) {
    samoyeds::cuda::Args r{dx, dv[c], static_cast<uint8_t*>(di[c]),
                           static_cast<uint32_t*>(dm[c]), nullptr,
                           static_cast<int32_t*>(dgs), dout, T, K, M, E, Mk, T, L, false, glu, out_cols};
    r.raster = raster;
    r.splits = splits;
    return r;
  };
  using Path = samoyeds::KernelChoice;
  auto launch = [&](int c, Path path, cudaStream_t s) {
    CHECK(samoyeds::cuda::Dispatch<__nv_bfloat16>(s, args(c), n, v, path));
  };
  auto time_fn = [&](auto&& launch_copy) { return SecondsPerLaunch(launch_copy, copies, reps); };
  auto time_path = [&](Path path) {
    return time_fn([&](int c, cudaStream_t s) { launch(c, path, s); });
  };
  // The output of one path on weight copy 0, poisoned first so unwritten rows show.
  auto output_fn = [&](auto&& launch_copy) {
    CHECK(cudaMemset(dout, 0xFF, size_t(T) * out_cols * 2));  // bf16 0xFFFF is a NaN
    launch_copy(0, cudaStream_t{0});
    CHECK(cudaDeviceSynchronize());
    std::vector<uint16_t> h(size_t(T) * out_cols);
    CHECK(cudaMemcpy(h.data(), dout, h.size() * 2, cudaMemcpyDeviceToHost));
    return h;
  };
  auto output_of = [&](Path path) {
    return output_fn([&](int c, cudaStream_t s) { launch(c, path, s); });
  };
  auto bf16 = [](uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  };
  const double bytes = double(wbytes) + double(T) * K * 2 + double(T) * out_cols * 2;
  auto report = [&](const char* name, double med) {
    std::printf("%-6s K=%d M=%d T=%d E=%d %d:%d L=%d%s  median %.2f us  %.0f GB/s  %.1f dense-equiv TFLOP/s\n",
                name, K, M, T, E, n, v, L, glu ? " glu" : "", med * 1e6, bytes / med / 1e9,
                2.0 * T * K * M / med / 1e12);
  };
  {
    namespace sc = samoyeds::cuda;
    const bool small = int64_t(T) <= sc::kSmallTileMaxRowsPerExpert * E;
    const int splits = small ? sc::SplitsFor<sc::TileSmall>(args(0), (Mk + 31) / 32)
                             : sc::SplitsFor<sc::TileLarge>(args(0), (Mk + 63) / 64);
    std::printf("warp   K splits: %d\n", splits);
  }
  report("warp", time_path(Path::kWarp));
  // The two kernels accumulate in fp32 in different orders: agreement to a few bf16 ulps
  // of the output scale; a layout bug shows as O(1) differences or NaNs.
  const auto ref = output_of(Path::kWarp);
  auto compare = [&](const char* name, const std::vector<uint16_t>& h) {
    double max_diff = 0, max_ref = 0;
    size_t bad = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      const float a = bf16(ref[i]), b = bf16(h[i]);
      if (!std::isfinite(a) || !std::isfinite(b)) { ++bad; continue; }
      max_diff = std::max(max_diff, double(std::fabs(a - b)));
      max_ref = std::max(max_ref, double(std::fabs(a)));
    }
    std::printf("check  %s vs warp: max|diff| %.4g of max|out| %.4g (rel %.2e), non-finite %zu -> %s\n",
                name, max_diff, max_ref, max_diff / std::max(max_ref, 1e-30), bad,
                bad == 0 && max_diff <= 2e-2 * max_ref ? "OK" : "MISMATCH");
  };
  int major = 0;
  CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0));
  if (major == 9) {
    report("hopper", time_path(Path::kHopper));
    compare("hopper", output_of(Path::kHopper));
    report("stream", time_path(Path::kStream));
    compare("stream", output_of(Path::kStream));
#ifdef SAMOYEDS_TIMELINE
    ReportTimeline("stream", [&](int c, cudaStream_t s) { launch(c, Path::kStream, s); }, copies);
#endif
#ifdef HARNESS_VARIANTS
    // Block shapes under evaluation (docs/kernel_history.md), against the warp kernel's output.
    using Bf = __nv_bfloat16;
    namespace sc = samoyeds::cuda;
    struct Variant {
      const char* name;
      int n, v;
      cudaError_t (*fn)(cudaStream_t, const sc::Args&);
      bool check = true;  // false: an ablation, run (instead of the others) with HARNESS_ABLATE
    };
    using Narrow = sc::StreamNarrowCfg<2>;
    using Wide = sc::StreamWideCfg<2>;
    const Variant variants[] = {
        {"s16pdl", 1, 2, sc::LaunchStreamCfg<Bf, 1, 2, NarrowPdl>},
        {"s64pdl", 1, 2, sc::LaunchStreamCfg<Bf, 1, 2, WidePdl>},
        // serving-kernel shapes: consumers, N, blocks per SM (the others measured are in
        // docs/kernel_history.md)
        {"s16c1b4", 1, 2, sc::LaunchStreamCfg<Bf, 1, 2, sc::StreamCfgOf<2, 1, 16, 4>>},
        {"n-2p", 1, 2, sc::LaunchStreamCfg<Bf, 1, 2, TwoProducers<Narrow>>},
        {"w-2p", 1, 2, sc::LaunchStreamCfg<Bf, 1, 2, TwoProducers<Wide>>},
        {"w-halves", 1, 2, sc::LaunchStreamCfg<Bf, 1, 2, Halves<Wide>>},
        {"w-h2p", 1, 2, sc::LaunchStreamCfg<Bf, 1, 2, Halves<TwoProducers<Wide>>>},
        // ablations of the narrow (n) and wide (w) blocks: no metadata, no routed rows,
        // no MMAs, values alone, no K-split sum, values alone without the sum
        {"n-meta", 1, 2, sc::LaunchStreamCfg<Bf, 1, 2, Skipping<Narrow, 1>>, false},
        {"n-rows", 1, 2, sc::LaunchStreamCfg<Bf, 1, 2, Skipping<Narrow, 2>>, false},
        {"n-mma", 1, 2, sc::LaunchStreamCfg<Bf, 1, 2, Skipping<Narrow, 4>>, false},
        {"n-vals", 1, 2, sc::LaunchStreamCfg<Bf, 1, 2, Skipping<Narrow, 7>>, false},
        {"w-meta", 1, 2, sc::LaunchStreamCfg<Bf, 1, 2, Skipping<Wide, 1>>, false},
        {"w-rows", 1, 2, sc::LaunchStreamCfg<Bf, 1, 2, Skipping<Wide, 2>>, false},
        {"w-mma", 1, 2, sc::LaunchStreamCfg<Bf, 1, 2, Skipping<Wide, 4>>, false},
        {"w-vals", 1, 2, sc::LaunchStreamCfg<Bf, 1, 2, Skipping<Wide, 7>>, false},
        {"n-sum", 1, 2, sc::LaunchStreamCfg<Bf, 1, 2, Skipping<Narrow, 8>>, false},
        {"n-bare", 1, 2, sc::LaunchStreamCfg<Bf, 1, 2, Skipping<Narrow, 15>>, false},
        {"w-sum", 1, 2, sc::LaunchStreamCfg<Bf, 1, 2, Skipping<Wide, 8>>, false},
        {"w-bare", 1, 2, sc::LaunchStreamCfg<Bf, 1, 2, Skipping<Wide, 15>>, false},
    };
    const bool ablate = std::getenv("HARNESS_ABLATE") != nullptr;
    for (const Variant& var : variants) {
      if (var.n != n || var.v != v || var.check == ablate) continue;
      auto run = [&](int c, cudaStream_t s) { CHECK(var.fn(s, args(c))); };
      report(var.name, time_fn(run));
      if (var.check) compare(var.name, output_fn(run));
#ifdef SAMOYEDS_TIMELINE
      ReportTimeline(var.name, run, copies);
#endif
    }
#endif
  }
  return 0;
}
