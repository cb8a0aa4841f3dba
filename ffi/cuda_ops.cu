// CUDA handler of the sparse ragged dot: the Samoyeds dual-side sparse x sparse kernel.
//
// out[r, :] = x[src(r), :] @ W_e(r) for every routed row r, all experts in one launch.
// Computed transposed, C^T[M, R] = A[M, K] * X^T[K, R], so the sparse weight is the
// mma.sp A operand (kept rows x K, compressed 2:4) and routed rows are the N dimension.
//   * mma.sp::ordered_metadata m16n8k32, fp32 accumulation;
//   * global -> shared through a multi-stage cp.async pipeline (values, metadata and
//     activation rows); shared -> registers through ldmatrix; metadata arrives in
//     hardware order (ffi/format.h), one aligned 32-bit word per lane covers two k-steps;
//   * the SEL gather is fused into the activation loads (per-row source addresses);
//   * N:V: each window's partial product of a kept row is steered into the accumulator
//     of the output row its sub-row index names (V accumulators per kept row);
//   * the tile schedule (expert, row tile) is derived on the device from group_sizes,
//     so there is no host sync and the handler is command-buffer safe;
//   * the epilogue goes through shared memory and writes [R, M] rows with 16-byte stores.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "format.h"
#include "problem.h"

namespace samoyeds {
namespace {

// One tile configuration; every size below derives from these.
struct Tile {
  static constexpr int kBM = 64;  // kept rows per block
  static constexpr int kBN = 64;  // routed rows per block
  static constexpr int kBK = 128; // dense K per pipeline stage
  static constexpr int kStages = 3;
  static constexpr int kWarpsM = 2, kWarpsN = 2;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kFragsM = kBM / kWarpsM / 16;  // m16 fragments per warp
  static constexpr int kFragsN = kBN / kWarpsN / 8;   // n8 fragments per warp
  static constexpr int kStepK = 32;                   // dense K of one mma.sp
  static constexpr int kSteps = kBK / kStepK;         // mma k-steps per stage
  static constexpr int kARow = kBK / 2 * 2;           // bytes of one compressed row per stage
  static constexpr int kBRow = kBK * 2;               // bytes of one activation row per stage
  static constexpr int kMetaRow = kSteps * 4;         // bytes of metadata per kept row per stage
  static constexpr int kABytes = kBM * kARow;
  static constexpr int kBBytes = kBN * kBRow;
  static constexpr int kMetaBytes = kBM * kMetaRow;
  static constexpr int kStageBytes = kABytes + kBBytes + kMetaBytes;
  static constexpr int kPipeBytes = kStages * kStageBytes;
};
static_assert(Tile::kStepK == kMetaColsPerWord, "one metadata word per mma k-step");
static_assert(Tile::kSteps % 2 == 0, "metadata words are consumed in selector pairs");

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; src_bytes == 0 fills zeros without reading global memory.
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void CpAsync4(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void LdMatrixX4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T, int kSelector>
__device__ __forceinline__ void MmaSp(float (&d)[4], const uint32_t (&a)[4],
                                      const uint32_t (&b)[4], uint32_t meta) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, %13;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
          "r"(b[3]), "r"(meta), "n"(kSelector));
  } else {
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, %13;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]),
          "r"(b[3]), "r"(meta), "n"(kSelector));
  }
}

// XOR swizzles of 16-byte chunks: ldmatrix's 8 row addresses land in distinct banks.
__device__ __forceinline__ int SwizzleA(int row, int chunk) {
  return row * Tile::kARow + ((chunk ^ (row & 7)) << 4);
}
__device__ __forceinline__ int SwizzleB(int row, int chunk) {
  return row * Tile::kBRow + ((chunk ^ (row & 7)) << 4);
}

struct Args {
  const void* x;
  const void* values;
  const uint8_t* indices;
  const uint32_t* metadata;
  const int32_t* sel;
  const int32_t* group_sizes;
  void* out;
  int tokens, k, m, experts, kept_rows, rows, sub_row;
  bool has_sel;
};

// Which (expert, row tile) this block computes, from group_sizes on the device.
// Negative sizes count as 0 and ranges are clipped to the R output rows, so a bad
// group_sizes can never make the kernel touch memory outside its buffers.
struct Work {
  int expert;    // -1: a zero-fill tile of rows past sum(group_sizes)
  int row_begin; // first output row of this tile
  int row_end;   // one past the last valid output row of this tile
};

__device__ Work FindWork(const Args& a, int tile) {
  int seen = 0, row = 0;
  for (int e = 0; e < a.experts; ++e) {
    const int size = min(max(__ldg(a.group_sizes + e), 0), a.rows - row);
    const int tiles = (size + Tile::kBN - 1) / Tile::kBN;
    if (tile < seen + tiles) {
      const int begin = row + (tile - seen) * Tile::kBN;
      return {e, begin, min(begin + Tile::kBN, row + size)};
    }
    seen += tiles;
    row += size;
  }
  const int begin = row + (tile - seen) * Tile::kBN;
  return {-1, begin, min(begin + Tile::kBN, a.rows)};
}

template <typename T, int N, int V>
__global__ void __launch_bounds__(Tile::kThreads)
    RaggedDotKernel(const Args a) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ int src_row[Tile::kBN];  // token id of each routed row, -1 when absent

  constexpr int kOutRows = Tile::kBM / N * V;  // output rows (of M) per block
  const int m_tile = blockIdx.y;
  const int kept0 = m_tile * Tile::kBM;
  const int kept_here = min(Tile::kBM, a.kept_rows - kept0);
  const int out0 = kept0 / N * V;
  const int out_here = kept_here / N * V;
  const Work work = FindWork(a, blockIdx.x);
  if (work.row_begin >= work.row_end) return;
  T* out = static_cast<T*>(a.out);

  if (work.expert < 0) {  // rows past sum(group_sizes) are zero
    const int vec = out_here / 8;
    for (int i = threadIdx.x; i < (work.row_end - work.row_begin) * vec; i += Tile::kThreads) {
      const int r = work.row_begin + i / vec, c = out0 + (i % vec) * 8;
      *reinterpret_cast<uint4*>(out + static_cast<int64_t>(r) * a.m + c) = make_uint4(0, 0, 0, 0);
    }
    return;
  }

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp % Tile::kWarpsM, warp_n = warp / Tile::kWarpsM;
  const int e = work.expert;
  for (int i = tid; i < Tile::kBN; i += Tile::kThreads) {
    const int r = work.row_begin + i;
    int t = -1;
    if (r < work.row_end) {
      t = a.has_sel ? __ldg(a.sel + r) : r;
      if (t < 0 || t >= a.tokens) t = -1;  // an invalid SEL entry reads as a zero row
    }
    src_row[i] = t;
  }
  __syncthreads();

  const int half_k = a.k / 2, words = a.k / kMetaColsPerWord, windows = a.k / a.sub_row;
  const T* x = static_cast<const T*>(a.x);
  const T* values = static_cast<const T*>(a.values) + static_cast<int64_t>(e) * a.kept_rows * half_k;
  const uint32_t* meta = a.metadata + static_cast<int64_t>(e) * a.kept_rows * words;
  const uint8_t* indices = a.indices + static_cast<int64_t>(e) * a.kept_rows * windows;
  const int k_steps = a.k / Tile::kStepK;
  const int k_stages = (a.k + Tile::kBK - 1) / Tile::kBK;
  const uint32_t smem_base = SmemAddr(smem);

  auto load_stage = [&](int stage, int buf) {
    const uint32_t sa = smem_base + buf * Tile::kStageBytes;
    const uint32_t sb = sa + Tile::kABytes;
    const uint32_t sm = sb + Tile::kBBytes;
    const int k0 = stage * Tile::kBK;
    // Compressed values: kBM rows x (kBK/2) values = 8 chunks of 16 bytes per row.
    constexpr int kAChunks = Tile::kARow / 16;
    for (int i = tid; i < Tile::kBM * kAChunks; i += Tile::kThreads) {
      const int row = i / kAChunks, chunk = i % kAChunks;
      const int col = k0 / 2 + chunk * 8;
      const bool ok = row < kept_here && col < half_k;
      const T* src = ok ? values + static_cast<int64_t>(kept0 + row) * half_k + col : values;
      CpAsync16(sa + SwizzleA(row, chunk), src, ok ? 16 : 0);
    }
    // Activation rows through SEL: kBN rows x kBK values = 16 chunks per row.
    constexpr int kBChunks = Tile::kBRow / 16;
    for (int i = tid; i < Tile::kBN * kBChunks; i += Tile::kThreads) {
      const int row = i / kBChunks, chunk = i % kBChunks;
      const int col = k0 + chunk * 8;
      const int t = src_row[row];
      const bool ok = t >= 0 && col < a.k;
      const T* src = ok ? x + static_cast<int64_t>(t) * a.k + col : x;
      CpAsync16(sb + SwizzleB(row, chunk), src, ok ? 16 : 0);
    }
    // Metadata: kSteps words per kept row, copied word by word (K need not be a
    // multiple of kBK, only of 32).
    for (int i = tid; i < Tile::kBM * Tile::kSteps; i += Tile::kThreads) {
      const int row = i / Tile::kSteps, w = i % Tile::kSteps;
      const int word = k0 / kMetaColsPerWord + w;
      const bool ok = row < kept_here && word < words;
      const uint32_t* src = ok ? meta + static_cast<int64_t>(kept0 + row) * words + word : meta;
      CpAsync4(sm + row * Tile::kMetaRow + w * 4, src, ok ? 4 : 0);
    }
  };

  // Accumulators: V per kept row (the N:V candidates), plus this window's partial sums.
  float acc[V][Tile::kFragsM][Tile::kFragsN][4];
  float part[Tile::kFragsM][Tile::kFragsN][4];
#pragma unroll
  for (int v = 0; v < V; ++v)
#pragma unroll
    for (int i = 0; i < Tile::kFragsM; ++i)
#pragma unroll
      for (int j = 0; j < Tile::kFragsN; ++j)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[v][i][j][q] = 0.0f;

  const int g = lane >> 2, tq = lane & 3;
  // Kept rows of this lane's accumulator entries (rows g and g + 8 of each fragment).
  int my_kept[Tile::kFragsM][2];
  bool frag_ok[Tile::kFragsM];
#pragma unroll
  for (int i = 0; i < Tile::kFragsM; ++i) {
    const int r0 = warp_m * (Tile::kBM / Tile::kWarpsM) + i * 16;
    frag_ok[i] = r0 < kept_here;  // kept_here is a multiple of 16
    my_kept[i][0] = r0 + g;
    my_kept[i][1] = r0 + g + 8;
  }
  // Sub-row index of each of this lane's kept rows in the current window.
  uint8_t sub[Tile::kFragsM][2];
  auto load_sub = [&](int window, uint8_t (&dst)[Tile::kFragsM][2]) {
#pragma unroll
    for (int i = 0; i < Tile::kFragsM; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        dst[i][h] = frag_ok[i] ? static_cast<uint8_t>(
                                     __ldg(indices + static_cast<int64_t>(kept0 + my_kept[i][h]) *
                                                         windows + window) % V)
                               : 0;
  };
  const int steps_per_window = a.sub_row / Tile::kStepK;

  // Prologue.
#pragma unroll
  for (int s = 0; s < Tile::kStages - 1; ++s) {
    if (s < k_stages) load_stage(s, s);
    CpAsyncCommit();
  }

  for (int stage = 0; stage < k_stages; ++stage) {
    CpAsyncWait<Tile::kStages - 2>();
    __syncthreads();
    {
      const int next = stage + Tile::kStages - 1;
      if (next < k_stages) load_stage(next, next % Tile::kStages);
      CpAsyncCommit();
    }
    const int buf = stage % Tile::kStages;
    const uint32_t sa = smem_base + buf * Tile::kStageBytes;
    const uint32_t sb = sa + Tile::kABytes;
    const uint8_t* sm = smem + buf * Tile::kStageBytes + Tile::kABytes + Tile::kBBytes;

    uint32_t meta_word[Tile::kFragsM];
#pragma unroll
    for (int s = 0; s < Tile::kSteps; ++s) {
      const int ks = stage * Tile::kSteps + s;
      if (ks >= k_steps) break;
      if constexpr (V > 1) {
        if (ks % steps_per_window == 0) {
          load_sub(ks / steps_per_window, sub);
#pragma unroll
          for (int i = 0; i < Tile::kFragsM; ++i)
#pragma unroll
            for (int j = 0; j < Tile::kFragsN; ++j)
#pragma unroll
              for (int q = 0; q < 4; ++q) part[i][j][q] = 0.0f;
        }
      }
      if (s % 2 == 0) {
        // Lane (g, t) holds rows g + 8*(t&1) of step s + (t>>1): selector 0 then 1.
#pragma unroll
        for (int i = 0; i < Tile::kFragsM; ++i) {
          const int row = warp_m * (Tile::kBM / Tile::kWarpsM) + i * 16 + g + 8 * (tq & 1);
          meta_word[i] =
              reinterpret_cast<const uint32_t*>(sm + row * Tile::kMetaRow)[s + (tq >> 1)];
        }
      }
      uint32_t bfrag[Tile::kFragsN][4];
#pragma unroll
      for (int j = 0; j < Tile::kFragsN; ++j) {
        const int row = warp_n * (Tile::kBN / Tile::kWarpsN) + j * 8 + (lane & 7);
        LdMatrixX4(sb + SwizzleB(row, s * 4 + (lane >> 3)), bfrag[j]);
      }
#pragma unroll
      for (int i = 0; i < Tile::kFragsM; ++i) {
        if (!frag_ok[i]) continue;
        uint32_t afrag[4];
        const int row = warp_m * (Tile::kBM / Tile::kWarpsM) + i * 16 + (lane & 15);
        LdMatrixX4(sa + SwizzleA(row, s * 2 + (lane >> 4)), afrag);
#pragma unroll
        for (int j = 0; j < Tile::kFragsN; ++j) {
          float(&d)[4] = *(V > 1 ? &part[i][j] : &acc[0][i][j]);
          if (s % 2 == 0)
            MmaSp<T, 0>(d, afrag, bfrag[j], meta_word[i]);
          else
            MmaSp<T, 1>(d, afrag, bfrag[j], meta_word[i]);
        }
      }
      if constexpr (V > 1) {
        if ((ks + 1) % steps_per_window == 0) {
#pragma unroll
          for (int i = 0; i < Tile::kFragsM; ++i)
#pragma unroll
            for (int j = 0; j < Tile::kFragsN; ++j)
#pragma unroll
              for (int q = 0; q < 4; ++q) {
                const uint8_t which = sub[i][q >> 1];
#pragma unroll
                for (int v = 0; v < V; ++v) acc[v][i][j][q] += which == v ? part[i][j][q] : 0.0f;
              }
        }
      }
    }
  }
  CpAsyncWait<0>();
  __syncthreads();

  // Epilogue: accumulators -> shared [routed row][output row] fp32 -> 16-byte stores.
  constexpr int kCStride = kOutRows + 4;
  static_assert(Tile::kBN * kCStride * 4 <= Tile::kPipeBytes, "epilogue tile fits the pipeline");
  float* c_tile = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int slot = 0; slot < N; ++slot) {
#pragma unroll
    for (int i = 0; i < Tile::kFragsM; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int kept = my_kept[i][h];
        if (kept % N != slot) continue;
        const int block_row = kept / N * V;
#pragma unroll
        for (int j = 0; j < Tile::kFragsN; ++j)
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            const int n = warp_n * (Tile::kBN / Tile::kWarpsN) + j * 8 + 2 * tq + q;
#pragma unroll
            for (int v = 0; v < V; ++v) {
              float& dst = c_tile[n * kCStride + block_row + v];
              dst = (slot == 0 ? 0.0f : dst) + acc[v][i][j][2 * h + q];
            }
          }
      }
    __syncthreads();
  }
  const int vec = out_here / 8;
  for (int i = tid; i < (work.row_end - work.row_begin) * vec; i += Tile::kThreads) {
    const int n = i / vec, c = (i % vec) * 8;
    const float* src = c_tile + n * kCStride + c;
    alignas(16) T packed[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) packed[q] = static_cast<T>(src[q]);
    *reinterpret_cast<uint4*>(out + static_cast<int64_t>(work.row_begin + n) * a.m + out0 + c) =
        *reinterpret_cast<const uint4*>(packed);
  }
}

template <typename T, int N, int V>
cudaError_t Launch(cudaStream_t stream, const Args& a) {
  auto kernel = RaggedDotKernel<T, N, V>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         Tile::kPipeBytes);
  if (err != cudaSuccess) return err;
  // Upper bound on the tiles: sum_e ceil(size_e / BN) <= R / BN + E, plus the zero tiles.
  const int64_t tiles = (a.rows + Tile::kBN - 1) / Tile::kBN + a.experts + 1;
  const dim3 grid(static_cast<unsigned>(tiles), (a.kept_rows + Tile::kBM - 1) / Tile::kBM);
  kernel<<<grid, Tile::kThreads, Tile::kPipeBytes, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t Dispatch(cudaStream_t stream, const Args& a, int n, int v) {
  if (n == 1 && v == 1) return Launch<T, 1, 1>(stream, a);
  if (n == 1 && v == 2) return Launch<T, 1, 2>(stream, a);
  if (n == 1 && v == 4) return Launch<T, 1, 4>(stream, a);
  if (n == 2 && v == 4) return Launch<T, 2, 4>(stream, a);
  return cudaErrorInvalidValue;  // unreachable: CheckProblem refused it
}

ffi::Error RaggedDotCuda(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer values,
                         ffi::Buffer<ffi::U8> indices, ffi::Buffer<ffi::U32> metadata,
                         ffi::Buffer<ffi::S32> sel, ffi::Buffer<ffi::S32> group_sizes,
                         int64_t n, int64_t v, int64_t sub_row, int64_t has_sel,
                         ffi::Result<ffi::AnyBuffer> out) {
  Problem p;
  if (ffi::Error err = CheckProblem(x, values, indices, metadata, sel, group_sizes, n, v,
                                    sub_row, has_sel, *out, &p);
      err.failure())
    return err;
  if (p.rows == 0 || p.m == 0) return ffi::Error::Success();
  if (p.experts == 0 || p.kept_rows == 0 || p.k == 0) {
    // No expert or an empty weight: every output row is zero.
    if (cudaMemsetAsync(out->untyped_data(), 0, out->size_bytes(), stream) != cudaSuccess)
      return ffi::Error::Internal("samoyeds_ragged_dot: cudaMemsetAsync failed");
    return ffi::Error::Success();
  }
  const Args a{x.untyped_data(), values.untyped_data(), indices.typed_data(),
               metadata.typed_data(), sel.typed_data(), group_sizes.typed_data(),
               out->untyped_data(), static_cast<int>(p.tokens), static_cast<int>(p.k),
               static_cast<int>(p.m), static_cast<int>(p.experts),
               static_cast<int>(p.kept_rows), static_cast<int>(p.rows),
               static_cast<int>(p.sub_row), p.has_sel};
  const cudaError_t err = p.dtype == ffi::DataType::BF16
                              ? Dispatch<__nv_bfloat16>(stream, a, static_cast<int>(n),
                                                        static_cast<int>(v))
                              : Dispatch<__half>(stream, a, static_cast<int>(n),
                                                 static_cast<int>(v));
  if (err != cudaSuccess)
    return ffi::Error::Internal(std::string("samoyeds_ragged_dot: kernel launch failed: ") +
                                cudaGetErrorString(err));
  return ffi::Error::Success();
}

}  // namespace
}  // namespace samoyeds

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    SamoyedsRaggedDotCuda, samoyeds::RaggedDotCuda,
    SAMOYEDS_BIND_RAGGED_DOT(
        xla::ffi::Ffi::Bind().Ctx<xla::ffi::PlatformStream<cudaStream_t>>()),
    {xla::ffi::Traits::kCmdBufferCompatible});
