// The Hopper kernel (sm_90a): warpgroup-wide sparse tensor-core MMAs.
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
//     window, NOTES.md v17); otherwise the warpgroup drains at each window;
//   * epilogue: with one kept row per block (1:1, 1:2, 1:4) and no fused GLU, the
//     accumulators go straight to `out` in whole 32-byte sectors per warp store
//     (StoreAccDirect); 2:4 and a fused GLU go through a shared fp32 tile (NOTES.md, v16);
//   * a sparse-metadata register is not rewritten until the wgmma group that uses it has
//     retired (rewriting it under a pending group gave wrong results: NOTES.md, v8.1).
#pragma once

#include <algorithm>
#include <type_traits>

#include "cuda_common.cuh"

// The sm_90a device pass defines this; elsewhere the kernel body compiles to nothing and
// the host never launches it (DeviceIsHopper in cuda_ops.cu).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SAMOYEDS_HOPPER_DEVICE_PASS 1
#endif

namespace samoyeds::cuda {

// Whether the build contains sm_90a code (CMake defines SAMOYEDS_SM90A with arch 90a).
constexpr bool HopperKernelBuilt() {
#ifdef SAMOYEDS_SM90A
  return true;
#else
  return false;
#endif
}

// Block shape: Consumers warpgroups of 64 kept rows each, BN routed rows (the wgmma N),
// Stages ring buffers. HopperCfgFor<V> below picks the shape each N:V class runs with.
template <int V, int Consumers = 2, int BN = (V == 4 ? 64 : 128), int Stages = 4, int Halves = 1>
struct HopperCfg {
  static constexpr int kV = V;
  // Halves = 2: each consumer runs its BN routed rows as two wgmma N = BN / 2 halves with
  // their own MMA groups, steering one half while the other's MMAs run (V > 1 only).
  static constexpr int kHalves = Halves;
  static_assert(Halves == 1 || (Halves == 2 && V > 1), "halves are for sub-row steering");
  // Stages per drain of the halves loop (harness, 1:2 at 4096 tokens: 8 beat 2 and 4 by
  // 2-5 %; NOTES.md, v17).
  static constexpr int kHalvesUnroll = 8;
  static constexpr int kConsumers = Consumers;       // MMA warpgroups
  static constexpr int kConsumerThreads = 128 * kConsumers;
  static constexpr int kLoadThreads = 128;           // one producer warpgroup
  static constexpr int kThreads = kLoadThreads + kConsumerThreads;
  // setmaxnreg: the producer hands registers to the consumers' accumulators. The block
  // starts with kLaunchRegs per thread (the launch bound's share, in units of 8); an
  // `inc` waits for registers that a `dec` released, so it must ask for no more than
  // that, or it never returns.
  static constexpr int kLaunchRegs = 65536 / kThreads / 8 * 8;
  static constexpr int kProducerRegs = 56;
  static constexpr int kConsumerRegs = std::min(
      240, (kLaunchRegs + kLoadThreads * (kLaunchRegs - kProducerRegs) / kConsumerThreads) / 8 * 8);
  static_assert(kLoadThreads * (kLaunchRegs - kProducerRegs) >=
                    kConsumerThreads * (kConsumerRegs - kLaunchRegs),
                "consumers ask for no more registers than the producer releases");
  // Benchmark switch (kernel_harness.cu only): false reuses the first ring fill for every
  // later stage (wrong results), to time the loop without its shared-memory writes.
  static constexpr bool kRefill = true;
  // Benchmark switch (kernel_harness.cu only): false sends 1:1, 1:2 and 1:4 results
  // through the shared-memory epilogue too (NOTES.md, v16).
  static constexpr bool kDirectStore = true;
  // Benchmark switch (kernel_harness.cu only): false stages the sub-row indices with the
  // whole block before the producer starts, as before v19.
  static constexpr bool kLateIndices = true;
  // The halves loop reads each stage's compressed A fragments once into registers
  // (ldmatrix) and issues both halves from them (sparse wgmma with A in registers), so A
  // leaves shared memory once per stage instead of once per half.
  static constexpr bool kARegs = false;
  static constexpr int kBM = 64 * kConsumers;    // kept rows per block
  static constexpr int kBN = BN;                 // routed rows per block (wgmma N)
  static constexpr int kBK = 128;                // dense K per stage
  static constexpr int kStages = Stages;
  static constexpr int kSteps = kBK / kStepK;    // wgmma k-steps per stage
  // One stage of a compressed A row is kBK / 2 values = 128 bytes = one swizzle row.
  static constexpr int kARow = kBK / 2 * 2;
  static constexpr int kABytes = kBM * kARow;
  // B is stored as two K halves of 64 values (128 bytes) for every routed row.
  static constexpr int kBHalf = kBN * 128;
  static constexpr int kBBytes = 2 * kBHalf;
  static constexpr int kMetaRow = kSteps * 4;
  static constexpr int kMetaBytes = kBM * kMetaRow;
  static constexpr int kStageBytes = kABytes + kBBytes + kMetaBytes;
  static constexpr int kPipeBytes = kStages * kStageBytes;
  static constexpr int kFrags = kBN / 8 / Halves;  // n8 column groups of one half's accumulators
  // 128-byte swizzle of 16-byte chunks (the layout the descriptors name): chunk c of row
  // r lives at chunk c ^ (r % 8). B's two K halves are separate [kBN x 128 B] slabs.
  static __device__ __forceinline__ uint32_t AOffset(int row, int chunk) {
    return row * 128 + ((chunk ^ (row & 7)) << 4);
  }
  static __device__ __forceinline__ uint32_t BOffset(int row, int chunk) {
    return (chunk >> 3) * kBHalf + AOffset(row, chunk & 7);
  }
  // Dynamic shared memory: pipeline, staged sub-row indices (none for V = 1), SEL rows,
  // the full and empty mbarriers of every stage, alignment slack.
  static constexpr int kIndexBytes = V > 1 ? kIndexStageBytes : 0;
  static constexpr int kBarrierOffset = kPipeBytes + kIndexBytes + kBN * 4;
  static constexpr int kSmemBytes = kBarrierOffset + 2 * kStages * 8 + 1024;
  static_assert(kARow == 128, "A stage rows are one 128-byte swizzle row");
  static_assert(kABytes % 1024 == 0 && kBHalf % 1024 == 0 && kStageBytes % 1024 == 0,
                "swizzled tiles start on 1024-byte boundaries");
  static_assert(kSmemBytes <= 227 * 1024, "fits an H100 block's shared memory");
};

// The producer warpgroup's loader. It runs on few registers (setmaxnreg) and must issue
// a stage's copies with few instructions and few L1 wavefronts: in every warp-wide
// copy, 8 consecutive lanes cover one 128-byte line of a row (4 full lines per
// instruction, the minimum for 512 bytes); lane (s = lane / 8, q = lane % 8) copies
// chunk q of rows 4i + s of its warp's rows, i = 0, 1, ...; all rows of one lane share
// r & 3, so their swizzle needs only two XORs. Row pointers and the B rows' tokens are
// fixed at construction and a stage adds its K offset; every copy's shared address is
// an immediate offset from a per-thread base.
template <typename Cfg, typename T>
class ProducerLoader {
 public:
  static constexpr int kWarps = Cfg::kLoadThreads / 32;
  static constexpr int kARows = Cfg::kBM / kWarps;   // per warp
  static constexpr int kBRows = Cfg::kBN / kWarps;
  static constexpr int kAI = kARows / 4;             // A copies per thread and stage
  static constexpr int kBI = kBRows / 4;             // B rows per thread (2 copies each)
  static constexpr int kMI = kARows / 8;             // metadata: 4 lanes per row
  static_assert(Cfg::kARow == 128 && Cfg::kBK * 2 == 256, "A rows are one line, B rows two");
  static_assert(kAI * 4 * kWarps == Cfg::kBM && kBI * 4 * kWarps == Cfg::kBN &&
                    kMI * 8 * kWarps == Cfg::kBM && Cfg::kSteps == 4,
                "tile rows divide over the producer's lanes");
  static_assert((Cfg::kBM / 2) % kARows == 0, "a warp's A and metadata rows lie in one tile half");

  __device__ __forceinline__ ProducerLoader(const Args& a, const T* values,
                                            const uint32_t* meta, const int* src_row,
                                            const RowTile& tile, int tid) {
    const int half_k = a.k / 2, words = a.k / kMetaColsPerWord;
    const int warp = tid / 32, lane = tid % 32, s = lane / 8, q = lane % 8;
    // The tile half of this warp's rows: rows below `present` (half-relative) exist.
    const int half0 = warp * kARows >= Cfg::kBM / 2 ? Cfg::kBM / 2 : 0;
    const int present = half0 ? tile.hi : tile.lo;
    // Kept row of half-relative row r, clamped to a present row (pointers stay in range).
    auto kept = [&](int r) { return KeptRow<Cfg::kBM>(tile, half0 + max(min(r, present - 1), 0)); };
    // A: rows warp * kARows + 4i + s, chunk q; 4 rows apart = 4 * half_k values.
    const int a_row = warp * kARows + s;
    a_rows_ = max(0, (present - (a_row - half0) + 3) / 4);  // copies i < a_rows_ are present
    a_src_ = values + static_cast<int64_t>(kept(a_row - half0)) * half_k + q * 8;
    a_step_ = 4 * half_k;
    // Copy i goes to Cfg::AOffset(a_row + 4i, q) = a_dst_[i & 1] + 512 i: rows 4 apart
    // alternate between two swizzle phases.
#pragma unroll
    for (int p = 0; p < 2; ++p) a_dst_[p] = Cfg::AOffset(a_row + 4 * p, q) - 512 * p;
    // B: rows warp * kBRows + 4i + s, chunks q (first half) and 8 + q (second half).
    const int b_row = warp * kBRows + s;
    b_ok_ = 0;
#pragma unroll
    for (int i = 0; i < kBI; ++i) {
      const int t = src_row[b_row + 4 * i];
      if (t >= 0) b_ok_ |= 1u << i;
      b_src_[i] = static_cast<const T*>(a.x) + static_cast<int64_t>(max(t, 0)) * a.k + q * 8;
    }
#pragma unroll
    for (int p = 0; p < 2; ++p) b_dst_[p] = Cfg::BOffset(b_row + 4 * p, q) - 512 * p;
    // Metadata: rows warp * kARows + 8i + lane / 4, word lane % 4 of the stage's 4.
    const int m_row = warp * kARows + lane / 4;
    m_rows_ = max(0, (present - (m_row - half0) + 7) / 8);
    m_src_ = meta + static_cast<int64_t>(kept(m_row - half0)) * words + lane % 4;
    m_step_ = 8 * words;
    m_dst_ = m_row * Cfg::kMetaRow + (lane % 4) * 4;
    m_word_ = lane % 4;
    q8_ = q * 8;
  }

  // Issues the copies of K stage `stage` into the stage buffer at shared address `dst`.
  __device__ __forceinline__ void Load(const Args& a, uint32_t dst, int stage) const {
    const uint32_t sa = dst, sb = sa + Cfg::kABytes, sm = sb + Cfg::kBBytes;
    const int k0 = stage * Cfg::kBK;
    // Dense columns left; K is a multiple of 32, and only the last stage of a K that
    // is not a multiple of kBK has fewer than kBK (its missing k-steps are not issued).
    const int left = a.k - k0;
    // Chunk q holds dense columns [16q, 16q + 16) of an A row, [8q, 8q + 8) (and
    // 64 more) of a B row.
    const bool a_col = 2 * q8_ < left, b_col0 = q8_ < left, b_col1 = 64 + q8_ < left;
#pragma unroll
    for (int i = 0; i < kAI; ++i) {
      const T* src = a_src_ + static_cast<int64_t>(i) * a_step_ + k0 / 2;
      CpAsync16(sa + a_dst_[i & 1] + i * 512, src, i < a_rows_ && a_col ? 16 : 0);
    }
#pragma unroll
    for (int i = 0; i < kBI; ++i) {
      const T* src = b_src_[i] + k0;
      const bool ok = (b_ok_ >> i) & 1;
      // Chunk 8 + q of a row sits one K half (kBHalf) after chunk q: Cfg::BOffset.
      CpAsync16If(sb + b_dst_[i & 1] + i * 512, src, ok && b_col0);
      CpAsync16If(sb + Cfg::kBHalf + b_dst_[i & 1] + i * 512, src + 64, ok && b_col1);
    }
#pragma unroll
    for (int i = 0; i < kMI; ++i) {
      const uint32_t* src = m_src_ + static_cast<int64_t>(i) * m_step_ + k0 / kMetaColsPerWord;
      const bool ok = i < m_rows_ && m_word_ * kMetaColsPerWord < left;
      CpAsync4(sm + m_dst_ + i * 8 * Cfg::kMetaRow, src, ok ? 4 : 0);
    }
  }

 private:
  const T* a_src_;
  const T* b_src_[kBI];
  const uint32_t* m_src_;
  int a_rows_, a_step_, m_rows_, m_step_, m_word_, q8_;
  uint32_t b_ok_;
  uint32_t a_dst_[2], b_dst_[2], m_dst_;
};

// Mean routed rows per expert above which the Hopper kernel is used: below it the
// warp-level kernel's smaller tiles win (H100, 1 Mixtral expert: 128 rows 49 us warp vs
// 64 us Hopper; 512 rows 161 us vs 126 us; the Mixtral stack at 256 rows/expert ran
// 0.90x the dense capacity einsum with the warp-level kernel).
constexpr int64_t kHopperMinRowsPerExpert = 128;
inline bool UseHopperFor(const Args& a) {
  return a.rows > kHopperMinRowsPerExpert * a.experts;
}

// sm_90 shared-memory matrix descriptor, K-major with 128-byte swizzle: start address,
// leading byte offset (unused for this layout: 1), stride byte offset 1024 (8 rows of
// 128 bytes), layout type 1 (128B swizzle) in bits 62-63.
constexpr uint32_t kDesc128Hi = (1024 >> 4) | (1u << 30);  // bits 32-63
__device__ __forceinline__ uint64_t Desc128(uint32_t smem_addr) {
  return static_cast<uint64_t>((smem_addr & 0x3FFFF) >> 4) | (uint64_t{1} << 16) |
         (static_cast<uint64_t>(kDesc128Hi) << 32);
}

__device__ __forceinline__ void WgmmaFence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void WgmmaCommit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// cp.async writes are generic-proxy writes; the tensor cores read through the async proxy.
__device__ __forceinline__ void FenceProxyAsync() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// mbarriers (shared::cta, 64-bit) for the producer/consumer ring.
__device__ __forceinline__ void MbarInit(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void MbarArrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Arrives on `bar` once all of this thread's earlier cp.async copies have landed.
__device__ __forceinline__ void CpAsyncMbarArrive(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Waits until the barrier's phase of parity `parity` has completed.
__device__ __forceinline__ void MbarWait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred done;\n"
      "WAIT_%=:\n"
      " mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      " @!done bra WAIT_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// Barrier among the consumer warpgroups only (id 1; 0 is __syncthreads).
template <int kCount>
__device__ __forceinline__ void ConsumerSync() {
  asm volatile("bar.sync 1, %0;\n" ::"n"(kCount) : "memory");
}
// SAMOYEDS_NO_SETMAXNREG keeps the launch's even register split: only for
// compute-sanitizer racecheck, which stalls at random cases when warps reallocate
// registers (NOTES.md, "compute-sanitizer racecheck"); the shared-memory accesses it
// checks are the same either way.
template <int kRegs>
__device__ __forceinline__ void SetMaxRegsInc() {
#ifndef SAMOYEDS_NO_SETMAXNREG
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}
template <int kRegs>
__device__ __forceinline__ void SetMaxRegsDec() {
#ifndef SAMOYEDS_NO_SETMAXNREG
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
#endif
}

// Keeps the compiler from moving accumulator reads or writes across a wgmma wait/fence.
template <int V, int kFrags>
__device__ __forceinline__ void FenceAcc(float (&acc)[V][kFrags][4]) {
#pragma unroll
  for (int v = 0; v < V; ++v)
#pragma unroll
    for (int j = 0; j < kFrags; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) asm volatile("" : "+f"(acc[v][j][q])::"memory");
}

// Accumulator operand lists of wgmma asm: 4 registers per n8 column group.
#define SAMOYEDS_ACC4(d, j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define SAMOYEDS_ACC32(d)                                                                 \
  SAMOYEDS_ACC4(d, 0), SAMOYEDS_ACC4(d, 1), SAMOYEDS_ACC4(d, 2), SAMOYEDS_ACC4(d, 3),     \
      SAMOYEDS_ACC4(d, 4), SAMOYEDS_ACC4(d, 5), SAMOYEDS_ACC4(d, 6), SAMOYEDS_ACC4(d, 7)
#define SAMOYEDS_ACC64(d)                                                                 \
  SAMOYEDS_ACC32(d), SAMOYEDS_ACC4(d, 8), SAMOYEDS_ACC4(d, 9), SAMOYEDS_ACC4(d, 10),      \
      SAMOYEDS_ACC4(d, 11), SAMOYEDS_ACC4(d, 12), SAMOYEDS_ACC4(d, 13),                     \
      SAMOYEDS_ACC4(d, 14), SAMOYEDS_ACC4(d, 15)
#define SAMOYEDS_ACC96(d)                                                                 \
  SAMOYEDS_ACC64(d), SAMOYEDS_ACC4(d, 16), SAMOYEDS_ACC4(d, 17), SAMOYEDS_ACC4(d, 18),    \
      SAMOYEDS_ACC4(d, 19), SAMOYEDS_ACC4(d, 20), SAMOYEDS_ACC4(d, 21),                     \
      SAMOYEDS_ACC4(d, 22), SAMOYEDS_ACC4(d, 23)
#define SAMOYEDS_REGS32                                                                   \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,"  \
  "%23,%24,%25,%26,%27,%28,%29,%30,%31}"
#define SAMOYEDS_REGS64                                                                   \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,"  \
  "%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43," \
  "%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}"
#define SAMOYEDS_REGS96                                                                   \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,"  \
  "%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43," \
  "%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,%64," \
  "%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85," \
  "%86,%87,%88,%89,%90,%91,%92,%93,%94,%95}"

// wgmma.mma_async.sp m64nNk32 with A and B by descriptor; scale-d = 1 (accumulate), no
// negation, no transpose (both operands K-major). N/2 accumulator registers per thread.
// NAME(d, desc_a, desc_b, meta): SHAPE the PTX shape, REGS / ACC its accumulator list and
// operands, OPS the operand numbers of desc_a, desc_b, meta and the selector.
#define SAMOYEDS_DEFINE_WGMMA_SP(NAME, FRAGS, SHAPE, REGS, ACC, OPS)                     \
  template <typename T, int kSel>                                                          \
  __device__ __forceinline__ void NAME(float (&d)[FRAGS][4], uint64_t desc_a,              \
                                       uint64_t desc_b, uint32_t meta) {                   \
    if constexpr (std::is_same_v<T, __nv_bfloat16>)                                        \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                              \
                   "wgmma.mma_async.sp.sync.aligned." SHAPE ".f32.bf16.bf16 " REGS        \
                   ", " OPS ", p, 1, 1, 0, 0;\n}\n"                                       \
                   : ACC(d)                                                                \
                   : "l"(desc_a), "l"(desc_b), "r"(meta), "n"(kSel));                      \
    else                                                                                   \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                              \
                   "wgmma.mma_async.sp.sync.aligned." SHAPE ".f32.f16.f16 " REGS          \
                   ", " OPS ", p, 1, 1, 0, 0;\n}\n"                                       \
                   : ACC(d)                                                                \
                   : "l"(desc_a), "l"(desc_b), "r"(meta), "n"(kSel));                      \
  }
SAMOYEDS_DEFINE_WGMMA_SP(WgmmaSp64, 8, "m64n64k32", SAMOYEDS_REGS32, SAMOYEDS_ACC32,
                         "%32, %33, %34, %35")
SAMOYEDS_DEFINE_WGMMA_SP(WgmmaSp128, 16, "m64n128k32", SAMOYEDS_REGS64, SAMOYEDS_ACC64,
                         "%64, %65, %66, %67")
SAMOYEDS_DEFINE_WGMMA_SP(WgmmaSp192, 24, "m64n192k32", SAMOYEDS_REGS96, SAMOYEDS_ACC96,
                         "%96, %97, %98, %99")
#undef SAMOYEDS_DEFINE_WGMMA_SP

template <typename T, int kSel, int kFrags>
__device__ __forceinline__ void WgmmaSp(float (&d)[kFrags][4], uint64_t desc_a, uint64_t desc_b,
                                        uint32_t meta) {
  static_assert(kFrags == 8 || kFrags == 16 || kFrags == 24, "wgmma N = 64, 128 or 192");
  if constexpr (kFrags == 8)
    WgmmaSp64<T, kSel>(d, desc_a, desc_b, meta);
  else if constexpr (kFrags == 16)
    WgmmaSp128<T, kSel>(d, desc_a, desc_b, meta);
  else
    WgmmaSp192<T, kSel>(d, desc_a, desc_b, meta);
}

// wgmma.mma_async.sp m64n64k32 with A from registers: the lane's 4 words of its warp's
// 16 x 16 compressed fragment (rows g, g + 8 by columns 2t, 2t + 8: ldmatrix.x4 order).
// The words must not change until the group retires.
template <typename T, int kSel>
__device__ __forceinline__ void WgmmaSpRegA64(float (&d)[8][4], const uint32_t (&a)[4],
                                              uint64_t desc_b, uint32_t meta) {
#define SAMOYEDS_WGMMA_SP64_RS(TYPE)                                                     \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                               \
               "wgmma.mma_async.sp.sync.aligned.m64n64k32.f32." TYPE "." TYPE " "       \
               SAMOYEDS_REGS32 ", {%32, %33, %34, %35}, %36, %37, %38, p, 1, 1, 0;\n}\n" \
               : SAMOYEDS_ACC32(d)                                                      \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(meta),    \
                 "n"(kSel))
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    SAMOYEDS_WGMMA_SP64_RS("bf16");
  else
    SAMOYEDS_WGMMA_SP64_RS("f16");
#undef SAMOYEDS_WGMMA_SP64_RS
}

// Epilogue without shared memory for one kept row per block (N = 1) and no fused GLU.
// The lane holds tile rows kept[h] (g and g + 8 of its fragment) for routed rows
// 8j + 2tq + {0, 1}, and every store of a warp writes whole 32-byte sectors:
//   V > 1: a kept row is a block of V output rows whose V accumulator sets the lane holds
//     (slot: which sub-row each set holds): V adjacent outputs per routed row, and the
//     8 lanes of a quad column write 8 consecutive blocks (16 V bytes);
//   V = 1: lanes g, g ^ 1 trade one value, so that even lanes hold rows g, g + 1 and odd
//     lanes rows g + 7, g + 8 of one routed row: 8 lanes write the fragment's 16 rows.
template <typename T, int V, int kFrags>
__device__ __forceinline__ void StoreAccDirect(const Args& a, const Work& work, int out0, int n0,
                                               const float (&acc)[V][kFrags][4],
                                               const int (&slot)[2][V], const int (&kept)[2],
                                               int g, int tq) {
  const int rows_here = work.row_end - work.row_begin;
  const bool odd = g & 1;
  // The lane's first routed row n0 + 2 tq; routed row 8j + q further is (8j + q) rows of
  // `row_bytes` on (32-bit offsets: a tile spans at most kFrags * 8 output rows).
  const uint32_t row_bytes = static_cast<uint32_t>(a.out_cols) * sizeof(T);
  char* lane_out = reinterpret_cast<char*>(static_cast<T*>(a.out) +
                                           static_cast<int64_t>(work.row_begin + n0 + 2 * tq) *
                                               a.out_cols + out0);
  // Output column of the lane's store per row h (V = 1: one pair of rows per lane).
  char* col_out[2];
#pragma unroll
  for (int h = 0; h < 2; ++h)
    col_out[h] = lane_out + sizeof(T) * (V == 1 ? (odd ? kept[1] - 1 : kept[0]) : kept[h] * V);
  // Every routed row of this half present (all tiles but an expert's last): no checks.
  const bool full = n0 + 8 * kFrags <= rows_here;
  const int rows_left = rows_here - n0 - 2 * tq;  // routed rows 8j + q < rows_left exist
#pragma unroll
  for (int j = 0; j < kFrags; ++j)
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const uint32_t off = (8 * j + q) * row_bytes;
      const bool ok = full || 8 * j + q < rows_left;
      if constexpr (V == 1) {
        const float lo = acc[0][j][q], hi = acc[0][j][2 + q];  // rows g, g + 8
        const float other = __shfl_xor_sync(0xffffffffu, odd ? lo : hi, 4);
        const float w[2] = {odd ? other : lo, odd ? hi : other};
        if (ok) StoreVec<T, 2>(reinterpret_cast<T*>(col_out[0] + off), w);
      } else {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float v[V];  // by sub-row
#pragma unroll
          for (int s = 0; s < V; ++s) {
            float x = acc[0][j][2 * h + q];
#pragma unroll
            for (int c = 1; c < V; ++c) x = slot[h][c] == s ? acc[c][j][2 * h + q] : x;
            v[s] = x;
          }
          if (ok) StoreVec<T, V>(reinterpret_cast<T*>(col_out[h] + off), v);
        }
      }
    }
}

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
  const TileIndex block = BlockTile(a);
  const RowTile tile = TileRows<Cfg::kBM, N, V>(a, block.m);
  const Work work = FindWork<Cfg::kBN>(a, block.row);
  if (work.row_begin >= work.row_end) return;
  if (work.expert < 0) {
    ZeroFillTile<T, Cfg::kThreads>(a, work, tile.out0, tile.out_here);
    return;
  }
  const int e = work.expert;
  LoadSourceRows<Cfg::kBN, Cfg::kThreads>(a, work, src_row);
  const int windows = a.k / a.sub_row;
  const uint8_t* idx = a.indices + static_cast<int64_t>(e) * a.kept_rows * windows;
  // Without kLateIndices the whole block stages the sub-row indices before any load.
  bool idx_staged = false;
  if constexpr (V > 1 && !Cfg::kLateIndices)
    idx_staged = StageIndices<Cfg::kBM, Cfg::kThreads>(idx, tile, idx_smem, windows, 0, windows,
                                                       Cfg::kIndexBytes, threadIdx.x);
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
      if (Cfg::kRefill || stage < Cfg::kStages)
        loader.Load(a, smem_base + buf * Cfg::kStageBytes, stage);
      CpAsyncMbarArrive(full_bar + 8 * buf);
    }
    CpAsyncWait<0>();
    return;
  }

  // Consumers.
  SetMaxRegsInc<Cfg::kConsumerRegs>();
  const int ctid = threadIdx.x - Cfg::kLoadThreads;
  if constexpr (V > 1 && Cfg::kLateIndices) {
    // The consumers stage the sub-row indices while the producer's first loads are in
    // flight (they are first read at the first window): one global round trip less
    // before each tile's first MMA.
    idx_staged = StageIndices<Cfg::kBM, Cfg::kConsumerThreads>(idx, tile, idx_smem, windows, 0,
                                                               windows, Cfg::kIndexBytes, ctid);
    ConsumerSync<Cfg::kConsumerThreads>();
  }
  const int lane = ctid & 31, warp = ctid >> 5;
  // This warp's 16 kept rows inside its warpgroup's 64; lane (g, t) accumulates rows
  // g and g + 8 of them, columns 8j + 2t + {0, 1} (the m16n8 fragment layout per warp).
  // The warpgroup index goes through a shuffle so the compiler knows it is warp-uniform
  // and keeps the descriptor arithmetic in uniform registers.
  const int wg = __shfl_sync(0xffffffffu, warp / 4, 0);
  const int g = lane >> 2, tq = lane & 3;
  const int row0 = wg * 64 + (warp % 4) * 16;
  const bool frag_ok = RowPresent<Cfg::kBM>(tile, row0);  // halves hold whole fragments
  const int my_kept[2] = {row0 + g, row0 + g + 8};
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
  // The stage's metadata, one register per k-step, loaded only once no MMA that uses the
  // registers is in flight (a wgmma's metadata register must not be rewritten before its
  // group retires). Lane (g, t) supplies rows g + 8 (t & 1) of k-step s + (t >> 1):
  // selector 0 for the even step, 1 for the odd one (the mma.sp m16n8k32 per-warp layout).
  const int meta_offset = Cfg::kABytes + Cfg::kBBytes + (row0 + g + 8 * (tq & 1)) * Cfg::kMetaRow;
  auto load_meta = [&](int buf, uint32_t (&mw)[Cfg::kSteps]) {
    const uint32_t* words =
        reinterpret_cast<const uint32_t*>(smem + buf * Cfg::kStageBytes + meta_offset);
#pragma unroll
    for (int s = 0; s < Cfg::kSteps; ++s)
      mw[s] = frag_ok ? words[(s & ~1) + (tq >> 1)] : kFillerMeta;
  };
  // Operand descriptors: the low word of Desc128 holds the start address / 16 (14 bits,
  // no carry out for shared addresses), so a tile's descriptor is its stage's plus a
  // constant; the high word is the same for every tile.
  const uint32_t a_desc0 = static_cast<uint32_t>(Desc128(smem_base + wg * 64 * Cfg::kARow));
  const uint32_t b_desc0 = static_cast<uint32_t>(Desc128(smem_base + Cfg::kABytes));
  // Half h's routed rows start kHalfN rows (kHalfN * 128 bytes, whole swizzle atoms)
  // into each B slab.
  auto b_desc = [&](int buf, int s, int h) {
    const uint32_t b_lo = b_desc0 + buf * (Cfg::kStageBytes >> 4) +
                          (((s >> 1) * Cfg::kBHalf + h * kHalfN * 128 + (s & 1) * 64) >> 4);
    return (static_cast<uint64_t>(kDesc128Hi) << 32) | b_lo;
  };
  auto issue = [&](int buf, int s, uint32_t mw, int h) {
    const uint32_t a_lo = a_desc0 + buf * (Cfg::kStageBytes >> 4) + ((s * 32) >> 4);
    const uint64_t da = (static_cast<uint64_t>(kDesc128Hi) << 32) | a_lo;
    const uint64_t db = b_desc(buf, s, h);
    if (s % 2 == 0)
      WgmmaSp<T, 0, Cfg::kFrags>(acc[h][0], da, db, mw);
    else
      WgmmaSp<T, 1, Cfg::kFrags>(acc[h][0], da, db, mw);
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
  if constexpr (N == 1 && Cfg::kDirectStore) {
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

// The shape each N:V class runs with (measured: NOTES.md, v14, v19). Plain 2:4 has no
// sub-row steering, so its registers go to a third consumer warpgroup (BM 192) and to
// N = 192 routed rows per block (the B tile is read once per 192 x 192 outputs instead of
// per 192 x 128; three stages of 75 KB fill shared memory).
template <int V>
using HopperCfgFor = std::conditional_t<V == 1, HopperCfg<1, 3, 192, 3>, HopperCfg<V>>;
// Plain 2:4 where N = 192 blocks would not fill one wave of the GPU: more, smaller blocks
// win there (4 experts x 150 rows, K = 2048, M = 1408: 20.4 vs 24.5 us).
using HopperPlainNarrowCfg = HopperCfg<1, 3, 128, 3>;
// 1:2 with every stage one window (sub_row 128) steers each N half while the other's MMAs
// run (NOTES.md, v17), both halves from one A fragment in registers (v19).
struct HopperHalvesCfg : HopperCfg<2, 2, 128, 4, 2> {
  static constexpr bool kARegs = true;
};

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
