// grouped_swiglu_combine: inference only: gather, grouped_swiglu and the weighted top-k sum in one call.
#include "ops.h"

namespace moe_resilient {
using namespace detail;

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

}  // namespace moe_resilient
