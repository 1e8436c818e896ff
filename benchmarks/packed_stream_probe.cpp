// Probe, not library code: how fast can ANY bf16 kernel multiply 16 rows of x by expert weights that
// stream from DRAM on this machine? It takes the formulation BLAS uses (weights pre-packed in VNNI pairs,
// 48-column panels, x broadcast, no horizontal sums), which the layer cannot use without changing its
// weight layout, and runs 8 experts' w13 (N 4096, K 1024), two threads, a 128 MiB sweep before each of
// 40 reps (unless a 5th argument is given); the median is printed. benchmarks/RESULTS.md has the figures.
//
//   g++ -O3 -march=native -fopenmp benchmarks/packed_stream_probe.cpp -o /tmp/probe
//   /tmp/probe M [kblock=128] [l2_ahead_bytes=65536] [experts=8] [nosweep]
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <algorithm>

static const int NR = 3, MR = 8, PANEL = 16 * NR;  // 48 columns
static inline uint16_t f2bf(float f) { uint32_t u; memcpy(&u, &f, 4); return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16); }
static inline float bf2f(uint16_t b) { uint32_t u = (uint32_t)b << 16; float f; memcpy(&f, &u, 4); return f; }

void* huge(size_t bytes) {
  void* p = aligned_alloc(2 << 20, (bytes + (2 << 20) - 1) / (2 << 20) * (2 << 20));
  madvise(p, bytes, MADV_HUGEPAGE);
  memset(p, 0, bytes);
  return p;
}

// Wp: [N/48][K/2][48] uint32 (pair of bf16 along k). x32: [M][K/2] uint32. y: [M][N] float.
__attribute__((target("avx512f,avx512bf16")))
void panel(const uint32_t* x32, int M, int K2, const uint32_t* Wp, float* y, int N, int p, int kb, int l2_ahead) {
  const uint32_t* Wpan = Wp + (size_t)p * K2 * PANEL;
  const char* pf = (const char*)Wpan + l2_ahead;

  for (int k0 = 0; k0 < K2; k0 += kb) {
    const int k1 = std::min(K2, k0 + kb);
    for (int m0 = 0; m0 < M; m0 += MR) {
      const int mr = std::min(MR, M - m0);
      __m512 acc[MR][NR];
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j)
          acc[i][j] = (k0 == 0 || i >= mr) ? _mm512_setzero_ps() : _mm512_loadu_ps(y + (size_t)(m0 + i) * N + p * PANEL + 16 * j);
      for (int k = k0; k < k1; ++k) {
        const uint32_t* wr = Wpan + (size_t)k * PANEL;
        if (m0 == 0) { _mm_prefetch(pf, _MM_HINT_T1); _mm_prefetch(pf + 64, _MM_HINT_T1); _mm_prefetch(pf + 128, _MM_HINT_T1); pf += 192; }
        __m512bh w[NR];
        for (int j = 0; j < NR; ++j) w[j] = (__m512bh)_mm512_loadu_si512(wr + 16 * j);
#pragma GCC unroll 8
        for (int i = 0; i < MR; ++i) {
          const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)x32[(size_t)(m0 + i) * K2 + k]);
#pragma GCC unroll 3
          for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xb, w[j]);
        }
      }
      for (int i = 0; i < mr; ++i)
        for (int j = 0; j < NR; ++j) _mm512_storeu_ps(y + (size_t)(m0 + i) * N + p * PANEL + 16 * j, acc[i][j]);
    }
  }
}

int main(int argc, char** argv) {
  const int E = argc > 4 ? atoi(argv[4]) : 8, M = argc > 1 ? atoi(argv[1]) : 16, N = 4096, K = 1024, K2 = K / 2;
  const int kb = argc > 2 ? atoi(argv[2]) : 128, ahead = argc > 3 ? atoi(argv[3]) : 65536;
  const size_t wbytes = (size_t)N * K * 2;
  std::vector<uint32_t*> Wp(E);
  std::vector<uint16_t> Wrow((size_t)N * K);
  srand(1);
  for (int e = 0; e < E; ++e) {
    Wp[e] = (uint32_t*)huge(wbytes);
    for (auto& v : Wrow) v = f2bf((rand() / (float)RAND_MAX - 0.5f) * 0.1f);
    for (int p = 0; p < N / PANEL + (N % PANEL != 0); ++p)
      for (int k = 0; k < K2; ++k)
        for (int c = 0; c < PANEL; ++c) {
          const int n = p * PANEL + c;
          uint32_t v = 0;
          if (n < N) v = (uint32_t)Wrow[(size_t)n * K + 2 * k] | ((uint32_t)Wrow[(size_t)n * K + 2 * k + 1] << 16);
          Wp[e][((size_t)p * K2 + k) * PANEL + c] = v;
        }
    if (e == 0) {  // keep expert 0's row layout for the check
      std::vector<uint16_t> x((size_t)M * K);
      for (auto& v : x) v = f2bf(rand() / (float)RAND_MAX - 0.5f);
      std::vector<uint32_t> x32((size_t)M * K2);
      memcpy(x32.data(), x.data(), x.size() * 2);
      std::vector<float> y((size_t)M * N);
      for (int p = 0; p < N / PANEL; ++p) panel(x32.data(), M, K2, Wp[0], y.data(), N, p, kb, ahead);
      double err = 0;
      for (int m = 0; m < M; ++m) for (int n = 0; n < (N / PANEL) * PANEL; n += 37) {
        double s = 0; for (int k = 0; k < K; ++k) s += (double)bf2f(x[(size_t)m * K + k]) * bf2f(Wrow[(size_t)n * K + k]);
        err = std::max(err, std::abs(s - y[(size_t)m * N + n]));
      }
      printf("max err %.2e\n", err);
    }
  }
  std::vector<uint32_t> x32((size_t)M * K2, 0x3f803f80u);
  std::vector<float> y((size_t)E * M * N);
  const size_t sweep_n = 32 << 20; std::vector<float> sweep(sweep_n, 1.0f);
  const int panels = N / PANEL;  // 85 (the last 16 columns skipped in this prototype)
  std::vector<double> t;
  for (int rep = 0; rep < 40; ++rep) {
    if (argc <= 5) { volatile float s = 0; for (size_t i = 0; i < sweep_n; i += 16) s += sweep[i]; }
    auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(2)
    {
      const int tid = omp_get_thread_num();
      for (int e = 0; e < E; ++e) {
        const int p0 = panels * tid / 2, p1 = panels * (tid + 1) / 2;
        for (int p = p0; p < p1; ++p) panel(x32.data(), M, K2, Wp[e], y.data() + (size_t)e * M * N, N, p, kb, ahead);
      }
    }
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  const double med = t[t.size() / 2], flops = 2.0 * E * M * (double)panels * PANEL * K, bytes = (double)E * panels * PANEL * K * 2;
  printf("M=%d kb=%d ahead=%d: %.3f ms  %.0f GFLOP/s  %.1f GB/s of weights\n", M, kb, ahead, med * 1e3, flops / med / 1e9, bytes / med / 1e9);
}
