// Loops of the streaming kernel (skinny_gemm.h), generic over the vector ISA: the register tiles, and
// the one-weight-row-at-a-time loop for 1-2 rows of x.
//
// Included once by each ISA's translation unit, inside `#pragma GCC target(...)`, after a vector type
// `V` is defined there. Everything here is in an anonymous namespace and includes no other header: code
// compiled for AVX-512 must not become a shared (comdat) symbol that an AVX2-only CPU could run.
//
// V provides: acc (an accumulator register), width (k per step), zero(), load(p) for the x and weight
// element types it serves (float, or uint16_t bf16 bits) into operand registers, madd(acc, x, w) = acc
// + x * w summed within each accumulator lane, add(acc, acc), hsum(acc); lanes (fp32 lanes of acc),
// sums(acc[lanes]) (lane l: the sum of the l-th accumulator's lanes), store(out, v, first, count)
// (out[0 .. count) = lanes first .. first + count of v).
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

// Software prefetch of the weight rows a thread's tiles read next, one of two ways:
// - Row-wise (fp32 weights; bf16 up to 8 rows of x): pass `pass` of `passes` pulls the pass-th share
//   of the next tile's weight rows, so memory stays busy through all passes, and the same share of
//   the tile after it into L2. A core has far fewer L1 than L2 miss buffers, so rows fetched from
//   memory straight into L1 arrive too slowly for a tile that barely computes: up to 8 rows of x the
//   next tile goes to L2 as well (bf16 at 3-8 rows streamed 1.2-1.6x faster on a Zen 4 than into
//   L1), from 9 rows into L1. Staging the tile after next gained another ~8% at 3-13 rows of bf16.
// - Run-ahead (bf16 x and weights, from 9 rows): a thread's tiles are adjacent rows of W, one
//   contiguous block, so a pointer runs a fixed distance ahead of them, into L2 far ahead and into L1
//   near, and every k-step issues its share of a tile's lines: a steady trickle, not a burst every few
//   steps; past the block it runs on into the rows the thread reads next (column_tiles' `follow`). On
//   a Zen 4 the whole bf16 op ran 1.03-1.06x faster so at 12-64 rows (interleaved runs), but 1.03-1.07x
//   slower at 4-8 rows, and fp32 weights 1.02-1.09x slower at 12-32 rows. Not measured: bf16 weights
//   widened to fp32 (CPUs without AVX512_BF16), which keep the row-wise prefetch.
struct Prefetch {
  static constexpr int64_t L2_AHEAD = 64 << 10, L1_AHEAD = 6 << 10;  // run-ahead distances, bytes
  // row-wise
  const void* next;   // first weight row of the next tile; nullptr: none
  const void* after;  // first weight row of the tile after it; nullptr: none
  int64_t pass, passes;
  bool next_to_l2;
  // run-ahead: the next lines to prefetch into L2 and into L1, and lines owed in 1/steps_per_tile
  const char* far;
  const char* near;
  int64_t credit, steps_per_tile, lines_per_tile;
};

// One tile: rows m0..m0+MR of x [M, K] against rows n0..n0+NR of W [N, K] into y [M, N] (fp32).
// Compile-time sizes keep the accumulators in registers.
template <class V, typename X_t, typename W_t, int64_t MR, int64_t NR, bool RUN_AHEAD>
void tile(const X_t* x, int64_t m0, int64_t K, const W_t* W, int64_t n0, int64_t N, float* y, Prefetch& pf) {
  constexpr int64_t mr = MR, nr = NR, width = V::width;
  // Every loop over MR/NR is unrolled by pragma: GCC scalarises acc into registers only when its indices
  // are constants before its SRA pass, otherwise it mirrors every FMA with a dead store to the stack.
  typename V::acc acc[MR][NR];
#pragma GCC unroll 8
  for (int64_t i = 0; i < mr; ++i)
#pragma GCC unroll 8
    for (int64_t j = 0; j < nr; ++j) acc[i][j] = V::zero();
  const int64_t Kv = K - K % width;
  const W_t* next = static_cast<const W_t*>(pf.next);
  const W_t* after = static_cast<const W_t*>(pf.after);
  const int64_t passes = pf.passes;
  const bool next_to_l2 = pf.next_to_l2;
  int64_t pf_wait = 1, pf_k = pf.pass * (K / passes);  // one prefetch per row every `passes` steps
  const char* far = pf.far;  // locals stay in registers through the loop
  const char* near = pf.near;
  int64_t credit = pf.credit;
  const int64_t lines = pf.lines_per_tile, steps = pf.steps_per_tile;
  for (int64_t k = 0; k < Kv; k += width) {
    decltype(V::load(W)) w[NR];
#pragma GCC unroll 8
    for (int64_t j = 0; j < nr; ++j) w[j] = V::load(W + (n0 + j) * K + k);
    if (RUN_AHEAD) {
      for (credit += lines; credit >= steps; credit -= steps, far += 64, near += 64) {
        __builtin_prefetch(far, 0, 1);
        __builtin_prefetch(near, 0, 3);
      }
    } else if (next != nullptr && --pf_wait == 0) {
      pf_wait = passes;
#pragma GCC unroll 8
      for (int64_t j = 0; j < nr; ++j) {
        if (next_to_l2)
          __builtin_prefetch(next + j * K + pf_k, 0, 2);
        else
          __builtin_prefetch(next + j * K + pf_k, 0, 3);
        if (after != nullptr) __builtin_prefetch(after + j * K + pf_k, 0, 1);
      }
      pf_k += width;
    }
#pragma GCC unroll 8
    for (int64_t i = 0; i < mr; ++i) {
      const auto xv = V::load(x + (m0 + i) * K + k);
#pragma GCC unroll 8
      for (int64_t j = 0; j < nr; ++j) acc[i][j] = V::madd(acc[i][j], xv, w[j]);
    }
  }
  // The sums, `per` rows of x to a vector of sums, each row's NR in `row_lanes` lanes: one V::sums per
  // vector instead of one V::hsum per accumulator. On a Zen 4 a 4x6 bf16 tile in L1 ran 1.07x faster at
  // K = 1024 (1.26x at K = 256), the whole op 1.02-1.07x (bf16) and 1.04-1.10x (fp32) at 16-64 rows.
  constexpr int64_t group = nr <= 1 ? 1 : nr <= 2 ? 2 : nr <= 4 ? 4 : 8;
  constexpr int64_t per = V::lanes / group < mr ? V::lanes / group : mr, row_lanes = V::lanes / per;
  static_assert(nr <= row_lanes, "a row of the tile fits a vector's lanes");
#pragma GCC unroll 4
  for (int64_t i0 = 0; i0 < mr; i0 += per) {
    typename V::acc parts[V::lanes];
#pragma GCC unroll 16
    for (int64_t l = 0; l < V::lanes; ++l) {
      const int64_t i = i0 + l / row_lanes, j = l % row_lanes;
      parts[l] = i < mr && j < nr ? acc[i < mr ? i : 0][j < nr ? j : 0] : V::zero();
    }
    const auto sums = V::sums(parts);
#pragma GCC unroll 8
    for (int64_t r = 0; r < per; ++r)
      if (i0 + r < mr) V::store(y + (m0 + i0 + r) * N + n0, sums, r * row_lanes, nr);
  }
  for (int64_t i = 0; Kv < K && i < mr; ++i)  // K beyond the last whole vector
    for (int64_t j = 0; j < nr; ++j)
      for (int64_t k = Kv; k < K; ++k)
        y[(m0 + i) * N + n0 + j] += to_float(x[(m0 + i) * K + k]) * to_float(W[(n0 + j) * K + k]);
  pf.far = far;  // on to the next pass
  pf.near = near;
  pf.credit = credit;
}

template <class V, typename X_t, typename W_t, int64_t MR, bool RUN_AHEAD>
void tile_cols(const X_t* x, int64_t m0, int64_t K, const W_t* W, int64_t n0, int64_t nr, int64_t N, float* y,
               Prefetch& pf) {
  switch (nr) {
    case 6: return tile<V, X_t, W_t, MR, 6, RUN_AHEAD>(x, m0, K, W, n0, N, y, pf);  // AVX-512 only
    case 5: return tile<V, X_t, W_t, MR, 5, RUN_AHEAD>(x, m0, K, W, n0, N, y, pf);
    case 4: return tile<V, X_t, W_t, MR, 4, RUN_AHEAD>(x, m0, K, W, n0, N, y, pf);
    case 3: return tile<V, X_t, W_t, MR, 3, RUN_AHEAD>(x, m0, K, W, n0, N, y, pf);
    case 2: return tile<V, X_t, W_t, MR, 2, RUN_AHEAD>(x, m0, K, W, n0, N, y, pf);
    default: return tile<V, X_t, W_t, MR, 1, RUN_AHEAD>(x, m0, K, W, n0, N, y, pf);
  }
}

template <class V, typename X_t, typename W_t, bool RUN_AHEAD>
void tile_any(const X_t* x, int64_t m0, int64_t mr, int64_t K, const W_t* W, int64_t n0, int64_t nr, int64_t N,
              float* y, Prefetch& pf) {
  switch (mr) {
    case 4: return tile_cols<V, X_t, W_t, 4, RUN_AHEAD>(x, m0, K, W, n0, nr, N, y, pf);
    case 3: return tile_cols<V, X_t, W_t, 3, RUN_AHEAD>(x, m0, K, W, n0, nr, N, y, pf);
    case 2: return tile_cols<V, X_t, W_t, 2, RUN_AHEAD>(x, m0, K, W, n0, nr, N, y, pf);
    default: return tile_cols<V, X_t, W_t, 1, RUN_AHEAD>(x, m0, K, W, n0, nr, N, y, pf);
  }
}

// Column tiles t0..t1 (tile t = weight rows t*nr .. t*nr+nr of W [N, K]) over all M rows of x, in
// passes of at most mr rows, balanced (13 rows in passes of 4, 3, 3, 3, not 4, 4, 4, 1: a 1-row pass
// reloads the tile's weights for a sixth of the multiply-adds per load of a 4-row one). `follow`: the
// weight rows this thread reads next (another product's), where the run-ahead prefetch runs on to
// once it passes these; nullptr: none.
template <class V, typename X_t, typename W_t>
void column_tiles(const X_t* x, int64_t M, int64_t K, const W_t* W, int64_t N, float* y, int64_t mr, int64_t nr,
                  int64_t t0, int64_t t1, const void* follow) {
  const int64_t passes = (M + mr - 1) / mr, base = M / passes, longer = M % passes;
  const int64_t steps = K / V::width > 0 ? K / V::width : 1;
  const int64_t row_bytes = K * static_cast<int64_t>(sizeof(W_t)), tile_bytes = nr * row_bytes;
  const char* begin = reinterpret_cast<const char*>(W) + t0 * tile_bytes;
  const int64_t length = ((t1 * nr < N ? t1 * nr : N) - t0 * nr) * row_bytes;
  // byte `offset` of this thread's stream: these rows, then `follow`'s; past them with no `follow`,
  // `past` (a prefetch there is wasted, not wrong: it never faults)
  const auto at = [&](int64_t offset, const char* past) {
    if (offset < length) return begin + offset;
    return follow != nullptr ? static_cast<const char*>(follow) + (offset - length) : past;
  };
  const bool run_ahead = sizeof(X_t) == 2 && M > 8;  // bf16 x: the bf16 dot tiles
  Prefetch pf{nullptr, nullptr, 0, passes, M <= 8, nullptr, nullptr, 0, passes * steps, tile_bytes / 64};
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * nr, ncols = N - n0 < nr ? N - n0 : nr;
    const int64_t offset = (t - t0) * tile_bytes;
    pf.next = at(offset + tile_bytes, nullptr);
    pf.after = at(offset + 2 * tile_bytes, nullptr);
    pf.far = at(offset + Prefetch::L2_AHEAD, begin + offset + Prefetch::L2_AHEAD);
    pf.near = at(offset + Prefetch::L1_AHEAD, begin + offset + Prefetch::L1_AHEAD);
    for (int64_t p = 0, m0 = 0; p < passes; ++p) {
      const int64_t rows = base + (p < longer ? 1 : 0);
      pf.pass = p;
      if (run_ahead)  // no run-ahead copy of the fp32 tiles: for them both calls are the row-wise one
        tile_any<V, X_t, W_t, sizeof(X_t) == 2>(x, m0, rows, K, W, n0, ncols, N, y, pf);
      else
        tile_any<V, X_t, W_t, false>(x, m0, rows, K, W, n0, ncols, N, y, pf);
      m0 += rows;
    }
  }
}

// y[m, n] for all M rows of x and weight rows n0..n1, one weight row at a time: each row streams from
// memory once (one sequential stream per core) and the other rows of x reuse it from L1. Four
// accumulators per step keep the multiply-adds independent.
template <class V, typename X_t, typename W_t>
void row_dots(const X_t* x, int64_t M, int64_t K, const W_t* W, int64_t N, float* y, int64_t n0, int64_t n1) {
  constexpr int64_t width = V::width;
  const int64_t K4 = K - K % (4 * width), Kv = K - K % width;
  for (int64_t n = n0; n < n1; ++n) {
    const W_t* w = W + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const X_t* xm = x + m * K;
      typename V::acc a0 = V::zero(), a1 = a0, a2 = a0, a3 = a0;
      int64_t k = 0;
      for (; k < K4; k += 4 * width) {
        a0 = V::madd(a0, V::load(xm + k), V::load(w + k));
        a1 = V::madd(a1, V::load(xm + k + width), V::load(w + k + width));
        a2 = V::madd(a2, V::load(xm + k + 2 * width), V::load(w + k + 2 * width));
        a3 = V::madd(a3, V::load(xm + k + 3 * width), V::load(w + k + 3 * width));
      }
      for (; k < Kv; k += width) a0 = V::madd(a0, V::load(xm + k), V::load(w + k));
      float s = V::hsum(V::add(V::add(a0, a1), V::add(a2, a3)));
      for (; k < K; ++k) s += to_float(xm[k]) * to_float(w[k]);
      y[m * N + n] = s;
    }
  }
}

}  // namespace
}  // namespace moe_resilient
