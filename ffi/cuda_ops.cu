// CUDA handler of the sparse ragged dot: the Samoyeds dual-side sparse x sparse kernel.
//
// out[r, :] = x[src(r), :] @ W_e(r) for every routed row r, all experts in one launch.
// Computed transposed, C^T[M, R] = A[M, K] * X^T[K, R], so the sparse weight is the
// mma.sp A operand (kept rows x K, compressed 2:4) and routed rows are the N dimension.
//   * mma.sp::ordered_metadata m16n8k32, fp32 accumulation;
//   * global -> shared through a multi-stage cp.async pipeline (values, metadata and
//     activation rows); shared -> registers through ldmatrix; metadata arrives in
//     hardware order (ffi/format.h), one aligned 32-bit word per lane covers two k-steps;
//   * the SEL gather is fused into the activation loads (per-row source addresses);
//   * N:V: each window's partial product of a kept row is steered into the accumulator
//     of the output row its sub-row index names (V accumulators per kept row);
//   * the tile schedule (expert, row tile) is derived on the device from group_sizes,
//     so there is no host sync and the handler is command-buffer safe;
//   * the epilogue goes through shared memory and writes [R, M] rows with 16-byte stores.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "format.h"
#include "problem.h"

namespace samoyeds {
namespace {

// A tile configuration; every size below derives from these.
template <int BM, int BN, int Stages, int WarpsM, int WarpsN>
struct TileCfg {
  static constexpr int kBM = BM;   // kept rows per block
  static constexpr int kBN = BN;   // routed rows per block
  static constexpr int kBK = 128;  // dense K per pipeline stage
  static constexpr int kStages = Stages;
  static constexpr int kWarpsM = WarpsM, kWarpsN = WarpsN;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kFragsM = kBM / kWarpsM / 16;  // m16 fragments per warp
  static constexpr int kFragsN = kBN / kWarpsN / 8;   // n8 fragments per warp
  static constexpr int kStepK = 32;                   // dense K of one mma.sp
  static constexpr int kSteps = kBK / kStepK;         // mma k-steps per stage
  static constexpr int kARow = kBK / 2 * 2;           // bytes of one compressed row per stage
  static constexpr int kBRow = kBK * 2;               // bytes of one activation row per stage
  static constexpr int kMetaRow = kSteps * 4;         // bytes of metadata per kept row per stage
  static constexpr int kABytes = kBM * kARow;
  static constexpr int kBBytes = kBN * kBRow;
  static constexpr int kMetaBytes = kBM * kMetaRow;
  static constexpr int kStageBytes = kABytes + kBBytes + kMetaBytes;
  static constexpr int kPipeBytes = kStages * kStageBytes;
  static_assert(kStepK == kMetaColsPerWord, "one metadata word per mma k-step");
  static_assert(kSteps % 2 == 0, "metadata words are consumed in selector pairs");
};
// Prefill: 64 kept rows x 64 routed rows, 4 warps of 32 x 32.
using TileLarge = TileCfg<64, 64, 3, 2, 2>;
// Decode (few rows per expert): 32 kept rows x 16 routed rows, 4 warps of 16 x 8, a
// deeper pipeline; twice the blocks of the prefill tile so one expert fills the GPU.
using TileSmall = TileCfg<32, 16, 4, 2, 2>;
// Shared memory for the block's sub-row indices (N:V with V > 1), after the pipeline.
constexpr int kIndexStageBytes = 16 * 1024;
template <typename Tile, int V>
constexpr int SmemBytes() { return Tile::kPipeBytes + (V > 1 ? kIndexStageBytes : 0); }
// Mean routed rows per expert up to which the decode tile is used (host-side choice
// from shapes only: group sizes stay on the device).
constexpr int64_t kSmallTileMaxRowsPerExpert = 32;

// Metadata for MMA rows that hold no kept row (their values are zero): positions 0 and 1
// in every group, a valid ordered pattern.
constexpr uint32_t kFillerMeta = 0x44444444u;

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
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void LdMatrixX4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T, int kSelector>
__device__ __forceinline__ void MmaSp(float (&d)[4], const uint32_t (&a)[4],
                                      const uint32_t (&b)[4], uint32_t meta) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, %13;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
          "r"(b[3]), "r"(meta), "n"(kSelector));
  } else {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, %13;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
          "r"(b[3]), "r"(meta), "n"(kSelector));
  }
}

// XOR swizzles of 16-byte chunks: ldmatrix's 8 row addresses land in distinct banks.
template <typename Tile>
__device__ __forceinline__ int SwizzleA(int row, int chunk) {
  return row * Tile::kARow + ((chunk ^ (row & 7)) << 4);
}
template <typename Tile>
__device__ __forceinline__ int SwizzleB(int row, int chunk) {
  return row * Tile::kBRow + ((chunk ^ (row & 7)) << 4);
}

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
};

// Which (expert, row tile) this block computes, from group_sizes on the device.
// Negative sizes count as 0 and ranges are clipped to the R output rows, so a bad
// group_sizes can never make the kernel touch memory outside its buffers.
struct Work {
  int expert;    // -1: a zero-fill tile of rows past sum(group_sizes)
  int row_begin; // first output row of this tile
  int row_end;   // one past the last valid output row of this tile
};

template <typename Tile>
__device__ Work FindWork(const Args& a, int tile) {
  int seen = 0, row = 0;
  for (int e = 0; e < a.experts; ++e) {
    const int size = min(max(__ldg(a.group_sizes + e), 0), a.rows - row);
    const int tiles = (size + Tile::kBN - 1) / Tile::kBN;
    if (tile < seen + tiles) {
      const int begin = row + (tile - seen) * Tile::kBN;
      return {e, begin, min(begin + Tile::kBN, row + size)};
    }
    seen += tiles;
    row += size;
  }
  const int begin = row + (tile - seen) * Tile::kBN;
  return {-1, begin, min(begin + Tile::kBN, a.rows)};
}

template <typename T, int N, int V, typename Tile>
__global__ void __launch_bounds__(Tile::kThreads)
    RaggedDotKernel(const Args a) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ int src_row[Tile::kBN];  // token id of each routed row, -1 when absent

  constexpr int kOutRows = Tile::kBM / N * V;  // output rows (of M) per block
  const int m_tile = blockIdx.y;
  const int kept0 = m_tile * Tile::kBM;
  const int kept_here = min(Tile::kBM, a.kept_rows - kept0);
  const int out0 = kept0 / N * V;
  const int out_here = kept_here / N * V;
  const Work work = FindWork<Tile>(a, blockIdx.x);
  if (work.row_begin >= work.row_end) return;
  T* out = static_cast<T*>(a.out);

  if (work.expert < 0) {  // rows past sum(group_sizes) are zero
    const int vec = out_here / 8;
    for (int i = threadIdx.x; i < (work.row_end - work.row_begin) * vec; i += Tile::kThreads) {
      const int r = work.row_begin + i / vec, c = out0 + (i % vec) * 8;
      *reinterpret_cast<uint4*>(out + static_cast<int64_t>(r) * a.m + c) = make_uint4(0, 0, 0, 0);
    }
    return;
  }

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp % Tile::kWarpsM, warp_n = warp / Tile::kWarpsM;
  const int e = work.expert;
  const int rows_here = work.row_end - work.row_begin;
  for (int i = tid; i < Tile::kBN; i += Tile::kThreads) {
    const int r = work.row_begin + i;
    int t = -1;
    if (r < work.row_end) {
      t = a.has_sel ? __ldg(a.sel + r) : r;
      if (t < 0 || t >= a.tokens) t = -1;  // an invalid SEL entry reads as a zero row
    }
    src_row[i] = t;
  }
  __syncthreads();

  const int half_k = a.k / 2, words = a.k / kMetaColsPerWord, windows = a.k / a.sub_row;
  const T* x = static_cast<const T*>(a.x);
  const T* values = static_cast<const T*>(a.values) + static_cast<int64_t>(e) * a.kept_rows * half_k;
  const uint32_t* meta = a.metadata + static_cast<int64_t>(e) * a.kept_rows * words;
  const uint8_t* indices = a.indices + static_cast<int64_t>(e) * a.kept_rows * windows;
  const int k_steps = a.k / Tile::kStepK;
  const int k_stages = (a.k + Tile::kBK - 1) / Tile::kBK;
  const uint32_t smem_base = SmemAddr(smem);

  // Each thread copies fixed chunks of every stage: its rows, columns and shared-memory
  // offsets are computed once here; a stage only adds its K offset.
  constexpr int kAChunks = Tile::kARow / 16, kBChunks = Tile::kBRow / 16;
  constexpr int kAPer = Tile::kBM * kAChunks / Tile::kThreads;       // 16-byte copies
  constexpr int kBPer = Tile::kBN * kBChunks / Tile::kThreads;       // 16-byte copies
  constexpr int kMPer = Tile::kBM * Tile::kSteps / Tile::kThreads;   // 4-byte copies
  static_assert(kAPer * Tile::kThreads == Tile::kBM * kAChunks, "A copies divide evenly");
  static_assert(kBPer * Tile::kThreads == Tile::kBN * kBChunks, "B copies divide evenly");
  static_assert(kMPer * Tile::kThreads == Tile::kBM * Tile::kSteps, "meta copies divide");
  constexpr int kARowStep = Tile::kThreads / kAChunks;  // rows between a thread's copies
  constexpr int kBRowStep = Tile::kThreads / kBChunks;
  constexpr int kMRowStep = Tile::kThreads / Tile::kSteps;
  const int a_row = tid / kAChunks, a_chunk = tid % kAChunks;
  const int b_row = tid / kBChunks, b_chunk = tid % kBChunks;
  const int m_row = tid / Tile::kSteps, m_word = tid % Tile::kSteps;
  // Swizzle depends on row & 7, identical for all of a thread's rows (steps are multiples of 8).
  static_assert(kARowStep % 8 == 0 && kBRowStep % 8 == 0, "row steps keep the swizzle");
  const uint32_t a_dst = SwizzleA<Tile>(a_row, a_chunk), b_dst = SwizzleB<Tile>(b_row, b_chunk);
  const uint32_t m_dst = m_row * Tile::kMetaRow + m_word * 4;
  const T* a_src = values + static_cast<int64_t>(kept0 + a_row) * half_k + a_chunk * 8;
  const uint32_t* m_src = meta + static_cast<int64_t>(kept0 + m_row) * words + m_word;
  int b_tok[kBPer];
#pragma unroll
  for (int c = 0; c < kBPer; ++c) {
    const int row = b_row + c * kBRowStep;
    b_tok[c] = row < rows_here ? src_row[row] : -1;
  }

  auto load_stage = [&](int stage, int buf) {
    const uint32_t sa = smem_base + buf * Tile::kStageBytes;
    const uint32_t sb = sa + Tile::kABytes;
    const uint32_t sm = sb + Tile::kBBytes;
    const int k0 = stage * Tile::kBK;
    const bool a_col_ok = k0 / 2 + a_chunk * 8 < half_k;
#pragma unroll
    for (int c = 0; c < kAPer; ++c) {
      const bool ok = a_col_ok && a_row + c * kARowStep < kept_here;
      const T* src = ok ? a_src + static_cast<int64_t>(c * kARowStep) * half_k + k0 / 2 : values;
      CpAsync16(sa + a_dst + c * kARowStep * Tile::kARow, src, ok ? 16 : 0);
    }
    // Activation rows through SEL; absent rows are not copied at all (their output
    // columns are never stored), so decode shapes move only the rows they have.
    const bool b_col_ok = k0 + b_chunk * 8 < a.k;
#pragma unroll
    for (int c = 0; c < kBPer; ++c) {
      const int t = b_tok[c];
      const T* src = x + static_cast<int64_t>(max(t, 0)) * a.k + k0 + b_chunk * 8;
      CpAsync16If(sb + b_dst + c * kBRowStep * Tile::kBRow, src, t >= 0 && b_col_ok);
    }
    const int word0 = k0 / kMetaColsPerWord;
#pragma unroll
    for (int c = 0; c < kMPer; ++c) {
      const bool ok = m_row + c * kMRowStep < kept_here && word0 + m_word < words;
      const uint32_t* src =
          ok ? m_src + static_cast<int64_t>(c * kMRowStep) * words + word0 : meta;
      CpAsync4(sm + m_dst + c * kMRowStep * Tile::kMetaRow, src, ok ? 4 : 0);
    }
  };

  // Accumulators: V per kept row, one per N:V candidate output row. acc[0] is always
  // the candidate the current window adds to; slot[i][h][c] says which candidate acc[c]
  // holds. At a window boundary the new window's candidate is swapped to the front with
  // 2 selects per accumulator (V = 2), instead of a separate partial sum per window.
  float acc[V][Tile::kFragsM][Tile::kFragsN][4];
#pragma unroll
  for (int v = 0; v < V; ++v)
#pragma unroll
    for (int i = 0; i < Tile::kFragsM; ++i)
#pragma unroll
      for (int j = 0; j < Tile::kFragsN; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[v][i][j][q] = 0.0f;
  uint8_t slot[Tile::kFragsM][2][V];
#pragma unroll
  for (int i = 0; i < Tile::kFragsM; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int c = 0; c < V; ++c) slot[i][h][c] = static_cast<uint8_t>(c);

  const int g = lane >> 2, tq = lane & 3;
  // Kept rows of this lane's accumulator entries (rows g and g + 8 of each fragment).
  int my_kept[Tile::kFragsM][2];
  bool frag_ok[Tile::kFragsM];
#pragma unroll
  for (int i = 0; i < Tile::kFragsM; ++i) {
    const int r0 = warp_m * (Tile::kBM / Tile::kWarpsM) + i * 16;
    frag_ok[i] = r0 < kept_here;  // kept_here is a multiple of 16
    my_kept[i][0] = r0 + g;
    my_kept[i][1] = r0 + g + 8;
  }
  // Sub-row index of each of this lane's kept rows in the current window.
  uint8_t sub[Tile::kFragsM][2];
  // The block's sub-row indices are one contiguous span of kept_here * windows bytes;
  // staged in shared memory once (behind the pipeline) when they fit, so the per-window
  // reads never wait on global memory.
  const uint8_t* idx_span = indices + static_cast<int64_t>(kept0) * windows;
  uint8_t* idx_smem = smem + Tile::kPipeBytes;
  const int idx_bytes = kept_here * windows;
  const bool idx_staged = V > 1 && idx_bytes <= kIndexStageBytes;
  if (idx_staged) {
#pragma unroll 8
    for (int i = tid; i < idx_bytes; i += Tile::kThreads) idx_smem[i] = __ldg(idx_span + i);
  }
  auto load_sub = [&](int window, uint8_t (&dst)[Tile::kFragsM][2]) {
#pragma unroll
    for (int i = 0; i < Tile::kFragsM; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int at = my_kept[i][h] * windows + window;
        const uint8_t raw = !frag_ok[i] ? 0 : idx_staged ? idx_smem[at] : __ldg(idx_span + at);
        dst[i][h] = static_cast<uint8_t>(raw % V);
      }
  };
  // Windows are 1, 2 or 4 k-steps (sub_row 32, 64, 128): shifts, not divisions.
  const int window_shift = __ffs(a.sub_row / Tile::kStepK) - 1;
  const int window_mask = (1 << window_shift) - 1;
  uint8_t sub_next[Tile::kFragsM][2];
  if constexpr (V > 1) {
    if (idx_staged) __syncthreads();  // the staged indices are read from here on
    load_sub(0, sub_next);
  }

  // Prologue.
#pragma unroll
  for (int s = 0; s < Tile::kStages - 1; ++s) {
    if (s < k_stages) load_stage(s, s);
    CpAsyncCommit();
  }

  for (int stage = 0; stage < k_stages; ++stage) {
    CpAsyncWait<Tile::kStages - 2>();
    __syncthreads();
    {
      const int next = stage + Tile::kStages - 1;
      if (next < k_stages) load_stage(next, next % Tile::kStages);
      CpAsyncCommit();
    }
    const int buf = stage % Tile::kStages;
    const uint32_t sa = smem_base + buf * Tile::kStageBytes;
    const uint32_t sb = sa + Tile::kABytes;
    const uint8_t* sm = smem + buf * Tile::kStageBytes + Tile::kABytes + Tile::kBBytes;

    uint32_t meta_word[Tile::kFragsM];
    // Swap this window's candidates to the front of the accumulators.
    auto window_start = [&](int ks) {
      const int window = ks >> window_shift;
      // This window's indices were fetched a window ago; fetch the next ones now so
      // their latency hides behind this window's MMAs.
#pragma unroll
      for (int i = 0; i < Tile::kFragsM; ++i) {
        sub[i][0] = sub_next[i][0];
        sub[i][1] = sub_next[i][1];
      }
      if (window + 1 < windows) load_sub(window + 1, sub_next);
#pragma unroll
      for (int i = 0; i < Tile::kFragsM; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int c = 1; c < V; ++c) {
            // Swap acc[0] and acc[c] when acc[c] holds this window's candidate.
            const bool swap = slot[i][h][c] == sub[i][h];
            const uint8_t held = slot[i][h][0];
            slot[i][h][0] = swap ? slot[i][h][c] : held;
            slot[i][h][c] = swap ? held : slot[i][h][c];
#pragma unroll
            for (int j = 0; j < Tile::kFragsN; ++j)
#pragma unroll
              for (int q = 2 * h; q < 2 * h + 2; ++q) {
                const float front = acc[0][i][j][q];
                acc[0][i][j][q] = swap ? acc[c][i][j][q] : front;
                acc[c][i][j][q] = swap ? front : acc[c][i][j][q];
              }
          }
    };
    auto mma_step = [&](int s) {
      if (s % 2 == 0) {
        // Lane (g, t) holds rows g + 8*(t&1) of step s + (t>>1): selector 0 then 1.
        // Fragments past the kept rows read zero values; give them a valid pattern.
#pragma unroll
        for (int i = 0; i < Tile::kFragsM; ++i) {
          const int row = warp_m * (Tile::kBM / Tile::kWarpsM) + i * 16 + g + 8 * (tq & 1);
          const uint32_t w =
              reinterpret_cast<const uint32_t*>(sm + row * Tile::kMetaRow)[s + (tq >> 1)];
          meta_word[i] = frag_ok[i] ? w : kFillerMeta;
        }
      }
      uint32_t bfrag[Tile::kFragsN][4];
#pragma unroll
      for (int j = 0; j < Tile::kFragsN; ++j) {
        const int row = warp_n * (Tile::kBN / Tile::kWarpsN) + j * 8 + (lane & 7);
        LdMatrixX4(sb + SwizzleB<Tile>(row, s * 4 + (lane >> 3)), bfrag[j]);
      }
#pragma unroll
      for (int i = 0; i < Tile::kFragsM; ++i) {
        uint32_t afrag[4];
        const int row = warp_m * (Tile::kBM / Tile::kWarpsM) + i * 16 + (lane & 15);
        LdMatrixX4(sa + SwizzleA<Tile>(row, s * 2 + (lane >> 4)), afrag);
#pragma unroll
        for (int j = 0; j < Tile::kFragsN; ++j) {
          if (s % 2 == 0)
            MmaSp<T, 0>(acc[0][i][j], afrag, bfrag[j], meta_word[i]);
          else
            MmaSp<T, 1>(acc[0][i][j], afrag, bfrag[j], meta_word[i]);
        }
      }
    };
    const int ks0 = stage * Tile::kSteps;
    if (ks0 + Tile::kSteps <= k_steps && window_shift == 2) {
      // A full stage that is exactly one window (sub_row 128, the default): no branch
      // between the k-steps, so loads of step s + 1 overlap the MMAs of step s.
      if constexpr (V > 1) window_start(ks0);
#pragma unroll
      for (int s = 0; s < Tile::kSteps; ++s) mma_step(s);
    } else {
#pragma unroll
      for (int s = 0; s < Tile::kSteps; ++s) {
        const int ks = ks0 + s;
        if (ks >= k_steps) break;  // only in a partial last stage
        if constexpr (V > 1) {
          if ((ks & window_mask) == 0) window_start(ks);
        }
        mma_step(s);
      }
    }
  }
  CpAsyncWait<0>();
  __syncthreads();

  // Epilogue: accumulators -> shared [routed row][output row] fp32 -> 16-byte stores.
  constexpr int kCStride = kOutRows + 4;
  static_assert(Tile::kBN * kCStride * 4 <= Tile::kPipeBytes, "epilogue tile fits the pipeline");
  float* c_tile = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int slot_n = 0; slot_n < N; ++slot_n) {
#pragma unroll
    for (int i = 0; i < Tile::kFragsM; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int kept = my_kept[i][h];
        if (kept % N != slot_n) continue;
        const int block_row = kept / N * V;
#pragma unroll
        for (int j = 0; j < Tile::kFragsN; ++j)
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            const int n = warp_n * (Tile::kBN / Tile::kWarpsN) + j * 8 + 2 * tq + q;
#pragma unroll
            for (int c = 0; c < V; ++c) {
              float& dst = c_tile[n * kCStride + block_row + (V > 1 ? slot[i][h][c] : 0)];
              dst = (slot_n == 0 ? 0.0f : dst) + acc[c][i][j][2 * h + q];
            }
          }
      }
    __syncthreads();
  }
  const int vec = out_here / 8;
  for (int i = tid; i < (work.row_end - work.row_begin) * vec; i += Tile::kThreads) {
    const int n = i / vec, c = (i % vec) * 8;
    const float* src = c_tile + n * kCStride + c;
    alignas(16) T packed[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) packed[q] = static_cast<T>(src[q]);
    *reinterpret_cast<uint4*>(out + static_cast<int64_t>(work.row_begin + n) * a.m + out0 + c) =
        *reinterpret_cast<const uint4*>(packed);
  }
}

template <typename T, int N, int V, typename Tile>
cudaError_t Launch(cudaStream_t stream, const Args& a) {
  auto kernel = RaggedDotKernel<T, N, V, Tile>;
  constexpr int smem = SmemBytes<Tile, V>();
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         smem);
  if (err != cudaSuccess) return err;
  // Upper bound on the tiles: sum_e ceil(size_e / BN) <= R / BN + E, plus the zero tiles.
  const int64_t tiles = (a.rows + Tile::kBN - 1) / Tile::kBN + a.experts + 1;
  const dim3 grid(static_cast<unsigned>(tiles), (a.kept_rows + Tile::kBM - 1) / Tile::kBM);
  kernel<<<grid, Tile::kThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int N, int V>
cudaError_t LaunchTile(cudaStream_t stream, const Args& a) {
  if (a.rows <= kSmallTileMaxRowsPerExpert * a.experts) return Launch<T, N, V, TileSmall>(stream, a);
  return Launch<T, N, V, TileLarge>(stream, a);
}

template <typename T>
cudaError_t Dispatch(cudaStream_t stream, const Args& a, int n, int v) {
  if (n == 1 && v == 1) return LaunchTile<T, 1, 1>(stream, a);
  if (n == 1 && v == 2) return LaunchTile<T, 1, 2>(stream, a);
  if (n == 1 && v == 4) return LaunchTile<T, 1, 4>(stream, a);
  if (n == 2 && v == 4) return LaunchTile<T, 2, 4>(stream, a);
  return cudaErrorInvalidValue;  // unreachable: CheckProblem refused it
}

ffi::Error RaggedDotCuda(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer values,
                         ffi::Buffer<ffi::U8> indices, ffi::Buffer<ffi::U32> metadata,
                         ffi::Buffer<ffi::S32> sel, ffi::Buffer<ffi::S32> group_sizes,
                         int64_t n, int64_t v, int64_t sub_row, int64_t has_sel,
                         ffi::Result<ffi::AnyBuffer> out) {
  Problem p;
  if (ffi::Error err = CheckProblem(x, values, indices, metadata, sel, group_sizes, n, v,
                                    sub_row, has_sel, *out, &p);
      err.failure())
    return err;
  if (p.rows == 0 || p.m == 0) return ffi::Error::Success();
  if (p.experts == 0 || p.kept_rows == 0 || p.k == 0) {
    // No expert or an empty weight: every output row is zero.
    if (cudaMemsetAsync(out->untyped_data(), 0, out->size_bytes(), stream) != cudaSuccess)
      return ffi::Error::Internal("samoyeds_ragged_dot: cudaMemsetAsync failed");
    return ffi::Error::Success();
  }
  const Args a{x.untyped_data(), values.untyped_data(), indices.typed_data(),
               metadata.typed_data(), sel.typed_data(), group_sizes.typed_data(),
               out->untyped_data(), static_cast<int>(p.tokens), static_cast<int>(p.k),
               static_cast<int>(p.m), static_cast<int>(p.experts),
               static_cast<int>(p.kept_rows), static_cast<int>(p.rows),
               static_cast<int>(p.sub_row), p.has_sel};
  const cudaError_t err = p.dtype == ffi::DataType::BF16
                              ? Dispatch<__nv_bfloat16>(stream, a, static_cast<int>(n),
                                                        static_cast<int>(v))
                              : Dispatch<__half>(stream, a, static_cast<int>(n),
                                                 static_cast<int>(v));
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("samoyeds_ragged_dot: kernel launch failed: ") +
                                cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace
}  // namespace samoyeds

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    SamoyedsRaggedDotCuda, samoyeds::RaggedDotCuda,
    SAMOYEDS_BIND_RAGGED_DOT(
        xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()),
    {xla::ffi::Traits::kCmdBufferCompatible});
