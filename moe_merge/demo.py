"""`moe-merge demo`: the whole path on the tiny zoo, with the numbers that matter printed."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from moe_merge import zoo

RECIPES = {  # name -> recipe overrides on top of the zoo's experts and prompts
    "gate_mode: hidden (mergekit's YAML)": {"gate_mode": "hidden", "experts_per_token": 2},
    "router.init: fit, top-1": {"router": {"init": "fit"}, "experts_per_token": 1},
    "router.init: fit, top-2": {"router": {"init": "fit"}, "experts_per_token": 2},
}


def evaluate(model_dir: Path) -> dict[str, float]:
    """Exact match on each zoo task's 64 held-out words."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    return {t: zoo.exact_match(model, tok, t, zoo.task_prompts(t)["eval_words"]) for t in zoo.EXPERT_TASKS}


def _row(name: str, scores: dict[str, float]) -> str:
    return f"| {name} | " + " | ".join(f"{scores[t]:.0%}" for t in zoo.EXPERT_TASKS) + " |"


def run_demo(out: Path) -> dict:
    from moe_merge.assemble import assemble
    from moe_merge.config import MergeConfig

    zoo_dir = zoo.ensure_zoo()
    manifest = json.loads((zoo_dir / "zoo.json").read_text())
    print(f"zoo: {zoo_dir}")
    header = "| model | " + " | ".join(zoo.EXPERT_TASKS) + " |\n|---|" + "---|" * len(zoo.EXPERT_TASKS)
    results: dict[str, dict[str, float]] = {}
    for variant in zoo.VARIANTS:
        print(f"\n## {variant} fine-tunes ({'MLPs only' if variant == 'mlp' else 'every weight'}): exact match per task\n")
        print(header)
        print(_row("base", manifest["exact_match"]["base"]))
        for task, rel in manifest["experts"][variant].items():
            print(_row(f"expert {rel}", manifest["exact_match"][rel]))
        for name, overrides in RECIPES.items():
            recipe = zoo.zoo_recipe(zoo_dir, variant, **overrides)
            target = Path(out) / f"{variant}-{len(results)}"
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / f"{target.name}.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
            assemble(MergeConfig.model_validate(recipe), target, force=True)
            results[f"{variant}: {name}"] = scores = evaluate(target)
            print(_row(f"MoE, {name}", scores))
        report = json.loads((target / "routing_report.json").read_text())
        print("\nrouting report of the last MoE: top-1 routing accuracy of each expert's eval tokens, per layer")
        for lay in report["layers"]:
            print(f"  layer {lay['layer']}: " + "  ".join(f"{e} {a:.0%}" for e, a in zip(report["experts"], lay["accuracy"])))
        print("  tokens routed right at every layer: "
              + "  ".join(f"{e} {a:.0%}" for e, a in zip(report["experts"], report["tokens_routed_right_at_every_layer"])))
        for w in report["warnings"]:
            print(f"  warning: {w}")
    print("\nsamples from the last MoE (greedy):")
    _samples(target)
    print(f"\nmodels, recipes and routing reports (JSON + PNG) are in {Path(out).absolute()}")
    return results


def _samples(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    for task in zoo.EXPERT_TASKS:
        word = zoo.task_prompts(task)["eval_words"][0]
        enc = tok(zoo.prompt(task, word), return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=9, do_sample=False, pad_token_id=zoo.PAD_ID)
        text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"  {zoo.prompt(task, word)}{text:<10} (expected {zoo.apply_task(task, word)})")
