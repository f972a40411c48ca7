"""FFN-level sparse assembly into stock Mixtral / Qwen-MoE checkpoints."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moe_merge.assemble import assemble
from moe_merge.cli import main as cli_main
from moe_merge.config import MergeConfig
from tests.conftest import pico_recipe, prompts_for, read_json, write_recipe
from tests.fixtures import pico_checkpoint as make_pico


def _assemble(recipe: dict, out, **kw):
    return assemble(MergeConfig.model_validate(recipe), out, **kw)


def _logits(model_dir, ids, route_to: int | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, experts_implementation="eager")
    hooks = []
    if route_to is not None:  # one-hot routing: every token to expert `route_to`, weight 1

        def one_hot(_m, _a, out):
            n = out[0].shape[0]
            return out[0], torch.ones(n, 1, dtype=out[1].dtype), torch.full((n, 1), route_to)

        hooks = [layer.mlp.gate.register_forward_hook(one_hot) for layer in model.model.layers]
    with torch.no_grad():
        out = model(input_ids=ids).logits
    for h in hooks:
        h.remove()
    return out


IDS = torch.tensor([[1, 24, 13, 14, 11, 25, 4, 6, 7, 8, 5]])


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3"])
def test_one_hot_routing_reproduces_each_expert(tmp_path, arch):
    base = make_pico(tmp_path / "base", arch=arch)
    experts = [make_pico(tmp_path / f"e{i}", arch=arch, seed=i + 1, base=base) for i in range(3)]
    out = _assemble(pico_recipe({"base": base, "experts": experts}), tmp_path / "moe")
    if arch == "qwen3":  # transformers 4.x reads `num_experts` only (and would build 128 experts); 5.x saves the other
        config = read_json(out / "config.json")
        assert config["num_experts"] == config["num_local_experts"] == 3
    for i, expert in enumerate(experts):
        torch.testing.assert_close(_logits(out, IDS, route_to=i), _logits(expert, IDS), rtol=0, atol=1e-10)


def test_identical_experts_give_the_base(pico, tmp_path):
    recipe = pico_recipe(pico, experts_per_token=2)
    for e in recipe["experts"]:
        e["source_model"] = str(pico["base"])
    out = _assemble(recipe, tmp_path / "moe")
    # Mixtral's router renormalizes its top-k weights in float32, so they sum to 1 within ~1e-7.
    torch.testing.assert_close(_logits(out, IDS), _logits(pico["base"], IDS), rtol=0, atol=1e-6)


def test_output_is_stock_and_legacy_layout_and_loads_without_moe_merge(pico, tmp_path):
    out = _assemble(pico_recipe(pico), tmp_path / "moe", shard_size=40_000)
    index = read_json(out / "model.safetensors.index.json")
    keys = set(index["weight_map"])
    assert len(set(index["weight_map"].values())) > 1  # sharded
    assert "model.layers.0.block_sparse_moe.experts.2.w1.weight" in keys
    assert "model.layers.1.block_sparse_moe.gate.weight" in keys
    assert not any("gate_up_proj" in k or ".mlp." in k for k in keys)
    for shard in set(index["weight_map"].values()):
        with safe_open(out / shard, framework="pt") as f:
            for k in f.keys():
                assert torch.isfinite(f.get_tensor(k)).all(), k
    config = read_json(out / "config.json")
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]  # what transformers 4.x reads
    assert (out / "tokenizer.json").read_bytes() == (pico["base"] / "tokenizer.json").read_bytes()
    script = textwrap.dedent(f"""
        import sys
        from transformers import AutoModelForCausalLM, AutoTokenizer
        model = AutoModelForCausalLM.from_pretrained({str(out)!r})
        tok = AutoTokenizer.from_pretrained({str(out)!r})
        ids = tok("shift abc=", return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert type(model).__name__ == "MixtralForCausalLM", type(model)
        assert out.shape[1] > ids["input_ids"].shape[1]
        assert "moe_merge" not in sys.modules
        print("OK")
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]


def test_expert_tensors_come_from_their_expert(pico, tmp_path):
    out = _assemble(pico_recipe(pico), tmp_path / "moe")
    with (
        safe_open(out / "model.safetensors", framework="pt") as f,
        safe_open(pico["experts"][1] / "model.safetensors", framework="pt") as e,
    ):
        assert torch.equal(
            f.get_tensor("model.layers.1.block_sparse_moe.experts.1.w2.weight"),
            e.get_tensor("model.layers.1.mlp.down_proj.weight"),
        )
        assert torch.equal(
            f.get_tensor("model.layers.0.block_sparse_moe.experts.1.w3.weight"),
            e.get_tensor("model.layers.0.mlp.up_proj.weight"),
        )


def _attention_q(checkpoint: Path) -> torch.Tensor:
    with safe_open(checkpoint / "model.safetensors", framework="pt") as f:
        return f.get_tensor("model.layers.0.self_attn.q_proj.weight")


def test_non_expert_average_merges_attention(tmp_path, pico):
    full = [make_pico(tmp_path / f"full{i}", seed=10 + i, base=pico["base"], perturb="all") for i in range(2)]
    recipe = pico_recipe({"base": pico["base"], "experts": full}, non_expert="average")
    out = _assemble(recipe, tmp_path / "moe")
    merged, *experts = (_attention_q(path) for path in (out, *full))
    torch.testing.assert_close(merged, (experts[0] + experts[1]) / 2)


def test_non_expert_mixup_interpolates_attention_with_its_seeded_draw(tmp_path, pico):
    from moe_merge.merge import mixup_draws

    full = [make_pico(tmp_path / f"full{i}", seed=10 + i, base=pico["base"], perturb="all") for i in range(2)]
    recipe = pico_recipe(
        {"base": pico["base"], "experts": full}, non_expert="mixup", merge={"mixup": {"alpha": 2.0, "seed": 3}}
    )
    out = _assemble(recipe, tmp_path / "moe")
    merged, *experts = (_attention_q(path) for path in (out, *full))
    lam, other = mixup_draws(2, 2.0, 1, seed=3)[0]
    torch.testing.assert_close(merged, lam * experts[0] + other * experts[1])
    assert f"lambda = {lam:.4f}" in (out / "README.md").read_text()


@pytest.mark.parametrize("method, both", [("dare_linear", 2.0), ("dare_ties", 1.0)])
def test_non_expert_dare_drops_and_rescales_each_task_vector_entry(tmp_path, pico, method, both):
    """DARE at density p = 0.5 keeps each entry of each task vector τ_e with probability p and rescales it by 1/p,
    then sums them with weight 1 (dare_linear) or averages those of the elected sign (dare_ties): every entry of the
    merged attention is the base's plus one of 0, 2τ_0, 2τ_1 or both·(τ_0 + τ_1), about a quarter of them untouched."""
    full = [make_pico(tmp_path / f"full{i}", seed=10 + i, base=pico["base"], perturb="all") for i in range(2)]
    recipe = pico_recipe({"base": pico["base"], "experts": full}, non_expert=method, merge={"density": 0.5})
    out = _assemble(recipe, tmp_path / "moe")
    merged, base, *experts = (_attention_q(path) for path in (out, pico["base"], *full))
    t0, t1 = experts[0] - base, experts[1] - base
    options = torch.stack([torch.zeros_like(t0), 2 * t0, 2 * t1, both * (t0 + t1)])  # [4, N, K]
    nearest = (merged - base - options).abs().min(0)
    assert nearest.values.max() <= 1e-5, nearest.values.max()
    shares = torch.bincount(nearest.indices.flatten(), minlength=4).float() / t0.numel()
    assert 0.15 <= shares[0] <= 0.35 and 0.15 <= shares[1] + shares[2] <= 0.85, shares
    again = _assemble({**recipe, "seed": 1}, tmp_path / "seed1")
    assert not torch.equal(_attention_q(again), merged)  # the drop is seeded


def test_expert_noise_and_residual_scale_touch_only_their_expert(tmp_path, pico):
    """mergekit-moe's `noise_scale` (seeded Gaussian noise on the expert's MLP) and `residual_scale` (its
    down_proj, which writes the residual stream, scaled); the other experts' tensors are their own."""
    recipe = pico_recipe(pico)
    recipe["experts"][1]["residual_scale"] = 0.5
    recipe["experts"][2]["noise_scale"] = 0.01
    out = _assemble(recipe, tmp_path / "moe")
    key = "model.layers.1.block_sparse_moe.experts.{e}.{proj}.weight"
    with safe_open(out / "model.safetensors", framework="pt") as f:
        got = {(e, p): f.get_tensor(key.format(e=e, proj=p)) for e in range(3) for p in ("w1", "w2")}
    src = {}
    for e in range(3):
        with safe_open(pico["experts"][e] / "model.safetensors", framework="pt") as f:
            src[e, "w1"] = f.get_tensor("model.layers.1.mlp.gate_proj.weight")
            src[e, "w2"] = f.get_tensor("model.layers.1.mlp.down_proj.weight")
    assert torch.equal(got[0, "w1"], src[0, "w1"]) and torch.equal(got[0, "w2"], src[0, "w2"])
    assert torch.equal(got[1, "w1"], src[1, "w1"]) and torch.equal(got[1, "w2"], 0.5 * src[1, "w2"])
    for proj in ("w1", "w2"):
        noise = got[2, proj] - src[2, proj]
        assert 0.007 <= noise.std().item() <= 0.013 and noise.mean().abs() <= 0.003, noise.std()
    again = _assemble(recipe, tmp_path / "again")
    with safe_open(again / "model.safetensors", framework="pt") as f:
        assert torch.equal(f.get_tensor(key.format(e=2, proj="w1")), got[2, "w1"])  # seeded


def _gates(out: Path) -> list[torch.Tensor]:
    with safe_open(out / "model.safetensors", framework="pt") as f:
        return [f.get_tensor(f"model.layers.{i}.block_sparse_moe.gate.weight") for i in range(2)]


def test_stock_router_inits_read_what_they_say(tmp_path, pico):
    """mergekit-moe's gate modes: `hidden` (each prompt's mean MLP input), `hidden_last` (its last token's) and
    `cheap_embed` (its mean token embedding, no forward pass: the same rows in every layer)."""
    gates = {
        init: _gates(_assemble(pico_recipe(pico, router={"init": init}), tmp_path / init))
        for init in ("hidden", "hidden_last", "cheap_embed")
    }
    unit = torch.nn.functional.normalize  # each layer's calibration scales its rows by one factor
    torch.testing.assert_close(unit(gates["cheap_embed"][0], dim=-1), unit(gates["cheap_embed"][1], dim=-1))
    assert not torch.allclose(unit(gates["hidden_last"][0], dim=-1), unit(gates["hidden_last"][1], dim=-1))
    # layer 0's MLP input is the base's (its attention is the base's): read it here, mean or last token per prompt
    from transformers import AutoModelForCausalLM

    from moe_merge.routers.prompt_init import direction_rows
    from moe_merge.tokens import load_tokenizer

    base, tok = AutoModelForCausalLM.from_pretrained(pico["base"]), load_tokenizer(pico["base"])
    seen = []
    base.model.layers[0].mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0]))
    states = {"hidden": [], "hidden_last": [], "cheap_embed": []}
    with torch.no_grad():
        for e in range(3):
            ids = [tok(p, return_tensors="pt")["input_ids"] for p in prompts_for(e)]
            for x in ids:
                base(input_ids=x)
            mlp_inputs = seen[-len(ids) :]
            states["hidden"].append(torch.stack([s.mean(0) for s in mlp_inputs]))
            states["hidden_last"].append(torch.stack([s[-1] for s in mlp_inputs]))
            states["cheap_embed"].append(torch.stack([base.model.embed_tokens(x)[0].mean(0) for x in ids]))
    for init, per_expert in states.items():  # up to the calibration's one scale per router
        want, got = unit(direction_rows(per_expert, [None] * 3), dim=-1), unit(gates[init][0], dim=-1)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4, msg=init)


def test_stock_gates_read_the_written_model_with_each_prompt_routed_to_its_expert(tmp_path, pico):
    """A gate past layer 0 reads what the layers before it compute with the experts in place: the checkpoint as
    written, loaded by transformers, every token of expert e's prompts routed one-hot to expert e."""
    from transformers import AutoModelForCausalLM

    from moe_merge.routers.prompt_init import direction_rows
    from moe_merge.tokens import load_tokenizer

    out = _assemble(pico_recipe(pico, router={"init": "hidden"}), tmp_path / "moe")
    model, tok = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), load_tokenizer(out)
    seen, expert = [], [0]

    def force(_module, _args, o):
        n = o[0].shape[0]
        return o[0], torch.ones(n, 1, dtype=o[1].dtype), torch.full((n, 1), expert[0])

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(force)
    model.model.layers[1].mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0]))
    means = []
    with torch.no_grad():
        for e in range(3):
            expert[0] = e
            for p in prompts_for(e):
                model(**tok(p, return_tensors="pt"))
            means.append(torch.stack([s.mean(0) for s in seen[-len(prompts_for(e)) :]]))
    unit = torch.nn.functional.normalize
    want = unit(direction_rows(means, [None] * 3), dim=-1)
    torch.testing.assert_close(unit(_gates(out)[1], dim=-1), want, rtol=0, atol=1e-4)
    # the experts change what layer 1 reads: the base's own layer 0 gives other rows
    base_means = []
    base = AutoModelForCausalLM.from_pretrained(pico["base"])
    base.model.layers[1].mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0][0]))
    with torch.no_grad():
        for e in range(3):
            for p in prompts_for(e):
                base(**tok(p, return_tensors="pt"))
            base_means.append(torch.stack([s.mean(0) for s in seen[-len(prompts_for(e)) :]]))
    assert (unit(direction_rows(base_means, [None] * 3), dim=-1) - want).abs().max() > 1e-2


def test_lora_experts_and_qwen2_moe_with_shared_expert(zoo_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = {
        "base_model": str(zoo_dir / "base"),
        "experts_per_token": 1,
        "shared_experts": [{"source_model": str(zoo_dir / "base")}],
        "experts": [
            {"source_model": str(zoo_dir / "mlp" / n), "positive_prompts": prompts_for(i)}
            for i, n in enumerate(["shift", "back-lora"])
        ],
    }
    out = _assemble(recipe, tmp_path / "moe")
    assert read_json(out / "config.json")["architectures"] == ["Qwen2MoeForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert torch.isfinite(model(input_ids=IDS).logits).all()


def test_stock_and_dynamic_outputs_write_one_report_schema(pico, tmp_path):
    stock = read_json(_assemble(pico_recipe(pico), tmp_path / "stock") / "routing_report.json")
    dynamic = read_json(_assemble(pico_recipe(pico, method="smear"), tmp_path / "smear") / "routing_report.json")
    shared = {
        "experts",
        "method",
        "level",
        "router_init",
        "measured",
        "routers",
        "accuracy_mean",
        "accuracy_worst",
        "routed_right_everywhere",
        "warnings",
    }
    assert shared <= set(stock) and shared <= set(dynamic)
    assert {"layer", "accuracy", "sent_to", "scale"} == set(dynamic["routers"][0]) < set(stock["routers"][0])
    for rep in (stock, dynamic):
        assert (rep["method"], rep["router_init"]) in (("sparse", "hidden"), ("smear", "hidden"))
        assert len(rep["routers"]) == 2  # the pico base has two layers; each has its router
        for r in rep["routers"]:
            assert all(abs(sum(row) - 1) < 1e-5 for row in r["sent_to"])
            if rep is stock:  # a stock router's accuracy is the share of an expert's tokens it sends to that expert
                assert r["accuracy"] == [row[i] for i, row in enumerate(r["sent_to"])]
        assert rep["accuracy_worst"] == [min(r["accuracy"][i] for r in rep["routers"]) for i in range(3)]


def test_report_and_model_card(pico, tmp_path):
    from huggingface_hub import ModelCard

    out = _assemble(pico_recipe(pico), tmp_path / "moe")
    report = read_json(out / "routing_report.json")
    assert len(report["routers"]) == 2 and len(report["routers"][0]["sent_to"]) == 3
    for lay in report["routers"]:
        for row in lay["sent_to"]:
            assert abs(sum(row) - 1) < 1e-6
    assert (out / "routing_report.png").read_bytes()[:4] == b"\x89PNG"
    card = ModelCard.load(out / "README.md")
    assert {"moe", "merge", "moe-merge"} <= set(card.data.tags)
    # local sources stay in the card's text: the Hub's `base_model` takes repo ids only (see test_card.py)
    assert "base_model" not in card.data.to_dict() and "base_model_relation" not in card.data.to_dict()
    assert (out / "moe-merge.yaml").is_file() and (out / "generation_config.json").is_file()


@pytest.mark.parametrize(
    "recipe",
    [
        {"gate_mode": "random"},  # stock
        {"method": "twin", "level": "block", "twin": {"rank": 4}, "router": {"init": "random"}, "non_expert": "mixup"},
    ],
    ids=["stock", "dynamic"],
)
def test_same_inputs_and_seed_give_identical_bytes(pico, tmp_path, recipe):
    """Every file (weights, config, recipe, report and its PNG, card), by sha256."""
    import hashlib

    def tree(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

    recipe = pico_recipe(pico, seed=3, **recipe)
    a, b = _assemble(recipe, tmp_path / "a", shard_size=60_000), _assemble(recipe, tmp_path / "b", shard_size=60_000)
    assert len(tree(a)) > 8 and tree(a) == tree(b)
    assert tree(_assemble({**recipe, "seed": 4}, tmp_path / "c", shard_size=60_000)) != tree(a)


def test_cli_runs_a_mergekit_yaml_unchanged(pico, tmp_path):
    recipe = {
        "base_model": str(pico["base"]),
        "gate_mode": "hidden",
        "dtype": "bfloat16",
        "experts_per_token": 2,
        "experts": [
            {"source_model": str(p), "positive_prompts": prompts_for(i), "negative_prompts": ["copy abc="]}
            for i, p in enumerate(pico["experts"])
        ],
    }
    path = write_recipe(tmp_path / "mergekit.yml", recipe)
    assert cli_main(["assemble", str(path), str(tmp_path / "moe")]) == 0
    with safe_open(tmp_path / "moe" / "model.safetensors", framework="pt") as f:
        assert f.get_tensor("model.layers.0.block_sparse_moe.gate.weight").dtype == torch.bfloat16


@pytest.mark.parametrize("method", ["sparse", "smear"])
def test_the_resolved_recipe_names_sources_relative_to_itself(pico, tmp_path, method):
    """moe-merge.yaml (and the card) travel with the output, to the Hub too: no absolute local path, and the
    recipe resolves from where it sits, so `assemble OUT/moe-merge.yaml` rebuilds the same model."""
    import yaml

    from moe_merge.config import load_config

    recipe = pico_recipe(pico, method=method)
    recipe["experts"][0]["source_model"] = os.path.relpath(pico["experts"][0], tmp_path)  # relative to the recipe
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    assert cli_main(["assemble", str(path), str(tmp_path / "out" / "moe")]) == 0
    out = tmp_path / "out" / "moe"
    written = yaml.safe_load((out / "moe-merge.yaml").read_text())
    refs = [written["base_model"]] + [e["source_model"] for e in written["experts"]]
    assert all(not os.path.isabs(r) and (out / r).is_dir() for r in refs), refs
    assert str(tmp_path) not in (out / "moe-merge.yaml").read_text() + (out / "README.md").read_text()
    again = assemble(load_config(out / "moe-merge.yaml"), tmp_path / "again", recipe_dir=out)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


@pytest.mark.parametrize("method", ["sparse", "smear"])
def test_a_device_this_machine_lacks_is_a_clear_error(pico, tmp_path, capsys, method):
    path = write_recipe(tmp_path / "recipe.yaml", pico_recipe(pico, method=method))
    for device in ("cuda:7" if not torch.cuda.is_available() else "cuda:99", "gpu"):
        assert cli_main(["assemble", str(path), str(tmp_path / "out"), "--device", device]) == 2
        assert f"--device {device}:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("gate_mode", ["random", "uniform"])
def test_a_stock_recipe_without_prompts_assembles_and_says_so(pico, tmp_path, gate_mode):
    recipe = pico_recipe(pico, gate_mode=gate_mode)
    for e in recipe["experts"]:
        e["positive_prompts"] = []
    out = _assemble(recipe, tmp_path / "moe")
    report = read_json(out / "routing_report.json")
    assert report["measured"] is False and report["note"].startswith("no prompts to measure")
    card = (out / "README.md").read_text()
    assert "No prompts to measure" in card and f"`{gate_mode}`, no prompts read" in card
    assert not (out / "routing_report.png").exists() and "routing_report.png" not in card


# --- bad inputs: a clear error, and nothing left behind -------------------------------------------


def _fails_cleanly(tmp_path, recipe_text: str, match: str, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_text)
    out = tmp_path / "out"
    assert cli_main(["assemble", str(path), str(out)]) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def _yaml(recipe):
    import yaml

    return yaml.safe_dump(recipe)


def test_missing_expert_directory(pico, tmp_path, capsys):
    recipe = pico_recipe(pico)
    recipe["experts"][1]["source_model"] = str(tmp_path / "nope")
    _fails_cleanly(tmp_path, _yaml(recipe), "nope", capsys)


def test_truncated_expert_safetensors(pico, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(pico["experts"][0], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) - 1000])
    recipe = pico_recipe(pico)
    recipe["experts"][0]["source_model"] = str(broken)
    _fails_cleanly(tmp_path, _yaml(recipe), str(broken / "model.safetensors"), capsys)


def test_mismatched_hidden_size(pico, tmp_path, capsys):
    recipe = pico_recipe(pico)
    recipe["experts"][2]["source_model"] = str(make_pico(tmp_path / "wide", hidden=48))
    _fails_cleanly(tmp_path, _yaml(recipe), "`hidden_size` differs", capsys)


def test_adapter_for_another_base(zoo_dir, pico, tmp_path, capsys):
    recipe = pico_recipe(pico)
    recipe["experts"][0]["source_model"] = str(zoo_dir / "mlp" / "back-lora")
    _fails_cleanly(tmp_path, _yaml(recipe), "trained on another base", capsys)


def test_unknown_yaml_field(pico, tmp_path, capsys):
    recipe = pico_recipe(pico, gate_mod="hidden")
    _fails_cleanly(tmp_path, _yaml(recipe), "`gate_mod`", capsys)


def test_identical_prompts(pico, tmp_path, capsys):
    recipe = pico_recipe(pico)
    for e in recipe["experts"]:
        e["positive_prompts"] = ["same prompt"]
    _fails_cleanly(tmp_path, _yaml(recipe), "same positive and negative prompts", capsys)


def test_existing_out_dir_needs_force(pico, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    path = write_recipe(tmp_path / "r.yaml", pico_recipe(pico))
    assert cli_main(["assemble", str(path), str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert cli_main(["assemble", str(path), str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
