// The CPU's roofline for BENCHMARKS.md: the float32 FMA rate of 8-lane vectors (ten
// independent accumulators, registers only) and the read bandwidth of a 1 GiB array, on
// 1 and 2 threads. A probe of the machine it runs on, not part of the package:
//
//   g++ -O2 -march=native -pthread benchmarks/cpu_rates.cc -o /tmp/cpu_rates && /tmp/cpu_rates
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

typedef float Vec __attribute__((vector_size(32)));

namespace {

float FmaLoop(long n) {
  Vec b, c;
  for (int i = 0; i < 8; ++i) b[i] = 0.999f, c[i] = 0.001f;
  Vec a0 = {}, a1 = {}, a2 = {}, a3 = {}, a4 = {}, a5 = {}, a6 = {}, a7 = {}, a8 = {}, a9 = {};
  for (long i = 0; i < n; ++i) {
    a0 = a0 * b + c, a1 = a1 * b + c, a2 = a2 * b + c, a3 = a3 * b + c, a4 = a4 * b + c;
    a5 = a5 * b + c, a6 = a6 * b + c, a7 = a7 * b + c, a8 = a8 * b + c, a9 = a9 * b + c;
    // Keeps the accumulators in registers and the loop from being folded away.
    asm volatile("" : "+x"(a0), "+x"(a1), "+x"(a2), "+x"(a3), "+x"(a4), "+x"(a5), "+x"(a6),
                 "+x"(a7), "+x"(a8), "+x"(a9));
  }
  return (a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9)[0];
}

float ReadLoop(const Vec* p, long n, int reps) {
  Vec s0 = {}, s1 = {}, s2 = {}, s3 = {};
  for (int r = 0; r < reps; ++r)
    for (long i = 0; i < n; i += 4) s0 += p[i], s1 += p[i + 1], s2 += p[i + 2], s3 += p[i + 3];
  return (s0 + s1 + s2 + s3)[0];
}

template <typename F>
double Seconds(int threads, F f) {
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back(f, t);
  for (auto& t : pool) t.join();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main() {
  volatile float sink = 0;
  const long iters = 300000000;  // per thread; 10 FMAs of 8 lanes each
  for (int threads : {1, 2}) {
    const double s = Seconds(threads, [&](int) { sink = FmaLoop(iters); });
    std::printf("FMA rate, %d thread(s): %.1f GMAC/s\n", threads,
                threads * iters * 80.0 / s / 1e9);
  }
  const long bytes = 1L << 30, vecs = bytes / sizeof(Vec);
  std::vector<Vec> data(vecs);
  for (Vec& v : data)
    for (int i = 0; i < 8; ++i) v[i] = 1.0f;
  for (int threads : {1, 2}) {
    const long per = vecs / threads;
    const double s =
        Seconds(threads, [&](int t) { sink = ReadLoop(data.data() + t * per, per, 3); });
    std::printf("read bandwidth, %d thread(s): %.1f GB/s\n", threads, 3.0 * bytes / s / 1e9);
  }
  return 0;
}
