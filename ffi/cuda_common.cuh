// Pieces shared by the two CUDA kernels of the sparse ragged dot (the warp-level mma.sp
// kernel in mma_sp.cuh, the Hopper wgmma.sp kernel in wgmma_sp.cuh): the launch
// arguments, the device-side tile schedule, async copies, the sub-row index stage and
// the epilogue. Both kernels compute C^T[M, R] = A[M, K] * X^T[K, R] per expert, with the
// sparse weight as the A operand and the routed rows as the N dimension.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "format.h"
#include "glu.h"

namespace samoyeds::cuda {

struct Args {
  const void* x;
  const void* values;
  const uint8_t* indices;
  const uint32_t* metadata;
  const int32_t* sel;
  const int32_t* group_sizes;
  void* out;
  int tokens, k, m, experts, kept_rows, rows, sub_row;
  bool has_sel;
  int glu;       // kGluNone, or the activation of a fused GLU (glu.h)
  int out_cols;  // columns of out: M, or M / 2 with a fused GLU
  bool m_fast = false;  // grid order, set by TileGrid: M tiles along x, row tiles along y
  int raster = 0;       // row tiles per raster group (BlockTile); 0: TileGrid picks
};

// The kept rows one block computes and the output columns it owns. A tile has BM rows
// in two halves: tile row r < BM / 2 is kept row kept0 + r, and r >= BM / 2 is kept row
// kept0 + skip + r. Without a GLU skip is 0 (BM consecutive kept rows). With a fused
// GLU the kept rows are [gate | up] halves of Mk / 2 rows, and the upper half holds the
// up rows behind the same output columns as the lower half's gate rows
// (skip = Mk / 2 - BM / 2), so one block finds both factors of act(gate) * up in its
// own epilogue tile: tile columns c (gate) and c + GluPairCols (up).
struct RowTile {
  int kept0, skip;
  int lo, hi;     // kept rows present in the lower / upper half (multiples of kRowTile)
  int out0;       // first column of out
  int out_here;   // columns of out the tile owns
};
template <int BM, int N, int V>
__device__ __forceinline__ RowTile TileRows(const Args& a, int y) {
  static_assert(BM % (2 * kRowTile) == 0, "tile halves are whole row tiles");
  constexpr int kHalf = BM / 2;
  if (a.glu == kGluNone) {
    const int kept0 = y * BM, here = min(BM, a.kept_rows - kept0);
    return {kept0, 0, min(here, kHalf), max(here - kHalf, 0), kept0 / N * V, here / N * V};
  }
  const int half = a.kept_rows / 2, kept0 = y * kHalf, here = min(kHalf, half - kept0);
  return {kept0, half - kHalf, here, here, kept0 / N * V, here / N * V};
}
template <int BM>
__device__ __forceinline__ bool RowPresent(const RowTile& t, int r) {
  return r < BM / 2 ? r < t.lo : r - BM / 2 < t.hi;
}
template <int BM>
__device__ __forceinline__ int KeptRow(const RowTile& t, int r) {
  return t.kept0 + r + (r >= BM / 2 ? t.skip : 0);
}
// Distance in epilogue-tile columns between an output column's gate and up factors.
template <int BM, int N, int V>
constexpr int GluPairCols() { return BM / 2 / N * V; }
// Grid y extent of TileRows.
template <int BM>
inline int MTiles(const Args& a) {
  if (a.glu == kGluNone) return (a.kept_rows + BM - 1) / BM;
  return (a.kept_rows / 2 + BM / 2 - 1) / (BM / 2);
}

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
// clusters need sm_90).
template <typename Kernel>
cudaError_t LaunchClusters(cudaStream_t stream, Kernel kernel, dim3 grid, int threads,
                           int smem, dim3 cluster, const Args& a) {
  if (cluster.x * cluster.y * cluster.z == 1) {
    kernel<<<grid, threads, smem, stream>>>(a);
    return cudaGetLastError();
  }
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = cluster.x;
  attr.val.clusterDim.y = cluster.y;
  attr.val.clusterDim.z = cluster.z;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, kernel, a);
}

// Metadata for MMA rows that hold no kept row (their values are zero): positions 0 and 1
// in every group, a valid ordered pattern.
constexpr uint32_t kFillerMeta = 0x44444444u;
// Shared memory for the block's sub-row indices (N:V with V > 1), after the pipeline: at
// most this much (the warp-level kernel reserves only what its launch needs).
constexpr int kIndexStageBytes = 16 * 1024;
// Dense K of one sparse MMA k-step (m16n8k32 and m64nNk32 alike): one metadata word.
constexpr int kStepK = 32;
static_assert(kStepK == kMetaColsPerWord, "one metadata word per MMA k-step");

// The dynamic shared memory this launch was given.
__device__ __forceinline__ int DynamicSmemBytes() {
  uint32_t r;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
  return static_cast<int>(r);
}

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; src_bytes == 0 fills zeros without reading global memory.
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
// 16-byte async copy issued only when `pred` holds (no branch, no zero fill).
__device__ __forceinline__ void CpAsync16If(uint32_t dst, const void* src, bool pred) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.b32 p, %2, 0;\n"
      " @p cp.async.cg.shared.global [%0], [%1], 16;\n}\n" ::"r"(dst),
      "l"(src), "r"(static_cast<int>(pred)));
}
__device__ __forceinline__ void CpAsync4(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
// Four 8x8 b16 matrices from shared memory: lane l gives the address of row l % 8 of
// matrix l / 8 and receives, per matrix, row l / 4, columns 2 (l % 4) + {0, 1}.
__device__ __forceinline__ void LdMatrixX4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Which (expert, row tile) this block computes, from group_sizes on the device.
// Negative sizes count as 0 and ranges are clipped to the R output rows, so a bad
// group_sizes can never make the kernel touch memory outside its buffers.
struct Work {
  int expert;     // -1: a zero-fill tile of rows past sum(group_sizes)
  int row_begin;  // first output row of this tile
  int row_end;    // one past the last valid output row of this tile
};

template <int BN>
__device__ Work FindWork(const Args& a, int tile) {
  int seen = 0, row = 0;
  for (int e = 0; e < a.experts; ++e) {
    const int size = min(max(__ldg(a.group_sizes + e), 0), a.rows - row);
    const int tiles = (size + BN - 1) / BN;
    if (tile < seen + tiles) {
      const int begin = row + (tile - seen) * BN;
      return {e, begin, min(begin + BN, row + size)};
    }
    seen += tiles;
    row += size;
  }
  const int begin = row + (tile - seen) * BN;
  return {-1, begin, min(begin + BN, a.rows)};
}

// Row tiles of BN for any group sizes: sum_e ceil(size_e / BN) expert tiles plus
// ceil((R - sum) / BN) zero-fill tiles is at most (R + (E + 1)(BN - 1)) / BN, and at most
// R (no needed tile is empty).
template <int BN>
inline unsigned RowTiles(const Args& a) {
  const int64_t r = a.rows;
  return static_cast<unsigned>(
      std::max<int64_t>(1, std::min(r, (r + (int64_t{a.experts} + 1) * (BN - 1)) / BN)));
}

// Activation bytes one raster group of row tiles keeps hot in the L2 (BlockTile).
constexpr int64_t kRasterBytes = int64_t{8} << 20;

// The launch grid (x, y, splits) of BN x BM tiles, and its order (a.m_fast, a.raster).
// Prefill shapes run in raster groups: the blocks of a group cover `raster` row tiles
// (~kRasterBytes of activations) and every M tile, row tiles fastest, so the blocks
// running together share weight tiles and the group's activation rows stay in the L2
// while its weights stream past. One group over every row tile (the order before v18)
// re-read the activations from DRAM at every wave: 1:2 at 4096 tokens read ~620 MB for
// ~180 MB of data (NOTES.md, v18). Decode shapes have few row tiles per expert and most
// of the bound's tiles turn out empty; there the M tiles run along x, so the empty blocks
// come last in the launch instead of holding SM slots between the busy ones (v15).
template <int BN, int BM>
inline dim3 TileGrid(Args& a, unsigned splits = 1) {
  const unsigned rows = RowTiles<BN>(a), ms = static_cast<unsigned>(MTiles<BM>(a));
  a.m_fast = static_cast<int64_t>(a.rows) <= int64_t{2} * BN * a.experts && rows <= 65535;
  if (a.raster <= 0) {
    const int64_t tile_bytes = int64_t{BN} * a.k * 2;  // bf16 / fp16 rows
    a.raster = static_cast<int>(std::max<int64_t>(1, kRasterBytes / tile_bytes));
  }
  a.raster = std::min<int>(a.raster, static_cast<int>(rows));
  return a.m_fast ? dim3(ms, rows, splits) : dim3(rows, ms, splits);
}

// This block's row tile and M tile (TileGrid's order).
struct TileIndex {
  int row, m;
};
__device__ __forceinline__ TileIndex BlockTile(const Args& a) {
  if (a.m_fast) return {static_cast<int>(blockIdx.y), static_cast<int>(blockIdx.x)};
  // Launch order is x fastest: block `lin` of the (row tile, M tile) grid is item `in`
  // of raster group `group`, whose n row tiles run fastest.
  const int rows = gridDim.x, ms = gridDim.y;
  const int lin = blockIdx.y * rows + blockIdx.x;
  const int group = lin / (a.raster * ms), in = lin - group * a.raster * ms;
  const int row0 = group * a.raster, n = min(a.raster, rows - row0);
  return {row0 + in % n, in / n};
}

// Walks the 8-column groups of a [rows, vec] grid from item `first` in strides of
// `step` items, calling f(row, group): one division per thread, not per item.
template <typename F>
__device__ __forceinline__ void ForEachGroup(int rows, int vec, int first, int step, F&& f) {
  int n = first / vec, g = first % vec;
  const int dn = step / vec, dg = step % vec;
  while (n < rows) {
    f(n, g);
    n += dn;
    g += dg;
    if (g >= vec) {
      g -= vec;
      ++n;
    }
  }
}

// Rows past sum(group_sizes) are zero (written by the first block of a K-split cluster).
template <typename T, int kThreads>
__device__ void ZeroFillTile(const Args& a, const Work& work, int out0, int out_here) {
  if (blockIdx.z != 0) return;
  T* out = static_cast<T*>(a.out) + static_cast<int64_t>(work.row_begin) * a.out_cols + out0;
  ForEachGroup(work.row_end - work.row_begin, out_here / 8, threadIdx.x, kThreads,
               [&](int n, int g) {
                 *reinterpret_cast<uint4*>(out + static_cast<int64_t>(n) * a.out_cols + g * 8) =
                     make_uint4(0, 0, 0, 0);
               });
}

// Token id of each routed row of the tile, -1 when absent or an invalid SEL entry (read
// as a zero row: never an out-of-bounds read).
template <int BN, int kThreads>
__device__ void LoadSourceRows(const Args& a, const Work& work, int (&src_row)[BN]) {
  for (int i = threadIdx.x; i < BN; i += kThreads) {
    const int r = work.row_begin + i;
    int t = -1;
    if (r < work.row_end) {
      t = a.has_sel ? __ldg(a.sel + r) : r;
      if (t < 0 || t >= a.tokens) t = -1;
    }
    src_row[i] = t;
  }
}

// A loader's kPer copies of tile rows are BM / kPer rows apart, from a first row r0
// below that step. With kPer even, copy c lies in the tile's upper half iff
// c >= kPer / 2, known at compile time (UpperCopy); a single copy lies where r0 does, and
// its kept row and bound are resolved once (FirstKept, FirstLimit).
template <int kPer>
__device__ __forceinline__ constexpr bool UpperCopy(int c) {
  static_assert(kPer == 1 || kPer % 2 == 0, "copies split evenly over the tile halves");
  return kPer > 1 && c >= kPer / 2;
}
template <int kPer, int BM>
__device__ __forceinline__ int FirstKept(const RowTile& t, int r0) {
  return t.kept0 + r0 + (kPer == 1 && r0 >= BM / 2 ? t.skip : 0);
}
// The row bound of the lower half's copies (of a single copy: of r0's half).
template <int kPer, int BM>
__device__ __forceinline__ int FirstLimit(const RowTile& t, int r0) {
  return kPer == 1 && r0 >= BM / 2 ? BM / 2 + t.hi : t.lo;
}

// The warp-level kernel's loader (every thread loads; the Hopper kernel's producer
// warpgroup has its own, ProducerLoader in wgmma_sp.cuh). Copies one K stage of a
// block's tiles into shared memory with cp.async: the compressed values of its kept
// rows (A), the routed activation rows gathered through SEL (B), and the metadata
// words. Each thread's rows, columns and shared-memory offsets are fixed once, at
// construction; a stage only adds its K offset. Cfg gives the tile sizes and the
// shared-memory layouts: AOffset/BOffset(row, chunk) place 16-byte chunk `chunk` of a
// row, kBRowStride is the distance between rows 8 apart divided by 8 (the swizzles
// repeat every 8 rows), and a stage holds [A | B | metadata].
template <typename Cfg, typename T>
class StageLoader {
 public:
  static constexpr int kAChunks = Cfg::kARow / 16, kBChunks = Cfg::kBK * 2 / 16;
  static constexpr int kAPer = Cfg::kBM * kAChunks / Cfg::kThreads;     // 16-byte copies
  static constexpr int kBPer = Cfg::kBN * kBChunks / Cfg::kThreads;     // 16-byte copies
  static constexpr int kMPer = Cfg::kBM * Cfg::kSteps / Cfg::kThreads;  // 4-byte copies
  static_assert(kAPer * Cfg::kThreads == Cfg::kBM * kAChunks, "A copies divide evenly");
  static_assert(kBPer * Cfg::kThreads == Cfg::kBN * kBChunks, "B copies divide evenly");
  static_assert(kMPer * Cfg::kThreads == Cfg::kBM * Cfg::kSteps, "meta copies divide evenly");
  static constexpr int kARowStep = Cfg::kThreads / kAChunks;  // rows between a thread's copies
  static constexpr int kBRowStep = Cfg::kThreads / kBChunks;
  static constexpr int kMRowStep = Cfg::kThreads / Cfg::kSteps;
  static_assert(kARowStep % 8 == 0 && kBRowStep % 8 == 0, "row steps keep the swizzle");

  // values/meta: this expert's arrays; src_row: the tile's token ids (-1: absent).
  // Every copy's source row pointer and presence bit are resolved here, so a stage costs
  // an offset add and the copy itself per 16 bytes (the decode tile's K loop is an
  // instruction-latency chain: NOTES.md, v15).
  __device__ __forceinline__ StageLoader(const Args& a, const T* values, const uint32_t* meta,
                                         const int* src_row, const RowTile& tile, int rows_here)
      : a_(a) {
    const int half_k = a.k / 2, words = a.k / kMetaColsPerWord;
    const int tid = threadIdx.x;
    const int a_row = tid / kAChunks, a_chunk = tid % kAChunks;
    const int m_row = tid / Cfg::kSteps;
    m_word_ = tid % Cfg::kSteps;
    b_chunk_ = tid % kBChunks;
    a_col_ = a_chunk * 16;
    const int b_row = tid / kBChunks;
    a_dst_ = Cfg::AOffset(a_row, a_chunk);
    b_dst_ = Cfg::BOffset(b_row, b_chunk_);
    m_dst_ = m_row * Cfg::kMetaRow + m_word_ * 4;
    // Copies of the upper half start from a second base, the first moved by skip rows;
    // copy c's row is present iff row < limit of its half: the lower half holds rows
    // [0, lo), the upper [BM / 2, BM / 2 + hi). Absent rows keep a valid pointer and
    // copy zeros.
    const T* a_first =
        values + static_cast<int64_t>(FirstKept<kAPer, Cfg::kBM>(tile, a_row)) * half_k + a_chunk * 8;
    const uint32_t* m_first =
        meta + static_cast<int64_t>(FirstKept<kMPer, Cfg::kBM>(tile, m_row)) * words + m_word_;
    a_ok_ = ResolveCopies<kAPer, kARowStep>(tile, a_row, a_first, values, half_k, a_src_);
    m_ok_ = ResolveCopies<kMPer, kMRowStep>(tile, m_row, m_first, meta, words, m_src_);
#pragma unroll
    for (int c = 0; c < kBPer; ++c) {
      const int row = b_row + c * kBRowStep;
      b_tok_[c] = row < rows_here ? src_row[row] : -1;
    }
  }

  // Issues the copies of K stage `stage` into the stage buffer at shared address `dst`.
  __device__ __forceinline__ void Load(uint32_t dst, int stage) const {
    const uint32_t sa = dst, sb = sa + Cfg::kABytes, sm = sb + Cfg::kBBytes;
    // Sizes are read from the kernel parameters (constant bank), not kept in registers.
    const int k = a_.k;
    const int k0 = stage * Cfg::kBK;
    // Columns past K: only in the last stage of a K that is not a multiple of kBK (a
    // 16-byte A chunk covers 16 dense columns, a B chunk 8, a metadata word 32).
    const bool a_col_ok = k0 + a_col_ < k;
#pragma unroll
    for (int c = 0; c < kAPer; ++c) {
      const bool ok = ((a_ok_ >> c) & 1) && a_col_ok;
      CpAsync16(sa + a_dst_ + c * kARowStep * Cfg::kARow, a_src_[c] + k0 / 2, ok ? 16 : 0);
    }
    // Absent routed rows are not copied at all: their output columns are never stored,
    // so decode shapes move only the rows they have.
    const T* x = static_cast<const T*>(a_.x) + k0 + b_chunk_ * 8;
    const bool b_col_ok = k0 + b_chunk_ * 8 < k;
#pragma unroll
    for (int c = 0; c < kBPer; ++c) {
      const int t = b_tok_[c];
      CpAsync16If(sb + b_dst_ + c * kBRowStep * Cfg::kBRowStride,
                  x + static_cast<int64_t>(max(t, 0)) * k, t >= 0 && b_col_ok);
    }
    const bool m_col_ok = k0 + m_word_ * kMetaColsPerWord < k;
    const int word0 = k0 / kMetaColsPerWord;
#pragma unroll
    for (int c = 0; c < kMPer; ++c) {
      const bool ok = ((m_ok_ >> c) & 1) && m_col_ok;
      CpAsync4(sm + m_dst_ + c * kMRowStep * Cfg::kMetaRow, m_src_[c] + word0, ok ? 4 : 0);
    }
  }

 private:
  const Args& a_;  // the kernel's parameters
  // kPer copies of rows r0 + c * kRowStep from `first` (r0's row; rows of `row_len`
  // elements): each copy's source, or `base` when its row is absent; returns the presence
  // bits (bit c: copy c).
  template <int kPer, int kRowStep, typename E>
  static __device__ __forceinline__ uint32_t ResolveCopies(const RowTile& tile, int r0,
                                                           const E* first, const E* base,
                                                           int row_len, const E* (&src)[kPer]) {
    const int lim[2] = {FirstLimit<kPer, Cfg::kBM>(tile, r0), Cfg::kBM / 2 + tile.hi};
    uint32_t ok_bits = 0;
#pragma unroll
    for (int c = 0; c < kPer; ++c) {
      const bool up = UpperCopy<kPer>(c);
      const bool ok = r0 + c * kRowStep < lim[up];
      ok_bits |= static_cast<uint32_t>(ok) << c;
      src[c] = ok ? first + (static_cast<int64_t>(up ? tile.skip : 0) + c * kRowStep) * row_len
                  : base;
    }
    return ok_bits;
  }

  const T* a_src_[kAPer];  // per copy: its row's first column of this thread's chunk
  const uint32_t* m_src_[kMPer];
  uint32_t a_ok_, m_ok_;   // bit c: copy c's row is present
  int a_col_, b_chunk_, m_word_;
  uint32_t a_dst_, b_dst_, m_dst_;
  int b_tok_[kBPer];
};

// The block's sub-row indices for windows [w0, w0 + wc) of its tile's kept rows (idx:
// the expert's [Mk, windows] bytes), staged in shared memory once as [tile row, wc] when
// they fit, so per-window reads never wait on global memory. Every load of a thread is
// issued before its first store (one memory round trip instead of one per byte: the
// block's K loop waits on this). Returns whether they were staged (the caller syncs
// before reading). `capacity`: bytes reserved at idx_smem, at most kIndexStageBytes.
// Threads tid = 0 .. kThreads - 1 of the block share the work.
template <int BM, int kThreads>
__device__ bool StageIndices(const uint8_t* idx, const RowTile& t, uint8_t* idx_smem,
                             int windows, int w0, int wc, int capacity, int tid) {
  const int rows = t.hi > 0 ? BM / 2 + t.hi : t.lo;  // tile rows spanned
  if (rows * wc > capacity) return false;
  // Byte i of the staged tile: the lower half's span below n_lo, the upper's from it
  // (selects, not a runtime-indexed array, which would live in local memory).
  const uint8_t* src_lo = idx + static_cast<int64_t>(KeptRow<BM>(t, 0)) * windows + w0;
  const uint8_t* src_hi = idx + static_cast<int64_t>(KeptRow<BM>(t, BM / 2)) * windows + w0;
  uint8_t* dst_hi = idx_smem + BM / 2 * wc;
  const int n_lo = t.lo * wc, n = n_lo + t.hi * wc;  // bytes: lower half, both halves
  if (wc == windows && windows % 16 == 0) {
    // Whole rows of 16-byte multiples: both halves are contiguous, 16-byte aligned spans.
    constexpr int kPer = (kIndexStageBytes / 16 + kThreads - 1) / kThreads;
    uint4 v[kPer];
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int i = (tid + u * kThreads) * 16;
      const uint8_t* p = i < n_lo ? src_lo + i : src_hi + (i - n_lo);
      if (i < n) v[u] = __ldg(reinterpret_cast<const uint4*>(p));
    }
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int i = (tid + u * kThreads) * 16;
      uint8_t* p = i < n_lo ? idx_smem + i : dst_hi + (i - n_lo);
      if (i < n) *reinterpret_cast<uint4*>(p) = v[u];
    }
    return true;
  }
  constexpr int kBatch = 8;
  for (int first = tid; first < n; first += kBatch * kThreads) {
    uint8_t v[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = first + u * kThreads, j = i < n_lo ? i : i - n_lo;
      if (i < n) v[u] = __ldg((i < n_lo ? src_lo : src_hi) + j / wc * windows + j % wc);
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int i = first + u * kThreads;
      if (i < n) *(i < n_lo ? idx_smem + i : dst_hi + (i - n_lo)) = v[u];
    }
  }
  return true;
}

// The value, opaque to the compiler (it cannot recompute it from its inputs, so it
// stays in a register).
__device__ __forceinline__ uint32_t Pinned(uint32_t v) {
  asm volatile("" : "+r"(v));
  return v;
}

// Exchanges a and b when swap holds, with two selects. Written in PTX so the compiler
// cannot turn it into a branch: a branchy exchange of loop-carried registers makes
// it copy the wgmma accumulators at the loop latch, which serializes the wgmmas.
// kRename: a (the front, a wgmma accumulator) is selected in place and b's new value is
// formed first in a fresh register; in a loop unrolled over stage pairs ptxas then
// renames b instead of copying it (no move per exchange), but elsewhere the extra live
// register costs spills (the V = 4 kernels).
template <bool kRename = false>
__device__ __forceinline__ void SwapIf(float& a, float& b, bool swap) {
  // In-out operands (never an output aliasing an input that is read later).
  if constexpr (kRename)
    asm("{\n .reg .pred p;\n .reg .f32 t;\n setp.ne.b32 p, %2, 0;\n selp.f32 t, %0, %1, p;\n"
        " selp.f32 %0, %1, %0, p;\n mov.f32 %1, t;\n}\n"
        : "+f"(a), "+f"(b)
        : "r"(static_cast<int>(swap)));
  else
    asm("{\n .reg .pred p;\n .reg .f32 t;\n setp.ne.b32 p, %2, 0;\n mov.f32 t, %0;\n"
        " selp.f32 %0, %1, %0, p;\n selp.f32 %1, t, %1, p;\n}\n"
        : "+f"(a), "+f"(b)
        : "r"(static_cast<int>(swap)));
}

// Swap-to-front N:V steering. acc[0] is always the candidate output row the current
// window adds to; slot[h][c] says which candidate acc[c] holds for the lane's row h
// (rows g and g + 8 of an MMA fragment). At a window boundary the new window's
// candidate is swapped to the front with 2 selects per accumulator.
// PlanSteer decides the exchanges (c = 1, ..., V - 1 in order) and updates slot;
// ApplySteer makes them on one set of accumulators (several sets can share one plan).
template <int V, typename Slot>
__device__ __forceinline__ void PlanSteer(Slot (&slot)[2][V], const uint8_t (&sub)[2],
                                          bool (&swap)[2][V]) {
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int c = 1; c < V; ++c) {
      swap[h][c] = slot[h][c] == sub[h];
      const Slot held = slot[h][0];
      slot[h][0] = swap[h][c] ? slot[h][c] : held;
      slot[h][c] = swap[h][c] ? held : slot[h][c];
    }
}
//   acc: [V][kFrags][4] of one m16 fragment row (q = 2h, 2h+1 belong to row h).
template <int V, int kFrags, bool kRename = false>
__device__ __forceinline__ void ApplySteer(float (&acc)[V][kFrags][4], const bool (&swap)[2][V]) {
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int c = 1; c < V; ++c)
#pragma unroll
      for (int j = 0; j < kFrags; ++j)
#pragma unroll
        for (int q = 2 * h; q < 2 * h + 2; ++q)
          SwapIf<kRename>(acc[0][j][q], acc[c][j][q], swap[h][c]);
}
template <int V, int kFrags, typename Slot>
__device__ __forceinline__ void SteerToFront(float (&acc)[V][kFrags][4], Slot (&slot)[2][V],
                                             const uint8_t (&sub)[2]) {
  bool swap[2][V];
  PlanSteer<V>(slot, sub, swap);
  ApplySteer<V, kFrags>(acc, swap);
}

// Epilogue, part 1: one m16 fragment row of accumulators -> shared c_tile[routed row]
// [output row] (fp32). kept: the lane's two kept rows (block-relative); n0: the first
// routed column of the lane's fragments; slot_n: which of the N kept rows of a block
// is written in this pass (the N passes add up, separated by barriers).
template <int N, int V, int kFrags, int kCStride, typename Slot>
__device__ __forceinline__ void AccToShared(const float (&acc)[V][kFrags][4],
                                            const Slot (&slot)[2][V], const int (&kept)[2],
                                            int n0, int tq, int slot_n, float* c_tile) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if (kept[h] % N != slot_n) continue;
    const int block_row = kept[h] / N * V;
#pragma unroll
    for (int j = 0; j < kFrags; ++j)
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int n = n0 + j * 8 + 2 * tq + q;
#pragma unroll
        for (int c = 0; c < V; ++c) {
          float& dst = c_tile[n * kCStride + block_row + (V > 1 ? slot[h][c] : 0)];
          dst = (slot_n == 0 ? 0.0f : dst) + acc[c][j][2 * h + q];
        }
      }
  }
}

// kN consecutive outputs converted to T, one kN * sizeof(T)-byte store (dst aligned to it).
template <typename T, int kN>
__device__ __forceinline__ void StoreVec(T* dst, const float (&v)[kN]) {
  static_assert(sizeof(T) == 2 && (kN == 2 || kN == 4 || kN == 8), "4-, 8- or 16-byte stores");
  using Vec = std::conditional_t<kN == 2, uint32_t, std::conditional_t<kN == 4, uint2, uint4>>;
  alignas(sizeof(Vec)) T packed[kN];
#pragma unroll
  for (int q = 0; q < kN; ++q) packed[q] = static_cast<T>(v[q]);
  *reinterpret_cast<Vec*>(dst) = *reinterpret_cast<const Vec*>(packed);
}

// Epilogue, part 2: shared fp32 tile -> out rows with 16-byte stores. With a fused GLU
// output column c is act(tile column c) * tile column c + kPair (TileRows).
// tid: the thread's index among the kThreads that store.
template <typename T, int kThreads, int kCStride, int kPair, bool kGlu>
__device__ __forceinline__ void StoreTile(const Args& a, const Work& work, int out0,
                                          int out_here, const float* c_tile, int tid) {
  T* out = static_cast<T*>(a.out) + static_cast<int64_t>(work.row_begin) * a.out_cols + out0;
  ForEachGroup(work.row_end - work.row_begin, out_here / 8, tid, kThreads, [&](int n, int g) {
    const float* src = c_tile + n * kCStride + g * 8;
    float v[8];
#pragma unroll
    for (int q = 0; q < 8; ++q)
      v[q] = kGlu ? GluActivation(src[q], a.glu) * src[kPair + q] : src[q];
    StoreVec<T, 8>(out + static_cast<int64_t>(n) * a.out_cols + g * 8, v);
  });
}
template <typename T, int kThreads, int kCStride, int kPair>
__device__ __forceinline__ void SharedToOut(const Args& a, const Work& work, int out0,
                                            int out_here, const float* c_tile, int tid) {
  if (a.glu == kGluNone)
    StoreTile<T, kThreads, kCStride, kPair, false>(a, work, out0, out_here, c_tile, tid);
  else
    StoreTile<T, kThreads, kCStride, kPair, true>(a, work, out0, out_here, c_tile, tid);
}

// The cluster's barrier (sm_90): every thread of every block of the cluster arrives,
// with release/acquire ordering of shared-memory writes across the cluster.
__device__ __forceinline__ void ClusterSync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cooperative_groups::this_cluster().sync();
#endif
}

// Epilogue of a K-split cluster (sm_90, dims (1, 1, splits)): every block holds a
// partial fp32 tile at the same shared-memory offset; each block takes a share of the
// tile's 8-column groups, sums the splits through distributed shared memory (in rank
// order: the result does not depend on scheduling), applies a fused GLU (columns c and
// c + kPair, as SharedToOut) and stores. Called by kThreads threads (tid in
// [0, kThreads)) of every block, after ClusterSync; the caller syncs the cluster again
// before any block exits.
template <typename T, int kThreads, int kCStride, int kPair>
__device__ __forceinline__ void ClusterEpilogue(const Args& a, const Work& work, int out0,
                                                int out_here, float* c_tile, int tid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  const int splits = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const bool glu = a.glu != kGluNone;
  T* out = static_cast<T*>(a.out) + static_cast<int64_t>(work.row_begin) * a.out_cols + out0;
  ForEachGroup(work.row_end - work.row_begin, out_here / 8, rank * kThreads + tid,
               splits * kThreads, [&](int n, int g) {
    float sum[2][8] = {};  // [gate or plain, up]
    for (int z = 0; z < splits; ++z) {
      const float* tile = z == rank ? c_tile : cluster.map_shared_rank(c_tile, z);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (h == 1 && !glu) break;
        const float4* src =
            reinterpret_cast<const float4*>(tile + n * kCStride + g * 8 + h * kPair);
        const float4 lo = src[0], hi = src[1];
        sum[h][0] += lo.x; sum[h][1] += lo.y; sum[h][2] += lo.z; sum[h][3] += lo.w;
        sum[h][4] += hi.x; sum[h][5] += hi.y; sum[h][6] += hi.z; sum[h][7] += hi.w;
      }
    }
    float v[8];
#pragma unroll
    for (int q = 0; q < 8; ++q)
      v[q] = glu ? GluActivation(sum[0][q], a.glu) * sum[1][q] : sum[0][q];
    StoreVec<T, 8>(out + static_cast<int64_t>(n) * a.out_cols + g * 8, v);
  });
#endif
}

}  // namespace samoyeds::cuda
