"""Router-only fine-tuning on the tiny zoo: exact match per task before and after, for every method.

    python examples/router_training.py [--steps 300] [--out router-training-out] [--only TEXT]

Each model starts as `moe-merge assemble` builds it, then `train-router` trains only its routers on
400 mixed-task prompt/completion rows (no held-out eval word among them). Prints a markdown table
(the worst task relative to its expert is the number that matters) and the time per step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moe_merge import demo, zoo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per model (default 300)")
    parser.add_argument("--out", type=Path, default=Path("router-training-out"), help="models, runs, results.json")
    parser.add_argument("--only", help="run only the models whose name contains this text")
    args = parser.parse_args()

    zoo_dir = zoo.ensure_zoo()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in zoo.router_training_rows(80)))
    results = []
    for run in demo.ROUTER_RUNS:
        if args.only and args.only not in run[1]:
            continue
        results.append(r := demo.train_and_score(zoo_dir, args.out, run, data, args.steps))
        print(
            f"{r['variant']:4} {r['name']:60} worst vs expert {r['worst']['before']:.0%} -> {r['worst']['after']:.0%} "
            f"({r['seconds_per_step']:.3f} s/step, {r['train_minutes']:.2f} min)",
            flush=True,
        )
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n" + demo.router_rows(results))


if __name__ == "__main__":
    main()
