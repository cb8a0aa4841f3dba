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

// K stages whose landing (the consumers' wait on the stage's full barrier returns) is
// stamped too: the arrival curve of the ring's first fill and of its refills.
constexpr int kTimelineStages = 24;

struct TimelineRecord {
  uint64_t global_ns[static_cast<int>(Phase::kCount)];  // %globaltimer: comparable across SMs
  uint64_t clock[static_cast<int>(Phase::kCount)];      // clock64: exact within one SM
  uint64_t stage_clock[kTimelineStages];                // clock64 when stage i landed
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
// Thread 0 stamps the landing of the block's K stage i (its i-th, from 0).
__device__ __forceinline__ void MarkStage(int i) {
  if (threadIdx.x != 0 || g_timeline == nullptr || i >= kTimelineStages) return;
  const int block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  if (block >= g_timeline_capacity) return;
  g_timeline[block].stage_clock[i] = static_cast<uint64_t>(clock64());
}
#else
__device__ __forceinline__ void MarkPhase(Phase) {}
__device__ __forceinline__ void MarkStage(int) {}
#endif

}  // namespace samoyeds::cuda
