"""Routers: training-free initialisation from prompts, and the router modules of the dynamic model."""

from moe_merge.routers.prompt_init import TokenSet, calibrate
from moe_merge.routers.router import Router, masked_mean, normalize

__all__ = ["TokenSet", "calibrate", "Router", "masked_mean", "normalize"]
