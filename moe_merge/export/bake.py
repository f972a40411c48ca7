"""Bake a dynamic model for fixed merge weights into a plain dense checkpoint of the base architecture.

For parameter-merging methods (smear, wemoe, twin) any merge-weight vector bakes: each merged linear
becomes W0 + Σ_e w_e Δ_e. Sparse block and model levels mix outputs, which no single dense model
computes, so they bake only for one-hot (top-1) weights: the chosen expert's layers.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from moe_merge.errors import ConfigError
from moe_merge.merged_linear import MergedLinear
from moe_merge.merged_norm import MergedEmbedding, MergedNorm
from moe_merge.modeling import MoEMergeDecoderLayer, MoEMergeForCausalLM, MoEMergeSparseBlock
from moe_merge.outdir import atomic_output_dir, refuse_existing
from moe_merge.recipe import copy_companions
from moe_merge.routers.router import Router
from moe_merge.sources import check_model_dir


def weights_for_prompt(model: MoEMergeForCausalLM, tokenizer, prompt: str) -> torch.Tensor:
    """The merge weights [R, E] the model's routers give `prompt`."""
    if model.config.router_granularity != "sequence":
        raise ConfigError(
            "this model routes each token, so a prompt gives no single set of merge weights; bake it with --weights"
        )
    with torch.no_grad():
        return model.model(**tokenizer(prompt, return_tensors="pt"), use_cache=False).merge_weights[0]


def _expert_of(w: torch.Tensor, where: str) -> int:
    e = int(w.argmax())
    if not torch.allclose(w, torch.nn.functional.one_hot(torch.tensor(e), len(w)).to(w)):
        raise ConfigError(
            f"sparse output mixing cannot be baked into one dense model: {where} mixes "
            f"{[round(x, 3) for x in w.tolist()]}; give one-hot weights (e.g. --weights 0,1,0)"
        )
    return e


MERGED = (MergedLinear, MergedNorm)  # the modules whose tensors are merged per input; each has `merged(w)`


def fixed(module: torch.nn.Module, w: torch.Tensor) -> torch.Tensor:
    """A merged module's weight (a norm's gain, an embedding's table) for fixed weights w [E]; a plain one's own."""
    if isinstance(module, MergedEmbedding):
        module = module.table
    if isinstance(module, MERGED):
        return module.merged(w)[0]
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return weight


@torch.no_grad()
def baked_state(model: MoEMergeForCausalLM, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """The base architecture's state dict for merge weights [R, E] (or [E] for every router): the embeddings take
    the first router's weights, the final norm and head the last's."""
    cfg = model.config
    w = weights.expand(cfg.num_routers, cfg.num_experts)
    inner, state = model.model, {}

    def put(prefix: str, module: torch.nn.Module) -> None:
        for k, v in module.state_dict().items():
            state[prefix + k] = v

    state["model.embed_tokens.weight"] = fixed(inner.embed_tokens, w[0])
    for i, layer in enumerate(inner.layers):
        dst = f"model.layers.{i}."
        if isinstance(layer, MoEMergeDecoderLayer):
            wi = w[cfg.router_of_layer(i)]
            merged = {n: m for n, m in layer.named_modules() if isinstance(m, MERGED)}
            for n, m in merged.items():
                weight, bias = m.merged(wi)
                state[f"{dst}{n}.weight"] = weight
                if bias is not None:
                    state[f"{dst}{n}.bias"] = bias
            for n, m in layer.named_modules():
                if not isinstance(m, (*MERGED, Router)) and n.split(".")[0] != "router":
                    for k, v in m.named_parameters(recurse=False):
                        state[f"{dst}{n}.{k}"] = v
        elif isinstance(layer, MoEMergeSparseBlock):
            put(dst, layer.experts[_expert_of(w[i], f"layer {i}'s router")])
        else:
            put(dst, layer)
    if cfg.level_record.whole_models:
        expert = inner.experts[_expert_of(w[0], "the model router")]
        for j, layer in enumerate(expert.layers):
            put(f"model.layers.{cfg.dense_layers + j}.", layer)
        state["model.norm.weight"] = expert.norm.weight
        state["lm_head.weight"] = expert.lm_head.weight
    else:
        state["model.norm.weight"] = fixed(inner.norm, w[-1])
        state["lm_head.weight"] = fixed(model.lm_head, w[-1])
    return state


def baked_model(model: MoEMergeForCausalLM, weights: torch.Tensor):
    """The dense model, loaded strictly: a missing or unexpected tensor is an error, tied base or not. A tied
    base stays tied unless the merge weights give the head other values than the embedding (at model level the head is
    the chosen expert's own embedding, the embedding the merged one): then the dense model is untied."""
    from transformers import AutoModelForCausalLM

    text = copy.deepcopy(model.config.get_text_config())
    state = baked_state(model, weights)
    if text.tie_word_embeddings and not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"]):
        text.tie_word_embeddings = False
    dense = AutoModelForCausalLM.from_config(text, dtype=model.dtype)
    dense.load_state_dict(state)
    return dense.eval()


def load_dynamic(model_dir: Path, allow_nonfinite: bool = False, **kwargs) -> MoEMergeForCausalLM:
    """The dynamic model in `model_dir`, checked first (`sources.check_model_dir`)."""
    from transformers import AutoModelForCausalLM

    check_model_dir(model_dir, allow_nonfinite)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if not isinstance(model, MoEMergeForCausalLM):
        raise ConfigError(f"{model_dir} is a {type(model).__name__}, not a moe-merge dynamic model")
    return model


def fixed_merge_weights(
    model: MoEMergeForCausalLM, model_dir: Path, weights: list[float] | torch.Tensor | None, prompt: str | None
) -> torch.Tensor:
    """The merge weights the user asked for: `weights` ([E] for every router, or [R, E]) or the routers' for
    `prompt` [R, E]."""
    from moe_merge.tokens import load_tokenizer

    if (weights is None) == (prompt is None):
        raise ConfigError("give exactly one of --weights and --prompt")
    if prompt is not None:
        return weights_for_prompt(model, load_tokenizer(model_dir), prompt)
    cfg = model.config
    w = torch.as_tensor(weights, dtype=torch.float32 if isinstance(weights, list) else None)
    if w.shape not in ((cfg.num_experts,), (cfg.num_routers, cfg.num_experts)):
        raise ConfigError(
            f"--weights has {w.shape[-1] if w.dim() else 1} values but {model_dir} has {cfg.num_experts} "
            f"experts ({', '.join(cfg.expert_names or [])})"
            if w.dim() < 2
            else f"merge weights of shape {tuple(w.shape)}; {model_dir} needs [{cfg.num_experts}] or "
            f"[{cfg.num_routers}, {cfg.num_experts}]"
        )
    try:
        cfg.check_merge_weights(w)
    except ValueError as e:
        raise ConfigError(f"--weights {','.join(f'{x:g}' for x in w.flatten().tolist())}: {e}") from None
    return w


def bake(
    model_dir: Path | str,
    out_dir: Path | str,
    *,
    weights: list[float] | None = None,
    prompt: str | None = None,
    force: bool = False,
    allow_nonfinite: bool = False,
) -> Path:
    """Write the dense checkpoint for fixed merge weights (`weights`, one per expert) or those the routers give `prompt`."""
    from moe_merge.export.card import write_baked_card

    model_dir = Path(model_dir)
    refuse_existing(out_dir, force)
    model = load_dynamic(model_dir, allow_nonfinite)
    w = fixed_merge_weights(model, model_dir, weights, prompt)
    dense = baked_model(model, w)
    with atomic_output_dir(out_dir, force=force) as tmp:
        dense.save_pretrained(tmp)
        copy_companions(model_dir, tmp, make_generation_config=False)
        write_baked_card(
            tmp,
            model_dir=model_dir,
            expert_names=list(model.config.expert_names or []),
            weights=w,
            architecture=type(dense).__name__,
        )
    return Path(out_dir)
