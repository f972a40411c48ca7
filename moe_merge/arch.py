"""The supported families: one table that says, for each dense base family, which transformers classes
build it, how its decoder layer is laid out, and which stock MoE architecture it becomes.

Every supported base is a gated-MLP decoder whose MLP is `model.layers.{i}.mlp.{gate,up,down}_proj` and whose
norms are `{prefix}RMSNorm`. Families differ in where their norms sit and how they compute:
- Llama, Mistral, Qwen2/3: a norm before attention and one before the MLP (Qwen3 adds q/k norms);
- Gemma: RMSNorm gains of (1 + w), computed in float32, and embeddings scaled by sqrt(hidden_size); Gemma 2
  and 3 add a norm after attention and after the MLP ("sandwich" norms), Gemma 3 has q/k norms and a RoPE of
  its own for its sliding-window layers; Gemma 2 soft-caps attention and the final logits.
The stock output is written in the legacy per-expert layout, which transformers 4.x, 5.x and vLLM all load
without remote code (transformers 5 fuses the experts itself when loading). Gemma has no MoE architecture in
transformers, so a Gemma base has no stock output: its `method: sparse` at `level: ffn` is refused (the dynamic
methods run on it). The dynamic model, the stock decoder of assembly, the zoo and the CLI read this table; a new family is one row
here (and, for the zoo, whatever its tiny config must set).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_merge.errors import CompatibilityError, ConfigError

ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")
MLP_KEY = "model.layers.{layer}.mlp.{proj}.weight"


def transformers_class(module: str, prefix: str, name: str) -> type[Any]:
    """transformers' `{prefix}{name}` from its modeling module `module` (a model type), e.g. LlamaDecoderLayer."""
    return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), prefix + name)


@dataclass(frozen=True)
class MoEFormat:
    model_type: str
    prefix: str  # transformers' class prefix, e.g. Mixtral (MixtralDecoderLayer)
    expert_key: str  # .format(layer=, expert=, proj=) with proj already renamed
    router_key: str
    proj_names: dict[str, str]  # dense MLP projection -> expert projection name on disk
    shared_expert_key: str | None = None  # .format(layer=, proj=)
    shared_router_key: str | None = None

    @property
    def architecture(self) -> str:
        return f"{self.prefix}ForCausalLM"

    def expert_tensor(self, layer: int, expert: int, proj: str) -> str:
        return self.expert_key.format(layer=layer, expert=expert, proj=self.proj_names[proj])

    def shared_tensor(self, layer: int, proj: str | None = None) -> str:
        """The shared expert's `proj` weight in `layer`, or its gate's (no `proj`): Qwen2-MoE's only."""
        key = self.shared_router_key if proj is None else self.shared_expert_key
        if key is None:
            raise ConfigError(f"{self.architecture} has no shared expert")
        return key.format(layer=layer, proj=proj)

    def cls(self, name: str) -> type[Any]:
        return transformers_class(self.model_type, self.prefix, name)


MIXTRAL = MoEFormat(
    model_type="mixtral",
    prefix="Mixtral",
    expert_key="model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}.weight",
    router_key="model.layers.{layer}.block_sparse_moe.gate.weight",
    proj_names={"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"},
)
_QWEN_EXPERT = "model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
_SAME = {p: p for p in MLP_PROJS}
QWEN2_MOE = MoEFormat(
    model_type="qwen2_moe",
    prefix="Qwen2Moe",
    expert_key=_QWEN_EXPERT,
    router_key="model.layers.{layer}.mlp.gate.weight",
    proj_names=_SAME,
    shared_expert_key="model.layers.{layer}.mlp.shared_expert.{proj}.weight",
    shared_router_key="model.layers.{layer}.mlp.shared_expert_gate.weight",
)
QWEN3_MOE = MoEFormat(
    model_type="qwen3_moe",
    prefix="Qwen3Moe",
    expert_key=_QWEN_EXPERT,
    router_key="model.layers.{layer}.mlp.gate.weight",
    proj_names=_SAME,
)
FORMATS = {f.model_type: f for f in (MIXTRAL, QWEN2_MOE, QWEN3_MOE)}
# mergekit-moe's `architecture` values (matched by prefix there) and ours.
ARCHITECTURE_NAMES = {
    "mixtral": "mixtral",
    "qwen": "qwen2_moe",
    "qwen2_moe": "qwen2_moe",
    "qwen3": "qwen3_moe",
    "qwen3_moe": "qwen3_moe",
}


@dataclass(frozen=True)
class Family:
    """A dense base family: its transformers classes, the norms of its decoder layer, and its stock MoE outputs
    (the default one and the one it takes with a shared expert; none for a family transformers has no MoE of).
    Tied embeddings need nothing here: every family reads `tie_word_embeddings` from its config."""

    model_type: str
    prefix: str  # transformers' class prefix: {prefix}DecoderLayer, {prefix}RMSNorm, {prefix}RotaryEmbedding
    moe: MoEFormat | None
    moe_with_shared: MoEFormat | None
    # The norms of a decoder layer, as paths inside it, by the part they belong to; the first of each part is
    # its input norm (the one a router of that part reads through). Paths a config lacks are skipped.
    attention_norms: tuple[str, ...] = ("input_layernorm", "self_attn.q_norm", "self_attn.k_norm")
    mlp_norms: tuple[str, ...] = ("post_attention_layernorm",)
    sandwich_norms: bool = False  # attention and MLP outputs are normed too (Gemma 2, 3)
    unit_offset_norms: bool = False  # RMSNorm gain is 1 + w, multiplied in float32 (Gemma)
    scaled_embeddings: bool = False  # embeddings times sqrt(hidden_size), in the weights' dtype (Gemma)
    rope_per_layer_type: bool = False  # sliding-window and full layers have RoPEs of their own (Gemma 3)
    module: str | None = None  # transformers' modeling module, where it is not the model type's

    def cls(self, name: str) -> type[Any]:
        return transformers_class(self.module or self.model_type, self.prefix, name)

    def fn(self, name: str):
        """A function of the family's modeling module, e.g. its `apply_rotary_pos_emb`."""
        return transformers_class(self.module or self.model_type, "", name)

    @property
    def post_attention_norm(self) -> str | None:
        """The norm of the attention output (sandwich families), else None."""
        return "post_attention_layernorm" if self.sandwich_norms else None

    @property
    def post_mlp_norm(self) -> str | None:
        return "post_feedforward_layernorm" if self.sandwich_norms else None

    def layer_norms(self, kinds: tuple[str, ...]) -> tuple[str, ...]:
        """The layer norms of `kinds` ("attention", "mlp"): those a level routes with its projections."""
        return (self.attention_norms if "attention" in kinds else ()) + (self.mlp_norms if "mlp" in kinds else ())


_GEMMA_SANDWICH: dict[str, Any] = dict(
    attention_norms=("input_layernorm", "self_attn.q_norm", "self_attn.k_norm", "post_attention_layernorm"),
    mlp_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"),
    sandwich_norms=True,
    unit_offset_norms=True,
    scaled_embeddings=True,
)
FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "Llama", MIXTRAL, QWEN2_MOE),
        Family("mistral", "Mistral", MIXTRAL, QWEN2_MOE),
        Family("qwen2", "Qwen2", QWEN2_MOE, QWEN2_MOE),
        # Qwen2-MoE has no q_norm/k_norm, so a Qwen3 base cannot take a shared expert.
        Family("qwen3", "Qwen3", QWEN3_MOE, None),
        Family("gemma", "Gemma", None, None, unit_offset_norms=True, scaled_embeddings=True),
        Family("gemma2", "Gemma2", None, None, **_GEMMA_SANDWICH),
        Family("gemma3_text", "Gemma3", None, None, rope_per_layer_type=True, module="gemma3", **_GEMMA_SANDWICH),
    )
}
# Configs that hold a text model's config (`text_config`) beside other towers: the text model is what merges
# (the output is a text-only model). Their weights sit under a prefix, which `sources.Checkpoint` removes.
MULTIMODAL = {"gemma3": "gemma3_text"}
# What each refused family is refused for, in the words the error shows.
REFUSED = {
    "phi3": "its attention and MLP are fused (`qkv_proj`, `gate_up_proj`): routing q, k and v or gate and up "
    "apart needs a layout of its own; convert it to a Llama layout first",
    "gemma3n": "its per-layer embeddings and AltUp blocks have no counterpart in the other families",
}


def family_error(model_type: str, where: str) -> str:
    """The message for a base of unsupported `model_type` (read from `where`)."""
    why = f" ({REFUSED[model_type]})" if model_type in REFUSED else ""
    return (
        f"{where} has model_type {model_type!r}, which moe-merge does not support{why}; supported: "
        f"{', '.join([*FAMILIES, *MULTIMODAL])}"
    )


def choose_format(config, family: str, base_config: dict, base_path: Path) -> MoEFormat:
    """The stock MoE format a sparse FFN-level recipe writes from a base of `family`."""
    fam = FAMILIES[family]
    if fam.moe is None:
        raise CompatibilityError(
            f"`method: sparse` at `level: ffn` writes a stock MoE checkpoint, and transformers has no MoE architecture "
            f"for a {family} base ({base_path}), so none can hold it exactly; use a dynamic method instead: "
            "`method: smear | wemoe | twin` at `level: ffn | block`, or `method: sparse` at `level: block | model` "
            "(each a moe-merge dynamic model)"
        )
    shared_error = (
        f"`shared_experts` needs an output with a shared expert (Qwen2-MoE), which a {family} base cannot become"
    )
    if config.architecture is not None:
        key = ARCHITECTURE_NAMES.get(config.architecture.lower())
        if key is None:
            raise ConfigError(
                f"`architecture: {config.architecture}` is not supported; choose one of {', '.join(ARCHITECTURE_NAMES)}"
            )
        fmt = FORMATS[key]
        if fmt not in (fam.moe, fam.moe_with_shared):
            raise ConfigError(f"`architecture: {config.architecture}` cannot be built from a {family} base")
    else:
        found = fam.moe_with_shared if config.shared_experts else fam.moe
        if found is None:
            raise ConfigError(shared_error)
        fmt = found
    if config.shared_experts and fmt.shared_expert_key is None:
        raise ConfigError(shared_error)
    if fmt.shared_expert_key is not None and not config.shared_experts:
        raise ConfigError(
            "Qwen2-MoE output needs exactly one entry in `shared_experts` (e.g. the base: "
            "`shared_experts: [{source_model: <base_model>}]`)"
        )
    for key in ("attention_bias", "mlp_bias"):
        if base_config.get(key) and not (
            key == "attention_bias" and fmt.model_type == "qwen2_moe" and family == "qwen2"
        ):
            raise CompatibilityError(
                f"{base_path}/config.json sets `{key}: true`, which {fmt.architecture} cannot hold"
            )
    return fmt


def is_mlp_tensor(name: str) -> bool:
    parts = name.split(".")
    return (
        len(parts) == 6 and parts[0] == "model" and parts[1] == "layers" and parts[3] == "mlp" and parts[4] in MLP_PROJS
    )


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        return int(parts[2])
    return None
