"""Routers: how merge weights are computed from hidden states, and how they are initialised."""

from moe_merge.routers.prompt_init import TokenSet, calibrate

__all__ = ["TokenSet", "calibrate"]
