// The Hopper kernel (sm_90a): warpgroup-wide sparse tensor-core MMAs for prefill shapes.
//   * wgmma.mma_async.sp m64nNk32, fp32 accumulation: A (the compressed weight tile) and
//     B (the routed activation rows) are read from shared memory by descriptor, so the
//     per-MMA instruction stream of the warp-level kernel (ldmatrix, fragment moves)
//     disappears; the metadata is one register per thread per k-step pair. The 1:2
//     halves loop (below) reads A into registers once per stage (ldmatrix) and issues
//     both halves from there;
//   * warp-specialised: a producer warpgroup fills a ring of stages with cp.async (the SEL
//     gather needs per-row addresses: no TMA tile load) and signals each stage's `full`
//     mbarrier; consumer warpgroups of 64 kept rows each (2, or 3 for plain 2:4:
//     HopperCfgFor) wait on it, issue, and release the stage on its `empty` mbarrier once
//     their MMAs retire. No CTA-wide barrier in the loop, so one consumer's steering
//     overlaps the other's MMAs;
//   * N = 128 routed rows (64 when V = 4: the V accumulator sets must fit the register
//     file; 192 for plain 2:4, which has no V sets), K stages of 128 dense columns, tiles
//     in the 128-byte swizzled K-major layout the descriptors describe;
//   * N:V: swap-to-front steering between windows, on accumulators whose MMAs have
//     retired; 1:2 at sub_row 128 runs each consumer's N as two halves with their own
//     MMA groups, so one half is steered while the other's MMAs run (no drain per
//     window); otherwise the warpgroup drains at each window;
//   * epilogue: with one kept row per block (1:1, 1:2, 1:4) and no fused GLU, the
//     accumulators go straight to `out` in whole 32-byte sectors per warp store
//     (StoreAccDirect); 2:4 and a fused GLU go through a shared fp32 tile;
//   * a sparse-metadata register is not rewritten until the wgmma group that uses it has
//     retired (rewriting it under a pending group gives wrong results).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "cuda/epilogue.cuh"
#include "cuda/hopper/config.cuh"
#include "cuda/hopper/direct_store.cuh"
#include "cuda/hopper/producer.cuh"
#include "cuda/hopper/stage.cuh"
#include "cuda/hopper/wgmma.cuh"
#include "cuda/operands.cuh"
#include "cuda/ptx.cuh"
#include "cuda/schedule.cuh"
#include "cuda/steer.cuh"
#include "cuda/tile.cuh"

// The sm_90a device pass defines this; elsewhere the kernel body compiles to nothing and
// the host never launches it (DeviceIsHopper in cuda/dispatch.cuh).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SAMOYEDS_HOPPER_DEVICE_PASS 1
#endif

namespace samoyeds::cuda {

template <typename T, int N, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1)
    RaggedDotHopperKernel(const Args a) {
#ifdef SAMOYEDS_HOPPER_DEVICE_PASS
  constexpr int V = Cfg::kV;
  extern __shared__ uint8_t smem_raw[];
  // The swizzled operand tiles need 1024-byte aligned addresses.
  uint8_t* smem = smem_raw + ((1024u - (SmemAddr(smem_raw) & 1023u)) & 1023u);
  uint8_t* idx_smem = smem + Cfg::kPipeBytes;
  int(&src_row)[Cfg::kBN] =
      *reinterpret_cast<int(*)[Cfg::kBN]>(smem + Cfg::kPipeBytes + Cfg::kIndexBytes);
  const uint32_t smem_base = SmemAddr(smem);
  const uint32_t full_bar = smem_base + Cfg::kBarrierOffset;  // + 8 * stage buffer
  const uint32_t empty_bar = full_bar + 8 * Cfg::kStages;

  constexpr int kOutRows = Cfg::kBM / N * V;
  RowTile tile;
  Work work;
  if (!BlockWork<T, Cfg::kBM, Cfg::kBN, N, V, Cfg::kThreads>(a, tile, work)) return;
  const int e = work.expert;
  LoadSourceRows<Cfg::kBN, Cfg::kThreads>(a, work, src_row);
  const int windows = a.k / a.sub_row;
  const uint8_t* idx = a.indices + static_cast<int64_t>(e) * a.kept_rows * windows;
  bool idx_staged = false;
  if (threadIdx.x == 0) {
    for (int b = 0; b < Cfg::kStages; ++b) {
      MbarInit(full_bar + 8 * b, Cfg::kLoadThreads);
      MbarInit(empty_bar + 8 * b, Cfg::kConsumerThreads);
    }
  }
  __syncthreads();  // SEL rows and initialised barriers are visible

  const int k_stages = (a.k + Cfg::kBK - 1) / Cfg::kBK;
  if (threadIdx.x < Cfg::kLoadThreads) {
    // Producer: fill stage `stage` into buffer stage % kStages once the consumers have
    // released that buffer's previous use.
    SetMaxRegsDec<Cfg::kProducerRegs>();
    const int half_k = a.k / 2, words = a.k / kMetaColsPerWord;
    const T* values = static_cast<const T*>(a.values) + static_cast<int64_t>(e) * a.kept_rows * half_k;
    const uint32_t* meta = a.metadata + static_cast<int64_t>(e) * a.kept_rows * words;
    const ProducerLoader<Cfg, T> loader(a, values, meta, src_row, tile, threadIdx.x);
    for (int stage = 0; stage < k_stages; ++stage) {
      const int buf = stage % Cfg::kStages;
      if (stage >= Cfg::kStages) MbarWait(empty_bar + 8 * buf, (stage / Cfg::kStages - 1) & 1);
      loader.Load(a, smem_base + buf * Cfg::kStageBytes, stage);
      CpAsyncMbarArrive(full_bar + 8 * buf);
    }
    CpAsyncWait<0>();
    return;
  }

  // Consumers.
  SetMaxRegsInc<Cfg::kConsumerRegs>();
  const int ctid = threadIdx.x - Cfg::kLoadThreads;
  if constexpr (V > 1) {
    // The consumers stage the sub-row indices while the producer's first loads are in
    // flight (they are first read at the first window): one global round trip less
    // before each tile's first MMA.
    idx_staged = StageIndices<Cfg::kBM, Cfg::kConsumerThreads>(idx, tile, idx_smem, windows, 0,
                                                               windows, Cfg::kIndexBytes, ctid);
    ConsumerSync<Cfg::kConsumerThreads>();
  }
  const ConsumerLane<Cfg::kBM> me(ctid, tile);
  const int lane = me.lane, wg = me.wg, g = me.g, tq = me.tq, row0 = me.row0;
  const bool frag_ok = me.frag_ok;
  const int(&my_kept)[2] = me.kept;
  const int k_steps = a.k / kStepK;

  constexpr int H = Cfg::kHalves;
  constexpr int kHalfN = Cfg::kBN / H;  // routed rows per half
  float acc[H][V][Cfg::kFrags][4];
#pragma unroll
  for (int h = 0; h < H; ++h)
#pragma unroll
    for (int v = 0; v < V; ++v)
#pragma unroll
      for (int j = 0; j < Cfg::kFrags; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[h][v][j][q] = 0.0f;
  // Which sub-row each accumulator set holds, per lane row (the same for both halves
  // once both have been steered for a window).
  int slot[2][V];
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int c = 0; c < V; ++c) slot[r][c] = c;

  // The lane's two rows' sub-row indices, one byte per window: staged in shared memory,
  // else in global memory (a generic pointer: no branch per load). Row g + 8 lies 8
  // kept rows after row g (a fragment never straddles the tile halves). Lanes of absent
  // fragments read the staging area; what they read is never stored.
  const uint8_t* sub_src =
      idx_staged || !frag_ok
          ? idx_smem + (frag_ok ? my_kept[0] * windows : 0)
          : idx + static_cast<int64_t>(KeptRow<Cfg::kBM>(tile, my_kept[0])) * windows;
  const int sub_off = frag_ok ? 8 * windows : 0;
  // The next window's bytes are loaded a window ahead and reduced % V only when used,
  // so a load has a whole window to arrive.
  uint8_t sub[2] = {0, 0}, sub_next[2] = {0, 0};
  auto load_sub = [&](int window, uint8_t (&dst)[2]) {
    dst[0] = sub_src[window];
    dst[1] = sub_src[window + sub_off];
  };
  const int window_shift = __ffs(a.sub_row / kStepK) - 1;
  const int window_mask = (1 << window_shift) - 1;
  if constexpr (V > 1) load_sub(0, sub_next);

  // Pieces of a K stage, shared by the loops below.
  // Waits for stage `stage`'s data; returns its buffer.
  auto begin_stage = [&](int stage) {
    const int buf = stage % Cfg::kStages;
    MbarWait(full_bar + 8 * buf, (stage / Cfg::kStages) & 1);
    FenceProxyAsync();  // the cp.async (generic proxy) data is read by the tensor cores
    return buf;
  };
  // Window `window` begins: its exchanges are planned (slot updated) and the next
  // window's sub-rows fetched.
  auto plan_window = [&](int window, bool (&swap)[2][V]) {
    sub[0] = sub_next[0] % V;
    sub[1] = sub_next[1] % V;
    if (window + 1 < windows) load_sub(window + 1, sub_next);
    PlanSteer<V>(slot, sub, swap);
  };
  // Steers half h's accumulators; its MMAs must have retired. With V = 2 the exchanges
  // rename registers instead of copying them where the loops run stage pairs (SwapIf);
  // with V = 4 that form's extra live registers spill.
  auto steer_half = [&](int h, const bool (&swap)[2][V]) {
    FenceAcc(acc[h]);
    ApplySteer<V, Cfg::kFrags, V == 2 && H == 2>(acc[h], swap);
    FenceAcc(acc[h]);
  };
  // Window boundary with every MMA drained first.
  auto steer = [&](int window) {
    WgmmaCommit();
    WgmmaWait<0>();
    bool swap[2][V];
    plan_window(window, swap);
#pragma unroll
    for (int h = 0; h < H; ++h) steer_half(h, swap);
  };
  // The stage's metadata registers are loaded only once no MMA that uses them is in flight
  // (a wgmma's metadata register must not be rewritten before its group retires).
  const int meta_offset = StageMetaOffset<Cfg>(row0, g, tq);
  auto load_meta = [&](int buf, uint32_t (&mw)[Cfg::kSteps]) {
    LoadStageMeta<Cfg>(smem, buf, meta_offset, frag_ok, tq, mw);
  };
  const uint32_t a_desc0 = static_cast<uint32_t>(Desc128(smem_base + wg * 64 * Cfg::kARow));
  const uint32_t b_desc0 = static_cast<uint32_t>(Desc128(smem_base + Cfg::kABytes));
  // Half h's routed rows start kHalfN rows (kHalfN * 128 bytes, whole swizzle atoms)
  // into each B slab.
  auto b_desc = [&](int buf, int s, int h) {
    return StageDescB<Cfg>(b_desc0, buf, s, h * kHalfN * 128);
  };
  auto issue = [&](int buf, int s, uint32_t mw, int h) {
    IssueStep<T, Cfg::kFrags>(acc[h][0], StageDescA<Cfg>(a_desc0, buf, s), b_desc(buf, s, h),
                              mw, s);
  };
  // kARegs: the lane's ldmatrix row of its warp's A fragment in a stage buffer (rows
  // 16 w + l % 8 + 8 ((l / 8) % 2), columns 8 (l / 16) of k-step 0). With the 128-byte
  // swizzle, k-step s's chunk 2 s + l / 16 of that row is this offset ^ (s << 5).
  static_assert(!Cfg::kARegs || H == 2, "A from registers in the halves loop only");
  uint32_t a_ldm = 0;
  if constexpr (Cfg::kARegs) {
    const int r7 = lane & 7, hi = lane >> 4;
    a_ldm = (row0 + r7 + (lane & 8)) * Cfg::kARow + ((r7 >> 1) << 5) + ((hi ^ (r7 & 1)) << 4);
  }
  auto load_a = [&](int buf, uint32_t (&af)[Cfg::kSteps][4]) {
    const uint32_t base = smem_base + buf * Cfg::kStageBytes + a_ldm;
#pragma unroll
    for (int s = 0; s < Cfg::kSteps; ++s) LdMatrixX4(base ^ (s << 5), af[s]);
  };
  auto issue_rs = [&](int buf, int s, uint32_t mw, int h, const uint32_t (&af)[4]) {
    const uint64_t db = b_desc(buf, s, h);
    static_assert(!Cfg::kARegs || Cfg::kFrags == 8, "A-register MMAs are N = 64");
    if constexpr (Cfg::kARegs) {
      if (s % 2 == 0)
        WgmmaSpRegA64<T, 0>(acc[h][0], af, db, mw);
      else
        WgmmaSpRegA64<T, 1>(acc[h][0], af, db, mw);
    }
  };
  auto release = [&](int stage) { MbarArrive(empty_bar + 8 * (stage % Cfg::kStages)); };
  // One MMA group stays in flight; the previous stage's have retired, so its buffer goes
  // back to the producer.
  auto end_stage = [&](int stage) {
    WgmmaCommit();
    WgmmaWait<1>();
    if (stage > 0) release(stage - 1);
  };

  // Separate loops, so that register allocation of the common case (every stage exactly
  // one window: sub_row 128, so K is a multiple of 128) does not carry the general loop's
  // pressure (it had spilled the barrier phase, reloaded from local memory at every
  // stage).
  if constexpr (H == 2) {
    // Two halves, one group each: half 0 is steered and issued while half 1's MMAs of the
    // previous stage run, then half 1 while half 0's run, so no steering waits for a
    // drain. Launched for sub_row == kBK only (LaunchHopper): every stage is one window.
    // The metadata registers alternate by stage parity: the previous stage's half-1
    // group still reads its set when the next stage's metadata is loaded.
    // kARegs: both halves issue from the stage's A fragments in registers, one register
    // set (two, alternating like the metadata, spill 124 bytes): the previous stage's
    // half 1 retires before the stage's A and metadata are loaded, and the other
    // consumer's MMAs cover that gap.
    uint32_t af[Cfg::kARegs ? Cfg::kSteps : 1][4];  // the A register set (kARegs)
    auto run_stage = [&](int stage, uint32_t (&mw)[Cfg::kSteps]) {
      const int buf = begin_stage(stage);
      bool swap[2][V];
      plan_window(stage, swap);
      steer_half(0, swap);  // half 0's previous group retired at the last wait
      if constexpr (Cfg::kARegs) {
        WgmmaWait<0>();  // half 1's previous group
        if (stage > 0) release(stage - 1);
      }
      load_meta(buf, mw);
      if constexpr (Cfg::kARegs) load_a(buf, af);
      auto issue_half = [&](int h) {
        WgmmaFence();
#pragma unroll
        for (int s = 0; s < Cfg::kSteps; ++s) {
          if constexpr (Cfg::kARegs)
            issue_rs(buf, s, mw[s], h, af[s]);
          else
            issue(buf, s, mw[s], h);
        }
        WgmmaCommit();
      };
      issue_half(0);
      if constexpr (!Cfg::kARegs) {
        WgmmaWait<1>();  // half 1's previous group
        if (stage > 0) release(stage - 1);
      }
      steer_half(1, swap);
      issue_half(1);
      WgmmaWait<1>();  // half 0's group
    };
    constexpr int kU = Cfg::kHalvesUnroll;
    static_assert(kU % 2 == 0, "stage pairs: the register sets alternate");
    uint32_t mw_sets[Cfg::kARegs ? 1 : 2][Cfg::kSteps];
    auto &mw_even = mw_sets[0], &mw_odd = mw_sets[Cfg::kARegs ? 0 : 1];
    int stage = 0;
    for (; stage + kU <= k_stages; stage += kU) {
#pragma unroll
      for (int u = 0; u < kU; u += 2) {
        run_stage(stage + u, mw_even);
        run_stage(stage + u + 1, mw_odd);
      }
      // ptxas keeps wgmmas pipelined only if nothing is in flight at a loop's back edge
      // (otherwise it serializes every wgmma of the kernel: C7514/C7515).
      WgmmaWait<0>();
    }
    if constexpr (Cfg::kARegs) {
      // The remainder as a loop drained at its back edge (so one register set serves):
      // with A in registers an unrolled guarded remainder made ptxas spill and
      // serialize every wgmma (C7512).
      for (; stage < k_stages; ++stage) {
        run_stage(stage, mw_even);
        WgmmaWait<0>();
      }
    } else {
#pragma unroll
      for (int u = 0; u + 1 < kU; ++u) {
        if (stage + u < k_stages) {
          if (u % 2)
            run_stage(stage + u, mw_odd);
          else
            run_stage(stage + u, mw_even);
        }
      }
    }
  } else if (window_shift == 2) {
    for (int stage = 0; stage < k_stages; ++stage) {
      const int buf = begin_stage(stage);
      if constexpr (V > 1)
        steer(stage);
      else
        WgmmaWait<0>();  // before the metadata registers are reloaded
      uint32_t mw[Cfg::kSteps];
      load_meta(buf, mw);
      WgmmaFence();
#pragma unroll
      for (int s = 0; s < Cfg::kSteps; ++s) issue(buf, s, mw[s], 0);
      end_stage(stage);
    }
  } else {
    // sub_row 32 or 64: windows inside a stage; a partial last stage.
    for (int stage = 0; stage < k_stages; ++stage) {
      const int buf = begin_stage(stage);
      WgmmaWait<0>();
      uint32_t mw[Cfg::kSteps];
      load_meta(buf, mw);
      WgmmaFence();
      const int ks0 = stage * Cfg::kSteps;
#pragma unroll
      for (int s = 0; s < Cfg::kSteps; ++s) {
        const int ks = ks0 + s;
        if (ks >= k_steps) break;  // only in a partial last stage
        if constexpr (V > 1) {
          if ((ks & window_mask) == 0) {
            steer(ks >> window_shift);
            WgmmaFence();
          }
        }
        issue(buf, s, mw[s], 0);
      }
      end_stage(stage);
    }
  }
  WgmmaWait<0>();
#pragma unroll
  for (int h = 0; h < H; ++h) FenceAcc(acc[h]);
  if constexpr (N == 1) {
    if (a.glu == kGluNone) {
      if (frag_ok) {
#pragma unroll
        for (int h = 0; h < H; ++h)
          StoreAccDirect<T, V, Cfg::kFrags>(a, work, tile.out0, h * kHalfN, acc[h], slot,
                                            my_kept, g, tq);
      }
      return;
    }
  }
  // Both consumers' MMAs have retired before the epilogue tile overwrites the ring.
  ConsumerSync<Cfg::kConsumerThreads>();

  // Epilogue: accumulators -> shared [routed row][output row] fp32 -> 16-byte stores.
  constexpr int kCStride = kOutRows + 4;
  static_assert(Cfg::kBN * kCStride * 4 <= Cfg::kPipeBytes, "epilogue tile fits the pipeline");
  float* c_tile = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int slot_n = 0; slot_n < N; ++slot_n) {
#pragma unroll
    for (int h = 0; h < H; ++h)
      AccToShared<N, V, Cfg::kFrags, kCStride>(acc[h], slot, my_kept, h * kHalfN, tq, slot_n,
                                               c_tile);
    ConsumerSync<Cfg::kConsumerThreads>();
  }
  SharedToOut<T, Cfg::kConsumerThreads, kCStride, GluPairCols<Cfg::kBM, N, V>()>(
      a, work, tile.out0, tile.out_here, c_tile, ctid);
#endif  // SAMOYEDS_HOPPER_DEVICE_PASS
}

template <typename T, int N, int V, typename Cfg>
cudaError_t LaunchHopperCfg(cudaStream_t stream, const Args& a) {
  static_assert(Cfg::kV == V, "the shape is for this N:V class");
  if (Cfg::kHalves == 2 && a.sub_row != Cfg::kBK) return cudaErrorInvalidValue;
  auto kernel = RaggedDotHopperKernel<T, N, Cfg>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         Cfg::kSmemBytes);
  if (err != cudaSuccess) return err;
  Args b = a;
  const dim3 grid = TileGrid<Cfg::kBN, Cfg::kBM>(b);
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(b);
  return cudaGetLastError();
}

template <typename T, int N, int V>
cudaError_t LaunchHopper(cudaStream_t stream, const Args& a) {
  if constexpr (V == 2) {
    if (a.sub_row == HopperHalvesCfg::kBK) return LaunchHopperCfg<T, N, V, HopperHalvesCfg>(stream, a);
  }
  if constexpr (V == 1) {
    using Wide = HopperCfgFor<V>;
    Args b = a;
    const dim3 grid = TileGrid<Wide::kBN, Wide::kBM>(b);
    if (int64_t{grid.x} * grid.y < CurrentDevice().sms)
      return LaunchHopperCfg<T, N, V, HopperPlainNarrowCfg>(stream, a);
  }
  return LaunchHopperCfg<T, N, V, HopperCfgFor<V>>(stream, a);
}

}  // namespace samoyeds::cuda
