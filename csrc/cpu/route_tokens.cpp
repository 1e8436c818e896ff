// route_tokens: inference only: the softmax router (logits, top-k, weights) and route_to_slots.
#include "skinny_gemm.h"
#include "ops.h"

namespace moe_resilient {
using namespace detail;

// Softmax router's selection: logits [T, E] -> (topk_weights [T, K] float32, topk_ids [T, K] int64),
// highest score first (ties: lower expert id). Scores are softmax(logits) in fp32; with `normalize` the
// K weights are divided by their sum (+1e-20).
namespace {
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
}  // namespace

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

}  // namespace moe_resilient
