"""benchmarks/decode.py, gpu.sh and gpu_report.py run without a GPU: decode at a tiny size, the GPU script skipping."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_report  # noqa: E402


def test_decode_benchmark_times_every_variant_and_writes_its_ratios(tmp_path):
    variants = [
        "base",
        "wemoe dense",
        "K-concat floor",
        "lora low-rank",
        "twin svd",
        "per-request loop",
        "peft mixed batch",
    ]
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "decode.py"),
            "--shapes",
            "zoo",
            "--batches",
            "1,2",
            "--new-tokens",
            "2",
            "--only",
            ",".join(variants),
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    [path] = tmp_path.glob("decode-cpu-*.json")
    data = json.loads(path.read_text())
    zoo = data["shapes"]["zoo"]
    assert list(zoo["seconds"]) == variants and all(set(s) == {"1", "2"} for s in zoo["seconds"].values())
    assert zoo["params"]["wemoe dense"] > zoo["params"]["base"]
    ratios = zoo["ratios"]["2"]
    assert ratios["wemoe dense / base"] == pytest.approx(
        zoo["seconds"]["wemoe dense"]["2"] / zoo["seconds"]["base"]["2"]
    )
    assert {"lora low-rank / base", "per-request loop / wemoe dense", "peft mixed batch / lora low-rank"} <= set(ratios)
    assert path.with_suffix(".png").stat().st_size > 10_000 and "| wemoe dense |" in path.with_suffix(".md").read_text()


def test_gpu_script_says_it_skips_without_cuda_and_writes_nothing(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(tmp_path / "out")], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr
    assert "no CUDA device" in run.stdout and not (tmp_path / "out").exists()


def test_gpu_report_gives_the_rates_line_targets_and_tokens_per_second(tmp_path):
    device, date = "NVIDIA H200", "2026-12-24"
    (tmp_path / f"kernels-nvidia-h200-{date}.json").write_text(
        json.dumps(
            {
                "device": device,
                "date": date,
                "mode": "cuda",
                "rates": {"bandwidth": 4.3e12, "matmul_flops": 7.9e14},
                "targets": [
                    {"target": "decode ≥ 85% of the bandwidth floor (B ≤ 64)", "passed": 14, "cases": 15, "worst": 0.81}
                ],
            }
        )
    )
    (tmp_path / f"decode-nvidia-h200-{date}.json").write_text(
        json.dumps(
            {
                "device": device,
                "date": date,
                "dtype": "bfloat16",
                "new_tokens": 32,
                "shapes": {
                    "llama-1b": {
                        "params": {"base": 1.1e9},
                        "seconds": {"base": {"1": 0.25, "64": 0.5}, "wemoe dense": {"1": 0.5, "64": 2.0}},
                    }
                },
            }
        )
    )
    (tmp_path / "decode-cpu-x86-64-2-threads-2026-12-25.json").write_text(json.dumps({"device": "CPU (x86_64)"}))
    log = "== tests: exit 0\n12 passed in 30.1s\n== kernels: exit 0\n== generate: exit 124\n"
    text = gpu_report.report(tmp_path, log)
    assert text.startswith(f"# GPU run: {device}, {date}")
    assert "| tests | ok: 12 passed in 30.1s |" in text and "| generate | ran out of time |" in text
    rates = next(line for line in text.splitlines() if "DeviceRates(" in line).strip().rstrip(",")
    assert eval(rates.split(": ", 1)[1], {"DeviceRates": dict}) == {  # the line pastes into kernels/dispatch.py
        "bandwidth": 4.3e12,
        "matmul_flops": 7.9e14,
        "source": f"measured: {device}, {date}",
    }
    assert "| decode ≥ 85% of the bandwidth floor (B ≤ 64) | 14/15 | 0.81 |" in text
    assert "| wemoe dense | 64 | 1024 | 2.00x | 4.00x |" in text  # tokens/s: 1 × 32 / 0.5 and 64 × 32 / 2.0
