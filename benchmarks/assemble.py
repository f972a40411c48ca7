"""moe-merge vs mergekit-moe 0.1.5 on the same YAML: wall time, peak RSS and routing quality.

    pip install mergekit==0.1.5            # in any environment; point MERGEKIT_MOE at its script
    python benchmarks/assemble.py [--experts-per-token 2] [--repeats 3]

Both tools get the identical YAML (the zoo's MLP-only full fine-tunes: mergekit-moe takes no LoRA
experts), run one after another in fresh processes. Prints the ratios moe-merge / mergekit-moe,
then each output's per-task exact match, and writes JSON + markdown under benchmarks/results/.
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
        raise SystemExit("mergekit-moe not found: `pip install mergekit==0.1.5` and/or set MERGEKIT_MOE=/path/to/mergekit-moe")
    return exe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts-per-token", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs per tool; the median is reported")
    args = parser.parse_args()

    zoo_dir = zoo.ensure_zoo()
    manifest = json.loads((zoo_dir / "zoo.json").read_text())
    experts = [
        {"source_model": str(zoo_dir / "mlp" / t), "positive_prompts": manifest["tasks"][t]["positive_prompts"]}
        for t in zoo.FULL_EXPERTS
    ]
    recipe = {"base_model": str(zoo_dir / "base"), "gate_mode": "hidden", "dtype": "float32",
              "experts_per_token": args.experts_per_token, "experts": experts}
    mergekit = mergekit_command()
    moe_merge = shutil.which("moe-merge") or sys.exit("moe-merge is not installed: pip install -e .")
    work = Path(tempfile.mkdtemp(prefix="bench-assemble-"))
    config = work / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe, sort_keys=False))
    commands = {
        "moe-merge": lambda out: [moe_merge, "assemble", str(config), str(out), "--force"],
        "mergekit-moe": lambda out: [mergekit, str(config), str(out), "--device", "cpu", "--quiet"],
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(args.repeats):
        for name, cmd in commands.items():
            out = work / name
            shutil.rmtree(out, ignore_errors=True)
            runs[name].append(measure(cmd(out)))
    summary = {
        name: {"wall_s": statistics.median(r[0] for r in rs), "peak_rss_mib": statistics.median(r[1] for r in rs)}
        for name, rs in runs.items()
    }
    quality = {name: evaluate(work / name) for name in commands}
    ratios = {k: summary["moe-merge"][k] / summary["mergekit-moe"][k] for k in ("wall_s", "peak_rss_mib")}

    result = {
        "benchmark": "assemble",
        "date": dt.date.today().isoformat(),
        "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "recipe": {"experts": [Path(e["source_model"]).name for e in experts], "gate_mode": "hidden",
                   "experts_per_token": args.experts_per_token},
        "repeats": args.repeats,
        "tools": summary,
        "ratios_moe_merge_over_mergekit": ratios,
        "exact_match": quality,
    }
    lines = [
        f"# Assembly: moe-merge vs mergekit-moe 0.1.5 ({result['date']}, {result['device']})",
        "",
        f"Same YAML: {len(experts)} MLP-only zoo experts, `gate_mode: hidden`, top-{args.experts_per_token}; "
        f"median of {args.repeats} runs.",
        "",
        "| tool | wall (s) | peak RSS (MiB) | " + " | ".join(zoo.FULL_EXPERTS) + " |",
        "|---|---|---|" + "---|" * len(zoo.FULL_EXPERTS),
    ]
    for name in commands:
        s, q = summary[name], quality[name]
        lines.append(f"| {name} | {s['wall_s']:.2f} | {s['peak_rss_mib']:.0f} | "
                     + " | ".join(f"{q[t]:.0%}" for t in zoo.FULL_EXPERTS) + " |")
    lines += ["", f"Ratios moe-merge / mergekit-moe: wall {ratios['wall_s']:.2f}, peak RSS {ratios['peak_rss_mib']:.2f} "
              "(goal: both <= 1.0). Exact match is per task on 64 held-out words."]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"assemble-{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(text)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
