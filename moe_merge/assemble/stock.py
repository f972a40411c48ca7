"""FFN-level sparse assembly: dense experts in, a stock Mixtral / Qwen-MoE checkpoint out.

`plan()` decides where every output tensor comes from without reading tensor data; `assemble_stock()`
executes the plan layer by layer: it reads one layer of every expert, fits that layer's router on
the prompts, measures the routing report, and streams the tensors into sharded safetensors.
Peak memory is one output shard plus one layer's experts, whatever the number of experts.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from moe_merge.arch import MLP_KEY, MLP_PROJS, is_mlp_tensor, layer_of
from moe_merge.assemble import output, read, report
from moe_merge.assemble.probe import LayerRunner, Stream, make_streams
from moe_merge.config import PROMPT_INITS
from moe_merge.export import card
from moe_merge.outdir import atomic_output_dir
from moe_merge.recipe import Recipe, TensorPlan
from moe_merge.routers import prompt_init
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


class TensorReader:
    """Produces each planned tensor from the sources, in the output dtype (assemble/read.py reads them)."""

    def __init__(self, recipe: Recipe, dtype: torch.dtype | None, seed: int):
        self.recipe, self.dtype, self.seed = recipe, dtype, seed

    def __call__(self, p: TensorPlan) -> torch.Tensor:
        cfg, name, base = self.recipe.config, p.tensor, self.recipe.base
        assert name is not None, f"{p.name} is computed, not read"
        if p.source == "base":
            t = base.get(name)
        elif p.source == "static":
            t = read.static_merge(self.recipe, name, self.seed).to(self.dtype or base.get(name).dtype)
        else:
            if p.source == "shared":
                expert, spec = self.recipe.shared, cfg.shared_experts[0]
            else:
                assert p.expert is not None, f"{p.name} names no expert"
                expert, spec = self.recipe.experts[p.expert], cfg.experts[p.expert]
            assert expert is not None, "a shared plan needs the recipe's shared expert"
            t = read.expert_tensor(expert, name, base.shape(name), dtype=None)
            if spec.noise_scale:
                g = torch.Generator().manual_seed(self.seed ^ zlib.crc32(p.name.encode()))
                t = t + torch.randn(t.shape, generator=g).to(t.dtype) * spec.noise_scale
            if spec.residual_scale is not None and name.endswith("down_proj.weight"):
                t = t * spec.residual_scale
        return t.to(self.dtype) if self.dtype else t


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
    """Stream the stock MoE into `out_dir` layer by layer, fitting each layer's router as it passes."""
    out_dtype = recipe.output_dtype
    out_config = moe_config(recipe)
    entries = plan(recipe)
    read = TensorReader(recipe, out_dtype, seed)
    layers = out_config.num_hidden_layers
    logger.info(
        "assembling %d experts x %d layers into %s (%s)", len(recipe.experts), layers, recipe.fmt.architecture, out_dir
    )

    with atomic_output_dir(out_dir, force=force) as tmp:
        writer = ShardWriter(tmp, shard_size)
        fitter = RouterFitter(recipe, out_config, tokenizer, seed, device, out_dtype or torch.float32)
        by_layer: dict[int | None, list[TensorPlan]] = {}
        for p in entries:
            by_layer.setdefault(layer_of(p.name), []).append(p)
        for p in by_layer.pop(None):
            t = read(p)
            writer.add(p.name, t)
            if p.name == "model.embed_tokens.weight":
                fitter.start(t)
        for layer in tqdm(range(layers), desc="assembling layers", disable=None):
            tensors = {p.name: read(p) for p in by_layer[layer] if p.tensor is not None}
            routers = fitter.layer(layer, tensors)
            for p in by_layer[layer]:
                writer.add(
                    p.name,
                    tensors[p.name] if p.tensor is not None else routers[p.source].to(out_dtype or torch.float32),
                )
            del tensors
        writer.finalize()
        _write_config(out_config, tmp)
        output.finish(
            tmp,
            recipe,
            shown,
            fitter.report(),
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


class RouterFitter:
    """Fits each layer's router on the prompts as the layers stream past, and records the routing report."""

    def __init__(self, recipe: Recipe, out_config, tokenizer, seed: int, device: str, dtype: torch.dtype):
        self.recipe, self.config, self.tokenizer, self.dtype = recipe, out_config, tokenizer, dtype
        self.spec = recipe.config.router_spec
        self.runner = LayerRunner(out_config, recipe.fmt, device)
        self.generator = torch.Generator().manual_seed(seed)
        self.layers: list[dict] = []

    def start(self, embed: torch.Tensor) -> None:
        experts = self.recipe.config.experts
        embed = embed.float()
        self.calib = make_streams(self.tokenizer, embed, [e.positive_prompts for e in experts], force=True)
        self.negative = make_streams(self.tokenizer, embed, [e.negative_prompts for e in experts], force=True)
        self.examples = make_streams(self.tokenizer, embed, [e.examples for e in experts], force=True)
        shared = self.recipe.config.shared_experts
        self.shared_calib = (
            make_streams(self.tokenizer, embed, [shared[0].positive_prompts], force=True)[0] if shared else None
        )
        evals = [e.eval_prompts if e.eval_prompts is not None else e.positive_prompts for e in experts]
        self.evals = make_streams(self.tokenizer, embed, evals, force=False)
        self.embed_means = [
            prompt_init.TokenSet(s.hidden, s.mask).prompt_means() if s is not None else None
            for s in self.calib + self.negative
        ]

    def layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fit this layer's routers; advance every stream through the finished layer."""
        num_experts, hidden = len(self.recipe.experts), self.config.hidden_size
        state = self._layer_state(layer, tensors, torch.zeros(num_experts, hidden))
        module = self.runner.build(layer, state)
        mlp: Any = module.mlp  # the stock sparse MoE block
        positive = self._features(module, self.calib)
        negative = self._features(module, self.negative)
        examples = self._features(module, self.examples)
        shared_features = self._features(module, [self.shared_calib])[0] if self.shared_calib else None
        weight = self._init(positive, negative, examples)
        scale = None
        calib_tokens = [s.tokens() for s in positive + examples if s is not None]
        target = self.recipe.config.calibration_target
        if target is not None and self.spec.init in PROMPT_INITS and calib_tokens:
            weight, scale = prompt_init.calibrate(weight, torch.cat(calib_tokens), target)
        routers = {"router": weight}
        if self.recipe.shared is not None:
            routers["shared_router"] = self._shared_router(shared_features, positive)
            mlp.shared_expert_gate.weight.data = routers["shared_router"].float()
        # The report measures the layer as it ships: in the output dtype, its router rounded to it too (a stock
        # MoE's router computes in the model's dtype).
        mlp.gate.weight.data = weight.float()
        module.to(self.dtype)
        stats = [self.runner.step(module, s)[1].float() if s is not None else None for s in self.evals]
        self.layers.append(report.layer_stats(layer, stats, self.evals, weight, scale))
        return routers

    def _features(self, module, streams: list[Stream | None]) -> list[prompt_init.TokenSet | None]:
        return [self.runner.step(module, s)[0] if s is not None else None for s in streams]

    def _init(self, positive, negative, examples) -> torch.Tensor:
        init, num_experts, hidden = self.spec.init, len(self.recipe.experts), self.config.hidden_size
        if init == "hidden":
            return prompt_init.hidden(positive, negative)
        if init == "hidden_last":
            return prompt_init.hidden_last(positive, negative)
        if init == "fit":
            sets = [_join(p, x) for p, x in zip(positive, examples)]
            return prompt_init.fit(sets, self.recipe.config.ridge)
        if init == "cheap_embed":
            pos, neg = self.embed_means[:num_experts], self.embed_means[num_experts:]
            return prompt_init.cheap_embed(pos, neg)
        if init == "random":
            return prompt_init.random(num_experts, hidden, self.spec.random_std, self.generator)
        return prompt_init.uniform(num_experts, hidden, self.generator)

    def _shared_router(self, shared_features, positive) -> torch.Tensor:
        """Qwen2-MoE's sigmoid gate on the shared expert: zero (a constant 0.5) unless the shared expert has
        prompts, then their direction against the routed experts' prompts, as mergekit does."""
        if shared_features is None:
            return torch.zeros(1, self.config.hidden_size)
        others = torch.cat([p.prompt_means() for p in positive if p is not None])
        return prompt_init.direction_rows([shared_features.prompt_means()], [others])

    def _layer_state(
        self, layer: int, tensors: dict[str, torch.Tensor], router: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The stock decoder layer's in-memory state dict (transformers 5 fused experts) from output tensors."""
        fmt, prefix = self.recipe.fmt, f"model.layers.{layer}."
        state = {}
        expert_names: set[str] = set()
        for e in range(len(self.recipe.experts)):
            expert_names.update(fmt.expert_tensor(layer, e, p) for p in MLP_PROJS)
        for name, t in tensors.items():
            if name not in expert_names and not (fmt.shared_expert_key and ".shared_expert." in name):
                state[name.removeprefix(prefix)] = t

        def stack(proj):
            return torch.stack([tensors[fmt.expert_tensor(layer, e, proj)] for e in range(len(self.recipe.experts))])

        state["mlp.experts.gate_up_proj"] = torch.cat([stack("gate_proj"), stack("up_proj")], dim=1)
        state["mlp.experts.down_proj"] = stack("down_proj")
        state["mlp.gate.weight"] = router
        if self.recipe.shared is not None:
            for proj in MLP_PROJS:
                state[f"mlp.shared_expert.{proj}.weight"] = tensors[fmt.shared_tensor(layer, proj)]
            state["mlp.shared_expert_gate.weight"] = torch.zeros(1, self.config.hidden_size)
        return state

    def report(self) -> dict:
        return report.summarise(self.layers, self.recipe.labels, self.recipe.config)


def _join(a: prompt_init.TokenSet | None, b: prompt_init.TokenSet | None) -> prompt_init.TokenSet:
    parts = [s for s in (a, b) if s is not None]
    if len(parts) == 1:
        return parts[0]
    width = max(s.states.shape[1] for s in parts)

    def pad(s):
        return (
            torch.nn.functional.pad(s.states, (0, 0, 0, width - s.states.shape[1])),
            torch.nn.functional.pad(s.mask, (0, width - s.mask.shape[1])),
        )

    (xa, ma), (xb, mb) = pad(parts[0]), pad(parts[1])
    return prompt_init.TokenSet(torch.cat([xa, xb]), torch.cat([ma, mb]))
