"""The recipe: mergekit-moe YAML accepted unchanged; errors name the field and the line."""

from pathlib import Path

import pytest

from moe_merge.config import MergeConfig, load_config
from moe_merge.errors import ConfigError

MERGEKIT_YAML = """\
base_model: some/base
gate_mode: hidden_avg
dtype: bfloat16
experts_per_token: 2
architecture: mixtral
experts:
  - source_model: some/expert-a
    positive_prompts: ["write code"]
    negative_prompts: ["write a poem"]
    noise_scale: 0.01
  - source_model: some/expert-b
    positive_prompts: ["write a poem"]
    residual_scale: 0.5
shared_experts: null
"""


def test_a_mergekit_moe_yaml_is_a_valid_recipe(tmp_path):
    config = load_config(_write(tmp_path, MERGEKIT_YAML))
    assert config.router_init == "hidden"  # hidden_avg is our masked mean
    assert config.experts[1].residual_scale == 0.5
    # what no expert routes is averaged over the experts, where mergekit-moe takes the base's (`non_expert: base`):
    # with LoRA experts the base's attention loses what the adapters learned there (docs/measured.md, "Measured on a real model")
    assert (config.level, config.method, config.static_method) == ("ffn", "sparse", "average")


def test_unknown_field_names_field_and_line(tmp_path):
    text = MERGEKIT_YAML.replace("    residual_scale: 0.5\n", "    residual_scale: 0.5\n    positve_prompts: [x]\n")
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, text))
    assert "`experts[1].positve_prompts` (line 14)" in str(e.value)
    assert "unknown field" in str(e.value)


def test_wrong_type_names_field_and_line(tmp_path):
    with pytest.raises(ConfigError, match=r"`experts_per_token` \(line 4\)"):
        load_config(_write(tmp_path, MERGEKIT_YAML.replace("experts_per_token: 2", "experts_per_token: two")))


def test_identical_prompts_for_all_experts_are_refused(tmp_path):
    text = MERGEKIT_YAML.replace('["write code"]', '["write a poem"]').replace(
        '    negative_prompts: ["write a poem"]\n', ""
    )
    with pytest.raises(ConfigError, match="same positive and negative prompts"):
        load_config(_write(tmp_path, text))


def test_more_experts_per_token_than_experts_is_refused():
    with pytest.raises(ValueError, match="experts_per_token"):
        MergeConfig.model_validate(
            {
                "base_model": "b",
                "experts_per_token": 3,
                "gate_mode": "random",
                "experts": [{"source_model": "a"}, {"source_model": "c"}],
            }
        )


@pytest.mark.parametrize("field", ["noise_scale", "residual_scale"])
def test_mergekits_expert_perturbations_are_for_stock_moes_only(field):
    """A dynamic model merges the experts' own weights: a perturbation it would not apply is refused, not dropped."""
    recipe = {
        "base_model": "b",
        "gate_mode": "random",
        "experts": [{"source_model": "a"}, {"source_model": "c", field: 0.5}],
    }
    assert getattr(MergeConfig.model_validate(recipe).experts[1], field) == 0.5  # a stock Mixtral applies it
    with pytest.raises(ValueError, match=rf"`experts\[1\]\.{field}` .* a dynamic model \(`method: smear`"):
        MergeConfig.model_validate({**recipe, "method": "smear", "router": {"init": "random"}})


def test_router_settings_left_auto_take_the_routers_defaults():
    """`router.calibrate` and `router.ridge` default to `auto`: one table (config.ROUTER_DEFAULTS) by the router,
    whatever was written; a value given is kept on either path."""
    from moe_merge.config import ROUTER_DEFAULTS

    recipe = {"base_model": "b", "gate_mode": "random", "experts": [{"source_model": "a"}, {"source_model": "c"}]}
    for extra, kind in (({}, "stock"), ({"method": "smear"}, "dynamic")):
        cfg = MergeConfig.model_validate({**recipe, **extra})
        assert (cfg.calibration_target, cfg.ridge) == tuple(ROUTER_DEFAULTS[kind][k] for k in ("calibrate", "ridge"))
        given = MergeConfig.model_validate(
            {**recipe, **extra, "router": {"init": "random", "calibrate": 0.7, "ridge": 0.5}}
        )
        assert (given.calibration_target, given.ridge) == (0.7, 0.5)
        off = MergeConfig.model_validate({**recipe, **extra, "router": {"init": "random", "calibrate": None}})
        assert off.calibration_target is None


def test_block_level_makes_a_dynamic_model_and_sparse_ffn_keeps_stock_routers():
    config = MergeConfig.model_validate(
        {
            "base_model": "b",
            "level": "block",
            "gate_mode": "random",
            "experts_per_token": 1,
            "experts": [{"source_model": "a"}],
        }
    )
    assert config.dynamic and config.static_method == "average" and config.normalize == "topk"
    with pytest.raises(ValueError, match="stock Mixtral"):
        MergeConfig.model_validate(
            {
                "base_model": "b",
                "gate_mode": "random",
                "router": {"granularity": "token"},
                "experts_per_token": 1,
                "experts": [{"source_model": "a"}],
            }
        )


def test_prompt_free_gate_modes_need_no_prompts():
    config = MergeConfig.model_validate(
        {
            "base_model": "b",
            "gate_mode": "uniform_random",
            "experts_per_token": 1,
            "experts": [{"source_model": "a"}, {"source_model": "c"}],
        }
    )
    assert config.router_init == "uniform"


def _twin(**twin) -> MergeConfig:
    return MergeConfig.model_validate(
        {
            "base_model": "b",
            "method": "twin",
            "gate_mode": "random",
            "experts_per_token": 1,
            "twin": twin,
            "experts": [{"source_model": "a"}, {"source_model": "c"}],
        }
    )


def test_twin_rank_is_a_count_and_rank_fraction_a_share():
    assert _twin(rank=1).twin.rank_for(192, 64) == 1
    assert _twin(rank=1000).twin.rank_for(192, 64) == 64  # capped at min(out, in)
    assert _twin(rank_fraction=1.0).twin.rank_for(192, 64) == 64  # full rank: exact
    assert _twin().twin.rank_for(192, 64) == 32  # the default, a half
    assert _twin().resolved()["twin"] == {**_twin().resolved()["twin"], "rank": None, "rank_fraction": 0.5}
    assert MergeConfig.model_validate(_twin(rank=8).resolved()).twin.rank == 8  # the resolved recipe loads back


@pytest.mark.parametrize(
    "twin, message",
    [
        ({"rank": 1.0}, "whole number of singular vectors .* `rank_fraction: 1.0`"),
        ({"rank": 0.5}, "`rank_fraction: 0.5`"),
        ({"rank": 8, "rank_fraction": 0.5}, "not both"),
        ({"rank_fraction": 1.5}, "less than or equal to 1"),
    ],
)
def test_ambiguous_twin_ranks_are_refused(twin, message):
    with pytest.raises(ValueError, match=message):
        _twin(**twin)


@pytest.mark.parametrize("method", ["smear", "sparse"])
def test_averaging_methods_refuse_raw_merge_weights(method):
    """SMEAR's Σ w_e θ_e with weights that sum to 2 is twice the model; WEMoE's base + Σ w_e τ_e is task arithmetic."""
    recipe = {
        "base_model": "b",
        "method": method,
        "level": "block",
        "gate_mode": "random",
        "experts_per_token": 1,
        "router": {"init": "random", "normalize": "none"},
        "experts": [{"source_model": "a"}, {"source_model": "c"}],
    }
    with pytest.raises(ValueError, match="must sum to one: `router.normalize` must be softmax or topk"):
        MergeConfig.model_validate(recipe)
    assert MergeConfig.model_validate({**recipe, "method": "wemoe"}).normalize == "none"


def test_every_shipped_config_validates():
    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert configs, "configs/ has no YAML"
    for path in configs:
        load_config(path)


def _write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_a_too_narrow_mlp_router_is_a_recipe_error(tmp_path):
    from tests.conftest import write_recipe

    path = write_recipe(
        tmp_path / "r.yaml",
        {
            "base_model": "b",
            "method": "smear",
            "router": {"kind": "mlp", "hidden_size": 4, "init": "uniform"},
            "experts": [{"source_model": f"e{i}"} for i in range(3)],
        },
    )
    with pytest.raises(ConfigError, match=r"`router.hidden_size: 4` is too narrow for 3 experts.*2 x experts = 6"):
        load_config(path)


@pytest.mark.slow
def test_every_shipped_config_assembles_on_the_tiny_zoo_and_generates(zoo_dir, tmp_path):
    """configs/ as a user runs it after `moe-merge zoo zoo`: each recipe (its sources at ../zoo) assembles through
    the command line and loads back as a model that generates."""
    import shutil

    from transformers import AutoModelForCausalLM

    from moe_merge.cli import main as cli_main
    from moe_merge.tokens import load_tokenizer

    shutil.copytree(Path(__file__).parent.parent / "configs", tmp_path / "configs")
    (tmp_path / "zoo").symlink_to(zoo_dir)
    for path in sorted((tmp_path / "configs").glob("*.yaml")):
        out = tmp_path / "out" / path.stem
        assert cli_main(["assemble", str(path), str(out)]) == 0, path.name
        model, tok = AutoModelForCausalLM.from_pretrained(out), load_tokenizer(out)
        enc = tok(["shift abcd="], return_tensors="pt")
        new = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
        assert new.shape[1] > enc["input_ids"].shape[1] and (out / "routing_report.json").is_file(), path.name
