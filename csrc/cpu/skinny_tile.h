// Register-tile loops of the streaming kernel (skinny_gemm.h), generic over the vector ISA.
//
// Included once by each ISA's translation unit, inside `#pragma GCC target(...)`, after a vector type
// `V` is defined there. Everything here is in an anonymous namespace and includes no other header: code
// compiled for AVX-512 must not become a shared (comdat) symbol that an AVX2-only CPU could run.
//
// V provides: reg, width (floats per register), zero(), load(const float*), load(const uint16_t*) (bf16
// bits; only where tiles are instantiated for bf16 weights), fma(a, b, acc) = a * b + acc, hsum(reg).
#pragma once

#include <cstdint>

namespace moe_resilient {
namespace {

inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}
inline float to_float(float v) { return v; }
inline float to_float(uint16_t v) { return bf16_bits_to_float(v); }

// Where a tile pass prefetches the next tile's weight rows: pass `pass` of `passes` over the x rows
// pulls in the pass-th share of them, so memory stays busy through all passes instead of only the first
// (at 8-16 rows, 1.2x the speed of prefetching everything in the first pass).
struct Prefetch {
  const void* next;  // first weight row of the next tile; nullptr: none
  int64_t pass, passes;
};

// One tile: rows m0..m0+MR of x [M, K] against rows n0..n0+NR of W [N, K] into y [M, N].
// Compile-time sizes keep the accumulators in registers.
template <class V, typename W_t, int64_t MR, int64_t NR>
void tile(const float* x, int64_t m0, int64_t K, const W_t* W, int64_t n0, int64_t N, float* y, Prefetch pf) {
  constexpr int64_t mr = MR, nr = NR, width = V::width;
  // Every loop over MR/NR is unrolled by pragma: GCC scalarises acc into registers only when its indices
  // are constants before its SRA pass, otherwise it mirrors every FMA with a dead store to the stack.
  typename V::reg acc[MR][NR];
#pragma GCC unroll 8
  for (int64_t i = 0; i < mr; ++i)
#pragma GCC unroll 8
    for (int64_t j = 0; j < nr; ++j) acc[i][j] = V::zero();
  const int64_t Kv = K - K % width;
  const W_t* next = static_cast<const W_t*>(pf.next);
  int64_t pf_wait = 1, pf_k = pf.pass * (K / pf.passes);  // one prefetch per row every `passes` steps
  for (int64_t k = 0; k < Kv; k += width) {
    typename V::reg w[NR];
#pragma GCC unroll 8
    for (int64_t j = 0; j < nr; ++j) w[j] = V::load(W + (n0 + j) * K + k);
    if (next != nullptr && --pf_wait == 0) {
      pf_wait = pf.passes;
#pragma GCC unroll 8
      for (int64_t j = 0; j < nr; ++j) __builtin_prefetch(next + j * K + pf_k, 0, 3);
      pf_k += width;
    }
#pragma GCC unroll 8
    for (int64_t i = 0; i < mr; ++i) {
      const typename V::reg xv = V::load(x + (m0 + i) * K + k);
#pragma GCC unroll 8
      for (int64_t j = 0; j < nr; ++j) acc[i][j] = V::fma(xv, w[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int64_t i = 0; i < mr; ++i) {
#pragma GCC unroll 8
    for (int64_t j = 0; j < nr; ++j) {
      float s = V::hsum(acc[i][j]);
      for (int64_t k = Kv; k < K; ++k) s += x[(m0 + i) * K + k] * to_float(W[(n0 + j) * K + k]);
      y[(m0 + i) * N + n0 + j] = s;
    }
  }
}

template <class V, typename W_t, int64_t MR>
void tile_cols(const float* x, int64_t m0, int64_t K, const W_t* W, int64_t n0, int64_t nr, int64_t N, float* y,
               Prefetch pf) {
  switch (nr) {
    case 6: return tile<V, W_t, MR, 6>(x, m0, K, W, n0, N, y, pf);  // AVX-512 only
    case 5: return tile<V, W_t, MR, 5>(x, m0, K, W, n0, N, y, pf);
    case 4: return tile<V, W_t, MR, 4>(x, m0, K, W, n0, N, y, pf);
    case 3: return tile<V, W_t, MR, 3>(x, m0, K, W, n0, N, y, pf);
    case 2: return tile<V, W_t, MR, 2>(x, m0, K, W, n0, N, y, pf);
    default: return tile<V, W_t, MR, 1>(x, m0, K, W, n0, N, y, pf);
  }
}

template <class V, typename W_t>
void tile_any(const float* x, int64_t m0, int64_t mr, int64_t K, const W_t* W, int64_t n0, int64_t nr, int64_t N,
              float* y, Prefetch pf) {
  switch (mr) {
    case 4: return tile_cols<V, W_t, 4>(x, m0, K, W, n0, nr, N, y, pf);
    case 3: return tile_cols<V, W_t, 3>(x, m0, K, W, n0, nr, N, y, pf);
    case 2: return tile_cols<V, W_t, 2>(x, m0, K, W, n0, nr, N, y, pf);
    default: return tile_cols<V, W_t, 1>(x, m0, K, W, n0, nr, N, y, pf);
  }
}

// Column tiles t0..t1 (tile t = weight rows t*nr .. t*nr+nr of W [N, K]) over all M rows of x, in
// passes of mr rows: run(m0, rows, n0, cols, prefetch) for each pass of each tile.
template <typename W_t, typename Run>
void tile_passes(int64_t M, int64_t K, const W_t* W, int64_t N, int64_t mr, int64_t nr, int64_t t0, int64_t t1,
                 Run run) {
  const int64_t passes = (M + mr - 1) / mr;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * nr, ncols = N - n0 < nr ? N - n0 : nr;
    const W_t* next = (t + 1 < t1 && n0 + 2 * nr <= N) ? W + (n0 + nr) * K : nullptr;
    for (int64_t p = 0; p < passes; ++p) {
      const int64_t m0 = p * mr;
      run(m0, M - m0 < mr ? M - m0 : mr, n0, ncols, Prefetch{next, p, passes});
    }
  }
}

template <class V, typename W_t>
void column_tiles(const float* x, int64_t M, int64_t K, const W_t* W, int64_t N, float* y, int64_t mr, int64_t nr,
                  int64_t t0, int64_t t1) {
  tile_passes(M, K, W, N, mr, nr, t0, t1, [&](int64_t m0, int64_t rows, int64_t n0, int64_t cols, Prefetch pf) {
    tile_any<V, W_t>(x, m0, rows, K, W, n0, cols, N, y, pf);
  });
}

}  // namespace
}  // namespace moe_resilient
