"""What moe-merge writes, loaded by other clients: transformers 4.57.6 (the last 4.x) and llama.cpp (its own
converters, then llama-cpp-python), each compared with transformers 5 in float32 on the same token ids.

Each client lives in a virtual environment of its own that `.ci/clients` builds and names in
MOE_MERGE_CLIENT_ENVS; the drivers in tests/clients/ run there, without moe_merge, and answer in JSON files.
Without that variable every test here is skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moe_merge import zoo
from moe_merge.assemble import assemble
from moe_merge.config import MergeConfig
from moe_merge.export.bake import bake
from moe_merge.export.lora import export_lora
from moe_merge.tokens import load_tokenizer

ENVS = os.environ.get("MOE_MERGE_CLIENT_ENVS")
pytestmark = [
    pytest.mark.clients,
    pytest.mark.skipif(not ENVS, reason="needs the client environments: run .ci/clients"),
]

DRIVERS = Path(__file__).parent / "clients"
MAX_NEW_TOKENS = 16
LLAMA_CPP_ATOL = 1e-4  # float32 weights and KV cache in both, summed in another order
TF4_ATOL = 1e-4  # the same torch; 4.x loops over experts where 5.x batches them


def client(env: str, *args) -> None:
    """`python ARGS` in client environment `env`; a failure fails the test with its stderr."""
    python = Path(ENVS) / env / "bin" / "python"
    run = subprocess.run([str(python), *map(str, args)], capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        pytest.fail(f"{env}: python {' '.join(map(str, args))} exited {run.returncode}:\n{run.stderr[-4000:]}")


def drive(env: str, driver: str, request: dict, tmp_path: Path) -> dict:
    (tmp_path / "request.json").write_text(json.dumps(request))
    client(env, DRIVERS / driver, tmp_path / "request.json", tmp_path / "result.json")
    return json.loads((tmp_path / "result.json").read_text())


def convert(src: Path, out: Path, base: Path | None = None) -> None:
    """llama.cpp's own converter, to float32 GGUF: a checkpoint, or with `base` a PEFT adapter on it."""
    script = Path(ENVS) / "llama" / "llama.cpp" / ("convert_lora_to_gguf.py" if base else "convert_hf_to_gguf.py")
    client("llama", script, src, "--outfile", out, "--outtype", "f32", *(["--base", base] if base else []))


def with_sentencepiece(model_dir: Path) -> Path:
    """`model_dir` with the realistic zoo's SentencePiece tokenizer, the same ids, in place of the char-level one:
    llama.cpp's Llama converter reads `tokenizer.model` and refuses a tokenizer it does not know. (The Llama
    realistic zoo would ship it, but its `mlp/mirror` expert misses its training target.)"""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model_dir / name).unlink(missing_ok=True)
    zoo._save_tokenizer(zoo.build_sentencepiece_tokenizer(), model_dir)
    return model_dir


def prompts(model_dir: Path) -> tuple[list[str], list[list[int]]]:
    """One held-out prompt per expert task, and its ids from the tokenizer shipped in `model_dir`."""
    texts = [zoo.prompt(t, zoo.task_prompts(t)["eval_words"][0]) for t in zoo.EXPERT_TASKS]
    tok = load_tokenizer(model_dir)
    return texts, [tok(t).input_ids for t in texts]


@torch.no_grad()
def reference(model, ids: list[list[int]]) -> list[dict]:
    """transformers 5's greedy tokens and the logits that chose them, one prompt at a time (no padding)."""
    out = []
    for row in ids:
        gen = model.generate(
            torch.tensor([row]),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            eos_token_id=zoo.EOS_ID,
            pad_token_id=zoo.EOS_ID,
            output_logits=True,
            return_dict_in_generate=True,
        )
        out.append({"tokens": gen.sequences[0, len(row) :].tolist(), "logits": torch.cat(gen.logits)})
    return out


def compare(got: list[dict], want: list[dict], atol: float, note: str = "") -> float:
    """Assert the same greedy tokens for every prompt and logits within `atol` at every step; return the largest
    difference (over the steps both ran, so a mismatch says by how much)."""
    worst = 0.0
    for g, w in zip(got, want):
        n = min(len(g["tokens"]), len(w["tokens"]))
        worst = max(worst, (torch.tensor(g["logits"][:n]) - w["logits"][:n]).abs().max().item())
    assert [g["tokens"] for g in got] == [w["tokens"] for w in want], (
        f"greedy tokens differ (max |Δlogit| {worst:.3g}){note}"
    )
    assert worst <= atol, f"max |Δlogit| {worst:.3g} > {atol}"
    return worst


def _assemble(recipe: dict, out: Path) -> Path:
    return assemble(MergeConfig.model_validate(recipe), out)


# ----------------------------------------------------------------------------- transformers 4.57.6

EXPERT = re.compile(r"(model\.layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight")
PROJ = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def as_transformers_5(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A 4.x MoE state dict (one tensor per expert and projection) in 5.x's layout: per layer,
    `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows, then up) and `mlp.experts.down_proj` [E, H, I]."""
    out, experts = {}, {}
    for name, t in state.items():
        if m := EXPERT.fullmatch(name):
            experts.setdefault(m[1], {}).setdefault(int(m[2]), {})[PROJ[m[3]]] = t
        else:
            out[name.replace(".block_sparse_moe.", ".mlp.")] = t
    for layer, by_expert in experts.items():
        ordered = [by_expert[e] for e in sorted(by_expert)]
        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([p["gate"], p["up"]]) for p in ordered])
        out[f"{layer}.mlp.experts.down_proj"] = torch.stack([p["down"] for p in ordered])
    return out


TF4_CASES = {  # name -> (zoo fixture, shared expert, class): stock recipes (`sparse`, `ffn`) of the mlp variant
    "mixtral": ("zoo_dir", False, "MixtralForCausalLM"),
    "qwen3-moe": ("realistic_zoo", False, "Qwen3MoeForCausalLM"),  # no pad token, tied, bf16
    "qwen2-moe-shared": ("zoo_dir", True, "Qwen2MoeForCausalLM"),  # a shared expert makes a Llama base's a Qwen2-MoE
}


@pytest.mark.parametrize("name", list(TF4_CASES))
def test_transformers_4_loads_the_stock_moe_as_transformers_5_does(name, request, tmp_path):
    fixture, shared, cls = TF4_CASES[name]
    recipe = zoo.zoo_recipe(request.getfixturevalue(fixture), "mlp", gate_mode="hidden", experts_per_token=2)
    if shared:
        recipe["shared_experts"] = [{"source_model": recipe["base_model"]}]
    out = _assemble(recipe, tmp_path / "moe")
    _, ids = prompts(out)
    got = drive(
        "tf4",
        "tf4_generate.py",
        {
            "model": str(out),
            "prompts": ids,
            "max_new_tokens": MAX_NEW_TOKENS,
            "eos_token_id": zoo.EOS_ID,
            "state_dict": str(tmp_path / "tf4.safetensors"),
        },
        tmp_path,
    )
    assert (got["transformers"], got["class"]) == ("4.57.6", cls)
    assert not any(got["loading_info"].values()), got["loading_info"]  # nothing missing, unexpected or misshapen

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    want = model.state_dict()
    have = as_transformers_5(load_file(tmp_path / "tf4.safetensors"))
    assert sorted(have) == sorted(want)
    assert [k for k in want if not torch.equal(have[k], want[k])] == []
    theta = model.config.rope_parameters["rope_theta"]
    worst = compare(
        got["generations"],
        reference(model, ids),
        TF4_ATOL,
        note=f"; rope theta: 4.x read {got['rope_theta']}, 5.x {theta}",
    )
    assert got["rope_theta"] == theta, "4.x runs another rotary embedding than the one config.json means"
    print(f"{name}: {cls} in 4.57.6, {len(want)} tensors equal, tokens equal, max |Δlogit| {worst:.2e}")


# ----------------------------------------------------------------------------- llama.cpp


def run_llama_cpp(gguf: Path, ids: list[list[int]], texts: list[str], tmp_path: Path, lora: Path | None = None) -> dict:
    return drive(
        "llama",
        "llama_generate.py",
        {
            "model": str(gguf),
            "lora": str(lora) if lora else None,
            "prompts": ids,
            "texts": texts,
            "max_new_tokens": MAX_NEW_TOKENS,
            "eos_token_id": zoo.EOS_ID,
        },
        tmp_path,
    )


@pytest.mark.parametrize("n_experts", [4, 3])  # odd counts were reported to break llama.cpp (mergekit's tracker)
def test_llama_cpp_runs_the_stock_mixtral(zoo_dir, n_experts, tmp_path):
    recipe = zoo.zoo_recipe(zoo_dir, "mlp", gate_mode="hidden", experts_per_token=2)
    recipe["experts"] = recipe["experts"][:n_experts]
    out = _assemble(recipe, tmp_path / "moe")
    texts, ids = prompts(out)
    convert(with_sentencepiece(out), tmp_path / "moe.gguf")
    got = run_llama_cpp(tmp_path / "moe.gguf", ids, texts, tmp_path)
    meta = got["metadata"]
    assert (meta["general.architecture"], meta["llama.expert_count"], meta["llama.expert_used_count"]) == (
        "llama",
        str(n_experts),
        "2",
    )
    assert got["tokenized"] == ids  # llama.cpp's SentencePiece tokenizer reads the text as transformers does
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    worst = compare(got["generations"], reference(model, ids), LLAMA_CPP_ATOL)
    print(f"Mixtral, {n_experts} experts: tokens equal, max |Δlogit| {worst:.2e}")


@pytest.fixture(scope="module")
def smear(zoo_dir, tmp_path_factory) -> Path:
    """A dynamic model (SMEAR at FFN level) over the zoo's MLP experts, full fine-tunes and LoRA adapters."""
    recipe = zoo.zoo_recipe(zoo_dir, "mlp", method="smear", level="ffn")
    return _assemble(recipe, tmp_path_factory.mktemp("smear") / "smear")


def test_llama_cpp_runs_a_baked_dense_model(smear, tmp_path):
    baked = bake(smear, tmp_path / "baked", weights=[0.1, 0.6, 0.0, 0.3, 0.0])
    texts, ids = prompts(baked)
    convert(with_sentencepiece(baked), tmp_path / "baked.gguf")
    got = run_llama_cpp(tmp_path / "baked.gguf", ids, texts, tmp_path)
    assert got["tokenized"] == ids
    model = AutoModelForCausalLM.from_pretrained(baked, dtype=torch.float32).eval()
    worst = compare(got["generations"], reference(model, ids), LLAMA_CPP_ATOL)
    print(f"baked dense Llama: tokens equal, max |Δlogit| {worst:.2e}")


def test_llama_cpp_applies_an_export_lora_adapter(zoo_dir, smear, tmp_path):
    from peft import PeftModel

    adapter = export_lora(smear, tmp_path / "lora", weights=[0.0, 0.7, 0.0, 0.0, 0.3])  # mirror (full) + swap (LoRA)
    base = zoo_dir / "base"
    texts, ids = prompts(base)
    shutil.copytree(base, tmp_path / "base")
    convert(with_sentencepiece(tmp_path / "base"), tmp_path / "base.gguf")
    convert(adapter, tmp_path / "lora.gguf", base=tmp_path / "base")
    got = run_llama_cpp(tmp_path / "base.gguf", ids, texts, tmp_path, lora=tmp_path / "lora.gguf")
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    without = reference(plain, ids)
    peft = PeftModel.from_pretrained(plain, adapter).eval()
    want = reference(peft, ids)
    assert [w["tokens"] for w in want] != [w["tokens"] for w in without]  # the adapter changes what the base says
    worst = compare(got["generations"], want, LLAMA_CPP_ATOL)
    rank = json.loads((adapter / "adapter_config.json").read_text())["r"]
    print(f"export-lora adapter (rank {rank}) on the base: tokens equal, max |Δlogit| {worst:.2e}")
