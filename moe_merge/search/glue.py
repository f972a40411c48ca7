"""`moe-merge glue RECIPE.yaml OUT_DIR`: Model-GLUE's recipe over a heterogeneous zoo.

1. Cluster the zoo by mergeability (`similarity.greedy_clusters`).
2. Merge selectively inside each cluster (`strategies`), every candidate scored on the proxy in batches
   through the cluster's dynamic model (`proxy`); each cluster's choice is written as a plain checkpoint.
3. Mix the clusters' models into one model-level dynamic model (top-1 routing per sequence, with the KV
   cache): each keeps its own embeddings and head, so the clusters need not share a base, only the
   architecture, sizes, vocab and tokenizer. Each proxy task goes to the cluster model that scores best on it,
   and that model's router prompts are those tasks' proxy prompts.

Everything lands in OUT_DIR at once: `clusters/`, `mixture/`, and the report (`glue-report.json`, `.md`, and
`glue-trials.png`, proxy score against trial), with held-out scores where `held_out` is given (never used to
choose anything).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from pydantic import Field, model_validator

from moe_merge.config import _Strict, load_yaml
from moe_merge.errors import ConfigError
from moe_merge.merge import MixupBase
from moe_merge.search import proxy as proxies
from moe_merge.search import strategies
from moe_merge.search.inspect import DEFAULT_THRESHOLD, Model, open_model, pairwise
from moe_merge.search.similarity import greedy_clusters
from moe_merge.sources import Checkpoint, resolve_path

logger = logging.getLogger(__name__)

Strategy = Literal["all", "heuristic_average", "heuristic_coefficient", "heuristic_similarity", "evolutionary", "mixup"]
STRATEGIES: tuple[Strategy, ...] = get_args(Strategy)


class GlueModel(_Strict):
    name: str
    path: str
    base: str | None = Field(None, description="the checkpoint it was fine-tuned from (needed by task-vector merges)")


class ProxySpec(_Strict):
    path: str = Field(description="rows as router training reads them, with an `expert` task label")
    metric: Literal["exact_match", "nll"] = "exact_match"
    batch_size: int = Field(64, ge=1)


class ClusteringSpec(_Strict):
    threshold: float = Field(DEFAULT_THRESHOLD, ge=-1.0, le=1.0, description="Model-GLUE similarity to join a cluster")


class MixupSpec(_Strict):
    base_method: MixupBase = "average"
    alpha: list[float] = Field([0.5, 1.0, 2.0], min_length=1)
    samples: int = Field(8, ge=1, description="draws per alpha")
    scale: float = Field(1.0, gt=0.0, description="s in θ0 + s·Σ λ_e τ_e (task-vector base methods)")
    density: float = Field(0.5, gt=0.0, le=1.0, description="ties / dare: share of each task vector kept")

    @model_validator(mode="after")
    def _alphas(self):
        if any(a <= 0 for a in self.alpha):
            raise ValueError("`alpha` values must be positive")
        return self


class MergeSpec(_Strict):
    strategy: Strategy = "heuristic_coefficient"
    budget: int = Field(200, ge=1, description="evolutionary: trials")
    groups: int = Field(1, ge=1, description="contiguous layer groups with their own weights (evolutionary, all)")
    mixup: MixupSpec = MixupSpec()


class MixtureSpec(_Strict):
    leave_out: list[str] = Field([], description="models whose clusters are not mixed")
    prompts_per_model: int = Field(16, ge=1)


class GlueRecipe(_Strict):
    models: list[GlueModel] = Field(min_length=1)
    proxy: ProxySpec
    held_out: str | None = Field(
        None, description="eval rows (prompt, completion, expert) scored but never used to choose"
    )
    clustering: ClusteringSpec = ClusteringSpec()
    merge: MergeSpec = MergeSpec()
    per_cluster: dict[str, MergeSpec] = Field({}, description="a cluster holding this model merges this way")
    mixture: MixtureSpec | None = MixtureSpec()
    seed: int = 0

    @model_validator(mode="after")
    def _names(self):
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(
                f"model names must be unique; repeated: {sorted({n for n in names if names.count(n) > 1})}"
            )
        for where, given in (
            ("per_cluster", list(self.per_cluster)),
            ("mixture.leave_out", self.mixture.leave_out if self.mixture else []),
        ):
            unknown = [n for n in given if n not in names]
            if unknown:
                raise ValueError(f"`{where}` names {unknown}, which are not in `models`")
        return self


def load_recipe(path: Path | str) -> GlueRecipe:
    return load_yaml(path, GlueRecipe, "a glue recipe is a mapping with `models` and `proxy`")


# ----------------------------------------------------------------------------------------- one cluster


def _reference(members: list[GlueModel], recipe_dir: Path | None) -> tuple[Path, bool]:
    """θ0 of a cluster: the members' common base if they declare one, else the first member."""
    base = members[0].base
    if base is not None and all(m.base == base for m in members):
        return resolve_path(base, recipe_dir), True
    return resolve_path(members[0].path, recipe_dir), False


def _vectors(spec: MergeSpec, has_base: bool, names: list[str]) -> tuple[str, bool]:
    """The fixed vectors a strategy needs, and whether M³'s lone entries are split off."""
    if spec.strategy != "mixup" or spec.mixup.base_method == "average":
        return "linear", False
    if not has_base:
        raise ConfigError(
            f"cluster {names}: `mixup.base_method: {spec.mixup.base_method}` merges task vectors, so every "
            "member needs the same `base` in `models`; or use `base_method: average`"
        )
    method = "linear" if spec.mixup.base_method == "task_arithmetic" else spec.mixup.base_method
    return method, method.endswith("ties")


def merge_cluster(
    members: list[GlueModel],
    spec: MergeSpec,
    proxy_path: Path,
    proxy_spec: ProxySpec,
    mlp: list[list],
    recipe_dir: Path | None,
    seed: int,
):
    """Search one cluster; returns (every trial, the chosen one, a function writing it into a directory)."""
    from moe_merge.tokens import load_tokenizer

    names = [m.name for m in members]
    reference, has_base = _reference(members, recipe_dir)
    paths = [resolve_path(m.path, recipe_dir) for m in members]
    tokenizer = load_tokenizer(paths[0])
    proxy = proxies.load_proxy(proxy_path, tokenizer, proxy_spec.metric)
    if len(members) == 1:
        return _alone(paths[0], proxy, proxy_spec, tokenizer)
    vectors, split = _vectors(spec, has_base, names)
    density = spec.mixup.density
    model = proxies.candidate_model(reference, paths, vectors, density, seed, split)
    L = model.config.num_routers
    G = min(spec.groups, L)
    trials = strategies.Trials(
        lambda ws: proxies.score(model, proxy, ws, proxy_spec.batch_size, tokenizer.pad_token_id),
        [i * G // L for i in range(L)],
    )
    E, V = len(members), model.config.num_experts
    if spec.strategy == "all":
        best = strategies.uniform_all(trials, E, V)
    elif spec.strategy.startswith("heuristic_"):
        best = strategies.heuristic(trials, E, V, spec.strategy.removeprefix("heuristic_"), mlp)
    elif spec.strategy == "evolutionary":
        best = strategies.evolutionary(trials, E, V, spec.budget, seed)
    else:
        scale = 1.0 if spec.mixup.base_method == "average" else spec.mixup.scale
        best = strategies.mixup(trials, E, V, spec.mixup.alpha, spec.mixup.samples, seed, scale)

    chosen = trials.expand(torch.tensor(best.weights))

    def write(out: Path) -> None:
        _write_dense(reference, paths, vectors, density, seed, split, chosen, out)

    return trials.log, best, write


def _alone(path: Path, proxy: proxies.Proxy, proxy_spec: ProxySpec, tokenizer):
    """A cluster of one: nothing to merge; the model is scored as it is and copied."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    (s,) = proxies.score(model, proxy, None, proxy_spec.batch_size, tokenizer.pad_token_id)
    best = strategies.Trial("none", 0, [[1.0]], s.score, s.tasks, True, "a cluster of one: nothing to merge")

    def write(out: Path) -> None:
        shutil.copytree(path, out)

    return [best], best, write


def _write_dense(
    reference: Path,
    paths: list[Path],
    vectors: str,
    density: float,
    seed: int,
    split: bool,
    weights: torch.Tensor,
    out: Path,
) -> None:
    """The chosen candidate as a plain checkpoint in the reference's dtype, its config and tokenizer."""
    from moe_merge.recipe import copy_companions
    from moe_merge.sources import open_expert
    from moe_merge.writer import ShardWriter

    base = Checkpoint(reference)
    fixed = proxies.FixedVectors(base, [open_expert(str(p), base) for p in paths], vectors, density, seed, split)
    layers = weights.shape[0]
    out.mkdir(parents=True)
    writer = ShardWriter(out, 5 * 2**30)
    for name in sorted(base.weight_map):
        t = base.get(name)
        writer.add(name, proxies.dense_tensor(name, weights, base, fixed, layers).to(t.dtype))
    writer.finalize()
    shutil.copy2(reference / "config.json", out / "config.json")
    copy_companions(paths[0], out)


# ----------------------------------------------------------------------------------------- the whole recipe


def _file(path: str, recipe_dir: Path | None) -> Path:
    """A data file named in the recipe: relative paths are relative to the recipe's folder."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or recipe_dir is None else recipe_dir / p


def held_out_scores(path: Path, rows: list[dict]) -> dict[str, float]:
    """Greedy exact match per task on the held-out rows, and their mean (`mean`), of a saved model."""
    from transformers import AutoModelForCausalLM

    from moe_merge.modeling import MoEMergeForCausalLM
    from moe_merge.quality import exact_match
    from moe_merge.tokens import load_tokenizer

    dynamic = (path / "modeling_moe_merge.py").is_file()
    model = (MoEMergeForCausalLM if dynamic else AutoModelForCausalLM).from_pretrained(path).eval()
    got = {t: s for t, (s, _) in exact_match(model, load_tokenizer(path), rows).items()}
    got["mean"] = sum(got.values()) / len(got)
    return got


def run_glue(recipe: GlueRecipe, out_dir: Path | str, recipe_dir: Path | None = None, force: bool = False) -> dict:
    from moe_merge.outdir import atomic_output_dir
    from moe_merge.quality import load_eval_rows

    held = load_eval_rows(_file(recipe.held_out, recipe_dir)) if recipe.held_out else None
    proxy_path = _file(recipe.proxy.path, recipe_dir)
    models = [
        open_model(m.name, m.path, Checkpoint(resolve_path(m.base, recipe_dir)) if m.base else None, recipe_dir)
        for m in recipe.models
    ]
    sims = pairwise(models)
    clusters = greedy_clusters([m.key for m in models], sims.glue, recipe.clustering.threshold)
    if recipe.mixture is not None:
        check_mixture(recipe, recipe.mixture, models, clusters)
    report: dict[str, Any] = {
        "threshold": recipe.clustering.threshold,
        "models": [m.name for m in models],
        "similarity": sims.glue,
        "clusters": [],
    }
    with atomic_output_dir(out_dir, force=force) as tmp:
        for k, idx in enumerate(clusters):
            members = [recipe.models[i] for i in idx]
            spec = next((recipe.per_cluster[m.name] for m in members if m.name in recipe.per_cluster), recipe.merge)
            mlp = [[sims.mlp[i][j] for j in idx] for i in idx]
            logger.info("cluster %d: %s, %s", k + 1, [m.name for m in members], spec.strategy)
            trials, best, write = merge_cluster(members, spec, proxy_path, recipe.proxy, mlp, recipe_dir, recipe.seed)
            where = tmp / "clusters" / f"{k + 1}-{members[0].name}"
            write(where)
            report["clusters"].append(
                {
                    "members": [m.name for m in members],
                    "strategy": spec.strategy if len(idx) > 1 else "none (one model)",
                    "path": str(where.relative_to(tmp)),
                    "chosen": best.__dict__,
                    "trials": [t.__dict__ for t in trials],
                    "held_out": held_out_scores(where, held) if held else None,
                }
            )
        if held:
            report["members_held_out"] = {
                m.name: held_out_scores(resolve_path(m.path, recipe_dir), held)
                for m in recipe.models
                if m.name not in (recipe.mixture.leave_out if recipe.mixture else [])
            }
        if recipe.mixture is not None:
            report["mixture"] = _mix(recipe, recipe.mixture, report, tmp, proxy_path, held)
        _write_report(report, tmp)
    return report


def check_mixture(recipe: GlueRecipe, mixture: MixtureSpec, models: list[Model], clusters: list[list[int]]) -> None:
    """Before any work: at least two clusters to mix, whose models share architecture, sizes, vocab and tokenizer."""
    from moe_merge.sources import MATCHING_FIELDS, _tokenizer_vocab

    left = set(mixture.leave_out)
    mixed = [c for c in clusters if not left & {models[i].name for i in c}]
    if len(mixed) < 2:
        raise ConfigError(
            f"`mixture` needs at least two clusters to mix; clustering at threshold "
            f"{recipe.clustering.threshold} gave {[[models[i].name for i in c] for c in clusters]}, "
            f"{len(mixed)} of them mixed after `mixture.leave_out`: lower `clustering.threshold`, or set "
            "`mixture: null`"
        )
    a = models[mixed[0][0]]
    for c in mixed[1:]:
        b = models[c[0]]
        ca, cb = a.source.config, b.source.config
        fields = [f for f in ("architectures", *MATCHING_FIELDS) if ca.get(f) != cb.get(f)]
        why = (
            f"`{fields[0]}` is {ca.get(fields[0])!r} in {a.path}/config.json but {cb.get(fields[0])!r} in "
            f"{b.path}/config.json"
            if fields
            else f"their tokenizers differ ({a.path}/tokenizer.json, {b.path}/tokenizer.json)"
            if _tokenizer_vocab(a.path) != _tokenizer_vocab(b.path)
            else None
        )
        if why:
            raise ConfigError(
                f"`mixture`: models {a.name!r} and {b.name!r} (of two clusters) cannot be mixed: {why}. "
                "The mixture needs one architecture, hidden size, vocab and tokenizer; leave one out with "
                "`mixture.leave_out`"
            )


def _mix(
    recipe: GlueRecipe, mixture: MixtureSpec, report: dict, tmp: Path, proxy_path: Path, held: list[dict] | None
) -> dict:
    """The clusters' models as one model-level dynamic model; each proxy task routed to its best cluster model."""
    from moe_merge.assemble import assemble
    from moe_merge.config import MergeConfig

    left = set(mixture.leave_out)
    mixed = [c for c in report["clusters"] if not left & set(c["members"])]
    tasks = list(mixed[0]["chosen"]["tasks"])
    owner = {t: max(range(len(mixed)), key=lambda k: mixed[k]["chosen"]["tasks"].get(t, float("-inf"))) for t in tasks}
    prompts = _proxy_prompts(proxy_path)
    experts = []
    for k, c in enumerate(mixed):
        own = [p for t in tasks if owner[t] == k for p in prompts.get(t, [])[: mixture.prompts_per_model]]
        if own:
            experts.append(
                {
                    "name": c["members"][0],
                    "source_model": str(tmp / c["path"]),
                    "positive_prompts": own,
                    "tasks": [t for t in tasks if owner[t] == k],
                }
            )
    if len(experts) < 2:
        raise ConfigError(
            "`mixture`: one cluster model is best on every proxy task, so there is nothing to mix; set `mixture: null`"
        )
    config = MergeConfig.model_validate(
        {
            "base_model": experts[0]["source_model"],
            "method": "sparse",
            "level": "model",
            "experts_per_token": 1,
            "seed": recipe.seed,
            "experts": [{k: v for k, v in e.items() if k != "tasks"} for e in experts],
        }
    )
    out = assemble(config, tmp / "mixture")
    return {
        "experts": [{"name": e["name"], "tasks": e["tasks"]} for e in experts],
        "path": "mixture",
        "held_out": held_out_scores(out, held) if held else None,
    }


def _proxy_prompts(path: Path) -> dict[str, list[str]]:
    from moe_merge.train.data import load_rows

    out: dict[str, list[str]] = {}
    for row in load_rows(path):
        text = row.get("prompt") or row.get("text")
        if text:
            out.setdefault(str(row.get("expert", "all")), []).append(text)
    return out


def _write_report(report: dict, out: Path) -> None:
    (out / "glue-report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "glue-report.md").write_text(markdown(report))
    plot(report, out / "glue-trials.png")


def markdown(report: dict) -> str:
    def pct(x):
        return "–" if x is None else f"{x:.3f}"

    lines = [
        "# Model-GLUE search",
        "",
        f"Clusters at similarity threshold {report['threshold']}:",
        "",
        "| cluster | members | strategy | trials | kept weights | proxy | held-out mean |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, c in enumerate(report["clusters"]):
        w = ", ".join(f"{x:.2f}" for x in c["chosen"]["weights"][0][: len(c["members"])])
        held = c["held_out"]["mean"] if c["held_out"] else None
        lines.append(
            f"| {k + 1} | {', '.join(c['members'])} | {c['strategy']} | {len(c['trials'])} | {w} | "
            f"{pct(c['chosen']['score'])} | {pct(held)} |"
        )
    if report.get("members_held_out"):
        lines += ["", "Held-out mean of each model alone:", ""]
        lines += [f"- {n}: {pct(s['mean'])}" for n, s in report["members_held_out"].items()]
    if report.get("mixture"):
        m = report["mixture"]
        lines += [
            "",
            "Mixture (model level, top-1 per sequence): "
            + ", ".join(f"{e['name']} ← {'/'.join(e['tasks'])}" for e in m["experts"]),
        ]
        if m["held_out"]:
            best = max(s["mean"] for s in report["members_held_out"].values())
            lines.append(
                f"held-out mean {pct(m['held_out']['mean'])} against the best single model's {pct(best)} "
                f"(margin {m['held_out']['mean'] - best:+.3f})"
            )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Proxy score against trial, one line per cluster, the kept candidates marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for k, c in enumerate(report["clusters"]):
        scores = [t["score"] for t in c["trials"]]
        (line,) = ax.plot(range(1, len(scores) + 1), scores, ".", alpha=0.5, label=f"cluster {k + 1} ({c['strategy']})")
        kept = [(i + 1, t["score"]) for i, t in enumerate(c["trials"]) if t["accepted"]]
        if kept:
            ax.plot(*zip(*kept), "-o", color=line.get_color(), markersize=4)
    ax.set_xlabel("trial")
    ax.set_ylabel("proxy score")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
