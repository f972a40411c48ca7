"""Proxy evaluation of merge candidates: one batched pass of the dynamic model against merge-then-evaluate.

On the tiny zoo's first glue cluster (8 fine-tunes of the base), C candidates (random merge weights, one row
per layer) are scored on the glue proxy (40 rows, greedy exact match):
- batched: the cluster's dynamic model, built once (its build time is counted), every candidate's rows in
  shared batches carrying their merge weights;
- one at a time, in memory: per candidate, θ0 + Σ_e w_e τ_e for every tensor (task vectors already in memory,
  the best case for this loop), loaded into a model, scored;
- one at a time, through disk, as research scripts run (mergekit, then an evaluation harness): the same merge
  saved as a checkpoint and loaded back before scoring.
Both score the same candidates; the benchmark checks that their scores agree. Ratios come from one run, side
by side. Usage: python benchmarks/proxy.py [--out DIR] [--candidates 32]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from moe_merge import zoo
from moe_merge.search import glue, proxy
from moe_merge.sources import Checkpoint
from moe_merge.tokens import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests/fixtures.py
from tests.fixtures import glue_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=320, help="rows per batched forward pass")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    zoo_dir = zoo.ensure_zoo("llama")
    recipe_path = glue_recipe(zoo_dir, Path(tempfile.mkdtemp()))
    recipe = glue.load_recipe(recipe_path)
    members = [glue.resolve_path(m.path) for m in recipe.models if m.base == str(zoo_dir / "base")]
    base_dir = zoo_dir / "base"
    tok = load_tokenizer(base_dir)
    rows = proxy.load_proxy(recipe_path.parent / "proxy.jsonl", tok, "exact_match")
    g = torch.Generator().manual_seed(0)

    t0 = time.perf_counter()
    model = proxy.candidate_model(base_dir, members)
    R = model.config.num_routers
    cands = [
        torch.softmax(torch.randn(R, len(members), generator=g, dtype=torch.float64) * 2, -1)
        for _ in range(args.candidates)
    ]
    built = time.perf_counter() - t0
    batched_scores = proxy.score(model, rows, cands, batch_size=args.batch_size)
    batched = time.perf_counter() - t0

    base = Checkpoint(base_dir)
    fixed = proxy.FixedVectors(base, [Checkpoint(p) for p in members])
    names = sorted(base.weight_map)
    taus = {n: fixed(n) for n in names}  # in memory once: the loop's best case
    t0 = time.perf_counter()
    loop_scores = []
    for w in cands:
        state = {
            n: base.get(n).float() + torch.einsum("e,e...->...", w[proxy.slot(n, R)].float(), taus[n]) for n in names
        }
        dense = AutoModelForCausalLM.from_pretrained(base_dir)
        dense.load_state_dict(state)
        loop_scores += proxy.score(dense, rows)
    loop = time.perf_counter() - t0
    agree = max(abs(a.score - b.score) for a, b in zip(batched_scores, loop_scores))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for k, w in enumerate(cands):
            state = {
                n: base.get(n).float() + torch.einsum("e,e...->...", w[proxy.slot(n, R)].float(), taus[n])
                for n in names
            }
            dense = AutoModelForCausalLM.from_pretrained(base_dir)
            dense.load_state_dict(state)
            dense.save_pretrained(Path(tmp) / str(k))
            proxy.score(AutoModelForCausalLM.from_pretrained(Path(tmp) / str(k)), rows)
    disk = time.perf_counter() - t0

    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, no GPU",
        "members": len(members),
        "rows": len(rows.rows),
        "candidates": args.candidates,
        "batched_s": batched,
        "batched_build_s": built,
        "loop_s": loop,
        "per_candidate_batched_ms": 1000 * batched / args.candidates,
        "per_candidate_loop_ms": 1000 * loop / args.candidates,
        "disk_s": disk,
        "per_candidate_disk_ms": 1000 * disk / args.candidates,
        "speedup": loop / batched,
        "speedup_over_disk": disk / batched,
        "max_score_difference": agree,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"proxy-{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = (
        f"# Proxy evaluation: batched dynamic model vs merge-then-evaluate\n\n{result['date']}, {result['machine']}; "
        f"{result['members']} members, {result['rows']} proxy rows, {args.candidates} candidates, "
        f"{args.batch_size} rows per batched pass.\n\n"
        "| path | total (s) | per candidate (ms) |\n|---|---|---|\n"
        f"| batched through the dynamic model (build included: {built:.2f} s) | {batched:.2f} | "
        f"{result['per_candidate_batched_ms']:.1f} |\n"
        f"| merge, load, evaluate, one at a time, in memory | {loop:.2f} | {result['per_candidate_loop_ms']:.1f} |\n"
        f"| the same through disk (save, load back, evaluate) | {disk:.2f} | {result['per_candidate_disk_ms']:.1f} |\n\n"
        f"Speed-up {result['speedup']:.1f}x over the in-memory loop, {result['speedup_over_disk']:.1f}x over the disk "
        f"loop; largest difference between the batched and in-memory scores: {agree:.2g}.\n"
    )
    stem.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
