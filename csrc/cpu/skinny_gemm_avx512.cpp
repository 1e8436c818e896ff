// The streaming kernel's AVX-512 tiles for fp32 x and weights, 8+ rows (skinny_gemm.cpp calls them where
// the CPU has AVX-512; bf16 weights without AVX512_BF16 use the AVX2 tiles). 32 zmm registers hold a 4x6
// tile of 16-float accumulators (24, plus 6 weight vectors and one x); each weight load serves 4 x rows
// and each x load 6 weight rows at twice the width of AVX2: ~1.1x the speed of the AVX2 4x3 tile at
// 16-64 rows on a Zen 4, and 4x6 ~1.05x 4x4. This file includes no torch header: see skinny_tile.h.
#include <immintrin.h>

#include <cstdint>

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
// GCC 12's _mm512_reduce_add_ps starts from _mm256_undefined_pd(), which -Wuninitialized flags.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "vec512.h"

namespace moe_resilient {
namespace {

struct Vec512 : Acc512 {
  static constexpr int64_t width = 16;
  static inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  static inline acc madd(acc a, __m512 x, __m512 w) { return _mm512_fmadd_ps(x, w, a); }
};

}  // namespace
}  // namespace moe_resilient

#include "skinny_tile.h"

namespace moe_resilient {

void skinny_tiles_avx512(const float* x, int64_t M, int64_t K, const float* W, int64_t N, float* y, int64_t t0,
                         int64_t t1, const void* follow) {
  column_tiles<Vec512>(x, M, K, W, N, y, 4, 6, t0, t1, follow);
}

}  // namespace moe_resilient

#pragma GCC diagnostic pop
#pragma GCC pop_options
