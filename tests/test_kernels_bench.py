"""benchmarks/kernels.py runs end to end without a GPU: tiny shapes, Triton interpreter, labelled as such."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_benchmark_runs_tiny_in_the_interpreter(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--tiny", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [report] = tmp_path.glob("kernels-*-interpreter-*.json")
    assert report.with_suffix(".md").is_file() and report.with_suffix(".png").stat().st_size > 10_000
    data = json.loads(report.read_text())
    assert data["mode"] == "interpreter (CPU)" and data["device"] in report.read_text() and data["date"] in report.name
    assert data["rates"]["bandwidth"] > 0 and data["rates"]["matmul_flops"] > 0
    methods = {row["method"] for row in data["rows"]}
    assert {
        "kconcat-triton (ours)",
        "materialize+bmm",
        "every-expert",
        "einsum",
        "kconcat-F.linear",
        "base-gemm",
        "lowrank-triton (ours)",
        "lora-F.linear",
        "dense-gemm",
        "kconcat",
        "materialize",
    } <= methods
    assert all(row["seconds"] > 0 and row["timer"].startswith("perf_counter") for row in data["rows"])
    assert "not GPU figures" in report.with_suffix(".md").read_text()
    assert "n/a (interpreter)" in result.stdout and "PASS" not in result.stdout
