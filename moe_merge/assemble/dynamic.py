"""Build a dynamic moe_merge model from a recipe: plan every tensor, fill it from the sources, start the
routers from prompts, write the checkpoint.

`model_config()` and `plan()` say where each tensor of the dynamic model comes from (the dry run prints exactly
that plan); of the tensor data, planning reads only what decides which parts beside the linear layers are routed.
`built_tensors()` executes the plan one base tensor at a time; the one thing it decides is a rank left to energy,
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
import itertools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from moe_merge.arch import ATTN_PROJS, FAMILIES, Family, layer_of
from moe_merge.assemble import output, read, report
from moe_merge.assemble.lazy import compute_device, empty_model, lazy
from moe_merge.config import MergeConfig
from moe_merge.errors import ConfigError
from moe_merge.merge import DEFAULT_SCALE
from moe_merge.methods import PARTS, LevelRecord, Method
from moe_merge.modeling import MoEMergeConfig, MoEMergeForCausalLM
from moe_merge.recipe import Recipe, TensorPlan
from moe_merge.routers import prompt_init
from moe_merge.routers.router import Router, masked_mean
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


# ----------------------------------------------------------------------------------------- tensors


FULL_SVD_UP_TO = 1024  # min(out, in) up to which SVDs are exact; above it, randomized when the rank allows
OVERSAMPLE = 16  # extra columns of a randomized SVD of fixed rank


def _svd(d: torch.Tensor, q: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vh of `d` (float64): exact, or randomized with `q` columns. LAPACK fails to converge on some
    checkpoints; a randomized SVD stands in then."""
    if q is None:
        try:
            return torch.linalg.svd(d, full_matrices=False)
        except RuntimeError:
            logger.warning("SVD did not converge on a %s matrix; using a randomized low-rank SVD", tuple(d.shape))
            q = min(d.shape)
    U, S, V = torch.svd_lowrank(d, q=min(q, min(d.shape)), niter=6)
    return U, S, V.T


def energy_rank(S: torch.Tensor, total: torch.Tensor, energy: float) -> int:
    """The smallest r whose top-r singular values hold `energy` of `total` (= ||Δ||², Σ of every σ²)."""
    if total == 0:
        return 1
    held = torch.cumsum(S.double() ** 2, 0) / total
    return min(int(torch.searchsorted(held, torch.tensor(energy, dtype=held.dtype) - 1e-12)) + 1, S.numel())


def svd_factors(
    delta: torch.Tensor, rank: int | None = None, energy: float | None = None, full_svd_up_to: int = FULL_SVD_UP_TO
) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, K], B [N, r] with B @ A the best rank-r approximation of `delta` [N, K], in float64 arithmetic, on
    `delta`'s device.

    `rank` fixes r; `energy` picks the smallest r holding that share of Σ σ². Above `full_svd_up_to` the SVD is
    randomized: of width r + OVERSAMPLE for a fixed rank below full; for an energy rank, of a width that doubles
    until its factors hold the energy: B·A = U_r U_rᵀ Δ is a projection, so what it holds is Σ of its σ², exactly,
    and the rank is at most a little above the optimum.
    """
    d = delta.double()
    small = min(d.shape) <= full_svd_up_to
    if energy is None:
        if rank is None:
            raise ValueError("svd_factors needs a rank or an energy")
        q = None if small or rank + OVERSAMPLE >= min(d.shape) else rank + OVERSAMPLE
        U, S, Vh = _svd(d, q)
        r = min(rank, S.numel())
    else:
        total = d.pow(2).sum()
        q = None if small else 64
        while True:
            U, S, Vh = _svd(d, q)
            if q is None or (S.double() ** 2).sum() >= energy * total or q >= min(d.shape):
                break
            q *= 2
        r = rank = energy_rank(S, total, energy)
    A = d.new_zeros(rank, d.shape[1])
    B = d.new_zeros(d.shape[0], rank)
    A[:r], B[:, :r] = Vh[:r], U[:, :r] * S[:r]
    return A.to(delta.dtype), B.to(delta.dtype)


def lora_factors(expert: LoraExpert, name: str, rank: int, shape, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's A [r, K] and scaling·B [N, r] for `name`, zero-padded to `rank` (zeros if not adapted)."""
    A, B = torch.zeros(rank, shape[1], dtype=dtype), torch.zeros(shape[0], rank, dtype=dtype)
    if name in expert.factors:
        a, b, scaling = expert.factors[name]
        A[: a.shape[0]], B[:, : b.shape[1]] = a.to(dtype), b.to(dtype) * scaling
    return A, B


class TensorBuilder:
    """Executes the plan one base tensor at a time: its entries (W0 and the deltas, A and B, ...) share one static
    merge and one factorization, computed once for them and dropped after, so nothing depends on the order of the
    groups. Tensors are computed in `dtype` (float32; float64 in tests) and returned in `out_dtype` (default
    `dtype`); SVDs run on `device`."""

    def __init__(
        self,
        recipe: Recipe,
        seed: int,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
        out_dtype: torch.dtype | None = None,
    ):
        self.recipe, self.seed, self.dtype, self.device = recipe, seed, dtype, device
        self.out_dtype = out_dtype or dtype

    def __call__(self, name: str, entries: list[TensorPlan]) -> Iterator[tuple[TensorPlan, torch.Tensor]]:
        """Each of `entries` (all made from base tensor `name`) with its tensor, in the output dtype."""
        sources = {p.source for p in entries}
        w0_static, needs_w0 = self.recipe.config.merging.w0 == "static", bool(sources & {"deltas", "svd_A", "svd_B"})
        static = None
        if "static" in sources or w0_static and needs_w0:
            static = read.static_merge(self.recipe, name, self.seed, self.dtype)
        base = self.recipe.base.get(name).to(self.dtype) if "base" in sources or needs_w0 and not w0_static else None
        w0 = static if w0_static else base
        factors = None
        for p in entries:
            if p.source in ("svd_A", "svd_B", "lora_A", "lora_B"):
                factors = factors or self._factors(p, name, w0)
                t = factors[0] if p.source.endswith("_A") else factors[1]
            else:
                t = self._tensor(p, name, static, base, w0)
            yield p, t.to(self.out_dtype)

    def _tensor(
        self,
        p: TensorPlan,
        name: str,
        static: torch.Tensor | None,
        base: torch.Tensor | None,
        w0: torch.Tensor | None,
    ) -> torch.Tensor:
        """One entry from the group's static merge, base tensor and W0 (each read once for the group)."""
        shape = self.recipe.base.shape(name)
        if p.source in ("static", "base"):
            held = static if p.source == "static" else base
            assert held is not None, f"{p.source} is read for {p.name}'s group"
            return held
        if p.source == "expert":
            assert p.expert is not None, f"{p.name} names no expert"
            return read.expert_tensor(self.recipe.experts[p.expert], name, shape, self.dtype)
        if p.source in ("experts", "deltas"):
            # filled in one expert at a time: the stack and two of its tensors in memory (an embedding table of
            # 262,144 rows is 670 MB in float32)
            minus = w0 if p.source == "deltas" else None
            assert minus is not None or p.source == "experts", "deltas are of the experts less W0"
            out = torch.empty(len(self.recipe.experts), *shape, dtype=self.out_dtype)
            for e, expert in enumerate(self.recipe.experts):
                t = read.expert_tensor(expert, name, shape, self.dtype)
                out[e] = t if minus is None else t - minus
            return out
        raise ValueError(f"internal error: no tensor source {p.source!r} for {p.name}")

    def _factors(self, p: TensorPlan, name: str, w0: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """svd_A/B or lora_A/B [E, r, K] / [E, N, r]. A rank left to energy is each expert's energy rank, the
        largest of them for the module (the others zero-padded); `decided_ranks` reads it from the shapes."""
        rank = p.shape[1] if p.source.endswith("_A") else p.shape[2]
        shape = self.recipe.base.shape(name)
        if p.source.startswith("svd"):
            cfg = self.recipe.config
            energy = cfg.merging.energy(cfg.settings) if rank is None else None
            assert w0 is not None, "SVD factors are of the experts less W0"
            deltas = (read.expert_tensor(e, name, shape, self.dtype) - w0 for e in self.recipe.experts)
            factors = [tuple(f.cpu() for f in svd_factors(d.to(self.device), rank, energy)) for d in deltas]
            width = max(a.shape[0] for a, _ in factors)
            factors = [
                (nn.functional.pad(a, (0, 0, 0, width - a.shape[0])), nn.functional.pad(b, (0, width - b.shape[1])))
                for a, b in factors
            ]
        else:
            assert rank is not None, "an adapter's rank is planned (plan_forms)"
            adapters = [e for e in self.recipe.experts if isinstance(e, LoraExpert)]
            assert len(adapters) == len(self.recipe.experts), "LoRA factors are planned only when all are adapters"
            factors = [lora_factors(e, name, rank, shape, self.dtype) for e in adapters]
        return torch.stack([a for a, _ in factors]), torch.stack([b for _, b in factors])


def _rank_key(base_tensor: str) -> str:
    """`delta_ranks`' key for the low-rank factors of `base_tensor`: "{layer}.{proj}", or "embed_tokens" / "lm_head"
    (`MoEMergeConfig.rank_of` reads it)."""
    module = base_tensor.rsplit(".", 2)[-2]  # e.g. model.layers.3.mlp.gate_proj.weight -> gate_proj
    layer = layer_of(base_tensor)
    return module if layer is None else f"{layer}.{module}"


def built_tensors(
    recipe: Recipe,
    config: MoEMergeConfig,
    seed: int,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    out_dtype: torch.dtype | None = None,
) -> Iterator[tuple[TensorPlan, torch.Tensor]]:
    """Every tensor of the dynamic model but the routers, with its plan entry, executed from `plan` one base tensor
    at a time, computed in `dtype` and given in `out_dtype` (default `dtype`)."""
    build = TensorBuilder(recipe, seed, dtype, device, out_dtype)
    entries = [p for p in plan(recipe, config) if p.source != "router"]
    with tqdm(total=len(entries), desc="building", disable=None) as bar:
        for name, group in itertools.groupby(entries, key=lambda p: p.tensor):
            assert name is not None, "only routers are computed, not read"
            for p, t in build(name, list(group)):
                yield p, t
                bar.update()


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
    built = dict(built_tensors(recipe, config, seed, dtype))
    config = with_ranks(config, decided_ranks({p: tuple(t.shape) for p, t in built.items()}))
    state = {p.name: t for p, t in built.items()}
    return model_from_state(config, state).to(dtype).eval()  # type: ignore[arg-type]  # transformers wraps .to()


# ----------------------------------------------------------------------------------------- routers


@torch.no_grad()
def router_inputs(model, tokenizer, groups: list[tuple[list[str], int]]) -> list[list[torch.Tensor]]:
    """Each router's pooled input [n, H] for each group of (prompts, expert), from one forward pass in which each
    row's routing is forced one-hot to its group's expert (perfect routing: what the router must recognise).
    Returns [group][router]."""
    device = compute_device(model)
    prompts = [p for ps, _ in groups for p in ps]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(device)
    mask = enc["attention_mask"]
    experts = torch.tensor([e for ps, e in groups for _ in ps])
    forced = torch.nn.functional.one_hot(experts, model.config.num_experts).float().to(device)
    captured: list[torch.Tensor | None] = [None] * len(model.routers())

    def hook(i):
        def grab(_module, args):
            x = args[0].float()
            captured[i] = (masked_mean(x, mask) if x.dim() == 3 else x).cpu()

        return grab

    handles = [r.register_forward_pre_hook(hook(i)) for i, r in enumerate(model.routers())]
    try:
        model.model(**enc, merge_weights=forced, use_cache=False)  # the decoder: routers read it, no logits needed
    finally:
        for h in handles:
            h.remove()
    sizes = [len(ps) for ps, _ in groups]
    inputs = [c for c in captured if c is not None]
    if len(inputs) != len(captured):
        raise RuntimeError("a router did not run on the prompts")
    return [list(per_router) for per_router in zip(*(c.split(sizes) for c in inputs))]


def init_routers(model: MoEMergeForCausalLM, tokenizer, config: MergeConfig, seed: int) -> list[float | None]:
    """Start every router as the recipe says; returns each router's calibration scale (None if none). Every router
    with prompts to read first standardizes its input by their spread (routers/router.py), whatever its start."""
    spec, rs = config.router_spec, model.routers()
    g = torch.Generator().manual_seed(seed)
    positive = negative = None
    if all(e.positive_prompts for e in config.experts):
        # Worked examples, where given, are more samples of the same task: they steady the discriminant.
        groups = [(e.positive_prompts + e.examples, i) for i, e in enumerate(config.experts)]
        groups += [(e.negative_prompts, i) for i, e in enumerate(config.experts) if e.negative_prompts]
        inputs = iter(router_inputs(model, tokenizer, groups))
        positive = [next(inputs) for _ in config.experts]
        negative = [next(inputs) if e.negative_prompts else None for e in config.experts]
        for k, r in enumerate(rs):
            r.set_standardization(torch.cat([p[k] for p in positive]))
    if spec.init == "uniform":
        for r in rs:
            r.set_constant(0.0)
        return [None] * len(rs)
    if spec.init == "random":
        for r in rs:
            if config.normalize == "none":  # raw weights start where the pre-pass runs (WEMoE: task arithmetic)
                r.set_constant(config.merging.prepass_weights(config.settings, 1)[0], generator=g)
            else:
                r.set_random(spec.random_std, generator=g)
        return [None] * len(rs)
    if positive is None or negative is None:
        raise ConfigError(f"`router.init: {spec.init}` needs `positive_prompts` for every expert")
    scales = []
    for k, r in enumerate(rs):
        pos = [r.standardize(p[k]) for p in positive]
        neg = [r.standardize(n[k]) if n else None for n in negative]
        weight, bias = prompt_init.lda(pos, neg, config.ridge)
        scale = None
        if config.calibration_target is not None and config.normalize != "none":
            weight, scale = prompt_init.calibrate(weight, torch.cat(pos), config.calibration_target, bias=bias)
            bias = bias * scale
        r.set_rows(weight, bias, generator=g)
        scales.append(scale)
    return scales


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
        for p, t in built_tensors(recipe, config, seed, torch.float32, device, out_dtype=dtype):
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
