"""`assemble --dry-run` on 8 × Mistral-7B described by config, index and headers alone: no tensor data exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_merge.assemble.dryrun import dry_run
from moe_merge.cli import main as cli_main
from moe_merge.config import MergeConfig
from tests.conftest import write_recipe

MISTRAL_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=32768,
    rope_theta=10000.0,
    sliding_window=None,
    tie_word_embeddings=False,
    dtype="bfloat16",
)
# Mixtral-8x7B's parameter count: 8 Mistral-7B MLPs per layer, one router per layer, the rest once.
MIXTRAL_8X7B_PARAMS = 46_702_792_704


def fake_checkpoint(path: Path, shapes: dict[str, list[int]], config: dict, shards: int = 2) -> Path:
    """A sharded bf16 checkpoint whose files hold headers, then a hole as long as their data (sparse files: no disk
    is used, and every byte of tensor data reads as zero)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(
        json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"], **config})
    )
    names = list(shapes)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map, total = {}, 0
    for i, file in enumerate(files):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names[i::shards]:
            nbytes = 2 * torch.Size(shapes[name]).numel()
            header[name] = {"dtype": "BF16", "shape": shapes[name], "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        raw = json.dumps(header).encode()
        with open(path / file, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            f.truncate(8 + len(raw) + offset)
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    return path


@pytest.fixture(scope="module")
def seven_b(tmp_path_factory) -> dict:
    from transformers import MistralConfig, MistralForCausalLM

    with torch.device("meta"):
        model = MistralForCausalLM(MistralConfig(**MISTRAL_7B))
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    root = tmp_path_factory.mktemp("seven_b")
    base = fake_checkpoint(root / "base", shapes, MISTRAL_7B)
    experts = [fake_checkpoint(root / f"expert{i}", shapes, MISTRAL_7B) for i in range(8)]
    recipe = {
        "base_model": str(base),
        "experts": [{"source_model": str(p), "positive_prompts": [f"task {i} example"]} for i, p in enumerate(experts)],
    }
    return {"root": root, "recipe": recipe, "shapes": shapes}


def test_stock_plan_of_8x7b_reads_no_tensor_data(seven_b, tmp_path, capsys, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("the dry run opened a safetensors file to read tensor data")

    monkeypatch.setattr("moe_merge.sources.safe_open", no_data)
    recipe = {**seven_b["recipe"], "non_expert": "base"}  # mergekit-moe's plan: attention and norms from the base
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    assert cli_main(["assemble", str(path), str(tmp_path / "out"), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    assert "model.layers.*.block_sparse_moe.experts.*.w1.weight" in text
    assert "expert *: model.layers.*.mlp.gate_proj.weight" in text
    assert "router, `hidden` on the prompts" in text

    run = dry_run(MergeConfig.model_validate(recipe))
    assert run.output_bytes == 2 * MIXTRAL_8X7B_PARAMS  # bf16, exactly Mixtral-8x7B's size
    assert run.num_tensors == 3 + 32 * (
        6 + 8 * 3 + 1
    )  # embed, norm, head; per layer: attention + norms, experts, router
    assert run.num_shards == 18  # 87 GiB cut greedily into 5 GiB shards
    mlp = 3 * 4096 * 14336 * 2
    assert run.read_bytes == run.output_bytes - 32 * 8 * 4096 * 2  # every tensor read once; routers are computed
    # streamed: a shard, and one layer of 8 experts in bf16 with its float32 copies (13.5 GiB); never the whole model
    assert run.peak_parts["shard buffer"] == 5 * 2**30
    assert 8 * mlp * 5 < run.peak_parts["busiest step"] < 8 * mlp * 6
    assert run.peak_bytes < run.output_bytes / 4
    assert f"{run.num_tensors} tensors" in text and "estimated peak memory" in text


def test_dynamic_plan_of_8x7b(seven_b):
    static = dry_run(
        MergeConfig.model_validate(
            {**seven_b["recipe"], "method": "smear", "level": "ffn", "static": ["embeddings", "norms", "head"]}
        )
    )
    mlp_params = 3 * 4096 * 14336
    other = MIXTRAL_8X7B_PARAMS - 32 * (8 * mlp_params + 8 * 4096)
    routers = 32 * (8 * 4096 + 8 + 2 * 4096)  # per layer a linear router: weight, bias, input center and scale
    assert static.output_bytes == 2 * (other + 32 * 8 * mlp_params + routers)
    # by default full fine-tunes are taken to differ everywhere: 8 embedding tables, 8 heads, 8 gains per routed norm
    run = dry_run(MergeConfig.model_validate({**seven_b["recipe"], "method": "smear", "level": "ffn"}))
    assert run.output_bytes - static.output_bytes == 2 * 7 * (2 * 32000 * 4096 + (32 + 1) * 4096)
    assert "routed where the experts may differ: embeddings, norms, head" in run.title
    rows = {r.output: r for r in run.rows}
    assert rows["model.layers.*.mlp.gate_proj.expert_weight"].shape == (8, 14336, 4096)
    assert rows["model.layers.*.mlp.gate_proj.expert_weight"].source == "experts: model.layers.*.mlp.gate_proj.weight"
    assert rows["model.layers.*.self_attn.q_proj.weight"].source.startswith("average of the base and 8 experts")
    # streamed: a shard, then the busiest step: building the embeddings (8 tables stacked beside the base's and the
    # one being read, in float32: 4.9 GiB) outweighs one block (a layer of 8 experts' MLPs in bf16: 2.7 GiB)
    assert run.peak_parts["shard buffer"] == 5 * 2**30
    assert run.peak_parts["busiest step"] == 10 * 32000 * 4096 * 4
    assert run.peak_bytes < run.output_bytes / 8
