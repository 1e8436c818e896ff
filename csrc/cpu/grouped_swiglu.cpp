// grouped_swiglu: SwiGLU experts over rows already grouped by slot, forward and backward.
#include "ops.h"

namespace moe_resilient {
using namespace detail;

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

}  // namespace moe_resilient
