"""Build a dynamic moe_merge model from a recipe: plan every tensor, fill it from the sources, start the
routers from prompts, write the checkpoint.

`model_config()` and `plan()` say where each tensor of the dynamic model comes from (the dry run prints exactly
that plan); of the tensor data, planning reads only what decides which parts beside the linear layers are routed.
`execute.py` executes the plan one base tensor at a time; the one thing it decides is a rank left to energy,
which `with_ranks` puts in the config of the model built. `assemble_dynamic` streams the tensors to disk and starts
the routers on a model that reads them back one block at a time (lazy.py):
- routed projections (the MLP at ffn level, every linear layer of the block at block level) hold the
  experts in their method's form: E full weights (smear), W0 + task vectors (wemoe), W0 + LoRA factors when
  every expert is a LoRA adapter, or W0 = the shared merge + SVD factors of each expert's exclusive part (twin);
- the embeddings, the norms of the routed parts and the final one, and the head are routed the same way
  where the experts differ there (`routed_parts`, which reads those tensors), unless the recipe's
  `static` keeps them;
- sparse block / model levels hold each expert's whole layers (and, at model level, its head);
- everything else is one static merge of the experts (the method's `static`).
"""

from __future__ import annotations

import copy
import functools
import logging
from pathlib import Path
from typing import Any

import torch

from moe_merge.arch import ATTN_PROJS, FAMILIES, Family, layer_of
from moe_merge.assemble import output, read, report
from moe_merge.assemble.execute import execute
from moe_merge.assemble.lazy import empty_model, lazy
from moe_merge.assemble.routing import init_routers
from moe_merge.errors import ConfigError
from moe_merge.merge import DEFAULT_SCALE
from moe_merge.methods import PARTS, LevelRecord, Method
from moe_merge.modeling import MoEMergeConfig, MoEMergeForCausalLM
from moe_merge.recipe import Recipe, TensorPlan
from moe_merge.routers.router import Router
from moe_merge.sources import LoraExpert

logger = logging.getLogger(__name__)

REMOTE_CODE = '''"""Remote-code entry point of a moe-merge dynamic model. The implementation ships in the moe-merge package."""

try:
    from moe_merge.modeling import MoEMergeConfig, MoEMergeForCausalLM  # noqa: F401
except ImportError as e:
    raise ImportError(
        "This checkpoint is a moe-merge dynamic model and its code comes with the moe-merge package: "
        "pip install moe-merge"
    ) from e
'''
AUTO_MAP = {
    "AutoConfig": "modeling_moe_merge.MoEMergeConfig",
    "AutoModelForCausalLM": "modeling_moe_merge.MoEMergeForCausalLM",
}


# ----------------------------------------------------------------------------------------- planning


def routed_projections(method: Method, level: LevelRecord) -> tuple[str, ...]:
    """The projections a parameter-merging method routes: the MLP's at ffn level, every linear layer's at block."""
    return () if method.mixes_outputs else level.projections


def _owner(proj: str) -> str:
    return "self_attn" if proj in ATTN_PROJS else "mlp"


def _routed_norm(name: str, family: Family, level: LevelRecord, method: Method) -> bool:
    """Whether base tensor `name` is a norm routed with the routed parts: a layer's (parameter merges, the
    family's norms of that level) or the final one; at model level each expert model keeps its own."""
    if level.whole_models:
        return False
    paths = () if method.mixes_outputs else family.layer_norms(level.norms)
    return name == "model.norm.weight" or (
        layer_of(name) is not None and name.split(".", 3)[3].removesuffix(".weight") in paths
    )


def routed_parts(recipe: Recipe, tied: bool) -> list[str]:
    """The parts beside the linear layers (embeddings, norms, head) merged per input: where some expert differs
    from the base, unless the recipe keeps them static. The one part of planning that reads tensor data (the dry
    run too, so that it prints the plan `assemble` runs): those tensors, stopping at the first expert that differs;
    a LoRA adapter differs only where it adapts."""
    cfg, base = recipe.config, recipe.base
    static = cfg.static_parts(tied)
    if tied and ("embeddings" in static) != ("head" in static):
        raise ConfigError(
            f"the base {base.path} ties its head to its embeddings, so they are one table: list both "
            "`embeddings` and `head` in `static`, or neither"
        )
    return [
        part
        for part in PARTS
        if part not in static and any(read.differs(recipe, n) for n in part_tensors(recipe, part, tied))
    ]


def part_tensors(recipe: Recipe, part: str, tied: bool) -> list[str]:
    """The base tensors of a routable part beside the linear layers: "embeddings", "norms" or "head"."""
    cfg, base = recipe.config, recipe.base
    shared_head = not cfg.level_record.whole_models
    if part == "embeddings" or part == "head" and tied and shared_head:
        return ["model.embed_tokens.weight"]
    if part == "norms":
        return [n for n in base.keys() if _routed_norm(n, FAMILIES[base.family], cfg.level_record, cfg.merging)]
    return ["lm_head.weight"] if shared_head and not tied and "lm_head.weight" in base.keys() else []


def lora_exclusive(recipe: Recipe) -> float | None:
    """Twin's λ where its exclusive parts are the LoRA adapters' own factors, exactly (merged_linear.py): every
    expert an adapter and the shared merge task arithmetic, so each θ_e − shared is in their span; else None."""
    cfg = recipe.config
    spec = cfg.static_merge
    if not (cfg.merging.svd and spec.method == "task_arithmetic" and spec.weights is None):
        return None
    if not all(isinstance(e, LoraExpert) and not e.fan_in_fan_out for e in recipe.experts):
        return None
    return DEFAULT_SCALE["task_arithmetic"] if spec.scale is None else spec.scale


def plan_forms(recipe: Recipe, parts: list[str], tied: bool) -> tuple[dict[str, str], dict[str, int]]:
    """The merged-linear form (and rank) of each routed projection, and of the routed embeddings and head: the
    method's form for dense experts; experts that are all LoRA adapters keep their factors (low rank), and so does
    twin over them (its exclusive parts are in their span); other twins take SVDs of every expert. A rank chosen by
    energy is left out: the build decides it per matrix."""
    cfg, method = recipe.config, recipe.config.merging
    svd = method.svd and lora_exclusive(recipe) is None
    forms: dict[str, str] = {}
    ranks: dict[str, int] = {}
    vocab, hidden = recipe.base.shape("model.embed_tokens.weight")
    for name, part in (("embed_tokens", "embeddings"), ("lm_head", "head")):
        if part in parts and not (name == "lm_head" and tied):  # a tied head is the embeddings' table
            forms[name] = "lowrank" if svd else method.part_form
            if svd and (rank := method.rank(cfg.settings, vocab, hidden)) is not None:
                ranks[name] = rank
    adapters = [e for e in recipe.experts if isinstance(e, LoraExpert) and not e.fan_in_fan_out]
    all_lora = len(adapters) == len(recipe.experts)
    for proj in routed_projections(method, cfg.level_record):
        if svd:
            out_f, in_f = recipe.base.shape(f"model.layers.0.{_owner(proj)}.{proj}.weight")
            forms[proj] = "lowrank"
            if (rank := method.rank(cfg.settings, out_f, in_f)) is not None:
                ranks[proj] = rank
        elif all_lora:
            factor_ranks = [
                A.shape[0] for e in adapters for n, (A, _, _) in e.factors.items() if n.endswith(f".{proj}.weight")
            ]
            forms[proj], ranks[proj] = "lowrank", max(factor_ranks, default=1)
        else:  # softmax weights sum to one, so SMEAR needs no W0: Σ_e p_e θ_e
            assert method.form is not None, "a method that merges parameters names its form (Method)"
            forms[proj] = method.form
    return forms, ranks


def model_config(recipe: Recipe, text_config) -> MoEMergeConfig:
    """The dynamic model's config: the whole plan but the ranks left to energy, which the build decides per matrix
    (`with_ranks`)."""
    cfg, method = recipe.config, recipe.config.merging
    layers = text_config.num_hidden_layers
    explicit_prepass = cfg.router_spec.prepass is not None
    for field, value, used in (
        ("router.prepass", cfg.prepass, explicit_prepass),
        ("dense_layers", cfg.dense_layers, cfg.level_record.whole_models),
    ):
        if used and value >= layers:
            raise ConfigError(
                f"`{field}: {value}` is past the last layer: the base {recipe.base.path} has {layers} "
                f"layers, so it must be at most {layers - 1}"
            )
    tied = bool(text_config.tie_word_embeddings)
    parts = routed_parts(recipe, tied)
    forms, ranks = plan_forms(recipe, parts, tied)
    spec = cfg.router_spec
    common: dict[str, Any] = dict(  # PreTrainedConfig's own fields
        architectures=["MoEMergeForCausalLM"],
        auto_map=AUTO_MAP,
        bos_token_id=text_config.bos_token_id,
        eos_token_id=text_config.eos_token_id,
        pad_token_id=text_config.pad_token_id,
    )
    return MoEMergeConfig(
        text_config=text_config.to_dict(),
        num_experts=len(recipe.experts),
        expert_names=recipe.labels,
        method=cfg.method,
        level=cfg.level,
        delta_forms=forms,
        delta_ranks=ranks,
        lowrank_offset=lora_exclusive(recipe),
        router_kind=spec.kind,
        router_hidden_size=spec.hidden_size,
        router_granularity=spec.granularity,
        router_normalize=cfg.normalize,
        router_top_k=min(cfg.top_k, len(recipe.experts)),
        router_temperature=spec.temperature,
        routed_parts=parts,
        prepass_layers=min(cfg.prepass, layers - 1),
        prepass_weights=method.prepass_weights(cfg.settings, len(recipe.experts)),
        dense_layers=cfg.dense_layers,
        **common,
    )


def plan(recipe: Recipe, config: MoEMergeConfig) -> list[TensorPlan]:
    """Every tensor of the dynamic model, in the base's tensor order, then its routers, from `config` (which
    `model_config` decided); reads no tensor data."""
    base, E = recipe.base, len(recipe.experts)
    out: list[TensorPlan] = []
    for name in base.keys():
        out += _plan_tensor(name, base.shape(name), config, E)
    # at model level with tied embeddings, each expert's head is its own embedding table
    if config.level_record.whole_models and config.tie_word_embeddings:
        embed = "model.embed_tokens.weight"
        out += [
            TensorPlan(f"model.experts.{e}.lm_head.weight", "expert", base.shape(embed), embed, e) for e in range(E)
        ]
    out += _plan_routers(config)
    return out


def _plan_tensor(name: str, shape: tuple[int, ...], config: MoEMergeConfig, E: int) -> list[TensorPlan]:
    """The dynamic model's tensors made from base tensor `name`."""
    method, layer = config.merging, layer_of(name)
    rel = name.split(".", 3)[3] if layer is not None else None  # e.g. "self_attn.q_proj.weight"
    static = [TensorPlan(name, "static", shape, name)]

    def each(fmt: str) -> list[TensorPlan]:  # one tensor per expert, named by `fmt`
        return [TensorPlan(fmt.format(e=e), "expert", shape, name, e) for e in range(E)]

    if name == "model.embed_tokens.weight" and config.routes("embeddings"):
        return _plan_merged("model.embed_tokens.table.weight", name, shape, config, E, "embed_tokens")
    if config.level_record.whole_models:
        if name in ("model.norm.weight", "lm_head.weight"):
            return each(f"model.experts.{{e}}.{name.split('.')[-2]}.weight")
        if layer is None or layer < config.dense_layers:
            return static
        return each(f"model.experts.{{e}}.layers.{layer - config.dense_layers}.{rel}")
    if name == "lm_head.weight" and config.routes("head"):
        return [] if config.tie_word_embeddings else _plan_merged(name, name, shape, config, E, "lm_head")
    if config.routes("norms") and _routed_norm(name, config.family, config.level_record, method):
        return _plan_merged(name, name, shape, config, E, None, layer)
    if method.mixes_outputs:
        return each(f"model.layers.{layer}.experts.{{e}}.{rel}") if layer is not None else static
    proj = rel.split(".")[1] if rel else None
    if proj not in config.delta_forms:
        return static
    return _plan_merged(name, name, shape, config, E, proj, layer)


def _plan_merged(
    target: str,
    name: str,
    shape: tuple[int, ...],
    config: MoEMergeConfig,
    E: int,
    proj: str | None,
    layer: int | None = None,
) -> list[TensorPlan]:
    """A routed tensor `target` (`{prefix}.weight` or `.bias`) from base tensor `name`, in the form of projection
    `proj` (a norm: the method's form for vectors): E expert tensors, or W0 plus dense or low-rank task vectors."""
    prefix, kind = target.rsplit(".", 1)
    form = config.delta_forms[proj] if proj else config.merging.part_form
    if form == "full":
        return [TensorPlan(f"{prefix}.expert_{kind}", "experts", (E, *shape), name)]
    on_static = (
        config.merging.w0 == "static" and config.lowrank_offset is None
    )  # twin over LoRA: the base (merged_linear.py)
    w0 = [TensorPlan(target, "static" if on_static else "base", shape, name)]
    if len(shape) == 1 or form == "dense":
        return w0 + [TensorPlan(f"{prefix}.delta_{kind}", "deltas", (E, *shape), name)]
    assert proj is not None, "only a projection is low rank; a vector or table is full or dense"
    rank, factors = (
        config.rank_of(layer, proj),
        "svd" if config.merging.svd and config.lowrank_offset is None else "lora",
    )
    return w0 + [
        TensorPlan(f"{prefix}.lora_A", f"{factors}_A", (E, rank, shape[1]), name),
        TensorPlan(f"{prefix}.lora_B", f"{factors}_B", (E, shape[0], rank), name),
    ]


def _plan_routers(config: MoEMergeConfig) -> list[TensorPlan]:
    text = config.get_text_config()
    with torch.device("meta"):
        router = Router(text.hidden_size, config.num_experts, config.router_kind, config.router_hidden_size)
    shapes = [(n, tuple(p.shape)) for n, p in (*router.named_parameters(), *router.named_buffers())]
    own = config.merging.shared_router or config.level_record.whole_models  # the model's own, else one per layer
    prefixes = ["model.router"] if own else [f"model.layers.{i}.router" for i in range(config.num_routers)]
    return [TensorPlan(f"{prefix}.{n}", "router", shape) for prefix in prefixes for n, shape in shapes]


def _rank_key(base_tensor: str) -> str:
    """`delta_ranks`' key for the low-rank factors of `base_tensor`: "{layer}.{proj}", or "embed_tokens" / "lm_head"
    (`MoEMergeConfig.rank_of` reads it)."""
    module = base_tensor.rsplit(".", 2)[-2]  # e.g. model.layers.3.mlp.gate_proj.weight -> gate_proj
    layer = layer_of(base_tensor)
    return module if layer is None else f"{layer}.{module}"


def decided_ranks(built: dict[TensorPlan, tuple[int, ...]]) -> dict[str, int]:
    """The ranks the build chose by energy (planned as None), from the shapes of the A factors it made."""
    return {
        _rank_key(p.tensor): shape[1]
        for p, shape in built.items()
        if p.source == "svd_A" and p.shape[1] is None and p.tensor is not None
    }


def with_ranks(config: MoEMergeConfig, ranks: dict[str, int]) -> MoEMergeConfig:
    """`config` with the ranks decided by energy filled in: the config of the model that was built."""
    if not ranks:
        return config
    done = copy.deepcopy(config)
    done.delta_ranks = {**config.delta_ranks, **ranks}
    return done


def model_from_state(config: MoEMergeConfig, state: dict[str, torch.Tensor]) -> MoEMergeForCausalLM:
    """The model holding `state`'s tensors themselves (no copy), its routers at zero (uniform routing)."""
    model = empty_model(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [
        k
        for k in missing
        if ".router." not in k
        and not k.startswith("model.router.")
        and not (k.startswith("lm_head.") and config.tie_word_embeddings)
    ]
    if missing or unexpected:
        raise RuntimeError(
            f"internal error: built tensors do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def build_model(recipe: Recipe, seed: int, dtype: torch.dtype = torch.float32) -> MoEMergeForCausalLM:
    """The whole dynamic model in memory (tests, search), its routers at zero (see `init_routers`)."""
    config = model_config(recipe, recipe.base.text_config())
    built = dict(execute(recipe, plan(recipe, config), seed, dtype, out_dtype=dtype))
    config = with_ranks(config, decided_ranks({p: tuple(t.shape) for p, t in built.items()}))
    state = {p.name: t for p, t in built.items()}
    return model_from_state(config, state).to(dtype).eval()  # type: ignore[arg-type]  # transformers wraps .to()


# ----------------------------------------------------------------------------------------- writing


def save_model(model: MoEMergeForCausalLM, out: Path, max_shard_size: str | int = "5GB") -> None:
    """A model in memory as a checkpoint: weights (sharded safetensors), config with `auto_map`, remote code."""
    model.config.auto_map = AUTO_MAP
    model.save_pretrained(out, max_shard_size=max_shard_size)
    (Path(out) / "modeling_moe_merge.py").write_text(REMOTE_CODE)


def _save_config(model: MoEMergeForCausalLM, out: Path, dtype: torch.dtype) -> None:
    """What `save_pretrained` writes beside the weights, for a model whose weights were streamed to disk."""
    model.config.auto_map = AUTO_MAP
    model.config.dtype = dtype
    model.config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    (Path(out) / "modeling_moe_merge.py").write_text(REMOTE_CODE)


def assemble_dynamic(
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
    """Stream the dynamic model into `out_dir` in bounded memory, atomically:
    1. build every tensor from the sources, one at a time (SVDs on `device`), into the shard writer;
    2. run the recipe's prompts through the model, one block in memory at a time, read back from the writer
       (`lazy`), and start the routers from them;
    3. measure the routing report the same way on the written checkpoint, as users get it (its dtype, its RoPE
       tables), and exact match on `eval_data` ((path, rows)) on the model loaded whole.
    Peak memory: one tensor of every expert and its built form, one block, and one shard buffer.
    `shown` is the recipe as the output names its sources (`recipe.portable`)."""
    from moe_merge.export import card
    from moe_merge.outdir import atomic_output_dir
    from moe_merge.sources import Checkpoint
    from moe_merge.writer import ShardWriter

    cfg, dtype = recipe.config, recipe.output_dtype or torch.float32
    logger.info("building a %s / %s dynamic model from %d experts", cfg.method, cfg.level, len(recipe.experts))
    config = model_config(recipe, recipe.base.text_config())
    with atomic_output_dir(out_dir, force=force) as tmp:
        writer = ShardWriter(tmp, shard_size)
        shapes = {}
        for p, t in execute(recipe, plan(recipe, config), seed, torch.float32, device, out_dtype=dtype):
            writer.add(p.name, t)
            shapes[p] = tuple(t.shape)
        config = with_ranks(config, decided_ranks(shapes))
        model = empty_model(config)
        for r in model.routers():
            r.to(device)
        model.model.rotary_emb.to(device)
        with lazy(model, writer.get, device):
            scales = init_routers(model, tokenizer, cfg, seed)
        state = model.state_dict()
        for p in _plan_routers(config):
            writer.add(p.name, state[p.name].cpu())
        writer.finalize()
        _save_config(model, tmp, dtype)
        written = Checkpoint(tmp)
        with lazy(model, written.get, device):
            rep = report.routing_report(model, tokenizer, cfg, recipe.labels, scales)
        del model
        output.finish(
            tmp,
            recipe,
            shown,
            rep,
            tokenizer=tokenizer,
            eval_data=eval_data,
            device=device,
            write_card=functools.partial(card.write_dynamic_card, model_config=config),
        )
    return Path(out_dir)
