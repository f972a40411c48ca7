"""`moe-merge demo`: the whole path on the tiny zoo, with the numbers that matter printed."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from moe_merge import zoo
from moe_merge.tokens import load_tokenizer

SPARSE_FFN = {  # stock Mixtral outputs (Foundation): name -> recipe overrides
    "sparse ffn, gate_mode hidden (mergekit's YAML)": {"gate_mode": "hidden", "experts_per_token": 2},
    "sparse ffn, router.init fit, top-1": {"router": {"init": "fit"}, "experts_per_token": 1},
}
STATIC = ("average", "task_arithmetic", "ties")
# Dynamic models, each with nothing but method and level set: training-free, prompt-initialised routers.
DYNAMIC = [("smear", "ffn"), ("wemoe", "ffn"), ("twin", "ffn"), ("smear", "block"), ("wemoe", "block"),
           ("twin", "block"), ("sparse", "block"), ("sparse", "model")]


# Router-only fine-tuning runs: (zoo variant, name, recipe overrides, objective). The demo trains the first.
ROUTER_RUNS = [
    ("mlp", "wemoe ffn, task-arithmetic start", {
        "method": "wemoe", "level": "ffn", "router": {"init": "random", "normalize": "none"}}, {"lm": 1.0, "routing": 1.0}),
    ("mlp", "wemoe ffn, task-arithmetic start, entropy (WEMoE's recipe)", {
        "method": "wemoe", "level": "ffn", "router": {"init": "random", "normalize": "none"}}, {"entropy": 1.0}),
    ("mlp", "sparse ffn (stock Mixtral, fit, top-1)", {"router": {"init": "fit"}, "experts_per_token": 1}, {"lm": 1.0, "routing": 1.0}),
    ("mlp", "smear ffn", {"method": "smear", "level": "ffn"}, {"lm": 1.0, "routing": 1.0}),
    ("mlp", "wemoe ffn", {"method": "wemoe", "level": "ffn"}, {"lm": 1.0, "routing": 1.0}),
    ("mlp", "twin ffn", {"method": "twin", "level": "ffn"}, {"lm": 1.0, "routing": 1.0}),
    ("full", "smear block", {"method": "smear", "level": "block"}, {"lm": 1.0, "routing": 1.0}),
    ("full", "wemoe block", {"method": "wemoe", "level": "block"}, {"lm": 1.0, "routing": 1.0}),
    ("full", "twin block", {"method": "twin", "level": "block"}, {"lm": 1.0, "routing": 1.0}),
    ("full", "sparse block", {"method": "sparse", "level": "block"}, {"lm": 1.0, "routing": 1.0}),
    ("full", "sparse model", {"method": "sparse", "level": "model"}, {"lm": 1.0, "routing": 1.0}),
]


def train_and_score(zoo_dir: Path, out: Path, run: tuple, data: Path, steps: int) -> dict:
    """Assemble one recipe training-free, train only its routers on `data`, score both on the eval words."""
    from moe_merge.assemble import assemble
    from moe_merge.config import MergeConfig
    from moe_merge.train.loop import TrainRouterArgs, train_router

    variant, name, overrides, objective = run
    experts = expert_scores(zoo_dir, variant)
    slug = f"{variant}-{name.split(',')[0].split(' (')[0].replace(' ', '-')}-{ROUTER_RUNS.index(run)}"
    model_dir = assemble(MergeConfig.model_validate(zoo.zoo_recipe(zoo_dir, variant, **overrides)), out / slug, force=True)
    before = evaluate(model_dir)
    summary = train_router(model_dir, out / f"{slug}-run", TrainRouterArgs(
        data=data, steps=steps, lr=0.05, batch_size=16, objective=objective, eval_every=50, save_every=steps, force=True))
    after = evaluate(out / f"{slug}-run" / "model")
    worst = {k: min(s[t] / experts[t] for t in zoo.EXPERT_TASKS) for k, s in (("before", before), ("after", after))}
    return {"variant": variant, "name": name, "objective": objective, "steps": steps, "before": before, "after": after,
            "worst": worst, "seconds_per_step": summary["seconds_per_step"], "train_minutes": summary["train_minutes"]}


def router_rows(results: list[dict]) -> str:
    lines = ["| experts | model | objective | " + " | ".join(zoo.EXPERT_TASKS) + " | worst vs expert: before → after | s/step |",
             "|---|---|---|" + "---|" * len(zoo.EXPERT_TASKS) + "---|---|"]
    for r in results:
        cells = " | ".join(f"{r['after'][t]:.0%}" for t in zoo.EXPERT_TASKS)
        lines.append(f"| {r['variant']} | {r['name']} | {'+'.join(r['objective'])} | {cells} | "
                     f"{r['worst']['before']:.0%} → {r['worst']['after']:.0%} | {r['seconds_per_step']:.3f} |")
    return "\n".join(lines)


def evaluate(model_dir: Path) -> dict[str, float]:
    """Exact match on each zoo task's 64 held-out words."""
    from transformers import AutoModelForCausalLM

    return zoo.scores(AutoModelForCausalLM.from_pretrained(model_dir), load_tokenizer(model_dir))


def expert_scores(zoo_dir: Path, variant: str) -> dict[str, float]:
    """Each expert of `variant` on its own task, measured on the checkpoint as users load it."""
    tok = load_tokenizer(zoo_dir / "base")
    experts = zoo.zoo_recipe(zoo_dir, variant)["experts"]
    return {e["name"]: zoo.scores(zoo.load_checkpoint(e["source_model"]), tok, [e["name"]])[e["name"]] for e in experts}


def _row(name: str, scores: dict[str, float], experts: dict[str, float]) -> str:
    worst = min(scores[t] / experts[t] for t in zoo.EXPERT_TASKS if experts[t] > 0)
    return f"| {name} | " + " | ".join(f"{scores[t]:.0%}" for t in zoo.EXPERT_TASKS) + f" | {worst:.0%} |"


def static_scores(zoo_dir: Path, variant: str, method: str) -> dict[str, float]:
    """Exact match of a plain static merge of the variant's experts (the contrast row)."""
    import torch
    from transformers import AutoModelForCausalLM

    from moe_merge.assemble.dynamic import StaticMerge
    from moe_merge.config import MergeConfig
    from moe_merge.recipe import open_recipe

    recipe = open_recipe(MergeConfig.model_validate(zoo.zoo_recipe(zoo_dir, variant, non_expert=method)))
    merge = StaticMerge(recipe, seed=0, dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(recipe.base.path)
    model.load_state_dict({name: merge(name) for name in recipe.base.keys()}, strict=False)
    return zoo.scores(model, load_tokenizer(recipe.base.path))


def run_demo(out: Path) -> dict:
    from moe_merge.assemble import assemble
    from moe_merge.config import MergeConfig

    zoo_dir = zoo.ensure_zoo()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"zoo: {zoo_dir}")
    header = ("| model | " + " | ".join(zoo.EXPERT_TASKS) + " | worst task vs its expert |\n|---|"
              + "---|" * (len(zoo.EXPERT_TASKS) + 1))
    results: dict[str, dict[str, dict[str, float]]] = {}
    for variant in zoo.VARIANTS:
        experts = expert_scores(zoo_dir, variant)
        base = zoo.scores(zoo.load_checkpoint(zoo_dir / "base"), load_tokenizer(zoo_dir / "base"))
        rows = results[variant] = {"base": base, "experts (each on its own task)": experts}
        print(f"\n## {variant} fine-tunes ({'MLPs only' if variant == 'mlp' else 'every weight'}): exact match per task\n")
        print(header)
        for name, scores in rows.items():
            print(_row(name, scores, experts))
        for method in STATIC:
            rows[f"static {method}"] = scores = static_scores(zoo_dir, variant, method)
            print(_row(f"static {method}", scores, experts))
        runs = [(name, overrides) for name, overrides in SPARSE_FFN.items()]
        runs += [(f"{method} {level}", {"method": method, "level": level}) for method, level in DYNAMIC]
        for name, overrides in runs:
            recipe = zoo.zoo_recipe(zoo_dir, variant, **overrides)
            target = out / f"{variant}-{name.split(',')[0].replace(' ', '-')}{'-' + str(len(rows)) if ',' in name else ''}"
            (out / f"{target.name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
            assemble(MergeConfig.model_validate(recipe), target, force=True)
            rows[name] = scores = evaluate(target)
            print(_row(name, scores, experts))
        if variant == "full":
            print("\nFFN level cannot recover what full fine-tunes learned in attention: only block level, model level "
                  "and twin block touch it.")
    last = out / "mlp-smear-ffn"
    report = json.loads((last / "routing_report.json").read_text())
    print(f"\nrouting report of {last.name}: share of each expert's held-out prompts routed to it, per router")
    for k, acc in enumerate(r["accuracy"] for r in report["routers"]):
        print(f"  router {k}: " + "  ".join(f"{e} {a:.0%}" for e, a in zip(report["experts"], acc)))
    print(f"\nsamples from {last.name} (greedy), with the merge weights each prompt chose:")
    _samples(last)
    print("\n## router-only fine-tuning (moe-merge train-router): exact match after, on 400 mixed-task rows\n")
    data = out / "router-training-rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in zoo.router_training_rows(80)))
    trained = [train_and_score(zoo_dir, out, ROUTER_RUNS[0], data, steps=150)]
    print(router_rows(trained))
    print(f"\n{trained[0]['seconds_per_step']:.3f} s per step, {trained[0]['train_minutes']:.2f} min of training on "
          f"this CPU; `python examples/router_training.py` runs every method.")
    results["router training"] = trained
    (out / "quality.json").write_text(json.dumps(results, indent=2))
    print(f"\nmodels, recipes, routing reports (JSON + PNG) and quality.json are in {out.absolute()}")
    return results


def _samples(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = load_tokenizer(model_dir)
    for task in zoo.EXPERT_TASKS:
        word = zoo.task_prompts(task)["eval_words"][0]
        enc = tok(zoo.prompt(task, word), return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=9, do_sample=False, pad_token_id=tok.pad_token_id,
                             return_dict_in_generate=True, output_scores=False)
        text = tok.decode(out.sequences[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        weights = model(**enc, use_cache=False).merge_weights[0].mean(0)
        top = int(weights.argmax())
        print(f"  {zoo.prompt(task, word)}{text:<10} (expected {zoo.apply_task(task, word):<8}) "
              f"routed to {model.config.expert_names[top]} ({weights[top]:.2f})")
