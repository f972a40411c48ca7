"""`assemble --dry-run` on 8 × Mistral-7B described by config, index and headers (sparse files: their tensor data
reads as zeros), and on pico checkpoints, where it prints the plan `assemble` runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_merge.assemble import dryrun
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


def fake_checkpoint(
    path: Path, shapes: dict[str, list[int]], config: dict, shards: int = 2, marked: tuple[str, ...] = ()
) -> Path:
    """A sharded bf16 checkpoint whose files hold headers, then a hole as long as their data (sparse files: no disk
    is used, and every byte of tensor data reads as zero), but for the first entry of each tensor whose name holds
    one of `marked`: 1.0."""
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
            for name in names[i::shards]:
                if any(m in name for m in marked):
                    f.seek(8 + len(raw) + header[name]["data_offsets"][0])
                    f.write(torch.tensor([1.0], dtype=torch.bfloat16).view(torch.int16).numpy().tobytes())
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
    # the experts differ from the base in their embeddings, norms and head (and, unread, everywhere else)
    differ = ("embed_tokens", "norm", "lm_head")
    experts = [fake_checkpoint(root / f"expert{i}", shapes, MISTRAL_7B, marked=differ) for i in range(8)]
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
    # streamed: a shard, and one layer of 8 experts read back in float32 (5.5 GiB) for the prompts; never the whole
    # model
    assert run.peak_parts["shard buffer"] == 5 * 2**30
    assert 8 * mlp * 2 < run.peak_parts["busiest step"] < 8 * mlp * 2.2
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
    assert static.plan_read_bytes == 0  # nothing left to decide
    # where the experts differ, as assemble decides it: 8 embedding tables, 8 heads, 8 gains per routed norm
    run = dry_run(MergeConfig.model_validate({**seven_b["recipe"], "method": "smear", "level": "ffn"}))
    assert run.output_bytes - static.output_bytes == 2 * 7 * (2 * 32000 * 4096 + (32 + 1) * 4096)
    assert "also routed, where the experts differ: embeddings, norms, head" in run.title
    # to decide it, at most the base's and every expert's embeddings, head and routed norms (the final one and each
    # layer's post-attention norm) are read; here the first expert already differs
    assert run.plan_read_bytes == 9 * 2 * (2 * 32000 * 4096 + (32 + 1) * 4096)
    rows = {r.output: r for r in run.rows}
    assert rows["model.layers.*.mlp.gate_proj.expert_weight"].shape == (8, 14336, 4096)
    assert rows["model.layers.*.mlp.gate_proj.expert_weight"].source == "experts: model.layers.*.mlp.gate_proj.weight"
    assert rows["model.layers.*.self_attn.q_proj.weight"].source.startswith("average of the base and 8 experts")
    # streamed: a shard, then the busiest step: building the embeddings (8 tables stacked beside the base's and the
    # one being read, in float32: 4.9 GiB) outweighs one block (a layer of 8 experts' MLPs in bf16: 2.7 GiB)
    assert run.peak_parts["shard buffer"] == 5 * 2**30
    assert run.peak_parts["busiest step"] == 10 * 32000 * 4096 * 4
    assert run.peak_bytes < run.output_bytes / 8


@pytest.mark.parametrize(
    "kind, overrides",
    [
        ("mlp", {"method": "smear", "level": "ffn"}),  # experts equal the base outside their MLPs: nothing else routed
        ("all", {"method": "wemoe", "level": "block"}),
        ("linear", {"method": "twin", "twin": {"rank": 2}}),
        ("lora", {"method": "smear", "level": "block"}),
        ("mlp", {"method": "sparse", "level": "model", "dense_layers": 1}),
    ],
)
def test_the_dry_run_prints_the_plan_assemble_runs(sources, tmp_path, kind, overrides):
    """Every tensor the dry run lists, with its shape, is in the written model, and nothing else is."""
    from safetensors import safe_open

    from moe_merge.assemble import assemble
    from tests.conftest import prompts_for

    recipe = {
        "base_model": str(sources["base"]),
        "experts": [{"source_model": str(p), "positive_prompts": prompts_for(i)} for i, p in enumerate(sources[kind])],
        **overrides,
    }
    config = MergeConfig.model_validate(recipe)
    run = dry_run(config)
    out = assemble(config, tmp_path / "out")
    written = {}
    for file in out.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            written.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    planned = {}
    for name, shape in written.items():
        key = (dryrun._pattern(name), shape)
        planned[key] = planned.get(key, 0) + 1
    assert {(r.output, r.shape): r.count for r in run.rows} == planned
    assert run.output_bytes == sum(torch.Size(s).numel() for s in written.values()) * 4  # float32 pico checkpoints
