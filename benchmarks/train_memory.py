"""Peak memory of `train-router` on a bf16 checkpoint: frozen weights kept in bf16 (the default) against float32.

A WEMoE dynamic model at FFN level, E = 4, a Qwen3 body of ~50M parameters (768 hidden, 8 layers; the zoo's
32-token vocabulary, so that the zoo's tokenizer and router-training rows fit), random weights saved in bf16.
`moe-merge train-router` runs a few steps on it in a fresh process for each `--dtype`; the peak is what the run's
summary records (the process's peak RSS on CPU, CUDA's peak allocation on a GPU).

Usage: python benchmarks/train_memory.py [--steps N] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import decode

BODY = dict(
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=8,
    num_attention_heads=12,
    num_key_value_heads=4,
    head_dim=64,
    vocab_size=32,
    tie_word_embeddings=True,
    max_position_embeddings=128,
)
DTYPES = ("auto", "float32")


def write_model(path: Path) -> int:
    """The bf16 checkpoint and the zoo's tokenizer; returns its parameter count."""
    from transformers import AutoConfig

    from moe_merge import zoo

    text = AutoConfig.for_model("qwen3", **BODY, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = decode.dynamic_model(text, "wemoe", "ffn", "dense")
    model.config.expert_names = list(zoo.EXPERT_TASKS[: decode.E])  # what the rows' `expert` labels name
    model.to(torch.bfloat16).save_pretrained(path)
    zoo.build_tokenizer().save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def train(model: Path, data: Path, run: Path, dtype: str, steps: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "moe_merge.cli",
        "train-router",
        str(model),
        "--data",
        str(data),
        "--out",
        str(run),
        "--dtype",
        dtype,
        "--steps",
        str(steps),
        "--batch-size",
        "8",
        "--eval-every",
        str(steps),
        "--save-every",
        str(steps),
        "--objective",
        "lm=1,routing=1",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"train-router --dtype {dtype} failed:\n{result.stderr[-3000:]}")
    return json.loads((run / "summary.json").read_text())


def main() -> None:
    from moe_merge import zoo

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        params = write_model(tmp / "model")
        data = tmp / "rows.jsonl"
        rows = [r for r in zoo.router_training_rows(16) if r["expert"] in zoo.EXPERT_TASKS[: decode.E]]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs = {d: train(tmp / "model", data, tmp / f"run-{d}", d, args.steps) for d in DTYPES}
    date = datetime.date.today().isoformat()
    device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    rows = {
        d: {
            "frozen_dtype": r["frozen_dtype"],
            "peak_memory_mib": r["peak_memory_bytes"] / 2**20,
            "peak_memory_of": r["peak_memory_of"],
            "seconds_per_step": r["seconds_per_step"],
        }
        for d, r in runs.items()
    }
    ratio = rows["auto"]["peak_memory_mib"] / rows["float32"]["peak_memory_mib"]
    result = {
        "device": device,
        "date": date,
        "parameters": params,
        "checkpoint_mib": params * 2 / 2**20,
        "steps": args.steps,
        "runs": rows,
        "peak_ratio_bf16_over_float32": ratio,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"train-memory-{date}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# train-router peak memory, bf16 checkpoint ({params / 1e6:.0f}M parameters, "
        f"{result['checkpoint_mib']:.0f} MiB in bf16)",
        "",
        f"{device}, {date}; {args.steps} steps of 8 rows.",
        "",
        "| --dtype | frozen weights | peak (MiB) | s / step |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {d} | {r['frozen_dtype']} | {r['peak_memory_mib']:.0f} | {r['seconds_per_step']:.2f} |"
        for d, r in rows.items()
    ]
    lines += ["", f"Peak with the checkpoint's bf16: {ratio:.2f} of float32's ({rows['auto']['peak_memory_of']})."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
