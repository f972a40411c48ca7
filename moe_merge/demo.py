"""`moe-merge demo`: the whole path on the tiny zoo, with the numbers that matter printed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from moe_merge import zoo
from moe_merge.methods import DYNAMIC_PAIRS
from moe_merge.tokens import load_tokenizer

SPARSE_FFN = {  # stock Mixtral outputs (Foundation): name -> recipe overrides
    "sparse ffn, gate_mode hidden (mergekit's YAML)": {"gate_mode": "hidden", "experts_per_token": 2},
    "sparse ffn, router.init fit, top-1": {"router": {"init": "fit"}, "experts_per_token": 1},
}
STATIC = ("average", "task_arithmetic", "ties")


TRAIN_STEPS = 300  # router-only steps for every trained row (the goal's budget)
OBJECTIVE = {"lm": 1.0, "routing": 1.0}
# Router-training runs beyond the dynamic table (whose every model is trained from its prompt start): starts no
# prompt fixes, WEMoE's own recipe, and the stock export. (zoo variant, name, recipe overrides, objective)
ROUTER_RUNS = [
    (
        "mlp",
        "wemoe ffn, task-arithmetic start (raw weights)",
        {"method": "wemoe", "level": "ffn", "router": {"init": "random", "normalize": "none"}},
        OBJECTIVE,
    ),
    (
        "mlp",
        "wemoe ffn, task-arithmetic start, entropy (WEMoE's recipe)",
        {"method": "wemoe", "level": "ffn", "router": {"init": "random", "normalize": "none"}},
        {"entropy": 1.0},
    ),
    (
        "mlp",
        "wemoe ffn, uniform start (softmax, 1/E each)",
        {"method": "wemoe", "level": "ffn", "router": {"init": "uniform"}},
        OBJECTIVE,
    ),
    ("mlp", "sparse ffn (stock Mixtral, fit, top-2)", {"router": {"init": "fit"}, "experts_per_token": 2}, OBJECTIVE),
    ("mlp", "sparse ffn (stock Mixtral, fit, top-1)", {"router": {"init": "fit"}, "experts_per_token": 1}, OBJECTIVE),
]


def train(model_dir: Path, run_dir: Path, data: Path, steps: int, objective: dict[str, float]) -> tuple[dict, dict]:
    """Train only the routers of `model_dir` on `data`; (exact match after, the run's summary). The run's own
    lines go to its log.jsonl, not to the demo's table."""
    import contextlib
    import io

    from moe_merge.train.loop import TrainRouterArgs, train_router

    with contextlib.redirect_stdout(io.StringIO()):
        summary = train_router(
            model_dir,
            run_dir,
            TrainRouterArgs(
                data=data,
                steps=steps,
                lr=0.05,
                batch_size=16,
                objective=objective,
                eval_every=50,
                save_every=steps,
                force=True,
            ),
        )
    return evaluate(run_dir / "model"), summary


def train_and_score(zoo_dir: Path, out: Path, run: tuple, data: Path, steps: int) -> dict:
    """Assemble one recipe training-free, train only its routers on `data`, score both on the eval words."""
    from moe_merge.assemble import assemble
    from moe_merge.config import MergeConfig

    variant, name, overrides, objective = run
    experts = expert_scores(zoo_dir, variant)
    slug = f"{variant}-{name.split(',')[0].split(' (')[0].replace(' ', '-')}-{ROUTER_RUNS.index(run)}"
    model_dir = assemble(
        MergeConfig.model_validate(zoo.zoo_recipe(zoo_dir, variant, **overrides)), out / slug, force=True
    )
    before = evaluate(model_dir)
    after, summary = train(model_dir, out / f"{slug}-run", data, steps, objective)
    return {
        "variant": variant,
        "name": name,
        "objective": objective,
        "steps": steps,
        "before": before,
        "after": after,
        "worst": {"before": worst(before, experts), "after": worst(after, experts)},
        "seconds_per_step": summary["seconds_per_step"],
        "train_minutes": summary["train_minutes"],
    }


def router_rows(results: list[dict]) -> str:
    lines = [
        "| experts | model | objective | "
        + " | ".join(zoo.EXPERT_TASKS)
        + " | worst vs expert: before → after | s/step |",
        "|---|---|---|" + "---|" * len(zoo.EXPERT_TASKS) + "---|---|",
    ]
    for r in results:
        cells = " | ".join(f"{r['after'][t]:.0%}" for t in zoo.EXPERT_TASKS)
        lines.append(
            f"| {r['variant']} | {r['name']} | {'+'.join(r['objective'])} | {cells} | "
            f"{r['worst']['before']:.0%} → {r['worst']['after']:.0%} | {r['seconds_per_step']:.3f} |"
        )
    return "\n".join(lines)


def worst(scores: dict[str, float], experts: dict[str, float]) -> float:
    """The worst task's score relative to its expert's."""
    return min(scores[t] / experts[t] for t in zoo.EXPERT_TASKS if experts[t] > 0)


def oracle(model_dir: Path) -> dict[str, float]:
    """Each task with the merge weights forced one-hot to its expert: what perfect routing would score."""
    from transformers import AutoModelForCausalLM

    from moe_merge.quality import oracle_scores

    rows = [
        {"prompt": zoo.prompt(t, w), "completion": zoo.apply_task(t, w), "task": t}
        for t in zoo.EXPERT_TASKS
        for w in zoo.task_prompts(t)["eval_words"]
    ]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return {t: s for t, (s, _) in oracle_scores(model, load_tokenizer(model_dir), rows).items()}


def evaluate(model_dir: Path) -> dict[str, float]:
    """Exact match on each zoo task's 64 held-out words."""
    from transformers import AutoModelForCausalLM

    return zoo.scores(AutoModelForCausalLM.from_pretrained(model_dir), load_tokenizer(model_dir))


def expert_scores(zoo_dir: Path, variant: str) -> dict[str, float]:
    """Each expert of `variant` on its own task, measured on the checkpoint as users load it."""
    tok = load_tokenizer(zoo_dir / "base")
    experts = zoo.zoo_recipe(zoo_dir, variant)["experts"]
    return {e["name"]: zoo.scores(zoo.load_checkpoint(e["source_model"]), tok, [e["name"]])[e["name"]] for e in experts}


def _row(name: str, scores: dict[str, float], experts: dict[str, float], *more: float) -> str:
    cells = [scores[t] for t in zoo.EXPERT_TASKS] + [worst(scores, experts), *more]
    return f"| {name} | " + " | ".join(f"{c:.0%}" for c in cells) + " |"


def static_scores(zoo_dir: Path, variant: str, method: str) -> dict[str, float]:
    """Exact match of a plain static merge of the variant's experts (the contrast row)."""
    from transformers import AutoModelForCausalLM

    from moe_merge.assemble.read import static_merge
    from moe_merge.config import MergeConfig
    from moe_merge.recipe import open_recipe

    recipe = open_recipe(MergeConfig.model_validate(zoo.zoo_recipe(zoo_dir, variant, non_expert=method)))
    model = AutoModelForCausalLM.from_pretrained(recipe.base.path)
    model.load_state_dict({name: static_merge(recipe, name, seed=0) for name in recipe.base.keys()}, strict=False)
    return zoo.scores(model, load_tokenizer(recipe.base.path))


DEMO_RUNS = (0, 3)  # of ROUTER_RUNS: the task-arithmetic start and the stock top-2 export (the rest: examples/)


def run_demo(out: Path) -> dict:
    zoo_dir = zoo.ensure_zoo()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"zoo: {zoo_dir}")
    data = out / "router-training-rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in zoo.router_training_rows(80)))
    tasks = " | ".join(zoo.EXPERT_TASKS)
    header = f"| model | {tasks} | worst task vs its expert |\n|---|" + "---|" * (len(zoo.EXPERT_TASKS) + 1)
    results: dict[str, Any] = {}
    for variant in zoo.VARIANTS:
        experts = expert_scores(zoo_dir, variant)
        base = zoo.scores(zoo.load_checkpoint(zoo_dir / "base"), load_tokenizer(zoo_dir / "base"))
        rows = results[variant] = {"base": base, "experts (each on its own task)": experts}
        print(
            f"\n## {variant} fine-tunes ({'MLPs only' if variant == 'mlp' else 'every weight'}): exact match per task\n"
        )
        print(header)
        for name, scores in rows.items():
            print(_row(name, scores, experts))
        for method in STATIC:
            rows[f"static {method}"] = scores = static_scores(zoo_dir, variant, method)
            print(_row(f"static {method}", scores, experts))
        for name, overrides in SPARSE_FFN.items():
            target = out / f"{variant}-{name.split(',')[0].replace(' ', '-')}-{len(rows)}"
            rows[name] = scores = evaluate(_assemble(zoo_dir, variant, overrides, target))
            print(_row(name, scores, experts))
        print(
            f"\nDynamic models, training-free; the oracle forces each task's merge weights one-hot to its expert; "
            f"then {TRAIN_STEPS} steps of router-only training on 400 mixed rows (the worst task vs its expert):\n"
        )
        print(
            f"| model | {tasks} | worst | oracle: worst | trained: worst |\n|---|"
            + "---|" * (len(zoo.EXPERT_TASKS) + 3)
        )
        for method, level in DYNAMIC_PAIRS:
            name = f"{method} {level}"
            target = _assemble(
                zoo_dir, variant, {"method": method, "level": level}, out / f"{variant}-{method}-{level}"
            )
            scores, best = evaluate(target), oracle(target)
            after, summary = train(target, out / f"{variant}-{method}-{level}-run", data, TRAIN_STEPS, OBJECTIVE)
            rows[name] = {
                "training-free": scores,
                "oracle": best,
                "trained": after,
                "seconds_per_step": summary["seconds_per_step"],
            }
            print(_row(name, scores, experts, worst(best, experts), worst(after, experts)))
    last = out / "mlp-smear-ffn"
    report = json.loads((last / "routing_report.json").read_text())
    print(f"\nrouting report of {last.name}: share of each expert's held-out prompts routed to it, per router")
    for k, acc in enumerate(r["accuracy"] for r in report["routers"]):
        print(f"  router {k}: " + "  ".join(f"{e} {a:.0%}" for e, a in zip(report["experts"], acc)))
    print(f"\nsamples from {last.name} (greedy), with the merge weights each prompt chose:")
    _samples(last)
    print(f"\n## router-only fine-tuning from starts no prompt fixes ({TRAIN_STEPS} steps, 400 mixed rows)\n")
    trained = [train_and_score(zoo_dir, out, ROUTER_RUNS[i], data, TRAIN_STEPS) for i in DEMO_RUNS]
    print(router_rows(trained))
    print(
        f"\n{trained[0]['seconds_per_step']:.3f} s per step on this CPU; `python examples/router_training.py` runs "
        "every start."
    )
    results["router training"] = trained
    (out / "quality.json").write_text(json.dumps(results, indent=2))
    print(f"\nmodels, recipes, routing reports (JSON + PNG) and quality.json are in {out.absolute()}")
    return results


def _assemble(zoo_dir: Path, variant: str, overrides: dict, target: Path) -> Path:
    """Assemble the zoo variant with `overrides` into `target`, its recipe written beside it."""
    from moe_merge.assemble import assemble
    from moe_merge.config import MergeConfig

    recipe = zoo.zoo_recipe(zoo_dir, variant, **overrides)
    (target.parent / f"{target.name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return assemble(MergeConfig.model_validate(recipe), target, force=True)


def _samples(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir)  # a dynamic model: generate's annotations vary
    tok = load_tokenizer(model_dir)
    for task in zoo.EXPERT_TASKS:
        word = zoo.task_prompts(task)["eval_words"][0]
        enc = tok(zoo.prompt(task, word), return_tensors="pt")
        out = model.generate(
            **enc,
            max_new_tokens=9,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            return_dict_in_generate=True,
            output_scores=False,
        )
        text = tok.decode(out.sequences[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        weights = model.model(**enc, use_cache=False).merge_weights[0].mean(0)
        top = int(weights.argmax())
        print(
            f"  {zoo.prompt(task, word)}{text:<10} (expected {zoo.apply_task(task, word):<8}) "
            f"routed to {model.config.expert_names[top]} ({weights[top]:.2f})"
        )


# ----------------------------------------------------------------------------------------- the real-model zoo

REAL_STOCK = {  # the stock Mixtral export of the real zoo's adapters: name -> recipe overrides
    "sparse ffn, mergekit's YAML (gate_mode hidden, top-2, the base's attention)": {
        "gate_mode": "hidden",
        "experts_per_token": 2,
        "non_expert": "base",
    },
    "sparse ffn, router.init fit, top-1 (averaged attention)": {"router": {"init": "fit"}, "experts_per_token": 1},
}


def run_real_demo(out: Path, base: str) -> dict:
    """The real-model zoo's four LoRA experts, assembled every way, training-free: exact match on each task's
    held-out prompts (with each dynamic model's oracle), a static merge and the stock exports beside them, then a
    few answers with the merge weights that chose them. Router training and the full fine-tunes:
    `python benchmarks/real_zoo.py`."""
    import torch

    from moe_merge import realzoo
    from moe_merge.assemble import assemble
    from moe_merge.config import MergeConfig
    from moe_merge.generate import load
    from moe_merge.quality import exact_match, oracle_scores

    zoo_dir = realzoo.ensure_real_zoo(base)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"real zoo ({base}): {zoo_dir}")
    tasks = list(realzoo.LORA_TASKS)
    rows = [{**r, "task": r["expert"]} for r in realzoo.eval_rows(tasks)]
    tok = load_tokenizer(zoo_dir / "base")

    def score(model, **kw) -> dict[str, float]:
        return {t: s for t, (s, _) in exact_match(model, tok, rows, **kw).items()}

    experts = {t: score(realzoo.load_checkpoint(zoo_dir / realzoo.TASK[t].expert))[t] for t in tasks}

    def row(name, got, *more):
        cells = [got[t] for t in tasks] + [min(got[t] / experts[t] for t in tasks), *more]
        print(f"| {name} | " + " | ".join(f"{c:.0%}" for c in cells) + " |", flush=True)

    print(f"\n## LoRA experts on every linear layer ({', '.join(tasks)}): exact match on 24 held-out prompts each\n")
    print(f"| model | {' | '.join(tasks)} | worst vs its expert |\n|---|" + "---|" * (len(tasks) + 1))
    results: dict[str, Any] = {"experts": experts, "base": score(load(zoo_dir / "base")[0])}
    row("base", results["base"])
    row("experts (each on its own task)", experts)
    smear = assemble(
        MergeConfig.model_validate(realzoo.zoo_recipe(zoo_dir, "lora", method="smear", level="block")),
        out / "smear-block",
        force=True,
    )
    results["static average"] = score(load(smear)[0], merge_weights=torch.full((len(tasks),), 1 / len(tasks)))
    row("static average", results["static average"])
    for name, overrides in REAL_STOCK.items():
        target = assemble(
            MergeConfig.model_validate(realzoo.zoo_recipe(zoo_dir, "lora", **overrides)),
            out / f"stock-{len(results)}",
            force=True,
        )
        results[name] = score(load(target)[0])
        row(name, results[name])
    print("\nDynamic models, training-free; the oracle forces each task's merge weights one-hot to its expert:\n")
    print(f"| model | {' | '.join(tasks)} | worst | oracle: worst |\n|---|" + "---|" * (len(tasks) + 2))
    for method, level in DYNAMIC_PAIRS:
        target = (
            smear
            if (method, level) == ("smear", "block")
            else assemble(
                MergeConfig.model_validate(realzoo.zoo_recipe(zoo_dir, "lora", method=method, level=level)),
                out / f"{method}-{level}",
                force=True,
            )
        )
        model = load(target)[0]
        got, best = score(model), {t: s for t, (s, _) in oracle_scores(model, tok, rows).items()}
        results[f"{method} {level}"] = {"training-free": got, "oracle": best}
        row(f"{method} {level}", got, min(best[t] / experts[t] for t in tasks))
    print(f"\nsamples from {smear.name} (greedy), with the merge weights each prompt chose:")
    model = load(smear)[0]
    for task in tasks:
        r = realzoo.eval_rows([task])[0]
        enc = tok(r["prompt"], return_tensors="pt")
        with torch.no_grad():
            new = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
            weights = model.model(**enc, use_cache=False).merge_weights[0].mean(0)
        text = tok.decode(new[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        top = int(weights.argmax())
        print(
            f"  {r['prompt'].splitlines()[0]} ->{text:<14} (expected{r['completion']}) routed to "
            f"{model.config.expert_names[top]} ({weights[top]:.2f})"
        )
    (out / "quality.json").write_text(json.dumps(results, indent=2))
    print(
        f"\nmodels and quality.json are in {out.absolute()}; router training, the full fine-tunes, decode speed and "
        "mergekit-moe: python benchmarks/real_zoo.py"
    )
    return results
