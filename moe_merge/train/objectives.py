"""What router training optimises, and which parameters it may touch.

Routers are found by module type (a substring such as "gate" would also catch `gate_proj`): the
dynamic model's `Router`, and the top-k routers of transformers' Mixtral, Qwen2-MoE and Qwen3-MoE.

Objectives, combined with weights (`--objective lm=1,routing=0.5`):
- `lm`: next-token cross-entropy on the merged model, on the completion only;
- `routing`: cross-entropy of every router's logits against the row's `expert` label
  (Twin-Merging's task-ID classification); for raw merge weights (`normalize: none`, WEMoE's
  task-vector weights), whose scale is the merge itself, the squared distance of the weights to the
  expert's one-hot vector, which is the merge weights that reproduce it;
- `entropy`: entropy of the model's next-token distribution on the target tokens
  (AdaMerging / WEMoE test-time adaptation: no labels needed);
- `balance`: Switch-style load balancing, E · Σ_e f_e P_e per router, where the units routed are
  sequences for per-sequence routers and tokens for per-token ones.

Router logits from either kind of model are brought to one shape, [B, R, S, E] with a mask [B, S]
(S = 1 for per-sequence routers, S = T for per-token ones).

`lm`, `entropy` and `routing` are means over the *global* batch when given its totals (target tokens,
labelled rows): each process sums over its share and divides by the global count, times the number of
processes, so the average DDP takes of the processes' gradients is the single-process gradient. `balance`
(a product of shares) is computed over each process's share, as Switch Transformer does per device.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

from moe_merge.errors import MoEMergeError
from moe_merge.routers.router import Router

ROUTER_TYPES = (Router, MixtralTopKRouter, Qwen2MoeTopKRouter, Qwen3MoeTopKRouter)
OBJECTIVES = ("lm", "routing", "entropy", "balance")


def parse_objective(text: str) -> dict[str, float]:
    """'lm' or 'lm=1,routing=0.5' -> {'lm': 1.0, 'routing': 0.5}."""
    weights = {}
    for part in text.split(","):
        name, _, value = part.strip().partition("=")
        if name not in OBJECTIVES:
            raise MoEMergeError(f"unknown objective {name!r} in {text!r}; choose from {', '.join(OBJECTIVES)}")
        try:
            weights[name] = float(value) if value else 1.0
        except ValueError:
            raise MoEMergeError(f"objective weight {value!r} for {name!r} is not a number") from None
    return weights


def routers_in_float32(model: nn.Module) -> None:
    """Keep every router's weights (so its gradients and optimizer state) in float32 over frozen bf16 or fp16
    weights. moe-merge's routers compute in float32 by themselves; a stock MoE's top-k router computes in its
    weights' dtype, so it gets its input widened (its logits and scores come out in float32)."""
    for module in model.modules():
        if isinstance(module, ROUTER_TYPES) and not isinstance(module, Router):
            module.float()
            module.register_forward_pre_hook(lambda _m, args: (args[0].float(), *args[1:]))


def freeze_all_but_routers(model: nn.Module) -> list[str]:
    """Turn off gradients everywhere except the routers' own parameters; return their names."""
    model.requires_grad_(False)
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, ROUTER_TYPES):
            module.requires_grad_(True)
            names += [f"{prefix}.{n}" for n, _ in module.named_parameters()]
    if not names:
        raise MoEMergeError(
            f"{type(model).__name__} has no routers to train; router training needs a moe-merge dynamic model or a "
            "stock Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint"
        )
    return names


def router_param_groups(model: nn.Module) -> list[dict]:
    """One optimizer group per router, its learning rate relative to the router's scale.

    Routers fitted from prompts have weights of any size (an LDA router's can be in the hundreds, a
    mergekit `hidden` router's near one); Adam moves each weight by about lr per step whatever its size, so
    one absolute lr would freeze some routers and scramble others. Scaling by the RMS of the router's
    parameters makes `lr` the relative change per step. A router that starts at zero or at a constant (WEMoE's
    task-arithmetic start) has no scale of its own: it gets the RMS that gives logits of spread one on
    standardized inputs, 1/sqrt(H).
    """
    groups = []
    for module in model.modules():
        if isinstance(module, ROUTER_TYPES):
            params = [p for p in module.parameters() if p.requires_grad]
            rms = torch.cat([p.detach().float().flatten() for p in params]).pow(2).mean().sqrt().item()
            width = max((p.shape[-1] for p in params if p.dim() == 2), default=1)  # the router's input size
            groups.append({"params": params, "scale": max(rms, width**-0.5)})
    return groups


def is_stock(model: nn.Module) -> bool:
    return getattr(model.config, "model_type", None) != "moe_merge"


def raw_weights(model: nn.Module) -> bool:
    """Whether the router logits are the merge weights themselves (`normalize: none`)."""
    config: Any = model.config  # a transformers config: its fields are attributes mypy cannot see
    return not is_stock(model) and config.router_normalize == "none"


def top_k(model: nn.Module) -> int:
    config: Any = model.config
    if is_stock(model):
        return config.num_experts_per_tok
    return config.router_top_k if config.router_normalize == "topk" else 1


def routing_logits(out, batch: dict, stock: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [B, R, S, E] and the mask [B, S] of the units they route."""
    mask = batch["attention_mask"]
    if stock:  # a tuple of [B*T, E], one per MoE layer; every token is routed
        B, T = mask.shape
        return torch.stack(out.router_logits).view(-1, B, T, out.router_logits[0].shape[-1]).transpose(0, 1), mask
    logits = out.router_logits
    if logits.dim() == 3:  # per sequence
        return logits.unsqueeze(2), torch.ones_like(mask[:, :1])
    return logits, mask


def totals(rows: list[dict]) -> dict[str, int]:
    """What the mean of each term divides by, counted over rows (the global batch): target tokens, labelled rows."""
    return {
        "tokens": sum(sum(t != -100 for t in r["labels"][1:]) for r in rows),
        "labelled": sum(r["expert"] >= 0 for r in rows),
    }


def _mean(total: torch.Tensor, count: torch.Tensor, over: tuple[int, int] | None) -> torch.Tensor:
    """`total / count`, or, with `over` = (global count, processes), this process's share of the global mean."""
    if over is None:
        return total / count.clamp(min=1)
    return total * over[1] / max(over[0], 1)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, over: tuple[int, int] | None = None) -> torch.Tensor:
    targets = labels[:, 1:].flatten()
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets, ignore_index=-100, reduction="sum")
    return _mean(ce, (targets != -100).sum(), over)


def entropy_loss(logits: torch.Tensor, labels: torch.Tensor, over: tuple[int, int] | None = None) -> torch.Tensor:
    """Mean entropy of the next-token distribution where a target exists (labels are not read otherwise)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    where = (labels[:, 1:] != -100).float()
    return _mean((entropy * where).sum(), where.sum(), over)


def routing_loss(
    router_logits: torch.Tensor,
    mask: torch.Tensor,
    expert: torch.Tensor,
    over: tuple[int, int] | None = None,
    raw: bool = False,
) -> torch.Tensor:
    """Cross-entropy of every router's logits against the row's expert (`raw`: the squared distance of the raw
    weights to its one-hot vector): per labelled row, the mean over its routers and routed units, then the mean
    over labelled rows."""
    labelled = expert >= 0
    if not labelled.any():  # keep the graph (DDP expects every router to get a gradient)
        return router_logits.sum() * 0.0
    lg, m = router_logits[labelled], mask[labelled].float()  # [b, R, S, E], [b, S]
    target = expert[labelled].view(-1, 1, 1).expand(lg.shape[:-1])
    if raw:
        ce = (lg.float() - F.one_hot(target, lg.shape[-1]).float()).pow(2).sum(-1)
    else:
        ce = F.cross_entropy(lg.flatten(0, 2).float(), target.flatten(), reduction="none").view(target.shape)
    w = m.unsqueeze(1).expand_as(ce)
    per_row = (ce * w).sum((1, 2)) / w.sum((1, 2)).clamp(min=1)
    return _mean(per_row.sum(), labelled.sum(), over)


def balance_loss(router_logits: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """E · Σ_e f_e P_e averaged over routers: f = share of units whose top-k holds e, P = mean probability."""
    E = router_logits.shape[-1]
    probs = torch.softmax(router_logits.float(), dim=-1)  # [B, R, S, E]
    chosen = F.one_hot(probs.topk(k, dim=-1).indices, E).sum(-2).float()
    m = mask.float()[:, None, :, None]  # [B, 1, S, 1]
    n = m.sum((0, 2)).clamp(min=1)  # [1, 1]
    f = (chosen * m).sum((0, 2)) / n  # [R, E]
    p = (probs * m).sum((0, 2)) / n
    return (E * (f * p).sum(-1)).mean()


@torch.no_grad()
def routing_hits(router_logits: torch.Tensor, mask: torch.Tensor, expert: torch.Tensor) -> tuple[int, int]:
    """(correct, total) decisions over labelled rows and every router: each routed unit's argmax (a per-token
    router decides every token, and an average over them would hide the tokens it sends elsewhere)."""
    labelled = expert >= 0
    lg, m = router_logits[labelled], mask[labelled].bool()  # [b, R, S, E], [b, S]
    right = (lg.argmax(-1) == expert[labelled].view(-1, 1, 1)) & m[:, None, :]
    return int(right.sum()), int(m.sum() * lg.shape[1])


def objective(
    model: nn.Module,
    batch: dict,
    weights: dict[str, float],
    stock: bool,
    k: int,
    global_totals: dict[str, int] | None = None,
    processes: int = 1,
    raw: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], object]:
    """The weighted loss, each term (detached) and the model's output. `model` may be wrapped (DDP), so
    whether it is a stock MoE, its top-k and whether its weights are raw come from the caller. With `global_totals` (`totals` of the whole
    global batch) the means are this process's share of the global batch's, for DDP."""

    def over(key):
        return None if global_totals is None else (global_totals[key], processes)

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    inputs.update({"output_router_logits": True} if stock else {"routing_mask": batch["routing_mask"]})
    out = model(**inputs)
    terms: dict[str, torch.Tensor] = {}
    if "lm" in weights:
        terms["lm"] = lm_loss(out.logits, batch["labels"], over("tokens"))
    if "entropy" in weights:
        terms["entropy"] = entropy_loss(out.logits, batch["labels"], over("tokens"))
    if "routing" in weights or "balance" in weights:
        logits, mask = routing_logits(out, batch, stock)
        if "routing" in weights:
            terms["routing"] = routing_loss(logits, mask, batch["expert"], over("labelled"), raw)
        if "balance" in weights:
            terms["balance"] = balance_loss(logits, mask, k)
    loss = functools.reduce(operator.add, [weights[k] * v for k, v in terms.items()])
    return loss, {k: v.detach() for k, v in terms.items()}, out
