"""The dynamic model: exact against slow references, with the cache, padding, beams, save/load and remote code."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer

from moe_merge.arch import layer_of
from moe_merge.assemble import assemble
from moe_merge.assemble.dynamic import build_model
from moe_merge.assemble.execute import svd_factors
from moe_merge.assemble.routing import init_routers
from moe_merge.cli import main as cli_main
from moe_merge.config import MergeConfig
from moe_merge.errors import ConfigError
from moe_merge.export.bake import baked_model
from moe_merge.modeling import CACHE
from moe_merge.recipe import open_recipe
from tests.conftest import pico_recipe, write_recipe

PROMPTS = ["shift abcd=", "mirror xy=", "back hello there="]
# (method, level, which experts, extra recipe keys); twin at full rank is exact. The `all` experts differ in every
# weight (embeddings, norms and head too), which block and model levels route.
CASES = [
    ("smear", "ffn", "mlp", {}),
    ("wemoe", "ffn", "mlp", {}),
    ("twin", "ffn", "mlp", {"twin": {"rank": 64}}),
    ("smear", "block", "linear", {}),
    ("wemoe", "block", "linear", {}),
    ("twin", "block", "linear", {"twin": {"rank": 64}}),
    ("sparse", "block", "linear", {}),
    ("sparse", "model", "linear", {}),
    ("smear", "block", "lora", {}),
    ("wemoe", "block", "lora", {}),
    ("twin", "block", "lora", {"twin": {"rank": 64}}),
    ("smear", "block", "all", {}),
    ("wemoe", "block", "all", {}),
    ("twin", "block", "all", {"twin": {"rank": 64}}),
    ("sparse", "block", "all", {}),
    ("sparse", "model", "all", {}),
    ("smear", "block", "all", {"router": {"prepass": 0}}),
]
IDS = [f"{m}-{lv}-{x}" + "".join(f"-{k}" for k in extra.get("router", {})) for m, lv, x, extra in CASES]


def _recipe(sources, kind, **overrides) -> MergeConfig:
    pico = {"base": sources["base"], "experts": sources[kind]}
    return MergeConfig.model_validate(pico_recipe(pico, **overrides))


def _build(sources, method, level, kind, extra, dtype=torch.float64):
    config = _recipe(sources, kind, method=method, level=level, **extra)
    recipe = open_recipe(config)
    tok = AutoTokenizer.from_pretrained(recipe.base.path)
    model = build_model(recipe, seed=0, dtype=dtype)
    init_routers(model, tok, config, seed=0)
    return model, tok, recipe


def _expert_model(recipe, e, dtype=torch.float64):
    from peft import PeftModel

    # Loaded as stored (float32), then widened, as the dynamic model is: RoPE tables match to the bit.
    path = recipe.experts[e].path
    if (path / "adapter_config.json").is_file():
        base = AutoModelForCausalLM.from_pretrained(recipe.base.path).to(dtype)
        return PeftModel.from_pretrained(base, path, autocast_adapter_dtype=False).to(dtype).merge_and_unload().eval()
    return AutoModelForCausalLM.from_pretrained(path).to(dtype).eval()


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def built(request, sources):
    method, level, kind, extra = request.param
    return _build(sources, method, level, kind, extra)


def _enc(tok, prompts=PROMPTS):
    return tok(prompts, return_tensors="pt", padding=True, padding_side="left")


def _positions(enc):
    """The positions the dynamic model gives left-padded rows (as if each ran alone); stock models need them passed."""
    return (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def test_one_hot_weights_reproduce_each_expert(built):
    model, tok, recipe = built
    enc = _enc(tok)
    real = enc["attention_mask"].bool()
    for e in range(len(recipe.experts)):
        one_hot = torch.nn.functional.one_hot(torch.tensor(e), len(recipe.experts)).double()
        got = model(**enc, merge_weights=one_hot).logits
        want = _expert_model(recipe, e)(**enc, position_ids=_positions(enc)).logits
        torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-9)


def _mixed_experts(recipe, model, w: torch.Tensor):
    """The base architecture with every tensor θ0 + Σ_e w_e (θ_e − θ0), from the experts' own tensors: each decoder
    layer with its router's weights w [R, E], the embeddings with the first router's, the final norm and head with
    the last's. That is each method's merge: SMEAR's Σ_e w_e θ_e and twin's shared + Σ_e w_e (θ_e − shared) when the
    weights sum to one, WEMoE's base plus routed task vectors always, and one expert's layers for one-hot weights."""
    E, R = len(recipe.experts), model.config.num_routers
    if model.config.method in ("smear", "twin"):
        torch.testing.assert_close(w.sum(-1), torch.ones(R, dtype=w.dtype), rtol=0, atol=1e-12)
    dense = AutoModelForCausalLM.from_pretrained(recipe.base.path).to(torch.float64).eval()
    experts = [_expert_model(recipe, e).state_dict() for e in range(E)]
    state = dense.state_dict()
    for name, t0 in state.items():
        layer = layer_of(name)
        k = model.config.router_of_layer(layer) if layer is not None else 0 if "embed_tokens" in name else R - 1
        state[name] = t0 + sum(w[k, e] * (experts[e][name] - t0) for e in range(E))
    dense.load_state_dict(state)
    return dense


@torch.no_grad()
def test_batched_routing_equals_each_sequence_merged_from_the_experts_and_run_alone(built):
    """Per-sample reference: each sequence's own merge weights applied to the experts' tensors, a dense model run
    alone (sparse mixes outputs, which one-hot weights make one expert's layers: it runs top-1)."""
    model, tok, recipe = built
    out = model(**_enc(tok))
    for b, prompt in enumerate(PROMPTS):
        w = out.merge_weights[b].expand(model.config.num_routers, -1)
        if model.config.method == "sparse":
            w = torch.nn.functional.one_hot(w.argmax(-1), len(recipe.experts)).double()
            got = model(**tok([prompt], return_tensors="pt"), merge_weights=w[None]).logits[0]
        else:
            got = out.logits[b, -len(tok(prompt)["input_ids"]) :]
        want = _mixed_experts(recipe, model, w)(**tok([prompt], return_tensors="pt")).logits[0]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9)
        torch.testing.assert_close(baked_model(model, w)(**tok([prompt], return_tensors="pt")).logits[0], want)


@torch.no_grad()
def test_left_padded_batch_equals_each_sequence_alone(built):
    model, tok, _ = built
    out = model(**_enc(tok))
    for b, prompt in enumerate(PROMPTS):
        alone = model(**tok([prompt], return_tensors="pt"))
        torch.testing.assert_close(out.logits[b, -1], alone.logits[0, -1], rtol=0, atol=1e-10)
        torch.testing.assert_close(out.merge_weights[b], alone.merge_weights[0], rtol=0, atol=1e-10)


@torch.no_grad()
def test_generate_with_cache_equals_generate_without(built):
    model, tok, _ = built
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with_cache = model.generate(**_enc(tok), **kw)
    without = model.generate(**_enc(tok), use_cache=False, **kw)
    assert torch.equal(with_cache, without)


@torch.no_grad()
def test_decode_steps_on_kept_per_sequence_weights_equal_the_experts_own(built, monkeypatch):
    """Kept weights (each sequence's W0 + Σ w Δ, formed at the first decode step) against the forms' own arithmetic
    at every step: the same logits, in float64."""
    import moe_merge.merged_linear as ml

    model, tok, _ = built
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    asked = []
    monkeypatch.setattr(ml.kernels, "keep_decode_weights", lambda *a, **k: asked.append(a) or True)
    kept = model.generate(**_enc(tok), **kw)
    merged = any(isinstance(m, ml.MergedLinear) for m in model.model.layers.modules())  # the head never keeps
    assert len(asked) == (
        sum(isinstance(m, ml.MergedLinear) for m in model.model.layers.modules())
        if merged and model.config.router_granularity == "sequence"
        else 0
    )  # once per linear
    monkeypatch.setattr(ml.kernels, "keep_decode_weights", lambda *a, **k: False)
    own = model.generate(**_enc(tok), **kw)
    assert torch.equal(kept.sequences, own.sequences)
    torch.testing.assert_close(torch.stack(kept.logits), torch.stack(own.logits), rtol=0, atol=1e-10)


@torch.no_grad()
def test_a_prefill_that_forms_per_sequence_weights_hands_them_to_the_decode_steps(sources, monkeypatch):
    import moe_merge.merged_linear as ml

    model, tok, _ = _build(sources, "wemoe", "block", "linear", {})
    monkeypatch.setattr(ml.kernels, "choose_strategy", lambda *a, **k: "materialize")
    monkeypatch.setattr(ml.kernels, "keep_decode_weights", lambda *a, **k: True)
    formed = []
    real = ml.MergedLinear._materialize
    monkeypatch.setattr(ml.MergedLinear, "_materialize", lambda self, w: formed.append(self) or real(self, w))
    model.generate(**_enc(tok), max_new_tokens=4, do_sample=False, pad_token_id=0)
    linears = [m for m in model.model.layers.modules() if isinstance(m, ml.MergedLinear)]
    assert sorted(map(id, formed)) == sorted(map(id, linears))  # once each, at prefill; never again


@torch.no_grad()
def test_decode_with_other_weights_than_the_prefill_ignores_the_kept_ones(sources, monkeypatch):
    import moe_merge.merged_linear as ml

    monkeypatch.setattr(ml.kernels, "keep_decode_weights", lambda *a, **k: True)
    model, tok, _ = _build(sources, "wemoe", "block", "linear", {})
    enc = _enc(tok)
    first, other = torch.rand(len(PROMPTS), 3, dtype=torch.float64), torch.rand(len(PROMPTS), 3, dtype=torch.float64)
    out = model(**enc, merge_weights=first)
    step = dict(
        input_ids=out.logits[:, -1:].argmax(-1),
        attention_mask=torch.cat([enc["attention_mask"], torch.ones(len(PROMPTS), 1)], 1),
    )
    cache = out[CACHE]
    model(**step, merge_weights=out.merge_weights, **{CACHE: cache})  # forms and keeps `first`'s weights
    cache.crop(-1)
    again = model(**step, merge_weights=other, **{CACHE: cache}).logits
    fresh = model(**enc, merge_weights=first)[CACHE]  # the same prefill, nothing kept yet
    reference = model(**step, merge_weights=other, **{CACHE: fresh}).logits
    torch.testing.assert_close(again, reference, rtol=0, atol=1e-10)
    kept = model(**step, merge_weights=out.merge_weights, **{CACHE: model(**enc, merge_weights=first)[CACHE]}).logits
    assert (kept - again).abs().max() > 1e-3  # the two weights do give different steps


@torch.no_grad()
def test_beam_search_keeps_each_sequence_with_its_weights(built):
    model, tok, _ = built
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, num_beams=3, num_return_sequences=2)
    batch = model.generate(**_enc(tok), **kw)
    assert batch.shape[0] == 2 * len(PROMPTS)
    for b, prompt in enumerate(PROMPTS):
        alone = model.generate(**tok([prompt], return_tensors="pt"), **kw)
        new = alone.shape[1] - len(tok(prompt)["input_ids"])
        assert torch.equal(batch[2 * b : 2 * b + 2, -new:], alone[:, -new:])


@torch.no_grad()
def test_uniform_weights_equal_the_static_average(sources):
    model, tok, recipe = _build(sources, "smear", "ffn", "mlp", {})
    experts = [_expert_model(recipe, e).state_dict() for e in range(3)]
    average = _expert_model(recipe, 0)
    average.load_state_dict({k: sum(sd[k] for sd in experts) / 3 for k in experts[0]})
    enc = _enc(tok)
    got = model(**enc, merge_weights=torch.full((3,), 1 / 3, dtype=torch.float64)).logits
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(got[real], average(**enc, position_ids=_positions(enc)).logits[real], rtol=0, atol=1e-10)


def test_full_rank_svd_reproduces_the_exclusive_deltas():
    torch.manual_seed(0)
    delta = torch.randn(12, 7, dtype=torch.float64)
    A, B = svd_factors(delta, 7)
    torch.testing.assert_close((B.double() @ A.double()), delta, rtol=0, atol=1e-5)  # factors are stored in float32
    A, B = svd_factors(delta, 3)
    s = torch.linalg.svdvals(delta)
    residual = torch.linalg.matrix_norm(delta - B.double() @ A.double())
    assert residual == pytest.approx(s[3:].norm().item(), rel=1e-5)  # Eckart–Young: the best rank-3 error


def test_randomized_svd_of_fixed_rank_is_as_good_as_the_exact_one():
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(300, 300, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(200, 200, dtype=torch.float64))
    delta = U[:, :200] * 0.95 ** torch.arange(200, dtype=torch.float64) @ V.T
    for rank in (4, 16, 48):
        A, B = svd_factors(delta, rank)  # exact: 300 x 200 is below FULL_SVD_UP_TO
        exact = torch.linalg.matrix_norm(delta - B @ A)
        A, B = svd_factors(delta, rank, full_svd_up_to=16)  # randomized: 300 x 200 is above 16
        assert A.shape == (rank, 200) and B.shape == (300, rank)
        assert torch.linalg.matrix_norm(delta - B @ A) <= 1.01 * exact


STREAMED = [
    ("wemoe", "block", "all", {}),
    ("twin", "block", "all", {"twin": {"rank": {"energy": 0.9}}}),
    ("smear", "block", "lora", {}),
    ("sparse", "model", "all", {}),
    ("twin", "ffn", "mlp", {"twin": {"rank": 8}}),
]


@pytest.mark.parametrize("method,level,kind,extra", STREAMED, ids=[f"{m}-{lv}-{k}" for m, lv, k, _ in STREAMED])
def test_streamed_assembly_writes_the_model_built_in_memory(sources, tmp_path, method, level, kind, extra):
    """`assemble` builds and writes tensor by tensor and starts the routers from a model that loads one block at a
    time: the same tensors as the whole model in memory, the same routers up to the batch's float rounding."""
    config = _recipe(sources, kind, method=method, level=level, **extra)
    out = assemble(config, tmp_path / "out", shard_size=2**14)
    assert (out / "model.safetensors.index.json").is_file()  # several shards: routers were fitted across them
    streamed = AutoModelForCausalLM.from_pretrained(out).state_dict()
    recipe = open_recipe(config)
    model = build_model(recipe, seed=config.seed)
    init_routers(model, AutoTokenizer.from_pretrained(recipe.base.path), config, seed=config.seed)
    reference = model.state_dict()
    assert streamed.keys() == reference.keys()
    for name, t in reference.items():
        if "router." in name:
            torch.testing.assert_close(streamed[name], t, rtol=1e-4, atol=1e-5, msg=name)
        else:
            assert torch.equal(streamed[name], t), name


def test_save_load_round_trips_bit_exactly_and_loads_as_remote_code(sources, tmp_path):
    config = _recipe(sources, "lora", method="twin", level="block")
    out = assemble(config, tmp_path / "twin")
    for name in (
        "config.json",
        "model.safetensors",
        "modeling_moe_merge.py",
        "README.md",
        "routing_report.json",
        "routing_report.png",
        "moe-merge.yaml",
        "tokenizer.json",
    ):
        assert (out / name).is_file(), name
    loaded = AutoModelForCausalLM.from_pretrained(out)
    again = tmp_path / "again"
    loaded.save_pretrained(again)
    reloaded = AutoModelForCausalLM.from_pretrained(again)
    a, b = loaded.state_dict(), reloaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)\n"
        "print(type(m).__name__, m(torch.tensor([[1, 5, 6]])).logits.shape)\n"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "MoEMergeForCausalLM" in run.stdout and "assert" not in run.stdout
    blocked = "import sys; sys.modules['moe_merge'] = None\n" + code
    run = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode != 0 and "pip install moe-merge" in run.stderr


def test_decoding_without_the_prefill_weights_is_a_clear_error(sources):
    model, tok, _ = _build(sources, "smear", "ffn", "mlp", {})
    out = model(**tok(["shift ab="], return_tensors="pt"), use_cache=True)
    with pytest.raises(ValueError, match="merge_weights"):
        model(input_ids=torch.tensor([[5]]), **{CACHE: out[CACHE]})


def test_sparse_output_mixing_does_not_bake(sources):
    model, _, _ = _build(sources, "sparse", "block", "linear", {})
    with pytest.raises(ConfigError, match="one-hot"):
        baked_model(model, torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"method": "smear", "level": "model"}, "method: sparse"),
        ({"method": "twin", "router": {"granularity": "token"}}, "sequence"),
        ({"method": "wemoe", "router": {"kind": "constant"}}, "constant"),
        ({"method": "smear", "gate_mode": "fit"}, "dynamic models take"),
    ],
)
def test_bad_dynamic_recipes_name_the_field(pico, overrides, message):
    with pytest.raises(ValidationError, match=message):
        MergeConfig.model_validate(pico_recipe(pico, **overrides))


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"method": "twin", "router": {"prepass": 2}}, "`router.prepass: 2` is past the last layer"),
        ({"method": "sparse", "level": "model", "dense_layers": 5}, "`dense_layers: 5` is past the last layer"),
    ],
)
def test_layers_past_the_last_are_recipe_errors_not_tracebacks(pico, tmp_path, capsys, overrides, field):
    recipe = write_recipe(tmp_path / "recipe.yaml", pico_recipe(pico, **overrides))
    for extra in ([], ["--dry-run"]):
        assert cli_main(["assemble", str(recipe), str(tmp_path / "out"), *extra]) == 2
        err = capsys.readouterr().err
        assert field in err and "has 2 layers" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_averaging_methods_refuse_a_given_mix_that_does_not_sum_to_one(sources, pico, tmp_path, capsys):
    model, tok, _ = _build(sources, "smear", "ffn", "mlp", {})
    enc = tok(["shift ab="], return_tensors="pt")
    with pytest.raises(ValueError, match="must sum to one; these sum to \\[2.0\\]"):
        model(**enc, merge_weights=torch.tensor([1.0, 1.0, 0.0]))
    model(**enc, merge_weights=torch.tensor([0.25, 0.25, 0.5]))
    wemoe, _, _ = _build(sources, "wemoe", "ffn", "mlp", {})
    wemoe(**enc, merge_weights=torch.tensor([1.0, 1.0, 0.0]))  # base + τ1 + τ2: task arithmetic at λ = 1
    out = assemble(_recipe(sources, "mlp", method="smear"), tmp_path / "smear")
    for verb in ("bake", "export-lora"):
        assert cli_main([verb, str(out), str(tmp_path / verb), "--weights", "1,1,0"]) == 2
        assert (
            "--weights 1,1,0: `smear` averages its experts, so merge weights must sum to one" in capsys.readouterr().err
        )
        assert not (tmp_path / verb).exists()


@torch.no_grad()
def test_a_given_mix_of_every_documented_shape_survives_beam_expansion(sources):
    """generate repeats every tensor along dim 0 for beams: [E] and [B, E] have no batch dim to repeat."""
    model, tok, _ = _build(sources, "wemoe", "block", "linear", {})
    enc = _enc(tok)
    w = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    shapes = [w, w.expand(len(PROMPTS), 3), w.expand(len(PROMPTS), model.config.num_routers, 3)]
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    for beams in ({}, {"num_beams": 3, "num_return_sequences": 2}, {"num_return_sequences": 2, "do_sample": True}):
        outs = []
        for given in shapes:
            torch.manual_seed(0)
            outs.append(model.generate(**enc, merge_weights=given, **{**kw, **beams}))
        assert all(torch.equal(outs[-1], o) for o in outs), beams


def test_sparse_levels_refuse_a_fixed_size_cache_clearly(sources):
    """Each expert layer keeps its own KV cache there: E x the layers a StaticCache was built for."""
    from transformers import StaticCache

    model, tok, _ = _build(sources, "sparse", "block", "linear", {})
    enc = tok(["shift abc="], return_tensors="pt")
    with pytest.raises(ValueError, match="keeps a KV cache per expert layer, which a StaticCache cannot hold"):
        model(**enc, **{CACHE: StaticCache(config=model.config.text_config, max_cache_len=16)})
    with pytest.raises(ValueError, match="leave `cache_implementation` unset"):
        model.generate(**enc, max_new_tokens=2, cache_implementation="static", pad_token_id=0)


@pytest.mark.parametrize("router", [{"init": "random"}, {"init": "uniform"}])
def test_a_recipe_without_prompts_assembles_and_says_so(pico, tmp_path, router):
    recipe = pico_recipe(pico, method="smear", router=router)
    for e in recipe["experts"]:
        e["positive_prompts"] = []
    out = assemble(MergeConfig.model_validate(recipe), tmp_path / "out")
    report = json.loads((out / "routing_report.json").read_text())
    assert report["measured"] is False and report["note"].startswith("no prompts to measure")
    assert "No prompts to measure" in (out / "README.md").read_text() and not (out / "routing_report.png").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model(input_ids=torch.tensor([[1, 5, 6]])).merge_weights.shape == (1, 2, 3)


@pytest.mark.parametrize("level, kind", [("ffn", "mlp"), ("block", "all")])
def test_token_level_routing_is_causal_and_batch_exact(sources, level, kind):
    model, tok, _ = _build(sources, "wemoe", level, kind, {"router": {"granularity": "token"}})
    # per token, the embeddings have no weights yet and stay static; the norms and the head are routed
    assert model.config.routed_parts == ([] if kind == "mlp" else ["norms", "head"])
    with torch.no_grad():
        out = model(**_enc(tok))
        assert out.merge_weights.dim() == 4  # [B, R, T, E]
        for b, prompt in enumerate(PROMPTS):
            torch.testing.assert_close(
                out.logits[b, -1], model(**tok([prompt], return_tensors="pt")).logits[0, -1], rtol=0, atol=1e-10
            )
        kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(**_enc(tok), **kw), model.generate(**_enc(tok), use_cache=False, **kw))


def test_the_prepass_runs_once_at_prefill_and_never_while_decoding(sources, monkeypatch):
    from moe_merge.modeling import MoEMergeModel

    model, tok, _ = _build(sources, "smear", "block", "all", {"router": {"prepass": 1}})
    calls = []
    real = MoEMergeModel._prepass
    monkeypatch.setattr(MoEMergeModel, "_prepass", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = model.generate(**_enc(tok), **kw)
    assert out.shape[1] == _enc(tok)["input_ids"].shape[1] + 6 and len(calls) == 1
    assert torch.equal(out, model.generate(**_enc(tok), use_cache=False, **kw))  # each step recomputed from scratch
    assert len(calls) > 2


def test_the_first_router_reads_the_static_prepass_whatever_the_weights(sources):
    """Its input is the static merge's (the method's fixed weights) up to layer `prepass`: forcing other merge weights,
    as the prompt initialisation does, leaves what it reads unchanged."""
    model, tok, recipe = _build(sources, "wemoe", "block", "all", {"router": {"prepass": 1}})
    seen = []
    handle = model.model.first_router.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    with torch.no_grad():
        for e in range(3):
            model(**_enc(tok), merge_weights=torch.nn.functional.one_hot(torch.tensor(e), 3).double(), use_cache=False)
    handle.remove()
    torch.testing.assert_close(seen[0], seen[1], rtol=0, atol=0)
    torch.testing.assert_close(seen[0], seen[2], rtol=0, atol=0)


def test_energy_rank_is_the_smallest_that_holds_the_energy_full_or_randomized():
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(300, 300, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(200, 200, dtype=torch.float64))
    sigma = 0.9 ** torch.arange(200, dtype=torch.float64)  # a decaying spectrum, as task vectors have
    delta = U[:, :200] * sigma @ V.T
    total = (sigma**2).sum()
    for energy in (0.5, 0.9, 0.99):
        A, B = svd_factors(delta, energy=energy)
        r = A.shape[0]
        assert (sigma[:r] ** 2).sum() / total >= energy > (sigma[: r - 1] ** 2).sum() / total
        assert ((B @ A) ** 2).sum() / total >= energy - 1e-12
        A2, B2 = svd_factors(delta, energy=energy, full_svd_up_to=16)  # the randomized SVD
        assert ((B2 @ A2) ** 2).sum() / total >= energy - 1e-9 and r <= A2.shape[0] <= r + 2


def test_twin_rank_by_energy_is_chosen_per_matrix_and_loads_back(sources, tmp_path):
    from moe_merge.assemble.execute import svd_factors as factors_of
    from moe_merge.merged_linear import LowRankMergedLinear

    out = assemble(
        _recipe(sources, "all", method="twin", level="block", twin={"rank": {"energy": 0.9}}), tmp_path / "t"
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    ranks = model.config.delta_ranks
    assert {k for k in ranks if "." in k} == {
        f"{i}.{p}"
        for i in range(2)
        for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    }
    assert len(set(ranks.values())) > 1  # one rank per matrix, not one for all
    m = model.model.layers[1].mlp.down_proj
    assert isinstance(m, LowRankMergedLinear) and m.lora_A.shape[1] == ranks["1.down_proj"]
    # the module's rank is the largest expert's energy rank: that expert's exclusive part is held to 0.9
    assert ranks["1.down_proj"] == max(
        factors_of(m.lora_B[e].double() @ m.lora_A[e].double(), energy=1.0)[0].shape[0] for e in range(3)
    )


@torch.no_grad()
def test_an_mlp_router_starts_as_the_linear_router_its_prompts_fit(sources, tmp_path):
    """`router.kind: mlp` starts at exactly the prompt-fitted linear router's logits (ReLU(z) − ReLU(−z) = z), its
    extra hidden units off; it saves and loads back as an MLP."""
    linear, tok, _ = _build(sources, "smear", "block", "linear", {})
    mlp, _, _ = _build(sources, "smear", "block", "linear", {"router": {"kind": "mlp", "hidden_size": 16}})
    assert {r.kind for r in mlp.routers()} == {"mlp"} and mlp.routers()[0].fc1.out_features == 16
    a, b = linear(**_enc(tok)), mlp(**_enc(tok))
    torch.testing.assert_close(b.router_logits, a.router_logits, rtol=0, atol=1e-9)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-9)
    assert a.merge_weights.argmax(-1).unique().numel() > 1  # the prompts route apart: the logits carry the fit
    mlp.save_pretrained(tmp_path / "mlp")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "mlp", dtype=torch.float64, trust_remote_code=False)
    torch.testing.assert_close(loaded(**_enc(tok)).logits, b.logits, rtol=0, atol=1e-9)


def test_per_token_smear_is_causal_and_batch_exact_and_twin_refuses_it(sources):
    """Each token merges with its own weights, read from its own prefix: a left-padded batch equals each prompt
    alone, and generating with the cache equals recomputing every step. Twin's one router reads the pre-pass once
    per sequence: per token is a recipe error naming the field."""
    with pytest.raises(ValidationError, match="twin at ffn level routes once per sequence; `router.granularity`"):
        _recipe(sources, "mlp", method="twin", level="ffn", router={"granularity": "token"})
    model, tok, _ = _build(sources, "smear", "ffn", "mlp", {"router": {"granularity": "token"}})
    with torch.no_grad():
        out = model(**_enc(tok))
        assert out.merge_weights.dim() == 4  # [B, R, T, E]
        for b, prompt in enumerate(PROMPTS):
            alone = model(**tok([prompt], return_tensors="pt"))
            n = alone.logits.shape[1]
            torch.testing.assert_close(out.logits[b, -n:], alone.logits[0], rtol=0, atol=1e-10)
            torch.testing.assert_close(out.merge_weights[b, :, -n:], alone.merge_weights[0], rtol=0, atol=1e-10)
        assert out.merge_weights[0, 0, -1].ne(out.merge_weights[0, 0, -2]).any()  # the tokens' weights differ
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**_enc(tok), **kw), model.generate(**_enc(tok), use_cache=False, **kw))


@torch.no_grad()
def test_model_level_with_dense_layers_shares_the_first_layers(sources):
    """`dense_layers: 1`: the first decoder layer is the static merge, shared below every expert's own upper
    layers; one-hot weights then give that layer under the expert's others, merged from the experts' tensors."""
    model, tok, recipe = _build(sources, "sparse", "model", "linear", {"dense_layers": 1})
    assert len(model.model.layers) == 1 and all(len(x.layers) == 1 for x in model.model.experts)
    enc = _enc(tok)
    real = enc["attention_mask"].bool()
    experts = [_expert_model(recipe, e).state_dict() for e in range(3)]
    for e in range(3):
        dense = AutoModelForCausalLM.from_pretrained(recipe.base.path).to(torch.float64).eval()
        state = dict(experts[e])
        for name in state:
            if layer_of(name) == 0:  # the shared first layer: the experts' average (the static merge)
                state[name] = sum(x[name] for x in experts) / 3
        dense.load_state_dict(state)
        got = model(**enc, merge_weights=torch.nn.functional.one_hot(torch.tensor(e), 3).double()).logits
        want = dense(**enc, position_ids=_positions(enc)).logits
        torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-9)
