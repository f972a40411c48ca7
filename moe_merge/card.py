"""The model card (README.md) written beside every output, with Hub metadata."""

from __future__ import annotations

from pathlib import Path

import yaml


def _card_data(cfg, tags: list[str]):
    """Hub metadata: every source is a base model of this merge."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        base_model=[cfg.base_model] + [e.source_model for e in cfg.experts],
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["moe", "merge", "moe-merge", *tags],
    )
    data.base_model_relation = "merge"
    return data


def write_card(out_dir: Path, recipe, rep: dict) -> None:
    from huggingface_hub import ModelCard

    cfg = recipe.config
    data = _card_data(cfg, [recipe.fmt.model_type])
    rows = "\n".join(
        f"| {i} | {label} | `{e.source_model}` | {_pct(rep['accuracy_mean'][i])} | {_pct(rep['prompts_routed_right_everywhere'][i])} |"
        for i, (label, e) in enumerate(zip(rep["experts"], cfg.experts))
    )
    warnings = "\n".join(f"- {w}" for w in rep["warnings"]) or "- none"
    text = f"""---
{data.to_yaml()}
---

# {Path(out_dir).name if not Path(out_dir).name.startswith('.') else 'moe-merge model'}

A `{recipe.fmt.architecture}` mixture of experts assembled by [moe-merge](https://pypi.org/project/moe-merge/)
from {len(cfg.experts)} experts fine-tuned from `{cfg.base_model}`.

## Experts

| # | expert | source | routing accuracy (mean over layers) | eval prompts routed right at every token and layer |
|---|---|---|---|---|
{rows}

## Method

- level: `{cfg.level}`, method: `{cfg.method}` (top-{cfg.experts_per_token} of {len(cfg.experts)} experts per token)
- routers: `{cfg.gate_init}`, initialised from each expert's prompts without training
- non-expert weights (attention, norms, embeddings): `{cfg.static_method}`

## Routing report

See `routing_report.json` and `routing_report.png`. Warnings:

{warnings}

## How to load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("<this directory or repo id>")
tokenizer = AutoTokenizer.from_pretrained("<this directory or repo id>")
```

No remote code is needed: the checkpoint uses the stock `{recipe.fmt.architecture}` layout.

## Recipe

```yaml
{yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True), sort_keys=False).strip()}
```
"""
    ModelCard(text).save(Path(out_dir) / "README.md")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def write_dynamic_card(out_dir: Path, recipe, rep: dict) -> None:
    """The card of a moe_merge dynamic model (remote code; `trust_remote_code=True` or `import moe_merge`)."""
    from huggingface_hub import ModelCard

    cfg = recipe.config
    data = _card_data(cfg, [f"moe-merge-{cfg.method}", f"level-{cfg.level}"])
    first = rep["accuracy"][0]
    rows = "\n".join(
        f"| {i} | {label} | `{e.source_model}` | {_pct(min(a[i] for a in rep['accuracy']))} | "
        f"{_pct(rep['routed_right_at_every_router'][i])} |"
        for i, (label, e) in enumerate(zip(rep["experts"], cfg.experts))
    ) if first else ""
    spec = cfg.router_spec
    text = f"""---
{data.to_yaml()}
---

# {Path(out_dir).name if not Path(out_dir).name.startswith('.') else 'moe-merge model'}

A dynamic merge of {len(cfg.experts)} experts fine-tuned from `{cfg.base_model}`, built by
[moe-merge](https://pypi.org/project/moe-merge/): its routers compute merge weights for each input, and the
model applies the merged parameters in one forward pass.

## Experts

| # | expert | source | held-out prompts routed right (worst router) | routed right at every router |
|---|---|---|---|---|
{rows}

## Method

- method: `{cfg.method}`, level: `{cfg.level}`
- routers: `{spec.kind}`, `{spec.granularity}`-level, `{cfg.normalize}` normalisation, initialised `{cfg.gate_init}`
- everything not routed: `{cfg.static_method}`

## Routing report

`routing_report.json` and `routing_report.png` (mean merge weights of each expert's held-out prompts).

## How to load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("<this directory or repo id>", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("<this directory or repo id>")
out = model.generate(**tokenizer("your prompt", return_tensors="pt"), max_new_tokens=32)
```

The remote code needs the moe-merge package (`pip install moe-merge`); with it imported,
`trust_remote_code` is not needed.

## Recipe

```yaml
{yaml.safe_dump(cfg.model_dump(mode="json", exclude_defaults=True), sort_keys=False).strip()}
```
"""
    ModelCard(text).save(Path(out_dir) / "README.md")
