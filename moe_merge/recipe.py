"""A recipe with its sources opened, and what every output copies from the base beside its weights.

`open_recipe` opens the base and every expert lazily and checks that they fit, before any tensor is
read; assembly, the dry run, the exports and the demo all start from the `Recipe` it returns.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moe_merge.arch import FAMILIES, MoEFormat, choose_format, family_error
from moe_merge.config import MergeConfig
from moe_merge.errors import CompatibilityError
from moe_merge.sources import Checkpoint, Expert, hub_id, open_expert, resolve_path, source_parts

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Recipe:
    """A validated config with its sources opened (lazily) and, for a stock sparse MoE, its output format."""

    config: MergeConfig
    base: Checkpoint
    experts: list[Expert]
    shared: Expert | None
    stock_format: MoEFormat | None
    labels: list[str] = field(default_factory=list)

    @property
    def fmt(self) -> MoEFormat:
        """The stock MoE format this recipe writes; a dynamic recipe has none."""
        if self.stock_format is None:
            raise TypeError(f"`method: {self.config.method}` at `level: {self.config.level}` writes no stock MoE")
        return self.stock_format

    @property
    def output_dtype(self) -> torch.dtype | None:
        """The recipe's `dtype`, else the base's; None when neither names one."""
        saved = self.base.config.get("dtype") or self.base.config.get("torch_dtype")
        return DTYPES.get(self.config.dtype or str(saved))


def open_recipe(config: MergeConfig, recipe_dir: Path | None = None) -> Recipe:
    """Open the base and every expert and check they fit together, before any tensor is read."""
    base = Checkpoint(resolve_path(config.base_model, recipe_dir))
    if base.family not in FAMILIES:
        # checked here too, as a recipe whose experts are all adapters never calls check_compatible
        raise CompatibilityError(family_error(base.family, f"base {base.path}/config.json"))
    experts = [open_expert(e.source_model, base, recipe_dir) for e in config.experts]
    shared = open_expert(config.shared_experts[0].source_model, base, recipe_dir) if config.shared_experts else None
    fmt = None if config.dynamic else choose_format(config, base.family, base.config, base.path)
    labels = [e.label for e in config.experts]
    if len(set(labels)) != len(labels):
        labels = [f"{i}:{label}" for i, label in enumerate(labels)]
    return Recipe(config, base, experts, shared, fmt, labels)


def portable(config: MergeConfig, from_dir: Path | None, to_dir: Path) -> MergeConfig:
    """`config` as the output's own moe-merge.yaml names its sources: a Hub id as given, a local directory by
    its path relative to `to_dir`, so that the recipe resolves from where it sits and no absolute local path
    reaches the Hub. `from_dir` is where the given paths are relative to (the recipe's directory)."""

    def ref(text: str) -> str:
        parts = []
        for part in source_parts(text, from_dir):  # one source, or mergekit's `base+adapter`
            path = resolve_path(part, from_dir)
            parts.append(part if hub_id(part, path) else os.path.relpath(path, Path(to_dir).absolute()))
        return "+".join(parts)

    def moved(experts):
        return [e.model_copy(update={"source_model": ref(e.source_model)}) for e in experts]

    return config.model_copy(
        update={
            "base_model": ref(config.base_model),
            "experts": moved(config.experts),
            "shared_experts": moved(config.shared_experts),
        }
    )


def copy_companions(src: Path, out: Path, make_generation_config: bool = True) -> None:
    """The tokenizer files of `src`, unchanged (no pad token injected into the user's files), and its
    generation config; when `src` has none, one from config.json's special tokens (`make_generation_config`)."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    if (src / "generation_config.json").is_file():
        shutil.copy2(src / "generation_config.json", out / "generation_config.json")
    elif make_generation_config:
        from transformers import GenerationConfig

        cfg = json.loads((src / "config.json").read_text())
        GenerationConfig(
            **{k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
        ).save_pretrained(out)


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor and where it comes from; both assembly paths plan with it, and the dry run prints it.

    `source` is one of:
    - `base`: the base's `tensor`; `static`: the recipe's static merge of `tensor` over the experts;
    - `expert`: expert `expert`'s `tensor`; `shared`: the shared expert's (Qwen2-MoE);
    - `experts`: every expert's `tensor`, stacked; `deltas`: every expert's minus W0, stacked;
    - `svd_A` / `svd_B`: SVD factors of each expert's `tensor` minus W0; `lora_A` / `lora_B`: each adapter's;
    - `router` / `shared_router`: computed from the prompts, not read.
    """

    name: str
    source: str
    shape: tuple[int | None, ...]  # None: a rank decided by energy as the tensor is built
    tensor: str | None = None
    expert: int | None = None
