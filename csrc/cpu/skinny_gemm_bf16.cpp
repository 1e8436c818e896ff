// The streaming kernel's bf16 x bf16 products on CPUs with AVX512_BF16 (skinny_gemm_bf16 in
// skinny_gemm.cpp calls them). vdpbf16ps multiplies 32 bf16 pairs into 16 fp32 sums per instruction,
// twice the products of an fp32 FMA: 4x6 tiles reach 300-390 GFLOP/s at 16-128 rows on a Zen 4, where
// BLAS reached ~170 at 16 rows; at 1-2 rows, one weight row at a time with a sixth of the instructions of
// widening to fp32 (with weights partly in L3, 2 rows streamed at 31 GB/s of weights against 18 GB/s
// widening). This file includes no torch header: see skinny_tile.h.
#include <immintrin.h>

#include <cstdint>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bf16,avx2,fma")
// GCC 12's _mm512_reduce_add_ps starts from _mm256_undefined_pd(), which -Wuninitialized flags.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "vec512.h"

namespace moe_resilient {
namespace {

struct VecBf16Dot : Acc512 {  // x and weights both bf16 bits; each accumulator lane sums adjacent pairs
  static constexpr int64_t width = 32;
  static inline __m512bh load(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static inline acc madd(acc a, __m512bh x, __m512bh w) { return _mm512_dpbf16_ps(a, x, w); }
};

}  // namespace
}  // namespace moe_resilient

#include "skinny_tile.h"

namespace moe_resilient {

void rows_bf16dp(const uint16_t* x, int64_t M, int64_t K, const uint16_t* W, int64_t N, float* y, int64_t n0,
                 int64_t n1) {
  row_dots<VecBf16Dot>(x, M, K, W, N, y, n0, n1);
}

// 24 accumulators + 6 weight registers + 1 x register of the 32.
void skinny_tiles_bf16dp(const uint16_t* x, int64_t M, int64_t K, const uint16_t* W, int64_t N, float* y, int64_t t0,
                         int64_t t1, const void* follow) {
  column_tiles<VecBf16Dot>(x, M, K, W, N, y, 4, 6, t0, t1, follow);
}

}  // namespace moe_resilient

#pragma GCC diagnostic pop
#pragma GCC pop_options
