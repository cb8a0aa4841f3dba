// dx rows on the tensor cores: dxr[r] = ct[r] @ W_e(r)^T, float32 [R, K], from the
// compressed weight.
//
// Per K window w, dxr[rows, w] = A_w[rows, Mk] @ B_w[Mk, L] with A_w[r, kr] =
// ct[r, m(kr, w)] and B_w the decoded 2:4 values of window w. A block owns 64 routed rows
// of one expert (cuda/schedule.cuh's FindWork) and 128 columns of K, and runs over the
// kept rows in chunks of 32. The ct columns a chunk [kr0, kr0 + 32) can name, whatever
// the window, are the contiguous [kr0 / N * V, (kr0 + 32) / N * V): that slab is copied
// once per chunk (cp.async, double-buffered) and serves every window of the block. The
// chunk's values and metadata are loaded to registers one chunk ahead and decoded into a
// dense [32][128] B tile. Each output element is one thread's sum over the kept rows in
// order: the same bits on every run. Rows past sum(group_sizes) run no chunk: zeros.
#pragma once

#include "cuda/backward/common.cuh"
#include "cuda/schedule.cuh"

namespace samoyeds::cuda::bwd {

template <int N, int V>
struct DxShape {
  static constexpr int kSlabCols = kChunk / N * V;
  static constexpr int kSlabStride = kSlabCols + 8;  // halves; keeps 16-byte rows
  static constexpr int kSlabBytes = kTileRows * kSlabStride * 2;
  static constexpr int kBBytes = kChunk * kBStride * 2;
  static constexpr int kIdxBytes = kChunk * kWindowsPerTile;
  static constexpr int kStageBytes = kSlabBytes + kBBytes + kIdxBytes;
  static constexpr int kSmemBytes = 2 * kStageBytes;
  static_assert(kSlabBytes % 16 == 0 && kBBytes % 16 == 0 && kStageBytes % 16 == 0);
};

template <typename T, int N, int V, int WPW>
__global__ void __launch_bounds__(kThreads) DxKernel(const BwdArgs b) {
  using S = DxShape<N, V>;
  extern __shared__ __align__(128) uint8_t smem[];
  const Args& a = b.a;
  const Work work = FindWork<kTileRows>(a, blockIdx.x);
  if (work.row_begin >= work.row_end) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp & 1, warp_n = warp >> 1, g = lane >> 2, t = lane & 3;
  const int c0 = blockIdx.y * kTileCols, cols_here = min(kTileCols, a.k - c0);
  const int half_k = a.k / 2, words = a.k / kMetaColsPerWord, windows = a.k / a.sub_row;
  const int rows_here = work.row_end - work.row_begin;
  const int e = max(work.expert, 0);
  // A zero-fill tile (rows past the groups) runs no chunk.
  const int chunks = work.expert < 0 ? 0 : (a.kept_rows + kChunk - 1) / kChunk;
  const uint16_t* ct =
      static_cast<const uint16_t*>(b.ct) + static_cast<int64_t>(work.row_begin) * a.m;
  const uint16_t* values = static_cast<const uint16_t*>(a.values) +
                           static_cast<int64_t>(e) * a.kept_rows * half_k;
  const uint32_t* meta = a.metadata + static_cast<int64_t>(e) * a.kept_rows * words;
  const uint8_t* indices = a.indices + static_cast<int64_t>(e) * a.kept_rows * windows;
  const uint32_t smem_base = SmemAddr(smem);
  auto slab_at = [&](int st) { return smem_base + st * S::kStageBytes; };
  auto b_at = [&](int st) { return slab_at(st) + S::kSlabBytes; };
  auto idx_at = [&](int st) { return smem + st * S::kStageBytes + S::kSlabBytes + S::kBBytes; };

  // The slab of chunk c: ct rows of the tile x columns [c * kChunk / N * V, + kSlabCols).
  // Missing rows and columns past M are zero-filled (they meet zero B rows or no output).
  auto load_slab = [&](int c, int st) {
    const int col0 = c * kChunk / N * V;
    constexpr int kVecs = S::kSlabCols / 8;
    for (int i = tid; i < kTileRows * kVecs; i += kThreads) {
      const int r = i / kVecs, col = col0 + (i % kVecs) * 8;
      const bool ok = r < rows_here && col < a.m;
      CpAsync16(slab_at(st) + (r * S::kSlabStride + (i % kVecs) * 8) * 2,
                ok ? ct + static_cast<int64_t>(r) * a.m + col : ct, ok ? 16 : 0);
    }
    CpAsyncCommit();
  };
  // Thread (kept row kq of the chunk, metadata word cw of the tile): its 16 values, the
  // metadata word, and the sub-row index of window slot cw.
  const int kq = tid / kWindowsPerTile, cw = tid % kWindowsPerTile;
  const int n_windows = cols_here / a.sub_row;
  uint32_t kept[8], word = 0;
  uint8_t sub = 0;
  auto fetch = [&](int c) {
    const int kr = c * kChunk + kq;
    const bool ok = kr < a.kept_rows && cw * kMetaColsPerWord < cols_here;
    uint4 v0 = make_uint4(0, 0, 0, 0), v1 = v0;
    if (ok) {
      const uint4* src = reinterpret_cast<const uint4*>(
          values + static_cast<int64_t>(kr) * half_k + (c0 + cw * kMetaColsPerWord) / 2);
      v0 = __ldg(src);
      v1 = __ldg(src + 1);
      word = CanonicalMetaWord(meta, words, kr, (c0 + cw * kMetaColsPerWord) / kMetaColsPerWord);
    }
    kept[0] = v0.x, kept[1] = v0.y, kept[2] = v0.z, kept[3] = v0.w;
    kept[4] = v1.x, kept[5] = v1.y, kept[6] = v1.z, kept[7] = v1.w;
    sub = kr < a.kept_rows && cw < n_windows
              ? __ldg(indices + static_cast<int64_t>(kr) * windows + c0 / a.sub_row + cw)
              : 0;
  };
  auto store_decoded = [&](int st) {
    uint32_t dense[16];
    Decode24(word, kept, dense);  // all-zero values decode to zeros whatever the word
    uint4* dst = reinterpret_cast<uint4*>(smem + st * S::kStageBytes + S::kSlabBytes) +
                 (kq * kBStride + cw * kMetaColsPerWord) / 8;
#pragma unroll
    for (int q = 0; q < 4; ++q)
      dst[q] = make_uint4(dense[4 * q], dense[4 * q + 1], dense[4 * q + 2], dense[4 * q + 3]);
    idx_at(st)[kq * kWindowsPerTile + cw] = sub;
  };

  Acc acc;
  ZeroAcc(acc);

  const int ws0 = warp_n * kWarpCols / a.sub_row;  // the warp's first window slot
  if (chunks > 0) {
    load_slab(0, 0);
    fetch(0);
  }
  for (int c = 0; c < chunks; ++c) {
    const int st = c & 1;
    store_decoded(st);
    CpAsyncWait<0>();
    // Stage st is complete for every thread, and every warp is done with chunk c - 1
    // (stage st ^ 1), which the next copies overwrite.
    __syncthreads();
    if (c + 1 < chunks) {
      load_slab(c + 1, st ^ 1);
      fetch(c + 1);
    }
    const uint16_t* slab = reinterpret_cast<const uint16_t*>(smem + st * S::kStageBytes);
    const uint8_t* idx = idx_at(st);
#pragma unroll
    for (int ks = 0; ks < kChunk / 16; ++ks) {
      // A[r, kk] = slab[r, col(kk)] for the lane's k columns 2t, 2t + 1, 2t + 8, 2t + 9.
      uint32_t af[WPW][2][4];
#pragma unroll
      for (int w = 0; w < WPW; ++w) {
        int col[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const int kk = ks * 16 + 2 * t + (q & 1) + (q >> 1) * 8;
          col[q] = kk / N * V + idx[kk * kWindowsPerTile + ws0 + w] % V;
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const uint16_t* r0 = slab + (warp_m * 32 + i * 16 + g) * S::kSlabStride;
          const uint16_t* r8 = r0 + 8 * S::kSlabStride;
          af[w][i][0] = Pack(r0[col[0]], r0[col[1]]);
          af[w][i][1] = Pack(r8[col[0]], r8[col[1]]);
          af[w][i][2] = Pack(r0[col[2]], r0[col[3]]);
          af[w][i][3] = Pack(r8[col[2]], r8[col[3]]);
        }
      }
      uint32_t bf[kFragsN][2];
      LoadB(b_at(st), ks * 16, warp_n * kWarpCols, lane, bf);
      MmaStep<T, WPW>(acc, af, bf);
    }
  }

  // Fragment (i, f): rows g and g + 8, columns 2t and 2t + 1.
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = warp_m * 32 + i * 16 + g + 8 * h;
      if (r >= rows_here) continue;
      float* o = b.out + static_cast<int64_t>(work.row_begin + r) * a.k + c0;
#pragma unroll
      for (int f = 0; f < kFragsN; ++f) {
        const int col = warp_n * kWarpCols + f * 8 + 2 * t;
        if (col < cols_here)
          *reinterpret_cast<float2*>(o + col) = make_float2(acc[i][f][2 * h], acc[i][f][2 * h + 1]);
      }
    }
}

}  // namespace samoyeds::cuda::bwd
