"""Merge search: the similarity, the clustering, the selection rules, the batched proxy, and Model-GLUE end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moe_merge import zoo
from moe_merge.errors import ConfigError, DataError
from moe_merge.merge import mixup_draws
from moe_merge.quality import load_eval_rows
from moe_merge.search import glue, proxy, strategies
from moe_merge.search.similarity import greedy_clusters, similarities
from moe_merge.sources import Checkpoint
from moe_merge.tokens import load_tokenizer
from tests.fixtures import glue_recipe, pico_checkpoint


@pytest.fixture(scope="module")
def picos(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("search")
    base = pico_checkpoint(root / "base")
    experts = [pico_checkpoint(root / f"e{i}", seed=i + 1, base=base, perturb="all") for i in range(2)]
    rows = [
        {"prompt": zoo.prompt(t, w), "completion": zoo.apply_task(t, w), "expert": t}
        for t in ("shift", "copy")
        for w in zoo.random_words(6, 5)
    ]
    (root / "proxy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "base": base, "experts": experts, "proxy": root / "proxy.jsonl"}


class Fixed:
    """A stand-in checkpoint holding given tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def get(self, name):
        return self.tensors[name]


# ----------------------------------------------------------------------------------------- similarity


def test_model_glue_similarity_is_the_columnwise_cosine_averaged_over_attention_and_mlp_matrices():
    g = torch.Generator().manual_seed(0)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight"]
    a = Fixed({n: torch.randn(4, 3, generator=g) for n in names})
    b = Fixed({n: torch.randn(4, 3, generator=g) for n in names})
    by_hand = []
    for n in names[:2]:  # the embeddings are left out
        x, y = a.get(n), b.get(n)
        by_hand.append(sum((x[:, j] @ y[:, j]) / (x[:, j].norm() * y[:, j].norm()) for j in range(3)) / 3)
    s = similarities([a, b], names)
    assert s.glue[0][1] == pytest.approx(float(sum(by_hand) / 2), abs=1e-6)
    assert s.mlp[0][1] == pytest.approx(float(by_hand[1]), abs=1e-6)
    assert s.glue[0][0] == pytest.approx(1.0)


def test_task_vector_cosine_and_relative_norms_by_hand():
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight"]
    base = Fixed({names[0]: torch.ones(2, 2), names[1]: torch.ones(2, 2)})
    a = Fixed({names[0]: torch.tensor([[2.0, 1], [1, 1]]), names[1]: torch.ones(2, 2)})  # MLP change only
    b = Fixed({names[0]: torch.tensor([[3.0, 1], [1, 1]]), names[1]: torch.tensor([[1.0, 1], [1, 0]])})
    s = similarities([a, b], names, base)
    assert s.relative_norm[0]["mlp"] == pytest.approx(0.5) and s.relative_norm[0]["attention"] == 0.0
    assert s.relative_norm[1]["attention"] == pytest.approx(0.5)
    assert s.task_vector[0][1] == pytest.approx(2 / (1 * math.sqrt(5)))


def test_a_model_joins_the_first_cluster_whose_first_member_it_matches():
    sim = [
        [1.0, 0.96, 0.2, 0.97],
        [0.96, 1.0, 0.99, 0.5],
        [0.2, 0.99, 1.0, 0.5],  # matches member 1, not the first member 0: a new cluster
        [0.97, 0.5, 0.5, 1.0],
    ]
    assert greedy_clusters(["a"] * 4, sim, 0.95) == [[0, 1, 3], [2]]
    assert greedy_clusters(["a", "a", "a", "b"], sim, 0.95) == [[0, 1], [2], [3]]  # another architecture: alone


# ----------------------------------------------------------------------------------------- strategies


def fake_trials(score_of) -> strategies.Trials:
    return strategies.Trials(lambda ws: [proxy.Score(score_of(w[0]), {}) for w in ws], [0, 0])


def test_heuristic_keeps_a_newcomer_only_if_the_proxy_does_not_drop_and_never_retries_it():
    own = torch.tensor([0.5, 0.9, 0.1, 0.7])  # alone; member 2 is harmful: any share of it lowers the score
    trials = fake_trials(lambda w: float((w * own).sum() - 2 * w[2]))
    best = strategies.heuristic(trials, 4, 4, "average")
    order = [t.note for t in trials.log[4:]]
    assert order == [
        "add member 3 to the running average",
        "add member 0 to the running average",
        "add member 2 to the running average",
    ]  # best first; each tried once
    # 1 alone 0.9; +3 averages to 0.8 (a drop: refused); +0 to 0.7 (refused); +2 refused
    assert best.weights[0] == [0.0, 1.0, 0.0, 0.0] and best.score == pytest.approx(0.9)
    assert [t.accepted for t in trials.log[4:]] == [False, False, False]

    flat = fake_trials(lambda w: 1.0 - 2 * float(w[2]))  # members 0, 1, 3 are interchangeable: ties are kept
    best = strategies.heuristic(flat, 4, 4, "coefficient")
    assert best.weights[0][2] == 0.0 and all(x > 0 for i, x in enumerate(best.weights[0]) if i != 2)


def test_cma_es_uses_the_model_glue_population_and_spends_exactly_the_budget():
    assert [strategies.popsize(n) for n in (1, 2, 8, 16)] == [4, 6, 10, 12]
    target = torch.tensor([0.2, 0.8, 0.0])

    def run():
        trials = fake_trials(lambda w: -float((w[:3] - target).pow(2).sum()))
        best = strategies.evolutionary(trials, 3, 3, budget=23, seed=4)
        return trials, best

    trials, best = run()
    assert len(trials.log) == 23
    sizes = [sum(t.step == s for t in trials.log) for s in range(4)]
    assert sizes == [7, 7, 7, 2]  # popsize(3) = 7 per generation, the last one cut to the budget
    assert all(abs(sum(t.weights[0]) - 1) < 1e-9 and min(t.weights[0]) >= 0 for t in trials.log)
    again, best2 = run()
    assert [t.weights for t in again.log] == [t.weights for t in trials.log] and best2.score == best.score


def test_mixup_draws_are_reproducible_from_the_seed():
    a = mixup_draws(2, 0.5, 6, seed=3)
    assert a == mixup_draws(2, 0.5, 6, seed=3) != mixup_draws(2, 0.5, 6, seed=4)
    assert all(abs(sum(d) - 1) < 1e-12 and len(d) == 2 for d in a)
    assert len(mixup_draws(5, 1.0, 3, seed=0)[0]) == 5  # Dirichlet for more than two


def test_m3_ties_interpolates_only_where_both_survive_with_the_elected_sign():
    name = "model.layers.0.mlp.up_proj.weight"
    base = Fixed({name: torch.zeros(4)})
    members = [Fixed({name: torch.tensor([1.0, -2, 3, 0])}), Fixed({name: torch.tensor([2.0, 1, -1, 4])})]
    fixed = proxy.FixedVectors(base, members, "ties", density=1.0, split_alone=True)
    lam = 0.3
    got = proxy.dense_tensor(name, torch.tensor([[lam, 1 - lam, 1.0]]), base, fixed, 1)
    # elected signs +, −, +, +: entry 0 both agree (interpolated); 1 and 2 only the first; 3 only the second
    assert torch.allclose(got, torch.tensor([lam * 1 + (1 - lam) * 2, -2, 3, 4]))
    plain = proxy.FixedVectors(base, members, "ties", density=1.0)  # TIES: the disjoint mean at weights 1/E
    assert torch.allclose(
        proxy.dense_tensor(name, torch.tensor([[0.5, 0.5]]), base, plain, 1), torch.tensor([1.5, -2, 3, 4])
    )


# ----------------------------------------------------------------------------------------- the batched proxy


@pytest.mark.parametrize("vectors", ["linear", "dare_ties"])
def test_a_candidate_scored_through_the_dynamic_model_equals_it_built_dense_and_scored_alone(picos, vectors):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(picos["base"])
    rows = proxy.load_proxy(picos["proxy"], tok, "nll")
    model = proxy.candidate_model(picos["base"], picos["experts"], vectors, density=0.7, seed=1)
    R = model.config.num_routers
    g = torch.Generator().manual_seed(0)
    cands = [torch.rand(R, 2, generator=g, dtype=torch.float64) for _ in range(3)]
    batched = proxy.score(model, rows, cands, batch_size=5)  # rows of several candidates share batches
    base = Checkpoint(picos["base"])
    fixed = proxy.FixedVectors(base, [Checkpoint(p) for p in picos["experts"]], vectors, 0.7, 1)
    for w, got in zip(cands, batched):
        dense = AutoModelForCausalLM.from_pretrained(picos["base"])
        dense.load_state_dict({n: proxy.dense_tensor(n, w, base, fixed, R) for n in base.weight_map})
        (alone,) = proxy.score(dense, rows)
        assert got.score == pytest.approx(alone.score, abs=1e-5)
        assert got.tasks == pytest.approx(alone.tasks, abs=1e-5)
    assert len({round(s.score, 6) for s in batched}) == 3  # the candidates really differ
    assert [s.score for s in proxy.score(model, rows, cands, batch_size=7)] == pytest.approx(
        [s.score for s in batched], abs=1e-6
    )


def test_exact_match_needs_completions(picos, tmp_path):
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "shift abc=bcd"}\n')
    tok = load_tokenizer(picos["base"])
    with pytest.raises(DataError, match="text.jsonl.*`exact_match` needs `prompt`\\+`completion`"):
        proxy.load_proxy(text, tok, "exact_match")
    assert proxy.load_proxy(text, tok, "nll").tasks == ["all"]


# ----------------------------------------------------------------------------------------- bad recipes


def _recipe(models: list[dict], proxy_path: Path, **extra) -> glue.GlueRecipe:
    return glue.GlueRecipe.model_validate({"models": models, "proxy": {"path": str(proxy_path)}, **extra})


def test_a_mixture_of_models_with_another_vocab_is_refused_naming_both_and_the_field(picos, tmp_path):
    from transformers import AutoModelForCausalLM

    other = tmp_path / "other-vocab"
    AutoModelForCausalLM.from_config(
        zoo.model_config("llama", 40, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
    ).save_pretrained(other)
    zoo.build_tokenizer().save_pretrained(other)
    recipe = _recipe(
        [{"name": "a", "path": str(picos["experts"][0])}, {"name": "b", "path": str(other)}], picos["proxy"]
    )
    with pytest.raises(
        ConfigError,
        match="(?s)models 'a' and 'b'.*cannot be mixed: `vocab_size` is 32 in .*e0/config.json but 40 in .*other-vocab",
    ):
        glue.run_glue(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_mixture_needs_two_clusters_and_a_cluster_of_one_is_passed_through(picos, tmp_path):
    recipe = _recipe([{"name": "a", "path": str(picos["experts"][0])}], picos["proxy"])
    with pytest.raises(ConfigError, match="at least two clusters"):
        glue.run_glue(recipe, tmp_path / "out")
    report = glue.run_glue(recipe.model_copy(update={"mixture": None}), tmp_path / "out")
    (cluster,) = report["clusters"]
    assert cluster["strategy"] == "none (one model)" and len(cluster["trials"]) == 1
    assert (tmp_path / "out" / cluster["path"] / "config.json").is_file()


def test_recipe_fields_are_checked():
    with pytest.raises(ValueError, match="not in `models`"):
        _recipe([{"name": "a", "path": "x"}], Path("p.jsonl"), mixture={"leave_out": ["b"]})
    with pytest.raises(ValueError, match="unique"):
        _recipe([{"name": "a", "path": "x"}, {"name": "a", "path": "y"}], Path("p.jsonl"))


def test_task_vector_mixup_needs_a_common_base(picos, tmp_path):
    models = [{"name": f"e{i}", "path": str(p)} for i, p in enumerate(picos["experts"])]
    recipe = _recipe(
        models,
        picos["proxy"],
        merge={"strategy": "mixup", "mixup": {"base_method": "ties"}},
        mixture=None,
        clustering={"threshold": -1.0},
    )
    with pytest.raises(ConfigError, match="needs the same `base`"):
        glue.run_glue(recipe, tmp_path / "out")


# ----------------------------------------------------------------------------------------- on the zoo


def held_out_mean(model_dir: Path, rows: list[dict]) -> float:
    """Exact match on the held-out rows, measured here: each prompt alone, greedy, its text up to the end-of-sequence
    token against the completion; the mean over tasks."""
    from transformers import AutoModelForCausalLM

    model, tok = AutoModelForCausalLM.from_pretrained(model_dir).eval(), load_tokenizer(model_dir)
    hits: dict[str, list[bool]] = {}
    for row in rows:
        ids = tok(row["prompt"], return_tensors="pt")["input_ids"]
        n = len(tok(row["completion"], add_special_tokens=False)["input_ids"]) + 1
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
        text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        hits.setdefault(row["task"], []).append(text.strip() == row["completion"].strip())
    return sum(sum(h) / len(h) for h in hits.values()) / len(hits)


@pytest.mark.slow
def test_model_glue_on_the_zoo_clusters_by_family_drops_the_harmful_expert_and_mixes(zoo_dir, tmp_path):
    path = glue_recipe(zoo_dir, tmp_path / "recipe", merge={"strategy": "heuristic_average"})
    report = glue.run_glue(glue.load_recipe(path), tmp_path / "out", path.parent)
    clusters = [c["members"] for c in report["clusters"]]
    assert clusters == [
        ["full-shift", "full-mirror", "full-cipher", "mlp-shift", "mlp-mirror", "mlp-cipher", "shift-seed1", "harmful"],
        ["family2-back", "family2-swap"],
        ["alien"],
    ]
    first = report["clusters"][0]
    harmful = first["members"].index("harmful")
    assert first["chosen"]["weights"][0][harmful] == 0.0
    everything = glue.run_glue(
        glue.load_recipe(path).model_copy(update={"merge": glue.MergeSpec(strategy="all"), "mixture": None}),
        tmp_path / "all",
        path.parent,
    )
    rows = load_eval_rows(path.parent / "held-out.jsonl")  # rows of {prompt, completion, task}
    mine = {
        "cluster": held_out_mean(tmp_path / "out" / first["path"], rows),
        "everything": held_out_mean(tmp_path / "all" / everything["clusters"][0]["path"], rows),
        "mixture": held_out_mean(tmp_path / "out" / "mixture", rows),
    }
    said = (first["held_out"], everything["clusters"][0]["held_out"], report["mixture"]["held_out"])
    assert [s["mean"] for s in said] == pytest.approx(list(mine.values()), abs=0.03), mine  # the report tells it
    assert mine["cluster"] > mine["everything"]  # leaving the harmful expert out helps
    best_member = max(report["members_held_out"], key=lambda m: report["members_held_out"][m]["mean"])
    member_path = next(m.path for m in glue.load_recipe(path).models if m.name == best_member)
    best_single = held_out_mean(path.parent / member_path, rows)
    assert mine["mixture"] > best_single, (mine, best_member, best_single)
    for name in ("glue-report.json", "glue-report.md", "glue-trials.png", "mixture/config.json"):
        assert (tmp_path / "out" / name).is_file()


@pytest.mark.slow
def test_inspect_says_where_each_change_lives_and_what_is_not_a_fine_tune(zoo_dir, tmp_path):
    from moe_merge.cli import main

    z = zoo_dir
    refs = [z / "full/shift", z / "mlp/shift", z / "full/back-lora", z / "search/family2/back", z / "search/alien"]
    assert main(["inspect", str(z / "base"), *map(str, refs), "--threshold", "0.5", "--out", str(tmp_path / "i")]) == 0
    found = json.loads((tmp_path / "i" / "inspect.json").read_text())
    advice = found["advice"]
    assert advice["full/shift"].startswith("block") and advice["mlp/shift"].startswith("ffn")
    assert advice["full/back-lora"].startswith("block")
    assert "another initialisation" in advice["search/family2/back"]
    assert "`model_type` differs" in advice["search/alien"]
    assert found["clusters"] == [
        ["full/shift", "mlp/shift", "full/back-lora"],
        ["search/family2/back"],
        ["search/alien"],
    ]
    assert (tmp_path / "i" / "inspect.png").stat().st_size > 0


# ----------------------------------------------------------------------------------------- every strategy, end to end

TRIALS = {  # for two members: each alone, then the newcomer added (once, or at each of 9 coefficients)
    "all": 1,
    "heuristic_average": 2 + 1,
    "heuristic_coefficient": 2 + 9,
    "heuristic_similarity": 2 + 9,
    "evolutionary": 7,  # the budget
    "mixup": 2 * 3,  # alphas x samples
}


@pytest.mark.parametrize("strategy", glue.STRATEGIES)
def test_moe_merge_glue_runs_each_strategy_and_writes_the_merge_it_chose(picos, tmp_path, strategy):
    """`moe-merge glue` on the pico members: the trials each strategy promises, the chosen candidate the best it
    may keep, and the written cluster, tensor by tensor, Σ_e w_e θ_e of the members' own tensors."""
    import yaml
    from safetensors.torch import load_file

    from moe_merge.cli import main as cli_main

    models = [{"name": f"e{i}", "path": str(p), "base": str(picos["base"])} for i, p in enumerate(picos["experts"])]
    merge = {"strategy": strategy, "budget": 7, "mixup": {"alpha": [0.5, 2.0], "samples": 3}}
    recipe = {
        "models": models,
        "proxy": {"path": str(picos["proxy"]), "metric": "nll"},
        "clustering": {"threshold": -1.0},  # one cluster of both
        "merge": merge,
        "mixture": None,
    }
    (tmp_path / "glue.yaml").write_text(yaml.safe_dump(recipe))
    assert cli_main(["glue", str(tmp_path / "glue.yaml"), str(tmp_path / "out")]) == 0

    (cluster,) = json.loads((tmp_path / "out" / "glue-report.json").read_text())["clusters"]
    assert cluster["strategy"] == strategy and len(cluster["trials"]) == TRIALS[strategy]
    chosen, scores = cluster["chosen"], [t["score"] for t in cluster["trials"]]
    if strategy.startswith("heuristic_"):  # monotone: never below the best member alone
        assert chosen["score"] >= max(scores[:2])
    elif strategy != "all":
        assert chosen["score"] == max(scores)
    (w,) = chosen["weights"]  # one layer group
    assert sum(w) == pytest.approx(1.0, abs=1e-6)
    written = load_file(next((tmp_path / "out" / cluster["path"]).glob("*.safetensors")))
    members = [load_file(p / "model.safetensors") for p in picos["experts"]]
    for name, t in written.items():
        expected = sum(w[e] * m[name].double() for e, m in enumerate(members))
        torch.testing.assert_close(t.double(), expected, rtol=0, atol=1e-6, msg=name)
