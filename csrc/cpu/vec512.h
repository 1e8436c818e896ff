// The accumulator half of the AVX-512 vector types (skinny_gemm_avx512.cpp's fp32 Vec512,
// skinny_gemm_bf16.cpp's VecBf16Dot): 16 fp32 lanes in a zmm register. Included by each inside its
// `#pragma GCC target(...)`, in an anonymous namespace, like skinny_tile.h.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace moe_resilient {
namespace {

struct Acc512 {
  using acc = __m512;
  static constexpr int64_t lanes = 16;
  static inline acc zero() { return _mm512_setzero_ps(); }
  static inline acc add(acc a, acc b) { return _mm512_add_ps(a, b); }
  static inline float hsum(acc v) { return _mm512_reduce_add_ps(v); }

  // Lane l of the result is the sum of a[l]'s lanes: four rounds of folds, each adding two halves of
  // every accumulator's lanes, 45 instructions for all 16 against 8 for each one alone
  // (_mm512_reduce_add_ps). Fed transposed, a[4k + q] at position 4q + k, the sums come out in order.
  static inline acc sums(const acc (&a)[16]) {
    const auto at = [&](int p) { return a[4 * (p % 4) + p / 4]; };
    acc b[8], c[4];
    for (int i = 0; i < 8; ++i)  // 128-bit blocks [a 0+2, a 1+3, b 0+2, b 1+3]
      b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(at(2 * i), at(2 * i + 1), 0x44),
                           _mm512_shuffle_f32x4(at(2 * i), at(2 * i + 1), 0xEE));
    for (int i = 0; i < 4; ++i)  // blocks [a, b, c, d], 4 lanes each
      c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                           _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
    const acc d0 = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x44), _mm512_shuffle_ps(c[0], c[1], 0xEE));
    const acc d1 = _mm512_add_ps(_mm512_shuffle_ps(c[2], c[3], 0x44), _mm512_shuffle_ps(c[2], c[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(d0, d1, 0x88), _mm512_shuffle_ps(d0, d1, 0xDD));
  }

  // out[0 .. count) = lanes first .. first + count of v.
  static inline void store(float* out, acc v, int64_t first, int64_t count) {
    const __mmask16 take = static_cast<__mmask16>(((1u << count) - 1) << first);
    _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << count) - 1), _mm512_maskz_compress_ps(take, v));
  }
};

}  // namespace
}  // namespace moe_resilient
