"""Merge search on the tiny zoo: every selection strategy, evolutionary against heuristic at the same budget,
and M³ against its base method, scored on held-out rows the search never saw.

- Strategies: `moe-merge glue` on `tests/fixtures.py`'s `glue_recipe` (threshold 0.5, proxy 8 rows per task), one run per
  strategy; the held-out mean is greedy exact match on 64 eval words per task (five tasks).
- Same budget: CMA-ES given exactly the trials each heuristic used.
- M³: on pairs of models, each base method at equal weights (λ = 0.5, which is the base method itself: for TIES
  the disjoint mean) against the best of 8 seeded draws per α ∈ {0.4, 0.5, 1, 2}, chosen on the proxy;
  held-out scores read from one forward pass (teacher-forced greedy exact match, `search.proxy`).
Usage: python benchmarks/glue_zoo.py [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch

from moe_merge import zoo
from moe_merge.merge import mixup_draws
from moe_merge.search import glue, proxy
from moe_merge.tokens import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests/fixtures.py
from tests.fixtures import glue_recipe

ALPHAS, SAMPLES = (0.4, 0.5, 1.0, 2.0), 8
PAIRS = {
    "two seeds of shift": ("full/shift", "search/shift-seed1"),
    "shift, MLP-only and full": ("full/shift", "mlp/shift"),
    "shift and mirror": ("full/shift", "full/mirror"),
}
BASE_METHODS = ("average", "task_arithmetic", "ties", "dare_ties")


def strategies(zoo_dir: Path, work: Path) -> list[dict]:
    path = glue_recipe(zoo_dir, work / "recipe")
    recipe = glue.load_recipe(path).model_copy(update={"mixture": None})
    rows = []
    for strategy in glue.STRATEGIES:
        spec = glue.MergeSpec(strategy=strategy)
        report = glue.run_glue(recipe.model_copy(update={"merge": spec}), work / strategy, path.parent)
        c = report["clusters"][0]
        rows.append(
            {
                "strategy": strategy,
                "trials": len(c["trials"]),
                "proxy": c["chosen"]["score"],
                "held_out": c["held_out"]["mean"],
                "shift": c["held_out"]["shift"],
                "weights": [round(x, 3) for x in c["chosen"]["weights"][0]],
            }
        )
    for heuristic in [r for r in rows if r["strategy"].startswith("heuristic")]:
        spec = glue.MergeSpec(strategy="evolutionary", budget=heuristic["trials"])
        report = glue.run_glue(
            recipe.model_copy(update={"merge": spec}), work / f"cma-{heuristic['strategy']}", path.parent
        )
        c = report["clusters"][0]
        rows.append(
            {
                "strategy": f"evolutionary at {heuristic['strategy']}'s budget",
                "trials": len(c["trials"]),
                "proxy": c["chosen"]["score"],
                "held_out": c["held_out"]["mean"],
                "shift": c["held_out"]["shift"],
                "weights": [round(x, 3) for x in c["chosen"]["weights"][0]],
            }
        )
    return rows


def m3(zoo_dir: Path, work: Path) -> list[dict]:
    tok = load_tokenizer(zoo_dir / "base")
    (work / "held.jsonl").write_text("".join(json.dumps(r) + "\n" for r in zoo.eval_rows()))
    prox = proxy.load_proxy(work / "recipe" / "proxy.jsonl", tok)
    held = proxy.load_proxy(work / "held.jsonl", tok)
    rows = []
    for pair, (a, b) in PAIRS.items():
        for method in BASE_METHODS:
            vectors = "linear" if method in ("average", "task_arithmetic") else method
            split = method.endswith("ties")
            model = proxy.candidate_model(zoo_dir / "base", [zoo_dir / a, zoo_dir / b], vectors, 0.5, 0, split)
            R, extra = model.config.num_routers, [1.0] * split

            def cand(lam, R=R, extra=extra):
                return torch.tensor([list(lam) + extra] * R, dtype=torch.float64)

            draws = [(alpha, d) for alpha in ALPHAS for d in mixup_draws(2, alpha, SAMPLES, seed=0)]
            cands = [cand([0.5, 0.5])] + [cand(d) for _, d in draws]
            on_proxy = proxy.score(model, prox, cands)
            best = 1 + max(range(len(draws)), key=lambda k: on_proxy[k + 1].score)
            on_held = proxy.score(model, held, [cands[0], cands[best]])
            rows.append(
                {
                    "pair": pair,
                    "base_method": method,
                    "base_held_out": on_held[0].score,
                    "m3_held_out": on_held[1].score,
                    "alpha": draws[best - 1][0],
                    "lambda": round(draws[best - 1][1][0], 4),
                    "base_proxy": on_proxy[0].score,
                    "m3_proxy": on_proxy[best].score,
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    zoo_dir = zoo.ensure_zoo("llama")
    with tempfile.TemporaryDirectory() as tmp:
        result = {
            "date": datetime.date.today().isoformat(),
            "strategies": strategies(zoo_dir, Path(tmp)),
            "m3": m3(zoo_dir, Path(tmp)),
        }
    lines = [
        f"# Merge search on the tiny zoo ({result['date']}, CPU)",
        "",
        "Cluster 1 (8 fine-tunes of the base, one harmful); held-out mean over five tasks:",
        "",
        "| strategy | trials | proxy | held-out mean | shift | kept weights |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['strategy']} | {r['trials']} | {r['proxy']:.3f} | {r['held_out']:.3f} | {r['shift']:.2f} | "
        f"{', '.join(f'{x:.2f}' for x in r['weights'])} |"
        for r in result["strategies"]
    ]
    lines += [
        "",
        "M³ against its base method (λ = 0.5) on pairs, held-out mean (α and λ chosen on the proxy):",
        "",
        "| pair | base method | base | M³ | α | λ |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['pair']} | {r['base_method']} | {r['base_held_out']:.3f} | {r['m3_held_out']:.3f} | {r['alpha']} | "
        f"{r['lambda']} |"
        for r in result["m3"]
    ]
    md = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"glue-zoo-{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
