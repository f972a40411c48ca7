"""The checkpoints users really bring: no pad token, tied input and output embeddings, bf16 weights.

Every verb runs on the realistic zoo (a Qwen3 base with all three traits). Comparisons are made in
bf16, as the model ships, so they hold to a bf16 tolerance: most positions agree to the bit, and the
greedy next token agrees almost everywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import moe_merge.modeling  # noqa: F401  registers the dynamic model
from moe_merge import zoo
from moe_merge.assemble import assemble
from moe_merge.cli import main as cli_main
from moe_merge.config import MergeConfig, load_config
from moe_merge.tokens import load_tokenizer

RECIPES = {  # name -> (zoo variant, recipe overrides): recipes where one-hot routing is each expert
    "stock": ("mlp", {"router": {"init": "fit"}, "experts_per_token": 1}),
    "smear-ffn": ("mlp", {"method": "smear", "level": "ffn"}),
    "twin-ffn": ("mlp", {"method": "twin", "level": "ffn", "twin": {"rank_fraction": 1.0}}),
    "wemoe-block": ("mlp", {"method": "wemoe", "level": "block"}),
    "sparse-model": ("mlp", {"method": "sparse", "level": "model"}),
    # full fine-tunes: the tied embedding table (= head), every norm, q/k norms included, routed
    "smear-block-full": ("full", {"method": "smear", "level": "block"}),
}
DYNAMIC = [name for name in RECIPES if name != "stock"]
TOL = 1e-4  # float32 results of the same function computed in another order (logits of order 10)


@pytest.fixture(scope="module")
def built(realistic_zoo, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("realistic")
    return {
        name: assemble(MergeConfig.model_validate(zoo.zoo_recipe(realistic_zoo, variant, **overrides)), root / name)
        for name, (variant, overrides) in RECIPES.items()
    }


@pytest.fixture(scope="module")
def batch(realistic_zoo):
    """Left-padded prompts of every task (the tokenizer gets a pad token in memory only)."""
    tok = load_tokenizer(realistic_zoo / "base")
    prompts = [zoo.prompt(t, zoo.task_prompts(t)["eval_words"][i]) for i in range(3) for t in zoo.EXPERT_TASKS]
    return tok, prompts, tok(prompts, return_tensors="pt", padding=True, padding_side="left")


def close_in_bf16(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether logits are two bf16 computations of the same function: a small mean error, and the same greedy
    token wherever the choice is not a near-tie (inside a prompt of random letters the next letter is a guess)."""
    got, want = got.float()[mask], want.float()[mask]
    top2 = want.topk(2, dim=-1).values
    clear = top2[:, 0] - top2[:, 1] > 0.25
    assert clear.float().mean() > 0.3, "too few clear positions to compare"
    return bool(
        (got - want).abs().mean() <= 0.03 * want.abs().mean()
        and (got.argmax(-1) == want.argmax(-1))[clear].float().mean() >= 0.99
    )


def assert_close_in_bf16(
    got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor, other: torch.Tensor | None = None
) -> None:
    """`got` is `want` to bf16 precision; given `other`, another mix's logits, the check must also tell them
    apart: a tolerance that passed a wrong mix would fail there."""
    assert close_in_bf16(got, want, mask)
    if other is not None:
        assert not close_in_bf16(got, other, mask), "the check cannot tell this mix from another"


def test_outputs_ship_in_bf16_with_float32_routers_and_the_tokenizer_untouched(built, realistic_zoo):
    """A stock MoE's router computes in the model's dtype in every engine, so it ships in it; ours are float32."""
    for name, out in built.items():
        with safe_open(out / ("model.safetensors"), "pt") as f:
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        routers = {k for k in dtypes if ".router." in k or k.endswith(".gate.weight")}
        assert routers and {dtypes[k] for k in routers} == {"BF16" if name == "stock" else "F32"}, name
        assert {v for k, v in dtypes.items() if k not in routers} == {"BF16"}, name
        assert json.loads((out / "config.json").read_text()).get("tie_word_embeddings", True) is True, name
        for f in ("tokenizer.json", "tokenizer_config.json"):  # no pad token written into the user's files
            assert (out / f).read_bytes() == (realistic_zoo / "base" / f).read_bytes(), (name, f)


@pytest.mark.parametrize("name", DYNAMIC)
def test_loaded_in_bf16_the_routers_and_merge_weights_stay_float32(built, batch, name):
    model = AutoModelForCausalLM.from_pretrained(built[name])
    assert model.dtype == torch.bfloat16
    assert {p.dtype for n, p in model.named_parameters() if ".router." in n or n.startswith("model.router.")} == {
        torch.float32
    }
    model.to(torch.float16)  # a later cast moves the routers but does not narrow them
    assert {p.dtype for n, p in model.named_parameters() if "router." in n} == {torch.float32}
    model.to(torch.bfloat16)
    with torch.no_grad():
        out = model(**batch[2])
    assert out.merge_weights.dtype == out.router_logits.dtype == torch.float32


def assert_the_report_is_the_models(out: Path) -> None:
    """Where router k sends expert i's held-out prompts (its mean merge weights over them), computed here from the
    saved bf16 model's own output on the recipe's prompts, one left-padded batch as the report runs them."""
    model = AutoModelForCausalLM.from_pretrained(out)
    config = load_config(out / "moe-merge.yaml")
    prompts = [e.eval_prompts if e.eval_prompts is not None else e.positive_prompts for e in config.experts]
    enc = load_tokenizer(out)([p for ps in prompts for p in ps], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        w = model(**enc).merge_weights  # [B, R, E]: these recipes route once per sequence
    report = json.loads((out / "routing_report.json").read_text())
    assert len(report["routers"]) == w.shape[1] and report["measured"] is not False
    for k, router in enumerate(report["routers"]):
        for i, mine in enumerate(w[:, k].split([len(ps) for ps in prompts])):
            assert router["sent_to"][i] == pytest.approx(mine.mean(0).tolist(), abs=1e-6), (out.name, k, i)


@pytest.mark.parametrize("name", DYNAMIC)
def test_the_routing_report_is_measured_on_the_model_as_shipped(built, name):
    assert_the_report_is_the_models(built[name])


@pytest.mark.parametrize("name", DYNAMIC)
def test_one_hot_weights_reproduce_each_expert(built, batch, realistic_zoo, name):
    model = AutoModelForCausalLM.from_pretrained(built[name])
    _, _, enc = batch
    positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    real = enc["attention_mask"].bool()
    experts = zoo.zoo_recipe(realistic_zoo, RECIPES[name][0])["experts"]
    with torch.no_grad():
        wants = [zoo.load_checkpoint(x["source_model"])(**enc, position_ids=positions).logits for x in experts]
        for e in range(len(experts)):
            got = model(**enc, merge_weights=torch.nn.functional.one_hot(torch.tensor(e), 5)).logits
            assert_close_in_bf16(got, wants[e], real, other=wants[(e + 1) % len(experts)])


def test_stock_one_hot_routing_reproduces_each_expert(built, batch, realistic_zoo):
    model = AutoModelForCausalLM.from_pretrained(built["stock"], experts_implementation="eager")
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and model.dtype == torch.bfloat16
    _, _, enc = batch
    positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    real = enc["attention_mask"].bool()
    experts = zoo.zoo_recipe(realistic_zoo, "mlp")["experts"]
    with torch.no_grad():
        wants = [zoo.load_checkpoint(x["source_model"])(**enc, position_ids=positions).logits for x in experts]
    for e in range(len(experts)):

        def one_hot(_m, _a, out, e=e):
            n = out[0].shape[0]
            return out[0], torch.ones(n, 1, dtype=out[1].dtype), torch.full((n, 1), e)

        hooks = [layer.mlp.gate.register_forward_hook(one_hot) for layer in model.model.layers]
        with torch.no_grad():
            got = model(**enc, position_ids=positions).logits
        for h in hooks:
            h.remove()
        assert_close_in_bf16(got, wants[e], real, other=wants[(e + 1) % len(experts)])


@pytest.mark.parametrize("name", DYNAMIC)
def test_cache_and_left_padding_change_nothing(built, batch, name):
    """Each generated step's logits, with the cache, against one forward pass over the whole sequence without it;
    a left-padded batch against each prompt alone. In float32 (the shipped bf16 weights, widened): in bf16 a cached
    step and a recomputed one round differently, by more than a wrong mix of near-equal experts would move them."""
    model = AutoModelForCausalLM.from_pretrained(built[name], dtype=torch.float32)
    tok, prompts, enc = batch
    with torch.no_grad():
        gen = model.generate(
            **enc,
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        cached = torch.stack(gen.logits, 1)  # [B, 8, V]
        new = gen.sequences[:, enc["input_ids"].shape[1] :]
        mask = torch.cat([enc["attention_mask"], torch.ones_like(new)], 1)
        prompt = torch.cat([enc["attention_mask"], torch.zeros_like(new)], 1)  # what the routers read at prefill
        recomputed = model(input_ids=gen.sequences, attention_mask=mask, routing_mask=prompt, use_cache=False).logits
        recomputed = recomputed[:, enc["input_ids"].shape[1] - 1 : -1]
        torch.testing.assert_close(cached, recomputed, rtol=0, atol=TOL)
        out = model(**enc)
        alone = [model(**tok([p], return_tensors="pt")) for p in prompts]
    torch.testing.assert_close(out.logits[:, -1], torch.cat([a.logits[:, -1] for a in alone]), rtol=0, atol=TOL)
    torch.testing.assert_close(out.merge_weights, torch.cat([a.merge_weights for a in alone]), rtol=0, atol=TOL)


def test_a_routed_tied_head_is_the_embedding_table_on_disk_and_in_memory(built, batch, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(built["smear-block-full"])
    assert model.config.routed_parts == ["embeddings", "norms", "head"]
    assert model.lm_head.expert_weight is model.model.embed_tokens.table.expert_weight
    with safe_open(built["smear-block-full"] / "model.safetensors", "pt") as f:
        assert not any(k.startswith("lm_head.") for k in f.keys())
    # one-hot weights give the same table to the embeddings and the head: the baked model stays tied
    assert cli_main(["bake", str(built["smear-block-full"]), str(tmp_path / "b"), "--weights", "0,1,0,0,0"]) == 0
    baked, info = AutoModelForCausalLM.from_pretrained(tmp_path / "b", output_loading_info=True)
    assert not any(info.values()) and baked.config.tie_word_embeddings


def test_model_level_heads_are_each_experts_tied_embedding(built, realistic_zoo):
    model = AutoModelForCausalLM.from_pretrained(built["sparse-model"])
    params = dict(model.named_parameters(remove_duplicate=False))
    assert all(k in params and v in params for k, v in model.all_tied_weights_keys.items())
    for e, expert in enumerate(zoo.zoo_recipe(realistic_zoo, "mlp")["experts"]):
        want = zoo.load_checkpoint(expert["source_model"]).get_input_embeddings().weight
        assert torch.equal(model.model.experts[e].lm_head.weight, want)


def test_generate_from_the_command_line(built, capsys):
    assert cli_main(["generate", str(built["smear-ffn"]), "shift abcd=", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "bcde" and out[2].split()[:3] == ["merge", "weights", "1.000"]  # routed to shift
    assert cli_main(["generate", str(built["stock"]), "shift abcd=", "--max-new-tokens", "6"]) == 0
    assert len(capsys.readouterr().out.splitlines()[0]) == 4  # per-token top-1 routing: an answer, not always right


def test_bake_writes_a_strict_tied_bf16_model_equal_to_the_mix(built, batch, tmp_path):
    tok, _, enc = batch
    mix = [0.0, 0.0, 1.0, 0.0, 0.0]
    assert (
        cli_main(["bake", str(built["smear-ffn"]), str(tmp_path / "baked"), "--weights", ",".join(map(str, mix))]) == 0
    )
    baked, info = AutoModelForCausalLM.from_pretrained(tmp_path / "baked", output_loading_info=True)
    assert not any(info.values()) and baked.dtype == torch.bfloat16 and baked.config.tie_word_embeddings
    dynamic = AutoModelForCausalLM.from_pretrained(built["smear-ffn"])
    positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = dynamic(**enc, merge_weights=torch.tensor(mix)).logits
        other = dynamic(**enc, merge_weights=torch.tensor([1.0, 0, 0, 0, 0])).logits
        got = baked(**enc, position_ids=positions).logits
    assert_close_in_bf16(got, want, enc["attention_mask"].bool(), other)
    # at model level the expert's head is its own embedding, not the merged one: the dense model is untied
    assert cli_main(["bake", str(built["sparse-model"]), str(tmp_path / "expert"), "--weights", "0,1,0,0,0"]) == 0
    expert = AutoModelForCausalLM.from_pretrained(tmp_path / "expert")
    dynamic = AutoModelForCausalLM.from_pretrained(built["sparse-model"])
    with torch.no_grad():
        want = dynamic(**enc, merge_weights=torch.tensor([0.0, 1, 0, 0, 0])).logits
        other = dynamic(**enc, merge_weights=torch.tensor([0.0, 0, 1, 0, 0])).logits
        got = expert(**enc, position_ids=positions).logits
    assert_close_in_bf16(got, want, enc["attention_mask"].bool(), other)


def test_export_lora_on_the_tied_bf16_base(built, batch, realistic_zoo, tmp_path):
    from peft import PeftModel

    tok, _, enc = batch
    mix = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0])
    assert cli_main(["export-lora", str(built["smear-ffn"]), str(tmp_path / "lora"), "--weights", "0,0,0,1,0"]) == 0
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(realistic_zoo / "base"), tmp_path / "lora")
    dynamic = AutoModelForCausalLM.from_pretrained(built["smear-ffn"])
    positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        assert_close_in_bf16(
            peft(**enc, position_ids=positions).logits,
            dynamic(**enc, merge_weights=mix).logits,
            enc["attention_mask"].bool(),
            other=dynamic(**enc, merge_weights=torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0])).logits,
        )


@pytest.mark.parametrize("name", ["smear-ffn", "stock"])
def test_train_router_batches_rows_of_different_lengths_without_a_pad_token(built, tmp_path, name):
    from safetensors.torch import load_file

    from moe_merge.train.loop import TrainRouterArgs, train_router

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in zoo.router_training_rows(8)))
    summary = train_router(
        built[name],
        tmp_path / "run",
        TrainRouterArgs(
            data=rows, steps=3, batch_size=8, eval_every=3, save_every=3, objective={"lm": 1.0, "routing": 1.0}
        ),
    )
    # trained as stored: frozen weights in bf16, routers and their Adam moments in float32
    assert summary["frozen_dtype"] == "bfloat16"
    optimizer = torch.load(tmp_path / "run" / "checkpoints" / "step-000003" / "optimizer.bin", weights_only=True)
    moments = [t for state in optimizer["state"].values() for k, t in state.items() if k.startswith("exp_avg")]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    exported = tmp_path / "run" / "model"
    before, after = load_file(built[name] / "model.safetensors"), load_file(exported / "model.safetensors")
    assert {k: v.dtype for k, v in before.items()} == {k: v.dtype for k, v in after.items()}
    assert all(torch.equal(before[k], after[k]) for k in before if ".router." not in k and ".gate." not in k)
    if name != "stock":  # the refreshed routing report is measured on the export as written (bf16)
        assert_the_report_is_the_models(exported)


def test_push_to_the_hub_stand_in(built, tmp_path):
    from tests.hub_standin import HubStandIn, pushing_env
    from tests.test_push import TOKEN, _files

    env = pushing_env(tmp_path, HF_TOKEN=TOKEN)
    with HubStandIn(TOKEN) as hub:
        env["HF_ENDPOINT"] = hub.url
        for name in ("smear-ffn", "stock"):
            run = subprocess.run(
                [sys.executable, "-m", "moe_merge.cli", "push", str(built[name]), f"me/{name}"],
                capture_output=True,
                text=True,
                env=env,
            )
            assert run.returncode == 0, run.stderr
            assert hub.repos[f"me/{name}"].branches["main"] == _files(built[name])


def test_static_parts_stay_the_static_merge_and_a_tied_table_is_kept_whole(realistic_zoo, tmp_path):
    from moe_merge.errors import ConfigError

    recipe = zoo.zoo_recipe(
        realistic_zoo, "full", method="smear", level="block", static=["embeddings", "norms", "head"]
    )
    model = AutoModelForCausalLM.from_pretrained(assemble(MergeConfig.model_validate(recipe), tmp_path / "s"))
    assert model.config.routed_parts == [] and isinstance(model.model.embed_tokens, torch.nn.Embedding)
    recipe["static"] = ["embeddings"]
    with pytest.raises(ConfigError, match="ties its head to its embeddings"):
        assemble(MergeConfig.model_validate(recipe), tmp_path / "t")
    assert not (tmp_path / "t").exists()
