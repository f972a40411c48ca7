"""The model card (README.md) written beside every output, with Hub metadata."""

from __future__ import annotations

from pathlib import Path

import yaml


def write_card(out_dir: Path, recipe, rep: dict) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    cfg = recipe.config
    data = ModelCardData(
        base_model=[cfg.base_model] + [e.source_model for e in cfg.experts],
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["moe", "merge", "moe-merge", recipe.fmt.model_type],
    )
    data.base_model_relation = "merge"
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
- non-expert weights (attention, norms, embeddings): `{cfg.non_expert}`

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
