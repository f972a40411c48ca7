"""Router-only fine-tuning: what moves, what must not, resume, several processes, bad data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import moe_merge.modeling  # noqa: F401
from moe_merge import zoo
from moe_merge.assemble import assemble
from moe_merge.cli import main as cli_main
from moe_merge.config import MergeConfig
from moe_merge.errors import DataError, MoEMergeError, OutputExistsError
from moe_merge.tokens import load_tokenizer
from moe_merge.train import data as train_data
from moe_merge.train import objectives
from moe_merge.train.loop import TrainRouterArgs, train_router


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def models(zoo_dir, tmp_path_factory) -> dict[str, Path]:
    """Dynamic SMEAR, twin (one shared router) and sparse block-level models with untrained (uniform) routers, and
    a stock Mixtral (mergekit's `hidden` gates, top-2) from the MLP-only zoo. Prompt-fitted SMEAR routers are
    saturated: their gradients are ~1e-11."""
    root = tmp_path_factory.mktemp("train-router")
    uniform = {"router": {"init": "uniform"}}
    recipes = {
        "smear": zoo.zoo_recipe(zoo_dir, "mlp", method="smear", level="ffn", **uniform),
        "twin": zoo.zoo_recipe(zoo_dir, "mlp", method="twin", level="ffn", twin={"rank": 4}, **uniform),
        "sparse-block": zoo.zoo_recipe(zoo_dir, "mlp", method="sparse", level="block", experts_per_token=2, **uniform),
        "mixtral": zoo.zoo_recipe(zoo_dir, "mlp", gate_mode="hidden", experts_per_token=2),
    }
    out = {name: assemble(MergeConfig.model_validate(r), root / name) for name, r in recipes.items()}
    out["data"] = write_rows(root / "data.jsonl", zoo.router_training_rows(40))
    return out


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(model_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


def quick(data: Path, **kw) -> TrainRouterArgs:
    return TrainRouterArgs(data=data, **{"steps": 4, "batch_size": 8, "eval_every": 2, "save_every": 2, **kw})


# ----------------------------------------------------------------------------- freezing


def test_routers_are_found_by_module_type_not_by_name(models):
    model = AutoModelForCausalLM.from_pretrained(models["mixtral"])
    names = objectives.freeze_all_but_routers(model)
    assert names == [f"model.layers.{i}.mlp.gate.weight" for i in range(model.config.num_hidden_layers)]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == names  # gate_proj (the experts' own "gate") stays frozen


@pytest.mark.parametrize("name", ["smear", "twin", "sparse-block", "mixtral"])
def test_only_router_tensors_change(models, tmp_path, name):
    """bf16 autocast, accumulation and checkpointing on, so the whole loop runs; the export keeps every
    other tensor bit-identical, and layout and dtype."""
    args = quick(
        models["data"],
        objective={"lm": 1.0, "balance": 0.01},
        mixed_precision="bf16",
        grad_accum=2,
        gradient_checkpointing=True,
        lr=0.05,
    )
    summary = train_router(models[name], tmp_path / "run", args)
    before, after = tensors(models[name]), tensors(tmp_path / "run" / "model")
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    routers = {
        k
        for k in before
        if k.endswith(".router.proj.weight") or k.endswith(".router.proj.bias") or k.endswith(".gate.weight")
    }
    assert changed <= routers, changed - routers
    assert all(before[k].dtype == after[k].dtype for k in before)
    # the export holds the best routers on held-out rows; training did move them
    trained = load_file(tmp_path / "run" / "checkpoints" / "step-000004" / "routers.safetensors")
    start = AutoModelForCausalLM.from_pretrained(models[name]).state_dict()
    assert any(not torch.equal(start[k], v) for k, v in trained.items())
    # the export holds the routers of the best held-out step: the start's, or those checkpointed at that step
    best = summary["best"]["step"]
    kept = (
        start if best == 0 else load_file(tmp_path / "run" / "checkpoints" / f"step-{best:06d}" / "routers.safetensors")
    )
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").state_dict()  # in-memory names
    assert all(torch.equal(exported[k], kept[k].to(exported[k].dtype)) for k in trained)


def test_gradient_checkpointing_gives_the_same_gradients(models):
    rows = train_data.encode(
        train_data.load_rows(models["data"]).select(range(6)),
        AutoTokenizer.from_pretrained(models["smear"]),
        zoo.EXPERT_TASKS,
        "data",
    )
    batch = train_data.collate(rows.rows, zoo.PAD_ID)
    grads = []
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(models["smear"], dtype=torch.float64)
        names = objectives.freeze_all_but_routers(model)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        loss, _, _ = objectives.objective(model, batch, {"lm": 1.0, "routing": 1.0}, stock=False, k=1)
        loss.backward()
        params = dict(model.named_parameters())
        grads.append(torch.cat([params[n].grad.flatten() for n in names]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------- training


def test_held_out_loss_decreases_and_routers_reload(models, tmp_path):
    run = tmp_path / "run"
    summary = train_router(
        models["mixtral"], run, quick(models["data"], steps=60, eval_every=20, save_every=60, lr=0.03)
    )
    evals = [json.loads(line)["eval"] for line in (run / "log.jsonl").read_text().splitlines() if "eval" in line]
    assert len(evals) == 4
    assert evals[-1]["lm"] < 0.9 * evals[0]["lm"]
    assert summary["best"]["objective"] == min(e["objective"] for e in evals)
    # the export holds the best routers, and loads with plain transformers (still a stock Mixtral)
    model = AutoModelForCausalLM.from_pretrained(run / "model")
    assert type(model).__name__ == "MixtralForCausalLM"
    best = load_file(run / "best" / "routers.safetensors")
    params = dict(model.named_parameters())
    for name, value in best.items():
        torch.testing.assert_close(params[name], value, rtol=0, atol=0)


def test_resume_gives_the_uninterrupted_result(models, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = quick(models["data"], steps=6, save_every=3, eval_every=3, lr=0.05, objective={"lm": 1.0, "routing": 0.5})
    train_router(models["smear"], whole, args)
    # a run that died after its step-3 checkpoint
    cut.mkdir()
    shutil.copy2(whole / "args.json", cut / "args.json")
    shutil.copytree(whole / "checkpoints" / "step-000003", cut / "checkpoints" / "step-000003")
    (cut / "best").mkdir()
    train_router(models["smear"], cut, TrainRouterArgs(**{**args.__dict__, "resume": True}))
    a, b = tensors(whole / "model"), tensors(cut / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    last = "checkpoints/step-000006/routers.safetensors"
    assert all(torch.equal(v, load_file(cut / last)[k]) for k, v in load_file(whole / last).items())


def test_resume_refuses_other_settings_and_an_existing_run_needs_a_flag(models, tmp_path):
    run = tmp_path / "run"
    train_router(models["smear"], run, quick(models["data"], steps=2))
    with pytest.raises(OutputExistsError, match="--resume"):
        train_router(models["smear"], run, quick(models["data"], steps=2))
    with pytest.raises(MoEMergeError, match="lr"):
        train_router(models["smear"], run, quick(models["data"], steps=2, lr=1.0, resume=True))


def test_two_cpu_processes_see_the_same_batches_and_reach_the_same_routers_as_one(models, tmp_path):
    """accelerate's multi-process launcher on CPU (gloo DDP). Each process trains on its half of the same global
    batch, and the losses are shares of the global batch's means, so DDP's averaged gradient is one process's."""
    flags = [
        "--steps",
        "4",
        "--batch-size",
        "8",
        "--eval-every",
        "4",
        "--save-every",
        "4",
        "--lr",
        "0.05",
        "--objective",
        "lm=1,routing=0.5",
    ]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29533",
        "-m",
        "moe_merge.cli",
        "train-router",
        str(models["smear"]),
        "--data",
        str(models["data"]),
        "--out",
        str(tmp_path / "two"),
        *flags,
    ]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    assert (
        cli_main(
            [
                "train-router",
                str(models["smear"]),
                "--data",
                str(models["data"]),
                "--out",
                str(tmp_path / "one"),
                *flags,
            ]
        )
        == 0
    )

    def trained_rows(run):
        return [e["rows"] for e in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "rows" in e]

    assert len(trained_rows(tmp_path / "one")) == 4 and trained_rows(tmp_path / "one") == trained_rows(tmp_path / "two")
    last = "checkpoints/step-000004/routers.safetensors"
    one, two = load_file(tmp_path / "one" / last), load_file(tmp_path / "two" / last)
    start = AutoModelForCausalLM.from_pretrained(models["smear"]).state_dict()
    assert one.keys() == two.keys() and any(not torch.equal(start[k], v) for k, v in one.items())
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- data


def test_prompt_completion_rows_learn_the_completion_and_route_on_the_prompt(models):
    tok = AutoTokenizer.from_pretrained(models["smear"])
    row = train_data.encode_row(
        {"prompt": "mirror abc=", "completion": "cba", "expert": "mirror"},
        "prompt",
        tok,
        list(zoo.EXPERT_TASKS),
        "data",
        0,
        64,
    )
    n_prompt = len(tok("mirror abc=")["input_ids"])
    assert row["input_ids"][-1] == tok.eos_token_id
    assert row["labels"] == [-100] * n_prompt + row["input_ids"][n_prompt:]
    assert row["routing_mask"] == [1] * n_prompt + [0] * 4
    assert row["expert"] == zoo.EXPERT_TASKS.index("mirror")


def test_csv_parquet_and_jsonl_rows_encode_alike_and_chat_rows_learn_the_assistant_turns(models, tmp_path):
    """The same prompt/completion rows from each file format datasets reads give the same encoded rows; a chat
    row (`messages`, through the tokenizer's chat template) learns its assistant turns only."""
    import datasets

    tok = AutoTokenizer.from_pretrained(models["smear"])
    rows = [{"prompt": f"shift {w}=", "completion": w, "expert": "shift"} for w in ("abc", "hello", "xy")]
    datasets.Dataset.from_list(rows).to_csv(tmp_path / "d.csv", index=False)
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "d.parquet")
    encoded = {
        path.suffix: train_data.encode(train_data.load_rows(path), tok, list(zoo.EXPERT_TASKS), str(path), 64)
        for path in (write_rows(tmp_path / "d.jsonl", rows), tmp_path / "d.csv", tmp_path / "d.parquet")
    }
    assert encoded[".jsonl"].rows == encoded[".csv"].rows == encoded[".parquet"].rows
    assert len(encoded[".jsonl"].rows) == 3

    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    chat = {"messages": [{"role": "user", "content": "shift abc="}, {"role": "assistant", "content": "bcd"}]}
    row = train_data.encode_row(chat, "messages", tok, list(zoo.EXPERT_TASKS), "data", 0, 64)
    learned = tok.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])
    assert learned.strip().startswith("bcd") and "shift" not in learned and "user" not in learned


BAD_DATA = {
    "missing field": ('{"prompt": "shift ab="}\n', "prompt.*completion|no `completion`"),
    "missing in one row": (
        '{"prompt": "shift ab=", "completion": "bc"}\n{"prompt": "shift cd="}\n',
        "row 1 has no `completion`",
    ),
    "empty file": ("", "is empty"),
    "wrong type": ('{"text": 5}\n', "`text` must be a string"),
    "unknown expert": ('{"prompt": "shift ab=", "completion": "bc", "expert": "poetry"}\n', "'poetry' is not one of"),
    "index out of range": ('{"prompt": "shift ab=", "completion": "bc", "expert": 9}\n', "out of range"),
    "no usable field": ('{"question": "shift ab="}\n', "need a `text` field"),
    "chat without a template": (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n',
        "no chat template",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_refused_before_training(models, tmp_path, case):
    text, message = BAD_DATA[case]
    data = tmp_path / "bad.jsonl"
    data.write_text(text)
    with pytest.raises(DataError, match=message):
        train_router(models["smear"], tmp_path / "run", quick(data, eval_data=data))
    assert not (tmp_path / "run").exists()


def test_routing_objective_needs_labels(models, tmp_path):
    data = write_rows(tmp_path / "d.jsonl", [{"text": "shift abc=bcd"}] * 4)
    with pytest.raises(DataError, match="`expert` label"):
        train_router(models["smear"], tmp_path / "run", quick(data, objective={"routing": 1.0}))


# ----------------------------------------------------------------------------- objectives


def test_balance_loss_matches_transformers_on_per_token_logits():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 5, 4, generator=g, dtype=torch.float64)  # [B, R=1, T, E]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    ours = objectives.balance_loss(logits, mask, k=2)
    theirs = load_balancing_loss_func((logits[:, 0].reshape(-1, 4),), num_experts=4, top_k=2, attention_mask=mask)
    torch.testing.assert_close(ours.double(), theirs.double())


def test_balance_loss_is_one_when_sequences_spread_evenly():
    logits = torch.eye(4).mul(10).view(4, 1, 1, 4)  # four sequences, each sure of a different expert
    balanced = objectives.balance_loss(logits, torch.ones(4, 1), k=1)
    collapsed = objectives.balance_loss(logits[[0, 0, 0, 0]], torch.ones(4, 1), k=1)
    assert balanced.item() == pytest.approx(1.0, abs=1e-3) and collapsed.item() == pytest.approx(4.0, abs=1e-3)


def test_routing_loss_and_hits_read_only_labelled_rows():
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]]).view(3, 1, 1, 2)
    expert = torch.tensor([0, 1, -1])
    assert objectives.routing_loss(logits, torch.ones(3, 1), expert).item() == pytest.approx(
        torch.nn.functional.cross_entropy(torch.tensor([[5.0, 0.0]]), torch.tensor([0])).item()
    )
    assert objectives.routing_hits(logits, torch.ones(3, 1), expert) == (2, 2)


def test_entropy_loss_reads_only_target_positions():
    logits = torch.zeros(1, 3, 4)
    logits[0, 1] = torch.tensor([100.0, 0, 0, 0])  # certain at position 1
    labels = torch.tensor([[-100, -100, 2]])  # the only target is predicted from position 1
    assert objectives.entropy_loss(logits, labels).item() == pytest.approx(0.0, abs=1e-6)
    labels = torch.tensor([[-100, 2, -100]])  # predicted from position 0: uniform over 4
    assert objectives.entropy_loss(logits, labels).item() == pytest.approx(torch.log(torch.tensor(4.0)).item())


def test_objective_spelling():
    assert objectives.parse_objective("lm=1,routing=0.5") == {"lm": 1.0, "routing": 0.5}
    with pytest.raises(MoEMergeError, match="unknown objective 'lb'"):
        objectives.parse_objective("lm,lb=0.1")


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_qwen_moe_routers_train_alone(family):
    from transformers import AutoConfig

    extra = {"shared_expert_intermediate_size": 16} if family == "qwen2_moe" else {}
    config = AutoConfig.for_model(
        family,
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        **extra,
    )
    model = AutoModelForCausalLM.from_config(config)
    names = objectives.freeze_all_but_routers(model)
    assert names == [f"model.layers.{i}.mlp.gate.weight" for i in range(2)]  # shared_expert_gate stays frozen
    batch = train_data.collate(
        [{"input_ids": [1, 5, 6, 7], "labels": [-100, -100, 6, 7], "routing_mask": [1, 1, 0, 0], "expert": 2}] * 2, 0
    )
    loss, terms, _ = objectives.objective(
        model, batch, {"lm": 1.0, "routing": 1.0, "balance": 0.1}, stock=True, k=objectives.top_k(model)
    )
    loss.backward()
    assert set(terms) == {"lm", "routing", "balance"}
    assert all((p.grad is not None) == (n in names) for n, p in model.named_parameters())


@torch.no_grad()
def _routed_right(model_dir: Path) -> float:
    """Share of held-out prompts (the zoo's eval words, never trained on) whose merge weights, averaged over the
    routers, put most weight on their own expert: measured here on the saved model, not read from the run's log."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = load_tokenizer(model_dir)
    rows = zoo.eval_rows(per_task=16)
    enc = tok([r["prompt"] for r in rows], return_tensors="pt", padding=True, padding_side="left")
    chosen = model(**enc, use_cache=False).merge_weights.mean(1).argmax(-1)
    names = model.config.expert_names
    return sum(names[int(c)] == r["expert"] for c, r in zip(chosen, rows)) / len(rows)


def test_training_corrects_a_misinitialised_router(zoo_dir, models, tmp_path):
    """Prompt-fitted routers with their experts rotated (each sends `shift` prompts to `mirror`, `mirror` ones to
    `cipher`, ..., `swap` ones to `shift`) route held-out rows wrongly; router training undoes it, on rows it never
    fits nor stops on. Measured on held-out prompts here, not read from the run's log."""
    model_dir = assemble(
        MergeConfig.model_validate(zoo.zoo_recipe(zoo_dir, "mlp", method="smear", level="ffn")), tmp_path / "fitted"
    )
    state = tensors(model_dir)
    for name in [k for k in state if ".router.proj." in k]:
        state[name] = state[name][[1, 2, 3, 4, 0]]
    from safetensors.torch import save_file

    save_file(state, model_dir / "model.safetensors", metadata={"format": "pt"})
    before = _routed_right(model_dir)
    train_router(
        model_dir,
        tmp_path / "run",
        TrainRouterArgs(
            data=models["data"], steps=300, lr=0.05, batch_size=16, objective={"lm": 1.0, "routing": 1.0}, eval_every=20
        ),
    )
    after = _routed_right(tmp_path / "run" / "model")
    # measured here: 20 % before, 97.5 % after 300 steps (95 % after 200, 89 % after 100: too close to a bar)
    assert before <= 0.5 and after >= 0.9, (before, after)


def test_raw_merge_weights_are_trained_toward_one_hot():
    """With `normalize: none` (WEMoE's raw task-vector weights) the routing target is the expert's one-hot weights,
    which reproduce it: the loss is zero there and nowhere else, whatever the softmax of those logits."""
    expert = torch.tensor([1, 0])
    mask = torch.ones(2, 1)
    one_hot = torch.tensor([[[[0.0, 1.0, 0.0]]], [[[1.0, 0.0, 0.0]]]])  # [B, R, S, E]
    assert objectives.routing_loss(one_hot, mask, expert, raw=True) == 0
    assert objectives.routing_loss(one_hot * 2, mask, expert, raw=True) == pytest.approx(1.0)
    assert objectives.routing_loss(one_hot * 2, mask, expert) < objectives.routing_loss(one_hot, mask, expert)


def test_per_token_routing_accuracy_counts_every_token():
    """One row, two tokens: the first routed right by a wide margin, the second wrong by a little. The mean of the
    probabilities would call the row right; per token it is one decision of two."""
    logits = torch.tensor([[9.0, 0.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    assert objectives.routing_hits(logits, torch.ones(1, 2), torch.tensor([0])) == (1, 2)
    assert objectives.routing_hits(logits, torch.tensor([[1.0, 0.0]]), torch.tensor([0])) == (1, 1)  # padding


@pytest.mark.slow
def test_adamerging_is_wemoe_with_constant_routers_trained_on_entropy_then_baked(zoo_dir, tmp_path):
    """configs/zoo-adamerging.yaml's three commands: one coefficient per expert and layer, learned without labels."""
    recipe = zoo.zoo_recipe(
        zoo_dir,
        "full",
        method="wemoe",
        level="block",
        router={"kind": "constant", "init": "random", "normalize": "none"},
    )
    recipe["experts"] = [{"source_model": e["source_model"]} for e in recipe["experts"][:3]]
    model_dir = assemble(MergeConfig.model_validate(recipe), tmp_path / "ada")
    data = write_rows(tmp_path / "unlabeled.jsonl", [{"text": r["prompt"]} for r in zoo.router_training_rows(40)])
    run = tmp_path / "run"
    assert (
        cli_main(
            [
                "train-router",
                str(model_dir),
                "--data",
                str(data),
                "--objective",
                "entropy",
                "--out",
                str(run),
                "--steps",
                "60",
                "--lr",
                "0.01",
                "--eval-every",
                "60",
                "--save-every",
                "60",
            ]
        )
        == 0
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trainable_parameters"] == 4 * 3  # layers x experts
    start = json.loads((run / "log.jsonl").read_text().splitlines()[0])["eval"]["objective"]
    assert summary["best"]["objective"] < 0.9 * start
    assert cli_main(["bake", str(run / "model"), str(tmp_path / "merged"), "--prompt", "shift abc="]) == 0

    from moe_merge.export.bake import load_dynamic, weights_for_prompt

    trained = load_dynamic(run / "model")
    tok = AutoTokenizer.from_pretrained(run / "model")
    lam = weights_for_prompt(trained, tok, "shift abc=")  # [layers, experts]
    torch.testing.assert_close(lam, weights_for_prompt(trained, tok, "mirror xyz="))  # constant: the input is not read
    assert not torch.allclose(lam, torch.full_like(lam, 0.3)) and not torch.allclose(lam[0], lam[-1])
    name = "model.layers.2.mlp.down_proj.weight"
    base = tensors(zoo_dir / "base")[name]
    taus = [tensors(zoo_dir / "full" / t)[name] - base for t in ("shift", "mirror", "cipher")]
    want = base + sum(lam[2, e] * taus[e] for e in range(3))
    torch.testing.assert_close(tensors(tmp_path / "merged")[name], want, rtol=0, atol=1e-5)
