#include "skinny_gemm.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

namespace moe_resilient {

// csrc/cpu/skinny_gemm_avx512.cpp; fp32 weights, tiles t0..t1 of 6 weight rows, x rows in passes of 4.
// follow: the weight rows the thread reads next (skinny_tile.h).
void skinny_tiles_avx512(const float* x, int64_t M, int64_t K, const float* W, int64_t N, float* y, int64_t t0,
                         int64_t t1, const void* follow);
// csrc/cpu/skinny_gemm_bf16.cpp, bf16 x and W with AVX512_BF16: weight rows n0..n1 one at a time (1-2
// rows of x), and tiles t0..t1 of 6 weight rows.
void rows_bf16dp(const uint16_t* x, int64_t M, int64_t K, const uint16_t* W, int64_t N, float* y, int64_t n0,
                 int64_t n1);
void skinny_tiles_bf16dp(const uint16_t* x, int64_t M, int64_t K, const uint16_t* W, int64_t N, float* y, int64_t t0,
                         int64_t t1, const void* follow);

}  // namespace moe_resilient

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace moe_resilient {
namespace {

struct Vec256 {  // fp32 x; fp32 weights, or bf16 weights widened on load
  using acc = __m256;
  static constexpr int64_t width = 8;
  static inline acc zero() { return _mm256_setzero_ps(); }
  static inline __m256 load(const float* p) { return _mm256_loadu_ps(p); }
  static inline __m256 load(const uint16_t* p) {  // bf16 bits -> fp32: zero-extend, shift into the high half
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  }
  static inline acc madd(acc a, __m256 x, __m256 w) { return _mm256_fmadd_ps(x, w, a); }
  static inline acc add(acc a, acc b) { return _mm256_add_ps(a, b); }
  static inline float hsum(acc v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
  }
  static constexpr int64_t lanes = 8;
  // Lane l: the sum of a[l]'s lanes, in three rounds of folds (as Acc512::sums in vec512.h); fed
  // transposed, a[4h + q] at position 2q + h.
  static inline acc sums(const acc (&a)[8]) {
    const auto at = [&](int p) { return a[4 * (p % 2) + p / 2]; };
    acc b[4];
    for (int i = 0; i < 4; ++i)  // 128-bit halves [a lo+hi, b lo+hi]
      b[i] = _mm256_add_ps(_mm256_permute2f128_ps(at(2 * i), at(2 * i + 1), 0x20),
                           _mm256_permute2f128_ps(at(2 * i), at(2 * i + 1), 0x31));
    const acc c0 = _mm256_add_ps(_mm256_shuffle_ps(b[0], b[1], 0x44), _mm256_shuffle_ps(b[0], b[1], 0xEE));
    const acc c1 = _mm256_add_ps(_mm256_shuffle_ps(b[2], b[3], 0x44), _mm256_shuffle_ps(b[2], b[3], 0xEE));
    return _mm256_add_ps(_mm256_shuffle_ps(c0, c1, 0x88), _mm256_shuffle_ps(c0, c1, 0xDD));
  }
  // out[0 .. count) = lanes first .. first + count of v. Through memory: vmaskmovps stores are slow on
  // AMD cores (the 2x4 tiles at 3-6 rows ran 2-6% slower with one on a Zen 4).
  static inline void store(float* out, acc v, int64_t first, int64_t count) {
    alignas(32) float all[8];
    _mm256_store_ps(all, v);
    for (int64_t l = 0; l < count; ++l) out[l] = all[first + l];
  }
};

}  // namespace
}  // namespace moe_resilient

#include "skinny_tile.h"

namespace moe_resilient {
namespace {

template <typename W_t>
void row_dots_avx2(const float* x, int64_t M, int64_t K, const W_t* W, int64_t N, float* y, int64_t n0, int64_t n1) {
  row_dots<Vec256>(x, M, K, W, N, y, n0, n1);
}

template <typename W_t>
void column_tiles_avx2(const float* x, int64_t M, int64_t K, const W_t* W, int64_t N, float* y, int64_t mr,
                       int64_t nr, int64_t t0, int64_t t1, const void* follow) {
  column_tiles<Vec256>(x, M, K, W, N, y, mr, nr, t0, t1, follow);
}

}  // namespace
}  // namespace moe_resilient

#pragma GCC pop_options

namespace moe_resilient {
namespace {

std::atomic<bool> avx512_allowed{true};

bool cpu_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

bool cpu_has_avx512_bf16() {
  static const bool ok = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return ok;
}

// Shapes chosen by measuring on weights streamed from memory (rows of 1024-2048 fp32 or bf16):
// - 1-2 rows: one weight row at a time, a single sequential stream per core. Register tiles over
//   several weight rows read short interleaved streams, which the hardware prefetcher follows worse:
//   bf16 at 1 row streamed at 16 GB/s that way, at the 32 GB/s of a plain sum this way.
// - 3-7 rows: a 2x4 tile (2 x rows, 4 weight rows), 1.2x the speed of 4x3 at 4 rows; with the next
//   tile prefetched into L2 (skinny_tile.h), 3 rows stream at 27 GB/s here against 18 one row at a time.
// - from 8 rows: fp32 weights with AVX-512, a 4x6 tile of zmm registers; else a 4x3 tile, the most
//   reuse of each weight load within the 16 ymm registers.
// - bf16 x and weights with AVX512_BF16 (bf16dp): one row at a time up to 2 rows, else 4x6 tiles.
struct Shape {
  bool rows;   // one weight row at a time
  int64_t mr, nr;
  bool avx512;  // fp32 weights in AVX-512 tiles
};

template <typename W_t>
Shape shape(int64_t M, bool bf16dp) {
  if (M <= 2) return {true, 1, 1, false};
  if (bf16dp) return {false, 4, 6, false};
  const bool avx512 = std::is_same_v<W_t, float> && M >= 8 && skinny_gemm_avx512_enabled();
  return {false, M < 8 ? 2 : 4, avx512 ? 6 : (M < 8 ? 4 : 3), avx512};
}

// Thread `part` of `parts`' share of n units: [first, end).
std::pair<int64_t, int64_t> share(int64_t n, int64_t part, int64_t parts) {
  return {n * part / parts, n * (part + 1) / parts};
}

// Product p's share [u0, u1) (weight rows, or tiles of sh.nr rows) on the kernel its shape names.
template <typename X_t, typename W_t>
void run_share(const SkinnyProduct& p, const Shape& sh, int64_t K, int64_t N, int64_t u0, int64_t u1,
               const void* follow) {
  const X_t* x = static_cast<const X_t*>(p.x);
  const W_t* W = static_cast<const W_t*>(p.W);
  if constexpr (std::is_same_v<X_t, uint16_t>) {
    if (sh.rows) return rows_bf16dp(x, p.M, K, W, N, p.y, u0, u1);
    return skinny_tiles_bf16dp(x, p.M, K, W, N, p.y, u0, u1, follow);
  } else {
    if (sh.rows) return row_dots_avx2(x, p.M, K, W, N, p.y, u0, u1);
    if constexpr (std::is_same_v<W_t, float>) {
      if (sh.avx512) return skinny_tiles_avx512(x, p.M, K, W, N, p.y, u0, u1, follow);
    }
    column_tiles_avx2(x, p.M, K, W, N, p.y, sh.mr, sh.nr, u0, u1, follow);
  }
}

// A run of units [u0, u1) of product i (weight rows, or tiles of its shape's nr rows).
struct Chunk {
  size_t i;
  int64_t u0, u1;
};

// Each part's chunks in its stream order, and which of them are still unclaimed: the part takes them
// from the front; a part that has run out of its own takes another's from the back, so a core the VM
// slowed down (one part took 1.2x the other's time in ~1 call of 5 at 64 tokens) leaves the other
// core no idle wait at the end of the group. Front and back packed in one word: one CAS claims.
class alignas(64) ChunkQueue {
 public:
  void init(std::vector<Chunk> chunks) {
    chunks_ = std::move(chunks);
    ends_.store(static_cast<uint64_t>(chunks_.size()), std::memory_order_relaxed);
  }
  const std::vector<Chunk>& chunks() const { return chunks_; }
  // The index of the claimed chunk, or -1 when none is left.
  int64_t claim(bool front) {
    uint64_t v = ends_.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t f = v >> 32, b = v & 0xFFFFFFFFu;
      if (f >= b) return -1;
      const uint64_t next = front ? ((f + 1) << 32 | b) : (f << 32 | (b - 1));
      if (ends_.compare_exchange_weak(v, next, std::memory_order_acq_rel, std::memory_order_relaxed))
        return static_cast<int64_t>(front ? f : b - 1);
    }
  }

 private:
  std::vector<Chunk> chunks_;
  std::atomic<uint64_t> ends_{0};  // front << 32 | back
};

// The group in one parallel region; x is X_t (bf16 bits with bf16dp, else float), W is W_t.
template <typename X_t, typename W_t>
void run_group(const std::vector<SkinnyProduct>& group, int64_t K, int64_t N, bool bf16dp) {
  // At least 48 weight rows a thread, so both cores run without scheduling cost dominating.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / 48));
  std::vector<Shape> shapes;
  for (const auto& p : group) shapes.push_back(shape<W_t>(p.M, bf16dp));
  const auto unit = [&](size_t i) { return shapes[i].rows ? 1 : shapes[i].nr; };  // weight rows
  // ~48 weight rows a chunk: a claim per ~100-200 KB of weights, and little left to steal at the end.
  const auto chunk_units = [&](size_t i) { return std::max<int64_t>(1, 48 / unit(i)); };
  std::vector<ChunkQueue> queues(parts);
  for (int64_t part = 0; part < parts; ++part) {
    std::vector<Chunk> chunks;
    for (size_t i = 0; i < group.size(); ++i) {
      const auto [u0, u1] = share((N + unit(i) - 1) / unit(i), part, parts);
      for (int64_t u = u0; u < u1; u += chunk_units(i)) chunks.push_back({i, u, std::min(u1, u + chunk_units(i))});
    }
    queues[part].init(std::move(chunks));
  }
  const auto start = [&](const Chunk& c) {  // its first weight row
    return static_cast<const W_t*>(group[c.i].W) + c.u0 * unit(c.i) * K;
  };
  // Chunk c of `part`; the owner reads on into the next chunk, a thief into the one before it.
  const auto run_chunk = [&](int64_t part, int64_t c, bool owner) {
    const auto& chunks = queues[part].chunks();
    const int64_t n = static_cast<int64_t>(chunks.size()), next = owner ? c + 1 : c - 1;
    const W_t* follow = next >= 0 && next < n ? start(chunks[next]) : nullptr;
    run_share<X_t, W_t>(group[chunks[c].i], shapes[chunks[c].i], K, N, chunks[c].u0, chunks[c].u1, follow);
  };
  const auto run = [&](int64_t part) {
    for (int64_t c; (c = queues[part].claim(true)) >= 0;) run_chunk(part, c, true);
    for (int64_t other = 1; other < parts; ++other) {
      const int64_t victim = (part + other) % parts;
      for (int64_t c; (c = queues[victim].claim(false)) >= 0;) run_chunk(victim, c, false);
    }
  };
  if (parts == 1) return run(0);
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    for (int64_t part = b; part < e; ++part) run(part);
  });
}

}  // namespace

bool skinny_gemm_available() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

bool skinny_gemm_avx512_enabled() { return cpu_has_avx512() && avx512_allowed.load(std::memory_order_relaxed); }

bool skinny_gemm_allow_avx512(bool allowed) { return avx512_allowed.exchange(allowed); }

bool skinny_gemm_bf16_available() {
  return cpu_has_avx512_bf16() && avx512_allowed.load(std::memory_order_relaxed);
}

void skinny_gemm_bf16(const std::vector<SkinnyProduct>& group, int64_t K, int64_t N) {
  TORCH_CHECK(skinny_gemm_bf16_available(), "skinny_gemm_bf16: this CPU has no AVX512_BF16 (or it is switched off)");
  run_group<uint16_t, uint16_t>(group, K, N, true);
}

void skinny_gemm_nt(const std::vector<SkinnyProduct>& group, int64_t K, int64_t N, bool bf16_weights) {
  static_assert(sizeof(c10::BFloat16) == sizeof(uint16_t), "bf16 weights are read as their raw bits");
  if (bf16_weights)
    run_group<float, uint16_t>(group, K, N, false);
  else
    run_group<float, float>(group, K, N, false);
}

void skinny_gemm_nt(const float* x, int64_t M, int64_t K, const float* W, int64_t N, float* y) {
  skinny_gemm_nt({{x, M, W, y}}, K, N, false);
}

void skinny_gemm_nt(const float* x, int64_t M, int64_t K, const c10::BFloat16* W, int64_t N, float* y) {
  skinny_gemm_nt({{x, M, W, y}}, K, N, true);
}

}  // namespace moe_resilient
