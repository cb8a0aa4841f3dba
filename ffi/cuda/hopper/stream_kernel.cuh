// The serving-path kernel (sm_90a): few routed rows per expert, bound by reading the
// compressed weight once at HBM bandwidth.
//   * one producer warp streams each K stage into a ring of shared-memory buffers: the
//     compressed values of the block's kept rows by bulk tensor copies (TMA, one per tile
//     half, in the 128-byte swizzled layout the wgmma descriptors describe), the routed
//     activation rows gathered through SEL and the metadata by cp.async; each buffer's
//     `full` mbarrier completes on both (transaction bytes and copy arrivals);
//   * consumer warpgroups of 64 kept rows each run wgmma.mma_async.sp m64nNk32 with a
//     small N (16 to 64 routed rows), A and B from shared memory by descriptor, and
//     release a buffer on its `empty` mbarrier once their MMAs retire;
//   * N:V: swap-to-front steering at each window, after a drain (cheap at small N);
//   * K split over the blocks of a cluster (grid z) when the tiles alone leave SMs idle;
//     the partial tiles are summed through distributed shared memory in rank order, so
//     the result does not depend on scheduling (StreamSplitsFor);
//   * epilogue: one kept row per block (1:1, 1:2, 1:4), one split and no fused GLU store
//     the accumulators straight to `out`; otherwise through a shared fp32 tile.
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/device.cuh"
#include "cuda/epilogue.cuh"
#include "cuda/hopper/direct_store.cuh"
#include "cuda/hopper/stage.cuh"
#include "cuda/hopper/stream_config.cuh"
#include "cuda/hopper/tensor_map.cuh"
#include "cuda/hopper/wgmma.cuh"
#include "cuda/operands.cuh"
#include "cuda/ptx.cuh"
#include "cuda/schedule.cuh"
#include "cuda/steer.cuh"
#include "cuda/tile.cuh"
#include "cuda/timeline.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SAMOYEDS_STREAM_DEVICE_PASS 1
#endif

namespace samoyeds::cuda {

// The bulk tensor copies of one K stage's values: one box of kBM / 2 kept rows x kBK / 2
// values per tile half present, and the barrier's transaction count (one thread).
template <typename Cfg>
struct StreamValues {
  int row_lo, row_hi;  // first rows of the two tile halves in the [E * Mk, K / 2] tensor
  bool has_hi;
  __device__ __forceinline__ StreamValues(const Args& a, const RowTile& tile, int expert) {
    const int64_t first = static_cast<int64_t>(expert) * a.kept_rows;
    row_lo = static_cast<int>(first + KeptRow<Cfg::kBM>(tile, 0));
    row_hi = static_cast<int>(first + KeptRow<Cfg::kBM>(tile, Cfg::kBM / 2));
    has_hi = tile.hi > 0;
  }
  __device__ __forceinline__ void Load(uint32_t dst, int stage, uint32_t full,
                                       const CUtensorMap* map) const {
    MbarArriveExpectTx(full, (has_hi ? 2 : 1) * Cfg::kAHalfBytes);
    const int col = stage * (Cfg::kBK / 2);
    TmaLoad2D(dst, map, col, row_lo, full);
    if (has_hi) TmaLoad2D(dst + Cfg::kAHalfBytes, map, col, row_hi, full);
  }
};

// The producer's loads of one K stage besides the values, by its P = kProducerThreads
// threads (thread p): cp.async copies of the routed rows (16-byte chunk p % 16 of rows
// p / 16 + (P / 16) i) and of the metadata (word p % 4 of rows p / 4 + (P / 4) i). Each
// thread's cp.async arrival on a stage's `full` barrier covers every copy it issued
// before it.
template <typename Cfg, typename T>
class StreamProducer {
 public:
  static constexpr int kP = Cfg::kProducerThreads;
  static constexpr int kRowStep = kP / 16, kMetaStep = kP / 4;
  static constexpr int kBCopies = Cfg::kBN / kRowStep;
  static constexpr int kMetaCopies = Cfg::kBM / kMetaStep;
  static constexpr int kHalf = Cfg::kBM / 2;
  static_assert(kP % 32 == 0 && Cfg::kBN % kRowStep == 0 && kHalf % kMetaStep == 0,
                "the tile's rows divide over the producer threads");

  __device__ __forceinline__ StreamProducer(const Args& a, const RowTile& tile, int expert, int p)
      : p_(p) {
    const int64_t first = static_cast<int64_t>(expert) * a.kept_rows;
    // Metadata rows r = p / 4 + kMetaStep i: the lower half's first kHalf / kMetaStep
    // copies, then the upper half's; copies of absent rows read nothing and fill zeros.
    const int words = a.k / kMetaColsPerWord, r0 = p / 4;
    meta_lo_ = a.metadata + (first + KeptRow<Cfg::kBM>(tile, r0)) * words + p % 4;
    meta_hi_ = a.metadata + (first + KeptRow<Cfg::kBM>(tile, kHalf + r0)) * words + p % 4;
    meta_lo_n_ = max(0, (tile.lo - r0 + kMetaStep - 1) / kMetaStep);
    meta_hi_n_ = max(0, (tile.hi - r0 + kMetaStep - 1) / kMetaStep);
  }

  // The token of each of this thread's rows, read from shared memory once (after the
  // block has staged them): a load per copy and stage would put a load's latency in front
  // of every copy (the producer's copies are a dependent chain otherwise).
  __device__ __forceinline__ void ReadSourceRows(const int* src_row) {
#pragma unroll
    for (int i = 0; i < kBCopies; ++i) tok_[i] = src_row[p_ / 16 + kRowStep * i];
  }

  // Routed rows of stage `stage` into the buffer at `dst`.
  __device__ __forceinline__ void LoadRows(const Args& a, uint32_t dst, int stage) const {
    const uint32_t sb = dst + Cfg::kABytes;
    const int k0 = stage * Cfg::kBK;
    const int chunk = p_ % 16, r0 = p_ / 16;
    // Chunk c of a row holds dense columns [8c, 8c + 8) of the stage: slab c / 8 of the
    // two K halves, 16-byte chunk c % 8 swizzled by the row (Cfg's 128-byte swizzle).
    const bool col_ok = k0 + chunk * 8 < a.k;
    const T* x = static_cast<const T*>(a.x) + k0 + chunk * 8;
    const uint32_t b_dst = sb + (chunk / 8) * Cfg::kBHalf;
#pragma unroll
    for (int i = 0; i < kBCopies; ++i) {
      const int r = r0 + kRowStep * i;
      const int t = tok_[i];
      CpAsync16If(b_dst + r * 128 + (((chunk % 8) ^ (r % 8)) << 4),
                  x + static_cast<int64_t>(max(t, 0)) * a.k, t >= 0 && col_ok);
    }
  }

  // Metadata of stage `stage` into the buffer at `dst` (it depends on the tile alone, so
  // the first ring fill's is issued before the block knows its routed rows).
  __device__ __forceinline__ void LoadMeta(const Args& a, uint32_t dst, int stage) const {
    const uint32_t sm = dst + Cfg::kABytes + Cfg::kBBytes;
    const int word = stage * Cfg::kBK / kMetaColsPerWord;
    const bool word_ok = (word + p_ % 4) * kMetaColsPerWord < a.k;
    const int words = a.k / kMetaColsPerWord;
    const uint32_t m_dst = sm + (p_ / 4) * Cfg::kMetaRow + (p_ % 4) * 4;
#pragma unroll
    for (int i = 0; i < kMetaCopies; ++i) {
      const bool upper = i >= kMetaCopies / 2;
      const int j = upper ? i - kMetaCopies / 2 : i;
      const bool ok = word_ok && j < (upper ? meta_hi_n_ : meta_lo_n_);
      const uint32_t* src =
          (upper ? meta_hi_ : meta_lo_) + static_cast<int64_t>(kMetaStep * j) * words;
      CpAsync4(m_dst + i * kMetaStep * Cfg::kMetaRow, ok ? src + word : a.metadata, ok ? 4 : 0);
    }
  }

 private:
  int tok_[kBCopies];  // token row of each B copy, -1: absent (no copy)
  const uint32_t* meta_lo_;
  const uint32_t* meta_hi_;
  int p_, meta_lo_n_, meta_hi_n_;
};

template <typename T, int N, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kBlocksPerSm)
    RaggedDotStreamKernel(const Args a, const __grid_constant__ CUtensorMap values_map) {
#ifdef SAMOYEDS_STREAM_DEVICE_PASS
  constexpr int V = Cfg::kV;
  extern __shared__ uint8_t smem_raw[];
  // The swizzled operand tiles need 1024-byte aligned addresses.
  const uint32_t pad = (1024u - (SmemAddr(smem_raw) & 1023u)) & 1023u;
  uint8_t* smem = smem_raw + pad;
  int(&src_row)[Cfg::kBN] = *reinterpret_cast<int(*)[Cfg::kBN]>(smem + Cfg::kSrcRowOffset);
  uint8_t* idx_smem = smem + Cfg::kIndexOffset;
  const uint32_t smem_base = SmemAddr(smem);
  const uint32_t full_bar = smem_base + Cfg::kBarrierOffset;  // + 8 * buffer
  const uint32_t empty_bar = full_bar + 8 * Cfg::kStages;
  MarkPhase(Phase::kStart);
  if constexpr (Cfg::kProgrammatic) GridDependencyWait();  // before any global access

  RowTile tile;
  Work work;
  if (!BlockWork<T, Cfg::kBM, Cfg::kBN, N, V, Cfg::kThreads>(a, tile, work)) {
    MarkPhase(Phase::kEnd);
    return;
  }
  const int e = work.expert;
  // This block's K stages [s_begin, s_end) and windows [w_begin, w_end).
  const int splits = gridDim.z;
  const int k_stages = (a.k + Cfg::kBK - 1) / Cfg::kBK;
  const int per_split = (k_stages + splits - 1) / splits;
  const int s_begin = min(k_stages, static_cast<int>(blockIdx.z) * per_split);
  const int n_stages = min(k_stages, s_begin + per_split) - s_begin;

  const StreamValues<Cfg> values(a, tile, e);
  if (threadIdx.x == 0) {
    for (int b = 0; b < Cfg::kStages; ++b) {
      // Full: the producer threads' cp.async arrivals and one transaction-count arrival.
      MbarInit(full_bar + 8 * b, Cfg::kProducerThreads + 1);
      MbarInit(empty_bar + 8 * b, Cfg::kConsumerThreads);
    }
    FenceMbarrierInit();
    // The first ring fill's values depend on the tile alone: they fly while the block
    // reads its SEL rows.
    for (int i = 0; i < min(n_stages, Cfg::kStages); ++i)
      values.Load(smem_base + i * Cfg::kStageBytes, s_begin + i, full_bar + 8 * i, &values_map);
  }
  // Every global read that depends on the tile alone is issued here, before the SEL rows
  // are known: the first fill's metadata (producer) and the sub-row indices (consumers).
  // Issued after the routed rows, they would queue behind every block's first weight
  // stages in the memory system and hold up each block's first stage by microseconds.
  const int tid = threadIdx.x;
  const int windows = a.k / a.sub_row, stage_windows = Cfg::kBK / a.sub_row;
  const int w_begin = min(windows, s_begin * stage_windows);
  const int w_end = min(windows, (s_begin + n_stages) * stage_windows);
  const int wc = w_end - w_begin;
  const IndexSpan span = IndexSpanOf(w_begin, wc);
  const uint8_t* idx = a.indices + static_cast<int64_t>(e) * a.kept_rows * windows;
  const int idx_capacity = DynamicSmemBytes() - static_cast<int>(pad) - Cfg::kIndexOffset;
  StreamProducer<Cfg, T> producer(a, tile, e, tid % Cfg::kProducerThreads);
  bool idx_async = false;
  if (tid >= Cfg::kConsumerThreads) {
    if constexpr (!(Cfg::kSkip & 1))
      for (int i = 0; i < min(n_stages, Cfg::kStages); ++i)
        producer.LoadMeta(a, smem_base + i * Cfg::kStageBytes, s_begin + i);
  } else if constexpr (V > 1) {
    idx_async = StageIndicesAsync<Cfg::kBM, Cfg::kConsumerThreads>(
        idx, tile, SmemAddr(idx_smem), windows, span, idx_capacity, tid);
  }
  LoadSourceRows<Cfg::kBN, Cfg::kThreads>(a, work, src_row);
  __syncthreads();  // token rows and initialised barriers are visible
  MarkPhase(Phase::kPrologue);

  constexpr int kOutRows = Cfg::kBM / N * V;
  constexpr int kCStride = kOutRows + 4;
  static_assert(Cfg::kBN * kCStride * 4 <= Cfg::kPipeBytes, "epilogue tile fits the ring");
  float* c_tile = reinterpret_cast<float*>(smem);

  if (tid >= Cfg::kConsumerThreads) {
    // Producer: fill buffer i % kStages with stage s_begin + i once the consumers
    // have released that buffer's previous use.
    const int p = tid - Cfg::kConsumerThreads;
    producer.ReadSourceRows(src_row);
    for (int i = 0; i < n_stages; ++i) {
      const int buf = i % Cfg::kStages;
      const uint32_t dst = smem_base + buf * Cfg::kStageBytes;
      if (i >= Cfg::kStages) {
        MbarWait(empty_bar + 8 * buf, (i / Cfg::kStages - 1) & 1);
        if (p == 0) values.Load(dst, s_begin + i, full_bar + 8 * buf, &values_map);
        if constexpr (!(Cfg::kSkip & 1)) producer.LoadMeta(a, dst, s_begin + i);
      }
      if constexpr (!(Cfg::kSkip & 2)) producer.LoadRows(a, dst, s_begin + i);
      CpAsyncMbarArrive(full_bar + 8 * buf);
    }
    CpAsyncWait<0>();
  } else {
    const ConsumerLane<Cfg::kBM> me(tid, tile);
    const int wg = me.wg, g = me.g, tq = me.tq, row0 = me.row0;
    const bool frag_ok = me.frag_ok;
    const int(&my_kept)[2] = me.kept;

    // The sub-row indices of this split's windows in shared memory: copied during the
    // prologue, else (rows not 16-byte aligned) staged now, else read from global memory.
    bool idx_staged = idx_async;
    if constexpr (V > 1) {
      if (idx_async)
        CpAsyncWaitAll();
      else
        idx_staged = StageIndices<Cfg::kBM, Cfg::kConsumerThreads>(idx, tile, idx_smem, windows,
                                                                   w_begin, wc, idx_capacity, tid);
      ConsumerSync<Cfg::kConsumerThreads>();
    }
    // The lane's two rows' sub-row bytes (window w at sub_src[w - sub_base], row g + 8 at
    // + sub_off): staged, else in global memory; absent fragments read kept row 0.
    const bool staged_here = idx_staged && frag_ok;
    const int staged_stride = idx_async ? span.width : wc;
    const uint8_t* sub_src =
        staged_here ? idx_smem + my_kept[0] * staged_stride
                    : idx + static_cast<int64_t>(frag_ok ? KeptRow<Cfg::kBM>(tile, my_kept[0]) : 0) *
                                windows;
    const int sub_off = frag_ok ? 8 * (staged_here ? staged_stride : windows) : 0;
    const int sub_base = staged_here ? (idx_async ? span.base : w_begin) : 0;
    uint8_t sub[2] = {0, 0}, sub_next[2] = {0, 0};
    auto load_sub = [&](int window, uint8_t (&dst)[2]) {
      dst[0] = sub_src[window - sub_base];
      dst[1] = sub_src[window - sub_base + sub_off];
    };
    if constexpr (V > 1) {
      if (w_begin < w_end) load_sub(w_begin, sub_next);
    }

    // kH accumulator sets of kHalfN routed rows each (Cfg::kHalves: two N halves with MMA
    // groups of their own), all steered by one plan per window.
    constexpr int kH = Cfg::kHalves ? 2 : 1, kFH = Cfg::kFrags / kH, kHalfN = Cfg::kBN / kH;
    float acc[kH][V][kFH][4];
#pragma unroll
    for (int h = 0; h < kH; ++h)
#pragma unroll
      for (int v = 0; v < V; ++v)
#pragma unroll
        for (int j = 0; j < kFH; ++j)
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[h][v][j][q] = 0.0f;
    int slot[2][V];  // which sub-row each accumulator set holds, per lane row
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int c = 0; c < V; ++c) slot[r][c] = c;

    auto begin_stage = [&](int i) {
      const int buf = i % Cfg::kStages;
      MbarWait(full_bar + 8 * buf, (i / Cfg::kStages) & 1);
      FenceProxyAsync();  // the cp.async (generic proxy) rows are read by the tensor cores
      if (i == 0) MarkPhase(Phase::kFirstStage);
      MarkStage(i);
      return buf;
    };
    // Window `window` begins: the exchanges are planned (slot updated) and the next
    // window's sub-rows fetched; steer_half applies them to one set, whose MMAs retired.
    auto plan_window = [&](int window, bool (&swap)[2][V]) {
      sub[0] = sub_next[0] % V;
      sub[1] = sub_next[1] % V;
      if (window + 1 < w_end) load_sub(window + 1, sub_next);
      PlanSteer<V>(slot, sub, swap);
    };
    auto steer_half = [&](int h, const bool (&swap)[2][V]) {
      FenceAcc(acc[h]);
      ApplySteer<V, kFH>(acc[h], swap);
      FenceAcc(acc[h]);
    };
    // Window boundary: every MMA drained, the window's candidates swapped to the front.
    auto steer = [&](int window) {
      WgmmaCommit();
      WgmmaWait<0>();
      bool swap[2][V];
      plan_window(window, swap);
#pragma unroll
      for (int h = 0; h < kH; ++h) steer_half(h, swap);
    };
    const int meta_offset = StageMetaOffset<Cfg>(row0, g, tq);
    const uint32_t a_desc0 = static_cast<uint32_t>(Desc128(smem_base + wg * 64 * Cfg::kARow));
    const uint32_t b_desc0 = static_cast<uint32_t>(Desc128(smem_base + Cfg::kABytes));
    // Half h's routed rows start kHalfN rows (whole 128-byte swizzle atoms) into each B slab.
    auto issue = [&](int h, int buf, int s, uint32_t mw) {
      IssueStep<T, kFH>(acc[h][0], StageDescA<Cfg>(a_desc0, buf, s),
                        StageDescB<Cfg>(b_desc0, buf, s, h * kHalfN * 128), mw, s);
    };
    auto release = [&](int i) { MbarArrive(empty_bar + 8 * (i % Cfg::kStages)); };
    // One MMA group stays in flight; the previous stage's have retired, so its buffer
    // goes back to the producer.
    auto end_stage = [&](int i) {
      WgmmaCommit();
      WgmmaWait<1>();
      if (i > 0) release(i - 1);
    };

    const int window_shift = __ffs(a.sub_row / kStepK) - 1;
    const int window_mask = (1 << window_shift) - 1;
    const int k_steps = a.k / kStepK;
    if constexpr (Cfg::kSkip & 4) {
      for (int i = 0; i < n_stages; ++i) {
        begin_stage(i);
        end_stage(i);
      }
    } else if (Cfg::kHalves && window_shift == 2) {
      // Every stage is one window. Half 0 is steered and issued while half 1's MMAs of the
      // previous stage run, then half 1 while half 0's run, so no steering waits for a
      // drain; the metadata registers alternate by stage parity (the previous stage's
      // half-1 group still reads its set). ptxas pipelines the wgmmas only if no group is
      // in flight where control flow joins: the loop runs stage pairs and drains at its
      // back edge, and so does the last odd stage.
      uint32_t mw_even[Cfg::kSteps], mw_odd[Cfg::kSteps];
      auto run_stage = [&](int i, uint32_t (&mw)[Cfg::kSteps]) {
        const int buf = begin_stage(i);
        bool swap[2][V];
        if constexpr (V > 1) {
          plan_window(w_begin + i, swap);
          steer_half(0, swap);  // half 0's previous group retired at the last wait
        }
        LoadStageMeta<Cfg>(smem, buf, meta_offset, frag_ok, tq, mw);
        auto issue_half = [&](int h) {
          WgmmaFence();
#pragma unroll
          for (int s = 0; s < Cfg::kSteps; ++s) issue(h, buf, s, mw[s]);
          WgmmaCommit();
        };
        issue_half(0);
        WgmmaWait<1>();  // half 1's previous group
        if (i > 0) release(i - 1);
        if constexpr (V > 1) steer_half(1, swap);
        issue_half(1);
        WgmmaWait<1>();  // half 0's group
      };
      int i = 0;
      for (; i + 2 <= n_stages; i += 2) {
        run_stage(i, mw_even);
        run_stage(i + 1, mw_odd);
        WgmmaWait<0>();
      }
      if (i < n_stages) {
        run_stage(i, mw_even);
        WgmmaWait<0>();
      }
    } else if (window_shift == 2) {
      // Every stage is one window (sub_row 128).
      for (int i = 0; i < n_stages; ++i) {
        const int buf = begin_stage(i);
        if constexpr (V > 1)
          steer(w_begin + i);
        else
          WgmmaWait<0>();  // before the metadata registers are reloaded
        uint32_t mw[Cfg::kSteps];
        LoadStageMeta<Cfg>(smem, buf, meta_offset, frag_ok, tq, mw);
        WgmmaFence();
#pragma unroll
        for (int s = 0; s < Cfg::kSteps; ++s)
#pragma unroll
          for (int h = 0; h < kH; ++h) issue(h, buf, s, mw[s]);
        end_stage(i);
      }
    } else {
      // sub_row 32 or 64: windows inside a stage; a partial last stage. (With halves each
      // stage drains before the back edge: see the halves loop.)
      for (int i = 0; i < n_stages; ++i) {
        const int buf = begin_stage(i);
        WgmmaWait<0>();
        uint32_t mw[Cfg::kSteps];
        LoadStageMeta<Cfg>(smem, buf, meta_offset, frag_ok, tq, mw);
        WgmmaFence();
        const int ks0 = (s_begin + i) * Cfg::kSteps;
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
#pragma unroll
          for (int h = 0; h < kH; ++h) issue(h, buf, s, mw[s]);
        }
        end_stage(i);
        if constexpr (Cfg::kHalves) WgmmaWait<0>();
      }
    }
    WgmmaWait<0>();
#pragma unroll
    for (int h = 0; h < kH; ++h) FenceAcc(acc[h]);
    MarkPhase(Phase::kLoopEnd);
    if constexpr (Cfg::kProgrammatic) GridDependencyTrigger();

    if (N == 1 && splits == 1 && a.glu == kGluNone) {
      if (frag_ok) {
#pragma unroll
        for (int h = 0; h < kH; ++h)
          StoreAccDirect<T, V, kFH>(a, work, tile.out0, h * kHalfN, acc[h], slot, my_kept, g, tq);
      }
    } else {
      // Both consumers' MMAs have retired (and every load of the ring has landed) before
      // the epilogue tile overwrites the ring.
      ConsumerSync<Cfg::kConsumerThreads>();
#pragma unroll
      for (int slot_n = 0; slot_n < N; ++slot_n) {
#pragma unroll
        for (int h = 0; h < kH; ++h)
          AccToShared<N, V, kFH, kCStride>(acc[h], slot, my_kept, h * kHalfN, tq, slot_n, c_tile);
        ConsumerSync<Cfg::kConsumerThreads>();
      }
      if (splits == 1)
        SharedToOut<T, Cfg::kConsumerThreads, kCStride, GluPairCols<Cfg::kBM, N, V>()>(
            a, work, tile.out0, tile.out_here, c_tile, tid);
    }
  }
  if (splits > 1 && !(Cfg::kSkip & 8)) {
    ClusterSync();  // every block's partial tile is in its shared memory
    if (tid < Cfg::kConsumerThreads)
      ClusterEpilogue<T, Cfg::kConsumerThreads, kCStride, GluPairCols<Cfg::kBM, N, V>()>(
          a, work, tile.out0, tile.out_here, c_tile, tid);
    ClusterSync();  // no block exits while another still reads its shared memory
  }
  MarkPhase(Phase::kEnd);
#endif  // SAMOYEDS_STREAM_DEVICE_PASS
}

template <typename T, int N, int V, typename Cfg>
cudaError_t LaunchStreamCfg(cudaStream_t stream, const Args& a) {
  static_assert(Cfg::kV == V, "the shape is for this N:V class");
  auto kernel = RaggedDotStreamKernel<T, N, Cfg>;
  Args b = a;
  const int splits = StreamSplitsFor<Cfg>(b, MTiles<Cfg::kBM>(b));
  // Few row tiles per expert: M tiles along x, so the bound's empty tiles launch last
  // instead of taking SM slots between busy blocks (which then start up to 2 us late).
  const dim3 grid = TileGrid<Cfg::kBN, Cfg::kBM>(b, splits);
  // The sub-row indices of one split's windows, when they fit the reserve.
  int index_bytes = 0;
  if (V > 1) {
    const int k_stages = (b.k + Cfg::kBK - 1) / Cfg::kBK;
    const int64_t windows = std::min<int64_t>(
        b.k / b.sub_row, int64_t{(k_stages + splits - 1) / splits} * Cfg::kBK / b.sub_row);
    // Room for the 16-byte aligned span StageIndicesAsync copies, or the exact windows.
    // (Both terms hold at least the split's exact windows: BM is a multiple of 16.)
    index_bytes = static_cast<int>(std::min<int64_t>(
        {kIndexStageBytes, Cfg::kBM * (b.k / b.sub_row), IndexSpanBytes(Cfg::kBM, windows),
         StreamSmemPerBlock<Cfg::kBlocksPerSm>() - Cfg::kFixedSmemBytes}));
  }
  const int smem = Cfg::kFixedSmemBytes + index_bytes;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  CUtensorMap values_map;
  err = EncodeValuesMap(&values_map, b, Cfg::kBK / 2, Cfg::kBM / 2);
  if (err != cudaSuccess) return err;
  return LaunchClusters(stream, kernel, grid, Cfg::kThreads, smem, dim3(1, 1, splits),
                        Cfg::kProgrammatic, b,
                        values_map);
}

// The block shape from shapes alone: the narrow block up to kStreamNarrowMaxRowsPerExpert
// mean routed rows per expert, else the wide one.
template <typename T, int N, int V>
cudaError_t LaunchStream(cudaStream_t stream, const Args& a) {
  if (a.rows <= kStreamNarrowMaxRowsPerExpert * a.experts)
    return LaunchStreamCfg<T, N, V, StreamNarrowCfg<V>>(stream, a);
  return LaunchStreamCfg<T, N, V, StreamWideCfg<V>>(stream, a);
}

}  // namespace samoyeds::cuda
