"""The merged-matmul kernels against their baselines: time, TB/s, TFLOP/s and floor/measured.

    python benchmarks/kernels.py                       # CUDA: the full sweep below
    python benchmarks/kernels.py --tiny [--out DIR]    # any machine: tiny shapes, Triton interpreter on CPU

Full sweep (bf16): layers d=4096 × ffn ∈ {11008, 14336}, both ways round (up: N=ffn, K=d; down: N=d,
K=ffn); E ∈ {2, 4, 8}; decode B ∈ {1, 8, 32, 64, 128}; prefill (sequences, tokens) ∈ {(1, 2048), (8, 512)};
low-rank r ∈ {8, 16, 64}; and a sweep of tokens per sequence that measures where materialize-then-GEMM
overtakes K-concatenation. Baselines: per-sample weights materialized + bmm, every expert then outputs
weighted, torch.einsum, the K-concatenated F.linear through cuBLAS, and a single base GEMM.

Every result is checked against the fp32 torch reference before it is timed. On CUDA: the median of
triton.testing.do_bench (L2 flushed), decode through CUDA graphs (do_bench_cudagraph); the device's copy
bandwidth and bf16 GEMM rate are measured in the same run and give floor = max(bytes / bandwidth,
flops / GEMM rate). It prints the H100 targets as pass/fail and the DeviceRates for kernels/dispatch.py.
--tiny (automatic without CUDA) runs the same code on tiny shapes in the Triton interpreter, timed with
time.perf_counter: those figures describe the interpreter on a CPU, not a GPU.

Writes kernels-<device>-<date>.json, .md and .png (roofline) under benchmarks/results/ or --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results"
CPU_REPEATS = 3  # perf_counter samples per case in the interpreter (the correctness call warmed it up)
MAX_REL_ERROR = 2e-2  # ‖y − reference‖ / ‖reference‖ any timed result must meet (bf16)


@dataclass(frozen=True)
class Sweep:
    """The shapes one run covers; layers are (N, K) = (out_features, in_features)."""

    layers: tuple[tuple[int, int], ...]
    experts: tuple[int, ...]
    decode_batches: tuple[int, ...]
    prefill: tuple[tuple[int, int], ...]  # (sequences, tokens per sequence)
    ranks: tuple[int, ...]
    crossover_sequences: tuple[int, ...]
    crossover_tokens: tuple[int, ...]


FULL = Sweep(
    layers=((11008, 4096), (4096, 11008), (14336, 4096), (4096, 14336)),
    experts=(2, 4, 8),
    decode_batches=(1, 8, 32, 64, 128),
    prefill=((1, 2048), (8, 512)),
    ranks=(8, 16, 64),
    crossover_sequences=(1, 8),
    crossover_tokens=(16, 32, 64, 128, 256, 512, 1024, 2048),
)
TINY = Sweep(
    layers=((48, 32),),
    experts=(2,),
    decode_batches=(1, 4),
    prefill=((2, 8),),
    ranks=(4,),
    crossover_sequences=(1,),
    crossover_tokens=(4, 16),
)


@dataclass
class Row:
    """One timed case. bytes and flops are the problem's (what the fastest method must move and do)."""

    op: str  # decode | prefill | lowrank | crossover
    layer: str  # "N×K"
    experts: int
    sequences: int
    tokens: int  # per sequence
    rank: int
    method: str
    seconds: float
    bytes: float
    flops: float
    floor: float  # max(bytes / bandwidth, flops / GEMM rate)
    timer: str

    @property
    def tbps(self) -> float:
        return self.bytes / self.seconds / 1e12

    @property
    def tflops(self) -> float:
        return self.flops / self.seconds / 1e12

    @property
    def efficiency(self) -> float:
        return self.floor / self.seconds


class Bench:
    """Times callables on one device and records rows against the measured device rates."""

    def __init__(self, device: torch.device):
        self.device, self.cuda, self.rows = device, device.type == "cuda", []
        self.rates = self._measure_rates()

    def seconds(self, fn: Callable[[], object], graph: bool) -> tuple[float, str]:
        if self.cuda:
            from triton.testing import do_bench, do_bench_cudagraph

            fn()  # compile and autotune before any timing or graph capture
            if graph:
                return do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e-3, "do_bench_cudagraph median"
            return do_bench(fn, warmup=10, rep=100, return_mode="median") * 1e-3, "do_bench median"
        samples = []
        for _ in range(CPU_REPEATS):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples), "perf_counter median (interpreter, CPU)"

    def _measure_rates(self):
        """Copy bandwidth and dense GEMM rate (bf16 on CUDA, fp32 on CPU), measured now."""
        from moe_merge.kernels import DeviceRates

        copy_bytes, n, dtype = (2**30, 8192, torch.bfloat16) if self.cuda else (2**26, 512, torch.float32)
        src = torch.empty(copy_bytes // 2, dtype=torch.bfloat16, device=self.device)
        dst = torch.empty_like(src)
        copy, _ = self.seconds(lambda: dst.copy_(src), graph=False)
        a, b = (torch.randn(n, n, device=self.device, dtype=dtype) for _ in range(2))
        gemm, _ = self.seconds(lambda: a @ b, graph=False)
        return DeviceRates(bandwidth=2 * copy_bytes / copy, matmul_flops=2 * n**3 / gemm)

    def record(
        self, fn: Callable[[], torch.Tensor], expected: torch.Tensor, graph: bool, *, bytes: float, flops: float, **case
    ) -> Row:
        """Check fn's result against `expected` (fp32), then time it and keep the row."""
        got = fn().float()
        error = ((got - expected).norm() / expected.norm()).item()
        if not error < MAX_REL_ERROR:
            raise SystemExit(f"{case} gave a relative error of {error:.2e} against the reference; not timing it")
        seconds, timer = self.seconds(fn, graph)
        floor = max(bytes / self.rates.bandwidth, flops / self.rates.matmul_flops)
        row = Row(**case, seconds=seconds, bytes=bytes, flops=flops, floor=floor, timer=timer)
        self.rows.append(row)
        print(
            f"{row.op:9} {row.layer:11} E={row.experts} S={row.sequences:<3} T={row.tokens:<4} r={row.rank:<2} "
            f"{row.method:24} {row.seconds * 1e6:11.1f} µs  {row.tbps:6.2f} TB/s  {row.tflops:7.2f} TFLOP/s  "
            f"floor/measured {row.efficiency:5.2f}"
        )
        return row


# --- baselines (torch) -------------------------------------------------------------------------------


def materialize_bmm(x, w, deltas, base):  # x [M, K], w [M, E]: a weight per row, then one bmm
    weights = base + torch.einsum("me,enk->mnk", w.to(deltas.dtype), deltas)  # [M, N, K]
    return torch.bmm(x.unsqueeze(1), weights.transpose(1, 2)).squeeze(1)


def every_expert(x, w, deltas, base):  # each expert's output, then weighted
    per_expert = torch.matmul(x, deltas.transpose(1, 2))  # [E, M, N]
    return F.linear(x, base) + (per_expert * w.T.unsqueeze(-1).to(x.dtype)).sum(0)


def einsum(x, w, deltas, base):
    return torch.einsum("mk,me,enk->mn", x, w.to(x.dtype), deltas) + F.linear(x, base)


def kconcat_linear(x, w, w_cat):  # [x, w_1·x, …, w_E·x]·w_catᵀ in one F.linear (cuBLAS on CUDA); w_cat built once
    scaled = [x] + [x * w[:, e : e + 1].to(x.dtype) for e in range(w.shape[1])]
    return F.linear(torch.cat(scaled, dim=1), w_cat)


def lora_linear(x, w, a_cat, b_cat, base):  # a_cat [E·r, K], b_cat [N, E·r]: three GEMMs (cuBLAS on CUDA)
    shrunk = F.linear(x, a_cat).view(x.shape[0], w.shape[1], -1) * w.unsqueeze(-1).to(x.dtype)
    return F.linear(x, base) + F.linear(shrunk.flatten(1), b_cat)


# --- sweeps ------------------------------------------------------------------------------------------


def layer_tensors(N, K, E, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    deltas = torch.randn(E, N, K, generator=gen, device=device, dtype=dtype) * K**-0.5
    base = torch.randn(N, K, generator=gen, device=device, dtype=dtype) * K**-0.5
    return deltas, base


def merge_weights(rows, E, device):
    return torch.randn(rows, E, device=device).softmax(-1)


def run_decode(bench: Bench, sweep: Sweep, dtype: torch.dtype) -> None:
    from moe_merge import kernels
    from moe_merge.kernels import reference

    for N, K in sweep.layers:
        for E in sweep.experts:
            deltas, base = layer_tensors(N, K, E, dtype, bench.device)
            w_cat = torch.cat([base, *deltas], dim=1)  # [N, (E+1)·K]
            for B in sweep.decode_batches:
                x, w = torch.randn(B, K, device=bench.device, dtype=dtype), merge_weights(B, E, bench.device)
                expected = reference.merged_linear(x.float(), w, deltas.float(), base.float())
                el = dtype.itemsize
                act = B * K * el + B * N * el + B * E * 4
                case = dict(op="decode", layer=f"{N}×{K}", experts=E, sequences=B, tokens=1, rank=0)
                merged = dict(bytes=(E + 1) * N * K * el + act, flops=2 * B * N * K * (E + 1))
                methods = {
                    "kconcat-triton (ours)": lambda: kernels.merged_linear(x, w, deltas, base),
                    "materialize+bmm": lambda: materialize_bmm(x, w, deltas, base),
                    "every-expert": lambda: every_expert(x, w, deltas, base),
                    "einsum": lambda: einsum(x, w, deltas, base),
                    "kconcat-F.linear": lambda: kconcat_linear(x, w, w_cat),
                }
                for method, fn in methods.items():
                    # materializing B weights in a graph would pin B·N·K of memory; it runs for ms anyway
                    bench.record(fn, expected, graph=method != "materialize+bmm", method=method, **merged, **case)
                bench.record(
                    lambda: F.linear(x, base),
                    F.linear(x.float(), base.float()),
                    graph=True,
                    method="base-gemm",
                    bytes=N * K * el + act,
                    flops=2 * B * N * K,
                    **case,
                )
            del deltas, base, w_cat


def run_prefill(bench: Bench, sweep: Sweep, dtype: torch.dtype) -> None:
    from moe_merge import kernels
    from moe_merge.kernels import reference

    for N, K in sweep.layers:
        for E in sweep.experts:
            deltas, base = layer_tensors(N, K, E, dtype, bench.device)
            w_cat = torch.cat([base, *deltas], dim=1)
            for S, T in sweep.prefill:
                M, el = S * T, dtype.itemsize
                x, w = torch.randn(S, T, K, device=bench.device, dtype=dtype), merge_weights(S, E, bench.device)
                x2, w_tok = x.view(M, K), w.repeat_interleave(T, 0)
                expected = reference.merged_linear(x2.float(), w_tok, deltas.float(), base.float()).view(S, T, N)
                case = dict(op="prefill", layer=f"{N}×{K}", experts=E, sequences=S, tokens=T, rank=0)
                act = M * K * el + M * N * el
                merged = dict(bytes=(E + 1) * N * K * el + act, flops=2 * N * K * (S * E + M))
                chosen = kernels.choose_strategy(T, S, E, element_size=el, device=bench.device)
                methods = {
                    f"auto→{chosen} (ours)": lambda: kernels.merged_linear_per_sequence(x, w, deltas, base),
                    "kconcat-triton": lambda: kernels.merged_linear_per_sequence(
                        x, w, deltas, base, strategy="kconcat"
                    ),
                    "materialize-triton+bmm": lambda: kernels.merged_linear_per_sequence(
                        x, w, deltas, base, strategy="materialize"
                    ),
                    "materialize-torch+bmm": lambda: torch.bmm(
                        x, (base + torch.einsum("se,enk->snk", w.to(dtype), deltas)).transpose(1, 2)
                    ),
                    "every-expert": lambda: every_expert(x2, w_tok, deltas, base).view(S, T, N),
                    "einsum": lambda: einsum(x2, w_tok, deltas, base).view(S, T, N),
                    "kconcat-F.linear": lambda: kconcat_linear(x2, w_tok, w_cat).view(S, T, N),
                }
                for method, fn in methods.items():
                    bench.record(fn, expected, graph=False, method=method, **merged, **case)
                bench.record(
                    lambda: F.linear(x2, base),
                    F.linear(x2.float(), base.float()),
                    graph=False,
                    method="dense-gemm",
                    bytes=N * K * el + act,
                    flops=2 * M * N * K,
                    **case,
                )
            del deltas, base, w_cat


def run_lowrank(bench: Bench, sweep: Sweep, dtype: torch.dtype) -> None:
    from moe_merge import kernels
    from moe_merge.kernels import reference

    for N, K in sweep.layers:
        base = layer_tensors(N, K, 1, dtype, bench.device)[1]
        for E in sweep.experts:
            for r in sweep.ranks:
                A = torch.randn(E, r, K, device=bench.device, dtype=dtype) * K**-0.5
                B_ = torch.randn(E, N, r, device=bench.device, dtype=dtype) * r**-0.5
                a_cat, b_cat = A.reshape(E * r, K), B_.permute(1, 0, 2).reshape(N, E * r)
                for B in sweep.decode_batches:
                    x, w = torch.randn(B, K, device=bench.device, dtype=dtype), merge_weights(B, E, bench.device)
                    expected = reference.lowrank_merged_linear(x.float(), w, A.float(), B_.float(), base.float())
                    el = dtype.itemsize
                    act = B * K * el + B * N * el + B * E * 4
                    case = dict(op="lowrank", layer=f"{N}×{K}", experts=E, sequences=B, tokens=1, rank=r)
                    lowrank = dict(bytes=(N * K + E * r * (N + K)) * el + act, flops=2 * B * (N * K + E * r * (N + K)))
                    methods = {
                        "lowrank-triton (ours)": lambda: kernels.lowrank_merged_linear(x, w, A, B_, base),
                        "lora-F.linear": lambda: lora_linear(x, w, a_cat, b_cat, base),
                        "einsum": lambda: reference.lowrank_merged_linear(x, w, A, B_, base),
                    }
                    for method, fn in methods.items():
                        bench.record(fn, expected, graph=True, method=method, **lowrank, **case)
                    bench.record(
                        lambda: F.linear(x, base),
                        F.linear(x.float(), base.float()),
                        graph=True,
                        method="base-gemm",
                        bytes=N * K * el + act,
                        flops=2 * B * N * K,
                        **case,
                    )


def run_crossover(bench: Bench, sweep: Sweep, dtype: torch.dtype) -> list[dict]:
    """Per-sequence prefill by both strategies over tokens per sequence; where materializing starts to win."""
    from moe_merge import kernels
    from moe_merge.kernels import reference

    N, K = sweep.layers[0]
    found = []
    for E in sweep.experts:
        deltas, base = layer_tensors(N, K, E, dtype, bench.device)
        for S in sweep.crossover_sequences:
            times = {}
            for T in sweep.crossover_tokens:
                x, w = torch.randn(S, T, K, device=bench.device, dtype=dtype), merge_weights(S, E, bench.device)
                expected = reference.merged_linear(
                    x.view(-1, K).float(), w.repeat_interleave(T, 0), deltas.float(), base.float()
                ).view(S, T, N)
                el, M = dtype.itemsize, S * T
                case = dict(
                    op="crossover",
                    layer=f"{N}×{K}",
                    experts=E,
                    sequences=S,
                    tokens=T,
                    rank=0,
                    bytes=(E + 1) * N * K * el + M * (K + N) * el,
                    flops=2 * N * K * (S * E + M),
                )
                for strategy in ("kconcat", "materialize"):
                    row = bench.record(
                        lambda: kernels.merged_linear_per_sequence(x, w, deltas, base, strategy=strategy),
                        expected,
                        graph=False,
                        method=strategy,
                        **case,
                    )
                    times[T, strategy] = row.seconds
            wins = [T for T in sweep.crossover_tokens if times[T, "materialize"] < times[T, "kconcat"]]
            found.append(
                {
                    "layer": f"{N}×{K}",
                    "experts": E,
                    "sequences": S,
                    "measured_tokens": wins[0] if wins else None,
                    "model_tokens": kernels.crossover_tokens(S, E, element_size=dtype.itemsize, rates=bench.rates),
                }
            )
        del deltas, base
    return found


SWEEPS = {
    "decode": run_decode,
    "prefill": run_prefill,
    "lowrank": run_lowrank,
}  # plus "crossover", which returns findings


# --- targets and reports -----------------------------------------------------------------------------


def targets(rows: list[Row]) -> list[dict]:
    """The H100 targets: for each, the value per covered case, how many meet it and the worst."""

    def find(op, method, **case):
        return [
            r
            for r in rows
            if r.op == op and r.method.startswith(method) and all(getattr(r, k) == v for k, v in case.items())
        ]

    def seconds(op, method, like):  # the time of `method` on the case of row `like`
        return find(
            op,
            method,
            layer=like.layer,
            experts=like.experts,
            sequences=like.sequences,
            tokens=like.tokens,
            rank=like.rank,
        )[0].seconds

    checks = [  # (target, [(row, value)], value meets it, lower is better)
        (
            "decode ≥ 85% of the bandwidth floor (B ≤ 64)",
            [(r, r.efficiency) for r in find("decode", "kconcat-triton") if r.sequences <= 64],
            lambda v: v >= 0.85,
            False,
        ),
        (
            "≥ 10× materialize+bmm at B=64, E=8",
            [
                (r, seconds("decode", "materialize+bmm", r) / r.seconds)
                for r in find("decode", "kconcat-triton", sequences=64, experts=8)
            ],
            lambda v: v >= 10,
            False,
        ),
        (
            "low-rank ≤ 1.1× base GEMM",
            [(r, r.seconds / seconds("lowrank", "base-gemm", r)) for r in find("lowrank", "lowrank-triton")],
            lambda v: v <= 1.1,
            True,
        ),
        (
            "prefill ≥ 75% of dense bf16 GEMM",
            [(r, seconds("prefill", "dense-gemm", r) / r.seconds) for r in find("prefill", "auto→")],
            lambda v: v >= 0.75,
            False,
        ),
    ]
    return [
        {
            "target": name,
            "passed": sum(meets(v) for _, v in cases),
            "cases": len(cases),
            "worst": (max if lower_better else min)(v for _, v in cases),
            "failing": [
                f"{r.layer} E={r.experts} S={r.sequences} T={r.tokens} r={r.rank}: {v:.2f}"
                for r, v in cases
                if not meets(v)
            ],
        }
        for name, cases, meets, lower_better in checks
        if cases
    ]


def markdown(meta: dict, rows: list[Row], checks: list[dict], crossover: list[dict]) -> str:
    lines = [
        f"# Merged-matmul kernels ({meta['date']}, {meta['device']})",
        "",
        f"Mode: {meta['mode']}. Timer: {', '.join(sorted({r.timer for r in rows}))}. "
        f"Measured in this run: copy {meta['rates']['bandwidth'] / 1e12:.3f} TB/s, "
        f"GEMM {meta['rates']['matmul_flops'] / 1e12:.2f} TFLOP/s ({meta['gemm_dtype']}). "
        "floor = max(bytes / bandwidth, flops / GEMM rate); bytes and flops are the problem's.",
        "",
    ]
    if meta["mode"] != "cuda":
        lines += ["**These are Triton-interpreter timings on a CPU, not GPU figures.**", ""]
    if checks:
        lines += ["| target (set for H100) | passed | worst |", "|---|---|---|"]
        lines += [f"| {c['target']} | {c['passed']}/{c['cases']} | {c['worst']:.2f} |" for c in checks]
        lines.append("")
    if crossover:
        lines += [
            "Tokens per sequence where materialize-then-GEMM overtakes K-concatenation:",
            "",
            "| layer | E | sequences | measured (first T that wins) | model (dispatch.crossover_tokens) |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {c['layer']} | {c['experts']} | {c['sequences']} | {c['measured_tokens'] or '> swept'} | "
            f"{c['model_tokens']:.0f} |"
            for c in crossover
        ]
        lines.append("")
    for op in dict.fromkeys(r.op for r in rows):
        lines += [
            f"## {op}",
            "",
            "| layer N×K | E | S | T | r | method | time (µs) | TB/s | TFLOP/s | floor/measured |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r.layer} | {r.experts} | {r.sequences} | {r.tokens} | {r.rank} | {r.method} | "
            f"{r.seconds * 1e6:.1f} | {r.tbps:.3f} | {r.tflops:.3f} | {r.efficiency:.2f} |"
            for r in rows
            if r.op == op
        ]
        lines.append("")
    return "\n".join(lines)


def roofline(path: Path, meta: dict, rows: list[Row]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bandwidth, peak = meta["rates"]["bandwidth"], meta["rates"]["matmul_flops"]
    fig, ax = plt.subplots(figsize=(9, 6))
    intensity = [r.flops / r.bytes for r in rows]
    xs = [min(intensity) / 2, peak / bandwidth, max(max(intensity) * 2, 2 * peak / bandwidth)]
    ax.plot(xs, [min(peak, x * bandwidth) / 1e12 for x in xs], "k-")
    family = {r.method: r.method.split(" (")[0].split("→")[0] for r in rows}  # "auto→kconcat (ours)" -> "auto"
    colours = {m: plt.cm.tab20(i % 20) for i, m in enumerate(dict.fromkeys(family.values()))}
    markers = dict(zip(dict.fromkeys(r.op for r in rows), "osD^v"))
    for r in rows:
        ax.scatter(r.flops / r.bytes, r.tflops, color=colours[family[r.method]], marker=markers[r.op], s=18)
    handles = [plt.Line2D([], [], color="k", label="roofline (measured)")]
    handles += [plt.Line2D([], [], ls="", marker="o", color=c, label=m) for m, c in colours.items()]
    handles += [plt.Line2D([], [], ls="", marker=mk, color="grey", label=op) for op, mk in markers.items()]
    ax.legend(handles=handles, fontsize=7, ncol=2)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="arithmetic intensity (flop/byte)",
        ylabel="achieved TFLOP/s",
        title=f"Merged matmuls on {meta['device']}, {meta['date']}"
        + ("" if meta["mode"] == "cuda" else "\nTriton interpreter on CPU — not GPU figures"),
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="tiny shapes in the Triton interpreter (default without CUDA)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON, markdown and PNG")
    choices = [*SWEEPS, "crossover"]
    parser.add_argument("--ops", default=",".join(choices), help=f"comma-separated subset of {', '.join(choices)}")
    args = parser.parse_args()
    ops = [op.strip() for op in args.ops.split(",")]
    unknown = set(ops) - set(choices)
    if unknown:
        parser.error(f"unknown --ops {', '.join(sorted(unknown))}; choose from {', '.join(choices)}")
    tiny = args.tiny or not torch.cuda.is_available()
    if tiny:  # before the kernel modules are imported (below, inside the sweeps)
        os.environ["TRITON_INTERPRET"] = "1"
        torch.set_num_threads(1)  # tiny CPU ops time more steadily on one thread
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16  # the interpreter's dots run in fp32 anyway
    sweep = TINY if tiny else FULL

    bench = Bench(device)
    name = (
        f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"
        if tiny
        else torch.cuda.get_device_name(device)
    )
    date = dt.date.today().isoformat()
    meta = {
        "device": name,
        "date": date,
        "mode": "interpreter (CPU)" if tiny else "cuda",
        "dtype": str(dtype),
        "gemm_dtype": "fp32" if tiny else "bf16",
        "rates": asdict(bench.rates),
        "torch": torch.__version__,
        "sweep": asdict(sweep),
    }
    print(
        f"{name}: copy {bench.rates.bandwidth / 1e12:.3f} TB/s, GEMM {bench.rates.matmul_flops / 1e12:.2f} TFLOP/s"
        + ("  [Triton interpreter on CPU: not GPU figures]" if tiny else "")
    )

    os.environ["MOE_MERGE_KERNELS"] = "triton"  # "ours" is the Triton path, whatever the caller's environment says
    for op in ops:
        if op != "crossover":
            SWEEPS[op](bench, sweep, dtype)
    crossover = run_crossover(bench, sweep, dtype) if "crossover" in ops else []
    checks = targets(bench.rows)
    for c in checks:
        verdict = "n/a (interpreter)" if tiny else ("PASS" if c["passed"] == c["cases"] else "FAIL")
        print(f"{verdict:18} {c['target']}: {c['passed']}/{c['cases']}, worst {c['worst']:.2f}")
    for c in crossover:
        print(
            f"crossover {c['layer']} E={c['experts']} S={c['sequences']}: measured T={c['measured_tokens']}, "
            f"model T={c['model_tokens']:.0f}"
        )
    if not tiny:
        print(
            f"kernels/dispatch.py: RATES[{bench.device.type!r}] = DeviceRates(bandwidth={bench.rates.bandwidth:.3e}, "
            f"matmul_flops={bench.rates.matmul_flops:.3e})  # {name}, {date}"
        )

    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", (f"{name} interpreter" if tiny else name).lower()).strip("-")
    stem = args.out / f"kernels-{slug}-{date}"
    rows = [{**asdict(r), "tbps": r.tbps, "tflops": r.tflops, "floor_over_measured": r.efficiency} for r in bench.rows]
    stem.with_suffix(".json").write_text(
        json.dumps({**meta, "targets": checks, "crossover": crossover, "rows": rows}, indent=1, ensure_ascii=False)
        + "\n"
    )
    stem.with_suffix(".md").write_text(markdown(meta, bench.rows, checks, crossover) + "\n")
    roofline(stem.with_suffix(".png"), meta, bench.rows)
    print(f"wrote {stem}.json, .md, .png")


if __name__ == "__main__":
    main()
