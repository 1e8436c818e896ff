// Shared by the CPU ops (one file each in this folder, registered in register.cpp): the op functions,
// and the helpers of their expert GEMMs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "skinny_gemm.h"
#include "swiglu_act.h"

namespace moe_resilient {

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_to_slots(
    const at::Tensor& topk_ids, const std::optional<at::Tensor>& log2phy, const std::optional<at::Tensor>& logcnt,
    int64_t num_slots, bool strict, const std::optional<at::Tensor>& load);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_tokens(
    const at::Tensor& x, const at::Tensor& weight, int64_t k, bool normalize, const std::optional<at::Tensor>& log2phy,
    const std::optional<at::Tensor>& logcnt, int64_t num_slots, bool strict, const std::optional<at::Tensor>& load);
at::Tensor grouped_swiglu(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& w13, const at::Tensor& w2);
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_swiglu_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& w13,
    const at::Tensor& w2);
at::Tensor grouped_swiglu_combine_into(const at::Tensor& x, const at::Tensor& order, const at::Tensor& offsets,
                                       const at::Tensor& slot_ids, const at::Tensor& topk_weights,
                                       const at::Tensor& w13, const at::Tensor& w2, at::Tensor out);
at::Tensor grouped_swiglu_combine(const at::Tensor& x, const at::Tensor& order, const at::Tensor& offsets,
                                  const at::Tensor& slot_ids, const at::Tensor& topk_weights, const at::Tensor& w13,
                                  const at::Tensor& w2);
std::tuple<at::Tensor, at::Tensor> moe_forward(const at::Tensor& x, const at::Tensor& gate_weight, int64_t k,
                                               bool normalize, const std::optional<at::Tensor>& log2phy,
                                               const std::optional<at::Tensor>& logcnt, int64_t num_slots, bool strict,
                                               const at::Tensor& w13, const at::Tensor& w2, double scaling,
                                               const std::optional<at::Tensor>& load);
int64_t checksum(const at::Tensor& src);
int64_t copy_checksum(const at::Tensor& src, const at::Tensor& dst);

namespace detail {

// Tensors made without the dispatcher. Right after a step has streamed its experts through the caches,
// every dispatched call is slow: an at::empty 1-9 us, a reshape or view of x 15-25 us, where the whole
// 1-token bf16 step is ~800 us.
inline at::Tensor new_cpu(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::detail::empty_cpu(sizes, options);
}
// t [..., H] as [T, H]: a view of a contiguous t (one that does not own the memory, so only while t
// lives), else a reshape.
inline at::Tensor as_rows(const at::Tensor& t) {
  if (t.dim() == 2) return t;
  if (!t.is_contiguous() || t.numel() == 0) return t.reshape({-1, t.size(-1)});
  return at::from_blob(t.data_ptr(), {t.numel() / t.size(-1), t.size(-1)}, t.options());
}


inline void check_experts(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2) {
  TORCH_CHECK(x.dim() == 2, "grouped_swiglu: x must be [N, H], got ", x.sizes());
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3, "grouped_swiglu: w13 must be [S, 2I, H] and w2 [S, H, I]");
  const int64_t S = w13.size(0), H = w13.size(2), I = w13.size(1) / 2;
  TORCH_CHECK(w13.size(1) == 2 * I && w2.size(0) == S && w2.size(1) == H && w2.size(2) == I,
              "grouped_swiglu: w13 ", w13.sizes(), " and w2 ", w2.sizes(), " disagree");
  TORCH_CHECK(x.size(1) == H, "grouped_swiglu: x has hidden size ", x.size(1), ", experts expect ", H);
  TORCH_CHECK(x.scalar_type() == w13.scalar_type() && x.scalar_type() == w2.scalar_type(),
              "grouped_swiglu: dtype mismatch between x and expert weights");
}

inline void check_grouped(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& w13, const at::Tensor& w2) {
  check_experts(x, w13, w2);
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == w13.size(0) + 1 && offsets.scalar_type() == at::kLong,
              "grouped_swiglu: offsets must be int64 [S+1] = [", w13.size(0) + 1, "]");
}

inline bool cpu_has_bf16_arithmetic() {
  static const bool ok = __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
  return ok;
}

// Slots with at most this many rows use the streaming kernel (skinny_gemm.h); larger ones use BLAS.
// Measured per slot against BLAS (8 slots, H=1024, I=2048; Zen 4 for the AVX-512 rows):
// - fp32, AVX2 tiles: the kernel wins up to ~128 rows; AVX-512 tiles: 0.75x BLAS's time at 128 rows,
//   0.85x at 256, a tie at 512.
// - bf16 on a CPU with bf16 arithmetic: the bf16 dot-product tiles win up to 32 rows and are within
//   noise of BLAS at 64-128 (the whole layer at 512 tokens, ~128 rows a slot: 36 ms with the tiles,
//   39 ms with BLAS); since the tiles sum by folds (skinny_tile.h), they run 1.03-1.07x BLAS's speed
//   at 129-192 rows, a tie at 224 and 0.86x at 256. Where the kernel cannot use bf16 arithmetic (AMX
//   without AVX512_BF16, or AVX-512 switched off) BLAS wins from ~16 rows (1.7x at 64, 2.5x at 128).
inline int64_t skinny_max_rows(at::ScalarType dtype) {
  if (dtype == at::kBFloat16 && cpu_has_bf16_arithmetic()) return skinny_gemm_bf16_available() ? 192 : 12;
  return dtype == at::kFloat && skinny_gemm_avx512_enabled() ? 512 : 128;
}

// act[r] = silu(h[r, :I]) * h[r, I:] for rows r0..r1 of h [n, 2I] and act [n, I]; act float or bf16, h
// float or (with act) bf16. One AVX2 pass (swiglu_act.h) where the CPU has it, else ATen's three. A row
// range, not narrowed views: at decode every ATen call counts (route_tokens).
inline void swiglu_into(const at::Tensor& h, at::Tensor& act, int64_t r0, int64_t r1) {
  const int64_t I = act.size(1);
  const bool f32_in = h.scalar_type() == at::kFloat, f32_out = act.scalar_type() == at::kFloat;
  const bool bf16_out = act.scalar_type() == at::kBFloat16;
  const bool pair = f32_in ? (f32_out || bf16_out) : (h.scalar_type() == at::kBFloat16 && bf16_out);  // swiglu_act.h's
  const bool fast = pair && skinny_gemm_available() && h.is_contiguous() && act.is_contiguous();
  if (!fast) {
    const auto rows = h.narrow(0, r0, r1 - r0);
    act.narrow(0, r0, r1 - r0).copy_(at::silu(rows.narrow(1, 0, I)).mul_(rows.narrow(1, I, I)));
    return;
  }
  const auto bits = [](const at::Tensor& t, int64_t offset) {
    return reinterpret_cast<uint16_t*>(t.data_ptr<c10::BFloat16>()) + offset;
  };
  at::parallel_for(r0, r1, std::max<int64_t>(1, 8192 / I), [&](int64_t i0, int64_t i1) {
    if (f32_in && f32_out)
      swiglu_act(h.data_ptr<float>() + i0 * 2 * I, i1 - i0, I, act.data_ptr<float>() + i0 * I);
    else if (f32_in)
      swiglu_act(h.data_ptr<float>() + i0 * 2 * I, i1 - i0, I, bits(act, i0 * I));
    else
      swiglu_act(bits(h, i0 * 2 * I), i1 - i0, I, bits(act, i0 * I));
  });
}

template <typename Fn>
inline void for_each_busy_slot(const std::vector<int64_t>& off, Fn fn) {
  for (size_t s = 0; s + 1 < off.size(); ++s)
    if (off[s + 1] > off[s]) fn(static_cast<int64_t>(s), off[s], off[s + 1] - off[s]);
}

// The slots with at most max_rows rows through the streaming kernel: x [N, H] grouped by slot ->
// their rows of out. The activation runs once per run of adjacent such slots (once in all at decode
// sizes), not once per slot: there, per-slot ATen calls cost as much as streaming a slot's weights.
// bf16 slots multiply bf16 x by bf16 weights where the CPU can (their activation is rounded to bf16 for
// the second product, as on the BLAS path); elsewhere they widen x to fp32.
template <typename W_t>
inline void skinny_swiglu(const at::Tensor& x, const std::vector<int64_t>& off, const at::Tensor& w13, const at::Tensor& w2,
                   int64_t max_rows, at::Tensor& out) {
  std::vector<std::array<int64_t, 3>> small;  // (slot, first row, rows)
  for_each_busy_slot(off, [&](int64_t s, int64_t a, int64_t n) {
    if (n <= max_rows) small.push_back({s, a, n});
  });
  if (small.empty()) return;
  constexpr bool bf16 = std::is_same_v<W_t, c10::BFloat16>;
  const bool dot = bf16 && skinny_gemm_bf16_available();  // bf16 x bf16 products summed in fp32
  const int64_t M = off.back(), H = w13.size(2), I = w13.size(1) / 2;
  const auto opts = x.options().dtype(at::kFloat);
  // y [n, N] fp32 = rows a..a+n of `in` [M, K] (bf16 when `dot`, else fp32) @ slot s's weights [N, K]^T,
  // for every small slot, in one parallel region
  const auto products = [&](const at::Tensor& in, const at::Tensor& w, at::Tensor& y) {
    const int64_t N = w.size(1), K = w.size(2);
    std::vector<SkinnyProduct> group;
    for (const auto& [s, a, n] : small)
      group.push_back({static_cast<const char*>(in.data_ptr()) + a * K * in.element_size(), n,
                       w.data_ptr<W_t>() + s * N * K, y.data_ptr<float>() + a * N});
    if (dot)
      skinny_gemm_bf16(group, K, N);
    else
      skinny_gemm_nt(group, K, N, bf16);
  };
  const auto x_rows = M == x.size(0) ? x : x.narrow(0, 0, M);  // rows past M: unroutable
  const auto x_in = dot || x.scalar_type() == at::kFloat ? x_rows : x_rows.to(at::kFloat);
  auto h = new_cpu({M, 2 * I}, opts);
  products(x_in, w13, h);
  std::vector<std::pair<int64_t, int64_t>> runs;  // [begin, end) rows of adjacent small slots
  for (const auto& [s, a, n] : small) {
    if (!runs.empty() && runs.back().second == a)
      runs.back().second = a + n;
    else
      runs.emplace_back(a, a + n);
  }
  auto act_in = new_cpu({M, I}, opts.dtype(dot ? at::kBFloat16 : at::kFloat));
  for (const auto& [a, b] : runs) swiglu_into(h, act_in, a, b);
  constexpr bool direct = std::is_same_v<W_t, float>;  // out has x's dtype: fp32 rows go straight into it
  auto yf = direct ? out : new_cpu({M, H}, opts);
  products(act_in, w2, yf);
  if constexpr (!direct) {  // rounded into bf16 here, not by copy_: one ATen call less per step
    auto* dst = reinterpret_cast<uint16_t*>(out.data_ptr<c10::BFloat16>());
    const float* src = yf.data_ptr<float>();
    for (const auto& [a, b] : runs)
      at::parallel_for(a * H, b * H, 16384, [&](int64_t i0, int64_t i1) { round_to_bf16(src + i0, i1 - i0, dst + i0); });
  }
}

inline std::vector<int64_t> offsets_vector(const at::Tensor& offsets, int64_t num_rows) {
  const auto o = (offsets.is_cpu() ? offsets : offsets.to(at::kCPU)).contiguous();  // .to() is a dispatched call
  std::vector<int64_t> v(o.data_ptr<int64_t>(), o.data_ptr<int64_t>() + o.numel());
  TORCH_CHECK(v.front() >= 0 && v.back() <= num_rows, "grouped_swiglu: offsets outside [0, ", num_rows, "]");
  for (size_t s = 1; s < v.size(); ++s)
    TORCH_CHECK(v[s] >= v[s - 1], "grouped_swiglu: offsets must be non-decreasing");
  return v;
}

}  // namespace detail
}  // namespace moe_resilient
