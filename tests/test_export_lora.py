"""`export-lora`: the adapter on the base equals the dynamic model under the same fixed mix."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from moe_merge.assemble.dynamic import build_model, save_model
from moe_merge.cli import main as cli_main
from moe_merge.config import MergeConfig
from moe_merge.errors import ConfigError
from moe_merge.export.lora import dense_factors, export_lora
from moe_merge.export.push import validate_folder
from moe_merge.recipe import open_recipe
from moe_merge.zoo import zoo_recipe

PROMPTS = ["shift abcdef=", "mirror abcde=", "back abcdefg="]  # equal lengths: no padding
# (name, variant, experts kept, recipe overrides): every merged-linear form and how it becomes a LoRA
CASES = [
    ("lowrank", "mlp", ["back", "swap"], {"method": "smear"}),  # LoRA experts: rank concatenation
    ("full", "mlp", ["shift", "mirror", "cipher"], {"method": "smear"}),  # SMEAR's expert weights: dense
    ("dense", "mlp", None, {"method": "wemoe"}),  # base + task vectors of full and LoRA experts
    ("twin", "mlp", ["shift", "back"], {"method": "twin", "twin": {"rank": 8}}),  # shared part (dense) + SVD factors
]


def _dynamic_dir(zoo_dir, tmp_path_factory, variant, keep, overrides):
    """A dynamic model of the zoo saved as `assemble` saves it (routers at their zero start: a fixed mix is forced)."""
    recipe = zoo_recipe(zoo_dir, variant, **{"level": "ffn", **overrides})
    if keep:
        recipe["experts"] = [e for e in recipe["experts"] if any(f"/{k}" in e["source_model"] for k in keep)]
    config = MergeConfig.model_validate(recipe)
    model = build_model(open_recipe(config), seed=0)
    out = tmp_path_factory.mktemp("dyn")
    save_model(model, out)
    (out / "moe-merge.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json")))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((zoo_dir / "base" / name).read_bytes())
    return out


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def dynamic_dir(request, zoo_dir, tmp_path_factory):
    _, variant, keep, overrides = request.param
    return _dynamic_dir(zoo_dir, tmp_path_factory, variant, keep, overrides)


def _peft(base_dir, adapters: dict):
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
    (first, path), *rest = adapters.items()
    model = PeftModel.from_pretrained(model, path, adapter_name=first, autocast_adapter_dtype=False)
    for name, path in rest:
        model.load_adapter(path, adapter_name=name, autocast_adapter_dtype=False)
    return model.eval()


@torch.no_grad()
def test_adapter_on_the_base_equals_the_dynamic_model(dynamic_dir, zoo_dir, tmp_path):
    """Two mixes exported, served side by side as multi-LoRA servers do (one adapter per row of a batch)."""
    dynamic = AutoModelForCausalLM.from_pretrained(dynamic_dir, dtype=torch.float64).eval()
    R, E = dynamic.config.num_routers, dynamic.config.num_experts
    g = torch.Generator().manual_seed(0)
    mixes = {
        "per_router": torch.randn(R, E, generator=g, dtype=torch.float64).softmax(-1),
        "one_hot": torch.nn.functional.one_hot(torch.tensor(E - 1), E).double(),
    }
    paths = {}
    for name, w in mixes.items():
        paths[name] = tmp_path / name
        export_lora(dynamic_dir, paths[name], weights=w, base=str(zoo_dir / "base"), dtype=torch.float64)
        config = json.loads((paths[name] / "adapter_config.json").read_text())
        with safe_open(paths[name] / "adapter_model.safetensors", framework="pt") as f:
            ranks = {f.get_slice(k).get_shape()[0] for k in f.keys() if "lora_A" in k}
        assert ranks == {config["r"]} and config["lora_alpha"] == config["r"]  # scaling 1 for every reader
        assert not config["rank_pattern"] and not config["alpha_pattern"]
        assert config["target_modules"] == sorted(config["target_modules"])  # not a set's order: one file per mix

    peft = _peft(zoo_dir / "base", paths)
    enc = AutoTokenizer.from_pretrained(zoo_dir / "base")(PROMPTS, return_tensors="pt")
    for name, w in mixes.items():
        want = dynamic(**enc, merge_weights=w.expand(R, E)[None].expand(len(PROMPTS), R, E)).logits
        peft.set_adapter(name)
        torch.testing.assert_close(peft(**enc).logits, want, rtol=0, atol=1e-10)
    # a mixed batch: row b uses adapter b's mix
    names = ["per_router", "one_hot", "per_router"]
    got = peft(**enc, adapter_names=names).logits
    want = dynamic(**enc, merge_weights=torch.stack([mixes[n].expand(R, E) for n in names])).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_cli_prompt_mix_in_float32(zoo_dir, tmp_path_factory, tmp_path, capsys):
    from peft import PeftModel

    from moe_merge.export.bake import weights_for_prompt

    model_dir = _dynamic_dir(zoo_dir, tmp_path_factory, "mlp", ["back", "swap"], {"method": "smear"})
    out = tmp_path / "adapter"
    args = ["export-lora", str(model_dir), str(out), "--prompt", "back hello="]
    assert cli_main(args) == 0  # the base comes from moe-merge.yaml
    assert cli_main(args) == 2 and "--force" in capsys.readouterr().err
    dynamic = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    w = weights_for_prompt(dynamic, tok, "back hello=")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo_dir / "base"), out).eval()
    enc = tok(PROMPTS, return_tensors="pt")
    with torch.no_grad():
        dynamic_logits = dynamic(**enc, merge_weights=w[None].expand(3, -1, -1), use_cache=False).logits
        torch.testing.assert_close(peft(**enc).logits, dynamic_logits, rtol=0, atol=1e-5)
    assert validate_folder(out) == "adapter"  # ready for `moe-merge push`


def test_what_a_lora_cannot_hold_is_refused_by_name(zoo_dir, tmp_path_factory, tmp_path):
    # full fine-tunes: the averaged embeddings differ from the base's
    model_dir = _dynamic_dir(zoo_dir, tmp_path_factory, "full", ["shift", "mirror"], {"method": "smear"})
    with pytest.raises(ConfigError, match="model.embed_tokens.weight differs .* `moe-merge bake`"):
        export_lora(model_dir, tmp_path / "a", weights=[0.5, 0.5], base=str(zoo_dir / "base"))
    model_dir = _dynamic_dir(
        zoo_dir, tmp_path_factory, "mlp", ["shift", "mirror"], {"method": "sparse", "level": "block"}
    )
    with pytest.raises(ConfigError, match="sparse"):
        export_lora(model_dir, tmp_path / "b", weights=[1.0, 0.0], base=str(zoo_dir / "base"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_dense_factors_are_exact():
    for shape in ((3, 5), (5, 3)):
        d = torch.randn(shape, dtype=torch.float64)
        A, B = dense_factors(d)
        assert A.shape[0] == min(shape) and torch.equal(B @ A, d)


def test_the_card_gives_a_max_lora_rank_vllm_accepts_or_says_to_bake(tmp_path):
    from moe_merge.export.card import VLLM_MAX_LORA_RANKS, vllm_max_lora_rank, write_adapter_card

    assert [vllm_max_lora_rank(r) for r in (1, 2, 16, 17, 320, 321, 512, 513)] == [1, 8, 16, 32, 320, 512, 512, None]
    for rank, says in ((24, "--max-lora-rank 32 "), (4096, "vLLM cannot serve this adapter: its rank, 4096")):
        write_adapter_card(
            tmp_path,
            base="base",
            hub_id=None,
            model_dir=tmp_path,
            expert_names=["a", "b"],
            weights=torch.tensor([0.5, 0.5]),
            rank=rank,
            modules=7,
        )
        card = (tmp_path / "README.md").read_text()
        assert says in card and ("moe-merge bake" in card) == (rank > max(VLLM_MAX_LORA_RANKS))


def test_cli_dtype_and_base_options(zoo_dir, tmp_path_factory, tmp_path, capsys):
    """`--dtype` writes the adapter's tensors in that dtype (bf16 here, the same adapter rounded); `--base`
    names the base in the adapter's config instead of the recipe's `base_model`, and is checked against the model."""
    model_dir = _dynamic_dir(zoo_dir, tmp_path_factory, "mlp", ["back", "swap"], {"method": "smear"})
    assert cli_main(["export-lora", str(model_dir), str(tmp_path / "f32"), "--weights", "1,0"]) == 0
    assert (
        cli_main(["export-lora", str(model_dir), str(tmp_path / "bf16"), "--weights", "1,0", "--dtype", "bfloat16"])
        == 0
    )
    with (
        safe_open(tmp_path / "f32" / "adapter_model.safetensors", "pt") as a,
        safe_open(tmp_path / "bf16" / "adapter_model.safetensors", "pt") as b,
    ):
        assert a.keys() == b.keys() and {a.get_tensor(k).dtype for k in a.keys()} == {torch.float32}
        for k in a.keys():
            assert b.get_tensor(k).dtype == torch.bfloat16 and torch.equal(b.get_tensor(k), a.get_tensor(k).bfloat16())
    import shutil

    other_base = shutil.copytree(zoo_dir / "base", tmp_path / "my-base")
    args = ["export-lora", str(model_dir), str(tmp_path / "based"), "--weights", "1,0", "--base", str(other_base)]
    assert cli_main(args) == 0
    config = json.loads((tmp_path / "based" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(other_base)
    wrong = [
        "export-lora",
        str(model_dir),
        str(tmp_path / "wrong"),
        "--weights",
        "1,0",
        "--base",
        str(zoo_dir / "search" / "alien"),
    ]
    assert cli_main(wrong) == 2 and not (tmp_path / "wrong").exists()
    assert "alien" in capsys.readouterr().err
