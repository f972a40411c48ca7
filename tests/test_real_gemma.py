"""The dynamic methods on a real Gemma: gemma-3-270m, converted from its GGUF on PyPI (Gemma 3: (1 + w) norms before
and after attention and MLP, q/k norms, embeddings scaled by sqrt(640), sliding-window layers with a RoPE of their
own, a 262,144-token vocabulary, tied embeddings, bf16), and its real zoo's four LoRA adapters on every linear layer
(its full fine-tunes are left out here: what they add, routed embeddings, norms and a tied head, is checked on the
real SmolLM2 in test_real.py and exactly on pico Gemmas in test_families.py). A stock MoE of it is refused:
transformers has no Gemma MoE.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import moe_merge.modeling  # noqa: F401  registers the dynamic model
from moe_merge import realzoo
from moe_merge.assemble import assemble
from moe_merge.config import MergeConfig
from moe_merge.errors import CompatibilityError
from tests.test_real import (
    LORA_DYNAMIC,
    _experts,
    _held_out,
    _scores,
    assembled,
    assert_cache_changes_nothing,
    assert_one_hot_is_each_expert,
    assert_routed_right,
)

pytestmark = pytest.mark.slow

RECIPES = LORA_DYNAMIC
EXACT = ["smear-block", "wemoe-block", "twin-block", "sparse-block", "sparse-model"]
MERGED = ("sparse-block", "sparse-model")


@pytest.fixture(scope="module")
def gemma_zoo() -> Path:
    return realzoo.ensure_real_zoo("gemma3", kinds=("lora",))


@pytest.fixture(scope="module")
def built(gemma_zoo, tmp_path_factory) -> Iterator[dict[str, Path]]:
    yield from assembled(gemma_zoo, RECIPES, tmp_path_factory.mktemp("gemma"))


@pytest.fixture(scope="module")
def tok(gemma_zoo):
    from moe_merge.tokens import load_tokenizer

    return load_tokenizer(gemma_zoo / "base")


def test_the_base_is_a_gemma3_that_fails_every_task_and_each_expert_does_its_own(gemma_zoo, tok):
    base = AutoModelForCausalLM.from_pretrained(gemma_zoo / "base")
    assert type(base).__name__ == "Gemma3ForCausalLM" and base.dtype == torch.bfloat16
    assert "sliding_attention" in base.config.layer_types and base.config.tie_word_embeddings
    rows = _held_out(realzoo.TASK_NAMES, 4)
    assert max(_scores(base, tok, rows).values()) <= 0.1
    for task in realzoo.RealZooSettings(base="gemma3", kinds=("lora",)).tasks:
        got = _scores(realzoo.load_checkpoint(gemma_zoo / task.expert), tok, rows)
        assert got[task.name] >= 0.75, (task.name, got)


@pytest.mark.parametrize("name", EXACT)
def test_one_hot_weights_reproduce_each_expert(built, gemma_zoo, tok, name):
    """The expert is loaded in float32 as the dynamic model is: Gemma's embedding scale is made in the load dtype
    (sqrt(640), or 25.25 in bf16)."""
    assert_one_hot_is_each_expert(built[name], gemma_zoo, tok, _experts(gemma_zoo, RECIPES[name][0]), name in MERGED)


@pytest.mark.parametrize("name", list(RECIPES))
def test_training_free_routing_sends_held_out_prompts_to_their_expert(built, gemma_zoo, tok, name):
    assert_routed_right(built[name], tok, _experts(gemma_zoo, RECIPES[name][0]), answers=name in EXACT)


@pytest.mark.parametrize("name", ["twin-block", "sparse-model"])
def test_the_cache_changes_nothing_across_sliding_window_layers(built, gemma_zoo, tok, name):
    assert_cache_changes_nothing(
        AutoModelForCausalLM.from_pretrained(built[name]), tok, _experts(gemma_zoo, RECIPES[name][0])
    )


def test_a_stock_moe_of_gemma_is_refused_naming_the_dynamic_methods(gemma_zoo, tmp_path):
    with pytest.raises(CompatibilityError, match="transformers has no MoE architecture for a gemma3_text base"):
        assemble(MergeConfig.model_validate(realzoo.zoo_recipe(gemma_zoo, "lora")), tmp_path / "stock")
    assert not (tmp_path / "stock").exists()
