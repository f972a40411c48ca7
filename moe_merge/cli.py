"""`moe-merge`: parse arguments, call the library, turn its errors into exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from moe_merge.errors import MoEMergeError

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


def build_parser() -> argparse.ArgumentParser:
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

    p = sub.add_parser(
        "assemble",
        parents=[verbose],
        help="build a MoE or dynamic-merge model from a recipe YAML",
        description="Build a model from a recipe YAML (a mergekit-moe YAML works unchanged). `method: sparse` at "
        "`level: ffn` writes a stock Mixtral / Qwen-MoE checkpoint: each layer's MLP becomes one expert per entry "
        "of `experts`. Every other method/level (smear, wemoe, twin; block and model levels) writes a moe_merge "
        "dynamic model whose routers merge the experts per input. Routers start from the experts' prompts. "
        "Writes sharded safetensors, config, tokenizer, the resolved recipe, a routing report (JSON + PNG) and "
        "a model card.",
    )
    p.add_argument("config", type=Path, help="recipe YAML (see the YAML reference in README.md)")
    p.add_argument("out_dir", type=Path, help="output directory; written to a temporary sibling and renamed")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--device", default="cpu", help="device for the router prompts' forward passes (default cpu)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="output dtype (default: the recipe's `dtype`, else the base's)")
    p.add_argument("--shard-size", type=parse_size, default="5G", help="maximum shard size, e.g. 5G, 500M (default 5G)")
    p.add_argument("--seed", type=int, help="seed for random routers, noise and DARE (default: the recipe's `seed`, 0)")

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

    p = sub.add_parser(
        "bake",
        parents=[verbose],
        help="write a plain dense checkpoint of the base architecture for one fixed mix",
        description="Bake a dynamic model for a fixed mix into a stock dense checkpoint (no remote code): each "
        "merged linear layer becomes W0 + sum_e w_e delta_e. The mix is given as one weight per expert "
        "(--weights) or taken from what the routers give a prompt (--prompt). Sparse block/model models bake "
        "only for one-hot weights.",
    )
    p.add_argument("model_dir", type=Path, help="a moe-merge dynamic model directory")
    p.add_argument("out_dir", type=Path, help="output directory; written to a temporary sibling and renamed")
    mix = p.add_mutually_exclusive_group(required=True)
    mix.add_argument("--weights", type=parse_weights, help="comma-separated merge weights, one per expert, e.g. 1,0,0")
    mix.add_argument("--prompt", help="use the merge weights the routers give this prompt")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")

    p = sub.add_parser(
        "zoo",
        parents=[verbose],
        help="build the tiny test zoo: a base LM, full fine-tunes and LoRA adapters",
        description="Build the deterministic tiny zoo: a small base LM trained on letter-mapping tasks, then "
        "full fine-tuned experts and PEFT LoRA adapters on new tasks, in two variants (`full/`: every weight "
        "fine-tuned; `mlp/`: MLPs only). About two minutes on 2 CPU cores.",
    )
    p.add_argument("out_dir", type=Path, help="where to write the zoo")
    p.add_argument("--arch", choices=["llama", "mistral", "qwen2", "qwen3"], default="llama", help="base family")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")

    p = sub.add_parser(
        "demo",
        parents=[verbose],
        help="build the zoo, assemble it, print routing and per-task accuracy",
        description="End-to-end demo on the tiny zoo (cached in $MOE_MERGE_CACHE or ~/.cache/moe_merge): "
        "assembles the MLP-only and the full fine-tune variants, prints the routing report and each task's "
        "exact match for every expert, the base and the assembled MoE, and generates a few samples.",
    )
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="where to write the assembled models")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "assemble":
            from moe_merge.assemble import assemble
            from moe_merge.config import load_config

            config = load_config(args.config)
            out = assemble(config, args.out_dir, recipe_dir=args.config.parent.absolute(), force=args.force,
                           device=args.device, dtype=args.dtype, shard_size=args.shard_size, seed=args.seed)
            print(f"wrote {out}")
        elif args.command == "generate":
            from moe_merge.generate import generate

            generate(args.model_dir, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     seed=args.seed, show_routing=args.show_routing)
        elif args.command == "bake":
            from moe_merge.bake import bake

            print(f"wrote {bake(args.model_dir, args.out_dir, weights=args.weights, prompt=args.prompt, force=args.force)}")
        elif args.command == "zoo":
            from moe_merge.zoo import build_zoo

            print(f"wrote {build_zoo(args.out_dir, arch=args.arch, force=args.force)}")
        elif args.command == "demo":
            from moe_merge.demo import run_demo

            run_demo(args.out)
    except MoEMergeError as e:
        print(f"moe-merge: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
