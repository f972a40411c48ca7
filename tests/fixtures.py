"""Checkpoints and recipes that only the tests and benchmarks build: untrained pico models, and a glue recipe over
the tiny zoo. (What users run, the zoo and the demo, lives in the package.)"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moe_merge.zoo import FULL_EXPERTS, VARIANTS, build_tokenizer, eval_rows, model_config, router_training_rows

PERTURB = {"mlp": (".mlp.",), "linear": ("_proj.",), "all": ("",)}


def pico_checkpoint(
    path: Path,
    arch: str = "llama",
    seed: int = 0,
    base: Path | None = None,
    perturb: str | tuple[str, ...] = "mlp",
    hidden: int = 32,
    intermediate: int = 64,
    layers: int = 2,
) -> Path:
    """An untrained checkpoint for tests and benchmarks; with `base`, a copy of it with some weights
    perturbed, i.e. an expert that differs from the base only where asked: its MLPs (`mlp`), every linear
    layer of its blocks (`linear`), every weight (`all`), or the weights whose names hold one of the given parts."""
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer()
    config = model_config(arch, len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers)
    torch.manual_seed(seed)
    if base is None:
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = AutoModelForCausalLM.from_pretrained(base)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if any(part in name for part in (PERTURB[perturb] if isinstance(perturb, str) else perturb)):
                    p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def glue_recipe(zoo_dir: Path, out_dir: Path, proxy_per_task: int = 8, **overrides) -> Path:
    """A `moe-merge glue` recipe over the zoo's fine-tunes, second family and other architecture, with its proxy
    rows (router-training words) and held-out rows (eval words) written beside it in `out_dir`; returns its path."""
    import yaml

    zoo_dir, out_dir = Path(zoo_dir), Path(out_dir)
    manifest = json.loads((zoo_dir / "zoo.json").read_text())
    models = [
        {"name": rel.replace("/", "-"), "path": str(zoo_dir / rel), "base": str(zoo_dir / "base")}
        for variant in VARIANTS
        for t, rel in manifest["experts"][variant].items()
        if t in FULL_EXPERTS
    ]
    for rel, info in manifest["search"].items():
        if rel != "full/shift":
            entry = {"name": rel.split("/", 1)[1].replace("/", "-"), "path": str(zoo_dir / rel)}
            if info["family"]:
                entry["base"] = str(zoo_dir / info["family"])
            models.append(entry)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("proxy.jsonl", router_training_rows(proxy_per_task, seed=7)), ("held-out.jsonl", eval_rows())):
        (out_dir / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "models": models,
        "proxy": {"path": "proxy.jsonl"},
        "held_out": "held-out.jsonl",
        "clustering": {"threshold": 0.5},
        "mixture": {"leave_out": ["alien"]},
    }
    recipe.update(overrides)
    path = out_dir / "glue.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
