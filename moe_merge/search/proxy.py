"""Proxy scores of merge candidates, many at once, through the dynamic model.

A candidate that is linear in fixed task vectors, θ = θ0 + Σ_e w_e τ_e, is only a vector of merge weights:
average, task arithmetic, M³'s interpolation, coefficients per layer group, and TIES or DARE once their
trimmed vectors are fixed (`FixedVectors`). So one WEMoE-form dynamic model of the cluster (θ0 plus every
member's task vector, every part routed, one router slot per layer) scores C candidates in one batched pass,
each row carrying its candidate's weights [R, E], instead of building C models. `dense_state` builds the
same candidate as a plain checkpoint: the reference it is tested against, and what `glue` writes.

Metrics, higher is better, averaged per task (the rows' `expert` label) and then over tasks, as Model-GLUE
weighs its benchmarks equally:
- `exact_match`: greedy exact match, read off one forward pass: a row counts when every completion token and
  the end-of-sequence token are the argmax (what greedy decoding would emit). Needs `prompt`+`completion`.
- `nll`: minus the mean negative log-likelihood of the target tokens (any row kind).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F

from moe_merge import merge
from moe_merge.arch import layer_of
from moe_merge.errors import DataError

METRICS = ("exact_match", "nll")
NEEDS_COMPLETION = ("exact_match",)


@dataclass
class Proxy:
    """Encoded proxy rows, each with its task (an index into `tasks`)."""

    rows: list[dict]
    tasks: list[str]
    metric: str
    source: str


def load_proxy(path: Path | str, tokenizer, metric: str = "exact_match", max_length: int = 2048) -> Proxy:
    """Rows as router training reads them (`text`, `prompt`+`completion` or `messages`, optional `expert` task
    label); every problem reported before any model runs, naming the file."""
    from moe_merge.train.data import encode_row, load_rows, row_kind

    if metric not in METRICS:
        raise DataError(f"unknown proxy metric {metric!r}; choose one of {', '.join(METRICS)}")
    data = load_rows(path)
    if len(data) == 0:
        raise DataError(f"proxy data {path} has no rows")
    kind = row_kind(list(data.column_names), str(path))
    if metric in NEEDS_COMPLETION and kind == "text":
        raise DataError(
            f"proxy data {path} has `text` rows, which carry no answer to check; metric `{metric}` needs "
            "`prompt`+`completion` (or `messages`) rows, or use `metric: nll`"
        )
    labels = [r.get("expert") for r in data] if "expert" in data.column_names else [None] * len(data)
    tasks = sorted({str(t) for t in labels if t is not None}) or ["all"]
    if any(t is None for t in labels) and "all" not in tasks:
        tasks.append("all")
    rows = []
    for i, (row, task) in enumerate(zip(data, labels)):
        enc = encode_row({k: v for k, v in row.items() if k != "expert"}, kind, tokenizer, [], str(path), i, max_length)
        enc["task"] = tasks.index("all" if task is None else str(task))
        rows.append(enc)
    return Proxy(rows, tasks, metric, str(path))


@dataclass
class Score:
    score: float  # the mean over tasks
    tasks: dict[str, float]


def _row_scores(logits: torch.Tensor, labels: torch.Tensor, metric: str) -> torch.Tensor:
    """Per row: 1/0 exact match, or minus the mean NLL of its target tokens."""
    targets, logits = labels[:, 1:], logits[:, :-1].float()
    where = targets != -100
    if metric == "exact_match":
        right = (logits.argmax(-1) == targets) | ~where
        return right.all(-1).double()
    nll = F.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none") * where
    return -(nll.sum(-1) / where.sum(-1)).double()


def _summarise(values: torch.Tensor, proxy: Proxy) -> Score:
    task = torch.tensor([r["task"] for r in proxy.rows])
    per = {t: values[task == k].mean().item() for k, t in enumerate(proxy.tasks) if (task == k).any()}
    return Score(sum(per.values()) / len(per), per)


@torch.no_grad()
def score(
    model, proxy: Proxy, weights: list[torch.Tensor] | None = None, batch_size: int = 64, pad_id: int = 0
) -> list[Score]:
    """The proxy score of each candidate: `weights` [R, E] each through a dynamic model, or, with None, `model`
    itself (a plain checkpoint) as one candidate. Rows of every candidate share batches."""
    from moe_merge.train.data import collate

    model.eval()
    n, candidates = len(proxy.rows), len(weights) if weights is not None else 1
    pairs = [(c, i) for c in range(candidates) for i in range(n)]
    values = torch.empty(len(pairs), dtype=torch.float64)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = collate([proxy.rows[i] for _, i in chunk], pad_id)
        kwargs = {}
        if weights is not None:
            kwargs["merge_weights"] = torch.stack([weights[c] for c, _ in chunk]).float()
        out = model(
            input_ids=batch["input_ids"].to(model.device),
            attention_mask=batch["attention_mask"].to(model.device),
            use_cache=False,
            **kwargs,
        )
        values[start : start + len(chunk)] = _row_scores(out.logits.cpu(), batch["labels"], proxy.metric)
    return [_summarise(values[c * n : (c + 1) * n], proxy) for c in range(candidates)]


# ----------------------------------------------------------------------------------------- the cluster's models


class FixedVectors:
    """The members' task vectors, one tensor at a time, unchanged (`linear`) or as DARE / TIES leave them before
    their weights apply (`merge.trimmed`). With `split_alone` (M³'s TIES) the entries one member holds alone are
    an extra vector whose weight is always 1, so that the merge stays linear in the weights."""

    def __init__(
        self,
        base,
        members: list,
        method: str = "linear",
        density: float = 0.5,
        seed: int = 0,
        split_alone: bool = False,
    ):
        self.base, self.members, self.method, self.density, self.seed = base, members, method, density, seed
        self.split_alone = split_alone and method.endswith("ties")
        self._last: tuple[str, torch.Tensor] | None = None

    def __call__(self, name: str) -> torch.Tensor:
        """[E (+1 when split), ...] fixed task vectors of `name`, float32 or wider."""
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        base = self.base.get(name).float()
        tau = torch.stack([m.get(name).float() - base for m in self.members])
        if self.method != "linear":
            tau = merge.trimmed(tau, self.method, self.density, self.seed, name, self.split_alone)
        self._last = (name, tau)
        return tau


class _Member:
    """A member seen through fixed vectors: base + its fixed task vector."""

    def __init__(self, vectors: FixedVectors, e: int, like):
        self.vectors, self.e = vectors, e
        self.path, self.config, self.weight_map = like.path, like.config, getattr(like, "weight_map", None)

    def get(self, name: str) -> torch.Tensor:
        return self.vectors.base.get(name).float() + self.vectors(name)[self.e]


def candidate_model(
    reference: Path,
    members: list[Path],
    vectors: str = "linear",
    density: float = 0.5,
    seed: int = 0,
    split_alone: bool = False,
):
    """The dynamic model whose merge weights are candidates: θ0 = `reference` (the cluster's base, or a member:
    weights summing to one make the choice immaterial) plus each member's fixed task vector, in every part
    (and, with `split_alone`, the lone entries' vector as one more expert)."""
    from moe_merge.assemble.dynamic import build_model
    from moe_merge.config import MergeConfig
    from moe_merge.recipe import open_recipe
    from moe_merge.sources import Expert

    cfg = MergeConfig.model_validate(
        {
            "base_model": str(reference),
            "method": "wemoe",
            "level": "block",
            "experts_per_token": 1,
            "router": {"init": "uniform", "kind": "constant", "normalize": "none", "prepass": 0},
            "experts": [
                {"source_model": str(p), "name": f"m{i}"} for i, p in enumerate(members + members[:split_alone])
            ],
        }
    )
    recipe = open_recipe(cfg)
    if vectors != "linear":
        fixed = FixedVectors(recipe.base, recipe.experts[: len(members)], vectors, density, seed, split_alone)
        seen = [_Member(fixed, e, x) for e, x in enumerate(recipe.experts)]
        recipe = replace(recipe, experts=cast(list[Expert], seen))  # a member reads like the expert it wraps
    return build_model(recipe, seed)


def slot(name: str, num_layers: int) -> int:
    """The router slot whose weights merge tensor `name`: its layer's; the embeddings take the first, the final
    norm and the head the last (as the dynamic model does)."""
    layer = layer_of(name)
    if layer is not None:
        return layer
    return 0 if "embed_tokens" in name else num_layers - 1


def dense_tensor(name: str, weights: torch.Tensor, base, vectors: FixedVectors, num_layers: int) -> torch.Tensor:
    """θ0 + Σ_e w[slot, e] τ_e for one tensor, in float32."""
    w = weights[slot(name, num_layers)].to(torch.float32)
    tau = vectors(name)
    return base.get(name).float() + torch.einsum("e,e...->...", w, tau.float())
