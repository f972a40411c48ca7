"""Greedy `generate` at a realistic shape against every peer, side by side in one run.

E = 4 experts, B in {1, 16, 64} prompts of 16 random tokens, 32 new tokens, random weights, on this machine:
- `base`: the dense base model alone (the floor);
- `wemoe dense`: our dynamic model, WEMoE at FFN level with dense task vectors;
- `K-concat floor`: the base with each MLP projection one GEMM over [x, w_1·x, ..., w_E·x] and [W0, Δ_1, ...,
  Δ_E]: the compute that `wemoe dense` cannot go below on a CPU;
- `lora low-rank`: ours, SMEAR over LoRA experts (r = 16 on every linear layer) kept as factors;
- `twin svd`: ours, Twin-Merging at FFN level, W0 = the shared merge plus rank-32 SVD factors per expert;
- `per-request loop`: merge each request's weights into a dense model, then generate it alone (how Twin-Merging's
  and fusion_bench's code serve; its merge weights are given to it for free);
- `peft mixed batch`: PEFT's LoRA with one adapter per row (`adapter_names`), the same adapters' shape;
- `fusion_bench wemoe`: fusion_bench 0.2.33's `WeightEnsemblingMoE` around every MLP (per-sample
  `functional_call`), run in its own environment (a venv over this one's packages, fusion_bench installed there).

Usage: python benchmarks/decode.py [--shapes zoo,qwen3-76m] [--batches 1,16,64] [--only NAME,...] [--skip NAME,...]
                                  [--new-tokens 32] [--device cpu|cuda] [--dtype float32|bfloat16] [--out DIR]
`benchmarks/gpu.sh` runs it on CUDA in bf16 at the `llama-1b` shape for ours against the base alone.
Writes decode-<device>-<date>.{json,md,png} under benchmarks/results/ or --out.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from moe_merge.arch import ATTN_PROJS, MLP_PROJS
from moe_merge.merged_linear import MergedLinear
from moe_merge.modeling import MoEMergeConfig, MoEMergeForCausalLM

SHAPES = {  # name -> (model_type, config overrides)
    "zoo": (
        "llama",
        dict(
            hidden_size=64,
            intermediate_size=192,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=32,
            tie_word_embeddings=False,
        ),
    ),
    "qwen3-76m": (
        "qwen3",
        dict(
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=8,
            num_attention_heads=12,
            num_key_value_heads=4,
            head_dim=64,
            vocab_size=32000,
            tie_word_embeddings=True,
        ),
    ),
    "smollm2-135m": (
        "llama",
        dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            vocab_size=49152,
            tie_word_embeddings=True,
        ),
    ),
    "llama-1b": (
        "llama",
        dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=64,
            vocab_size=32000,
            tie_word_embeddings=False,
        ),
    ),
}
E, PROMPT, LORA_RANK, TWIN_RANK = 4, 16, 16, 32
FUSION_BENCH = "fusion_bench==0.2.33"
SLOW = ("per-request loop", "fusion_bench wemoe")  # one timed run at B > 1: each takes tens of seconds


@dataclass(frozen=True)
class Setup:
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    new_tokens: int = 32


def text_config(shape: str, setup: Setup):
    arch, overrides = SHAPES[shape]
    return AutoConfig.for_model(arch, max_position_embeddings=PROMPT + setup.new_tokens + 8, **overrides)


@contextlib.contextmanager
def on(setup: Setup):
    """Build models straight on the setup's device and in its dtype (a 1B model is never made in float32 first)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(setup.dtype)
    try:
        with torch.device(setup.device):
            yield
    finally:
        torch.set_default_dtype(old)


def params_of(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------- models


def base_model(text) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(text).eval()


def dynamic_model(text, method: str, level: str, form: str, rank: int | None = None) -> MoEMergeForCausalLM:
    """Ours, random weights: nonzero task vectors or factors, and routers that give every prompt its own weights."""
    projs = MLP_PROJS if level == "ffn" else ATTN_PROJS + MLP_PROJS
    config = MoEMergeConfig(
        text_config=text.to_dict(),
        num_experts=E,
        method=method,
        level=level,
        delta_forms={p: form for p in projs},
        delta_ranks={p: rank for p in projs} if rank else {},
        router_normalize="none" if method == "wemoe" else "softmax",
    )
    torch.manual_seed(0)
    model = MoEMergeForCausalLM(config).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MergedLinear):
                for name in ("delta_weight", "lora_B"):
                    if hasattr(m, name):
                        getattr(m, name).normal_(0, 0.002)
        for r in model.routers():
            r.set_random(0.5)
    return model


class KConcatFloor(nn.Module):
    """y = [x, w_1·x, ..., w_E·x] · [W0, Δ_1, ..., Δ_E]ᵀ: one GEMM with the flops of a dense-delta merged linear."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(linear.out_features, (E + 1) * linear.in_features) * 0.02)
        self.w = torch.rand(E)

    def forward(self, x):
        return torch.cat([x, *(x * w for w in self.w)], -1) @ self.weight.T


def kconcat_floor(text) -> nn.Module:
    model = base_model(text)
    for layer in model.model.layers:
        for p in MLP_PROJS:
            setattr(layer.mlp, p, KConcatFloor(getattr(layer.mlp, p)))
    return model


def peft_model(text) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=list(ATTN_PROJS + MLP_PROJS))
    model = get_peft_model(base_model(text), config, adapter_name="e0")
    for e in range(1, E):
        model.add_adapter(f"e{e}", config)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.002)
    return model.eval()


def fusion_bench_model(text) -> nn.Module:
    """fusion_bench's WEMoE: each MLP wrapped with its router (depth 2) and E task vectors."""
    from fusion_bench.models.we_moe import WeightEnsemblingMoE

    model = base_model(text)
    for layer in model.model.layers:
        experts = [copy.deepcopy(layer.mlp) for _ in range(E)]
        for expert in experts:
            for p in expert.parameters():
                p.data += 0.002 * torch.randn_like(p)
        layer.mlp = WeightEnsemblingMoE(
            text.hidden_size, layer.mlp, experts, init_lambda=0.3, batch_first=True, router_hidden_layers=2
        )
    return model.eval()


# ----------------------------------------------------------------------------------------- timing


def prompts(text, batch: int, setup: Setup) -> torch.Tensor:
    ids = torch.randint(3, text.vocab_size, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
    return ids.to(setup.device)


@torch.no_grad()
def generate(model, ids: torch.Tensor, setup: Setup, **kwargs) -> torch.Tensor:
    return model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=setup.new_tokens,
        min_new_tokens=setup.new_tokens,
        do_sample=False,
        pad_token_id=0,
        **kwargs,
    )


def static_compiled(batch: int) -> dict:
    """`generate` on a static KV cache with the decode step compiled (inductor; on a CPU too)."""
    from transformers import CompileConfig

    # one graph per (model, batch size): the variants and shapes here share the models' forward code objects
    torch._dynamo.config.recompile_limit = 64
    config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    config._compile_all_devices = True  # transformers compiles on accelerators only unless told
    return {"cache_implementation": "static", "compile_config": config}


def runner(model, setup: Setup, per_batch=None):
    """ids -> the call to time: `generate` on ids, with the keyword arguments `per_batch(B)` gives."""
    return lambda ids: lambda: generate(model, ids, setup, **(per_batch(len(ids)) if per_batch else {}))


def per_request(text, setup: Setup):
    """Each request alone: its merged MLP weights written into a dense model, then its own generate. Its merge
    weights come from our model's routers, untimed."""
    dyn = dynamic_model(text, "wemoe", "ffn", "dense")
    dense = base_model(text)
    dense.load_state_dict({k: v for k, v in dyn.state_dict().items() if k in dense.state_dict()}, strict=False)
    pairs = [
        (dense.get_submodule(n), m, int(n.split(".")[2])) for n, m in dyn.named_modules() if isinstance(m, MergedLinear)
    ]

    def make(ids):
        with torch.no_grad():
            weights = dyn(input_ids=ids, use_cache=False).merge_weights  # [B, R, E]

        @torch.no_grad()
        def run():
            for b in range(len(ids)):
                for linear, merged, layer in pairs:
                    linear.weight.copy_(merged.merged(weights[b, dyn.config.router_of_layer(layer)])[0])
                generate(dense, ids[b : b + 1], setup)

        return run

    return make


VARIANTS = {  # name -> (text config, setup) -> (ids -> the call to time); built only when run
    "base": lambda text, s: runner(base_model(text), s),
    "wemoe dense": lambda text, s: runner(dynamic_model(text, "wemoe", "ffn", "dense"), s),
    "K-concat floor": lambda text, s: runner(kconcat_floor(text), s),
    "lora low-rank": lambda text, s: runner(dynamic_model(text, "smear", "block", "lowrank", LORA_RANK), s),
    "base static+compile": lambda text, s: runner(base_model(text), s, static_compiled),
    "lora low-rank static+compile": lambda text, s: runner(
        dynamic_model(text, "smear", "block", "lowrank", LORA_RANK), s, static_compiled
    ),
    "twin svd": lambda text, s: runner(dynamic_model(text, "twin", "ffn", "lowrank", TWIN_RANK), s),
    "per-request loop": per_request,
    "peft mixed batch": lambda text, s: runner(
        peft_model(text), s, lambda B: {"adapter_names": [f"e{b % E}" for b in range(B)]}
    ),
}


def seconds(call, setup: Setup) -> float:
    t = time.perf_counter()
    call()
    if setup.device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def repeats(name: str, batch: int, first: float) -> int:
    """Runs to take the median of: 11 for a call under half a second (noise is relative), 3 above, 1 for the
    slow peers at B > 1 (tens of seconds each)."""
    if name in SLOW and batch > 1:
        return 1
    return 11 if first < 0.5 else 3


def time_variants(shape: str, batches: list[int], names: list[str], setup: Setup) -> dict:
    """{variant: {B: seconds}} for one shape, every variant timed at one B before the next B."""
    text = text_config(shape, setup)
    with torch.device("meta"):
        params = {
            "base": params_of(base_model(text)),
            "wemoe dense": params_of(dynamic_model(text, "wemoe", "ffn", "dense")),
        }
    with on(setup):
        variants = {name: VARIANTS[name](text, setup) for name in names}
    out: dict[str, dict[int, float]] = {k: {} for k in variants}
    for make in variants.values():
        make(prompts(text, 1, setup))()  # warm-up: first calls, allocator, thread pools
    for batch in batches:
        ids = prompts(text, batch, setup)
        calls = {name: make(ids) for name, make in variants.items()}
        times: dict[str, list[float]] = {name: [] for name in calls}
        while any(not ts or len(ts) < repeats(n, batch, ts[0]) for n, ts in times.items()):
            for name, call in calls.items():  # one run of each in turn: the variants share the machine's noise
                if not times[name] or len(times[name]) < repeats(name, batch, times[name][0]):
                    times[name].append(seconds(call, setup))
        for name, ts in times.items():
            out[name][batch] = statistics.median(ts)
            print(
                f"{shape:10s} B={batch:<3d} {name:18s} {out[name][batch]:8.3f} s "
                f"({batch * setup.new_tokens / out[name][batch]:.0f} tokens/s, median of {len(ts)})",
                flush=True,
            )
    return {"params": params, "seconds": out}


# ----------------------------------------------------------------------------------------- fusion_bench


def peer_env(spec: str) -> Path:
    """A venv over this environment's packages (same torch and transformers) with `spec` installed in it."""
    home = Path(os.environ.get("MOE_MERGE_CACHE", Path.home() / ".cache" / "moe-merge"))
    env = home / "benchmark-envs" / spec.replace("==", "-")
    python = env / "bin" / "python"
    if not (env / ".installed").is_file():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True)
        site = next(p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").is_dir())
        # addsitedir also reads that directory's .pth files: moe_merge's editable install among them
        (
            env
            / "lib"
            / f"python{sys.version_info.major}.{sys.version_info.minor}"
            / "site-packages"
            / "moe-merge-benchmark.pth"
        ).write_text(f"import site; site.addsitedir({site!r})\n")
        subprocess.run([str(python), "-m", "pip", "install", "-q", spec], check=True)
        (env / ".installed").write_text(spec)
    return python


def time_fusion_bench(shape: str, batches: list[int], setup: Setup) -> dict[int, float] | str:
    """fusion_bench's seconds per B, from its own environment, or why it could not run."""
    try:
        python = peer_env(FUSION_BENCH)
    except (subprocess.CalledProcessError, StopIteration, OSError) as e:
        return f"could not install {FUSION_BENCH}: {e}"
    run = subprocess.run(
        [
            str(python),
            __file__,
            "--peer",
            "--shapes",
            shape,
            "--batches",
            ",".join(map(str, batches)),
            "--new-tokens",
            str(setup.new_tokens),
        ],
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        return f"{FUSION_BENCH} failed at this shape: {run.stderr.strip().splitlines()[-1] if run.stderr else run.returncode}"
    return {int(b): s for b, s in json.loads(run.stdout.strip().splitlines()[-1]).items()}


def peer_main(shape: str, batches: list[int], setup: Setup) -> None:
    text = text_config(shape, setup)
    model = fusion_bench_model(text)
    generate(model, prompts(text, 1, setup), setup)
    out = {}
    for b in batches:
        ids = prompts(text, b, setup)
        ts = [seconds(lambda ids=ids: generate(model, ids, setup), setup)]
        ts += [
            seconds(lambda ids=ids: generate(model, ids, setup), setup)
            for _ in range(repeats("fusion_bench wemoe", b, ts[0]) - 1)
        ]
        out[b] = statistics.median(ts)
    print(json.dumps(out))


# ----------------------------------------------------------------------------------------- report


def ratios(seconds: dict) -> dict:
    """The goals' ratios at each B, for the variants that ran."""
    pairs = [
        ("lora low-rank", "base"),
        ("twin svd", "base"),
        ("wemoe dense", "base"),
        ("wemoe dense", "K-concat floor"),
        ("per-request loop", "wemoe dense"),
        ("fusion_bench wemoe", "wemoe dense"),
        ("peft mixed batch", "lora low-rank"),
        ("lora low-rank static+compile", "base static+compile"),
        ("lora low-rank static+compile", "base"),
        ("lora low-rank", "lora low-rank static+compile"),
        ("per-request loop", "lora low-rank static+compile"),
    ]
    return {
        b: {
            f"{a} / {c}": seconds[a][b] / seconds[c][b]
            for a, c in pairs
            if b in seconds.get(a, {}) and b in seconds.get(c, {})
        }
        for b in seconds["base"]
    }


def write(results: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"decode-{results['slug']}-{results['date']}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    new = results["new_tokens"]
    lines = [
        f"# Greedy generate: {E} experts, {PROMPT}-token prompts, {new} new tokens, {results['dtype']}",
        "",
        f"{results['device']}, {results['date']}; torch {results['torch']}, transformers {results['transformers']}.",
        "Times are medians of 11 runs (3 above half a second; one for the per-request loop and fusion_bench at "
        "B > 1), the variants run in turn.",
        "",
    ]
    for shape, r in results["shapes"].items():
        secs = r["seconds"]
        batches = sorted(secs["base"])
        lines += [
            f"## {shape}: base {r['params']['base'] / 1e6:.1f}M parameters, WEMoE model "
            f"{r['params']['wemoe dense'] / 1e6:.1f}M",
            "",
            "| variant | "
            + " | ".join(f"B={b} (s)" for b in batches)
            + " | "
            + " | ".join(f"B={b} tokens/s" for b in batches)
            + " | "
            + " | ".join(f"B={b} / base" for b in batches)
            + " |",
            "|---|" + "---|" * 3 * len(batches),
        ]
        for name, by_b in secs.items():
            cells = [f"{by_b[b]:.3f}" if b in by_b else "-" for b in batches]
            cells += [f"{b * new / by_b[b]:.0f}" if b in by_b else "-" for b in batches]
            cells += [f"{by_b[b] / secs['base'][b]:.2f}x" if b in by_b else "-" for b in batches]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if "fusion_bench" in r:
            lines += ["", f"fusion_bench: {r['fusion_bench']}"]
        names = list(dict.fromkeys(k for rs in r["ratios"].values() for k in rs))
        if names:
            lines += ["", "| B | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            lines += [
                f"| {b} | " + " | ".join(f"{rs[k]:.2f}" if k in rs else "-" for k in names) + " |"
                for b, rs in r["ratios"].items()
            ]
        lines.append("")
    stem.with_suffix(".md").write_text("\n".join(lines))
    plot(results, stem.with_suffix(".png"))
    return stem


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = results["shapes"]
    fig, axes = plt.subplots(1, len(shapes), figsize=(6.5 * len(shapes), 4), squeeze=False)
    for ax, (shape, r) in zip(axes[0], shapes.items()):
        secs, batches = r["seconds"], sorted(r["seconds"]["base"])
        width = 0.8 / len(secs)
        for i, (name, by_b) in enumerate(secs.items()):
            ax.bar(
                [j + i * width for j in range(len(batches))],
                [by_b[b] / secs["base"][b] if b in by_b else float("nan") for b in batches],
                width,
                label=name,
            )
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"B={b}" for b in batches])
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_ylabel("time / dense base (log)")
        ax.set_title(
            f"{shape} ({r['params']['base'] / 1e6:.0f}M), {E} experts, {results['new_tokens']} new tokens", fontsize=9
        )
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"{results['device']}, {results['date']}", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def device_name(setup: Setup) -> str:
    if setup.device == "cpu":
        return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return torch.cuda.get_device_name(torch.device(setup.device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="zoo,qwen3-76m", help=f"comma-separated, from {', '.join(SHAPES)}")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument(
        "--only",
        default=",".join([*VARIANTS, "fusion_bench wemoe"]),
        help="variants to run, comma-separated (default: every one)",
    )
    parser.add_argument("--skip", default="", help="variants to leave out, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)  # the fusion_bench child process
    args = parser.parse_args()
    setup = Setup(args.device, getattr(torch, args.dtype), args.new_tokens)
    shapes, batches = args.shapes.split(","), [int(b) for b in args.batches.split(",")]
    if args.peer:
        return peer_main(shapes[0], batches, setup)
    skip = {v.strip() for v in args.skip.split(",")}
    names = [v.strip() for v in args.only.split(",") if v.strip() and v.strip() not in skip]
    if unknown := set(names) - set(VARIANTS) - {"fusion_bench wemoe"}:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {[*VARIANTS, 'fusion_bench wemoe']}")
    if "base" not in names:
        parser.error("`base` is what every ratio divides by: keep it")
    device = device_name(setup)
    results = {
        "device": device,
        "slug": re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-"),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "dtype": args.dtype,
        "new_tokens": setup.new_tokens,
        "shapes": {},
    }
    for shape in shapes:
        r = time_variants(shape, batches, [n for n in names if n in VARIANTS], setup)
        if "fusion_bench wemoe" in names:
            fb = time_fusion_bench(shape, batches, setup)
            if isinstance(fb, str):
                r["fusion_bench"] = fb
                print(fb, flush=True)
            else:
                r["seconds"]["fusion_bench wemoe"] = fb
                print(
                    f"{shape:10s} fusion_bench wemoe " + "  ".join(f"B={b}: {s:.3f} s" for b, s in fb.items()),
                    flush=True,
                )
        r["ratios"] = ratios(r["seconds"])
        results["shapes"][shape] = r
    print(f"wrote {write(results, args.out)}.{{json,md,png}}")


if __name__ == "__main__":
    main()
