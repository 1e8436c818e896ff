#include "skinny_gemm.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>

namespace moe_resilient {
namespace {

__attribute__((target("avx2,fma"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

__attribute__((target("avx2,fma"))) inline __m256 load8(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

// Where a tile pass prefetches the next tile's weight rows: pass `pass` of `passes` over the x rows
// pulls in the pass-th share of them, so memory stays busy through all passes instead of only the first
// (at 8-16 rows, 1.2x the speed of prefetching everything in the first pass).
struct Prefetch {
  const void* next;  // first weight row of the next tile; nullptr: none
  int64_t pass, passes;
};

// One tile: rows m0..m0+MR of x against rows n0..n0+NR of W. Compile-time sizes keep acc in registers.
template <typename W_t, int64_t MR, int64_t NR>
__attribute__((target("avx2,fma"))) void tile(const float* x, int64_t m0, int64_t K, const W_t* W, int64_t n0,
                                              int64_t N, float* y, Prefetch pf) {
  constexpr int64_t mr = MR, nr = NR;
  // Every loop over MR/NR is unrolled by pragma: GCC scalarises acc into registers only when its indices
  // are constants before its SRA pass, otherwise it mirrors every FMA with a dead store to the stack.
  __m256 acc[MR][NR];
#pragma GCC unroll 4
  for (int64_t i = 0; i < mr; ++i)
#pragma GCC unroll 4
    for (int64_t j = 0; j < nr; ++j) acc[i][j] = _mm256_setzero_ps();
  const int64_t K8 = K - K % 8;
  const W_t* next = static_cast<const W_t*>(pf.next);
  int64_t pf_wait = 1, pf_k = pf.pass * (K / pf.passes);  // one prefetch per row every `passes` steps
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 w[NR];
#pragma GCC unroll 4
    for (int64_t j = 0; j < nr; ++j) w[j] = load8(W + (n0 + j) * K + k);
    if (next != nullptr && --pf_wait == 0) {
      pf_wait = pf.passes;
#pragma GCC unroll 4
      for (int64_t j = 0; j < nr; ++j) _mm_prefetch(reinterpret_cast<const char*>(next + j * K + pf_k), _MM_HINT_T0);
      pf_k += 8;
    }
#pragma GCC unroll 4
    for (int64_t i = 0; i < mr; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + (m0 + i) * K + k);
#pragma GCC unroll 4
      for (int64_t j = 0; j < nr; ++j) acc[i][j] = _mm256_fmadd_ps(xv, w[j], acc[i][j]);
    }
  }
#pragma GCC unroll 4
  for (int64_t i = 0; i < mr; ++i) {
#pragma GCC unroll 4
    for (int64_t j = 0; j < nr; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t k = K8; k < K; ++k) s += x[(m0 + i) * K + k] * static_cast<float>(W[(n0 + j) * K + k]);
      y[(m0 + i) * N + n0 + j] = s;
    }
  }
}

template <typename W_t, int64_t MR>
void tile_cols(const float* x, int64_t m0, int64_t K, const W_t* W, int64_t n0, int64_t nr, int64_t N, float* y,
               Prefetch pf) {
  switch (nr) {
    case 4: return tile<W_t, MR, 4>(x, m0, K, W, n0, N, y, pf);
    case 3: return tile<W_t, MR, 3>(x, m0, K, W, n0, N, y, pf);
    case 2: return tile<W_t, MR, 2>(x, m0, K, W, n0, N, y, pf);
    default: return tile<W_t, MR, 1>(x, m0, K, W, n0, N, y, pf);
  }
}

template <typename W_t>
void tile_any(const float* x, int64_t m0, int64_t mr, int64_t K, const W_t* W, int64_t n0, int64_t nr, int64_t N,
              float* y, Prefetch pf) {
  switch (mr) {
    case 4: return tile_cols<W_t, 4>(x, m0, K, W, n0, nr, N, y, pf);
    case 3: return tile_cols<W_t, 3>(x, m0, K, W, n0, nr, N, y, pf);
    case 2: return tile_cols<W_t, 2>(x, m0, K, W, n0, nr, N, y, pf);
    default: return tile_cols<W_t, 1>(x, m0, K, W, n0, nr, N, y, pf);
  }
}

// y[m, n] for m < M and one weight row w = W[n]: the row streams from memory once, the other rows of x
// reuse it from L1. Four accumulators cover one 64-byte line of fp32 x per step.
template <typename W_t>
__attribute__((target("avx2,fma"))) void row_dots(const float* x, int64_t M, int64_t K, const W_t* w, float* y,
                                                  int64_t N) {
  const int64_t K32 = K - K % 32, K8 = K - K % 8;
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k < K32; k += 32) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k), load8(w + k), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k + 8), load8(w + k + 8), a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k + 16), load8(w + k + 16), a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k + 24), load8(w + k + 24), a3);
    }
    for (; k < K8; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k), load8(w + k), a0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; ++k) s += xm[k] * static_cast<float>(w[k]);
    y[m * N] = s;
  }
}

template <typename W_t>
void skinny(const float* x, int64_t M, int64_t K, const W_t* W, int64_t N, float* y) {
  // Shapes chosen by measuring on weights streamed from memory (rows of 1024-2048 fp32 or bf16):
  // - 1-3 rows: one weight row at a time, a single sequential stream per core. Register tiles over
  //   several weight rows read short interleaved streams, which the hardware prefetcher follows worse:
  //   bf16 at 1 row streamed at 16 GB/s that way, at the 32 GB/s of a plain sum this way.
  // - 4-7 rows: a 2x4 tile (2 x rows, 4 weight rows), 1.2x the speed of 4x3 at 4 rows.
  // - from 8 rows: a 4x3 tile, the most reuse of each weight load within the 16 ymm registers.
  if (M <= 3) {
    at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) row_dots(x, M, K, W + n * K, y + n, N);
    });
    return;
  }
  const int64_t mr = M < 8 ? 2 : 4, nr = M < 8 ? 4 : 3;
  const int64_t col_tiles = (N + nr - 1) / nr, passes = (M + mr - 1) / mr;
  // Each task streams >= 48 weight rows, so both cores run without per-tile scheduling cost.
  at::parallel_for(0, col_tiles, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * nr, ncols = std::min(nr, N - n0);
      const W_t* next = (t + 1 < t1 && n0 + 2 * nr <= N) ? W + (n0 + nr) * K : nullptr;
      for (int64_t p = 0; p < passes; ++p)
        tile_any(x, p * mr, std::min(mr, M - p * mr), K, W, n0, ncols, N, y, Prefetch{next, p, passes});
    }
  });
}

}  // namespace

bool skinny_gemm_available() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

void skinny_gemm_nt(const float* x, int64_t M, int64_t K, const float* W, int64_t N, float* y) {
  skinny(x, M, K, W, N, y);
}

void skinny_gemm_nt(const float* x, int64_t M, int64_t K, const c10::BFloat16* W, int64_t N, float* y) {
  skinny(x, M, K, W, N, y);
}

}  // namespace moe_resilient
