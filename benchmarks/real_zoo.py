"""Every figure docs/measured.md gives for the real-model zoo, measured in one run on this machine.

    python benchmarks/real_zoo.py                       # SmolLM2-135M's zoo: quality, routing, decode, assembly
    python benchmarks/real_zoo.py --base gemma3 --only quality,routing
    MERGEKIT_MOE=/path/to/mergekit-moe python benchmarks/real_zoo.py --only assembly

Sections (`--only`, comma-separated):
- `quality`: exact match on each task's 24 held-out prompts for the base, each expert, static merges, the stock
  Mixtral export (mergekit's YAML; the best training-free start; each with its FFN-level oracle: every token routed
  to the task's expert), mergekit-moe on the same YAML, and every dynamic method x level: training-free
  (prompt-initialised), oracle (merge weights one-hot to the task's expert) and after `--steps` of router-only
  training on the zoo's router rows (never the held-out ones), for every model below its oracle (one at it has
  nothing to gain: its routers are right, and saturated, so their gradients are zero), plus WEMoE from a uniform
  start, which no prompt fixed. For the four LoRA experts, and for all six;
- `routing`: each model's routing report (routing_report.json, measured on the model as written): per-router
  accuracy on held-out prompts;
- `decode`: greedy `generate` of 32 tokens at B = 1, 16, 64 against the dense base, in bf16 (the checkpoints'
  dtype), variants run in turn and each timed against the base run beside it (this machine is shared: the ratio
  of neighbouring runs is what holds); the LoRA experts kept low-rank;
- `assembly`: wall time and peak RSS of `moe-merge assemble` against mergekit-moe 0.1.5 on the same YAML (six
  full checkpoints: the adapters merged into their base), each in a fresh process, median of 3.

mergekit-moe runs from MERGEKIT_MOE, else `mergekit-moe` on PATH, else a virtual environment made over this one
with mergekit==0.1.5 installed (under the cache, once). Writes real-<base>-<date>.{json,md} under
benchmarks/results/ (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from moe_merge import realzoo
from moe_merge.assemble import assemble
from moe_merge.config import MergeConfig
from moe_merge.methods import DYNAMIC_PAIRS
from moe_merge.quality import exact_match, oracle_scores
from moe_merge.tokens import load_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from assemble import measure
from decode import peer_env

RESULTS = Path(__file__).parent / "results"
STOCK = {  # name -> recipe overrides: the stock Mixtral export
    "mergekit's YAML (gate_mode hidden, top-2, the base's attention)": {
        "gate_mode": "hidden",
        "experts_per_token": 2,
        "non_expert": "base",
    },
    "router.init fit, top-1, averaged attention (the best training-free start)": {
        "router": {"init": "fit"},
        "experts_per_token": 1,
    },
}
STATIC = ("average", "task_arithmetic", "ties")
TRAIN = {"steps": 100, "lr": 0.05, "batch_size": 8, "objective": {"lm": 1.0, "routing": 1.0}}
DECODE = {
    "smear ffn": {"method": "smear", "level": "ffn"},
    "wemoe ffn": {"method": "wemoe", "level": "ffn"},
    "smear block": {"method": "smear", "level": "block"},
    "twin block": {"method": "twin", "level": "block"},
}
MERGEKIT = "mergekit==0.1.5"


# ----------------------------------------------------------------------------------------- quality


def held_out(tasks) -> list[dict]:
    return [{**r, "task": r["expert"]} for r in realzoo.eval_rows(tasks)]


def scores(model, tok, rows, **kw) -> dict[str, float]:
    return {t: s for t, (s, _) in exact_match(model, tok, rows, **kw).items()}


def worst(got: dict[str, float], experts: dict[str, float]) -> float:
    """The worst task's score relative to its expert's."""
    return min(got[t] / experts[t] for t in experts)


def load(path: Path):
    from transformers import AutoModelForCausalLM

    import moe_merge.modeling  # noqa: F401

    return AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager").eval()


def stock_oracle(model, tok, rows, tasks) -> dict[str, float]:
    """The stock export with every token of a task's prompts routed to that task's expert (FFN-level routing made
    perfect; attention is what the export holds)."""
    out = {}
    for e, task in enumerate(tasks):

        def one_hot(_m, _a, o, e=e):
            n = o[0].shape[0]
            return o[0], torch.ones(n, 1, dtype=o[1].dtype), torch.full((n, 1), e)

        hooks = [layer.mlp.gate.register_forward_hook(one_hot) for layer in model.model.layers]
        out.update(scores(model, tok, [r for r in rows if r["task"] == task]))
        for h in hooks:
            h.remove()
    return out


def static_scores(zoo: Path, experts: str, method: str, tok, rows) -> dict[str, float]:
    from moe_merge.assemble.read import static_merge
    from moe_merge.recipe import open_recipe

    recipe = open_recipe(MergeConfig.model_validate(realzoo.zoo_recipe(zoo, experts, non_expert=method)))
    model = load(recipe.base.path)
    merged = {name: static_merge(recipe, name, seed=0).to(model.dtype) for name in recipe.base.keys()}
    model.load_state_dict(merged, strict=False)
    return scores(model, tok, rows)


def trained(model_dir: Path, run: Path, tasks, steps: int) -> tuple[Path, dict]:
    """Train only the routers of `model_dir` on the zoo's router rows; (the exported model, the run's summary)."""
    from moe_merge.train.loop import TrainRouterArgs, train_router

    data = run.parent / f"{run.name}-rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in realzoo.router_training_rows(tasks)))
    args = {**TRAIN, "steps": steps}
    summary = train_router(
        model_dir, run, TrainRouterArgs(data=data, eval_every=50, save_every=steps, force=True, **args)
    )
    return run / "model", summary


def quality(zoo: Path, work: Path, steps: int, sets: list[str]) -> dict:
    tok = load_tokenizer(zoo / "base")
    out = {}
    for experts in sets:
        tasks = [e["name"] for e in realzoo.zoo_recipe(zoo, experts)["experts"]]
        rows = held_out(tasks)
        table = out[experts] = {"tasks": tasks, "rows": {}}
        own = {}
        for t in tasks:
            own[t] = scores(
                realzoo.load_checkpoint(zoo / realzoo.TASK[t].expert), tok, [r for r in rows if r["task"] == t]
            )[t]
        table["experts"] = own
        table["rows"]["base"] = {"training-free": scores(load(zoo / "base"), tok, rows)}
        for method in STATIC:
            table["rows"][f"static {method}"] = {"training-free": static_scores(zoo, experts, method, tok, rows)}
            print(experts, method, table["rows"][f"static {method}"], flush=True)
        for name, overrides in STOCK.items():
            target = work / f"{experts}-stock-{len(table['rows'])}"
            model_dir = assemble(
                MergeConfig.model_validate(realzoo.zoo_recipe(zoo, experts, **overrides)), target, force=True
            )
            model = load(model_dir)
            row = table["rows"][f"sparse ffn (stock Mixtral), {name}"] = {
                "training-free": scores(model, tok, rows),
                "oracle": stock_oracle(model, tok, rows, tasks),
            }
            if steps and worst(row["training-free"], own) < worst(row["oracle"], own):
                exported, summary = trained(model_dir, work / f"{target.name}-run", tasks, steps)
                row["trained"], row["seconds_per_step"] = scores(load(exported), tok, rows), summary["seconds_per_step"]
            print(experts, name, row, flush=True)
        for method, level in DYNAMIC_PAIRS:
            t0 = time.perf_counter()
            model_dir = assemble(
                MergeConfig.model_validate(realzoo.zoo_recipe(zoo, experts, method=method, level=level)),
                work / f"{experts}-{method}-{level}",
                force=True,
            )
            seconds = time.perf_counter() - t0
            model = load(model_dir)
            row = table["rows"][f"{method} {level}"] = {
                "training-free": scores(model, tok, rows),
                "oracle": {t: s for t, (s, _) in oracle_scores(model, tok, rows).items()},
                "assembly_seconds": seconds,
            }
            if steps and worst(row["training-free"], own) < worst(row["oracle"], own):
                exported, summary = trained(model_dir, work / f"{experts}-{method}-{level}-run", tasks, steps)
                row["trained"], row["seconds_per_step"] = scores(load(exported), tok, rows), summary["seconds_per_step"]
            row["routing"] = json.loads((model_dir / "routing_report.json").read_text())
            print(experts, method, level, {k: v for k, v in row.items() if k != "routing"}, flush=True)
        if steps:
            model_dir = assemble(
                MergeConfig.model_validate(
                    realzoo.zoo_recipe(zoo, experts, method="wemoe", level="ffn", router={"init": "uniform"})
                ),
                work / f"{experts}-uniform",
                force=True,
            )
            exported, summary = trained(model_dir, work / f"{experts}-uniform-run", tasks, steps)
            table["rows"]["wemoe ffn, uniform start (router.init uniform)"] = {
                "training-free": scores(load(model_dir), tok, rows),
                "trained": scores(load(exported), tok, rows),
                "seconds_per_step": summary["seconds_per_step"],
            }
    return out


def mergekit_moe() -> str | None:
    exe = os.environ.get("MERGEKIT_MOE") or shutil.which("mergekit-moe")
    if exe:
        return exe
    try:
        return str(peer_env(MERGEKIT).parent / "mergekit-moe")
    except (subprocess.CalledProcessError, StopIteration, OSError) as e:
        print(f"mergekit-moe unavailable ({e}); its rows are left out", flush=True)
        return None


def full_checkpoints(zoo: Path, work: Path) -> dict[str, Path]:
    """Every expert as a full checkpoint (mergekit-moe takes no adapters): adapters merged into their base, in bf16."""
    out = {}
    for task in realzoo.TASKS:
        path = zoo / task.expert
        if task.kind == "lora":
            path = work / "merged" / task.name
            if not (path / "config.json").exists():
                model = realzoo.load_checkpoint(zoo / task.expert).merge_and_unload()
                model.save_pretrained(path)
                load_tokenizer(zoo / "base").save_pretrained(path)
        out[task.name] = path
    return out


def mergekit_quality(zoo: Path, work: Path, exe: str) -> dict:
    """mergekit-moe on mergekit's YAML over the four adapters (merged into full checkpoints)."""
    full = full_checkpoints(zoo, work)
    recipe = {**realzoo.zoo_recipe(zoo, "lora", **STOCK[next(iter(STOCK))]), "dtype": "bfloat16"}
    recipe.pop("non_expert")
    recipe["experts"] = [
        {"source_model": str(full[e["name"]]), "positive_prompts": e["positive_prompts"]} for e in recipe["experts"]
    ]
    config = work / "mergekit.yaml"
    config.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = work / "mergekit-out"
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([exe, str(config), str(out), "--device", "cpu", "--quiet"], check=True, capture_output=True)
    tasks = list(realzoo.LORA_TASKS)
    return scores(load(out), load_tokenizer(zoo / "base"), held_out(tasks))


# ----------------------------------------------------------------------------------------- decode


@torch.no_grad()
def decode(zoo: Path, work: Path, batches: list[int], repeats: int) -> dict:
    tok = load_tokenizer(zoo / "base")
    models = {"base": load(zoo / "base")}
    for name, overrides in DECODE.items():
        target = work / f"decode-{name.replace(' ', '-')}"
        if not (target / "config.json").exists():
            assemble(MergeConfig.model_validate(realzoo.zoo_recipe(zoo, "lora", **overrides)), target, force=True)
        models[name] = load(target)
    rows = realzoo.eval_rows(realzoo.LORA_TASKS)
    out = {}
    for B in batches:
        enc = tok(
            [rows[i % len(rows)]["prompt"] for i in range(B)], return_tensors="pt", padding=True, padding_side="left"
        )

        def run(model, enc=enc):
            t = time.perf_counter()
            model.generate(**enc, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
            return time.perf_counter() - t

        for model in models.values():
            run(model)  # warm-up
        times = {name: [] for name in models}
        for _ in range(repeats):
            for name, model in models.items():
                times[name].append(run(model))
        out[B] = {
            name: {
                "seconds": statistics.median(ts),
                "ratio": statistics.median(t / b for t, b in zip(ts, times["base"])),
                "ratio_range": [
                    min(t / b for t, b in zip(ts, times["base"])),
                    max(t / b for t, b in zip(ts, times["base"])),
                ],
            }
            for name, ts in times.items()
        }
        print(f"decode B={B}: " + ", ".join(f"{n} {r['ratio']:.2f}x" for n, r in out[B].items()), flush=True)
    return out


# ----------------------------------------------------------------------------------------- assembly


def assembly(zoo: Path, work: Path, exe: str, repeats: int) -> dict:
    full = full_checkpoints(zoo, work)
    recipe = {
        "base_model": str(zoo / "base"),
        "gate_mode": "hidden",
        "experts_per_token": 2,
        "dtype": "bfloat16",
        "experts": [
            {"source_model": str(full[t]), "positive_prompts": realzoo.task_prompts(t)["positive_prompts"]}
            for t in realzoo.TASK_NAMES
        ],
    }
    config = work / "assembly.yaml"
    config.write_text(yaml.safe_dump(recipe, sort_keys=False))
    commands = {
        "moe-merge": lambda o: [sys.executable, "-m", "moe_merge.cli", "assemble", str(config), str(o)],
        "mergekit-moe": lambda o: [exe, str(config), str(o), "--device", "cpu", "--quiet"],
    }
    runs: dict[str, list] = {tool: [] for tool in commands}
    for _ in range(repeats):
        for tool, cmd in commands.items():
            target = work / f"assembly-{tool}"
            shutil.rmtree(target, ignore_errors=True)
            runs[tool].append(measure(cmd(target)))
    tools = {
        tool: {"wall_s": statistics.median(r[0] for r in rs), "peak_rss_mib": statistics.median(r[1] for r in rs)}
        for tool, rs in runs.items()
    }
    return {
        "experts": len(recipe["experts"]),
        "tools": tools,
        "ratios": {k: tools["moe-merge"][k] / tools["mergekit-moe"][k] for k in ("wall_s", "peak_rss_mib")},
    }


# ----------------------------------------------------------------------------------------- report


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def markdown(results: dict) -> str:
    lines = [
        f"# The real-model zoo ({results['base']}): {results['device']}, {results['date']}",
        "",
        f"torch {results['torch']}, transformers {results['transformers']}. Exact match on each task's 24 held-out "
        "prompts; \"worst\" is the worst task's score relative to its expert's.",
        "",
    ]
    for experts, table in results.get("quality", {}).items():
        tasks = table["tasks"]
        lines += [
            f"## Quality: {experts} experts ({', '.join(tasks)})",
            "",
            "| model | " + " | ".join(tasks) + " | worst | oracle: worst | trained: worst |",
            "|---|" + "---|" * (len(tasks) + 3),
        ]
        lines.append(
            "| experts (each on its own task) | "
            + " | ".join(pct(table["experts"][t]) for t in tasks)
            + " | 100% | | |"
        )
        for name, row in table["rows"].items():
            free = row["training-free"]
            cells = [pct(free[t]) for t in tasks] + [pct(worst(free, table["experts"]))]
            cells += [pct(worst(row[k], table["experts"])) if k in row else "" for k in ("oracle", "trained")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if "mergekit-moe" in table:
            mk = table["mergekit-moe"]
            lines.append(
                "| mergekit-moe 0.1.5, mergekit's YAML | "
                + " | ".join(pct(mk[t]) for t in tasks)
                + f" | {pct(worst(mk, table['experts']))} | | |"
            )
        lines.append("")
    if "quality" in results:
        lines += [
            "## Routing of held-out prompts (training-free)",
            "",
            "| experts | model | routers | accuracy, mean over routers | worst router | routed right at every router |",
            "|---|---|---|---|---|---|",
        ]
        for experts, table in results["quality"].items():
            for name, row in table["rows"].items():
                rep = row.get("routing")
                if rep and rep.get("measured", True):
                    accs = [a for r in rep["routers"] for a in r["accuracy"] if a is not None]
                    per_router = [statistics.mean(a for a in r["accuracy"] if a is not None) for r in rep["routers"]]
                    everywhere = [x for x in rep.get("routed_right_everywhere", []) if x is not None]
                    lines.append(
                        f"| {experts} | {name} | {len(rep['routers'])} | {statistics.mean(accs):.1%} | "
                        f"{min(per_router):.1%} | {min(everywhere):.1%} |"
                        if everywhere
                        else ""
                    )
        lines.append("")
    if "decode" in results:
        d = results["decode"]
        names = list(next(iter(d.values())))
        lines += [
            "## Decode: greedy generate, 32 new tokens, bf16, LoRA experts kept low-rank",
            "",
            "| variant | " + " | ".join(f"B={b}: s, x base (range)" for b in d) + " |",
            "|---|" + "---|" * len(d),
        ]
        for n in names:
            lines.append(
                f"| {n} | "
                + " | ".join(
                    f"{d[b][n]['seconds']:.2f}, {d[b][n]['ratio']:.2f}x ({d[b][n]['ratio_range'][0]:.2f}-"
                    f"{d[b][n]['ratio_range'][1]:.2f})"
                    for b in d
                )
                + " |"
            )
        lines.append("")
    if "assembly" in results:
        a = results["assembly"]
        lines += [
            f"## Assembly: the same YAML ({a['experts']} full checkpoints, gate_mode hidden, top-2), median of "
            f"{results['repeats']}",
            "",
            "| tool | wall (s) | peak RSS (MiB) |",
            "|---|---|---|",
        ]
        lines += [f"| {t} | {v['wall_s']:.1f} | {v['peak_rss_mib']:.0f} |" for t, v in a["tools"].items()]
        lines += [
            "",
            f"moe-merge / mergekit-moe: wall {a['ratios']['wall_s']:.2f}, peak RSS {a['ratios']['peak_rss_mib']:.2f}",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="smollm2", choices=realzoo.BASES)
    parser.add_argument("--only", default="quality,decode,assembly", help="sections, comma-separated")
    parser.add_argument("--experts", default="lora", help="expert sets for quality: lora, all")
    parser.add_argument("--steps", type=int, default=TRAIN["steps"], help="router-training steps (0: none)")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--repeats", type=int, default=5, help="decode: runs per variant and B")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    sections = set(args.only.split(","))
    torch.set_num_threads(2)
    zoo = realzoo.ensure_real_zoo(args.base)
    work = Path(os.environ.get("MOE_MERGE_BENCH_WORK") or (realzoo.cache_root() / "bench-real" / args.base))
    work.mkdir(parents=True, exist_ok=True)
    results = {
        "base": args.base,
        "zoo": zoo.name,
        "date": datetime.date.today().isoformat(),
        "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "repeats": 3,
    }
    exe = mergekit_moe() if sections & {"quality", "assembly"} else None
    if "quality" in sections:
        results["quality"] = quality(zoo, work, args.steps, args.experts.split(","))
        if exe and "lora" in results["quality"]:
            results["quality"]["lora"]["mergekit-moe"] = mergekit_quality(zoo, work, exe)
    if "decode" in sections:
        results["decode"] = decode(zoo, work, [int(b) for b in args.batches.split(",")], args.repeats)
    if "assembly" in sections and exe:
        results["assembly"] = assembly(zoo, work, exe, 3)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"real-{args.base}-{results['date']}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {stem}.{{json,md}}")


if __name__ == "__main__":
    main()
