"""Static merges of task vectors, one tensor at a time, on top of `peft.utils.merge_utils`.

Each returns base + merged delta. They build the non-expert weights (`non_expert`) here, and the
shared part of Twin-Merging and WEMoE later.
"""

from __future__ import annotations

import zlib

import torch

STATIC_METHODS = ("average", "task_arithmetic", "ties", "dare_linear", "dare_ties")
DEFAULT_SCALE = {"average": 1.0, "task_arithmetic": 0.3, "ties": 1.0, "dare_linear": 1.0, "dare_ties": 1.0}


def merge_deltas(
    method: str,
    deltas: list[torch.Tensor],
    *,
    scale: float | None = None,
    density: float = 0.5,
    weights: list[float] | None = None,
    seed: int = 0,
    name: str = "",
) -> torch.Tensor:
    """The merged task vector (float32, or float64 for float64 inputs). DARE's random drop is seeded by (`seed`, `name`), so the result
    does not depend on the order tensors are visited in."""
    from peft.utils import merge_utils  # imported on use: it costs memory a plain assembly does not need

    if method not in STATIC_METHODS:
        raise ValueError(f"unknown static merge {method!r}; choose one of {', '.join(STATIC_METHODS)}")
    n = len(deltas)
    w = torch.tensor(weights if weights is not None else [1.0 / n if method == "average" else 1.0] * n)
    w = w * (DEFAULT_SCALE[method] if scale is None else scale)
    stacked = [d.to(torch.promote_types(d.dtype, torch.float32)) for d in deltas]
    w = w.to(stacked[0].dtype)
    if method in ("average", "task_arithmetic"):
        return merge_utils.task_arithmetic(stacked, w)
    if method == "ties":
        return merge_utils.ties(stacked, w, density)
    with torch.random.fork_rng(devices=[]):  # peft's DARE draws from the global RNG
        torch.manual_seed(seed ^ zlib.crc32(name.encode()))
        return getattr(merge_utils, method)(stacked, w, density)


def static_merge(method: str, base: torch.Tensor, deltas: list[torch.Tensor], **kwargs) -> torch.Tensor:
    """base + merged delta, in the base's dtype."""
    merged = merge_deltas(method, deltas, **kwargs)
    return (base.to(merged.dtype) + merged).to(base.dtype)
