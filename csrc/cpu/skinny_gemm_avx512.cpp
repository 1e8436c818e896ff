// The streaming kernel's AVX-512 code (skinny_gemm.cpp calls it where the CPU has it). This file
// includes no torch header: see skinny_tile.h.
// - fp32 x and weights, 8+ rows: 32 zmm registers hold a 4x6 tile of 16-float accumulators (24, plus 6
//   weight vectors and one x); each weight load serves 4 x rows and each x load 6 weight rows at twice
//   the width of AVX2: ~1.1x the speed of the AVX2 4x3 tile at 16-64 rows on a Zen 4, and 4x6 ~1.05x
//   4x4. (bf16 weights without AVX512_BF16 use the AVX2 tiles.)
// - bf16 x and weights on CPUs with AVX512_BF16: vdpbf16ps multiplies 32 bf16 pairs into 16 fp32 sums
//   per instruction, twice the products of an fp32 FMA: 300-390 GFLOP/s at 16-128 rows on a Zen 4,
//   where BLAS reached ~170 at 16 rows.
#include <immintrin.h>

#include <cstdint>

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
// GCC 12's _mm512_reduce_add_ps starts from _mm256_undefined_pd(), which -Wuninitialized flags.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace moe_resilient {
namespace {

struct Vec512 {
  using reg = __m512;
  static constexpr int64_t width = 16;
  static inline reg zero() { return _mm512_setzero_ps(); }
  static inline reg load(const float* p) { return _mm512_loadu_ps(p); }
  static inline reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static inline float hsum(reg v) { return _mm512_reduce_add_ps(v); }
};

}  // namespace
}  // namespace moe_resilient

#include "skinny_tile.h"

namespace moe_resilient {

void skinny_tiles_avx512(const float* x, int64_t M, int64_t K, const float* W, int64_t N, float* y, int64_t t0,
                         int64_t t1) {
  column_tiles<Vec512, float>(x, M, K, W, N, y, 4, 6, t0, t1);
}

}  // namespace moe_resilient

#pragma GCC diagnostic pop
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bf16,avx2,fma")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace moe_resilient {
namespace {

// Rows m0..m0+MR of x [M, K] against rows n0..n0+NR of W [N, K], both bf16, into y [M, N] fp32: 32 k
// per step, each accumulator lane summing adjacent pairs. Prefetch as in skinny_tile.h.
template <int64_t MR, int64_t NR>
void dp_tile(const uint16_t* x, int64_t m0, int64_t K, const uint16_t* W, int64_t n0, int64_t N, float* y,
             Prefetch pf) {
  constexpr int64_t mr = MR, nr = NR;
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int64_t i = 0; i < mr; ++i)
#pragma GCC unroll 8
    for (int64_t j = 0; j < nr; ++j) acc[i][j] = _mm512_setzero_ps();
  const int64_t K32 = K - K % 32;
  const uint16_t* next = static_cast<const uint16_t*>(pf.next);
  int64_t pf_wait = 1, pf_k = pf.pass * (K / pf.passes);
  for (int64_t k = 0; k < K32; k += 32) {
    __m512bh w[NR];
#pragma GCC unroll 8
    for (int64_t j = 0; j < nr; ++j) w[j] = (__m512bh)_mm512_loadu_si512(W + (n0 + j) * K + k);
    if (next != nullptr && --pf_wait == 0) {
      pf_wait = pf.passes;
#pragma GCC unroll 8
      for (int64_t j = 0; j < nr; ++j) __builtin_prefetch(next + j * K + pf_k, 0, 3);
      pf_k += 32;
    }
#pragma GCC unroll 8
    for (int64_t i = 0; i < mr; ++i) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + (m0 + i) * K + k);
#pragma GCC unroll 8
      for (int64_t j = 0; j < nr; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, w[j]);
    }
  }
#pragma GCC unroll 8
  for (int64_t i = 0; i < mr; ++i) {
#pragma GCC unroll 8
    for (int64_t j = 0; j < nr; ++j) {
      float s = _mm512_reduce_add_ps(acc[i][j]);
      for (int64_t k = K32; k < K; ++k)
        s += bf16_bits_to_float(x[(m0 + i) * K + k]) * bf16_bits_to_float(W[(n0 + j) * K + k]);
      y[(m0 + i) * N + n0 + j] = s;
    }
  }
}

template <int64_t MR>
void dp_tile_cols(const uint16_t* x, int64_t m0, int64_t K, const uint16_t* W, int64_t n0, int64_t nr, int64_t N,
                  float* y, Prefetch pf) {
  switch (nr) {
    case 6: return dp_tile<MR, 6>(x, m0, K, W, n0, N, y, pf);
    case 5: return dp_tile<MR, 5>(x, m0, K, W, n0, N, y, pf);
    case 4: return dp_tile<MR, 4>(x, m0, K, W, n0, N, y, pf);
    case 3: return dp_tile<MR, 3>(x, m0, K, W, n0, N, y, pf);
    case 2: return dp_tile<MR, 2>(x, m0, K, W, n0, N, y, pf);
    default: return dp_tile<MR, 1>(x, m0, K, W, n0, N, y, pf);
  }
}

}  // namespace

// Weight rows n0..n1 one at a time (one sequential stream per core) against each of the M (1-2) rows of
// x: one 64-byte load of weights and one vdpbf16ps per 32 products, a sixth of the instructions of
// widening to fp32. Both keep up with memory at 30 GB/s; with weights partly in L3 (16 MiB) this one
// streamed 2 rows at 31 GB/s of weights against 18 GB/s widening.
void rows_bf16dp(const uint16_t* x, int64_t M, int64_t K, const uint16_t* W, int64_t N, float* y, int64_t n0,
                 int64_t n1) {
  const int64_t K64 = K - K % 64, K32 = K - K % 32;
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* w = W + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const uint16_t* xm = x + m * K;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0;
      int64_t k = 0;
      for (; k < K64; k += 64) {
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(xm + k), (__m512bh)_mm512_loadu_si512(w + k));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(xm + k + 32), (__m512bh)_mm512_loadu_si512(w + k + 32));
      }
      for (; k < K32; k += 32)
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(xm + k), (__m512bh)_mm512_loadu_si512(w + k));
      float s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
      for (; k < K; ++k) s += bf16_bits_to_float(xm[k]) * bf16_bits_to_float(w[k]);
      y[m * N + n] = s;
    }
  }
}

// Column tiles t0..t1 of 6 weight rows (24 accumulators + 6 weight registers + 1 x register of the 32),
// x rows in passes of 4.
void skinny_tiles_bf16dp(const uint16_t* x, int64_t M, int64_t K, const uint16_t* W, int64_t N, float* y, int64_t t0,
                         int64_t t1) {
  tile_passes(M, K, W, N, 4, 6, t0, t1, [&](int64_t m0, int64_t rows, int64_t n0, int64_t cols, Prefetch pf) {
    switch (rows) {
      case 4: return dp_tile_cols<4>(x, m0, K, W, n0, cols, N, y, pf);
      case 3: return dp_tile_cols<3>(x, m0, K, W, n0, cols, N, y, pf);
      case 2: return dp_tile_cols<2>(x, m0, K, W, n0, cols, N, y, pf);
      default: return dp_tile_cols<1>(x, m0, K, W, n0, cols, N, y, pf);
    }
  });
}

}  // namespace moe_resilient

#pragma GCC diagnostic pop
#pragma GCC pop_options
