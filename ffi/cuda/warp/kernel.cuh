// The warp-level kernel (Ampere-style sparse tensor cores, runs on sm_80 and later):
//   * mma.sp::ordered_metadata m16n8k32, fp32 accumulation;
//   * global -> shared through a multi-stage cp.async pipeline (values, metadata and
//     activation rows); shared -> registers through ldmatrix; metadata arrives in
//     hardware order (ffi/format.h), one aligned 32-bit word per lane covers two k-steps;
//   * the SEL gather is fused into the activation loads (per-row source addresses);
//   * N:V: swap-to-front steering of V accumulators per kept row (cuda/steer.cuh);
//   * device-side tile schedule from group_sizes; epilogue through shared memory; on
//     sm_90, K split over the blocks of a cluster at decode shapes (warp/config.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "cuda/device.cuh"
#include "cuda/epilogue.cuh"
#include "cuda/operands.cuh"
#include "cuda/ptx.cuh"
#include "cuda/schedule.cuh"
#include "cuda/steer.cuh"
#include "cuda/tile.cuh"
#include "cuda/warp/config.cuh"
#include "cuda/warp/loader.cuh"

namespace samoyeds::cuda {

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

template <typename T, int N, int V, typename Tile>
__global__ void __launch_bounds__(Tile::kThreads, 2)
    RaggedDotWarpKernel(const Args a) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ int src_row[Tile::kBN];  // token id of each routed row, -1 when absent

  constexpr int kOutRows = Tile::kBM / N * V;  // output rows (of M) per block
  RowTile tile;
  Work work;
  if (!BlockWork<T, Tile::kBM, Tile::kBN, N, V, Tile::kThreads>(a, tile, work)) return;
  // K split (gridDim.z > 1, decode shapes on sm_90): the blocks of one cluster share this
  // tile and take consecutive ranges of K stages; ClusterEpilogue adds their partials.
  const int splits = gridDim.z, split = blockIdx.z;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp % Tile::kWarpsM, warp_n = warp / Tile::kWarpsM;
  const int e = work.expert;
  const int rows_here = work.row_end - work.row_begin;
  LoadSourceRows<Tile::kBN, Tile::kThreads>(a, work, src_row);
  __syncthreads();

  const int half_k = a.k / 2, words = a.k / kMetaColsPerWord, windows = a.k / a.sub_row;
  const T* values = static_cast<const T*>(a.values) + static_cast<int64_t>(e) * a.kept_rows * half_k;
  const uint32_t* meta = a.metadata + static_cast<int64_t>(e) * a.kept_rows * words;
  const uint8_t* indices = a.indices + static_cast<int64_t>(e) * a.kept_rows * windows;
  const int k_steps = a.k / kStepK;
  const int k_stages = (a.k + Tile::kBK - 1) / Tile::kBK;
  const int per_split = (k_stages + splits - 1) / splits;
  const int s_begin = min(k_stages, split * per_split);
  const int s_end = min(k_stages, s_begin + per_split);
  // Stages are whole windows (every sub_row, a power of 2, divides kBK); a partial last
  // stage ends at K.
  static_assert(Tile::kBK % MaxSubRow() == 0, "stages hold whole windows");
  const int w_begin = s_begin * (Tile::kBK / a.sub_row);
  const int w_end = min(windows, s_end * (Tile::kBK / a.sub_row));
  const uint32_t smem_base = SmemAddr(smem);

  const StageLoader<Tile, T> loader(a, values, meta, src_row, tile, rows_here);
  auto load_stage = [&](int stage, int buf) {
    loader.Load(smem_base + buf * Tile::kStageBytes, stage);
  };

  // Accumulators: V per kept row (N:V candidates), steered by SteerToFront.
  float acc[Tile::kFragsM][V][Tile::kFragsN][4];
#pragma unroll
  for (int i = 0; i < Tile::kFragsM; ++i)
#pragma unroll
    for (int v = 0; v < V; ++v)
#pragma unroll
      for (int j = 0; j < Tile::kFragsN; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[i][v][j][q] = 0.0f;
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
    frag_ok[i] = RowPresent<Tile::kBM>(tile, r0);  // halves hold whole fragments
    my_kept[i][0] = r0 + g;
    my_kept[i][1] = r0 + g + 8;
  }
  // Sub-row index of each of this lane's kept rows in the current window.
  uint8_t sub[Tile::kFragsM][2];
  uint8_t* idx_smem = smem + Tile::kPipeBytes;
  const int w_count = w_end - w_begin;
  const int idx_capacity = DynamicSmemBytes() - Tile::kPipeBytes;
  const bool idx_staged =
      V > 1 && StageIndices<Tile::kBM, Tile::kThreads>(indices, tile, idx_smem, windows, w_begin,
                                                       w_count, idx_capacity, threadIdx.x);
  auto load_sub = [&](int window, uint8_t (&dst)[Tile::kFragsM][2]) {
#pragma unroll
    for (int i = 0; i < Tile::kFragsM; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = my_kept[i][h];
        const uint8_t raw = !frag_ok[i]  ? 0
                            : idx_staged ? idx_smem[row * w_count + window - w_begin]
                                         : __ldg(indices + KeptRow<Tile::kBM>(tile, row) * windows +
                                                 window);
        dst[i][h] = static_cast<uint8_t>(raw % V);
      }
  };
  // Windows are 1, 2 or 4 k-steps (sub_row 32, 64, 128): shifts, not divisions.
  const int window_shift = __ffs(a.sub_row / kStepK) - 1;
  const int window_mask = (1 << window_shift) - 1;
  uint8_t sub_next[Tile::kFragsM][2];
  if constexpr (V > 1) {
    if (idx_staged) __syncthreads();  // the staged indices are read from here on
    if (w_begin < w_end) load_sub(w_begin, sub_next);
  }

  // Prologue.
#pragma unroll
  for (int s = 0; s < Tile::kStages - 1; ++s) {
    if (s_begin + s < s_end) load_stage(s_begin + s, s);
    CpAsyncCommit();
  }

  // This lane's ldmatrix offsets for k-step s of a stage.
  auto a_offset = [&](int i, int s) {
    return Tile::AOffset(warp_m * (Tile::kBM / Tile::kWarpsM) + i * 16 + (lane & 15),
                         s * 2 + (lane >> 4));
  };
  auto b_offset = [&](int j, int s) {
    return Tile::BOffset(warp_n * (Tile::kBN / Tile::kWarpsN) + j * 8 + (lane & 7),
                         s * 4 + (lane >> 3));
  };
  // Computed once and pinned in registers: left to itself ptxas may recompute the
  // swizzles at every ldmatrix of the K loop (two more instructions each) when its
  // register heuristics shift. Not for the V = 4 prefill tile, whose accumulators leave
  // no room for them.
  constexpr bool kPin = V * Tile::kFragsM * Tile::kFragsN <= 16;
  uint32_t a_off[Tile::kFragsM][Tile::kSteps], b_off[Tile::kFragsN][Tile::kSteps];
  if constexpr (kPin) {
#pragma unroll
    for (int s = 0; s < Tile::kSteps; ++s) {
#pragma unroll
      for (int i = 0; i < Tile::kFragsM; ++i) a_off[i][s] = Pinned(a_offset(i, s));
#pragma unroll
      for (int j = 0; j < Tile::kFragsN; ++j) b_off[j][s] = Pinned(b_offset(j, s));
    }
  }

  for (int stage = s_begin; stage < s_end; ++stage) {
    CpAsyncWait<Tile::kStages - 2>();
    __syncthreads();
    {
      const int next = stage + Tile::kStages - 1;
      if (next < s_end) load_stage(next, (next - s_begin) % Tile::kStages);
      CpAsyncCommit();
    }
    const int buf = (stage - s_begin) % Tile::kStages;
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
      if (window + 1 < w_end) load_sub(window + 1, sub_next);
#pragma unroll
      for (int i = 0; i < Tile::kFragsM; ++i) SteerToFront<V, Tile::kFragsN>(acc[i], slot[i], sub[i]);
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
      for (int j = 0; j < Tile::kFragsN; ++j)
        LdMatrixX4(sb + (kPin ? b_off[j][s] : b_offset(j, s)), bfrag[j]);
#pragma unroll
      for (int i = 0; i < Tile::kFragsM; ++i) {
        uint32_t afrag[4];
        LdMatrixX4(sa + (kPin ? a_off[i][s] : a_offset(i, s)), afrag);
#pragma unroll
        for (int j = 0; j < Tile::kFragsN; ++j) {
          if (s % 2 == 0)
            MmaSp<T, 0>(acc[i][0][j], afrag, bfrag[j], meta_word[i]);
          else
            MmaSp<T, 1>(acc[i][0][j], afrag, bfrag[j], meta_word[i]);
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
      AccToShared<N, V, Tile::kFragsN, kCStride>(acc[i], slot[i], my_kept[i],
                                                 warp_n * (Tile::kBN / Tile::kWarpsN), tq,
                                                 slot_n, c_tile);
    __syncthreads();
  }
  constexpr int kPair = GluPairCols<Tile::kBM, N, V>();
  if (splits > 1) {
    ClusterSync();  // every block's partial tile is in its shared memory
    ClusterEpilogue<T, Tile::kThreads, kCStride, kPair>(a, work, tile.out0, tile.out_here, c_tile,
                                                        tid);
    ClusterSync();  // no block exits while another still reads its shared memory
  } else {
    SharedToOut<T, Tile::kThreads, kCStride, kPair>(a, work, tile.out0, tile.out_here, c_tile, tid);
  }
}

template <typename T, int N, int V, typename Tile>
cudaError_t Launch(cudaStream_t stream, const Args& a) {
  auto kernel = RaggedDotWarpKernel<T, N, V, Tile>;
  constexpr int kMaxSmem = Tile::kPipeBytes + (V > 1 ? kIndexStageBytes : 0);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         kMaxSmem);
  if (err != cudaSuccess) return err;
  const int splits = SplitsFor<Tile>(a, MTiles<Tile::kBM>(a));
  const int smem = SmemBytes<Tile, V>(a, splits);
  Args b = a;
  const dim3 grid = TileGrid<Tile::kBN, Tile::kBM>(b, splits);
  return LaunchClusters(stream, kernel, grid, Tile::kThreads, smem, dim3(1, 1, splits),
                        /*programmatic=*/false, b);
}

template <typename T, int N, int V>
cudaError_t LaunchWarpLevel(cudaStream_t stream, const Args& a) {
  if (a.rows <= kSmallTileMaxRowsPerExpert * a.experts) return Launch<T, N, V, TileSmall>(stream, a);
  return Launch<T, N, V, TileLarge>(stream, a);
}

}  // namespace samoyeds::cuda
