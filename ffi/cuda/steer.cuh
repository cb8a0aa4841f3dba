// N:V steering on MMA accumulators: each kept row of the compressed weight holds, per
// window of sub_row columns, one of V candidate output rows; the accumulators of the V
// candidates are exchanged so the current window's always comes first.
#pragma once

#include <cstdint>

namespace samoyeds::cuda {

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
}  // namespace samoyeds::cuda
