"""Static merges of task vectors, one tensor at a time, on top of `peft.utils.merge_utils`.

Each returns base + merged delta. They build the non-expert weights (`non_expert`) here, the shared part of
Twin-Merging and WEMoE, and the fixed vectors merge search scores its candidates with (`trimmed`).

`mixup` is M³ (Mixup Model Merge): merge weights λ drawn from Beta(α, α) for two experts, or Dirichlet(α)
for more (our extension), reproducible from a seed (`mixup_draws`), applied through a base method:
- `average`: Σ λ_e θ_e; `task_arithmetic`: θ0 + s·Σ λ_e τ_e; `dare_linear`: the same after DARE's drop;
- `ties`, `dare_ties`: λ applies only where two or more experts survive with the elected sign; a lone
  survivor is kept whole (M³'s rule). With more than two experts λ_e is scaled by E / (experts agreeing there),
  so that the mean draw gives TIES's disjoint mean (ours).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, get_args

import torch

STATIC_METHODS = ("average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "mixup")
DEFAULT_SCALE = {
    "average": 1.0,
    "task_arithmetic": 0.3,
    "ties": 1.0,
    "dare_linear": 1.0,
    "dare_ties": 1.0,
    "mixup": 1.0,
}
MixupBase = Literal["average", "task_arithmetic", "ties", "dare_linear", "dare_ties"]
MIXUP_BASES: tuple[MixupBase, ...] = get_args(MixupBase)


@dataclass(frozen=True)
class StaticSpec:
    """A static merge of one tensor over the experts: peft merge_utils' method and its arguments."""

    method: str  # base | average | task_arithmetic | ties | dare_linear | dare_ties | mixup
    scale: float | None
    density: float
    weights: list[float] | None  # mixup: its drawn λ
    base_method: str = "average"  # mixup: how λ applies


@contextmanager
def seeded(seed: int, name: str) -> Iterator[None]:
    """The global RNG (which peft's DARE draws from) seeded by (`seed`, tensor `name`), restored afterwards: a
    tensor's drop does not depend on the order tensors are visited in."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed ^ zlib.crc32(name.encode()))
        yield


def merge_deltas(
    method: str,
    deltas: list[torch.Tensor],
    *,
    scale: float | None = None,
    density: float = 0.5,
    weights: list[float] | None = None,
    seed: int = 0,
    name: str = "",
    base_method: str = "average",
) -> torch.Tensor:
    """The merged task vector (float32, or float64 for float64 inputs). `mixup` takes its λ as `weights` and
    applies them through `base_method`."""
    from peft.utils import merge_utils  # imported on use: it costs memory a plain assembly does not need

    if method not in STATIC_METHODS:
        raise ValueError(f"unknown static merge {method!r}; choose one of {', '.join(STATIC_METHODS)}")
    n = len(deltas)
    stacked = [d.to(torch.promote_types(d.dtype, torch.float32)) for d in deltas]
    scale = DEFAULT_SCALE[method] if scale is None else scale
    if method == "mixup":
        return mixup(
            torch.stack(stacked), torch.tensor(weights, dtype=stacked[0].dtype), base_method, scale, density, seed, name
        )
    w = (
        torch.tensor(
            weights if weights is not None else [1.0 / n if method == "average" else 1.0] * n, dtype=stacked[0].dtype
        )
        * scale
    )  # in the deltas' dtype: a float64 merge takes λ = 0.3 exactly
    if method in ("average", "task_arithmetic"):
        return merge_utils.task_arithmetic(stacked, w)
    if method == "ties":
        return merge_utils.ties(stacked, w, density)
    with seeded(seed, name):
        return getattr(merge_utils, method)(stacked, w, density)


def static_merge(method: str, base: torch.Tensor, deltas: list[torch.Tensor], **kwargs) -> torch.Tensor:
    """base + merged delta, in the base's dtype."""
    merged = merge_deltas(method, deltas, **kwargs)
    return (base.to(merged.dtype) + merged).to(base.dtype)


def merge_by_spec(
    spec: StaticSpec, base: torch.Tensor, deltas: list[torch.Tensor], seed: int, name: str
) -> torch.Tensor:
    """`static_merge` as `spec` says."""
    return static_merge(
        spec.method,
        base,
        deltas,
        scale=spec.scale,
        density=spec.density,
        weights=spec.weights,
        seed=seed,
        name=name,
        base_method=spec.base_method,
    )


def trimmed(
    tau: torch.Tensor, method: str, density: float, seed: int = 0, name: str = "", split_alone: bool = False
) -> torch.Tensor:
    """[E, ...] task vectors as a method leaves them before its weights apply: DARE's seeded drop and rescale,
    and/or TIES's trim (the top `density` by magnitude), sign election by the sum and agreeing entries, each
    scaled by E / (experts agreeing there), so that weights 1/E give TIES's disjoint mean.

    `split_alone` (M³): entries where one expert survives alone are taken out into an extra vector E, to be
    kept whole ([E + 1, ...])."""
    from peft.utils import merge_utils

    E = tau.shape[0]
    if method.startswith("dare"):
        with seeded(seed, name):
            tau = torch.stack([merge_utils.random_pruning(t, density, rescale=True) for t in tau])
    if not method.endswith("ties"):
        return tau
    if method == "ties":
        tau = torch.stack([merge_utils.magnitude_based_pruning(t, density) for t in tau])
    tau = tau * merge_utils.calculate_majority_sign_mask(tau, method="total")
    count = (tau != 0).sum(0)
    if not split_alone:
        return tau * (E / count.clamp_min(1))
    shared = tau * (count >= 2) * (E / count.clamp_min(1))
    return torch.cat([shared, (tau * (count == 1)).sum(0, keepdim=True)])


def mixup(
    tau: torch.Tensor, lam: torch.Tensor, base_method: str, scale: float, density: float, seed: int = 0, name: str = ""
) -> torch.Tensor:
    """M³'s merged task vector of [E, ...] task vectors for interpolation weights `lam` [E] (see the module)."""
    if base_method not in MIXUP_BASES:
        raise ValueError(f"unknown mixup base method {base_method!r}; choose one of {', '.join(MIXUP_BASES)}")
    if base_method == "average":
        return torch.einsum("e,e...->...", lam, tau)
    if base_method == "task_arithmetic":
        return scale * torch.einsum("e,e...->...", lam, tau)
    vectors = trimmed(tau, base_method, density, seed, name, split_alone=True)
    if base_method == "dare_linear":
        return scale * torch.einsum("e,e...->...", lam, vectors)
    return scale * torch.einsum("e,e...->...", lam, vectors[:-1]) + vectors[-1]


def mixup_draws(E: int, alpha: float, samples: int, seed: int) -> list[list[float]]:
    """M³'s interpolation weights: (λ, 1 − λ) with λ ~ Beta(α, α) for two experts (Dirichlet(α, α)'s first
    coordinate); Dirichlet(α, …, α) for more (our extension). Reproducible from `seed`."""
    concentration = torch.full((E,), float(alpha), dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):  # torch's Dirichlet sampler takes no generator
        torch.manual_seed(seed)
        return torch.distributions.Dirichlet(concentration).sample((samples,)).tolist()
