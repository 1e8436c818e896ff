// moe_forward: inference only: route_tokens and grouped_swiglu_combine, a whole MoE block in one call.
#include "ops.h"

namespace moe_resilient {
using namespace detail;

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

}  // namespace moe_resilient
