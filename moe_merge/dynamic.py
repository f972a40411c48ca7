"""Build a dynamic moe_merge model from a recipe: plan the merged-linear forms, fill every tensor from
the sources, start the routers from prompts, and write the checkpoint.

Which tensor comes from where:
- routed projections (the MLP at ffn level, every linear layer of the block at block level) hold the
  experts: E full weights (smear), base + task vectors (wemoe), base + LoRA factors when every expert
  is a LoRA adapter, or shared + SVD factors of each expert's exclusive part (twin);
- sparse block / model levels hold each expert's whole layers (and, at model level, its head);
- everything else is one static merge of the experts (`non_expert`, or twin's shared merge).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from moe_merge.arch import layer_of
from moe_merge.config import MergeConfig
from moe_merge.errors import CompatibilityError, ConfigError
from moe_merge.merge import static_merge
from moe_merge.modeling import ATTN_PROJS, MLP_PROJS, MoEMergeConfig, MoEMergeForCausalLM, stock_layer
from moe_merge.report import NO_PROMPTS
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
AUTO_MAP = {"AutoConfig": "modeling_moe_merge.MoEMergeConfig",
            "AutoModelForCausalLM": "modeling_moe_merge.MoEMergeForCausalLM"}


# ----------------------------------------------------------------------------------------- planning


def routed_projections(config: MergeConfig) -> tuple[str, ...]:
    if config.method == "sparse":
        return ()
    return MLP_PROJS if config.level == "ffn" else ATTN_PROJS + MLP_PROJS


def plan_forms(recipe, text_config) -> tuple[dict[str, str], dict[str, int]]:
    """The merged-linear form (and rank) of each routed projection."""
    cfg = recipe.config
    forms, ranks = {}, {}
    all_lora = all(isinstance(e, LoraExpert) and not e.fan_in_fan_out for e in recipe.experts)
    for proj in routed_projections(cfg):
        if cfg.method == "twin":
            out_f, in_f = recipe.base.shape(f"model.layers.0.{_owner(proj)}.{proj}.weight")
            forms[proj], ranks[proj] = "lowrank", cfg.twin.rank_for(out_f, in_f)
        elif all_lora:
            factor_ranks = [A.shape[0] for e in recipe.experts for n, (A, _, _) in e.factors.items() if n.endswith(f".{proj}.weight")]
            forms[proj], ranks[proj] = "lowrank", max(factor_ranks, default=1)
        else:  # softmax weights sum to one, so SMEAR needs no base: sum_e p_e theta_e
            forms[proj] = "full" if cfg.method == "smear" else "dense"
    return forms, ranks


def _owner(proj: str) -> str:
    return "self_attn" if proj in ATTN_PROJS else "mlp"


def model_config(recipe, text_config) -> MoEMergeConfig:
    cfg = recipe.config
    layers = text_config.num_hidden_layers
    for field, value, used in (("twin.router_layer", cfg.twin.router_layer, cfg.method == "twin"),
                               ("dense_layers", cfg.dense_layers, cfg.level == "model")):
        if used and value >= layers:
            raise ConfigError(f"`{field}: {value}` is past the last layer: the base {recipe.base.path} has {layers} "
                              f"layers, so it must be at most {layers - 1}")
    forms, ranks = plan_forms(recipe, text_config)
    spec = cfg.router_spec
    return MoEMergeConfig(
        text_config=text_config.to_dict(),
        num_experts=len(recipe.experts),
        expert_names=recipe.labels,
        method=cfg.method,
        level=cfg.level,
        delta_forms=forms,
        delta_ranks=ranks,
        router_kind=spec.kind,
        router_hidden_size=spec.hidden_size,
        router_granularity=spec.granularity,
        router_normalize=cfg.normalize,
        router_top_k=min(cfg.top_k, len(recipe.experts)),
        router_temperature=spec.temperature,
        router_layer=cfg.twin.router_layer,
        dense_layers=cfg.dense_layers,
        architectures=["MoEMergeForCausalLM"],
        auto_map=AUTO_MAP,
        bos_token_id=text_config.bos_token_id,
        eos_token_id=text_config.eos_token_id,
        pad_token_id=text_config.pad_token_id,
    )


# ----------------------------------------------------------------------------------------- tensors


class StaticMerge:
    """The static merge of one tensor over the experts, as the recipe says (cached: twin reads it twice)."""

    def __init__(self, recipe, seed: int, dtype: torch.dtype):
        cfg = recipe.config
        self.recipe, self.seed, self.method, self.dtype = recipe, seed, cfg.static_method, dtype
        if cfg.method == "twin":
            self.scale, self.density, self.weights = cfg.twin.scale, cfg.twin.density, None
        elif cfg.method == "wemoe" and cfg.non_expert is None:
            self.scale, self.density, self.weights = cfg.wemoe.scale, cfg.merge.density, cfg.merge.weights
        else:
            self.scale, self.density, self.weights = cfg.merge.scale, cfg.merge.density, cfg.merge.weights
        self._last: tuple[str, torch.Tensor] | None = None

    def __call__(self, name: str) -> torch.Tensor:
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        base = self.recipe.base.get(name).to(self.dtype)
        if self.method == "base":
            t = base
        else:
            deltas = [expert_tensor(e, name, base.shape, self.dtype) - base for e in self.recipe.experts]
            t = static_merge(self.method, base, deltas, scale=self.scale, density=self.density, weights=self.weights,
                             seed=self.seed, name=name)
        self._last = (name, t)
        return t


def expert_tensor(expert, name: str, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The expert's full weight, widened to `dtype` (a LoRA expert's base + B·A is formed in float32 or wider)."""
    if isinstance(expert, LoraExpert) and name in expert.factors:
        A, B, scaling = expert.factors[name]
        t = expert.base.get(name).to(dtype) + scaling * (B.to(dtype) @ A.to(dtype))
    else:
        t = expert.get(name).to(dtype)
    if t.shape != shape:
        raise CompatibilityError(f"tensor {name!r} has shape {tuple(t.shape)} in {expert.path} but {tuple(shape)} in the base")
    return t


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, K], B [N, r] with B @ A the best rank-r approximation of `delta` [N, K].

    Exact SVD in float64; if LAPACK fails to converge (it does on some checkpoints), a randomized
    low-rank SVD instead.
    """
    d = delta.double()
    try:
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    except RuntimeError:
        logger.warning("SVD did not converge on a %s matrix; using a randomized low-rank SVD", tuple(d.shape))
        U, S, V = torch.svd_lowrank(d, q=min(rank + 10, min(d.shape)), niter=8)
        Vh = V.T
    r = min(rank, S.numel())
    A = torch.zeros(rank, d.shape[1], dtype=d.dtype)
    B = torch.zeros(d.shape[0], rank, dtype=d.dtype)
    A[:r], B[:, :r] = Vh[:r], U[:, :r] * S[:r]
    return A.to(delta.dtype), B.to(delta.dtype)


def lora_factors(expert: LoraExpert, name: str, rank: int, shape, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's A [r, K] and scaling·B [N, r] for `name`, zero-padded to `rank` (zeros if not adapted)."""
    A, B = torch.zeros(rank, shape[1], dtype=dtype), torch.zeros(shape[0], rank, dtype=dtype)
    if name in expert.factors:
        a, b, scaling = expert.factors[name]
        A[: a.shape[0]], B[:, : b.shape[1]] = a.to(dtype), b.to(dtype) * scaling
    return A, B


def build_state(recipe, config: MoEMergeConfig, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the dynamic model except the routers, read tensor by tensor from the sources and
    computed in `dtype` (float32; float64 for exactness tests)."""
    cfg, base, experts = recipe.config, recipe.base, recipe.experts
    static = StaticMerge(recipe, seed, dtype)
    L, d = config.text_config.num_hidden_layers, config.dense_layers
    state: dict[str, torch.Tensor] = {}
    for name in tqdm(base.keys(), desc="building", disable=None):
        layer = layer_of(name)
        rel = name.split(".", 3)[3] if layer is not None else None  # e.g. "self_attn.q_proj.weight"
        shape = base.shape(name)
        if cfg.level == "model":
            if name in ("model.norm.weight", "lm_head.weight"):
                for e, expert in enumerate(experts):
                    state[f"model.experts.{e}.{name.split('.')[-2]}.weight"] = expert_tensor(expert, name, shape, dtype)
            elif layer is None or layer < d:
                state[name] = static(name)
            else:
                for e, expert in enumerate(experts):
                    state[f"model.experts.{e}.layers.{layer - d}.{rel}"] = expert_tensor(expert, name, shape, dtype)
        elif cfg.method == "sparse":
            if layer is None:
                state[name] = static(name)
            else:
                for e, expert in enumerate(experts):
                    state[f"model.layers.{layer}.experts.{e}.{rel}"] = expert_tensor(expert, name, shape, dtype)
        else:
            proj = rel.split(".")[1] if rel else None
            routed = proj in config.delta_forms and not (cfg.method == "twin" and layer < config.router_layer)
            if not routed:
                state[name] = static(name)
            else:
                state.update(_routed(recipe, config, static, name, proj, shape, dtype))
    if cfg.level == "model" and config.tie_word_embeddings:  # each expert's head is its own (tied) embedding
        for e, expert in enumerate(experts):
            state[f"model.experts.{e}.lm_head.weight"] = expert_tensor(expert, "model.embed_tokens.weight", base.shape("model.embed_tokens.weight"), dtype)
    return state


def _routed(recipe, config, static, name: str, proj: str, shape, dtype) -> dict[str, torch.Tensor]:
    """The merged-linear tensors of one routed projection's weight or bias."""
    experts, prefix, kind = recipe.experts, name.rsplit(".", 1)[0], name.rsplit(".", 1)[1]
    form = config.delta_forms[proj]
    thetas = lambda: [expert_tensor(e, name, shape, dtype) for e in experts]  # noqa: E731
    if form == "full":
        return {f"{prefix}.expert_{kind}": torch.stack(thetas())}
    w0 = static(name) if config.method == "twin" else recipe.base.get(name).to(dtype)
    out = {f"{prefix}.{kind}": w0}
    if kind == "bias":
        out[f"{prefix}.delta_bias"] = torch.stack([t - w0 for t in thetas()])
    elif form == "dense":
        out[f"{prefix}.delta_weight"] = torch.stack([t - w0 for t in thetas()])
    else:
        rank = config.delta_ranks[proj]
        if config.method == "twin":
            factors = [svd_factors(t - w0, rank) for t in thetas()]
        else:
            factors = [lora_factors(e, name, rank, shape, dtype) for e in experts]
        out[f"{prefix}.lora_A"] = torch.stack([a for a, _ in factors])
        out[f"{prefix}.lora_B"] = torch.stack([b for _, b in factors])
    return out


def build_model(recipe, seed: int, dtype: torch.dtype = torch.float32) -> MoEMergeForCausalLM:
    """The dynamic model with its tensors in place and its routers at zero (see `init_routers`)."""
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    text_config = AutoConfig.from_pretrained(recipe.base.path)
    config = model_config(recipe, text_config)
    state = build_state(recipe, config, seed, dtype)
    with no_init_weights():
        model = MoEMergeForCausalLM(config).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if ".router." not in k and not k.startswith("model.router.")
               and not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"internal error: built tensors do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    for router in routers(model):
        router.set_constant(0.0)
    return model.eval()


# ----------------------------------------------------------------------------------------- routers


def routers(model: MoEMergeForCausalLM) -> list[Router]:
    """The model's routers in the order of `merge_weights`' R dimension."""
    inner = model.model
    if inner.router is not None:
        return [inner.router]
    return [layer.router for layer in inner.layers]


@torch.no_grad()
def router_inputs(model, tokenizer, prompts: list[str], expert: int | None) -> list[torch.Tensor]:
    """Each router's pooled input [n, H] for `prompts`, with routing forced one-hot to `expert` (perfect
    routing: what the router must recognise) or left to the routers (expert None)."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
    mask = enc["attention_mask"]
    captured: list[torch.Tensor | None] = [None] * len(routers(model))

    def hook(i):
        def grab(_module, args):
            x = args[0].float()
            captured[i] = (masked_mean(x, mask) if x.dim() == 3 else x).cpu()
        return grab

    handles = [r.register_forward_pre_hook(hook(i)) for i, r in enumerate(routers(model))]
    try:
        forced = None
        if expert is not None:
            forced = torch.nn.functional.one_hot(torch.tensor(expert), model.config.num_experts).float().to(model.device)
        model(**enc, merge_weights=forced, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured


def init_routers(model, tokenizer, config: MergeConfig, seed: int) -> list[float | None]:
    """Start every router as the recipe says; returns each router's calibration scale (None if none)."""
    spec, rs = config.router_spec, routers(model)
    g = torch.Generator().manual_seed(seed)
    if spec.init == "uniform":
        for r in rs:
            r.set_constant(0.0)
        return [None] * len(rs)
    if spec.init == "random":
        for r in rs:
            if config.normalize == "none":  # WEMoE: start at task arithmetic, lambda for every expert
                r.set_constant(config.wemoe.scale, generator=g)
            else:
                r.set_random(spec.random_std, generator=g)
        return [None] * len(rs)
    # Worked examples, where given, are more samples of the same task: they steady the discriminant.
    positive = [router_inputs(model, tokenizer, e.positive_prompts + e.examples, i) for i, e in enumerate(config.experts)]
    negative = [router_inputs(model, tokenizer, e.negative_prompts, i) if e.negative_prompts else None
                for i, e in enumerate(config.experts)]
    scales = []
    for k, r in enumerate(rs):
        weight, bias = prompt_init.lda([p[k] for p in positive], [n[k] if n else None for n in negative], config.ridge)
        scale = None
        if config.calibration_target is not None and config.normalize != "none":
            weight, scale = prompt_init.calibrate(weight, torch.cat([p[k] for p in positive]), config.calibration_target,
                                                  bias=bias)
            bias = bias * scale
        r.set_rows(weight, bias, generator=g)
        scales.append(scale)
    return scales


@torch.no_grad()
def routing_report(model, tokenizer, config: MergeConfig, labels: list[str]) -> dict:
    """How each router sends every expert's held-out prompts (`eval_prompts`, else `positive_prompts`):
    accuracy and mean merge weights; None for an expert without prompts."""
    R = model.config.num_routers
    per_expert: list[torch.Tensor | None] = []
    for e in config.experts:
        prompts = e.eval_prompts if e.eval_prompts is not None else e.positive_prompts
        if not prompts:
            per_expert.append(None)
            continue
        enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left").to(model.device)
        w = model(**enc, use_cache=False).merge_weights  # [B, R, E] or [B, R, T, E]
        if w.dim() == 4:
            w = masked_mean(w.permute(0, 2, 1, 3).flatten(2), enc["attention_mask"]).view(w.shape[0], w.shape[1], -1)
        per_expert.append(w.float().cpu())
    rep = {"experts": labels, "method": config.method, "level": config.level, "routers": R}
    if all(w is None for w in per_expert):
        return {**rep, "measured": False, "note": NO_PROMPTS}

    def each(f):
        return [None if w is None else f(i, w) for i, w in enumerate(per_expert)]

    accuracy = [each(lambda i, w: (w[:, k].argmax(-1) == i).float().mean().item()) for k in range(R)]
    mean_weights = [each(lambda i, w: w[:, k].mean(0).tolist()) for k in range(R)]
    everywhere = each(lambda i, w: (w.argmax(-1) == i).all(-1).float().mean().item())
    return {**rep, "measured": True, "accuracy": accuracy, "mean_weights": mean_weights,
            "routed_right_at_every_router": everywhere}


def plot_report(rep: dict, path: Path) -> None:
    """Heatmaps of mean merge weights for the first, middle and last router; nothing if nothing was measured."""
    if not rep["measured"]:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R = rep["routers"]
    picks = sorted({0, R // 2, R - 1})
    fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks) + 1, 3.2), squeeze=False)
    for ax, k in zip(axes[0], picks):
        rows = [w if w is not None else [float("nan")] * len(rep["experts"]) for w in rep["mean_weights"][k]]
        im = ax.imshow(rows, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"router {k}" if R > 1 else "router")
        ax.set_xticks(range(len(rep["experts"])), rep["experts"], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(rep["experts"])), rep["experts"], fontsize=7)
        ax.set_xlabel("merge weight on expert")
    axes[0][0].set_ylabel("held-out prompts of")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(f"{rep['method']} / {rep['level']}: mean merge weights")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------------------- writing


def save_model(model: MoEMergeForCausalLM, out: Path, max_shard_size: str | int = "5GB") -> None:
    """Weights (sharded safetensors), config with `auto_map`, and the remote-code entry point."""
    model.config.auto_map = AUTO_MAP
    model.save_pretrained(out, max_shard_size=max_shard_size)
    (Path(out) / "modeling_moe_merge.py").write_text(REMOTE_CODE)


def assemble_dynamic(recipe, out_dir: Path, *, tokenizer, force: bool, dtype: torch.dtype | None, shard_size,
                     seed: int, tokenizer_files, shown, device: str = "cpu",
                     eval_data: tuple[Path, list[dict]] | None = None) -> Path:
    """Build, start the routers from prompts on `device`, write atomically; then measure the routing report (and
    exact match on `eval_data`, (path, rows)) on the model loaded back from the output, as users get it: its
    dtype, its RoPE tables. `shown` is the recipe as the output names its sources (`assemble.portable`)."""
    from moe_merge import card
    from moe_merge.assemble import _write_generation_config
    from moe_merge.outdir import atomic_output_dir

    cfg = recipe.config
    logger.info("building a %s / %s dynamic model from %d experts", cfg.method, cfg.level, len(recipe.experts))
    model = build_model(recipe, seed).to(device)
    scales = init_routers(model, tokenizer, cfg, seed)
    if dtype is not None:
        model.to(dtype)  # the routers stay float32
    with atomic_output_dir(out_dir, force=force) as tmp:
        save_model(model, tmp, shard_size)
        del model
        shipped = MoEMergeForCausalLM.from_pretrained(tmp).to(device).eval()
        rep = {**routing_report(shipped, tokenizer, cfg, recipe.labels), "calibration_scales": scales}
        quality = None
        if eval_data is not None:
            from moe_merge.quality import quality_table

            quality = quality_table(shipped, tokenizer, *eval_data)
        _write_generation_config(recipe.base.path, tmp)
        for name in tokenizer_files:
            if (recipe.base.path / name).is_file():
                shutil.copy2(recipe.base.path / name, tmp / name)
        (tmp / "moe-merge.yaml").write_text(yaml.safe_dump(shown.config.resolved(), sort_keys=False))
        (tmp / "routing_report.json").write_text(json.dumps(rep, indent=2))
        plot_report(rep, tmp / "routing_report.png")
        card.write_dynamic_card(tmp, shown, rep, quality)
    return Path(out_dir)
