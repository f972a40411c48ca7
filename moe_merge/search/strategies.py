"""Selective merging inside one cluster: which members to merge, with what weights, chosen on the proxy.

Every candidate is a weight matrix [G, V] (G contiguous layer groups, V fixed vectors: the members, plus M³'s
lone-entries vector), scored in batches through `Trials`, which logs every one. The strategies:
- `all`: the uniform average of every member (the baseline);
- `heuristic_average`, `heuristic_coefficient`, `heuristic_similarity` (Model-GLUE): members ordered best
  first by their own proxy score (`similarity`: by MLP similarity to the best), then added one at a time,
  as a running uniform average or with the best coefficient c ∈ {0.1, …, 0.9} for the newcomer; a newcomer
  is kept only if the proxy score does not drop, and a dropped one never returns;
- `evolutionary`: CMA-ES (the `cma` package) over the weights in [0, 1], popsize round(4 + 3 ln n), σ0 = 1/6,
  a fixed trial budget, seeded; each group's weights are normalized to sum to one, as mergekit's `linear` does;
- `mixup` (M³): λ ~ Beta(α, α) for two members, Dirichlet(α) for more (our extension), `samples` seeded draws
  per α; the best draw on the proxy is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moe_merge.errors import ConfigError
from moe_merge.merge import mixup_draws
from moe_merge.search.proxy import Score

COEFFICIENTS = tuple(round(0.1 * k, 1) for k in range(1, 10))
SIGMA0 = 1 / 6


def popsize(n: int) -> int:
    """CMA-ES's default population for n dimensions, as Model-GLUE used it."""
    return round(4 + 3 * math.log(n))


@dataclass
class Trial:
    strategy: str
    step: int
    weights: list[list[float]]  # [G, V]
    score: float
    tasks: dict[str, float]
    accepted: bool | None = None
    note: str = ""


@dataclass
class Trials:
    """Scores candidates in batches and logs every one. `scorer` maps [R, V] weight matrices to Scores;
    `groups` maps each of the R router slots to its layer group."""

    scorer: Callable[[list[torch.Tensor]], list[Score]]
    groups: list[int]
    log: list[Trial] = field(default_factory=list)

    def expand(self, w: torch.Tensor) -> torch.Tensor:
        """[G, V] -> [R, V]."""
        return w[torch.tensor(self.groups)]

    def run(self, strategy: str, weights: list[torch.Tensor], notes: list[str] | None = None) -> list[Trial]:
        scores = self.scorer([self.expand(w) for w in weights])
        step = 1 + max((t.step for t in self.log if t.strategy == strategy), default=-1)
        out = [
            Trial(strategy, step, w.tolist(), s.score, s.tasks, note=(notes or [""] * len(weights))[i])
            for i, (w, s) in enumerate(zip(weights, scores))
        ]
        self.log += out
        return out

    @property
    def num_groups(self) -> int:
        return max(self.groups) + 1


def _row(values: list[float], G: int, V: int) -> torch.Tensor:
    """One weight vector over the first len(values) vectors (the rest zero), repeated for every group."""
    w = torch.zeros(V, dtype=torch.float64)
    w[: len(values)] = torch.tensor(values, dtype=torch.float64)
    return w.expand(G, V).clone()


def uniform_all(trials: Trials, E: int, V: int) -> Trial:
    (t,) = trials.run("all", [_row([1 / E] * E, trials.num_groups, V)], ["uniform average of every member"])
    t.accepted = True
    return t


def heuristic(trials: Trials, E: int, V: int, kind: str, mlp_similarity: list[list[float]] | None = None) -> Trial:
    """Model-GLUE's heuristic merging with the monotone acceptance rule; returns the final candidate's trial."""
    G = trials.num_groups
    alone = trials.run(
        f"heuristic_{kind}",
        [_row([float(i == e) for i in range(E)], G, V) for e in range(E)],
        [f"member {e} alone" for e in range(E)],
    )
    order = sorted(range(E), key=lambda e: -alone[e].score)  # stable: ties keep the members' order
    if kind == "similarity":
        if mlp_similarity is None:
            raise ValueError("heuristic_similarity needs the members' MLP similarity")
        first = order[0]
        order = [first] + sorted(order[1:], key=lambda e: -mlp_similarity[first][e])
    best = alone[order[0]]
    best.accepted = True
    current, kept = torch.tensor(best.weights, dtype=torch.float64), [order[0]]
    for e in order[1:]:
        one = _row([float(i == e) for i in range(E)], G, V)
        if kind == "average":
            k = len(kept)
            cands, notes = [current * k / (k + 1) + one / (k + 1)], [f"add member {e} to the running average"]
        else:
            cands = [current * (1 - c) + one * c for c in COEFFICIENTS]
            notes = [f"add member {e} at coefficient {c}" for c in COEFFICIENTS]
        tried = trials.run(f"heuristic_{kind}", cands, notes)
        top = max(tried, key=lambda t: t.score)  # the first of equal scores: the smallest coefficient
        for t in tried:
            t.accepted = False
        if top.score >= best.score:
            top.accepted, best = True, top
            current, kept = torch.tensor(top.weights, dtype=torch.float64), kept + [e]
    return best


def evolutionary(trials: Trials, E: int, V: int, budget: int, seed: int) -> Trial:
    """CMA-ES over [G, E] weights in [0, 1]; exactly `budget` trials, a generation at a time."""
    try:
        import cma
    except ImportError:
        raise ConfigError("`strategy: evolutionary` needs the `cma` package: pip install 'moe-merge[search]'") from None
    G = trials.num_groups
    n = G * E
    lam = popsize(n)
    es = cma.CMAEvolutionStrategy(
        [0.5] * n, SIGMA0, {"bounds": [0, 1], "popsize": lam, "seed": seed + 1, "verbose": -9, "CMA_diagonal": False}
    )
    done, best = 0, None
    while done < budget:
        xs = es.ask()[: budget - done]
        cands = []
        for x in xs:
            w = torch.tensor(x, dtype=torch.float64).view(G, E).clamp(0, 1)
            total = w.sum(-1, keepdim=True)
            w = torch.where(total > 0, w / total.clamp_min(1e-12), torch.full_like(w, 1 / E))
            cands.append(torch.cat([w, torch.zeros(G, V - E, dtype=torch.float64)], -1))
        tried = trials.run("evolutionary", cands)
        done += len(tried)
        if len(xs) == lam:
            es.tell(xs, [-t.score for t in tried])
        for t in tried:
            if best is None or t.score > best.score:
                best = t
    if best is None:
        raise ValueError("the CMA-ES search tried no candidate (budget 0)")
    best.accepted = True
    return best


def mixup(trials: Trials, E: int, V: int, alphas: list[float], samples: int, seed: int, scale: float = 1.0) -> Trial:
    """The best of `samples` M³ draws per α; the lone-entries vector (M³'s TIES, when V > E) keeps weight 1."""
    cands, notes = [], []
    for a in alphas:
        for lam in mixup_draws(E, a, samples, seed):
            cands.append(_row([scale * x for x in lam] + [1.0] * (V - E), trials.num_groups, V))
            notes.append(f"alpha {a}: lambda " + ", ".join(f"{x:.4f}" for x in lam))
    tried = trials.run("mixup", cands, notes)
    best = max(tried, key=lambda t: t.score)
    for t in tried:
        t.accepted = t is best
    return best
