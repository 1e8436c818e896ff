// The ops' schemas and CPU kernels, registered as torch.ops.moe_resilient.* (one file per op in this
// folder; fake kernels and autograd in moe_resilient/ops/wrappers.py, CUDA kernels in ops/cuda.py).
#include <torch/library.h>

#include "ops.h"

namespace moe_resilient {

TORCH_LIBRARY(moe_resilient, m) {
  m.def("route_to_slots(Tensor topk_ids, Tensor? log2phy, Tensor? logcnt, int num_slots, bool strict=False, Tensor(a!)? load=None) -> (Tensor, Tensor, Tensor)");
  m.def("route_tokens(Tensor x, Tensor weight, int k, bool normalize, Tensor? log2phy, Tensor? logcnt, int num_slots, bool strict=False, Tensor(a!)? load=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("grouped_swiglu(Tensor x, Tensor offsets, Tensor w13, Tensor w2) -> Tensor");
  m.def("grouped_swiglu_combine(Tensor x, Tensor order, Tensor offsets, Tensor slot_ids, Tensor topk_weights, Tensor w13, Tensor w2) -> Tensor");
  m.def("moe_forward(Tensor x, Tensor gate_weight, int k, bool normalize, Tensor? log2phy, Tensor? logcnt, int num_slots, bool strict, Tensor w13, Tensor w2, float scaling=1.0, Tensor(a!)? load=None) -> (Tensor, Tensor)");
  m.def("grouped_swiglu_backward(Tensor grad_out, Tensor x, Tensor offsets, Tensor w13, Tensor w2) -> (Tensor, Tensor, Tensor)");
  m.def("checksum(Tensor src) -> int");
  m.def("copy_checksum(Tensor src, Tensor(a!) dst) -> int");
}

TORCH_LIBRARY_IMPL(moe_resilient, CPU, m) {
  m.impl("route_to_slots", &route_to_slots);
  m.impl("route_tokens", &route_tokens);
  m.impl("grouped_swiglu", &grouped_swiglu);
  m.impl("grouped_swiglu_combine", &grouped_swiglu_combine);
  m.impl("moe_forward", &moe_forward);
  m.impl("grouped_swiglu_backward", &grouped_swiglu_backward);
  m.impl("checksum", &checksum);
  m.impl("copy_checksum", &copy_checksum);
}

}  // namespace moe_resilient
