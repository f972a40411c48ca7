"""The routing report: where each expert's held-out prompts are routed, layer by layer.

A stock MoE routes every token on its own at every layer, so an answer survives only if its tokens
are routed right everywhere. The report gives, per layer, the share of each expert's eval tokens
sent to each expert (top-1) and the routing accuracy, then the share of tokens and of prompts
routed right at every layer. It warns about degenerate routers.
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
NO_PROMPTS = "no prompts to measure: give experts `eval_prompts` (or `positive_prompts`) to get a report"


def layer_stats(layer: int, logits: list, streams: list, weight: torch.Tensor, top_k: int, scale: float | None) -> dict:
    """Routing of every eval stream at one layer; `logits[i]` is [B, T, E] for expert i's prompts."""
    num_experts = weight.shape[0]
    share, correct = [], []
    for i, (lg, s) in enumerate(zip(logits, streams)):
        if lg is None:
            share.append(None)
            correct.append(None)
            continue
        top1 = lg.argmax(-1)  # [B, T]
        real = s.mask.bool()
        counts = torch.bincount(top1[real], minlength=num_experts).float()
        share.append((counts / counts.sum()).tolist())
        correct.append((top1 == i) | ~real)  # padding counts as correct so `all` over T works
    rows = torch.nn.functional.normalize(weight.float(), dim=-1)
    cos = rows @ rows.T - 2 * torch.eye(num_experts)
    return {
        "layer": layer,
        "scale": scale,
        "share": share,
        "accuracy": [s[i] if s is not None else None for i, s in enumerate(share)],
        "max_router_cosine": cos.max().item() if num_experts > 1 else None,
        "_correct": correct,
        "_masks": [s.mask.bool() if s is not None else None for s in streams],
    }


def summarise(layers: list[dict], labels: list[str], config) -> dict:
    num_experts = len(labels)
    tokens_ok, prompts_ok = [], []
    for i in range(num_experts):
        per_layer = [lay["_correct"][i] for lay in layers]
        if per_layer[0] is None:
            tokens_ok.append(None)
            prompts_ok.append(None)
            continue
        all_layers = torch.stack(per_layer).all(0)  # [B, T]
        mask = layers[0]["_masks"][i]
        tokens_ok.append(all_layers[mask].float().mean().item())
        prompts_ok.append(all_layers.all(-1).float().mean().item())
    warnings = []
    for lay in layers:
        shares = [s for s in lay["share"] if s is not None]
        if not shares or num_experts < 2:
            continue
        total = torch.tensor(shares).mean(0)
        if total.max() > COLLAPSE_SHARE:
            warnings.append(f"layer {lay['layer']}: router collapsed, expert {labels[total.argmax()]!r} "
                            f"takes {total.max():.0%} of all eval tokens")
        for e in (total < DEAD_SHARE).nonzero().flatten().tolist():
            warnings.append(f"layer {lay['layer']}: expert {labels[e]!r} gets {total[e]:.1%} of eval tokens (dead)")
        if lay["max_router_cosine"] is not None and lay["max_router_cosine"] > PARALLEL_COSINE:
            warnings.append(f"layer {lay['layer']}: two router rows have cosine {lay['max_router_cosine']:.3f}; "
                            "their experts' prompts look alike at this layer")
    for w in warnings:
        logger.warning("routing report: %s", w)
    measured = any(s is not None for lay in layers for s in lay["share"])
    return {
        "experts": labels,
        "measured": measured,
        **({} if measured else {"note": NO_PROMPTS}),
        "gate_init": config.router_init,
        "experts_per_token": config.experts_per_token,
        "layers": [{k: v for k, v in lay.items() if not k.startswith("_")} for lay in layers],
        "accuracy_mean": [_mean([lay["accuracy"][i] for lay in layers]) for i in range(num_experts)],
        "tokens_routed_right_at_every_layer": tokens_ok,
        "prompts_routed_right_everywhere": prompts_ok,
        "warnings": warnings,
    }


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def write(rep: dict, out_dir: Path) -> None:
    (Path(out_dir) / "routing_report.json").write_text(json.dumps(rep, indent=2) + "\n")
    if rep["measured"]:
        plot(rep, Path(out_dir) / "routing_report.png")


def plot(rep: dict, path: Path) -> None:
    """One heatmap per layer: rows are the experts' eval prompts, columns the expert their tokens went to."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, layers = rep["experts"], rep["layers"]
    n = len(labels)
    fig, axes = plt.subplots(1, len(layers), figsize=(2.2 + 1.9 * len(layers), 1.2 + 0.35 * n), squeeze=False)
    for ax, lay in zip(axes[0], layers):
        grid = [[float("nan")] * n if s is None else s for s in lay["share"]]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"layer {lay['layer']}", fontsize=9)
        ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(n), labels if ax is axes[0][0] else [""] * n, fontsize=7)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="share of tokens (top-1)")
    fig.suptitle("routing of each expert's eval prompts (rows) to experts (columns)", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


@torch.no_grad()
def routing_report(model, tokenizer, config: MergeConfig, labels: list[str]) -> dict:
    """How each router sends every expert's held-out prompts (`eval_prompts`, else `positive_prompts`):
    accuracy and mean merge weights; None for an expert without prompts."""
    R = model.config.num_routers
    per_expert: list[torch.Tensor | None] = []
    for e in config.experts:
        prompts = e.eval_prompts if e.eval_prompts is not None else e.positive_prompts
        if not prompts:
            per_expert.append(None)
            continue
        enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
        w = model(**enc, use_cache=False).merge_weights  # [B, R, E] or [B, R, T, E]
        if w.dim() == 4:
            w = masked_mean(w.permute(0, 2, 1, 3).flatten(2), enc["attention_mask"]).view(w.shape[0], w.shape[1], -1)
        per_expert.append(w.float().cpu())
    rep = {"experts": labels, "method": config.method, "level": config.level, "routers": R}
    if all(w is None for w in per_expert):
        return {**rep, "measured": False, "note": NO_PROMPTS}

    def each(f):
        return [None if w is None else f(i, w) for i, w in enumerate(per_expert)]

    accuracy = [each(lambda i, w: (w[:, k].argmax(-1) == i).float().mean().item()) for k in range(R)]
    mean_weights = [each(lambda i, w: w[:, k].mean(0).tolist()) for k in range(R)]
    everywhere = each(lambda i, w: (w.argmax(-1) == i).all(-1).float().mean().item())
    return {**rep, "measured": True, "accuracy": accuracy, "mean_weights": mean_weights,
            "routed_right_at_every_router": everywhere}


def plot_dynamic(rep: dict, path: Path) -> None:
    """Heatmaps of mean merge weights for the first, middle and last router; nothing if nothing was measured."""
    if not rep["measured"]:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R = rep["routers"]
    picks = sorted({0, R // 2, R - 1})
    fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks) + 1, 3.2), squeeze=False)
    for ax, k in zip(axes[0], picks):
        rows = [w if w is not None else [float("nan")] * len(rep["experts"]) for w in rep["mean_weights"][k]]
        im = ax.imshow(rows, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"router {k}" if R > 1 else "router")
        ax.set_xticks(range(len(rep["experts"])), rep["experts"], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(rep["experts"])), rep["experts"], fontsize=7)
        ax.set_xlabel("merge weight on expert")
    axes[0][0].set_ylabel("held-out prompts of")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(f"{rep['method']} / {rep['level']}: mean merge weights")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)




def write_dynamic_report(rep: dict, out_dir: Path) -> None:
    (Path(out_dir) / "routing_report.json").write_text(json.dumps(rep, indent=2))
    plot_dynamic(rep, Path(out_dir) / "routing_report.png")
