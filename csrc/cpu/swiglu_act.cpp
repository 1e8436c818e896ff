// SwiGLU activation and bf16 roundings (swiglu_act.h): AVX2 loops (swiglu_rows.h), whose bf16 results
// are rounded by AVX2 integer steps, or on CPUs with AVX512_BF16 by vcvtneps2bf16: 0.41 against 0.64 ns
// an element in one thread on a Zen 4 (16 rows, fp32 h in, bf16 out), the same bits (a NaN may keep its
// sign). Includes no torch header: everything here is compiled for AVX2 or more, and no inline function
// of a shared header may become a symbol that a CPU without it could run.
#include "swiglu_act.h"

#include <immintrin.h>

#include <cmath>
#include <cstring>

namespace moe_resilient {
bool skinny_gemm_bf16_available();  // skinny_gemm.cpp: AVX512_BF16 present and AVX-512 allowed
}  // namespace moe_resilient

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace moe_resilient {
namespace {
namespace avx2 {

inline void store8(uint16_t* p, __m256 v) {  // round to nearest even, NaN stays a (quiet) NaN
  const __m256i u = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i b = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  b = _mm256_blendv_epi8(b, _mm256_set1_epi32(0x7FC0), nan);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

#include "swiglu_rows.h"

}  // namespace avx2
}  // namespace
}  // namespace moe_resilient
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512vl,avx512bf16")
namespace moe_resilient {
namespace {
namespace bf16dp {

inline void store8(uint16_t* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), reinterpret_cast<__m128i>(_mm256_cvtneps_pbh(v)));
}
#include "swiglu_rows.h"

}  // namespace bf16dp
}  // namespace
}  // namespace moe_resilient
#pragma GCC pop_options

namespace moe_resilient {

void swiglu_act(const float* h, int64_t rows, int64_t I, float* act) { avx2::act_rows(h, rows, I, act); }
void swiglu_act(const float* h, int64_t rows, int64_t I, uint16_t* act) {
  if (skinny_gemm_bf16_available())
    bf16dp::act_rows(h, rows, I, act);
  else
    avx2::act_rows(h, rows, I, act);
}
void swiglu_act(const uint16_t* h, int64_t rows, int64_t I, uint16_t* act) {
  if (skinny_gemm_bf16_available())
    bf16dp::act_rows(h, rows, I, act);
  else
    avx2::act_rows(h, rows, I, act);
}

void round_to_bf16(const float* src, int64_t n, uint16_t* dst) {
  if (skinny_gemm_bf16_available())
    bf16dp::round_rows(src, n, dst);
  else
    avx2::round_rows(src, n, dst);
}
void add_scaled_bf16(float* acc, float w, const uint16_t* y, int64_t n) { avx2::add_scaled_rows(acc, w, y, n); }

}  // namespace moe_resilient
