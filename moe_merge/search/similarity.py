"""What a zoo's models share, read one tensor at a time across every model.

- Model-GLUE's similarity: the cosine of two models' raw weights per column (`cosine_similarity(dim=0)`),
  averaged within each matrix, then over every attention and MLP matrix; embeddings and head left out.
- The task-vector cosine: cos(θ_a − θ0, θ_b − θ0) over every tensor, flattened.
- The relative task-vector norm per module type, ‖θ − θ0‖ / ‖θ0‖, which says where a fine-tune's change lives.
- Model-GLUE's clustering: by `config.architectures` (and tensor shapes), then one greedy pass in which a
  model joins the first cluster whose *first member* it matches at or above the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_merge.arch import ATTN_PROJS, MLP_PROJS

MODULE_TYPES = ("embeddings", "attention", "mlp", "norms", "head")


def module_type(name: str) -> str | None:
    """Which of MODULE_TYPES tensor `name` belongs to (None for rotary buffers and the like)."""
    if "embed_tokens" in name:
        return "embeddings"
    if name.startswith("lm_head"):
        return "head"
    if "norm" in name:
        return "norms"
    proj = name.split(".")[-2] if name.count(".") >= 1 else ""
    if proj in ATTN_PROJS:
        return "attention"
    if proj in MLP_PROJS:
        return "mlp"
    return None


def column_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Model-GLUE's per-matrix similarity: the mean over columns of the cosine between a's and b's column."""
    return F.cosine_similarity(a.double(), b.double(), dim=0).mean().item()


@dataclass
class Similarities:
    """Every pairwise measure of N models (matrices are N x N lists) and, with a base, each model's change."""

    glue: list[list[float]]  # Model-GLUE, attention and MLP matrices
    mlp: list[list[float]]  # the same over MLP matrices only (Model-GLUE's "similarity" ordering)
    task_vector: list[list[float]] | None  # cosine of task vectors (needs a base)
    relative_norm: list[dict[str, float]] | None  # per model: module type -> ‖θ − θ0‖ / ‖θ0‖, "all", "linear"


def similarities(models: list, names: list[str], base=None) -> Similarities:
    """Read each tensor of `names` from every model once (and from `base`), accumulating every measure.
    `models` answer `get(name)` (checkpoints, LoRA experts); all must hold every name at one shape."""
    n = len(models)
    glue_sum, mlp_sum = torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    glue_count = mlp_count = 0
    dots = torch.zeros(n, n, dtype=torch.float64)
    delta_sq = {t: torch.zeros(n, dtype=torch.float64) for t in MODULE_TYPES}
    base_sq = dict.fromkeys(MODULE_TYPES, 0.0)
    for name in names:
        kind = module_type(name)
        tensors = [m.get(name).double() for m in models]
        if kind in ("attention", "mlp") and tensors[0].dim() == 2:
            cols = torch.stack([F.normalize(t, dim=0) for t in tensors])  # [N, out, in], unit columns
            sim = torch.einsum("aoi,boi->abi", cols, cols).mean(-1)  # per column, then over columns
            glue_sum += sim
            glue_count += 1
            if kind == "mlp":
                mlp_sum += sim
                mlp_count += 1
        if base is not None and kind is not None:
            b = base.get(name).double()
            deltas = torch.stack([(t - b).flatten() for t in tensors])
            dots += deltas @ deltas.T
            delta_sq[kind] += deltas.pow(2).sum(-1)
            base_sq[kind] += b.pow(2).sum().item()
    if not glue_count:
        raise ValueError("no attention or MLP matrix among the tensors to compare")
    task_vector = relative = None
    if base is not None:
        norms = dots.diagonal().sqrt().clamp_min(1e-30)
        task_vector = (dots / norms[:, None] / norms[None, :]).tolist()
        total_base = sum(base_sq.values())
        relative = []
        for i in range(n):
            row = {t: (delta_sq[t][i].item() / base_sq[t]) ** 0.5 for t in MODULE_TYPES if base_sq[t] > 0}
            row["all"] = (sum(delta_sq[t][i].item() for t in MODULE_TYPES) / total_base) ** 0.5
            linear = base_sq["attention"] + base_sq["mlp"]
            if linear > 0:  # the matrices alone: norm gains (near 1) outweigh small-initialised matrices in "all"
                row["linear"] = ((delta_sq["attention"][i] + delta_sq["mlp"][i]).item() / linear) ** 0.5
            relative.append(row)
    mlp = (mlp_sum / max(mlp_count, 1)).tolist()
    return Similarities((glue_sum / glue_count).tolist(), mlp, task_vector, relative)


def greedy_clusters(keys: list, similarity: list[list[float | None]], threshold: float) -> list[list[int]]:
    """Model-GLUE's clustering: models grouped by `keys` (architecture and shapes), then in order each joins the
    first cluster of its key whose first member it matches at `threshold` or above, else starts one."""
    clusters: list[list[int]] = []
    for i, key in enumerate(keys):
        for c in clusters:
            if keys[c[0]] == key and (s := similarity[i][c[0]]) is not None and s >= threshold:
                c.append(i)
                break
        else:
            clusters.append([i])
    return clusters
