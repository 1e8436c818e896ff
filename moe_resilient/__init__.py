"""moe_resilient: Mixture-of-Experts layers whose expert placement is mutable runtime state.

The layer and its placement load eagerly; the control plane (planner: numba; shadow store and
checkpoints: safetensors; recovery) loads on first use, so importing ``ResilientMoE`` stays light.
"""

import importlib

from moe_resilient.layer import MoEConfig, ResilientMoE, TopKRouter
from moe_resilient.placement import ExpertPlacement, PlacementError

_LAZY = {
    "load_routing_state": "checkpoint", "save_routing_state": "checkpoint",
    "Topology": "planner",
    "RecoveryReport": "recovery", "memory_report": "recovery", "recover": "recovery",
    "ShadowStore": "shadow", "ShadowStoreError": "shadow",
    "parallelize": "parallel", "StepRunner": "parallel",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"moe_resilient.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'moe_resilient' has no attribute {name!r}")


__all__ = [
    "ExpertPlacement",
    "MoEConfig",
    "PlacementError",
    "RecoveryReport",
    "ResilientMoE",
    "ShadowStore",
    "ShadowStoreError",
    "StepRunner",
    "Topology",
    "TopKRouter",
    "load_routing_state",
    "memory_report",
    "parallelize",
    "recover",
    "save_routing_state",
]
__version__ = "0.1.0"
