// route_to_slots: replica choice + counting sort of the (token, k) pairs by physical slot, one pass.
#include "ops.h"

namespace moe_resilient {
using namespace detail;

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

}  // namespace moe_resilient
