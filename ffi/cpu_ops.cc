// CPU handler of the sparse ragged dot: works on the stored compressed form (work
// proportional to the kept values times the routed rows), float32 accumulation, on the
// threads of XLA's CPU pool. It is the reference the CUDA kernel is checked against and
// what CI and CPU users run. The compute is in cpu_kernel.h, the work sharing in
// cpu_threads.h.
#include <algorithm>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "cpu_kernel.h"
#include "cpu_threads.h"
#include "format.h"
#include "problem.h"

// x86-64: the hot functions are compiled for the baseline ISA and for x86-64-v3 (AVX2,
// FMA, F16C), chosen once at load time, so the extension runs on any x86-64 CPU. The two
// clones differ in the last bits of a result (FMA rounds once); each gives the same bits
// on every run.
#if defined(__x86_64__) && defined(__linux__) && defined(__has_attribute) && \
    !defined(SAMOYEDS_NO_CPU_DISPATCH)
#if __has_attribute(target_clones)
#define SAMOYEDS_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
#endif
#ifndef SAMOYEDS_CPU_CLONES
#define SAMOYEDS_CPU_CLONES
#endif

namespace samoyeds {
namespace {

using cpu::Item;
using cpu::Tile;

// Panels of at most this many bytes are built at once (the tiles are processed in chunks).
constexpr int64_t kPanelBudget = int64_t{8} << 20;
constexpr size_t kAlign = 64;

// The entry points compiled per instruction set; the width is one of cpu::kTileWidths.
SAMOYEDS_CPU_CLONES void BuildPanel(bool bf16, int width, const uint16_t* x,
                                    const int32_t* sel, int64_t k, const Tile& tile,
                                    float* panel) {
  if (bf16) {
    if (width == 8) cpu::BuildPanelImpl<true, 8>(x, sel, k, tile, panel);
    if (width == 16) cpu::BuildPanelImpl<true, 16>(x, sel, k, tile, panel);
    if (width == 32) cpu::BuildPanelImpl<true, 32>(x, sel, k, tile, panel);
  } else {
    if (width == 8) cpu::BuildPanelImpl<false, 8>(x, sel, k, tile, panel);
    if (width == 16) cpu::BuildPanelImpl<false, 16>(x, sel, k, tile, panel);
    if (width == 32) cpu::BuildPanelImpl<false, 32>(x, sel, k, tile, panel);
  }
}

SAMOYEDS_CPU_CLONES void RunItem(bool bf16, int width, const cpu::Weights& wt,
                                 const cpu::Shape& s, const Tile* tiles, const float* panels,
                                 const Item& it, const cpu::Scratch& sc, uint16_t* out) {
  if (bf16) {
    if (width == 8) cpu::RunItemImpl<true, 8>(wt, s, tiles, panels, it, sc, out);
    if (width == 16) cpu::RunItemImpl<true, 16>(wt, s, tiles, panels, it, sc, out);
    if (width == 32) cpu::RunItemImpl<true, 32>(wt, s, tiles, panels, it, sc, out);
  } else {
    if (width == 8) cpu::RunItemImpl<false, 8>(wt, s, tiles, panels, it, sc, out);
    if (width == 16) cpu::RunItemImpl<false, 16>(wt, s, tiles, panels, it, sc, out);
    if (width == 32) cpu::RunItemImpl<false, 32>(wt, s, tiles, panels, it, sc, out);
  }
}

// The tile width with the least inner-loop time for these group sizes: every expert's
// rows are rounded up to whole tiles, and a lane of a wider tile costs less (fewer
// decoded values loaded per FMA; relative per-lane times measured on AVX2).
int ChooseWidth(const std::vector<int64_t>& offset) {
  constexpr int kLaneCost[] = {5, 4, 3};
  static_assert(sizeof(kLaneCost) == sizeof(cpu::kTileWidths));
  int best = cpu::kTileWidths[0];
  int64_t best_cost = -1;
  for (size_t i = 0; i < sizeof(kLaneCost) / sizeof(int); ++i) {
    const int64_t w = cpu::kTileWidths[i];
    int64_t lanes = 0;
    for (size_t e = 0; e + 1 < offset.size(); ++e)
      lanes += (offset[e + 1] - offset[e] + w - 1) / w * w;
    if (best_cost < 0 || lanes * kLaneCost[i] <= best_cost) {
      best_cost = lanes * kLaneCost[i];
      best = static_cast<int>(w);
    }
  }
  return best;
}

// Grow-only buffers of the calling thread, reused across calls (no allocation per call
// once warm). Helper threads only use them while the call is running.
struct CallBuffers {
  std::vector<int64_t> offset;
  std::vector<Tile> tiles;
  std::vector<Item> items;
  std::vector<cpu::Scratch> scratch;
  std::unique_ptr<char[]> bytes;
  size_t capacity = 0;

  char* Bytes(size_t n) {
    if (n + kAlign > capacity) {
      bytes.reset();
      capacity = 0;
      bytes.reset(new char[n + kAlign]);
      capacity = n + kAlign;
    }
    const uintptr_t p = reinterpret_cast<uintptr_t>(bytes.get());
    return bytes.get() + ((kAlign - p % kAlign) % kAlign);
  }
};

size_t RoundUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Routing and stored indices, refused before any output is written.
ffi::Error CheckRouting(const Problem& p, const int32_t* gs, const int32_t* sel,
                        const uint8_t* idx, std::vector<int64_t>& offset) {
  offset.assign(p.experts + 1, 0);
  for (int64_t e = 0; e < p.experts; ++e) {
    if (gs[e] < 0) return Bad("group_sizes[" + std::to_string(e) + "] is negative");
    offset[e + 1] = offset[e] + gs[e];
  }
  if (offset[p.experts] > p.rows)
    return Bad("sum(group_sizes)=" + std::to_string(offset[p.experts]) +
               " exceeds the R=" + std::to_string(p.rows) + " output rows");
  if (p.has_sel) {
    for (int64_t r = 0; r < offset[p.experts]; ++r)
      if (sel[r] < 0 || sel[r] >= p.tokens)
        return Bad("sel[" + std::to_string(r) + "]=" + std::to_string(sel[r]) +
                   " is not a token id in [0, " + std::to_string(p.tokens) + ")");
  }
  // Only the experts that own rows are read.
  const int64_t windows = p.k / p.sub_row, per_expert = p.kept_rows * windows;
  for (int64_t e = 0; e < p.experts; ++e) {
    if (offset[e + 1] == offset[e]) continue;
    const uint8_t* ie = idx + e * per_expert;
    for (int64_t i = 0; i < per_expert; ++i)
      if (ie[i] >= p.v)
        return Bad("indices value " + std::to_string(ie[i]) + " at expert " +
                   std::to_string(e) + ", kept row " + std::to_string(i / windows) +
                   ", window " + std::to_string(i % windows) + " is not below V=" +
                   std::to_string(p.v));
  }
  return ffi::Error::Success();
}

ffi::Error RaggedDotCpu(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer values,
                        ffi::Buffer<ffi::U8> indices, ffi::Buffer<ffi::U32> metadata,
                        ffi::Buffer<ffi::S32> sel, ffi::Buffer<ffi::S32> group_sizes,
                        int64_t n, int64_t v, int64_t sub_row, int64_t has_sel, int64_t glu,
                        int64_t kernel, int64_t splits, ffi::Result<ffi::AnyBuffer> out) {
  Problem p;
  if (ffi::Error err = CheckProblem(x, values, indices, metadata, sel, group_sizes, n, v,
                                    sub_row, has_sel, glu, kernel, splits, *out, &p);
      err.failure())
    return err;
  if (ffi::Error err = CheckPattern(indices, metadata, group_sizes, p); err.failure())
    return err;
  // A thread_local is not captured by the lambdas below: they run on other threads, so
  // they see the calling thread's buffers through this reference only.
  static thread_local CallBuffers tls_buffers;
  CallBuffers& buf = tls_buffers;
  const int32_t* sel_data = p.has_sel ? sel.typed_data() : nullptr;
  try {
    if (ffi::Error err = CheckRouting(p, group_sizes.typed_data(), sel_data,
                                      indices.typed_data(), buf.offset);
        err.failure())
      return err;
    const std::vector<int64_t>& offset = buf.offset;
    uint16_t* o = static_cast<uint16_t*>(out->untyped_data());
    std::memset(o + offset[p.experts] * p.out_cols, 0,
                static_cast<size_t>((p.rows - offset[p.experts]) * p.out_cols) * 2);

    // Tiles of `width` routed rows, never across experts.
    const int width = ChooseWidth(offset);
    buf.tiles.clear();
    for (int64_t e = 0; e < p.experts; ++e)
      for (int64_t r = offset[e]; r < offset[e + 1]; r += width)
        buf.tiles.push_back(
            Tile{r, static_cast<int>(std::min<int64_t>(width, offset[e + 1] - r)),
                 static_cast<int>(e)});
    const int64_t n_tiles = static_cast<int64_t>(buf.tiles.size());
    if (n_tiles == 0) return ffi::Error::Success();

    const cpu::Shape shape{p.k, p.kept_rows, p.out_cols, static_cast<int>(p.n),
                           static_cast<int>(p.v), static_cast<int>(p.sub_row), p.glu};
    const int64_t panel_floats = p.k * width;
    const int64_t chunk_tiles =
        std::max<int64_t>(1, kPanelBudget / (panel_floats * int64_t{sizeof(float)}));
    const int item_tiles = cpu::kItemRows / width;
    const int workers = CpuWorkers(pool);
    // Layout: panels, then per worker: values, offsets, accumulator row bases and rows,
    // accumulators, rounded outputs.
    const int64_t acc_rows = cpu::AccRows(shape, cpu::kRowBlock);
    const size_t panel_bytes =
        RoundUp(std::min(chunk_tiles, n_tiles) * panel_floats * sizeof(float));
    const size_t vals_bytes = RoundUp(cpu::kScratchValues * sizeof(float));
    const size_t offs_bytes = RoundUp(cpu::kScratchValues * sizeof(uint16_t));
    const size_t orow_bytes = RoundUp(cpu::kMaxSegments * cpu::kRowBlock * sizeof(int32_t));
    const size_t acc_bytes = RoundUp(cpu::kItemRows * acc_rows * sizeof(float));
    const size_t stage_bytes = RoundUp(width * acc_rows * sizeof(uint16_t));
    const size_t worker_bytes =
        vals_bytes + offs_bytes + 2 * orow_bytes + acc_bytes + stage_bytes;
    char* bytes = buf.Bytes(panel_bytes + workers * worker_bytes);
    float* panels = reinterpret_cast<float*>(bytes);
    std::vector<cpu::Scratch>& scratch = buf.scratch;
    scratch.resize(workers);
    for (int w = 0; w < workers; ++w) {
      char* b = bytes + panel_bytes + w * worker_bytes;
      scratch[w].vals = reinterpret_cast<float*>(b);
      scratch[w].offs = reinterpret_cast<uint16_t*>(b += vals_bytes);
      scratch[w].obase = reinterpret_cast<int32_t*>(b += offs_bytes);
      scratch[w].orow = reinterpret_cast<int32_t*>(b += orow_bytes);
      scratch[w].acc = reinterpret_cast<float*>(b += orow_bytes);
      scratch[w].stage = reinterpret_cast<uint16_t*>(b += acc_bytes);
    }

    const bool bf16 = p.dtype == ffi::DataType::BF16;
    const uint16_t* xs = static_cast<const uint16_t*>(x.untyped_data());
    const uint16_t* vals = static_cast<const uint16_t*>(values.untyped_data());
    const int64_t block_rows = p.glu != kGluNone ? p.kept_rows / 2 : p.kept_rows;
    for (int64_t c0 = 0; c0 < n_tiles; c0 += chunk_tiles) {
      const int64_t c1 = std::min(n_tiles, c0 + chunk_tiles);
      const Tile* tiles = buf.tiles.data() + c0;
      ParallelFor(pool, workers, c1 - c0, [&](int64_t t, int) {
        BuildPanel(bf16, width, xs, sel_data, p.k, tiles[t], panels + t * panel_floats);
      });
      // Items: runs of up to item_tiles tiles of one expert x blocks of kept rows.
      buf.items.clear();
      for (int64_t t = 0; t < c1 - c0;) {
        int run = 1;
        while (run < item_tiles && t + run < c1 - c0 &&
               tiles[t + run].expert == tiles[t].expert)
          ++run;
        for (int64_t kb = 0; kb < block_rows; kb += cpu::kRowBlock)
          buf.items.push_back(Item{t, run, static_cast<int>(kb),
                                   static_cast<int>(std::min<int64_t>(cpu::kRowBlock,
                                                                      block_rows - kb))});
        t += run;
      }
      const std::vector<Item>& items = buf.items;
      ParallelFor(pool, workers, static_cast<int64_t>(items.size()),
                  [&](int64_t i, int worker) {
                    const Item& it = items[i];
                    const int64_t e = tiles[it.tile0].expert;
                    const int64_t words = p.k / kMetaColsPerWord;
                    const cpu::Weights wt{vals + e * p.kept_rows * (p.k / 2),
                                          indices.typed_data() +
                                              e * p.kept_rows * (p.k / p.sub_row),
                                          metadata.typed_data() + e * p.kept_rows * words};
                    RunItem(bf16, width, wt, shape, tiles, panels, it, scratch[worker], o);
                  });
    }
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                      "samoyeds_ragged_dot: out of host memory for the CPU work buffers");
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace samoyeds

XLA_FFI_DEFINE_HANDLER_SYMBOL(SamoyedsRaggedDotCpu, samoyeds::RaggedDotCpu,
                              SAMOYEDS_BIND_RAGGED_DOT(
                                  xla::ffi::Ffi::Bind().Ctx<xla::ffi::ThreadPool>()));
