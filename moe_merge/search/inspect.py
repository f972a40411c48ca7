"""`moe-merge inspect BASE EXPERT...`: where each expert's change lives, and what can merge with what.

Per expert: its relative task-vector norm per module type, and the level that can recover it (FFN level only
when its change is in the MLPs). Per pair: Model-GLUE's similarity and the task-vector cosine. The clusters
Model-GLUE's greedy pass makes at a threshold. A model that is not a fine-tune of BASE is reported as such:
another architecture or tensor shapes (it fails the compatibility check), or another initialisation (its
change is as large as the weights themselves: independent initialisations sit at a relative norm of √2).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from moe_merge.errors import MoEMergeError
from moe_merge.search.similarity import MODULE_TYPES, Similarities, greedy_clusters, similarities
from moe_merge.sources import Checkpoint, Expert, is_adapter, open_expert, resolve_path

FINE_TUNE_LIMIT = 1.0  # relative task-vector norm at or above which a model is not a fine-tune of the base
FFN_SHARE = 0.01  # attention's relative change, as a share of the MLPs', below which FFN level recovers a model
DEFAULT_THRESHOLD = 0.95  # Model-GLUE's


@dataclass
class Model:
    """One model of a zoo, opened lazily: a checkpoint or an adapter on its base."""

    name: str
    path: Path
    source: Expert  # answers get(name)
    names: list[str]  # its tensors
    key: tuple  # architecture and tensor shapes: models cluster only with models of the same key
    problem: str | None = None  # why it is not a fine-tune of the base, if it is not


def open_model(name: str, ref: str, base: Checkpoint | None = None, relative_to: Path | None = None) -> Model:
    """`ref` as a zoo model: with `base`, checked as its fine-tune (an adapter needs one)."""
    path = resolve_path(ref, relative_to)
    if is_adapter(path):
        if base is None:
            raise MoEMergeError(f"{path} is a LoRA adapter; give the base it was trained on")
        source, problem = open_expert(str(path), base), None
        ckpt = base
    else:
        ckpt = source = Checkpoint(path)
        problem = None
        if base is not None:
            try:
                open_expert(str(path), base)  # the compatibility check: family, sizes, tensors, tokenizer
            except MoEMergeError as e:
                problem = f"not a fine-tune of the base: {e}"
    names = sorted(ckpt.weight_map)
    arch = tuple(ckpt.config.get("architectures") or [ckpt.config.get("model_type")])
    key = (arch, tuple((n, ckpt.shape(n)) for n in names))
    return Model(name, path, source, names, key, problem)


def short_names(refs: list[str]) -> list[str]:
    """Each path relative to the deepest folder they share (`full/shift`, `mlp/shift`)."""
    paths = [Path(r).absolute() for r in refs]
    if len(paths) == 1:
        return [paths[0].name]
    common = Path(os.path.commonpath(paths))
    return [str(p.relative_to(common)) or p.name for p in paths]


@dataclass
class Inspection:
    models: list[str]
    base: str | None
    threshold: float
    glue: list[list[float | None]]
    task_vector: list[list[float | None]] | None
    relative_norm: dict[str, dict[str, float]]
    clusters: list[list[str]]
    advice: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return self.__dict__.copy()


@dataclass
class Pairwise:
    """N x N matrices within each group of models of one key (None between groups): `glue` and `mlp` (Model-GLUE
    similarity over all matrices, over MLP matrices) and, with a base, `task_vector`; `relative`: model index ->
    its relative norms (models of the base's key)."""

    glue: list[list[float | None]]
    mlp: list[list[float | None]]
    task_vector: list[list[float | None]] | None
    relative: dict[int, dict[str, float]]


def pairwise(models: list[Model], base: Model | None = None) -> Pairwise:
    n = len(models)

    def empty() -> list[list[float | None]]:
        return [[None] * n for _ in range(n)]

    out = Pairwise(empty(), empty(), empty() if base is not None else None, {})
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(models):
        groups.setdefault(m.key, []).append(i)
    for key, idx in groups.items():
        reference = base.source if base is not None and key == base.key else None
        s: Similarities = similarities([models[i].source for i in idx], models[idx[0]].names, reference)
        for a, i in enumerate(idx):
            for b, j in enumerate(idx):
                out.glue[i][j], out.mlp[i][j] = s.glue[a][b], s.mlp[a][b]
                if out.task_vector is not None and s.task_vector is not None:
                    out.task_vector[i][j] = s.task_vector[a][b]
            if s.relative_norm is not None:
                out.relative[i] = s.relative_norm[a]
    return out


def advise(relative: dict[str, float]) -> str:
    """The level that can recover a fine-tune, from where its change lives."""
    mlp, attn = relative.get("mlp", 0.0), relative.get("attention", 0.0)
    if attn <= FFN_SHARE * mlp:
        return "ffn: its change is in the MLPs, so FFN-level routing can recover it"
    return (
        f"block or model: its attention changed too ({attn:.3g} against {mlp:.3g} in the MLPs), which FFN-level "
        "assembly keeps merged"
    )


def inspect(base_ref: str, expert_refs: list[str], threshold: float = DEFAULT_THRESHOLD) -> Inspection:
    base_ckpt = Checkpoint(resolve_path(base_ref))
    base = open_model("base", base_ref)
    models = [open_model(n, r, base_ckpt) for n, r in zip(short_names(expert_refs), expert_refs)]
    names = [m.name for m in models]
    sims = pairwise(models, base)
    glue, tv, relative = sims.glue, sims.task_vector, sims.relative
    clusters = greedy_clusters([m.key for m in models], glue, threshold)
    advice, rel = {}, {}
    for i, m in enumerate(models):
        if i in relative:
            rel[m.name] = relative[i]
            if relative[i].get("linear", 0.0) >= FINE_TUNE_LIMIT:
                m.problem = (
                    f"not a fine-tune of the base: another initialisation (its attention and MLP matrices differ "
                    f"from the base's by {relative[i]['linear']:.2f} of their norm; independent initialisations "
                    "sit at about 1.41)"
                )
        advice[m.name] = f"not merged: {m.problem}" if m.problem else advise(relative[i])
    return Inspection(
        names, str(base.path), threshold, glue, tv, rel, [[names[i] for i in c] for c in clusters], advice
    )


def markdown(ins: Inspection) -> str:
    def fmt(x):
        return "–" if x is None else f"{x:.3f}"

    lines = [
        f"# Zoo inspection against `{ins.base}`",
        "",
        "## Where each model's change lives",
        "",
        "Relative task-vector norm ‖θ − θ0‖ / ‖θ0‖ per module type, and the level that can recover it.",
        "",
        "| model | " + " | ".join(MODULE_TYPES) + " | all | matrices | advice |",
        "|---" * (len(MODULE_TYPES) + 4) + "|",
    ]
    for name in ins.models:
        r = ins.relative_norm.get(name, {})
        lines.append(
            f"| {name} | "
            + " | ".join(fmt(r.get(t)) for t in (*MODULE_TYPES, "all", "linear"))
            + f" | {ins.advice[name]} |"
        )
    for title, matrix in (
        ("Model-GLUE similarity (raw weights, per column, attention and MLP)", ins.glue),
        ("Task-vector cosine", ins.task_vector),
    ):
        if matrix is None:
            continue
        lines += ["", f"## {title}", "", "| | " + " | ".join(ins.models) + " |", "|---" * (len(ins.models) + 1) + "|"]
        lines += [f"| {a} | " + " | ".join(fmt(x) for x in row) + " |" for a, row in zip(ins.models, matrix)]
    lines += ["", f"## Clusters at threshold {ins.threshold}", ""]
    lines += [f"{k + 1}. " + ", ".join(c) for k, c in enumerate(ins.clusters)]
    return "\n".join(lines) + "\n"


def plot(ins: Inspection, path: Path) -> None:
    """Heatmaps of both pairwise measures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("Model-GLUE similarity", ins.glue)] + (
        [("task-vector cosine", ins.task_vector)] if ins.task_vector else []
    )
    n = len(ins.models)
    fig, axes = plt.subplots(1, len(panels), figsize=(2 + 4 * len(panels), 1.5 + 0.35 * n), squeeze=False)
    for ax, (title, m) in zip(axes[0], panels):
        im = ax.imshow(
            [[float("nan") if x is None else x for x in row] for row in m],
            vmin=-1 if "task" in title else 0,
            vmax=1,
            cmap="viridis",
        )
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(n), ins.models, rotation=90, fontsize=7)
        ax.set_yticks(range(n), ins.models, fontsize=7)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write(ins: Inspection, out_dir: Path, force: bool = False) -> Path:
    from moe_merge.outdir import atomic_output_dir

    with atomic_output_dir(out_dir, force=force) as tmp:
        (tmp / "inspect.json").write_text(json.dumps(ins.to_dict(), indent=2) + "\n")
        (tmp / "inspect.md").write_text(markdown(ins))
        plot(ins, tmp / "inspect.png")
    return Path(out_dir)
