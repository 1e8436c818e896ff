// The streaming kernel's register tiles with AVX-512 (skinny_gemm.cpp calls them from 8 rows up when the
// CPU has it). 32 zmm registers hold a 4x4 tile of 16-float accumulators: each weight load serves 4 x rows
// and each x load 4 weight rows at twice the width of AVX2, ~1.1x the speed of the AVX2 4x3 tile at
// 16-64 rows on a Zen 4. This file includes no torch header: see skinny_tile.h.
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
  static inline reg load(const uint16_t* p) {  // bf16 bits -> fp32: zero-extend, shift into the high half
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  }
  static inline reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static inline float hsum(reg v) { return _mm512_reduce_add_ps(v); }
};

}  // namespace
}  // namespace moe_resilient

#include "skinny_tile.h"

namespace moe_resilient {

void skinny_tiles_avx512(const float* x, int64_t M, int64_t K, const float* W, int64_t N, float* y, int64_t t0,
                         int64_t t1) {
  column_tiles<Vec512, float>(x, M, K, W, N, y, 4, 4, t0, t1);
}

void skinny_tiles_avx512(const float* x, int64_t M, int64_t K, const uint16_t* W, int64_t N, float* y, int64_t t0,
                         int64_t t1) {
  column_tiles<Vec512, uint16_t>(x, M, K, W, N, y, 4, 4, t0, t1);
}

}  // namespace moe_resilient

#pragma GCC diagnostic pop
#pragma GCC pop_options
