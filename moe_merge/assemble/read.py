"""One tensor of a recipe's sources, as both assembly paths read it: an expert's full weight (a LoRA adapter's
formed), and the recipe's static merge over the experts. No caching: each call reads its sources."""

from __future__ import annotations

import torch

from moe_merge.errors import CompatibilityError
from moe_merge.merge import merge_by_spec
from moe_merge.recipe import Recipe
from moe_merge.sources import Expert, LoraExpert


def expert_tensor(expert: Expert, name: str, shape, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """The expert's full weight in `dtype` (None: as stored), checked against the base's `shape`; a LoRA expert's
    base + B·A is formed in float32 or wider."""
    if isinstance(expert, LoraExpert) and name in expert.factors:
        A, B, scaling = expert.factors[name]
        wide = dtype or torch.float32
        delta = scaling * (B.to(wide) @ A.to(wide))
        t = expert.base.get(name).to(wide) + (delta.T if expert.fan_in_fan_out else delta)
    else:
        t = expert.get(name)
        t = t if dtype is None else t.to(dtype)
    if tuple(t.shape) != tuple(shape):
        raise CompatibilityError(
            f"tensor {name!r} has shape {tuple(t.shape)} in {expert.path} but {tuple(shape)} in the base"
        )
    return t


def static_merge(recipe: Recipe, name: str, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The recipe's static merge of base tensor `name` over the experts, computed and returned in `dtype`."""
    base = recipe.base.get(name).to(dtype)
    untouched = all(isinstance(e, LoraExpert) and name not in e.factors for e in recipe.experts)
    if recipe.config.static_method == "base" or untouched:
        return base  # every merge of zero task vectors is the base
    deltas = [expert_tensor(e, name, base.shape, dtype) - base for e in recipe.experts]
    return merge_by_spec(recipe.config.static_merge, base, deltas, seed, name)


def differs(recipe: Recipe, name: str) -> bool:
    """Whether some expert's `name` is not the base's, bit for bit (in the wider of their dtypes)."""
    theta = recipe.base.get(name)
    for e in recipe.experts:
        if isinstance(e, LoraExpert) and name not in e.factors:
            continue
        t = expert_tensor(e, name, theta.shape, dtype=None)
        wide = torch.promote_types(t.dtype, theta.dtype)
        if not torch.equal(t.to(wide), theta.to(wide)):
            return True
    return False
