"""FFN-level sparse assembly: dense experts in, a stock Mixtral / Qwen-MoE checkpoint out.

`plan()` decides where every output tensor comes from without reading tensor data; `assemble_stock()` executes it
as the dynamic path does (execute.py streams every tensor but the gates into shards), then runs the prompts through
the written layers of the output architecture's own decoder (prompts.py, one layer in memory at a time) to fit the
gates (routing.py) and to measure the routing report on the checkpoint as written.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moe_merge.arch import MLP_KEY, MLP_PROJS, is_mlp_tensor, layer_of
from moe_merge.assemble import output, report
from moe_merge.assemble.execute import COMPUTED, execute
from moe_merge.assemble.lazy import lazy_blocks
from moe_merge.assemble.prompts import PromptBatch, capture, encode
from moe_merge.assemble.routing import by_kind, calibration_groups, gate_rows, shared_gate
from moe_merge.export import card
from moe_merge.outdir import atomic_output_dir
from moe_merge.recipe import Recipe, TensorPlan
from moe_merge.routers.prompt_init import TokenSet
from moe_merge.sources import Checkpoint
from moe_merge.writer import ShardWriter

logger = logging.getLogger(__name__)

# Dense-only config fields the MoE configs do not have.
DENSE_ONLY_FIELDS = (
    "architectures",
    "model_type",
    "transformers_version",
    "_name_or_path",
    "auto_map",
    "mlp_bias",
    "pretraining_tp",
    "torch_dtype",
)


def moe_config(recipe: Recipe):
    """The output config: the base's, plus the MoE fields of the chosen format."""
    from transformers import AutoConfig

    cfg = recipe.config
    fields = {k: v for k, v in recipe.base.config.items() if k not in DENSE_ONLY_FIELDS}
    n, inter = len(recipe.experts), recipe.base.config["intermediate_size"]
    if recipe.fmt.model_type == "mixtral":
        fields.pop("attention_bias", None)
        fields.update(num_local_experts=n, num_experts_per_tok=cfg.experts_per_token)
    else:
        fields.update(
            num_experts=n,
            num_experts_per_tok=cfg.experts_per_token,
            moe_intermediate_size=inter,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
        if recipe.fmt.model_type == "qwen2_moe":
            fields["qkv_bias"] = recipe.base.family == "qwen2"
            fields.pop("attention_bias", None)
            fields["shared_expert_intermediate_size"] = inter
    if cfg.dtype:
        fields["dtype"] = cfg.dtype
    config = AutoConfig.for_model(recipe.fmt.model_type, **fields)
    config.architectures = [recipe.fmt.architecture]
    return config


def plan(recipe: Recipe) -> list[TensorPlan]:
    """Every output tensor, in write order (globals first, then layer by layer), without reading data."""
    non_expert = "base" if recipe.config.static_method == "base" else "static"
    fmt, layers, base = recipe.fmt, recipe.base.config["num_hidden_layers"], recipe.base
    hidden, E = base.config["hidden_size"], len(recipe.experts)
    by_layer: dict[int | None, list[str]] = {}
    for name in base.keys():
        by_layer.setdefault(layer_of(name), []).append(name)
    out: list[TensorPlan] = []
    for name in sorted(by_layer.pop(None, []), key=lambda n: (not n.startswith("model.embed"), n)):
        out.append(TensorPlan(name, non_expert, base.shape(name), name))
    for layer in range(layers):
        for name in sorted(by_layer.get(layer, [])):
            if not is_mlp_tensor(name):
                out.append(TensorPlan(name, non_expert, base.shape(name), name))
        for e in range(E):
            for proj in MLP_PROJS:
                src = MLP_KEY.format(layer=layer, proj=proj)
                out.append(TensorPlan(fmt.expert_tensor(layer, e, proj), "expert", base.shape(src), src, e))
        if recipe.shared is not None:
            for proj in MLP_PROJS:
                src = MLP_KEY.format(layer=layer, proj=proj)
                out.append(TensorPlan(fmt.shared_tensor(layer, proj), "shared", base.shape(src), src))
            out.append(TensorPlan(fmt.shared_tensor(layer), "shared_router", (1, hidden)))
        out.append(TensorPlan(fmt.router_key.format(layer=layer), "router", (E, hidden)))
    return out


def assemble_stock(
    recipe: Recipe,
    out_dir: Path,
    *,
    shown: Recipe,
    tokenizer,
    force: bool,
    shard_size: int,
    seed: int,
    device: str,
    eval_data: tuple[Path, list[dict]] | None,
) -> Path:
    """Write the stock MoE into `out_dir`, atomically: every planned tensor but the gates, streamed into shards; then
    the gates, fitted on the recipe's prompts run through the written layers one at a time; then the routing report,
    measured on the checkpoint as written. Peak memory: one tensor of every expert, one layer, one shard buffer."""
    out_dtype = recipe.output_dtype  # None: each tensor in the base's dtype
    gate_dtype = out_dtype or torch.float32
    out_config = moe_config(recipe)
    entries = plan(recipe)
    logger.info(
        "assembling %d experts x %d layers into %s (%s)",
        len(recipe.experts),
        out_config.num_hidden_layers,
        recipe.fmt.architecture,
        out_dir,
    )
    with atomic_output_dir(out_dir, force=force) as tmp:
        writer = ShardWriter(tmp, shard_size)
        for p, t in execute(recipe, entries, seed, torch.float32, device, out_dtype):
            writer.add(p.name, t)
        model = StockDecoder(recipe, out_config, entries, device)
        with model.reading(lambda n: writer.get(n).float()):
            gates, scales = fit_gates(model, recipe, tokenizer, seed)
        for p in entries:
            if p.source in COMPUTED:
                writer.add(p.name, gates[p.name].to(gate_dtype))
        writer.finalize()
        _write_config(out_config, tmp)
        model.set_gates({n: g.to(gate_dtype) for n, g in gates.items()})
        written = Checkpoint(tmp)
        with model.reading(lambda n: written.get(n).to(gate_dtype)):
            rep = routing_report(model, recipe, tokenizer, scales)
        del model
        output.finish(
            tmp,
            recipe,
            shown,
            rep,
            tokenizer=tokenizer,
            eval_data=eval_data,
            device=device,
            write_card=card.write_card,
        )
    return Path(out_dir)


def _write_config(config, out: Path) -> None:
    """config.json, plus the legacy keys transformers 4.x reads: the top-level RoPE keys (4.x ignores
    `rope_parameters` and would fall back to its own default `rope_theta`, 1e6 for Mixtral), and Qwen-MoE's
    `num_experts` (5.x saves `num_local_experts`, which 4.x ignores, building 128 experts). Either way a
    different model, or none."""
    config.save_pretrained(out)
    data = json.loads((out / "config.json").read_text())
    legacy = {}
    rope = data.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        legacy["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            legacy["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if data.get("model_type", "").endswith("_moe") and "num_local_experts" in data and "num_experts" not in data:
        legacy["num_experts"] = data["num_local_experts"]
    if legacy:
        (out / "config.json").write_text(json.dumps(data | legacy, indent=2, sort_keys=True) + "\n")


class StockDecoder:
    """The output architecture's own decoder (`{Prefix}Model`, what transformers computes when it loads the result)
    on the meta device, but for its RoPE tables and its gates, which stay in memory (zero until set). Within
    `reading(load)`, each block reads its tensors from the checkpoint being written as it is called (lazy.py),
    the layers' experts fused as transformers 5 holds them."""

    def __init__(self, recipe: Recipe, config, entries: list[TensorPlan], device: str):
        self.recipe, self.fmt, self.device = recipe, recipe.fmt, torch.device(device)
        config._attn_implementation = "sdpa"
        config._experts_implementation = "eager"
        with torch.device("meta"):
            self.model = self.fmt.cls("Model")(config)
        self.model.rotary_emb = self.fmt.cls("RotaryEmbedding")(config).to(self.device)
        self.gates: dict[str, Any] = {}  # output name -> gate module
        for layer, module in enumerate(self.model.layers):
            mlp: Any = module.mlp  # the stock sparse MoE block
            self.gates[self.fmt.router_key.format(layer=layer)] = mlp.gate
            if recipe.shared is not None:
                self.gates[self.fmt.shared_tensor(layer)] = mlp.shared_expert_gate
        for gate in self.gates.values():
            gate.to_empty(device=self.device)
            gate.weight.data.zero_()
        # layer (None: global) -> the names of its tensors that are neither experts nor gates
        self.dense: dict[int | None, list[str]] = {}
        for p in entries:
            if p.source in ("base", "static"):
                self.dense.setdefault(layer_of(p.name), []).append(p.name)

    def set_gates(self, gates: dict[str, torch.Tensor]) -> None:
        for name, weight in gates.items():
            self.gates[name].weight.data = weight.to(self.device)

    def layer_gates(self) -> list[Any]:
        return [module.mlp.gate for module in self.model.layers]  # type: ignore[union-attr]

    def reading(self, load: Callable[[str], torch.Tensor]):
        """Within the block, every block reads its tensors with `load(name)` (output names) while it runs."""
        inner = self.model

        def glob(prefix: str) -> Callable[[], dict[str, torch.Tensor]]:
            return lambda: {n.removeprefix(prefix): load(n) for n in self.dense[None] if n.startswith(prefix)}

        blocks = [(inner.embed_tokens, glob("model.embed_tokens.")), (inner.norm, glob("model.norm."))]
        blocks += [(module, functools.partial(self._layer_state, i, load)) for i, module in enumerate(inner.layers)]
        return lazy_blocks(blocks, self.device)

    def _layer_state(self, layer: int, load: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        """Decoder layer `layer`'s state dict but its gates, from output tensors: the experts stacked and fused."""
        fmt, prefix, E = self.fmt, f"model.layers.{layer}.", len(self.recipe.experts)
        state = {name.removeprefix(prefix): load(name) for name in self.dense[layer]}

        def fused(projs: tuple[str, ...]) -> torch.Tensor:
            """[E, rows of every proj, in]: filled one expert tensor at a time, so one layer is held once."""
            shapes = [self.recipe.base.shape(MLP_KEY.format(layer=layer, proj=p)) for p in projs]
            out: torch.Tensor | None = None
            for e in range(E):
                row = 0
                for proj, (rows, cols) in zip(projs, shapes):
                    t = load(fmt.expert_tensor(layer, e, proj))
                    out = torch.empty(E, sum(s[0] for s in shapes), cols, dtype=t.dtype) if out is None else out
                    out[e, row : row + rows] = t
                    row += rows
            assert out is not None, "a stock MoE has experts"
            return out

        state["mlp.experts.gate_up_proj"] = fused(("gate_proj", "up_proj"))
        state["mlp.experts.down_proj"] = fused(("down_proj",))
        if self.recipe.shared is not None:
            for proj in MLP_PROJS:
                state[f"mlp.shared_expert.{proj}.weight"] = load(fmt.shared_tensor(layer, proj))
        return state

    def run(self, batch: PromptBatch, forced: bool) -> None:
        """The decoder on `batch`; `forced` routes every token one-hot to its row's expert."""
        B, T = batch.ids.shape
        experts = batch.experts[:, None].expand(B, T).reshape(-1, 1).to(self.device)

        def force(_module, _args, out):
            return out[0], torch.ones(len(experts), 1, dtype=out[1].dtype, device=self.device), experts

        hooks = [g.register_forward_hook(force) for g in self.layer_gates()] if forced else []
        try:
            self.model(input_ids=batch.ids.to(self.device), attention_mask=batch.mask.to(self.device), use_cache=False)
        finally:
            for h in hooks:
                h.remove()


def fit_gates(
    model: StockDecoder, recipe: Recipe, tokenizer, seed: int
) -> tuple[dict[str, torch.Tensor], list[float | None]]:
    """Every gate (and Qwen2-MoE's shared-expert gates) from the states the prompts give where each gate reads,
    every token routed one-hot to its prompt's expert; returns them by output name, and each layer's calibration
    scale."""
    cfg, fmt = recipe.config, recipe.fmt
    hidden, layers = model.model.config.hidden_size, len(model.model.layers)
    groups = calibration_groups(cfg)
    shared = cfg.shared_experts[0].positive_prompts if cfg.shared_experts else []
    groups.append((shared or [], 0))  # through expert 0: its gate needs only their direction against the experts'
    captured: list[list[Any]] = [[None] * len(groups)] * (layers + 1)  # no prompts: nothing to read
    if any(ps for ps, _ in groups):
        batch = encode(tokenizer, groups)
        modules = [model.model.layers[0], *model.layer_gates()]  # the embeddings (layer 0's input), each gate's
        captured = capture(modules, lambda: model.run(batch, forced=True), batch)
    embeds = by_kind(captured[0], cfg)
    embed_means = (
        [s.prompt_means() if s is not None else None for s in embeds["positive_prompts"]],
        [s.prompt_means() if s is not None else None for s in embeds["negative_prompts"]],
    )
    g = torch.Generator().manual_seed(seed)
    gates: dict[str, torch.Tensor] = {}
    scales: list[float | None] = []
    for layer, sets in enumerate(captured[1:]):
        kinds = by_kind(sets, cfg)
        weight, scale = gate_rows(cfg, kinds, embed_means, hidden, g)
        gates[fmt.router_key.format(layer=layer)] = weight
        scales.append(scale)
        if recipe.shared is not None:
            gates[fmt.shared_tensor(layer)] = shared_gate(
                sets[-1] if shared else None, kinds["positive_prompts"], hidden
            )
    return gates, scales


def routing_report(model: StockDecoder, recipe: Recipe, tokenizer, scales: list[float | None]) -> dict:
    """Where each expert's held-out prompts (`eval_prompts`, else `positive_prompts`) are routed, token by token, by
    every gate of the model as it is set, in its dtype."""
    cfg = recipe.config
    evals = [(e.eval_prompts if e.eval_prompts is not None else e.positive_prompts) or [] for e in cfg.experts]
    gates = model.layer_gates()
    logits: list[list[TokenSet | None]] = [[None] * len(evals) for _ in gates]
    if any(evals):
        batch = encode(tokenizer, [(ps, e) for e, ps in enumerate(evals)])
        captured = capture(gates, lambda: model.run(batch, forced=False), batch, output=True)
        logits = [[s if ps else None for s, ps in zip(sets, evals)] for sets in captured]
    layers = [
        report.layer_stats(layer, sets, gate.weight.detach().cpu(), scales[layer])
        for layer, (gate, sets) in enumerate(zip(gates, logits))
    ]
    return report.summarise(layers, recipe.labels, cfg)
