// The serving kernel's phase timeline (ffi/cuda/timeline.cuh) for kernel_harness.cu built
// with -DSAMOYEDS_TIMELINE: where a short call's time goes. One CUDA graph runs the kernel
// on weight copy 0, a one-thread stamp kernel, then the kernel on copy 1 (records are the
// second launch's; the stamp is when the first launch ended, so `launch` below is the gap
// a graph leaves between two kernels). Reported over the busy blocks (those with rows):
// the median and maximum of each phase, when the blocks started and ended, and how many
// busy blocks each SM ran.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "cuda/timeline.cuh"
#include "launch_timing.cuh"

__global__ void TimelineStamp(uint64_t* out) {
  uint64_t ns;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
  *out = ns;
}

template <typename F>
void ReportTimeline(const char* name, F&& launch_copy, int copies) {
  namespace sc = samoyeds::cuda;
  using sc::Phase;
  constexpr int kCapacity = 1 << 18;
  sc::TimelineRecord* d_records = nullptr;
  uint64_t* d_stamp = nullptr;
  CHECK(cudaMalloc(&d_records, kCapacity * sizeof(sc::TimelineRecord)));
  CHECK(cudaMemset(d_records, 0, kCapacity * sizeof(sc::TimelineRecord)));
  CHECK(cudaMalloc(&d_stamp, sizeof(uint64_t)));
  CHECK(cudaMemcpyToSymbol(sc::g_timeline, &d_records, sizeof(d_records)));
  CHECK(cudaMemcpyToSymbol(sc::g_timeline_capacity, &kCapacity, sizeof(int)));

  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  launch_copy(0, stream);
  TimelineStamp<<<1, 1, 0, stream>>>(d_stamp);
  launch_copy(1 % copies, stream);
  CHECK(cudaStreamEndCapture(stream, &graph));
  CHECK(cudaGraphInstantiate(&exec, graph, 0));
  CHECK(cudaGraphLaunch(exec, stream));
  CHECK(cudaStreamSynchronize(stream));

  std::vector<sc::TimelineRecord> rec(kCapacity);
  uint64_t stamp = 0;
  CHECK(cudaMemcpy(rec.data(), d_records, kCapacity * sizeof(sc::TimelineRecord),
                   cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(&stamp, d_stamp, sizeof(uint64_t), cudaMemcpyDeviceToHost));
  sc::TimelineRecord* null_records = nullptr;
  CHECK(cudaMemcpyToSymbol(sc::g_timeline, &null_records, sizeof(null_records)));
  CHECK(cudaGraphExecDestroy(exec));
  CHECK(cudaGraphDestroy(graph));
  CHECK(cudaStreamDestroy(stream));
  CHECK(cudaFree(d_records));
  CHECK(cudaFree(d_stamp));

  auto at = [](const sc::TimelineRecord& r, Phase p) { return r.global_ns[static_cast<int>(p)]; };
  auto cyc = [](const sc::TimelineRecord& r, Phase p) { return r.clock[static_cast<int>(p)]; };
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  std::vector<int> busy_per_sm(sms, 0);
  std::vector<double> start, end, busy_end, empty_life;
  std::vector<double> phase_ns[4], phase_cycles[4];
  for (const auto& r : rec) {
    if (at(r, Phase::kStart) == 0) continue;  // not launched (past the grid)
    start.push_back(double(at(r, Phase::kStart)) - double(stamp));
    end.push_back(double(at(r, Phase::kEnd)) - double(stamp));
    if (!r.busy) {
      empty_life.push_back(double(at(r, Phase::kEnd)) - double(at(r, Phase::kStart)));
      continue;
    }
    if (r.smid < static_cast<uint32_t>(sms)) ++busy_per_sm[r.smid];
    busy_end.push_back(end.back());
    for (int p = 0; p < 4; ++p) {
      phase_ns[p].push_back(double(at(r, Phase(p + 1))) - double(at(r, Phase(p))));
      phase_cycles[p].push_back(double(cyc(r, Phase(p + 1))) - double(cyc(r, Phase(p))));
    }
  }
  if (start.empty()) {
    std::printf("timeline %s: no records (built without -DSAMOYEDS_TIMELINE?)\n", name);
    return;
  }
  auto med = [](std::vector<double> v) {
    if (v.empty()) return 0.0;
    std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
    return v[v.size() / 2];
  };
  auto max = [](const std::vector<double>& v) {
    return v.empty() ? 0.0 : *std::max_element(v.begin(), v.end());
  };
  auto min = [](const std::vector<double>& v) {
    return v.empty() ? 0.0 : *std::min_element(v.begin(), v.end());
  };
  std::printf("timeline %s: %zu blocks, %zu busy; us after the previous kernel: first start "
              "%.2f, last start %.2f, busy ends median %.2f max %.2f, last end %.2f\n",
              name, start.size(), busy_end.size(), min(start) * 1e-3, max(start) * 1e-3,
              med(busy_end) * 1e-3, max(busy_end) * 1e-3, max(end) * 1e-3);
  const char* names[4] = {"prologue", "first stage", "main loop", "epilogue"};
  for (int p = 0; p < 4; ++p)
    std::printf("timeline %s:   %-11s median %7.2f us (%8.0f cycles)  max %7.2f us\n", name,
                names[p], med(phase_ns[p]) * 1e-3, med(phase_cycles[p]), max(phase_ns[p]) * 1e-3);
  std::printf("timeline %s:   empty blocks live median %.2f us\n", name, med(empty_life) * 1e-3);
  // The arrival curve: stage i's landing after the block's prologue, median over the busy
  // blocks that have a stage i (cycles at the SM clock, shown in us at 1.98 GHz).
  std::printf("timeline %s:   stage landed, us after the prologue (median):", name);
  for (int i = 0; i < sc::kTimelineStages; ++i) {
    std::vector<double> t;
    for (const auto& r : rec)
      if (at(r, Phase::kStart) != 0 && r.busy && r.stage_clock[i] != 0)
        t.push_back(double(r.stage_clock[i]) - double(cyc(r, Phase::kPrologue)));
    if (t.empty()) break;
    std::printf(" %.2f", med(t) / 1980.0);
  }
  std::printf("\n");
  int most = *std::max_element(busy_per_sm.begin(), busy_per_sm.end());
  std::printf("timeline %s:   SMs by busy blocks run:", name);
  for (int k = 0; k <= most; ++k)
    std::printf(" %d:%ld", k, static_cast<long>(std::count(busy_per_sm.begin(), busy_per_sm.end(), k)));
  std::printf("\n");
}
