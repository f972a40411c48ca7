"""`assemble --dry-run`: what an assembly would write, where each tensor comes from, and what it costs.

It reads config.json, the index files and each safetensors file's header (LoRA adapters, a few MB, are read
whole). Of the tensor data it reads only what decides the plan, as `assemble` does: for a dynamic model, the
embeddings, norms and head of full checkpoints, to see whether the experts differ from the base there (stopping at
the first that does). A stock recipe of 8 × 7B experts is planned in a second. The
peak-memory figure is an estimate of what `assemble` holds at its busiest step, not a measurement.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moe_merge.arch import layer_of
from moe_merge.assemble import dynamic, stock
from moe_merge.config import MergeConfig
from moe_merge.methods import PARTS
from moe_merge.recipe import Recipe, TensorPlan, open_recipe
from moe_merge.sources import Checkpoint, LoraExpert

# Importing torch, transformers and matplotlib (measured: about 0.4-0.5 GiB before any tensor).
RUNTIME_BYTES = 512 * 2**20
FLOAT32 = 4


@dataclass
class PlanRow:
    """Output tensors that share a name pattern, a source pattern and a shape."""

    output: str  # e.g. model.layers.*.block_sparse_moe.experts.*.w1.weight
    source: str  # e.g. expert *: model.layers.*.mlp.gate_proj.weight
    shape: tuple[int, ...]
    count: int = 0
    nbytes: int = 0  # all `count` tensors, in the output dtype


@dataclass
class DryRun:
    title: str
    experts: list[str]
    dtype: torch.dtype
    shard_size: int
    rows: list[PlanRow] = field(default_factory=list)
    read_bytes: int = 0  # tensor bytes read from the sources
    plan_read_bytes: int = 0  # besides, at most this much to plan (dynamic models: which parts are routed)
    peak_parts: dict[str, int] = field(default_factory=dict)  # what the estimated peak is made of
    _index: dict[tuple, PlanRow] = field(default_factory=dict, repr=False)
    _sizes: list[int] = field(default_factory=list, repr=False)  # each tensor's bytes, in write order

    @property
    def num_tensors(self) -> int:
        return sum(r.count for r in self.rows)

    @property
    def output_bytes(self) -> int:
        return sum(r.nbytes for r in self.rows)

    @property
    def peak_bytes(self) -> int:
        return sum(self.peak_parts.values())

    @property
    def num_shards(self) -> int:
        """As `ShardWriter` cuts them: greedily, in write order (save_pretrained's dynamic models: about so)."""
        shards, filled = 1, 0
        for n in self._sizes:
            if filled and filled + n > self.shard_size:
                shards, filled = shards + 1, 0
            filled += n
        return shards

    def add(self, output: str, source: str, shape: tuple[int, ...]) -> None:
        key = (_pattern(output), _pattern(source), tuple(shape))
        row = self._index.get(key)
        if row is None:
            row = self._index[key] = PlanRow(*key)
            self.rows.append(row)
        nbytes = math.prod(shape) * self.dtype.itemsize
        row.count += 1
        row.nbytes += nbytes
        self._sizes.append(nbytes)

    def format(self) -> str:
        width = max(len(r.output) for r in self.rows)
        lines = [
            self.title,
            "experts:",
            *(f"  {e}" for e in self.experts),
            "",
            f"{'tensors':>7}  {'bytes':>10}  {'output':<{width}}  {'shape':<18}  from",
        ]
        for r in self.rows:
            shape = "x".join(map(str, r.shape))
            lines.append(f"{r.count:>7}  {_size(r.nbytes):>10}  {r.output:<{width}}  {shape:<18}  {r.source}")
        parts = ", ".join(f"{k} {_size(v)}" for k, v in self.peak_parts.items())
        lines += [
            "",
            f"output: {self.num_tensors} tensors, {_size(self.output_bytes)} in {str(self.dtype).removeprefix('torch.')}, "
            f"{self.num_shards} shard(s) of at most {_size(self.shard_size)}",
            f"reads: {_size(self.read_bytes)} of tensor data from the sources"
            + (f", and at most {_size(self.plan_read_bytes)} to plan" if self.plan_read_bytes else ""),
            f"estimated peak memory: {_size(self.peak_bytes)} ({parts})",
        ]
        return "\n".join(lines)


def _pattern(name: str) -> str:
    """Layer and expert indices become `*`, so one row stands for every layer (and expert)."""
    return re.sub(r"(?<=[. ])\d+(?=[.:])", "*", name)


def _size(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def _describe_experts(recipe: Recipe) -> list[str]:
    out = []
    for i, (label, e) in enumerate(zip(recipe.labels, recipe.experts)):
        kind = f"LoRA adapter on the base ({len(e.factors)} modules)" if isinstance(e, LoraExpert) else "checkpoint"
        out.append(f"{i} {label}: {kind}, {e.path}")
    return out


def dry_run(
    config: MergeConfig, *, recipe_dir: Path | None = None, dtype: str | None = None, shard_size: int = 5 * 2**30
) -> DryRun:
    """The plan of `assemble(config, ...)` with its sizes, from configs, indexes and headers only."""
    if dtype:
        config = config.model_copy(update={"dtype": dtype})
    recipe = open_recipe(config, recipe_dir)
    out_dtype = recipe.output_dtype or torch.float32
    if config.dynamic:
        return _dry_run_dynamic(recipe, out_dtype, shard_size)
    return _dry_run_stock(recipe, out_dtype, shard_size)


def _dry_run_stock(recipe: Recipe, dtype: torch.dtype, shard_size: int) -> DryRun:
    cfg, base = recipe.config, recipe.base
    E = len(recipe.experts)
    run = DryRun(
        f"plan: {recipe.fmt.architecture} from {E} experts of {base.path} ({base.family})",
        _describe_experts(recipe),
        dtype,
        shard_size,
    )
    static = f"{cfg.static_summary} of the base and {E} experts"
    # Streamed as the dynamic model is (stock.assemble_stock): built one tensor at a time into the shard buffer; then
    # the prompts run through one layer at a time, read back in float32 (its experts fused as they are read).
    build_step = 0
    layer_fp32: dict[int | None, int] = {}
    for p in stock.plan(recipe):
        source = {
            "base": f"base: {p.tensor}",
            "static": f"{static}: {p.tensor}",
            "expert": f"expert {p.expert}: {p.tensor}",
            "shared": f"shared expert: {p.tensor}",
            "router": f"router, `{cfg.router_init}` on the prompts",
            "shared_router": "shared-expert gate, from its prompts",
        }[p.source]
        shape = _sized(p, base)
        run.add(p.name, source, shape)
        n = math.prod(shape)
        if p.tensor is not None:
            run.read_bytes += (E + 1 if p.source == "static" else 1) * base.nbytes(p.tensor)
            build_step = max(build_step, _build_bytes(p, n, E))
        layer = layer_of(p.name)
        layer_fp32[layer] = layer_fp32.get(layer, 0) + n * FLOAT32  # read back in float32
    run.peak_parts = {
        "runtime": RUNTIME_BYTES,
        "shard buffer": min(shard_size, run.output_bytes),
        "busiest step": max(build_step, max(v for k, v in layer_fp32.items() if k is not None)),
    }
    return run


def _describe_dynamic(p: TensorPlan, recipe: Recipe) -> str:
    """Where one planned tensor of the dynamic model comes from, in words."""
    cfg, E = recipe.config, len(recipe.experts)
    w0 = "shared merge" if cfg.merging.w0 == "static" else "base"
    static = "base" if cfg.static_method == "base" else f"{cfg.static_summary} of the base and {E} experts"
    if p.source == "router":
        return f"router, `{cfg.router_init}` on the prompts"
    what = {
        "static": static,
        "base": "base",
        "expert": f"expert {p.expert}",
        "experts": "experts",
        "deltas": f"experts − {w0}",
        "svd_A": f"SVD of experts − {w0}",
        "svd_B": f"SVD of experts − {w0}",
        "lora_A": "experts' LoRA A",
        "lora_B": "experts' LoRA B · scaling",
    }[p.source]
    return f"{what}: {p.tensor}"


def _dry_run_dynamic(recipe: Recipe, dtype: torch.dtype, shard_size: int) -> DryRun:
    cfg, base = recipe.config, recipe.base
    config = dynamic.model_config(recipe, base.text_config())
    E = len(recipe.experts)
    by_energy = cfg.merging.energy(cfg.settings)
    energy = (
        f"; {cfg.method} ranks by energy {by_energy}, decided per matrix when built: low-rank sizes here are "
        "at full rank, an upper bound"
        if by_energy is not None
        else ""
    )
    run = DryRun(
        f"plan: moe_merge {cfg.method} / {cfg.level} dynamic model from {E} experts of {base.path} "
        f"({base.family}); forms {config.delta_forms or 'none'}; also routed, where the experts differ: "
        f"{', '.join(config.routed_parts or []) or 'nothing'}; the first router reads the static pre-pass at layer "
        f"{config.prepass_layers}{energy}",
        _describe_experts(recipe),
        dtype,
        shard_size,
    )
    reads: dict[str, int] = {}  # base tensor -> sources read for it: the base alone, or the base and every expert
    build_step = 0
    blocks: dict[str, int] = {}
    for p in dynamic.plan(recipe, config):
        shape = _sized(p, base)
        run.add(p.name, _describe_dynamic(p, recipe), shape)
        block = _block(p.name)
        blocks[block] = blocks.get(block, 0) + math.prod(shape) * dtype.itemsize
        if p.tensor is not None:
            alone = p.source == "base" or p.source == "static" and cfg.static_method == "base"
            reads[p.tensor] = max(reads.get(p.tensor, 1), 1 if alone else E + 1)
            build_step = max(build_step, _build_bytes(p, math.prod(base.shape(p.tensor)), E))
    run.read_bytes = sum(reads.get(name, 1) * base.nbytes(name) for name in base.keys())
    tied = bool(config.tie_word_embeddings)
    deciding = {
        n for part in PARTS if part not in cfg.static_parts(tied) for n in dynamic.part_tensors(recipe, part, tied)
    }
    run.plan_read_bytes = (E + 1) * sum(base.nbytes(n) for n in deciding)
    # Streamed (dynamic.assemble_dynamic): built one tensor at a time into the shard buffer; then the prompts run
    # through one block at a time, read back, with one merged float32 matrix beside it.
    largest = max(math.prod(base.shape(n)) for n in base.keys()) * FLOAT32
    run.peak_parts = {
        "runtime": RUNTIME_BYTES,
        "shard buffer": min(shard_size, run.output_bytes),
        "busiest step": max(build_step, max(blocks.values()) + largest),
    }
    return run


def _sized(p: TensorPlan, base: Checkpoint) -> tuple[int, ...]:
    """The planned shape, a rank left to energy at its largest: full rank."""
    full = min(base.shape(p.tensor)) if p.tensor is not None else 0
    return tuple(full if s is None else s for s in p.shape)


def _block(name: str) -> str:
    """The block a dynamic model's tensor comes into memory with (assemble/lazy.py): its layer, else its module."""
    layer = re.match(r"model\.(experts\.\d+\.)?layers\.\d+\.", name)
    return layer.group(0) if layer else ".".join(name.split(".")[:2])


def _build_bytes(p: TensorPlan, numel: int, experts: int) -> int:
    """What building one planned tensor holds, in float32 (execute.TensorBuilder): every expert's tensor stacked
    beside W0 and the one being read; an SVD adds its float64 copies; a static merge holds every task vector."""
    if p.source in ("experts", "deltas", "static"):
        return (experts + 2) * numel * FLOAT32
    if p.source.startswith("svd"):
        return (experts + 2) * numel * FLOAT32 + 3 * numel * 8
    return 2 * numel * FLOAT32
