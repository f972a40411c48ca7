"""The method records: the recipe, the dynamic model, the plan and the exports all read them, so one record is
one method."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import AutoConfig

from moe_merge import methods
from moe_merge.assemble.dynamic import build_model, plan, plan_forms
from moe_merge.config import MergeConfig
from moe_merge.errors import ModelConfigError
from moe_merge.export.bake import baked_model
from moe_merge.merge import StaticSpec
from moe_merge.methods import DYNAMIC_PAIRS, LEVELS, METHODS, Method
from moe_merge.modeling import MoEMergeConfig
from moe_merge.recipe import open_recipe
from tests.conftest import pico_recipe
from tests.fixtures import pico_checkpoint


def test_a_recipe_names_a_registered_method_or_is_refused_with_the_choices(pico):
    for name in METHODS:
        assert MergeConfig.model_validate(pico_recipe(pico, method=name, level="block")).merging is METHODS[name]
    with pytest.raises(ValueError, match=r"`method: ties_routed` is not a merging method; choose one of sparse, smear"):
        MergeConfig.model_validate(pico_recipe(pico, method="ties_routed", level="block"))


def test_the_dynamic_pairs_are_every_method_and_level_a_recipe_accepts_as_a_dynamic_model(pico):
    """The demo, the real-model tests and benchmarks run `DYNAMIC_PAIRS`: a new record or level reaches them all."""
    accepted = []
    for level in LEVELS:
        for name in METHODS:
            try:
                cfg = MergeConfig.model_validate(pico_recipe(pico, method=name, level=level))
            except ValueError:
                continue
            if cfg.dynamic:
                accepted.append((name, level))
    assert sorted(accepted) == sorted(DYNAMIC_PAIRS) and len(set(DYNAMIC_PAIRS)) == len(DYNAMIC_PAIRS)
    assert ("sparse", "ffn") not in DYNAMIC_PAIRS and ("smear", "model") not in DYNAMIC_PAIRS


@pytest.mark.parametrize(
    "method, static, scale",
    [
        ("smear", "average", None),
        ("wemoe", "task_arithmetic", 0.3),
        ("twin", "task_arithmetic", None),
        ("sparse", "average", None),
    ],
)
def test_each_method_names_its_static_merge(pico, method, static, scale):
    cfg = MergeConfig.model_validate(pico_recipe(pico, method=method, level="block"))
    assert cfg.static_merge == StaticSpec(static, scale, 0.5, None)
    assert cfg.static_method == static


def test_a_stock_sparse_moe_averages_what_its_experts_do_not_route_unless_told_the_base(pico):
    assert MergeConfig.model_validate(pico_recipe(pico)).static_method == "average"
    assert MergeConfig.model_validate(pico_recipe(pico, non_expert="base")).static_method == "base"


def test_one_rule_refuses_in_the_recipe_and_in_the_model_config(pico):
    recipe = pico_recipe(pico, method="smear", router={"init": "uniform", "normalize": "none"})
    [problem] = METHODS["smear"].problems("ffn", "sequence", "none")
    with pytest.raises(ValueError, match="must sum to one"):
        MergeConfig.model_validate(recipe)
    text = AutoConfig.from_pretrained(pico["base"]).to_dict()
    with pytest.raises(ModelConfigError) as err:
        MoEMergeConfig(text_config=text, num_experts=3, method="smear", level="ffn", router_normalize="none")
    assert str(err.value) == problem


@pytest.mark.parametrize(
    "method, level, forms",
    [
        ("smear", "ffn", {"gate_proj": "full", "up_proj": "full", "down_proj": "full"}),
        ("wemoe", "ffn", {"gate_proj": "dense", "up_proj": "dense", "down_proj": "dense"}),
        ("twin", "ffn", {"gate_proj": "lowrank", "up_proj": "lowrank", "down_proj": "lowrank"}),
        ("sparse", "block", {}),
    ],
)
def test_each_method_holds_its_routed_projections_in_its_form(pico, method, level, forms):
    recipe = open_recipe(MergeConfig.model_validate(pico_recipe(pico, method=method, level=level)))
    assert plan_forms(recipe, [], tied=False)[0] == forms


def test_the_plan_names_every_tensor_the_model_has_and_nothing_else(pico, tmp_path):
    one_layer = pico_checkpoint(tmp_path / "one", layers=1)  # one router, yet per layer: model.layers.0.router
    experts = [pico_checkpoint(tmp_path / f"e{i}", seed=i + 1, base=one_layer, layers=1) for i in range(3)]
    small = {"base": one_layer, "experts": experts}
    for sources, method, level in (
        (pico, "smear", "block"),
        (pico, "wemoe", "ffn"),
        (pico, "twin", "block"),
        (pico, "sparse", "block"),
        (pico, "sparse", "model"),
        (small, "smear", "ffn"),
        (small, "sparse", "block"),
    ):
        recipe = open_recipe(MergeConfig.model_validate(pico_recipe(sources, method=method, level=level)))
        model = build_model(recipe, seed=0)
        planned = {p.name: p.shape for p in plan(recipe, model.config)}
        state = {
            k: tuple(v.shape)
            for k, v in model.state_dict().items()
            if k != "lm_head.weight" or not model.config.tie_word_embeddings
        }
        assert planned == state, (method, level)


@dataclass(frozen=True)
class TiesRouted(Method):
    """A method that is not shipped: a TIES merge with routed task vectors on top of it."""

    def static(self, recipe: StaticSpec, non_expert: str | None, settings: None) -> StaticSpec:
        return StaticSpec("ties", 1.0, recipe.density, None)


def test_a_new_method_is_one_record(pico, monkeypatch):
    """Registered in methods.METHODS alone, a method validates, builds, routes and bakes; nothing else knows its
    name."""
    record = TiesRouted("ties_routed", "ties + routed task vectors", form="dense", w0="static")
    monkeypatch.setitem(methods.METHODS, "ties_routed", record)
    cfg = MergeConfig.model_validate(pico_recipe(pico, method="ties_routed", level="block"))
    assert cfg.static_method == "ties"
    model = build_model(open_recipe(cfg), seed=0)
    assert model.config.method == "ties_routed" and set(model.config.delta_forms.values()) == {"dense"}
    w = torch.tensor([0.2, 0.5, 0.3])
    ids = torch.tensor([[1, 5, 9, 3, 2]])
    dense = baked_model(model, w)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, merge_weights=w).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
        # its W0 is the TIES merge, not the base
        base = build_model(
            open_recipe(MergeConfig.model_validate(pico_recipe(pico, method="wemoe", level="block"))), seed=0
        )
        assert not torch.equal(model.model.layers[0].mlp.gate_proj.weight, base.model.layers[0].mlp.gate_proj.weight)
