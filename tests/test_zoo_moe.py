"""The assembled zoo: exact one-hot reproduction (LoRA experts included) and routing quality."""

import pytest
import torch

from moe_merge import zoo
from moe_merge.assemble import assemble
from moe_merge.config import MergeConfig
from moe_merge.demo import evaluate
from tests.test_assemble import IDS, _logits


@pytest.fixture(scope="module")
def mlp_moes(zoo_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo-moe")
    out = {}
    for name, overrides in {"fit": {"router": {"init": "fit"}}, "hidden": {"gate_mode": "hidden"}}.items():
        recipe = zoo.zoo_recipe(zoo_dir, "mlp", experts_per_token=1, **overrides)
        out[name] = assemble(MergeConfig.model_validate(recipe), root / name)
    return out


def test_one_hot_routing_reproduces_full_and_lora_experts(zoo_dir, mlp_moes):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    manifest = zoo.zoo_recipe(zoo_dir, "mlp")["experts"]
    for i, expert in enumerate(manifest):
        path = expert["source_model"]
        if path.endswith("-lora"):
            # the merged weight is stored in float32, as the MoE stores it; then compared in float64
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo_dir / "base"), path)
            model = model.merge_and_unload().double()
            with torch.no_grad():
                want = model(input_ids=IDS).logits
        else:
            want = _logits(path, IDS)
        torch.testing.assert_close(_logits(mlp_moes["fit"], IDS, route_to=i), want, rtol=0, atol=1e-8)


def test_fitted_routers_beat_prompt_mean_directions(mlp_moes):
    fit, hidden = evaluate(mlp_moes["fit"]), evaluate(mlp_moes["hidden"])
    print("exact match, fit:", fit, "hidden:", hidden)
    mean = lambda s: sum(s.values()) / len(s)
    # measured here: fit 12-45 % per task (mean 25 %), hidden 0-3 %
    assert mean(fit) >= 0.15 and mean(fit) >= mean(hidden) + 0.10
    assert sum(fit[t] > hidden[t] for t in fit) >= len(fit) - 1


@pytest.fixture(scope="module")
def mlp_experts(zoo_dir) -> dict[str, float]:
    """Each MLP-only expert's exact match on its own task, measured here."""
    from moe_merge.tokens import load_tokenizer

    tok = load_tokenizer(zoo_dir / "base")
    experts = zoo.zoo_recipe(zoo_dir, "mlp")["experts"]
    return {e["name"]: zoo.scores(zoo.load_checkpoint(e["source_model"]), tok, [e["name"]])[e["name"]] for e in experts}


@pytest.mark.parametrize("method", ["smear", "wemoe"])
def test_training_free_ffn_merging_recovers_mlp_only_experts(zoo_dir, tmp_path, method, mlp_experts):
    """Goal: every FFN-level method reaches >= 95 % of the experts' accuracy on every task (MLP-only zoo),
    with nothing in the recipe but the method, the level and the experts' prompts."""
    recipe = zoo.zoo_recipe(zoo_dir, "mlp", method=method, level="ffn")
    scores = evaluate(assemble(MergeConfig.model_validate(recipe), tmp_path / method))
    for task, expert in mlp_experts.items():
        assert scores[task] >= 0.95 * expert, (task, scores, mlp_experts)
