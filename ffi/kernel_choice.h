// The CUDA kernel a call may force through its `kernel` attribute (tests and benchmarks;
// kAuto lets the handler choose from shapes), and the K split count it may force through
// `splits` (0: the launcher chooses). Python reads the names and codes from the module.
#pragma once

#include <cstdint>

namespace samoyeds {

enum class KernelChoice : int { kAuto = 0, kWarp = 1, kHopper = 2, kStream = 3 };
inline constexpr const char* kKernelChoiceNames[] = {"auto", "warp", "hopper", "stream"};
inline constexpr int kKernelChoiceCount = 4;
// Forced K splits: any count up to the largest cluster a launch may use.
inline constexpr int kMaxForcedSplits = 8;

constexpr bool ValidSplits(int64_t s) { return s >= 0 && s <= kMaxForcedSplits; }

}  // namespace samoyeds
