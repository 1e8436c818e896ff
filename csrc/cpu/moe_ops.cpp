// CPU kernels on the MoE hot path, registered as `torch.ops.moe_resilient.*`.
//
// route_to_slots:  replica choice + counting sort of the (token, k) pairs by physical slot, one pass.
// route_tokens:    inference only: the softmax router (logits, top-k, weights) and route_to_slots.
// grouped_swiglu:  SwiGLU experts over rows already grouped by slot (forward and backward).
// grouped_swiglu_combine: inference only: gather, grouped_swiglu and the weighted top-k sum in one call.
// moe_forward:     inference only: route_tokens and grouped_swiglu_combine, a whole MoE block in one call.
//
// Fake (meta) kernels and autograd live in moe_resilient/ops.py.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>

#include "skinny_gemm.h"
#include "swiglu_act.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace moe_resilient {
namespace {

// Tensors made without the dispatcher. Right after a step has streamed its experts through the caches,
// every dispatched call is slow: an at::empty 1-9 us, a reshape or view of x 15-25 us, where the whole
// 1-token bf16 step is ~800 us.
at::Tensor new_cpu(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::detail::empty_cpu(sizes, options);
}
// t [..., H] as [T, H]: a view of a contiguous t (one that does not own the memory, so only while t
// lives), else a reshape.
at::Tensor as_rows(const at::Tensor& t) {
  if (t.dim() == 2) return t;
  if (!t.is_contiguous() || t.numel() == 0) return t.reshape({-1, t.size(-1)});
  return at::from_blob(t.data_ptr(), {t.numel() / t.size(-1), t.size(-1)}, t.options());
}

}  // namespace

// topk_ids [T, K] logical experts; log2phy [E, R] live slots of each expert (-1 padded);
// logcnt [E] live replica count. Token t uses replica t % logcnt[e]. With no placement
// (log2phy and logcnt both None) slot == expert: the fixed-placement baseline.
// Returns
//   slot_ids [T, K]  chosen slot, -1 where the expert has no live replica;
//   order    [T*K]   flat (t*K + k) indices sorted by slot, stable; unroutable pairs last;
//   offsets  [S+1]   rows of slot s are order[offsets[s]:offsets[s+1]].
// With `load` ([E] int64), adds each expert's pair count to it, once every id has been checked (a
// rejected call changes nothing): the layer's load counters without two more ATen calls per step.
std::tuple<at::Tensor, at::Tensor, at::Tensor> route_to_slots(
    const at::Tensor& topk_ids, const std::optional<at::Tensor>& log2phy, const std::optional<at::Tensor>& logcnt,
    int64_t num_slots, bool strict, const std::optional<at::Tensor>& load) {
  TORCH_CHECK(topk_ids.dim() == 2, "route_to_slots: topk_ids must be [T, K], got ", topk_ids.sizes());
  TORCH_CHECK(topk_ids.scalar_type() == at::kLong, "route_to_slots: topk_ids must be int64");
  TORCH_CHECK(num_slots > 0, "route_to_slots: num_slots must be positive");
  TORCH_CHECK(log2phy.has_value() == logcnt.has_value(), "route_to_slots: pass both log2phy and logcnt or neither");
  const bool identity = !log2phy.has_value();
  at::Tensor l2p, cnt;
  if (!identity) {
    TORCH_CHECK(log2phy->dim() == 2 && logcnt->dim() == 1 && log2phy->size(0) == logcnt->size(0),
                "route_to_slots: log2phy must be [E, R] and logcnt [E]");
    TORCH_CHECK(log2phy->scalar_type() == at::kLong && logcnt->scalar_type() == at::kLong,
                "route_to_slots: log2phy and logcnt must be int64");
    l2p = log2phy->contiguous();
    cnt = logcnt->contiguous();
  }
  const auto ids = topk_ids.contiguous();
  const int64_t T = ids.size(0), K = ids.size(1), N = T * K;
  const int64_t E = identity ? num_slots : l2p.size(0), R = identity ? 1 : l2p.size(1);
  if (load.has_value())
    TORCH_CHECK(load->dim() == 1 && load->size(0) == E && load->scalar_type() == at::kLong && load->is_contiguous(),
                "route_to_slots: load must be a contiguous int64 [", E, "], got ", load->sizes());

  auto slot_ids = new_cpu({T, K}, ids.options());
  auto order = new_cpu({N}, ids.options());
  auto offsets = new_cpu({num_slots + 1}, ids.options());
  const int64_t* ids_p = ids.data_ptr<int64_t>();
  const int64_t* l2p_p = identity ? nullptr : l2p.data_ptr<int64_t>();
  const int64_t* cnt_p = identity ? nullptr : cnt.data_ptr<int64_t>();
  int64_t* slot_p = slot_ids.data_ptr<int64_t>();
  int64_t* order_p = order.data_ptr<int64_t>();
  int64_t* off_p = offsets.data_ptr<int64_t>();
  std::fill(off_p, off_p + num_slots + 1, int64_t{0});

  // Pass 1: choose a replica and count rows per slot (bucket num_slots collects unroutable pairs).
  std::vector<int64_t> count(num_slots + 1, 0), per_expert(load.has_value() ? E : 0, 0);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t e = ids_p[i];
    TORCH_CHECK(e >= 0 && e < E, "route_to_slots: expert id ", e, " out of range [0, ", E, ")");
    if (load.has_value()) ++per_expert[e];
    if (identity) {
      slot_p[i] = e;
      ++count[e];
      continue;
    }
    const int64_t c = cnt_p[e];
    TORCH_CHECK(c >= 0 && c <= R, "route_to_slots: logcnt[", e, "] = ", c, " outside [0, ", R, "]");
    TORCH_CHECK(c > 0 || !strict, "route_to_slots: expert ", e,
                " has no live replica (degraded='raise'); run recover() or use degraded='renormalize'");
    int64_t s = -1;
    if (c > 0) {
      s = l2p_p[e * R + (i / K) % c];
      TORCH_CHECK(s >= 0 && s < num_slots, "route_to_slots: log2phy[", e, "] names slot ", s,
                  " outside [0, ", num_slots, ")");
    }
    slot_p[i] = s;
    ++count[s < 0 ? num_slots : s];
  }
  if (load.has_value()) {
    int64_t* load_p = load->data_ptr<int64_t>();
    for (int64_t e = 0; e < E; ++e) load_p[e] += per_expert[e];
  }
  // Pass 2: exclusive prefix sum, then a stable scatter.
  std::vector<int64_t> cursor(num_slots + 1, 0);
  int64_t run = 0;
  for (int64_t s = 0; s <= num_slots; ++s) {
    cursor[s] = run;
    off_p[s] = run;
    run += count[s];
  }
  for (int64_t i = 0; i < N; ++i) {
    const int64_t s = slot_p[i];
    order_p[cursor[s < 0 ? num_slots : s]++] = i;
  }
  return {slot_ids, order, offsets};
}

// Softmax router's selection: logits [T, E] -> (topk_weights [T, K] float32, topk_ids [T, K] int64),
// highest score first (ties: lower expert id). Scores are softmax(logits) in fp32; with `normalize` the
// K weights are divided by their sum (+1e-20).
std::tuple<at::Tensor, at::Tensor> softmax_topk(const at::Tensor& logits_in, int64_t k, bool normalize) {
  const int64_t T = logits_in.size(0), E = logits_in.size(1);
  const auto logits =  // fp32 logits as they are: even a no-op .to() is an ATen call (route_tokens)
      logits_in.scalar_type() == at::kFloat ? logits_in.contiguous() : logits_in.to(at::kFloat).contiguous();
  auto weights = new_cpu({T, k}, logits.options());
  auto ids = new_cpu({T, k}, logits.options().dtype(at::kLong));
  const float* l_p = logits.data_ptr<float>();
  float* w_p = weights.data_ptr<float>();
  int64_t* id_p = ids.data_ptr<int64_t>();
  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    std::vector<float> p(E);
    std::vector<int64_t> idx(E);
    for (int64_t t = t0; t < t1; ++t) {
      const float* l = l_p + t * E;
      const float top = *std::max_element(l, l + E);
      float total = 0;
      for (int64_t e = 0; e < E; ++e) total += (p[e] = std::exp(l[e] - top));
      for (int64_t e = 0; e < E; ++e) idx[e] = e;
      // NaN ranks first, as in torch.topk; the order must stay strict and weak for partial_sort
      std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int64_t a, int64_t b) {
        const bool na = std::isnan(p[a]), nb = std::isnan(p[b]);
        if (na || nb) return na && (!nb || a < b);
        return p[a] > p[b] || (p[a] == p[b] && a < b);
      });
      float chosen = 0;
      for (int64_t j = 0; j < k; ++j) chosen += (w_p[t * k + j] = p[idx[j]] / total);
      const float scale = normalize ? 1.f / (chosen + 1e-20f) : 1.f;
      for (int64_t j = 0; j < k; ++j) {
        w_p[t * k + j] *= scale;
        id_p[t * k + j] = idx[j];
      }
    }
  });
  return {weights, ids};
}

// Inference routing with softmax scoring, in one call: x [T, H], gate weight [E, H] (same dtype) ->
// (router_logits [T, E] in x's dtype, topk_weights [T, K] float32, topk_ids [T, K], and route_to_slots'
// slot_ids, order, offsets), what F.linear + softmax + topk + gather + renormalize + route_to_slots
// give. Up to 64 tokens the logits come from the streaming kernel. Right after a step has streamed its
// experts through the caches every call is slow (an ATen call 40-80 us, a BLAS bf16 GEMV ~190 us, the
// Python gate module ~200 us, where the whole 1-token bf16 step is ~900 us): hence one call.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_tokens(
    const at::Tensor& x_in, const at::Tensor& weight, int64_t k, bool normalize,
    const std::optional<at::Tensor>& log2phy, const std::optional<at::Tensor>& logcnt, int64_t num_slots, bool strict,
    const std::optional<at::Tensor>& load) {
  TORCH_CHECK(x_in.dim() == 2 && weight.dim() == 2 && x_in.size(1) == weight.size(1),
              "route_tokens: x must be [T, H] and weight [E, H], got ", x_in.sizes(), " and ", weight.sizes());
  TORCH_CHECK(x_in.scalar_type() == weight.scalar_type(), "route_tokens: x and weight dtypes differ");
  const int64_t T = x_in.size(0), H = x_in.size(1), E = weight.size(0);
  TORCH_CHECK(k >= 1 && k <= E, "route_tokens: k = ", k, " outside [1, ", E, "]");
  const auto dtype = x_in.scalar_type();
  at::Tensor logits, scores_from;  // scores_from: the logits as rounded, in fp32 where we have them
  if (T <= 64 && skinny_gemm_available() && x_in.device().is_cpu() &&
      (dtype == at::kFloat || dtype == at::kBFloat16)) {
    const auto x = x_in.contiguous();
    const auto w = weight.contiguous();
    auto lf = new_cpu({T, E}, x.options().dtype(at::kFloat));
    if (dtype == at::kFloat) {
      skinny_gemm_nt(x.data_ptr<float>(), T, H, w.data_ptr<float>(), E, lf.data_ptr<float>());
      logits = lf;
    } else {
      if (skinny_gemm_bf16_available()) {  // bf16 products summed in fp32, as BLAS: no widened copy of x
        skinny_gemm_bf16({{x.data_ptr(), T, w.data_ptr(), lf.data_ptr<float>()}}, H, E);
      } else {
        const auto xf = x.to(at::kFloat);
        skinny_gemm_nt(xf.data_ptr<float>(), T, H, w.data_ptr<c10::BFloat16>(), E, lf.data_ptr<float>());
      }
      // rounded as F.linear's output is; the scores below use the rounded values. A loop, not .to(): a
      // few ATen calls less per step (see above)
      logits = new_cpu({T, E}, x.options());
      auto* dst = logits.data_ptr<c10::BFloat16>();
      float* src = lf.data_ptr<float>();
      for (int64_t i = 0; i < T * E; ++i) {
        dst[i] = c10::BFloat16(src[i]);
        src[i] = static_cast<float>(dst[i]);  // the rounded value, for the scores
      }
    }
    scores_from = lf;
  } else {
    logits = scores_from = at::linear(x_in, weight);
  }
  auto [topk_weights, topk_ids] = softmax_topk(scores_from, k, normalize);
  auto [slot_ids, order, offsets] = route_to_slots(topk_ids, log2phy, logcnt, num_slots, strict, load);
  return {logits, topk_weights, topk_ids, slot_ids, order, offsets};
}

namespace {

void check_experts(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2) {
  TORCH_CHECK(x.dim() == 2, "grouped_swiglu: x must be [N, H], got ", x.sizes());
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3, "grouped_swiglu: w13 must be [S, 2I, H] and w2 [S, H, I]");
  const int64_t S = w13.size(0), H = w13.size(2), I = w13.size(1) / 2;
  TORCH_CHECK(w13.size(1) == 2 * I && w2.size(0) == S && w2.size(1) == H && w2.size(2) == I,
              "grouped_swiglu: w13 ", w13.sizes(), " and w2 ", w2.sizes(), " disagree");
  TORCH_CHECK(x.size(1) == H, "grouped_swiglu: x has hidden size ", x.size(1), ", experts expect ", H);
  TORCH_CHECK(x.scalar_type() == w13.scalar_type() && x.scalar_type() == w2.scalar_type(),
              "grouped_swiglu: dtype mismatch between x and expert weights");
}

void check_grouped(const at::Tensor& x, const at::Tensor& offsets, const at::Tensor& w13, const at::Tensor& w2) {
  check_experts(x, w13, w2);
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) == w13.size(0) + 1 && offsets.scalar_type() == at::kLong,
              "grouped_swiglu: offsets must be int64 [S+1] = [", w13.size(0) + 1, "]");
}

bool cpu_has_bf16_arithmetic() {
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
int64_t skinny_max_rows(at::ScalarType dtype) {
  if (dtype == at::kBFloat16 && cpu_has_bf16_arithmetic()) return skinny_gemm_bf16_available() ? 192 : 12;
  return dtype == at::kFloat && skinny_gemm_avx512_enabled() ? 512 : 128;
}

// act[r] = silu(h[r, :I]) * h[r, I:] for rows r0..r1 of h [n, 2I] and act [n, I]; act float or bf16, h
// float or (with act) bf16. One AVX2 pass (swiglu_act.h) where the CPU has it, else ATen's three. A row
// range, not narrowed views: at decode every ATen call counts (route_tokens).
void swiglu_into(const at::Tensor& h, at::Tensor& act, int64_t r0, int64_t r1) {
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
void for_each_busy_slot(const std::vector<int64_t>& off, Fn fn) {
  for (size_t s = 0; s + 1 < off.size(); ++s)
    if (off[s + 1] > off[s]) fn(static_cast<int64_t>(s), off[s], off[s + 1] - off[s]);
}

// The slots with at most max_rows rows through the streaming kernel: x [N, H] grouped by slot ->
// their rows of out. The activation runs once per run of adjacent such slots (once in all at decode
// sizes), not once per slot: there, per-slot ATen calls cost as much as streaming a slot's weights.
// bf16 slots multiply bf16 x by bf16 weights where the CPU can (their activation is rounded to bf16 for
// the second product, as on the BLAS path); elsewhere they widen x to fp32.
template <typename W_t>
void skinny_swiglu(const at::Tensor& x, const std::vector<int64_t>& off, const at::Tensor& w13, const at::Tensor& w2,
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

std::vector<int64_t> offsets_vector(const at::Tensor& offsets, int64_t num_rows) {
  const auto o = (offsets.is_cpu() ? offsets : offsets.to(at::kCPU)).contiguous();  // .to() is a dispatched call
  std::vector<int64_t> v(o.data_ptr<int64_t>(), o.data_ptr<int64_t>() + o.numel());
  TORCH_CHECK(v.front() >= 0 && v.back() <= num_rows, "grouped_swiglu: offsets outside [0, ", num_rows, "]");
  for (size_t s = 1; s < v.size(); ++s)
    TORCH_CHECK(v[s] >= v[s - 1], "grouped_swiglu: offsets must be non-decreasing");
  return v;
}

}  // namespace

// x [N, H] rows grouped by slot; rows of slot s are x[offsets[s]:offsets[s+1]].
// out[r] = w2[s] @ (silu(w1[s] @ x[r]) * (w3[s] @ x[r])), w13[s] = cat(w1[s], w3[s]) [2I, H].
// Rows past offsets[S] (unroutable) get zeros.
at::Tensor grouped_swiglu(const at::Tensor& x_in, const at::Tensor& offsets, const at::Tensor& w13,
                          const at::Tensor& w2) {
  check_grouped(x_in, offsets, w13, w2);
  const auto x = x_in.contiguous();
  const int64_t I = w13.size(1) / 2;
  const auto off = offsets_vector(offsets, x.size(0));
  auto out = new_cpu(x.sizes(), x.options());
  if (off.back() < x.size(0)) out.narrow(0, off.back(), x.size(0) - off.back()).zero_();
  const bool skinny = skinny_gemm_available() && x.device().is_cpu() && w13.is_contiguous() && w2.is_contiguous() &&
                      (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16);
  const int64_t max_rows = skinny_max_rows(x.scalar_type());
  if (skinny && x.scalar_type() == at::kFloat)
    skinny_swiglu<float>(x, off, w13, w2, max_rows, out);
  else if (skinny)
    skinny_swiglu<c10::BFloat16>(x, off, w13, w2, max_rows, out);
  // Without bf16 arithmetic in the CPU, BLAS multiplies bf16 matrices ~6x slower than it converts
  // them and multiplies in fp32 (one slot, 512 rows: 310 ms against 50 ms here).
  const bool widen = x.scalar_type() == at::kBFloat16 && x.device().is_cpu() && !cpu_has_bf16_arithmetic();
  const auto compute = [&](const at::Tensor& t) { return widen ? t.to(at::kFloat) : t; };
  for_each_busy_slot(off, [&](int64_t s, int64_t a, int64_t n) {
    if (skinny && n <= max_rows) return;  // done above
    const auto h = at::mm(compute(x.narrow(0, a, n)), compute(w13[s]).t());  // [n, 2I]
    auto act = at::empty({n, I}, h.options());
    swiglu_into(h, act, 0, n);
    auto dst = out.narrow(0, a, n);
    if (widen)
      dst.copy_(at::mm(act, compute(w2[s]).t()));
    else
      at::mm_out(dst, act, w2[s].t());
  });
  return out;
}

// Inference: the expert half of a forward in one call (no autograd). x [T, H]; order, offsets and
// slot_ids [T, K] from route_to_slots; topk_weights [T, K] float. Gathers x's rows in slot order, runs
// grouped_swiglu, and sums each token's K outputs weighted: out[t] = sum_k w[t, k] y[t, k], where an
// unroutable pair (slot -1) gets weight 0 and the others are rescaled to the full top-k mass. At decode
// sizes the ten ATen calls this replaces cost as much as a fifth of the step. Into `out` ([T, H],
// contiguous) where it is defined, else into a new tensor; returns it.
at::Tensor grouped_swiglu_combine_into(const at::Tensor& x_in, const at::Tensor& order, const at::Tensor& offsets,
                                       const at::Tensor& slot_ids, const at::Tensor& topk_weights,
                                       const at::Tensor& w13, const at::Tensor& w2, at::Tensor out) {
  TORCH_CHECK(x_in.dim() == 2 && slot_ids.dim() == 2 && slot_ids.size(0) == x_in.size(0),
              "grouped_swiglu_combine: x must be [T, H] and slot_ids [T, K]");
  const int64_t T = x_in.size(0), K = slot_ids.size(1), H = x_in.size(1);
  TORCH_CHECK(order.dim() == 1 && order.size(0) == T * K && order.scalar_type() == at::kLong,
              "grouped_swiglu_combine: order must be int64 [T*K] = [", T * K, "]");
  TORCH_CHECK(slot_ids.scalar_type() == at::kLong, "grouped_swiglu_combine: slot_ids must be int64");
  TORCH_CHECK(topk_weights.sizes() == slot_ids.sizes() && topk_weights.scalar_type() == at::kFloat,
              "grouped_swiglu_combine: topk_weights must be float32 ", slot_ids.sizes());
  const auto ord = order.contiguous();
  std::vector<int64_t> row_of(T * K, -1);  // (token, k) -> its row in y_rows
  const int64_t* ord_p = ord.data_ptr<int64_t>();
  for (int64_t i = 0; i < T * K; ++i) {
    TORCH_CHECK(ord_p[i] >= 0 && ord_p[i] < T * K && row_of[ord_p[i]] < 0, "grouped_swiglu_combine: order holds ",
                ord_p[i], " at ", i, ", not a permutation of [0, ", T * K, ")");
    row_of[ord_p[i]] = i;
  }
  const auto x = x_in.contiguous();
  auto x_rows = new_cpu({T * K, H}, x.options());  // x's rows in slot order: row i is token ord[i] / K
  const int64_t row_bytes = H * x.element_size();
  const char* x_p = static_cast<const char*>(x.data_ptr());
  char* rows_p = static_cast<char*>(x_rows.data_ptr());
  at::parallel_for(0, T * K, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) std::memcpy(rows_p + i * row_bytes, x_p + ord_p[i] / K * row_bytes, row_bytes);
  });
  const auto y_rows = grouped_swiglu(x_rows, offsets, w13, w2);  // [T*K, H]
  const auto slots = slot_ids.contiguous();
  const auto wts = topk_weights.contiguous();
  if (!out.defined()) out = new_cpu({T, H}, x.options());
  const int64_t* slot_p = slots.data_ptr<int64_t>();
  const float* w_p = wts.data_ptr<float>();
  const bool vectorised = skinny_gemm_available();  // swiglu_act.h's bf16 loops
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "grouped_swiglu_combine", [&] {
    const scalar_t* y_p = y_rows.data_ptr<scalar_t>();
    scalar_t* out_p = out.data_ptr<scalar_t>();
    constexpr bool bf16 = std::is_same_v<scalar_t, c10::BFloat16>;
    at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
      std::vector<float> acc(H), w(K);
      for (int64_t t = t0; t < t1; ++t) {
        float total = 0, live = 0;
        for (int64_t k = 0; k < K; ++k) {
          total += w_p[t * K + k];
          w[k] = slot_p[t * K + k] >= 0 ? w_p[t * K + k] : 0.f;
          live += w[k];
        }
        const float scale = total / std::max(live, 1e-20f);
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t k = 0; k < K; ++k) {
          const float wk = w[k] * scale;
          const scalar_t* y = y_p + row_of[t * K + k] * H;
          if (bf16 && vectorised)
            add_scaled_bf16(acc.data(), wk, reinterpret_cast<const uint16_t*>(y), H);
          else
            for (int64_t j = 0; j < H; ++j) acc[j] += wk * static_cast<float>(y[j]);
        }
        if (bf16 && vectorised)
          round_to_bf16(acc.data(), H, reinterpret_cast<uint16_t*>(out_p + t * H));
        else
          for (int64_t j = 0; j < H; ++j) out_p[t * H + j] = static_cast<scalar_t>(acc[j]);
      }
    });
  });
  return out;
}

at::Tensor grouped_swiglu_combine(const at::Tensor& x, const at::Tensor& order, const at::Tensor& offsets,
                                  const at::Tensor& slot_ids, const at::Tensor& topk_weights, const at::Tensor& w13,
                                  const at::Tensor& w2) {
  return grouped_swiglu_combine_into(x, order, offsets, slot_ids, topk_weights, w13, w2, at::Tensor());
}

// Inference: a softmax-routed MoE block's forward in one call, route_tokens then grouped_swiglu_combine
// with the top-k weights times `scaling`: x [..., H] -> (out [..., H], router_logits [T, E]), T tokens.
// Right after a step has streamed its experts through the caches, every call from Python costs tens of
// us, a reshape included (the 1-token bf16 step is ~800 us): eager serving makes this one call, past the
// dispatcher (eager_calls.cpp).
std::tuple<at::Tensor, at::Tensor> moe_forward(const at::Tensor& x_in, const at::Tensor& gate_weight, int64_t k,
                                               bool normalize, const std::optional<at::Tensor>& log2phy,
                                               const std::optional<at::Tensor>& logcnt, int64_t num_slots, bool strict,
                                               const at::Tensor& w13, const at::Tensor& w2, double scaling,
                                               const std::optional<at::Tensor>& load) {
  TORCH_CHECK(x_in.dim() >= 1, "moe_forward: x must be [..., H], got a scalar");
  const auto x = as_rows(x_in);
  check_experts(x, w13, w2);  // before route_tokens adds to `load`: a rejected call changes nothing
  TORCH_CHECK(w13.size(0) == num_slots, "moe_forward: w13 holds ", w13.size(0), " slots, num_slots is ", num_slots);
  auto [logits, topk_weights, topk_ids, slot_ids, order, offsets] =
      route_tokens(x, gate_weight, k, normalize, log2phy, logcnt, num_slots, strict, load);
  if (scaling != 1.0) {  // a loop, not mul_: see above
    float* w_p = topk_weights.data_ptr<float>();
    for (int64_t i = 0; i < topk_weights.numel(); ++i) w_p[i] *= static_cast<float>(scaling);
  }
  auto out = new_cpu(x_in.sizes(), x_in.options());  // x's shape: no view of a [T, H] result to make
  grouped_swiglu_combine_into(x, order, offsets, slot_ids, topk_weights, w13, w2, as_rows(out));
  return {out, logits};
}

// Recomputes the activations slot by slot (no saved [N, 2I] buffer) and returns
// grad_x [N, H], grad_w13 [S, 2I, H], grad_w2 [S, H, I]; slots with no rows get zero gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor> grouped_swiglu_backward(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& offsets, const at::Tensor& w13,
    const at::Tensor& w2) {
  check_grouped(x_in, offsets, w13, w2);
  TORCH_CHECK(grad_out_in.sizes() == x_in.sizes(), "grouped_swiglu_backward: grad_out must match x");
  const auto x = x_in.contiguous();
  const auto grad_out = grad_out_in.contiguous();
  const int64_t I = w13.size(1) / 2;
  const auto off = offsets_vector(offsets, x.size(0));
  auto grad_x = at::zeros_like(x);
  auto grad_w13 = at::zeros_like(w13);
  auto grad_w2 = at::zeros_like(w2);
  for_each_busy_slot(off, [&](int64_t s, int64_t a, int64_t n) {
    const auto xs = x.narrow(0, a, n);
    const auto go = grad_out.narrow(0, a, n);
    const auto h = at::mm(xs, w13[s].t());
    const auto g = h.narrow(1, 0, I), u = h.narrow(1, I, I);
    const auto sig = at::sigmoid(g);
    const auto silu_g = g * sig;
    auto gw2 = grad_w2[s];
    at::mm_out(gw2, go.t(), silu_g * u);                  // [H, I]
    const auto grad_act = at::mm(go, w2[s]);              // [n, I]
    auto grad_h = at::empty_like(h);
    grad_h.narrow(1, 0, I).copy_(grad_act * u * sig * (1 + g * (1 - sig)));
    grad_h.narrow(1, I, I).copy_(grad_act * silu_g);
    auto gw13 = grad_w13[s];
    at::mm_out(gw13, grad_h.t(), xs);                     // [2I, H]
    auto gx = grad_x.narrow(0, a, n);
    at::mm_out(gx, grad_h, w13[s]);                       // [n, H]
  });
  return {grad_x, grad_w13, grad_w2};
}

TORCH_LIBRARY(moe_resilient, m) {
  m.def("route_to_slots(Tensor topk_ids, Tensor? log2phy, Tensor? logcnt, int num_slots, bool strict=False, Tensor(a!)? load=None) -> (Tensor, Tensor, Tensor)");
  m.def("route_tokens(Tensor x, Tensor weight, int k, bool normalize, Tensor? log2phy, Tensor? logcnt, int num_slots, bool strict=False, Tensor(a!)? load=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("grouped_swiglu(Tensor x, Tensor offsets, Tensor w13, Tensor w2) -> Tensor");
  m.def("grouped_swiglu_combine(Tensor x, Tensor order, Tensor offsets, Tensor slot_ids, Tensor topk_weights, Tensor w13, Tensor w2) -> Tensor");
  m.def("moe_forward(Tensor x, Tensor gate_weight, int k, bool normalize, Tensor? log2phy, Tensor? logcnt, int num_slots, bool strict, Tensor w13, Tensor w2, float scaling=1.0, Tensor(a!)? load=None) -> (Tensor, Tensor)");
  m.def("grouped_swiglu_backward(Tensor grad_out, Tensor x, Tensor offsets, Tensor w13, Tensor w2) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(moe_resilient, CPU, m) {
  m.impl("route_to_slots", &route_to_slots);
  m.impl("route_tokens", &route_tokens);
  m.impl("grouped_swiglu", &grouped_swiglu);
  m.impl("grouped_swiglu_combine", &grouped_swiglu_combine);
  m.impl("moe_forward", &moe_forward);
  m.impl("grouped_swiglu_backward", &grouped_swiglu_backward);
}

}  // namespace moe_resilient
