"""The model card (README.md) written beside every output, with Hub metadata.

Metadata: `base_model` lists the sources that are Hub repos (the Hub accepts repo ids only; local
paths appear in the card's text), with `base_model_relation: merge`, `library_name`, `pipeline_tag`
and tags. Text: the experts, method, level, routers, the routing report and its PNG, the quality
table when `assemble --eval-data` was given, how to load, and the resolved recipe.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from moe_merge.config import PROMPT_INITS
from moe_merge.recipe import Recipe
from moe_merge.sources import hub_id

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the `--max-lora-rank` values vLLM accepts (0.26)


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest `--max-lora-rank` vLLM accepts that holds `rank`; None above its largest."""
    return next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)


def _card_data(recipe: Recipe, tags: list[str], library_name: str = "transformers"):
    """Hub metadata: every source that is a Hub repo is a base model of this merge."""
    from huggingface_hub import ModelCardData

    cfg = recipe.config
    refs = [(cfg.base_model, recipe.base.path)] + [
        (e.source_model, x.path) for e, x in zip(cfg.experts, recipe.experts)
    ]
    ids = list(dict.fromkeys(i for i in (hub_id(ref, path) for ref, path in refs) if i))
    data = ModelCardData(
        base_model=ids or None,
        library_name=library_name,
        pipeline_tag="text-generation",
        tags=["moe", "merge", "moe-merge", *tags],
        base_model_relation="merge" if ids else None,
    )
    return data


def _title(out_dir: Path) -> str:
    name = Path(out_dir).name
    return "moe-merge model" if name.startswith(".") else name


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _quality(quality: dict | None) -> str:
    """The zoo-style table: exact match per task of this model on the user's eval data."""
    if not quality:
        return ""
    tasks = list(quality["scores"])
    mean = sum(s for s, _ in quality["scores"].values()) / len(tasks)
    text = (
        f"\n## Quality\n\nExact match of greedy completions on `{quality['file']}` (rows per task in brackets):\n\n"
        f"| model | {' | '.join(tasks)} | mean |\n|---|{'---|' * (len(tasks) + 1)}\n"
        f"| this model | {' | '.join(f'{s:.0%} ({n})' for s, n in quality['scores'].values())} | {mean:.0%} |\n"
    )
    oracle = quality.get("oracle")
    if oracle:
        cells = [f"{oracle[t][0]:.0%}" if t in oracle else "n/a" for t in tasks]
        text += (
            f"| oracle (merge weights one-hot to the task's expert) | {' | '.join(cells)} | |\n\n"
            "Where this model falls short of the oracle, its routers are to blame; where the oracle falls short "
            "of the expert itself, the merge is.\n"
        )
    return text


def _recipe_yaml(cfg) -> str:
    """The same document as moe-merge.yaml."""
    return yaml.safe_dump(cfg.resolved(), sort_keys=False).strip()


def write_card(out_dir: Path, recipe: Recipe, rep: dict, quality: dict | None = None) -> None:
    """The card of a stock sparse MoE. The card is one template read top to bottom, hence its length."""
    from huggingface_hub import ModelCard

    cfg = recipe.config
    data = _card_data(recipe, [recipe.fmt.model_type])
    rows = "\n".join(
        f"| {i} | {label} | `{e.source_model}` | {_pct(rep['accuracy_mean'][i])} | {_pct(rep['routed_right_everywhere'][i])} |"
        for i, (label, e) in enumerate(zip(rep["experts"], cfg.experts))
    )
    warnings = "\n".join(f"- {w}" for w in rep["warnings"]) or "- none"
    report = (
        f"Where each expert's held-out prompts are routed, layer by layer (`routing_report.json`). Warnings:\n\n"
        f"{warnings}\n\n![routing report](routing_report.png)"
        if rep["measured"]
        else rep["note"].capitalize() + "."
    )
    start = (
        "initialised from each expert's prompts without training"
        if cfg.router_init in PROMPT_INITS
        else "no prompts read"
    )
    text = f"""---
{data.to_yaml()}
---

# {_title(out_dir)}

A `{recipe.fmt.architecture}` mixture of experts assembled by [moe-merge](https://pypi.org/project/moe-merge/)
from {len(cfg.experts)} experts fine-tuned from `{cfg.base_model}`.

## Experts

| # | expert | source | routing accuracy (mean over layers) | eval prompts routed right at every token and layer |
|---|---|---|---|---|
{rows}

## Method

- level: `{cfg.level}`, method: `{cfg.method}` (top-{cfg.experts_per_token} of {len(cfg.experts)} experts per token)
- routers: `{cfg.router_init}`, {start}
- non-expert weights (attention, norms, embeddings): `{cfg.static_summary}`

## Routing report

{report}
{_quality(quality)}
## How to load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("<this directory or repo id>")
tokenizer = AutoTokenizer.from_pretrained("<this directory or repo id>")
```

No remote code is needed: the checkpoint uses the stock `{recipe.fmt.architecture}` layout (vLLM and TGI
serve it as they serve that architecture).

## Recipe

The resolved recipe (`moe-merge.yaml`), every default spelled out:

```yaml
{_recipe_yaml(cfg)}
```
"""
    ModelCard(text).save(Path(out_dir) / "README.md")


def write_dynamic_card(
    out_dir: Path, recipe: Recipe, rep: dict, quality: dict | None = None, model_config=None
) -> None:
    """The card of a moe_merge dynamic model (remote code; `trust_remote_code=True` or `import moe_merge`), whose
    `model_config` says what is routed beside the linear layers. The card is one template read top to bottom,
    hence its length."""
    from huggingface_hub import ModelCard

    cfg = recipe.config
    data = _card_data(recipe, [f"moe-merge-{cfg.method}", f"level-{cfg.level}"])
    measured = rep["measured"]
    rows = "\n".join(
        f"| {i} | {label} | `{e.source_model}` | "
        + (
            f"{_pct(rep['accuracy_worst'][i])} | {_pct(rep['routed_right_everywhere'][i])} |"
            if measured and rep["accuracy_worst"][i] is not None
            else "not measured | not measured |"
        )
        for i, (label, e) in enumerate(zip(rep["experts"], cfg.experts))
    )
    report = (
        "Mean merge weights of each expert's held-out prompts, per router (`routing_report.json`):\n\n"
        "![routing report](routing_report.png)"
        if measured
        else rep["note"].capitalize() + "."
    )
    spec = cfg.router_spec
    parts = ", ".join(getattr(model_config, "routed_parts", None) or []) or "nothing (the experts do not differ there)"
    prepass = (
        ""
        if spec.granularity != "sequence" or model_config is None
        else f"; the first router reads the prompt's states entering layer {model_config.prepass_layers} of the "
        "static merge, in a pass run once at prefill"
    )
    text = f"""---
{data.to_yaml()}
---

# {_title(out_dir)}

A dynamic merge of {len(cfg.experts)} experts fine-tuned from `{cfg.base_model}`, built by
[moe-merge](https://pypi.org/project/moe-merge/): its routers compute merge weights for each input, and the
model applies the merged parameters in one forward pass.

## Experts

| # | expert | source | held-out prompts routed right (worst router) | routed right at every router |
|---|---|---|---|---|
{rows}

## Method

- method: `{cfg.method}`, level: `{cfg.level}`
- routers: `{spec.kind}`, `{spec.granularity}`-level, `{cfg.normalize}` normalization, initialised `{cfg.router_init}`{prepass}
- also routed with per-input merge weights: {parts}
- everything not routed: `{cfg.static_summary}`

## Routing report

{report}
{_quality(quality)}
## How to load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("<this directory or repo id>", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("<this directory or repo id>")
out = model.generate(**tokenizer("your prompt", return_tensors="pt"), max_new_tokens=32)
```

The remote code needs the moe-merge package (`pip install moe-merge`); with it imported,
`trust_remote_code` is not needed. `device_map="auto"` spreads the layers over GPUs and CPU (accelerate).
For serving stacks without remote code, export fixed merge weights: `moe-merge bake` (a dense model) or
`moe-merge export-lora` (a LoRA adapter on the base).

## Recipe

The resolved recipe (`moe-merge.yaml`), every default spelled out:

```yaml
{_recipe_yaml(cfg)}
```
"""
    ModelCard(text).save(Path(out_dir) / "README.md")


def _merge_weights_table(expert_names: list[str], weights) -> str:
    """One row per router ([R, E]), or one row for all ([E])."""
    rows = weights.reshape(-1, weights.shape[-1]).tolist()
    header = "| router | " + " | ".join(expert_names) + " |\n|---|" + "---|" * len(expert_names)
    return (
        header
        + "\n"
        + "\n".join(
            f"| {'all' if len(rows) == 1 else k} | " + " | ".join(f"{x:.4g}" for x in row) + " |"
            for k, row in enumerate(rows)
        )
    )


def write_baked_card(out_dir: Path, *, model_dir: Path, expert_names: list[str], weights, architecture: str) -> None:
    """The card of a `bake` output: a plain dense model for fixed merge weights; its metadata is the dynamic model's."""
    from huggingface_hub import ModelCard, ModelCardData

    source = Path(model_dir) / "README.md"
    base_model = ModelCard.load(source).data.base_model if source.is_file() else None
    data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["merge", "moe-merge"],
        base_model_relation="merge" if base_model else None,
    )
    text = f"""---
{data.to_yaml()}
---

# {_title(out_dir)}

A plain `{architecture}` holding the moe-merge dynamic model `{Path(model_dir).name}` under fixed merge weights of its
experts (each merged layer is W0 + Σ_e w_e Δ_e), written by `moe-merge bake`. It needs no remote code.

## Merge weights

{_merge_weights_table(expert_names, weights)}

## How to load

```python
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("<this directory or repo id>")
```
"""
    ModelCard(text).save(Path(out_dir) / "README.md")


def _vllm_serving(base: str, rank: int) -> str:

    if (serve := vllm_max_lora_rank(rank)) is None:
        return (
            f"vLLM cannot serve this adapter: its rank, {rank}, is above the largest `--max-lora-rank` vLLM accepts "
            f"({max(VLLM_MAX_LORA_RANKS)}). Serve the dense model instead: `moe-merge bake` with the same merge "
            "weights writes it."
        )
    return f"vLLM: `vllm serve {base} --enable-lora --max-lora-rank {serve} --lora-modules merged=<this directory>`."


def write_adapter_card(
    out_dir: Path,
    *,
    base: str,
    hub_id: str | None,
    model_dir: Path,
    expert_names: list[str],
    weights,
    rank: int,
    modules: int,
) -> None:
    """The card of an `export-lora` adapter: the merge weights it holds and how to serve it."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(
        base_model=hub_id,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=["lora", "merge", "moe-merge"],
        base_model_relation="adapter" if hub_id else None,
    )
    text = f"""---
{data.to_yaml()}
---

# {_title(out_dir)}

A LoRA adapter on `{base}` that reproduces the moe-merge dynamic model `{Path(model_dir).name}` exactly under
fixed merge weights of its experts, written by `moe-merge export-lora`. Rank {rank} on {modules} linear modules,
`lora_alpha` = r (scaling 1); lower-rank modules are zero-padded to one rank, as multi-LoRA servers expect.

## Merge weights

{_merge_weights_table(expert_names, weights)}

## How to load

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "<this directory or repo id>")
```

{_vllm_serving(base, rank)}
"""
    ModelCard(text).save(Path(out_dir) / "README.md")
