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
        help="build a stock Mixtral / Qwen-MoE checkpoint from a recipe YAML",
        description="Build a stock Mixtral / Qwen-MoE checkpoint from a recipe YAML (a mergekit-moe YAML works "
        "unchanged). Each decoder layer's MLP becomes one expert per entry of `experts`, with a router "
        "initialised from the experts' prompts. Writes sharded safetensors, config, tokenizer, the resolved "
        "recipe, a routing report (JSON + PNG) and a model card.",
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
