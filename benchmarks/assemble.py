"""moe-merge vs mergekit-moe 0.1.5 on the same YAML: wall time, peak RSS and routing quality.

    pip install mergekit==0.1.5            # in any environment; point MERGEKIT_MOE at its script
    python benchmarks/assemble.py [--experts-per-token 2] [--repeats 3]

Two scenarios, each one YAML given to both tools, run one after another in fresh processes:
- `zoo`: the zoo's three MLP-only full fine-tunes (mergekit-moe takes no LoRA experts); per-task
  exact match of both outputs is reported too;
- `wide`: eight untrained experts of 50 MB each, where tensor memory outweighs library imports.
Prints the ratios moe-merge / mergekit-moe and writes JSON + markdown under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from moe_merge import zoo
from moe_merge.demo import evaluate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests/fixtures.py
from tests.fixtures import pico_checkpoint

RESULTS = Path(__file__).parent / "results"
MEASURE = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter(); rc = subprocess.run(sys.argv[1:], capture_output=True).returncode\n"
    "print(rc, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)\n"
)


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of `cmd`, run from a fresh wrapper process."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True, check=True)
    rc, wall, rss = out.stdout.split()
    if rc != "0":
        raise SystemExit(f"command failed ({rc}): {' '.join(cmd)}")
    return float(wall), float(rss)


def mergekit_command() -> str:
    exe = os.environ.get("MERGEKIT_MOE") or shutil.which("mergekit-moe")
    if not exe:
        raise SystemExit(
            "mergekit-moe not found: `pip install mergekit==0.1.5` and/or set MERGEKIT_MOE=/path/to/mergekit-moe"
        )
    return exe


def zoo_recipe(work: Path, experts_per_token: int) -> dict:
    zoo_dir = zoo.ensure_zoo()
    manifest = json.loads((zoo_dir / "zoo.json").read_text())
    experts = [
        {"source_model": str(zoo_dir / "mlp" / t), "positive_prompts": manifest["tasks"][t]["positive_prompts"]}
        for t in zoo.FULL_EXPERTS
    ]
    return {
        "base_model": str(zoo_dir / "base"),
        "gate_mode": "hidden",
        "dtype": "float32",
        "experts_per_token": experts_per_token,
        "experts": experts,
    }


def wide_recipe(work: Path, experts_per_token: int) -> dict:
    sizes = {"hidden": 256, "intermediate": 2048, "layers": 8}  # 50 MB of MLP weights per expert
    base = pico_checkpoint(work / "wide-base", **sizes)
    experts = [
        {
            "source_model": str(pico_checkpoint(work / f"wide-{i}", seed=i + 1, base=base, **sizes)),
            "positive_prompts": zoo.task_prompts(zoo.EXPERT_TASKS[i % 5])["positive_prompts"][:2] + [f"expert {i}="],
        }
        for i in range(8)
    ]
    return {
        "base_model": str(base),
        "gate_mode": "hidden",
        "dtype": "float32",
        "experts_per_token": experts_per_token,
        "experts": experts,
    }


SCENARIOS = {"zoo": zoo_recipe, "wide": wide_recipe}


def run_scenario(name: str, work: Path, args) -> dict:
    recipe = SCENARIOS[name](work, args.experts_per_token)
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(recipe, sort_keys=False))
    mergekit = mergekit_command()
    commands = {
        "moe-merge": lambda out: [sys.executable, "-m", "moe_merge.cli", "assemble", str(config), str(out)],
        "mergekit-moe": lambda out: [mergekit, str(config), str(out), "--device", "cpu", "--quiet"],
    }
    runs: dict[str, list[tuple[float, float]]] = {tool: [] for tool in commands}
    for _ in range(args.repeats):
        for tool, cmd in commands.items():
            out = work / f"{name}-{tool}"
            shutil.rmtree(out, ignore_errors=True)
            runs[tool].append(measure(cmd(out)))
    tools = {
        tool: {"wall_s": statistics.median(r[0] for r in rs), "peak_rss_mib": statistics.median(r[1] for r in rs)}
        for tool, rs in runs.items()
    }
    result = {
        "experts": len(recipe["experts"]),
        "tools": tools,
        "ratios_moe_merge_over_mergekit": {
            k: tools["moe-merge"][k] / tools["mergekit-moe"][k] for k in ("wall_s", "peak_rss_mib")
        },
    }
    if name == "zoo":
        result["exact_match"] = {tool: evaluate(work / f"{name}-{tool}") for tool in commands}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts-per-token", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs per tool; the median is reported")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-assemble-"))
    result = {
        "benchmark": "assemble",
        "date": dt.date.today().isoformat(),
        "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
        "gate_mode": "hidden",
        "experts_per_token": args.experts_per_token,
        "repeats": args.repeats,
        "scenarios": {name: run_scenario(name, work, args) for name in SCENARIOS},
    }
    lines = [
        f"# Assembly: moe-merge vs mergekit-moe 0.1.5 ({result['date']}, {result['device']})",
        "",
        f"Same YAML for both tools, `gate_mode: hidden`, top-{args.experts_per_token}; median of {args.repeats} runs. "
        "`zoo`: 3 MLP-only zoo experts; `wide`: 8 untrained 50 MB experts.",
        "",
        "| scenario | tool | wall (s) | peak RSS (MiB) | wall ratio | RSS ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name, sc in result["scenarios"].items():
        r = sc["ratios_moe_merge_over_mergekit"]
        for tool, t in sc["tools"].items():
            ratio = f"{r['wall_s']:.2f} | {r['peak_rss_mib']:.2f}" if tool == "moe-merge" else " | "
            lines.append(f"| {name} | {tool} | {t['wall_s']:.2f} | {t['peak_rss_mib']:.0f} | {ratio} |")
    quality = result["scenarios"]["zoo"]["exact_match"]
    lines += [
        "",
        "Exact match per task on the zoo (64 held-out words each):",
        "",
        "| tool | " + " | ".join(zoo.FULL_EXPERTS) + " |",
        "|---|" + "---|" * len(zoo.FULL_EXPERTS),
    ]
    for tool, q in quality.items():
        lines.append(f"| {tool} | " + " | ".join(f"{q[t]:.0%}" for t in zoo.FULL_EXPERTS) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"assemble-{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
