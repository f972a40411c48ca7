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
    assert config.gate_init == "hidden"  # hidden_avg is our masked mean
    assert config.experts[1].residual_scale == 0.5
    assert (config.level, config.method, config.static_method) == ("ffn", "sparse", "base")


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
    text = MERGEKIT_YAML.replace('["write code"]', '["write a poem"]').replace('    negative_prompts: ["write a poem"]\n', "")
    with pytest.raises(ConfigError, match="same positive and negative prompts"):
        load_config(_write(tmp_path, text))


def test_more_experts_per_token_than_experts_is_refused():
    with pytest.raises(ValueError, match="experts_per_token"):
        MergeConfig.model_validate({"base_model": "b", "experts_per_token": 3, "gate_mode": "random",
                                    "experts": [{"source_model": "a"}, {"source_model": "c"}]})


def test_block_level_makes_a_dynamic_model_and_sparse_ffn_keeps_stock_routers():
    config = MergeConfig.model_validate({"base_model": "b", "level": "block", "gate_mode": "random",
                                         "experts_per_token": 1, "experts": [{"source_model": "a"}]})
    assert config.dynamic and config.static_method == "average" and config.normalize == "topk"
    with pytest.raises(ValueError, match="stock Mixtral"):
        MergeConfig.model_validate({"base_model": "b", "gate_mode": "random", "router": {"granularity": "token"},
                                    "experts_per_token": 1, "experts": [{"source_model": "a"}]})


def test_prompt_free_gate_modes_need_no_prompts():
    config = MergeConfig.model_validate({"base_model": "b", "gate_mode": "uniform_random", "experts_per_token": 1,
                                         "experts": [{"source_model": "a"}, {"source_model": "c"}]})
    assert config.gate_init == "uniform"


def test_every_shipped_config_validates():
    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert configs, "configs/ has no YAML"
    for path in configs:
        load_config(path)


def _write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path
