// The time a kernel needs just to read N bytes from HBM on this GPU: the floor that a
// decode-shaped (weight-streaming) kernel cannot beat, launch and ramp included.
//   bash benchmarks/build.sh DIR stream_floor
//   ./stream_floor [MB ...]
//   ./stream_floor tiled ROWS ROW_BYTES SPLITS
//   ./stream_floor tma ROWS ROW_BYTES SPLITS
// Every thread keeps 8 independent 16-byte loads in flight (grid-stride, all SMs, 8
// blocks of 256 threads per SM); buffers are rotated past the 50 MB L2; timed like
// kernel_harness.cu (launch_timing.cuh), and the same bytes through cudaMemcpyAsync
// device-to-device (which also writes them).
// `tiled` reads a [ROWS, ROW_BYTES] weight in the serving kernel's order instead: one
// block per 64-row tile and K split, step by step along K, each step STEP bytes of each
// of the 64 rows (128 = one stage of compressed values; 256-2048 for comparison), 64 KB
// in flight per block; next to the contiguous read of the same bytes. It tells whether
// HBM serves the kernel's access pattern at the copy rate, and whether plain L2 prefetches
// of whole row spans (prefetch.global.L2) recover it.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <cuda_runtime.h>

#include "cuda/hopper/tensor_map.cuh"
#include "cuda/ptx.cuh"
#include "launch_timing.cuh"


constexpr int kUnroll = 8;

__global__ void __launch_bounds__(256) ReadAll(const uint4* __restrict__ src, size_t n16,
                                               uint4* sink) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  uint4 acc = {0, 0, 0, 0};
  size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (; i + (kUnroll - 1) * stride < n16; i += kUnroll * stride) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = __ldcs(src + i + u * stride);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      acc.x ^= v[u].x; acc.y ^= v[u].y; acc.z ^= v[u].z; acc.w ^= v[u].w;
    }
  }
  for (; i < n16; i += stride) {
    const uint4 v = __ldcs(src + i);
    acc.x ^= v.x; acc.y ^= v.y; acc.z ^= v.z; acc.w ^= v.w;
  }
  if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x9E3779B9u) sink[0] = acc;  // keeps the loads
}

constexpr int kTileRows = 64, kTiledLoads = 16, kTiledThreads = 256, kPrefetchSpan = 1024;

// Block b reads tile b / splits (64 rows), split b % splits of the row bytes, in steps of
// `step` bytes of every row; thread t takes 16-byte chunk t + 256 j of the sequence
// (step, row, chunk), 16 loads in flight. With `prefetch`, the load that starts a row's
// 1 KB span also asks the L2 for the row's next 1 KB (eight 128-byte lines at once), so
// HBM sees whole row spans while the loads stay 128 bytes wide.
__global__ void __launch_bounds__(kTiledThreads) ReadTiled(const uint8_t* __restrict__ src,
                                                           int row_bytes, int splits, int step,
                                                           bool prefetch, uint4* sink) {
  const int tile = blockIdx.x / splits, split = blockIdx.x % splits;
  const int steps = (row_bytes + step - 1) / step, per_split = (steps + splits - 1) / splits;
  const int c0 = split * per_split * step, c1 = min(row_bytes, c0 + per_split * step);
  if (c0 >= c1) return;
  const int chunks = step / 16, per_step = kTileRows * chunks;
  const int n = (c1 - c0 + step - 1) / step * per_step;
  const uint8_t* base = src + static_cast<size_t>(tile) * kTileRows * row_bytes + c0;
  uint4 acc = {0, 0, 0, 0};
  for (int i = threadIdx.x; i < n; i += kTiledLoads * kTiledThreads) {
    uint4 v[kTiledLoads];
#pragma unroll
    for (int u = 0; u < kTiledLoads; ++u) {
      const int idx = i + u * kTiledThreads;
      const int s = idx / per_step, r = idx % per_step / chunks, c = idx % chunks;
      const int col = s * step + c * 16;  // past c0, within the row
      if (prefetch && idx < n && c == 0 && col % kPrefetchSpan == 0) {
        const uint8_t* row = base + static_cast<size_t>(r) * row_bytes;
        for (int q = kPrefetchSpan; q < 2 * kPrefetchSpan; q += 128)
          if (c0 + col + q < c1) asm volatile("prefetch.global.L2 [%0];" ::"l"(row + col + q));
      }
      v[u] = idx < n && c0 + col < c1
                 ? __ldcs(reinterpret_cast<const uint4*>(base + static_cast<size_t>(r) * row_bytes + col))
                 : uint4{0, 0, 0, 0};
    }
#pragma unroll
    for (int u = 0; u < kTiledLoads; ++u) {
      acc.x ^= v[u].x; acc.y ^= v[u].y; acc.z ^= v[u].z; acc.w ^= v[u].w;
    }
  }
  if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x9E3779B9u) sink[0] = acc;
}

// Copies of a [rows, row_bytes] weight, enough to rotate past the L2 between reads, a
// timer over them, and the contiguous read of the same bytes (the modes' reference).
struct WeightCopies {
  int sms = 0;
  size_t bytes;
  int copies;
  std::vector<void*> buf;
  uint4* sink = nullptr;
  WeightCopies(int rows, int row_bytes)
      : bytes(static_cast<size_t>(rows) * row_bytes), copies(int((300u << 20) / bytes) + 2),
        buf(copies) {
    CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    for (auto& p : buf) {
      CHECK(cudaMalloc(&p, bytes));
      CHECK(cudaMemset(p, 1, bytes));
    }
    CHECK(cudaMalloc(&sink, 16));
  }
  ~WeightCopies() {
    for (auto& p : buf) CHECK(cudaFree(p));
    CHECK(cudaFree(sink));
  }
  template <typename F>
  double Us(F&& launch) const {  // launch(copy, stream)
    return SecondsPerLaunch(launch, copies, 40) * 1e6;
  }
  // Prints the layout and the contiguous read.
  void Header(int rows, int row_bytes, int splits, const char* how) const {
    const double us = Us([&](int c, cudaStream_t s) {
      ReadAll<<<sms * 8, 256, 0, s>>>(static_cast<const uint4*>(buf[c]), bytes / 16, sink);
    });
    std::printf("%7.1f MB as %d rows x %d bytes, %d blocks (64-row tiles x %d splits)%s\n",
                bytes / 1048576.0, rows, row_bytes, rows / kTileRows * splits, splits, how);
    std::printf("  contiguous read              %8.2f us %6.2f TB/s\n", us, bytes / us / 1e6);
  }
};

constexpr int kTmaBoxRows = kTileRows / 2, kTmaBlockSmem = 100 * 1024;

__global__ void __launch_bounds__(32) ReadTma(const __grid_constant__ CUtensorMap map,
                                              int row_bytes, int splits, int step, int depth,
                                              uint4* sink) {
  using namespace samoyeds::cuda;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t pad = (1024u - (SmemAddr(smem_raw) & 1023u)) & 1023u;
  const uint32_t ring = SmemAddr(smem_raw) + pad;
  const int tile = blockIdx.x / splits, split = blockIdx.x % splits;
  const int steps = row_bytes / step, per_split = (steps + splits - 1) / splits;
  const int s0 = split * per_split, n = min(steps, s0 + per_split) - s0;
  if (threadIdx.x != 0 || n <= 0) return;
  const int stage_bytes = kTileRows * step;
  const uint32_t bars = ring + depth * stage_bytes;
  for (int b = 0; b < depth; ++b) MbarInit(bars + 8 * b, 1);
  FenceMbarrierInit();
  auto issue = [&](int i) {
    const int buf = i % depth;
    const uint32_t dst = ring + buf * stage_bytes, bar = bars + 8 * buf;
    MbarArriveExpectTx(bar, stage_bytes);
    const int col = (s0 + i) * step / 2;
    TmaLoad2D(dst, &map, col, tile * kTileRows, bar);
    TmaLoad2D(dst + stage_bytes / 2, &map, col, tile * kTileRows + kTmaBoxRows, bar);
  };
  for (int i = 0; i < min(n, depth); ++i) issue(i);
  uint32_t acc = 0;
  for (int i = 0; i < n; ++i) {
    const int buf = i % depth;
    MbarWait(bars + 8 * buf, (i / depth) & 1);
    acc ^= *reinterpret_cast<const volatile uint32_t*>(smem_raw + pad + buf * stage_bytes);
    if (i + depth < n) issue(i + depth);
  }
  if (acc == 0x9E3779B9u) sink[0] = uint4{acc, 0, 0, 0};
}

// The tma mode: bulk tensor copies at 128-512 bytes per row and ring depths that hold
// 64-96 KB per block, next to the contiguous read.
int Tma(int rows, int row_bytes, int splits) {
  if (rows % kTileRows != 0 || row_bytes % 512 != 0 || splits < 1) {
    std::fprintf(stderr, "tma: ROWS a multiple of %d, ROW_BYTES of 512, SPLITS >= 1\n", kTileRows);
    return 2;
  }
  const auto encode = samoyeds::cuda::TensorMapEncoder();
  if (encode == nullptr) {
    std::fprintf(stderr, "tma: no tensor map encoder\n");
    return 1;
  }
  CHECK(cudaFuncSetAttribute(ReadTma, cudaFuncAttributeMaxDynamicSharedMemorySize, kTmaBlockSmem));
  const WeightCopies w(rows, row_bytes);
  w.Header(rows, row_bytes, splits, ", bulk tensor copies");
  const int cases[][2] = {{128, 8}, {128, 12}, {256, 4}, {256, 6}, {512, 2}, {512, 3}};
  for (const auto& c : cases) {
    const int step = c[0], depth = c[1];
    std::vector<CUtensorMap> maps(w.copies);
    for (int i = 0; i < w.copies; ++i) {
      const cuuint64_t dims[2] = {cuuint64_t(row_bytes / 2), cuuint64_t(rows)};
      const cuuint64_t strides[1] = {cuuint64_t(row_bytes)};
      const cuuint32_t box[2] = {cuuint32_t(step / 2), cuuint32_t(kTmaBoxRows)};
      const cuuint32_t unit[2] = {1, 1};
      if (encode(&maps[i], CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, w.buf[i], dims, strides, box, unit,
                 CU_TENSOR_MAP_INTERLEAVE_NONE,
                 step == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_NONE,
                 CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS) {
        std::fprintf(stderr, "tma: tensor map encoding failed (step %d)\n", step);
        return 1;
      }
    }
    const double us = w.Us([&](int i, cudaStream_t s) {
      ReadTma<<<rows / kTileRows * splits, 32, kTmaBlockSmem, s>>>(maps[i], row_bytes, splits,
                                                                   step, depth, w.sink);
    });
    std::printf("  %3d B per row, %2d stages (%3d KB) %8.2f us %6.2f TB/s\n", step, depth,
                depth * kTileRows * step / 1024, us, w.bytes / us / 1e6);
  }
  return 0;
}

// The tiled read of a [rows, row_bytes] weight at step widths 128-2048 bytes, and the
// contiguous read of the same bytes.
int Tiled(int rows, int row_bytes, int splits) {
  if (rows % kTileRows != 0 || row_bytes % 16 != 0 || splits < 1) {
    std::fprintf(stderr, "tiled: ROWS a multiple of %d, ROW_BYTES of 16, SPLITS >= 1\n", kTileRows);
    return 2;
  }
  const WeightCopies w(rows, row_bytes);
  w.Header(rows, row_bytes, splits, "");
  auto tiled = [&](int step, bool prefetch) {
    return w.Us([&](int c, cudaStream_t s) {
      ReadTiled<<<rows / kTileRows * splits, kTiledThreads, 0, s>>>(
          static_cast<const uint8_t*>(w.buf[c]), row_bytes, splits, step, prefetch, w.sink);
    });
  };
  for (int step = 128; step <= 2048 && step <= row_bytes; step *= 2) {
    const double us = tiled(step, false);
    std::printf("  tiled, %4d B per row %8.2f us %6.2f TB/s\n", step, us, w.bytes / us / 1e6);
  }
  const double pf_us = tiled(128, true);
  std::printf("  tiled, 128 B per row, the next 1 KB of each row prefetched to the L2 %8.2f us %6.2f TB/s\n",
              pf_us, w.bytes / pf_us / 1e6);
  return 0;
}

int main(int argc, char** argv) {
  if (argc > 1 && (std::string(argv[1]) == "tiled" || std::string(argv[1]) == "tma")) {
    if (argc != 5) {
      std::fprintf(stderr, "usage: %s tiled|tma ROWS ROW_BYTES SPLITS\n", argv[0]);
      return 2;
    }
    const int rows = std::atoi(argv[2]), row_bytes = std::atoi(argv[3]), splits = std::atoi(argv[4]);
    return std::string(argv[1]) == "tma" ? Tma(rows, row_bytes, splits) : Tiled(rows, row_bytes, splits);
  }
  std::vector<double> sizes_mb = {4, 8, 16, 33, 66, 117, 235};
  if (argc > 1) {
    sizes_mb.clear();
    for (int i = 1; i < argc; ++i) sizes_mb.push_back(std::atof(argv[i]));
  }
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  uint4* sink;
  CHECK(cudaMalloc(&sink, 16));
  for (double mb : sizes_mb) {
    const size_t bytes = size_t(mb * (1 << 20)) / 16 * 16;
    const int copies = int((300u << 20) / bytes) + 2;  // more than the L2 between reuses
    std::vector<void*> buf(copies);
    void* dst;
    for (auto& p : buf) {
      CHECK(cudaMalloc(&p, bytes));
      CHECK(cudaMemset(p, 1, bytes));
    }
    CHECK(cudaMalloc(&dst, bytes));
    auto time = [&](auto&& launch) { return SecondsPerLaunch(launch, copies, 40) * 1e6; };  // us
    const double read_us = time([&](int c, cudaStream_t s) {
      ReadAll<<<sms * 8, 256, 0, s>>>(static_cast<const uint4*>(buf[c]), bytes / 16, sink);
    });
    const double copy_us = time([&](int c, cudaStream_t s) {
      CHECK(cudaMemcpyAsync(dst, buf[c], bytes, cudaMemcpyDeviceToDevice, s));
    });
    std::printf("%7.1f MB  read kernel %8.2f us %6.2f TB/s   "
                "memcpy d2d %8.2f us %6.2f TB/s (read+write)\n",
                bytes / 1048576.0, read_us, bytes / read_us / 1e6, copy_us,
                2.0 * bytes / copy_us / 1e6);
    for (auto& p : buf) CHECK(cudaFree(p));
    CHECK(cudaFree(dst));
  }
  return 0;
}
