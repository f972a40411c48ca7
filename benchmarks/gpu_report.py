"""The summary page of one `benchmarks/gpu.sh` run: its steps' outcomes, the kernel targets, the measured
DeviceRates (the line to put in kernels/dispatch.py) and generate's tokens/s against the dense base.

Usage: python benchmarks/gpu_report.py OUT_DIR --log OUT_DIR/gpu-DATE.log
Reads the newest kernels-*.json and decode-*.json in OUT_DIR written by a CUDA run; writes gpu-<device>-<date>.md.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def newest_cuda(out: Path, prefix: str) -> dict | None:
    """The newest `prefix`-*.json in `out` that a CUDA run wrote (CPU runs say so in their device name)."""
    for path in sorted(out.glob(f"{prefix}-*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        data = json.loads(path.read_text())
        if data.get("mode", "cuda") == "cuda" and not data["device"].startswith("CPU"):
            return data
    return None


def steps(log: str) -> list[tuple[str, str]]:
    """(step, outcome) from gpu.sh's log: its exit status in words, and the test count for the tests."""
    out = []
    for name, code in re.findall(r"^== (\w+): exit (\d+)$", log, re.M):
        outcome = {"0": "ok", "124": "ran out of time"}.get(code, f"failed (exit {code})")
        if name == "tests" and (summary := re.findall(r"^=*\s*(\d+ (?:passed|failed).*?)\s*=*$", log, re.M)):
            outcome += f": {summary[-1]}"
        out.append((name, outcome))
    return out


def report(out: Path, log: str) -> str:
    kernels, decode = newest_cuda(out, "kernels"), newest_cuda(out, "decode")
    device = (kernels or decode or {}).get("device", "unknown device")
    date = (kernels or decode or {}).get("date", "unknown date")
    lines = [f"# GPU run: {device}, {date}", "", "| step | outcome |", "|---|---|"]
    lines += [f"| {name} | {outcome} |" for name, outcome in steps(log)]
    if kernels:
        rates = kernels["rates"]
        lines += [
            "",
            "## Kernels (benchmarks/kernels.py, Mistral-7B shapes, bf16)",
            "",
            f"Measured: copy {rates['bandwidth'] / 1e12:.2f} TB/s, bf16 GEMM {rates['matmul_flops'] / 1e12:.0f} TFLOP/s. "
            "For kernels/dispatch.py:",
            "",
            f'    "cuda": DeviceRates(bandwidth={rates["bandwidth"]:.3e}, matmul_flops={rates["matmul_flops"]:.3e}, '
            f'source="measured: {device}, {date}"),',
            "",
            "| target | passed | worst |",
            "|---|---|---|",
        ]
        lines += [f"| {t['target']} | {t['passed']}/{t['cases']} | {t['worst']:.2f} |" for t in kernels["targets"]]
    if decode:
        lines += ["", f"## generate, {decode['dtype']}, {decode['new_tokens']} new tokens (benchmarks/decode.py)", ""]
        for shape, r in decode["shapes"].items():
            secs = r["seconds"]
            batches = sorted(secs["base"], key=int)
            lines += [
                f"{shape}: base {r['params']['base'] / 1e6:.0f}M parameters.",
                "",
                "| variant | "
                + " | ".join(f"B={b} tokens/s" for b in batches)
                + " | "
                + " | ".join(f"B={b} / base" for b in batches)
                + " |",
                "|---|" + "---|" * 2 * len(batches),
            ]
            for name, by_b in secs.items():
                cells = [f"{int(b) * decode['new_tokens'] / by_b[b]:.0f}" for b in batches]
                cells += [f"{by_b[b] / secs['base'][b]:.2f}x" for b in batches]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--log", type=Path, required=True)
    args = parser.parse_args()
    text = report(args.out, args.log.read_text())
    device, date = re.match(r"# GPU run: (.*), (\S+)\n", text).groups()
    path = args.out / f"gpu-{re.sub(r'[^a-z0-9]+', '-', device.lower()).strip('-')}-{date}.md"
    path.write_text(text)
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
