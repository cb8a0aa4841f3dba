// dvalues on the tensor cores: the SDDMM of the pattern, float32 [E, Mk, K/2],
//   dvalues[e, kr, j] = sum over the rows r of expert e of ct[r, m(kr, w)] * x[src(r), k(kr, j)].
//
// A block owns expert e (blockIdx.z), 64 kept rows (blockIdx.x) and 128 columns of K
// (blockIdx.y), and computes the dense D[kr, c] = sum_r ct[r, m(kr, w(c))] x[src(r), c]
// over the expert's rows in chunks of 32: A[kr, r] from the chunk's ct slab (the
// contiguous columns [kb / N * V, (kb + 64) / N * V) that the block's kept rows can
// name), B the chunk's x rows gathered through SEL; both cp.async, double-buffered. The
// epilogue keeps the two stored positions of each 2:4 group (the metadata). Each output
// element is one block's sum over the expert's rows in order, no atomics: the same bits
// on every run. A row whose sel entry is outside [0, T) is a zero row (its ct row too,
// as the CPU handler skips it); an expert without rows gets zeros.
#pragma once

#include "cuda/backward/common.cuh"

namespace samoyeds::cuda::bwd {

template <int N, int V>
struct DvaluesShape {
  static constexpr int kSlabCols = kTileRows / N * V;
  static constexpr int kSlabStride = kSlabCols + 8;  // halves; keeps 16-byte rows
  static constexpr int kSlabBytes = kChunk * kSlabStride * 2;
  static constexpr int kXBytes = kChunk * kBStride * 2;
  static constexpr int kStageBytes = kSlabBytes + kXBytes;
  static constexpr int kDStride = kTileCols + 4;  // floats per row of the epilogue tile
  static constexpr int kDBytes = kTileRows * kDStride * 4;
  static constexpr int kSmemBytes = 2 * kStageBytes > kDBytes ? 2 * kStageBytes : kDBytes;
  static_assert(kSlabBytes % 16 == 0 && kXBytes % 16 == 0);
};

template <typename T, int N, int V, int WPW>
__global__ void __launch_bounds__(kThreads) DvaluesKernel(const BwdArgs b) {
  using S = DvaluesShape<N, V>;
  extern __shared__ __align__(128) uint8_t smem[];
  const Args& a = b.a;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp & 1, warp_n = warp >> 1, g = lane >> 2, t = lane & 3;
  const int kb = blockIdx.x * kTileRows, c0 = blockIdx.y * kTileCols, e = blockIdx.z;
  const int cols_here = min(kTileCols, a.k - c0);
  const int half_k = a.k / 2, words = a.k / kMetaColsPerWord, windows = a.k / a.sub_row;
  // The expert's rows, group sizes read as the forward kernels read them.
  int begin = 0, size = 0;
  for (int i = 0; i <= e; ++i) {
    begin += size;
    size = min(max(__ldg(a.group_sizes + i), 0), a.rows - begin);
  }
  const int chunks = (size + kChunk - 1) / kChunk;
  const uint16_t* ct = static_cast<const uint16_t*>(b.ct);
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  const uint8_t* indices = a.indices + static_cast<int64_t>(e) * a.kept_rows * windows;
  const uint32_t smem_base = SmemAddr(smem);
  auto slab_at = [&](int st) { return smem_base + st * S::kStageBytes; };
  auto x_at = [&](int st) { return slab_at(st) + S::kSlabBytes; };

  // Chunk c: rows begin + 32c + i; x at columns [c0, c0 + 128), ct at the block's slab.
  const int slab0 = kb / N * V;
  auto load_chunk = [&](int c, int st) {
    constexpr int kXVecs = kTileCols / 8, kSlabVecs = S::kSlabCols / 8;
    for (int i = tid; i < kChunk * kXVecs; i += kThreads) {
      const int row = i / kXVecs, col = c0 + (i % kXVecs) * 8, r = begin + c * kChunk + row;
      int src = -1;
      if (r < begin + size) src = a.has_sel ? __ldg(a.sel + r) : r;
      const bool ok = src >= 0 && src < a.tokens && col < a.k;
      CpAsync16(x_at(st) + (row * kBStride + (i % kXVecs) * 8) * 2,
                ok ? x + static_cast<int64_t>(src) * a.k + col : x, ok ? 16 : 0);
    }
    for (int i = tid; i < kChunk * kSlabVecs; i += kThreads) {
      const int row = i / kSlabVecs, col = slab0 + (i % kSlabVecs) * 8;
      const int r = begin + c * kChunk + row;
      int src = -1;
      if (r < begin + size) src = a.has_sel ? __ldg(a.sel + r) : r;
      const bool ok = src >= 0 && src < a.tokens && col < a.m;
      CpAsync16(slab_at(st) + (row * S::kSlabStride + (i % kSlabVecs) * 8) * 2,
                ok ? ct + static_cast<int64_t>(r) * a.m + col : ct, ok ? 16 : 0);
    }
    CpAsyncCommit();
  };

  // Slab column of each of the lane's kept rows (g and g + 8 of fragment i) per window
  // slot w of the warp: fixed for the whole reduction.
  const int ws0 = warp_n * kWarpCols / a.sub_row;
  int col[WPW][2][2];
#pragma unroll
  for (int w = 0; w < WPW; ++w)
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int kq = warp_m * 32 + i * 16 + g + 8 * h, kr = kb + kq;
        const bool ok = kr < a.kept_rows && (ws0 + w) * a.sub_row < cols_here;
        const int sub =
            ok ? __ldg(indices + static_cast<int64_t>(kr) * windows + c0 / a.sub_row + ws0 + w)
               : 0;
        col[w][i][h] = kq / N * V + sub % V;
      }

  Acc acc;
  ZeroAcc(acc);

  if (chunks > 0) load_chunk(0, 0);
  for (int c = 0; c < chunks; ++c) {
    const int st = c & 1;
    CpAsyncWait<0>();
    // Stage st is complete for every thread, and every warp is done with chunk c - 1
    // (stage st ^ 1), which the next copies overwrite.
    __syncthreads();
    if (c + 1 < chunks) load_chunk(c + 1, st ^ 1);
    const uint16_t* slab = reinterpret_cast<const uint16_t*>(smem + st * S::kStageBytes);
#pragma unroll
    for (int ks = 0; ks < kChunk / 16; ++ks) {
      // A[kr, rr] = slab[rr, col(kr)] for the lane's rows rr = 2t, 2t + 1, 2t + 8, 2t + 9.
      const uint16_t* r0 = slab + (ks * 16 + 2 * t) * S::kSlabStride;
      const uint16_t* r1 = r0 + S::kSlabStride;
      const uint16_t* r8 = r0 + 8 * S::kSlabStride;
      const uint16_t* r9 = r0 + 9 * S::kSlabStride;
      uint32_t af[WPW][2][4];
#pragma unroll
      for (int w = 0; w < WPW; ++w)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int lo = col[w][i][0], hi = col[w][i][1];
          af[w][i][0] = Pack(r0[lo], r1[lo]);
          af[w][i][1] = Pack(r0[hi], r1[hi]);
          af[w][i][2] = Pack(r8[lo], r9[lo]);
          af[w][i][3] = Pack(r8[hi], r9[hi]);
        }
      uint32_t bf[kFragsN][2];
      LoadB(x_at(st), ks * 16, warp_n * kWarpCols, lane, bf);
      MmaStep<T, WPW>(acc, af, bf);
    }
  }

  // D through shared memory (the pipeline's stages are free once every warp is here),
  // then each thread keeps the stored positions of one (kept row, metadata word).
  __syncthreads();
  float* d = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float* dr = d + (warp_m * 32 + i * 16 + g + 8 * h) * S::kDStride + warp_n * kWarpCols;
#pragma unroll
      for (int f = 0; f < kFragsN; ++f)
        *reinterpret_cast<float2*>(dr + f * 8 + 2 * t) =
            make_float2(acc[i][f][2 * h], acc[i][f][2 * h + 1]);
    }
  __syncthreads();
  const uint32_t* meta = a.metadata + static_cast<int64_t>(e) * a.kept_rows * words;
  constexpr int kWords = kTileCols / kMetaColsPerWord;
  for (int item = tid; item < kTileRows * kWords; item += kThreads) {
    const int kq = item / kWords, cw = item % kWords, kr = kb + kq;
    if (kr >= a.kept_rows || cw * kMetaColsPerWord >= cols_here) continue;
    const uint32_t word = CanonicalMetaWord(meta, words, kr, c0 / kMetaColsPerWord + cw);
    const float* dr = d + kq * S::kDStride + cw * kMetaColsPerWord;
    float v[16];
#pragma unroll
    for (int s = 0; s < 16; ++s) v[s] = dr[(s / 2) * kGroupWidth + ((word >> (2 * s)) & 3u)];
    float4* o = reinterpret_cast<float4*>(
        b.out + (static_cast<int64_t>(e) * a.kept_rows + kr) * half_k + c0 / 2 + cw * 16);
#pragma unroll
    for (int q = 0; q < 4; ++q) o[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
  }
}

}  // namespace samoyeds::cuda::bwd
