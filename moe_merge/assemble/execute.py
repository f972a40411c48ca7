"""Execute a plan: every planned tensor from the sources, one base tensor at a time, for both assembly paths.

A plan (`TensorPlan`s, from stock.plan or dynamic.plan) says where each output tensor comes from; `execute` makes
them in plan order. The entries made from one base tensor (W0 and the deltas, A and B, ...) share one static merge
and one factorization, computed for them and dropped after: nothing is cached across groups, so nothing depends on
the order of the plan. Computed routers (`router`, `shared_router`) are not tensors of the sources: the caller
fits them once the rest is written.
"""

from __future__ import annotations

import itertools
import logging
import zlib
from collections.abc import Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from moe_merge.assemble import read
from moe_merge.recipe import Recipe, TensorPlan
from moe_merge.sources import LoraExpert

logger = logging.getLogger(__name__)

COMPUTED = ("router", "shared_router")  # planned sources fitted on the prompts, not read


def execute(
    recipe: Recipe,
    entries: list[TensorPlan],
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    out_dtype: torch.dtype | None = None,
) -> Iterator[tuple[TensorPlan, torch.Tensor]]:
    """Every entry of `entries` but the computed routers, with its tensor, in plan order: computed in `dtype` and
    given in `out_dtype` (None: the base tensor's own dtype); SVDs run on `device`."""
    build = TensorBuilder(recipe, seed, dtype, device, out_dtype)
    entries = [p for p in entries if p.source not in COMPUTED]
    with tqdm(total=len(entries), desc="building", disable=None) as bar:
        for name, group in itertools.groupby(entries, key=lambda p: p.tensor):
            assert name is not None, "only routers are computed, not read"
            for p, t in build(name, list(group)):
                yield p, t
                bar.update()


FULL_SVD_UP_TO = 1024  # min(out, in) up to which SVDs are exact; above it, randomized when the rank allows
OVERSAMPLE = 16  # extra columns of a randomized SVD of fixed rank


def _svd(d: torch.Tensor, q: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of `d` (float64): exact, or randomized with `q` columns. LAPACK fails to converge on some
    checkpoints; a randomized SVD stands in then."""
    if q is None:
        try:
            return torch.linalg.svd(d, full_matrices=False)
        except RuntimeError:
            logger.warning("SVD did not converge on a %s matrix; using a randomized low-rank SVD", tuple(d.shape))
            q = min(d.shape)
    U, S, V = torch.svd_lowrank(d, q=min(q, min(d.shape)), niter=6)
    return U, S, V.T


def energy_rank(S: torch.Tensor, total: torch.Tensor, energy: float) -> int:
    """The smallest r whose top-r singular values hold `energy` of `total` (= ||Δ||², Σ of every σ²)."""
    if total == 0:
        return 1
    held = torch.cumsum(S.double() ** 2, 0) / total
    return min(int(torch.searchsorted(held, torch.tensor(energy, dtype=held.dtype) - 1e-12)) + 1, S.numel())


def svd_factors(
    delta: torch.Tensor, rank: int | None = None, energy: float | None = None, full_svd_up_to: int = FULL_SVD_UP_TO
) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, K], B [N, r] with B @ A the best rank-r approximation of `delta` [N, K], in float64 arithmetic, on
    `delta`'s device.

    `rank` fixes r; `energy` picks the smallest r holding that share of Σ σ². Above `full_svd_up_to` the SVD is
    randomized: of width r + OVERSAMPLE for a fixed rank below full; for an energy rank, of a width that doubles
    until its factors hold the energy: B·A = U_r U_rᵀ Δ is a projection, so what it holds is Σ of its σ², exactly,
    and the rank is at most a little above the optimum.
    """
    d = delta.double()
    small = min(d.shape) <= full_svd_up_to
    if energy is None:
        if rank is None:
            raise ValueError("svd_factors needs a rank or an energy")
        q = None if small or rank + OVERSAMPLE >= min(d.shape) else rank + OVERSAMPLE
        U, S, Vh = _svd(d, q)
        r = min(rank, S.numel())
    else:
        total = d.pow(2).sum()
        q = None if small else 64
        while True:
            U, S, Vh = _svd(d, q)
            if q is None or (S.double() ** 2).sum() >= energy * total or q >= min(d.shape):
                break
            q *= 2
        r = rank = energy_rank(S, total, energy)
    A = d.new_zeros(rank, d.shape[1])
    B = d.new_zeros(d.shape[0], rank)
    A[:r], B[:, :r] = Vh[:r], U[:, :r] * S[:r]
    return A.to(delta.dtype), B.to(delta.dtype)


def lora_factors(expert: LoraExpert, name: str, rank: int, shape, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's A [r, K] and scaling·B [N, r] for `name`, zero-padded to `rank` (zeros if not adapted)."""
    A, B = torch.zeros(rank, shape[1], dtype=dtype), torch.zeros(shape[0], rank, dtype=dtype)
    if name in expert.factors:
        a, b, scaling = expert.factors[name]
        A[: a.shape[0]], B[:, : b.shape[1]] = a.to(dtype), b.to(dtype) * scaling
    return A, B


class TensorBuilder:
    """Makes the entries of one base tensor from the sources. Tensors are computed in `dtype` (float32; float64 in
    tests) and returned in `out_dtype` (None: the base tensor's dtype); SVDs run on `device`."""

    def __init__(
        self,
        recipe: Recipe,
        seed: int,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
        out_dtype: torch.dtype | None = None,
    ):
        self.recipe, self.seed, self.dtype, self.device, self.out_dtype = recipe, seed, dtype, device, out_dtype

    def __call__(self, name: str, entries: list[TensorPlan]) -> Iterator[tuple[TensorPlan, torch.Tensor]]:
        """Each of `entries` (all made from base tensor `name`) with its tensor, in the output dtype."""
        sources = {p.source for p in entries}
        w0_static, needs_w0 = self.recipe.config.merging.w0 == "static", bool(sources & {"deltas", "svd_A", "svd_B"})
        static = None
        if "static" in sources or w0_static and needs_w0:
            static = read.static_merge(self.recipe, name, self.seed, self.dtype)
        base = self.recipe.base.get(name).to(self.dtype) if "base" in sources or needs_w0 and not w0_static else None
        w0 = static if w0_static else base
        factors = None
        out_dtype = self.out_dtype or self.recipe.base.dtype(name)
        for p in entries:
            if p.source in ("svd_A", "svd_B", "lora_A", "lora_B"):
                factors = factors or self._factors(p, name, w0)
                t = factors[0] if p.source.endswith("_A") else factors[1]
            else:
                t = self._tensor(p, name, static, base, w0, out_dtype)
            yield p, t.to(out_dtype)

    def _tensor(
        self,
        p: TensorPlan,
        name: str,
        static: torch.Tensor | None,
        base: torch.Tensor | None,
        w0: torch.Tensor | None,
        out_dtype: torch.dtype,
    ) -> torch.Tensor:
        """One entry from the group's static merge, base tensor and W0 (each read once for the group)."""
        shape = self.recipe.base.shape(name)
        if p.source in ("static", "base"):
            held = static if p.source == "static" else base
            assert held is not None, f"{p.source} is read for {p.name}'s group"
            return held
        if p.source in ("expert", "shared"):
            return self._expert(p, name, shape)
        if p.source in ("experts", "deltas"):
            # filled in one expert at a time: the stack and two of its tensors in memory (an embedding table of
            # 262,144 rows is 670 MB in float32)
            minus = w0 if p.source == "deltas" else None
            assert minus is not None or p.source == "experts", "deltas are of the experts less W0"
            out = torch.empty(len(self.recipe.experts), *shape, dtype=out_dtype)
            for e, expert in enumerate(self.recipe.experts):
                t = read.expert_tensor(expert, name, shape, self.dtype)
                out[e] = t if minus is None else t - minus
            return out
        raise ValueError(f"internal error: no tensor source {p.source!r} for {p.name}")

    def _expert(self, p: TensorPlan, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """One expert's tensor (the shared expert's for `shared`), with mergekit-moe's perturbations where its spec
        asks: seeded Gaussian noise, and a scaled down_proj (it writes the residual stream)."""
        cfg = self.recipe.config
        if p.source == "shared":
            expert, spec = self.recipe.shared, cfg.shared_experts[0]
        else:
            assert p.expert is not None, f"{p.name} names no expert"
            expert, spec = self.recipe.experts[p.expert], cfg.experts[p.expert]
        assert expert is not None, "a shared plan needs the recipe's shared expert"
        t = read.expert_tensor(expert, name, shape, self.dtype)
        if spec.noise_scale:
            g = torch.Generator().manual_seed(self.seed ^ zlib.crc32(p.name.encode()))
            t = t + torch.randn(t.shape, generator=g).to(t.dtype) * spec.noise_scale
        if spec.residual_scale is not None and name.endswith("down_proj.weight"):
            t = t * spec.residual_scale
        return t

    def _factors(self, p: TensorPlan, name: str, w0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """svd_A/B or lora_A/B [E, r, K] / [E, N, r]. A rank left to energy is each expert's energy rank, the
        largest of them for the module (the others zero-padded); `decided_ranks` reads it from the shapes."""
        rank = p.shape[1] if p.source.endswith("_A") else p.shape[2]
        shape = self.recipe.base.shape(name)
        if p.source.startswith("svd"):
            cfg = self.recipe.config
            energy = cfg.merging.energy(cfg.settings) if rank is None else None
            assert w0 is not None, "SVD factors are of the experts less W0"
            deltas = (read.expert_tensor(e, name, shape, self.dtype) - w0 for e in self.recipe.experts)
            factors = [tuple(f.cpu() for f in svd_factors(d.to(self.device), rank, energy)) for d in deltas]
            width = max(a.shape[0] for a, _ in factors)
            factors = [
                (nn.functional.pad(a, (0, 0, 0, width - a.shape[0])), nn.functional.pad(b, (0, width - b.shape[1])))
                for a, b in factors
            ]
        else:
            assert rank is not None, "an adapter's rank is planned (plan_forms)"
            adapters = [e for e in self.recipe.experts if isinstance(e, LoraExpert)]
            assert len(adapters) == len(self.recipe.experts), "LoRA factors are planned only when all are adapters"
            factors = [lora_factors(e, name, rank, shape, self.dtype) for e in adapters]
        return torch.stack([a for a, _ in factors]), torch.stack([b for _, b in factors])
