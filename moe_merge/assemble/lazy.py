"""Run a model whose weights stay on disk: each block (the embeddings, a decoder layer, the final norm, the head,
an expert model's layer) comes into memory when it is called and goes back to the meta device when it returns.
Assembly runs its prompts through the model it is writing this way (prompts.py), so that its peak memory is one
block, not the model: `lazy_blocks` for any modules (the stock decoder, stock.py), `lazy` for the dynamic model.

Routers and RoPE tables are not loaded: they are always in memory (`empty_model`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from moe_merge.modeling import MoEMergeConfig, MoEMergeForCausalLM, _stock


def empty_model(config: MoEMergeConfig) -> MoEMergeForCausalLM:
    """The model on the meta device, but for what its checkpoint's tensors do not give: the RoPE tables, Gemma's
    embedding scale and the routers (at zero: uniform routing, until they are set)."""
    with torch.device("meta"):
        model = MoEMergeForCausalLM(config)
    text = config.get_text_config()
    model.model.rotary_emb = _stock(text, "RotaryEmbedding")(config=text)
    for module in model.modules():
        if hasattr(module, "scalar_embed_scale"):  # Gemma's scaled embedding keeps its scale in a buffer
            module.register_buffer("embed_scale", torch.tensor(module.scalar_embed_scale), persistent=False)
    for router in model.routers():
        router.to_empty(device="cpu")
        router.input_center.zero_()
        router.input_scale.fill_(1.0)
        router.set_constant(0.0)
    return model


def compute_device(model: MoEMergeForCausalLM) -> torch.device:
    """Where the model computes: its RoPE tables' device (its blocks may be waiting on the meta device)."""
    return model.model.compute_device


def blocks(model: MoEMergeForCausalLM) -> list[tuple[str, nn.Module]]:
    """The model's blocks by name prefix: what comes into memory at once."""
    inner = model.model
    out = [("model.embed_tokens", inner.embed_tokens)]
    out += [(f"model.layers.{i}", layer) for i, layer in enumerate(inner.layers)]
    if model.config.level_record.whole_models:
        for e, expert in enumerate(inner.experts):
            out += [(f"model.experts.{e}.layers.{j}", layer) for j, layer in enumerate(expert.layers)]
            out += [(f"model.experts.{e}.norm", expert.norm), (f"model.experts.{e}.lm_head", expert.lm_head)]
    else:
        out += [("model.norm", inner.norm), ("lm_head", model.lm_head)]
    return out


def _stored_name(model: MoEMergeForCausalLM, name: str) -> str:
    """Where tensor `name` is stored: a tied head's tensors are the embeddings'."""
    for target, source in (model._tied_weights_keys or {}).items() if model.config.tie_word_embeddings else ():
        if name == target or name.startswith(target + "."):
            return source + name[len(target) :]
    return name


@contextlib.contextmanager
def lazy_blocks(
    blocks: list[tuple[nn.Module, Callable[[], dict[str, torch.Tensor]]]], device: str | torch.device = "cpu"
) -> Iterator[None]:
    """Within the block, each module of `blocks` loads its tensors with its `state()` (to `device`) as it is called,
    and frees them when it returns; what `state()` does not give stays as it is."""
    handles = []
    for module, state in blocks:
        loaded: list[str] = []  # the names this block holds while it runs

        def fill(mod, *_, state=state, loaded=loaded):
            tensors = state()
            mod.load_state_dict({n: t.to(device) for n, t in tensors.items()}, strict=False, assign=True)
            loaded[:] = tensors

        def free(mod, *_, loaded=loaded):
            held = dict(mod.state_dict())
            mod.load_state_dict(
                {n: torch.empty_like(held[n], device="meta") for n in loaded}, strict=False, assign=True
            )
            loaded.clear()

        handles += [module.register_forward_pre_hook(fill), module.register_forward_hook(free)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def lazy(
    model: MoEMergeForCausalLM, load: Callable[[str], torch.Tensor], device: str | torch.device = "cpu"
) -> Iterator[MoEMergeForCausalLM]:
    """Within the block, `model` loads each block's tensors with `load(name)` (to `device`) as it is called and
    frees them when it returns; routers stay as they are."""

    def reader(prefix: str, module: nn.Module) -> Callable[[], dict[str, torch.Tensor]]:
        names = [n for n in module.state_dict() if not (n.startswith("router.") or ".router." in n)]
        return lambda: {n: load(_stored_name(model, f"{prefix}.{n}")) for n in names}

    with lazy_blocks([(module, reader(prefix, module)) for prefix, module in blocks(model)], device):
        yield model
