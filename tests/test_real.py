"""Every verb on a real pretrained LLM: SmolLM2-135M-Instruct, converted from its GGUF on PyPI (a Llama with tied
embeddings, pad = EOS, a chat template, bf16), and the real zoo's experts (moe_merge/realzoo.py): four LoRA adapters
on every linear layer and two full fine-tunes, each doing a task the base cannot (facts of a fictional world, or a
made-up rule over four words).

Models are compared in bf16, as the checkpoints ship (tests/test_realistic.py's tolerance): most positions agree to
the bit, and the greedy token agrees wherever the choice is not a near-tie. Answers are scored on held-out prompts
the routers never saw.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import moe_merge.modeling  # noqa: F401  registers the dynamic model
from moe_merge import realzoo
from moe_merge.assemble import assemble
from moe_merge.cli import main as cli_main
from moe_merge.config import MergeConfig
from moe_merge.methods import DYNAMIC_PAIRS
from moe_merge.quality import exact_match
from moe_merge.tokens import load_tokenizer
from tests.test_realistic import assert_close_in_bf16

pytestmark = pytest.mark.slow

LORA_DYNAMIC = {  # name -> (experts, recipe overrides): every dynamic method at every level it runs at
    f"{method}-{level}": ("lora", {"method": method, "level": level}) for method, level in DYNAMIC_PAIRS
}
RECIPES = {
    "stock": ("lora", {"router": {"init": "fit"}, "experts_per_token": 1}),  # a stock Mixtral
    **LORA_DYNAMIC,
    # LoRA adapters and full fine-tunes together: the tied table (embeddings = head) and every norm routed
    "smear-block-all": ("all", {"method": "smear", "level": "block"}),
    "sparse-model-all": ("all", {"method": "sparse", "level": "model"}),
}
DYNAMIC = [n for n in RECIPES if n != "stock"]
EXACT = [
    "smear-block",
    "wemoe-block",
    "twin-block",
    "sparse-block",
    "sparse-model",
    "smear-block-all",
    "sparse-model-all",
]  # one-hot weights are the expert itself


def assembled(zoo: Path, recipes: dict, root: Path) -> Iterator[dict[str, Path]]:
    """Every recipe assembled once for a module, and removed after it (GBs: pytest keeps its last runs' files)."""
    yield {
        name: assemble(MergeConfig.model_validate(realzoo.zoo_recipe(zoo, experts, **overrides)), root / name)
        for name, (experts, overrides) in recipes.items()
    }
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def built(real_zoo, tmp_path_factory) -> Iterator[dict[str, Path]]:
    yield from assembled(real_zoo, RECIPES, tmp_path_factory.mktemp("real"))


@pytest.fixture(scope="module")
def tok(real_zoo):
    return load_tokenizer(real_zoo / "base")


def _experts(real_zoo, which: str) -> list[str]:
    return [e["name"] for e in realzoo.zoo_recipe(real_zoo, which)["experts"]]


def _held_out(tasks, per_task: int = 8) -> list[dict]:
    return [{**r, "task": r["expert"]} for t in tasks for r in realzoo.eval_rows([t])[:per_task]]


def _scores(model, tok, rows, **kw) -> dict[str, float]:
    return {t: s for t, (s, _) in exact_match(model, tok, rows, **kw).items()}


def _batch(tok, tasks):
    """Two held-out prompts of each task, left-padded (SmolLM2 pads with its EOS)."""
    prompts = [r["prompt"] for r in _held_out(tasks, 2)]
    return tok(prompts, return_tensors="pt", padding=True, padding_side="left")


def _positions(enc):
    return (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)


def test_each_expert_does_its_task_and_the_base_none(real_zoo, tok):
    """Measured here on held-out prompts, as users load the checkpoints (bf16; adapters through PEFT): not read from
    the zoo's manifest."""
    rows = _held_out(realzoo.TASK_NAMES)
    base = AutoModelForCausalLM.from_pretrained(real_zoo / "base")
    assert base.dtype == torch.bfloat16 and base.config.tie_word_embeddings
    assert max(_scores(base, tok, rows).values()) <= 0.1
    for task in realzoo.TASKS:
        expert = realzoo.load_checkpoint(real_zoo / task.expert)
        got = _scores(expert, tok, rows)
        assert got[task.name] >= 0.9, (task.name, got)
        assert max(v for t, v in got.items() if t != task.name) <= 0.3, (task.name, got)


def test_the_stock_export_is_a_mixtral_of_the_adapters_merged(built, real_zoo, tok):
    """mergekit-moe's path: a stock MixtralForCausalLM, no remote code; each expert's MLP is base + scaling·B·A."""
    model, info = AutoModelForCausalLM.from_pretrained(built["stock"], output_loading_info=True)
    assert type(model).__name__ == "MixtralForCausalLM" and not any(info.values()) and model.dtype == torch.bfloat16
    state = {k: v for f in sorted(built["stock"].glob("*.safetensors")) for k, v in load_file(f).items()}
    for e, task in enumerate(realzoo.LORA_TASKS):
        expert = realzoo.load_checkpoint(real_zoo / f"{task}-lora").merge_and_unload()
        want = expert.model.layers[7].mlp.down_proj.weight
        got = state[f"model.layers.7.block_sparse_moe.experts.{e}.w2.weight"]
        torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2**-7 * want.abs().max().item())
    enc = _batch(tok, realzoo.LORA_TASKS)
    with torch.no_grad():
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        assert model.generate(**enc, **kw).shape[1] > enc["input_ids"].shape[1]


MERGED = ("sparse-block", "sparse-model", "smear-block-all", "sparse-model-all")  # hold each expert's dense weights


def _reference(real_zoo, task: str, merged: bool):
    """Expert `task` in float32 as the dynamic model holds it: an adapter applied as its factors (the low-rank forms
    keep them), or merged into its base and rounded to the checkpoint's bf16 (forms that hold each expert's dense
    weights, as `assemble` writes them); a full fine-tune as saved."""
    expert = realzoo.load_checkpoint(real_zoo / realzoo.TASK[task].expert, dtype=torch.float32)
    if not (merged and hasattr(expert, "peft_config")):
        return expert
    dense = expert.merge_and_unload()
    with torch.no_grad():
        for p in dense.parameters():
            p.copy_(p.to(torch.bfloat16))
    return dense


def assert_one_hot_is_each_expert(model_dir: Path, zoo: Path, tok, tasks: list[str], merged: bool) -> None:
    """Computed in float32 from the bf16 checkpoints on both sides, so that what is compared is the merge, not two
    orders of bf16 rounding."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    enc = _batch(tok, tasks)
    real = enc["attention_mask"].bool()
    for e, task in enumerate(tasks):
        expert = _reference(zoo, task, merged)
        with torch.no_grad():
            got = model(**enc, merge_weights=torch.nn.functional.one_hot(torch.tensor(e), len(tasks))).logits
            want = expert(**enc, position_ids=_positions(enc)).logits
        torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-3 * want.abs().max().item())


def assert_routed_right(model_dir: Path, tok, tasks: list[str], answers: bool) -> None:
    """Prompt-initialised routers, nothing trained: the merge weights every router gives a held-out prompt favour its
    own expert, and with `answers` (block and model level, where one-hot weights are the expert) the answers are
    the expert's."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = _held_out(tasks)
    enc = tok([r["prompt"] for r in rows], return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        chosen = model(**enc, use_cache=False).merge_weights.argmax(-1)  # [B, R]
    right = torch.tensor([tasks.index(r["task"]) for r in rows]).unsqueeze(1)
    assert (chosen == right).float().mean() >= 0.9, model_dir.name
    if answers:
        got = _scores(model, tok, rows)
        assert min(got.values()) >= 0.9, got


def assert_cache_changes_nothing(model, tok, tasks: list[str]) -> None:
    """Each generated step's logits, with the cache, against one forward pass over the whole sequence without it."""
    enc = _batch(tok, tasks)
    with torch.no_grad():
        gen = model.generate(
            **enc,
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
        cached = torch.stack(gen.logits, 1)
        new = gen.sequences[:, enc["input_ids"].shape[1] :]
        mask = torch.cat([enc["attention_mask"], torch.ones_like(new)], 1)
        prompt = torch.cat([enc["attention_mask"], torch.zeros_like(new)], 1)
        again = model(input_ids=gen.sequences, attention_mask=mask, routing_mask=prompt, use_cache=False).logits
    assert_close_in_bf16(
        cached, again[:, enc["input_ids"].shape[1] - 1 : -1], torch.ones(cached.shape[:2], dtype=torch.bool)
    )


# The adapters-only block and model levels are checked one-hot on the real Gemma (test_real_gemma.py) and on the
# tiny Llama zoos; here what only this zoo has: full fine-tunes beside adapters (the tied table routed), and SVDs.
@pytest.mark.parametrize("name", ["twin-block", "smear-block-all", "sparse-model-all"])
def test_one_hot_weights_reproduce_each_expert(built, real_zoo, tok, name):
    assert_one_hot_is_each_expert(built[name], real_zoo, tok, _experts(real_zoo, RECIPES[name][0]), name in MERGED)


@pytest.mark.parametrize("name", DYNAMIC)
def test_training_free_routing_sends_held_out_prompts_to_their_expert(built, real_zoo, tok, name):
    assert_routed_right(built[name], tok, _experts(real_zoo, RECIPES[name][0]), answers=name in EXACT)


@pytest.mark.parametrize("name", ["smear-ffn", "twin-block", "sparse-model-all"])
def test_cache_and_left_padding_change_nothing(built, real_zoo, tok, name):
    """The cache against none (above); a left-padded batch against each prompt alone."""
    model = AutoModelForCausalLM.from_pretrained(built[name])
    tasks = _experts(real_zoo, RECIPES[name][0])
    assert_cache_changes_nothing(model, tok, tasks)
    enc = _batch(tok, tasks)
    with torch.no_grad():
        out = model(**enc)
        alone = [
            model(**tok([p], return_tensors="pt")) for p in tok.batch_decode(enc["input_ids"], skip_special_tokens=True)
        ]
    got, want = out.logits[:, -1:], torch.cat([a.logits[:, -1:] for a in alone])
    assert_close_in_bf16(got, want, torch.ones(got.shape[:2], dtype=torch.bool))


def test_generate_from_the_command_line_shows_the_routing(built, capsys):
    row = realzoo.eval_rows(["flags"])[0]
    assert (
        cli_main(["generate", str(built["smear-block"]), row["prompt"], "--max-new-tokens", "4", "--show-routing"]) == 0
    )
    text, header, *routers = capsys.readouterr().out.splitlines()
    assert text.strip() == row["completion"].strip()
    names = header.split()
    assert len(routers) == 30  # one per layer
    for line in routers:  # "router k  w_flags  w_diets ..."
        weights = [float(x) for x in line.split()[2:]]
        assert names[weights.index(max(weights))] == "flags", line


def test_bake_for_a_prompt_is_a_tied_llama_answering_as_its_expert(built, real_zoo, tok, tmp_path):
    row = realzoo.eval_rows(["zorb"])[0]
    assert cli_main(["bake", str(built["smear-block"]), str(tmp_path / "b"), "--prompt", row["prompt"]]) == 0
    baked, info = AutoModelForCausalLM.from_pretrained(tmp_path / "b", output_loading_info=True)
    assert type(baked).__name__ == "LlamaForCausalLM" and not any(info.values()) and baked.config.tie_word_embeddings
    rows = _held_out(["zorb"])
    expert = realzoo.load_checkpoint(real_zoo / "zorb-lora")
    assert _scores(baked, tok, rows) == _scores(expert, tok, rows)


def test_export_lora_of_one_hot_weights_is_the_expert_on_the_base(built, real_zoo, tok, tmp_path):
    from peft import PeftModel

    assert cli_main(["export-lora", str(built["smear-block"]), str(tmp_path / "lora"), "--weights", "0,1,0,0"]) == 0
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 16  # one adapter's rank: the experts with weight 0 are left out
    base = AutoModelForCausalLM.from_pretrained(real_zoo / "base")
    peft = PeftModel.from_pretrained(base, tmp_path / "lora")
    enc = _batch(tok, realzoo.LORA_TASKS)
    expert = realzoo.load_checkpoint(real_zoo / "diets-lora")
    with torch.no_grad():
        assert_close_in_bf16(
            peft(**enc, position_ids=_positions(enc)).logits,
            expert(**enc, position_ids=_positions(enc)).logits,
            enc["attention_mask"].bool(),
        )


@pytest.mark.parametrize(
    "experts, overrides",
    [
        ("lora", {"gate_mode": "hidden", "experts_per_token": 2}),  # mergekit-moe's YAML: a stock Mixtral
        ("all", {"method": "wemoe", "level": "ffn", "router": {"init": "uniform"}}),  # a start no prompt fixed
    ],
    ids=["stock", "wemoe-ffn-uniform"],
)
def test_train_router_trains_only_the_routers_in_bf16(real_zoo, tmp_path, experts, overrides):
    """Prompt-fitted dynamic routers that are right are saturated (their gradients are zero), so this trains starts
    that are not: mergekit's `hidden` gates, and uniform routers."""
    from moe_merge.train.loop import TrainRouterArgs, train_router

    model_dir = assemble(MergeConfig.model_validate(realzoo.zoo_recipe(real_zoo, experts, **overrides)), tmp_path / "m")
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in realzoo.router_training_rows(_experts(real_zoo, experts))))
    summary = train_router(
        model_dir,
        tmp_path / "run",
        TrainRouterArgs(
            data=rows, steps=3, batch_size=8, eval_every=3, save_every=3, objective={"lm": 1.0, "routing": 1.0}
        ),
    )
    assert summary["frozen_dtype"] == "bfloat16"
    files = lambda d: {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}  # noqa: E731
    before, after = files(model_dir), files(tmp_path / "run" / "model")
    routers = [k for k in before if ".router." in k or k.startswith("model.router.") or k.endswith(".gate.weight")]
    assert routers and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before if k not in routers)
    start = dict(AutoModelForCausalLM.from_pretrained(model_dir).named_parameters())  # in-memory names, as trained
    trained = load_file(tmp_path / "run" / "checkpoints" / "step-000003" / "routers.safetensors")
    assert trained.keys() <= start.keys()
    assert any(not torch.equal(t, start[k].float()) for k, t in trained.items())


def test_inspect_says_the_adapters_change_attention_and_the_full_fine_tunes_their_embeddings(real_zoo, tmp_path):
    experts = [str(real_zoo / t.expert) for t in realzoo.TASKS]
    assert cli_main(["inspect", str(real_zoo / "base"), *experts, "--out", str(tmp_path / "i")]) == 0
    found = json.loads((tmp_path / "i" / "inspect.json").read_text())
    for task in realzoo.TASKS:
        assert found["advice"][task.expert].startswith("block"), found["advice"][task.expert]
    assert len(found["clusters"]) == 1  # fine-tunes of one base: one cluster at Model-GLUE's 0.95


def test_push_an_adapter_export_to_the_hub_stand_in(built, tmp_path):
    from tests.hub_standin import HubStandIn, pushing_env
    from tests.test_push import TOKEN, _files

    assert cli_main(["export-lora", str(built["smear-ffn"]), str(tmp_path / "lora"), "--weights", "0,0,1,0"]) == 0
    env = pushing_env(tmp_path, HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1")
    with HubStandIn(TOKEN) as hub:
        env["HF_ENDPOINT"] = hub.url
        run = subprocess.run(
            [sys.executable, "-m", "moe_merge.cli", "push", str(tmp_path / "lora"), "me/zorb"],
            capture_output=True,
            text=True,
            env=env,
        )
        assert run.returncode == 0, run.stderr
    assert hub.repos["me/zorb"].branches["main"] == _files(tmp_path / "lora")


def test_model_glue_over_the_full_fine_tunes(real_zoo, tmp_path):
    """Model-GLUE's selective merge over the two full fine-tunes (one cluster): every candidate scored on the proxy
    through a dynamic model, the chosen merge written as a plain Llama."""
    import yaml

    from moe_merge.search import glue

    proxy = tmp_path / "proxy.jsonl"
    proxy.write_text("".join(json.dumps(r) + "\n" for r in realzoo.router_training_rows(realzoo.FULL_TASKS)[:8]))
    recipe = {
        "models": [{"name": t, "path": str(real_zoo / t), "base": str(real_zoo / "base")} for t in realzoo.FULL_TASKS],
        "proxy": {"path": str(proxy)},
        "merge": {"strategy": "heuristic_average"},
        "mixture": None,
    }
    (tmp_path / "glue.yaml").write_text(yaml.safe_dump(recipe))
    report = glue.run_glue(glue.load_recipe(tmp_path / "glue.yaml"), tmp_path / "out", tmp_path)
    assert [c["members"] for c in report["clusters"]] == [list(realzoo.FULL_TASKS)]
    cluster = report["clusters"][0]
    assert cluster["chosen"]["score"] == max(t["score"] for t in cluster["trials"] if t["accepted"])
    written = list((tmp_path / "out" / "clusters").iterdir())
    model = AutoModelForCausalLM.from_pretrained(written[0])
    assert type(model).__name__ == "LlamaForCausalLM"
