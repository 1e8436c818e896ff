"""moe_resilient: Mixture-of-Experts layers whose expert placement is mutable runtime state."""

from moe_resilient.checkpoint import load_routing_state, save_routing_state
from moe_resilient.layer import MoEConfig, ResilientMoE, TopKRouter
from moe_resilient.placement import ExpertPlacement, PlacementError
from moe_resilient.planner import Topology
from moe_resilient.recovery import RecoveryReport, memory_report, recover
from moe_resilient.shadow import ShadowStore, ShadowStoreError

__all__ = [
    "ExpertPlacement",
    "MoEConfig",
    "PlacementError",
    "RecoveryReport",
    "ResilientMoE",
    "ShadowStore",
    "ShadowStoreError",
    "Topology",
    "TopKRouter",
    "load_routing_state",
    "memory_report",
    "recover",
    "save_routing_state",
]
__version__ = "0.1.0"
