"""The dynamic methods on a real Gemma: gemma-3-270m, converted from its GGUF on PyPI (Gemma 3: (1 + w) norms before
and after attention and MLP, q/k norms, embeddings scaled by sqrt(640), sliding-window layers with a RoPE of their
own, a 262,144-token vocabulary, tied embeddings, bf16), and its real zoo (four LoRA adapters on every linear layer,
two full fine-tunes). A stock MoE of it is refused: transformers has no Gemma MoE.
"""

from __future__ import annotations

import shutil
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
from tests.test_real import _batch, _experts, _held_out, _positions, _reference, _scores
from tests.test_realistic import assert_close_in_bf16

pytestmark = pytest.mark.slow

RECIPES = {  # name -> (experts, recipe overrides); every dynamic method at ffn, block and model level
    "smear-ffn": ("lora", {"method": "smear", "level": "ffn"}),
    "wemoe-ffn": ("lora", {"method": "wemoe", "level": "ffn"}),
    "twin-ffn": ("lora", {"method": "twin", "level": "ffn"}),
    "smear-block": ("lora", {"method": "smear", "level": "block"}),
    "wemoe-block": ("lora", {"method": "wemoe", "level": "block"}),
    "twin-block": ("lora", {"method": "twin", "level": "block"}),
    "sparse-block": ("lora", {"method": "sparse", "level": "block"}),
    "sparse-model": ("lora", {"method": "sparse", "level": "model"}),
    "smear-block-all": ("all", {"method": "smear", "level": "block"}),  # the scaled, tied table routed
}
# smear-block-all's one-hot check holds six 262,144-row tables in float32 (the pico Gemmas check the scaled table
# exactly, tests/test_families.py); here it is routed and generates
EXACT = ["smear-block", "wemoe-block", "twin-block", "sparse-block", "sparse-model"]
MERGED = ("sparse-block", "sparse-model")


@pytest.fixture(scope="module")
def gemma_zoo() -> Path:
    return realzoo.ensure_real_zoo("gemma3")


@pytest.fixture(scope="module")
def built(gemma_zoo, tmp_path_factory) -> Iterator[dict[str, Path]]:
    """Every recipe assembled once for the module, and removed after it (GBs: pytest keeps its last runs' files)."""
    root = tmp_path_factory.mktemp("gemma")
    yield {name: assemble(MergeConfig.model_validate(realzoo.zoo_recipe(gemma_zoo, experts, **overrides)), root / name)
            for name, (experts, overrides) in RECIPES.items()}
    shutil.rmtree(root)


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
    for task in realzoo.TASKS:
        got = _scores(realzoo.load_checkpoint(gemma_zoo / task.expert), tok, rows)
        assert got[task.name] >= 0.75, (task.name, got)


@pytest.mark.parametrize("name", EXACT)
def test_one_hot_weights_reproduce_each_expert(built, gemma_zoo, tok, name):
    """In float32 from the bf16 checkpoints on both sides (see tests/test_real.py), the expert loaded in float32 too:
    Gemma's embedding scale is made in the load dtype (sqrt(640), or 25.25 in bf16)."""
    model = AutoModelForCausalLM.from_pretrained(built[name], dtype=torch.float32)
    tasks = _experts(gemma_zoo, RECIPES[name][0])
    enc = _batch(tok, tasks)
    real = enc["attention_mask"].bool()
    for e, task in enumerate(tasks):
        expert = _reference(gemma_zoo, task, name in MERGED)
        with torch.no_grad():
            got = model(**enc, merge_weights=torch.nn.functional.one_hot(torch.tensor(e), len(tasks))).logits
            want = expert(**enc, position_ids=_positions(enc)).logits
        torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-3 * want.abs().max().item())


@pytest.mark.parametrize("name", list(RECIPES))
def test_training_free_routing_sends_held_out_prompts_to_their_expert(built, gemma_zoo, tok, name):
    model = AutoModelForCausalLM.from_pretrained(built[name])
    tasks = _experts(gemma_zoo, RECIPES[name][0])
    rows = _held_out(tasks, 4)
    enc = tok([r["prompt"] for r in rows], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        chosen = model(**enc, use_cache=False).merge_weights.argmax(-1)  # [B, R]
    right = torch.tensor([tasks.index(r["task"]) for r in rows]).unsqueeze(1)
    assert (chosen == right).float().mean() >= 0.9, name


@pytest.mark.parametrize("name", ["twin-block", "sparse-model"])
def test_the_cache_changes_nothing_across_sliding_window_layers(built, gemma_zoo, tok, name):
    model = AutoModelForCausalLM.from_pretrained(built[name])
    enc = _batch(tok, _experts(gemma_zoo, RECIPES[name][0]))
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id,
                             output_logits=True, return_dict_in_generate=True)
        cached = torch.stack(gen.logits, 1)
        new = gen.sequences[:, enc["input_ids"].shape[1]:]
        mask = torch.cat([enc["attention_mask"], torch.ones_like(new)], 1)
        prompt = torch.cat([enc["attention_mask"], torch.zeros_like(new)], 1)
        again = model(input_ids=gen.sequences, attention_mask=mask, routing_mask=prompt, use_cache=False).logits
    assert_close_in_bf16(cached, again[:, enc["input_ids"].shape[1] - 1: -1],
                         torch.ones(cached.shape[:2], dtype=torch.bool))


def test_a_stock_moe_of_gemma_is_refused_naming_the_dynamic_methods(gemma_zoo, tmp_path):
    with pytest.raises(CompatibilityError, match="transformers has no MoE architecture for a gemma3_text base"):
        assemble(MergeConfig.model_validate(realzoo.zoo_recipe(gemma_zoo, "lora")), tmp_path / "stock")
    assert not (tmp_path / "stock").exists()
