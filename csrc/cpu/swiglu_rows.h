// The loops of swiglu_act.cpp, included once per ISA inside its `#pragma GCC target(...)` and its own
// namespace, after that namespace defines store8(uint16_t*, __m256), the rounding of 8 fp32 lanes into
// bf16 bits (round to nearest even; NaN a quiet NaN). Includes no other header, like skinny_tile.h, for
// the same reason; no include guard: it is meant to be included twice.

// exp(x) for x in [-87, 88]: x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial
// (relative error < 2e-7, about one fp32 ulp), 2^n from the exponent bits.
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 split in two for exactness
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

inline float load1(float v) { return v; }
inline float load1(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void store1(float* p, float v) { *p = v; }
inline void store1(uint16_t* p, float v) {
  alignas(32) uint16_t tmp[8];
  store8(tmp, _mm256_set1_ps(v));
  *p = tmp[0];
}

template <typename H_t, typename A_t>
void act_rows(const H_t* h, int64_t rows, int64_t I, A_t* act) {
  const int64_t I8 = I - I % 8;
  for (int64_t r = 0; r < rows; ++r) {
    const H_t* gate = h + r * 2 * I;
    const H_t* up = gate + I;
    A_t* out = act + r * I;
    for (int64_t i = 0; i < I8; i += 8) {
      const __m256 g = load8(gate + i);
      const __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g));
      const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
      store8(out + i, _mm256_mul_ps(silu, load8(up + i)));
    }
    for (int64_t i = I8; i < I; ++i) {
      const float g = load1(gate[i]);
      store1(out + i, g / (1.0f + std::exp(-g)) * load1(up[i]));
    }
  }
}

inline void round_rows(const float* src, int64_t n, uint16_t* dst) {
  const int64_t n8 = n - n % 8;
  for (int64_t i = 0; i < n8; i += 8) store8(dst + i, load8(src + i));
  for (int64_t i = n8; i < n; ++i) store1(dst + i, src[i]);
}

inline void add_scaled_rows(float* acc, float w, const uint16_t* y, int64_t n) {
  const int64_t n8 = n - n % 8;
  const __m256 wv = _mm256_set1_ps(w);
  for (int64_t i = 0; i < n8; i += 8) store8(acc + i, _mm256_fmadd_ps(wv, load8(y + i), load8(acc + i)));
  for (int64_t i = n8; i < n; ++i) acc[i] += w * load1(y[i]);
}
