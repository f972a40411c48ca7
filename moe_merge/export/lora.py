"""Export a dynamic model's merged delta for fixed merge weights as a PEFT LoRA adapter on the base.

For fixed merge weights w (one vector for every router, or one per router) each linear layer of the
dynamic model computes (W_base + D)·x. The adapter holds D exactly, as B·A with scaling 1:
- low-rank experts (LoRA adapters; Twin's SVD parts) by rank concatenation:
  A = [w_1·A_1; …; w_E·A_E] [Σr, K], B = [B_1 … B_E] [N, Σr] (experts with w_e = 0 are left out);
- a dense difference (full fine-tunes, SMEAR's expert weights, Twin's shared part, a linear weight a
  static merge moved) by exact full-rank factors: A = D, B = I (or A = I, B = D), rank min(N, K).
  That is as large as D itself; an SVD truncation would be smaller but not exact (`bake` writes a
  dense model instead).
Every module gets the same rank (the largest; the others zero-padded) and lora_alpha = r, so the
scaling is 1 for every reader: PEFT (alpha / r), vLLM (one global alpha / r) and llama.cpp (alpha /
each tensor's rank). What a LoRA on linear layers cannot carry (an embedding, norm, bias or LM head
that differs from the base; sparse output mixing) is refused with the tensor's name.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import yaml
from torch import nn

from moe_merge.errors import CompatibilityError, ConfigError, SourceError
from moe_merge.export.bake import fixed
from moe_merge.export.card import VLLM_MAX_LORA_RANKS, vllm_max_lora_rank
from moe_merge.merged_linear import MergedLinear
from moe_merge.merged_norm import MergedNorm
from moe_merge.modeling import MoEMergeForCausalLM
from moe_merge.routers.router import Router
from moe_merge.sources import Checkpoint, hub_id, resolve_path

Factors = tuple[torch.Tensor, torch.Tensor]  # A [r, K], B [N, r]

logger = logging.getLogger(__name__)


def dense_factors(delta: torch.Tensor) -> Factors:
    """Exact factors of a dense delta [N, K]: B·A = delta with rank min(N, K)."""
    N, K = delta.shape
    if N <= K:
        return delta, torch.eye(N, dtype=delta.dtype)
    return torch.eye(K, dtype=delta.dtype), delta


class _Base:
    """The base's tensors as the dynamic model stores them (its dtype), widened to float64 to compare and subtract."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint

    def __call__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The base's `name`, rounded to the model's `dtype` as the model stores it, in float64."""
        if name not in self.checkpoint:
            raise CompatibilityError(f"the base {self.checkpoint.path} has no tensor {name!r}; is it the model's base?")
        t = self.checkpoint.get(name)
        if tuple(t.shape) != tuple(shape):
            raise CompatibilityError(
                f"tensor {name!r} is {tuple(t.shape)} in the base {self.checkpoint.path} but "
                f"{tuple(shape)} in the model; is it the model's base?"
            )
        return t.to(dtype).double()

    def like(self, name: str, t: torch.Tensor) -> torch.Tensor:
        return self(name, t.shape, t.dtype)

    def require_equal(self, name: str, t: torch.Tensor) -> None:
        if not torch.equal(t.double(), self.like(name, t)):
            raise ConfigError(
                f"{name} differs from the base's ({self.checkpoint.path}), and a LoRA adapter only changes linear layers' "
                "weights: write a dense model for these merge weights with `moe-merge bake`, or rebuild the model with "
                "`non_expert: base` so that nothing outside the routed layers moves"
            )


def _merged_factors(m: MergedLinear, w: torch.Tensor, name: str, base: _Base) -> list[Factors]:
    """The factors of merged linear `name` for weights w [E], relative to the base's weight."""
    terms, factors, bias = m.parts(w)
    dense = terms[0] - base(f"{name}.weight", (m.out_features, m.in_features), m.stored_dtype)
    for t in terms[1:]:
        dense = dense + t
    if bias is not None and not torch.equal(bias, base.like(f"{name}.bias", bias)):
        raise ConfigError(
            f"{name}.bias differs from the base's for these merge weights; LoRA adapters for serving carry no bias: "
            "write a dense model with `moe-merge bake`"
        )
    return ([dense_factors(dense)] if dense.any() else []) + factors


@torch.no_grad()
def delta_factors(model: MoEMergeForCausalLM, weights: torch.Tensor, base: Checkpoint) -> dict[str, Factors]:
    """Module name -> (A [r, K], B [N, r]) in float64 with B·A = the model's weight minus the base's, for merge
    weights [E] (every router) or [R, E]. Modules equal to the base are left out."""
    cfg = model.config
    if cfg.merging.mixes_outputs:
        raise ConfigError(
            f"`method: {cfg.method}` at {cfg.level} level mixes whole layers' outputs, which no LoRA on one "
            "model computes; for one expert's layers use `moe-merge bake --weights` with one-hot weights"
        )
    w = weights.double().expand(cfg.num_routers, cfg.num_experts)
    ref = _Base(base)
    inner = model.model
    ref.require_equal("model.embed_tokens.weight", fixed(inner.embed_tokens, w[0]))
    ref.require_equal("model.norm.weight", fixed(inner.norm, w[-1]))
    if not cfg.tie_word_embeddings or isinstance(model.lm_head, MergedLinear):  # merged: the last router's weights
        ref.require_equal(
            "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight", fixed(model.lm_head, w[-1])
        )
    out: dict[str, Factors] = {}
    for i, layer in enumerate(inner.layers):
        wi = w[cfg.router_of_layer(i)]
        for n, m in layer.named_modules():
            if n == "router" or n.startswith("router.") or isinstance(m, Router):
                continue
            name = f"model.layers.{i}.{n}"
            if isinstance(m, MergedNorm):
                ref.require_equal(f"{name}.weight", fixed(m, wi))
                continue
            if isinstance(m, MergedLinear):
                factors = _merged_factors(m, wi, name, ref)
            elif isinstance(m, nn.Linear):
                dense = m.weight.double() - ref.like(f"{name}.weight", m.weight)
                factors = [dense_factors(dense)] if dense.any() else []
                if m.bias is not None:
                    ref.require_equal(f"{name}.bias", m.bias)
            else:
                for k, v in m.named_parameters(recurse=False):
                    ref.require_equal(f"{name}.{k}", v)
                continue
            if factors:
                out[name] = (torch.cat([a for a, _ in factors]), torch.cat([b for _, b in factors], dim=1))
    return out


def adapter_tensors(factors: dict[str, Factors], dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], int]:
    """PEFT's tensor names, every module zero-padded to the largest rank; returns (tensors, rank)."""
    rank = max(a.shape[0] for a, _ in factors.values())
    tensors = {}
    for name, (A, B) in sorted(factors.items()):
        pad = rank - A.shape[0]
        tensors[f"base_model.model.{name}.lora_A.weight"] = nn.functional.pad(A, (0, 0, 0, pad)).to(dtype).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = nn.functional.pad(B, (0, pad)).to(dtype).contiguous()
    return tensors, rank


def _sort_target_modules(path: Path) -> None:
    """peft writes `target_modules` from a set, in an order that changes from one process to the next; sorted,
    one model and one set of merge weights always give the same file."""
    data = json.loads(path.read_text())
    data["target_modules"] = sorted(data["target_modules"])
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def recipe_base(model_dir: Path) -> str:
    """The base named in the model's resolved recipe (moe-merge.yaml)."""
    recipe = model_dir / "moe-merge.yaml"
    if not recipe.is_file():
        raise SourceError(f"{model_dir} has no moe-merge.yaml naming its base; pass --base PATH_OR_ID")
    return yaml.safe_load(recipe.read_text())["base_model"]


def export_lora(
    model_dir: Path | str,
    out_dir: Path | str,
    *,
    weights: list[float] | torch.Tensor | None = None,
    prompt: str | None = None,
    base: str | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
) -> Path:
    """Write the PEFT LoRA adapter (on the base) that reproduces `model_dir` under fixed merge weights.

    The merge weights are `weights` ([E] for every router, or [R, E]) or the routers' weights for `prompt`. `base` (a
    path or cached Hub id) defaults to the recipe's `base_model`; `dtype` to the model's.
    """
    from peft import LoraConfig

    from moe_merge.export import card
    from moe_merge.export.bake import fixed_merge_weights, load_dynamic
    from moe_merge.outdir import atomic_output_dir, refuse_existing
    from moe_merge.writer import save_tensors

    model_dir = Path(model_dir)
    refuse_existing(out_dir, force)
    model = load_dynamic(model_dir, allow_nonfinite)
    w = fixed_merge_weights(model, model_dir, weights, prompt)
    base_ref = base or recipe_base(model_dir)
    try:
        base_path = resolve_path(base_ref, model_dir)
    except SourceError as e:
        raise SourceError(f"{e}; or pass the base's directory with --base") from None
    factors = delta_factors(model, w, Checkpoint(base_path))
    if not factors:
        raise ConfigError(
            f"for these merge weights {model_dir} equals its base {base_path}: there is no delta to export"
        )
    tensors, rank = adapter_tensors(factors, dtype or model.dtype)
    if vllm_max_lora_rank(rank) is None:
        logger.warning(
            "the adapter's rank, %d, is above vLLM's largest --max-lora-rank (%d): PEFT loads it, multi-LoRA "
            "servers will not; `moe-merge bake` writes the dense model instead",
            rank,
            max(VLLM_MAX_LORA_RANKS),
        )
    base_hub_id = hub_id(base_ref, base_path)  # the Hub's name for the base, when it came from there
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=sorted(factors),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_hub_id or str(base_path),
    )
    with atomic_output_dir(out_dir, force=force) as tmp:
        config.save_pretrained(str(tmp))
        _sort_target_modules(tmp / "adapter_config.json")
        save_tensors(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        card.write_adapter_card(
            tmp,
            base=base_hub_id or str(base_path),
            hub_id=base_hub_id,
            model_dir=model_dir,
            expert_names=list(model.config.expert_names or []),
            weights=w.float(),
            rank=rank,
            modules=len(factors),
        )
    return Path(out_dir)
