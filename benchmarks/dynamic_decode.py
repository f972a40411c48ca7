"""CPU decode throughput of the dynamic model against one dense expert and a per-sample loop.

One decode step (one new token per sequence, KV cache of a 32-token prompt) at B in {1, 16, 64}
with E=4 experts merged at FFN level (WEMoE form: W0 + sum_e w_e tau_e), for:
- dynamic, dense task vectors;
- dynamic, low-rank task vectors (r=16);
- one dense expert (the stock base architecture): the floor;
- a per-sample loop: for each sequence, form its merged weights and run the stock model with
  `torch.func.functional_call` (fusion_bench's WEMoE way).
Ratios are measured side by side in one run. Usage: python benchmarks/dynamic_decode.py [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moe_merge.merged_linear import MergedLinear
from moe_merge.modeling import CACHE, MoEMergeConfig, MoEMergeForCausalLM

SIZES = {  # name -> base config overrides
    "zoo (64 hidden, 4 layers)": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=34),
    "~100M (768 hidden, 12 layers)": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                          num_attention_heads=12, num_key_value_heads=4, vocab_size=32000),
}
E, PROMPT, RANK = 4, 32, 16


def models(overrides: dict):
    text = AutoConfig.for_model("llama", max_position_embeddings=256, tie_word_embeddings=False, **overrides)
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(text).eval()
    built = {}
    for name, form in (("dynamic, dense deltas", "dense"), ("dynamic, low-rank deltas", "lowrank")):
        cfg = MoEMergeConfig(text_config=text.to_dict(), num_experts=E, method="wemoe", level="ffn",
                             delta_forms={p: form for p in ("gate_proj", "up_proj", "down_proj")},
                             delta_ranks={p: RANK for p in ("gate_proj", "up_proj", "down_proj")} if form == "lowrank" else {},
                             router_normalize="none")
        torch.manual_seed(0)
        built[name] = MoEMergeForCausalLM(cfg).eval()
    return dense, built


def time_it(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def decode_step(model, batch: int, vocab: int):
    ids = torch.randint(3, vocab, (batch, PROMPT))
    w = torch.softmax(torch.randn(batch, E), -1)
    kw = {"merge_weights": w} if isinstance(model, MoEMergeForCausalLM) else {}
    out = model(input_ids=ids, use_cache=True, **kw)
    nxt = out.logits[:, -1:].argmax(-1)
    cache = out[CACHE]

    def step():
        model(input_ids=nxt, use_cache=True, **{CACHE: cache}, **kw)
        cache.crop(-1)  # back to the prompt, so every repetition decodes the same position

    return step


@torch.no_grad()
def loop_step(dense, dynamic, batch: int, vocab: int):
    """fusion_bench's way: per sample, materialize the merged MLP weights and call the stock model."""
    from transformers import DynamicCache

    params = dict(dense.named_parameters())
    w = torch.softmax(torch.randn(batch, E), -1)
    merged_layers = {n: m for n, m in dynamic.named_modules() if isinstance(m, MergedLinear)}
    ids = torch.randint(3, vocab, (batch, PROMPT))
    caches, nxt = [], []
    for b in range(batch):
        cache = DynamicCache(config=dense.config)
        out = dense(input_ids=ids[b : b + 1], use_cache=True, **{CACHE: cache})
        caches.append(cache)
        nxt.append(out.logits[:, -1:].argmax(-1))

    def step():
        for b in range(batch):
            sample = dict(params)
            for n, m in merged_layers.items():
                sample[f"{n}.weight"] = m.weight + torch.einsum("e,enk->nk", w[b], m.delta_weight)
            torch.func.functional_call(dense, sample, args=(), kwargs=dict(input_ids=nxt[b], use_cache=True, **{CACHE: caches[b]}))
            caches[b].crop(-1)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--quick", action="store_true", help="zoo size only, B=1 and 16, few repetitions")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    rows = []
    sizes = dict(list(SIZES.items())[:1]) if args.quick else SIZES
    for size, overrides in sizes.items():
        dense, built = models(overrides)
        vocab = overrides["vocab_size"]
        for batch in ((1, 16) if args.quick else (1, 16, 64)):
            reps = 3 if args.quick else 10
            t = {"one dense expert": time_it(decode_step(dense, batch, vocab), reps)}
            for name, model in built.items():
                t[name] = time_it(decode_step(model, batch, vocab), reps)
            t["per-sample functional_call loop"] = time_it(loop_step(dense, built["dynamic, dense deltas"], batch, vocab),
                                                           max(1, reps // 3))
            row = {"size": size, "batch": batch, "experts": E, "seconds": t,
                   "loop / dynamic dense": t["per-sample functional_call loop"] / t["dynamic, dense deltas"],
                   "low-rank / one expert": t["dynamic, low-rank deltas"] / t["one dense expert"],
                   "dense deltas / one expert": t["dynamic, dense deltas"] / t["one dense expert"]}
            rows.append(row)
            print(f"{size:32s} B={batch:3d}  " + "  ".join(f"{k}: {v * 1e3:.2f} ms" for k, v in t.items())
                  + f"  | loop/dynamic {row['loop / dynamic dense']:.1f}x  low-rank/expert {row['low-rank / one expert']:.2f}x",
                  flush=True)
    device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    date = datetime.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"dynamic-decode-{date}"
    stem.with_suffix(".json").write_text(json.dumps({"device": device, "date": date, "rows": rows}, indent=2))
    lines = [f"# Dynamic decode step, {device}, {date}", "",
             "| size | B | one expert (ms) | dynamic dense (ms) | dynamic low-rank (ms) | per-sample loop (ms) | loop / dynamic | low-rank / expert |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["seconds"]
        lines.append(f"| {r['size']} | {r['batch']} | {s['one dense expert'] * 1e3:.2f} | {s['dynamic, dense deltas'] * 1e3:.2f} | "
                     f"{s['dynamic, low-rank deltas'] * 1e3:.2f} | {s['per-sample functional_call loop'] * 1e3:.1f} | "
                     f"{r['loop / dynamic dense']:.1f}x | {r['low-rank / one expert']:.2f}x |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
