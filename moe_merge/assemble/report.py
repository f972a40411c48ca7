"""The routing report: where each expert's held-out prompts are routed, router by router.

One schema for both outputs, written as `routing_report.json` with one plot, `routing_report.png`:

    experts, method, level, router_init     what was built
    measured (and `note` when it is not)    whether any expert had prompts to measure
    routers[k]: layer                        the layer whose input router k reads (None: model level)
                accuracy[i]                  share of expert i's prompts (stock: tokens) routed top-1 to i
                sent_to[i][e]                where expert i's prompts went: the share of its tokens routed top-1
                                             to e (stock), or the mean merge weight on e (dynamic)
                scale                        the calibration scale of its prompt fit (None: not calibrated)
    accuracy_mean[i], accuracy_worst[i]      over the routers
    routed_right_everywhere[i]               share of expert i's prompts routed right at every router (stock: at
                                             every token too)
    warnings                                 collapsed, dead and parallel routers (stock routers only)

Entries of an expert without prompts are None. A stock MoE routes every token on its own at every layer, so
an answer survives only if its tokens are routed right everywhere; the stock report adds
`tokens_routed_right_everywhere`, `experts_per_token` and each router's `max_router_cosine`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from moe_merge.config import MergeConfig
from moe_merge.routers.router import masked_mean

logger = logging.getLogger(__name__)

COLLAPSE_SHARE = 0.9  # one expert takes this much of all tokens at a layer
DEAD_SHARE = 0.02  # an expert gets less than this
PARALLEL_COSINE = 0.98  # two router rows point the same way
MAX_PLOTTED = 8  # routers in the plot, evenly spaced
NO_PROMPTS = "no prompts to measure: give experts `eval_prompts` (or `positive_prompts`) to get a report"


# ----------------------------------------------------------------------------------------- stock MoE


def layer_stats(layer: int, routed: list, weight: torch.Tensor, scale: float | None) -> dict:
    """Routing of every expert's eval prompts by one stock layer's gate; `routed[i]` holds the gate's logits on
    expert i's prompts (a TokenSet of [B, T, E] and its mask), None where it has none."""
    num_experts = weight.shape[0]
    share: list[list[float] | None] = []
    correct: list[torch.Tensor | None] = []
    for i, r in enumerate(routed):
        if r is None:
            share.append(None)
            correct.append(None)
            continue
        top1 = r.states.argmax(-1)  # [B, T]
        real = r.mask.bool()
        counts = torch.bincount(top1[real], minlength=num_experts).float()
        share.append((counts / counts.sum()).tolist())
        correct.append((top1 == i) | ~real)  # padding counts as correct so `all` over T works
    rows = torch.nn.functional.normalize(weight.float(), dim=-1)
    cos = rows @ rows.T - 2 * torch.eye(num_experts)
    return {
        "layer": layer,
        "accuracy": [s[i] if s is not None else None for i, s in enumerate(share)],
        "sent_to": share,
        "scale": scale,
        "max_router_cosine": cos.max().item() if num_experts > 1 else None,
        "_correct": correct,
        "_masks": [r.mask.bool() if r is not None else None for r in routed],
    }


def summarise(layers: list[dict], labels: list[str], config: MergeConfig) -> dict:
    """The stock report from every layer's `layer_stats`, with its warnings (also logged)."""
    tokens_ok: list[float | None] = []
    prompts_ok: list[float | None] = []
    for i in range(len(labels)):
        per_layer = [lay["_correct"][i] for lay in layers]
        if per_layer[0] is None:
            tokens_ok.append(None)
            prompts_ok.append(None)
            continue
        all_layers = torch.stack(per_layer).all(0)  # [B, T]
        mask = layers[0]["_masks"][i]
        tokens_ok.append(all_layers[mask].float().mean().item())
        prompts_ok.append(all_layers.all(-1).float().mean().item())
    routers = [{k: v for k, v in lay.items() if not k.startswith("_")} for lay in layers]
    warnings = _warnings(routers, labels)
    rep = _report(config, labels, routers, prompts_ok)
    return {
        **rep,
        "experts_per_token": config.experts_per_token,
        "tokens_routed_right_everywhere": tokens_ok,
        "warnings": warnings,
    }


def _warnings(routers: list[dict], labels: list[str]) -> list[str]:
    warnings = []
    for r in routers:
        shares = [s for s in r["sent_to"] if s is not None]
        if not shares or len(labels) < 2:
            continue
        total = torch.tensor(shares).mean(0)
        if total.max() > COLLAPSE_SHARE:
            warnings.append(
                f"layer {r['layer']}: router collapsed, expert {labels[total.argmax()]!r} "
                f"takes {total.max():.0%} of all eval tokens"
            )
        for e in (total < DEAD_SHARE).nonzero().flatten().tolist():
            warnings.append(f"layer {r['layer']}: expert {labels[e]!r} gets {total[e]:.1%} of eval tokens (dead)")
        if r["max_router_cosine"] is not None and r["max_router_cosine"] > PARALLEL_COSINE:
            warnings.append(
                f"layer {r['layer']}: two router rows have cosine {r['max_router_cosine']:.3f}; "
                "their experts' prompts look alike at this layer"
            )
    for w in warnings:
        logger.warning("routing report: %s", w)
    return warnings


# ----------------------------------------------------------------------------------------- dynamic model


@torch.no_grad()
def routing_report(
    model, tokenizer, config: MergeConfig, labels: list[str], scales: list[float | None] | None = None
) -> dict:
    """How each router of a dynamic model sends every expert's held-out prompts (`eval_prompts`, else
    `positive_prompts`); `scales` are the routers' calibration scales, if known."""
    from moe_merge.assemble.lazy import compute_device
    from moe_merge.assemble.prompts import encode

    R = model.config.num_routers
    prompts = [(e.eval_prompts if e.eval_prompts is not None else e.positive_prompts) or [] for e in config.experts]
    per_expert: list[torch.Tensor | None] = [None] * len(prompts)
    if any(prompts):  # one forward pass for every expert's prompts: a model streamed from disk reads itself once
        batch, device = encode(tokenizer, [(ps, e) for e, ps in enumerate(prompts)]), compute_device(model)
        mask = batch.mask.to(device)
        w = model.model(input_ids=batch.ids.to(device), attention_mask=mask, use_cache=False).merge_weights
        if w.dim() == 4:  # [B, R, T, E]: per token; else [B, R, E]
            w = masked_mean(w.permute(0, 2, 1, 3).flatten(2), mask).view(w.shape[0], w.shape[1], -1)
        rows = w.float().cpu().split(batch.sizes)
        per_expert = [w if ps else None for w, ps in zip(rows, prompts)]

    def each(f):
        return [None if w is None else f(i, w) for i, w in enumerate(per_expert)]

    scales = scales or [None] * R
    routers = [
        {
            "layer": _router_layer(model.config, k),
            "accuracy": each(lambda i, w, k=k: (w[:, k].argmax(-1) == i).float().mean().item()),
            "sent_to": each(lambda i, w, k=k: w[:, k].mean(0).tolist()),
            "scale": scales[k],
        }
        for k in range(R)
    ]
    everywhere = each(lambda i, w: (w.argmax(-1) == i).all(-1).float().mean().item())
    return {**_report(config, labels, routers, everywhere), "warnings": []}


def _router_layer(model_config, k: int) -> int:
    """The layer whose input router k reads: the first router (per sequence) that of the static pre-pass, the
    others their own."""
    if k == 0 and model_config.router_granularity == "sequence":
        return model_config.prepass_layers
    return k


# ----------------------------------------------------------------------------------------- both


def _report(config: MergeConfig, labels: list[str], routers: list[dict], everywhere: list) -> dict:
    measured = any(s is not None for r in routers for s in r["sent_to"])
    accuracy = [[r["accuracy"][i] for r in routers] for i in range(len(labels))]
    return {
        "experts": labels,
        "method": config.method,
        "level": config.level,
        "router_init": config.router_init,
        "measured": measured,
        **({} if measured else {"note": NO_PROMPTS}),
        "routers": routers,
        "accuracy_mean": [_mean(a) for a in accuracy],
        "accuracy_worst": [min(a) if None not in a else None for a in accuracy],
        "routed_right_everywhere": everywhere,
    }


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def write(rep: dict, out_dir: Path) -> None:
    """routing_report.json, and its plot when anything was measured."""
    (Path(out_dir) / "routing_report.json").write_text(json.dumps(rep, indent=2) + "\n")
    if rep["measured"]:
        plot(rep, Path(out_dir) / "routing_report.png")


def plot(rep: dict, path: Path) -> None:
    """One heatmap per router (at most MAX_PLOTTED, evenly spaced): rows are the experts' held-out prompts,
    columns where they went."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, routers = rep["experts"], rep["routers"]
    n, R = len(labels), len(routers)
    picks = (
        sorted({round(j * (R - 1) / (MAX_PLOTTED - 1)) for j in range(MAX_PLOTTED)}) if R > MAX_PLOTTED else range(R)
    )
    fig, axes = plt.subplots(1, len(picks), figsize=(2.2 + 1.9 * len(picks), 1.2 + 0.35 * n), squeeze=False)
    for ax, k in zip(axes[0], picks):
        r = routers[k]
        im = ax.imshow([[float("nan")] * n if s is None else s for s in r["sent_to"]], vmin=0, vmax=1, cmap="viridis")
        ax.set_title(
            "router" if R == 1 else f"layer {r['layer']}" if r["layer"] is not None else f"router {k}", fontsize=9
        )
        ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(n), labels if ax is axes[0][0] else [""] * n, fontsize=7)
    fig.colorbar(
        im,
        ax=axes[0].tolist(),
        shrink=0.8,
        label="top-1 share of tokens" if "experts_per_token" in rep else "mean merge weight",
    )
    fig.suptitle(f"{rep['method']} / {rep['level']}: where each expert's held-out prompts (rows) go", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
