"""moe_resilient: Mixture-of-Experts layers whose expert placement is mutable runtime state."""

from moe_resilient.layer import MoEConfig, ResilientMoE, TopKRouter
from moe_resilient.placement import ExpertPlacement, PlacementError

__all__ = ["ExpertPlacement", "MoEConfig", "PlacementError", "ResilientMoE", "TopKRouter"]
__version__ = "0.1.0"
