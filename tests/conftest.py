"""Pico checkpoints built in temporary directories, and the cached tiny zoo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from moe_merge import zoo


def make_pico(path: Path, arch: str = "llama", seed: int = 0, base: Path | None = None, mlp_only: bool = True,
              hidden: int = 32, intermediate: int = 64, layers: int = 2) -> Path:
    """A random tiny checkpoint; with `base`, a copy of it whose MLPs (or every weight) are perturbed."""
    from transformers import AutoModelForCausalLM

    tok = zoo.build_tokenizer()
    extra = {"head_dim": hidden // 4} if arch == "qwen3" else {}
    config = zoo.model_config(arch, len(tok), hidden_size=hidden, intermediate_size=intermediate,
                              num_hidden_layers=layers, **extra)
    torch.manual_seed(seed)
    if base is None:
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = AutoModelForCausalLM.from_pretrained(base)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not mlp_only or ".mlp." in name:
                    p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def prompts_for(i: int) -> list[str]:
    task = zoo.EXPERT_TASKS[i % len(zoo.EXPERT_TASKS)]
    return zoo.task_prompts(task)["positive_prompts"][:2] + [f"{task} x{i}="]


@pytest.fixture(scope="session")
def pico(tmp_path_factory) -> dict:
    """A llama pico base and three experts that differ from it only in their MLPs."""
    root = tmp_path_factory.mktemp("pico")
    base = make_pico(root / "base")
    experts = [make_pico(root / f"expert{i}", seed=i + 1, base=base) for i in range(3)]
    return {"root": root, "base": base, "experts": experts}


def pico_recipe(pico: dict, **overrides) -> dict:
    recipe = {
        "base_model": str(pico["base"]),
        "experts_per_token": 1,
        "experts": [{"source_model": str(p), "positive_prompts": prompts_for(i)} for i, p in enumerate(pico["experts"])],
    }
    recipe.update(overrides)
    return recipe


@pytest.fixture(scope="session")
def zoo_dir() -> Path:
    """The trained zoo (built once, about two minutes, then cached)."""
    return zoo.ensure_zoo("llama")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
