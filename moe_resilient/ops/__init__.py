"""The MoE ops, one name each under ``torch.ops.moe_resilient``, and the one place that picks their
kernels: CPU kernels from the C++ library (csrc/, loaded as ``moe_resilient._C``), CUDA kernels from
``cuda.py`` (PyTorch compositions around ``torch._grouped_mm``), both behind the same op, so callers
and compiled graphs only ever see ``torch.ops.moe_resilient.*``.

- ``wrappers.py``: the public functions, with their fake kernels and autograd;
- ``reference.py``: plain PyTorch implementations with the same contracts (what tests check the
  kernels against, and what the CUDA kernels fall back to), their argument checks, and ``combine``;
- ``cuda.py``: the CUDA kernels.
"""

import torch

from moe_resilient.ops import cuda
from moe_resilient.ops.reference import (combine, combine_args, expert_args, gather_experts_combine,
                                         grouped_swiglu_backward_reference, grouped_swiglu_combine_reference,
                                         grouped_swiglu_reference, live_weights, moe_args, moe_forward_reference,
                                         route_args, route_to_slots_reference, route_tokens_reference, router_args,
                                         softmax_router)
from moe_resilient.ops.wrappers import (grouped_swiglu, grouped_swiglu_combine, moe_forward, route_to_slots,
                                        route_tokens)

for _name, _kernel in cuda.KERNELS.items():
    torch.library.register_kernel(f"moe_resilient::{_name}", "cuda", _kernel)

__all__ = [
    "combine", "combine_args", "expert_args", "gather_experts_combine", "grouped_swiglu",
    "grouped_swiglu_backward_reference", "grouped_swiglu_combine", "grouped_swiglu_combine_reference",
    "grouped_swiglu_reference", "live_weights", "moe_args", "moe_forward", "moe_forward_reference", "route_args",
    "route_to_slots", "route_to_slots_reference", "route_tokens", "route_tokens_reference", "router_args",
    "softmax_router",
]
