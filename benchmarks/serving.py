"""Serving throughput on the real zoo: `moe-merge serve --continuous-batching` on our dynamic model (smear at FFN
level over the four LoRA adapters, kept low-rank) against the dense base served the same way, at 1, 4 and 16
concurrent OpenAI clients on loopback. Goal: ours ≥ 0.8 × the base's tokens/s at 16 clients.

Each client sends chat requests one after another (mixed tasks and open questions, `max_tokens` 48, greedy) for a
fixed wall time after a warm-up; tokens/s counts the completion tokens the server reports. Every request runs to
`max_tokens` (its `generation_config` sets no end-of-sequence token): the experts answer a task in a few tokens and the
base rambles on, so with EOS the two would do different work per request. Both servers run in
turn, one at a time, each in its own process, at the model's stored dtype (bf16). Also measured: the merge weights a
request keeps (R × E float32) and the server's resident memory.

Usage: python benchmarks/serving.py [--clients 1,4,16] [--seconds 60] [--out benchmarks/results]
Writes serving-<device>-<date>.{json,md} (needs the real zoo: `moe-merge zoo --real smollm2`, or it is built).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import openai

from moe_merge import realzoo
from moe_merge.assemble import assemble
from moe_merge.config import MergeConfig

OPEN = [
    "Write a short story about a lighthouse keeper.",
    "Explain how rain forms.",
    "Describe a busy market.",
    "What makes a good friend?",
]


NO_EOS = json.dumps({"eos_token_id": -1})  # per request, transformers' continuous batching: run to max_tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model_dir: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moe_merge.cli",
            "serve",
            str(model_dir),
            "--port",
            str(port),
            "--continuous-batching",
            "--num-blocks",
            "32",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise TimeoutError(f"{model_dir}: no server after 300 s")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(port: int, model: str, clients: int, seconds: float, messages: list[list[dict]]) -> dict:
    """`clients` threads asking in a loop for `seconds`: completion tokens per second, requests done."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    tokens, done, stop = [0] * clients, [0] * clients, time.time() + seconds

    def worker(i: int) -> None:
        k = i
        while time.time() < stop:
            out = client.chat.completions.create(
                model=model,
                messages=messages[k % len(messages)],
                max_tokens=48,
                temperature=0,
                extra_body={"generation_config": NO_EOS},
            )
            tokens[i] += out.usage.completion_tokens
            done[i] += 1
            k += clients

    t = time.time()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.time() - t
    return {"tokens_per_s": sum(tokens) / wall, "requests": sum(done), "tokens": sum(tokens), "wall_s": wall}


def generate_state_bytes(model_dir: Path, prompts: list[str]) -> dict[int, int]:
    """What `generate`'s routing layer holds per sequence after the prefill, at B = 1 and 16: merge weights, and the
    merged weights kept where decoding on them is cheaper (kernels.keep_decode_weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from moe_merge.modeling import CACHE
    from moe_merge.tokens import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = load_tokenizer(model_dir)
    out = {}
    for batch in (1, 16):
        enc = tok(prompts[:batch], return_tensors="pt", padding=True, padding_side="left")
        with torch.no_grad():
            state = model(**enc)[CACHE].layers[-1]
        out[batch] = state.nbytes() // batch
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    zoo = realzoo.ensure_real_zoo("smollm2")
    dynamic = Path(tempfile.mkdtemp()) / "smear-ffn"
    assemble(MergeConfig.model_validate(realzoo.zoo_recipe(zoo, "lora", method="smear", level="ffn")), dynamic)
    names = [e["name"] for e in realzoo.zoo_recipe(zoo, "lora")["experts"]]
    rows = [r for i in range(8) for t in names for r in realzoo.eval_rows([t])[i : i + 1]]
    messages = [[{"role": "user", "content": p}] for p in OPEN + [r["prompt"] for r in rows]]
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "seconds_per_point": args.seconds,
        "max_tokens": 48,
        "models": {},
    }
    for name, path in (("base", zoo / "base"), ("ours: smear ffn, LoRA low-rank", dynamic)):
        port = free_port()
        server = start(path, port)
        try:
            load(port, str(path), 4, 10, messages)  # warm-up: the batch processor, the allocator, first shapes
            points = {}
            for c in clients:
                points[c] = load(port, str(path), c, args.seconds, messages)
                print(
                    f"{name:34s} {c:3d} clients: {points[c]['tokens_per_s']:7.1f} tokens/s "
                    f"({points[c]['requests']} requests)",
                    flush=True,
                )
            results["models"][name] = {"points": points, "rss_mib": rss_mib(server.pid)}
        finally:
            server.terminate()
            server.wait(60)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(dynamic)
    results["kept_bytes_per_request"] = config.num_routers * config.num_experts * 4
    results["generate_state_bytes_per_sequence"] = generate_state_bytes(dynamic, [r["prompt"] for r in rows])
    base, ours = (results["models"][k]["points"] for k in results["models"])
    results["ratio"] = {c: ours[c]["tokens_per_s"] / base[c]["tokens_per_s"] for c in clients}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"serving-cpu-{results['date']}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"# Serving throughput, real zoo (SmolLM2-135M-Instruct, bf16), continuous batching, {results['date']}",
        "",
        f"{results['machine']}; chat requests of mixed tasks and open questions, max_tokens 48 (every request runs to it), greedy; "
        f"{args.seconds:.0f} s per point.",
        "",
        "| clients | base tokens/s | ours tokens/s | ours / base |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {c} | {base[c]['tokens_per_s']:.1f} | {ours[c]['tokens_per_s']:.1f} | {results['ratio'][c]:.2f} |"
        for c in clients
    ]
    state = results["generate_state_bytes_per_sequence"]
    lines += [
        "",
        f"Kept per request: {results['kept_bytes_per_request']} bytes of merge weights "
        f"({config.num_routers} routers × {config.num_experts} experts, float32). `generate`'s routing layer per "
        f"sequence: {state[1]:,} bytes at B = 1, {state[16]:,} at B = 16 (merge weights, plus the merged weights "
        "it keeps where decoding on them is cheaper). Server RSS: "
        + ", ".join(f"{k} {v['rss_mib']:.0f} MiB" for k, v in results["models"].items())
        + ".",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.{{json,md}}")


if __name__ == "__main__":
    main()
