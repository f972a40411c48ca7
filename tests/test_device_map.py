"""`device_map="auto"` through accelerate: a dynamic model split between CPU and disk offload computes the same."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moe_merge.assemble.dynamic import build_model, save_model
from moe_merge.config import MergeConfig
from moe_merge.recipe import open_recipe
from moe_merge.zoo import zoo_recipe


@pytest.mark.parametrize("method, level", [("smear", "ffn"), ("twin", "ffn"), ("sparse", "model")])
@torch.no_grad()
def test_offloaded_model_equals_the_plain_load(zoo_dir, tmp_path, method, level):
    recipe = zoo_recipe(zoo_dir, "mlp", method=method, level=level)
    recipe["experts"] = recipe["experts"][:3]
    model = build_model(open_recipe(MergeConfig.model_validate(recipe)), seed=0)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    save_model(model, tmp_path / "model")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    split = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model",
        device_map="auto",
        max_memory={"cpu": size * 3 // 5},
        offload_folder=str(tmp_path / "offload"),
    )
    placed = split.hf_device_map
    assert set(placed.values()) == {"cpu", "disk"}, placed
    no_split = tuple(split._no_split_modules)
    for name in placed:  # decoder layers, sparse blocks and expert stacks stay whole
        assert not any(
            type(split.get_submodule(p)).__name__ in no_split
            for p in [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]
        ), name

    tok = AutoTokenizer.from_pretrained(zoo_dir / "base")
    enc = tok(["shift abc=", "mirror abcd="], return_tensors="pt", padding=True, padding_side="left")
    torch.testing.assert_close(split(**enc).logits, plain(**enc).logits, rtol=0, atol=0)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(split.generate(**enc, **kw), plain.generate(**enc, **kw))
