// Phase timestamps of the serving kernel's blocks, compiled in only with
// -DSAMOYEDS_TIMELINE (the kernel harness's timeline report): where a short call's time
// goes between launch, prologue, first K stage, main loop and epilogue. Without the
// macro MarkPhase is empty and the kernels are unchanged.
#pragma once

#include <cstdint>

namespace samoyeds::cuda {

enum class Phase : int {
  kStart,       // the block's first instruction
  kPrologue,    // tile found, SEL rows read, barriers initialised (busy blocks only)
  kFirstStage,  // the first K stage has landed in shared memory
  kLoopEnd,     // the last MMA has retired
  kEnd,         // the block's last instruction (empty blocks: right after kStart)
  kCount
};

struct TimelineRecord {
  uint64_t global_ns[static_cast<int>(Phase::kCount)];  // %globaltimer: comparable across SMs
  uint64_t clock[static_cast<int>(Phase::kCount)];      // clock64: exact within one SM
  uint32_t smid;
  uint32_t busy;  // reached kPrologue
};

#ifdef SAMOYEDS_TIMELINE
__device__ TimelineRecord* g_timeline = nullptr;
__device__ int g_timeline_capacity = 0;

// Thread 0 of each block stamps the phase into its record (linear block index).
__device__ __forceinline__ void MarkPhase(Phase phase) {
  if (threadIdx.x != 0 || g_timeline == nullptr) return;
  const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  if (block >= g_timeline_capacity) return;
  TimelineRecord& r = g_timeline[block];
  uint64_t ns;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
  r.global_ns[static_cast<int>(phase)] = ns;
  r.clock[static_cast<int>(phase)] = static_cast<uint64_t>(clock64());
  if (phase == Phase::kStart) {
    uint32_t sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    r.smid = sm;
  }
  if (phase == Phase::kPrologue) r.busy = 1;
}
#else
__device__ __forceinline__ void MarkPhase(Phase) {}
#endif

}  // namespace samoyeds::cuda
