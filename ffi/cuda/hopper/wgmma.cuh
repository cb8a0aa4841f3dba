// Hopper (sm_90a) warpgroup MMA wrappers: shared-memory matrix descriptors, the
// wgmma fence / commit / wait, sparse wgmma shapes (A by descriptor or from registers),
// and register reallocation between warpgroups (setmaxnreg).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace samoyeds::cuda {

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

// SAMOYEDS_NO_SETMAXNREG keeps the launch's even register split: only for
// compute-sanitizer racecheck, which stalls at random cases when warps reallocate
// registers; the shared-memory accesses it checks are the same either way.
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
#define SAMOYEDS_ACC8(d) SAMOYEDS_ACC4(d, 0), SAMOYEDS_ACC4(d, 1)
#define SAMOYEDS_ACC16(d) SAMOYEDS_ACC8(d), SAMOYEDS_ACC4(d, 2), SAMOYEDS_ACC4(d, 3)
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
#define SAMOYEDS_REGS8 "{%0,%1,%2,%3,%4,%5,%6,%7}"
#define SAMOYEDS_REGS16 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}"
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
SAMOYEDS_DEFINE_WGMMA_SP(WgmmaSp16, 2, "m64n16k32", SAMOYEDS_REGS8, SAMOYEDS_ACC8,
                         "%8, %9, %10, %11")
SAMOYEDS_DEFINE_WGMMA_SP(WgmmaSp32, 4, "m64n32k32", SAMOYEDS_REGS16, SAMOYEDS_ACC16,
                         "%16, %17, %18, %19")
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
  static_assert(kFrags == 2 || kFrags == 4 || kFrags == 8 || kFrags == 16 || kFrags == 24,
                "wgmma N = 16, 32, 64, 128 or 192");
  if constexpr (kFrags == 2)
    WgmmaSp16<T, kSel>(d, desc_a, desc_b, meta);
  else if constexpr (kFrags == 4)
    WgmmaSp32<T, kSel>(d, desc_a, desc_b, meta);
  else if constexpr (kFrags == 8)
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

}  // namespace samoyeds::cuda
