"""The supported families: one table that says, for each dense base family, which transformers classes
build it and which stock MoE architecture it becomes.

Every supported base is a SwiGLU decoder whose MLP is `model.layers.{i}.mlp.{gate,up,down}_proj` and whose
norms are `{prefix}RMSNorm`. The stock output is written in the legacy per-expert layout, which
transformers 4.x, 5.x and vLLM all load without remote code (transformers 5 fuses the experts itself when
loading). The dynamic model, the probe, the zoo and the CLI read this table; a new family is one row here (and,
for the zoo, whatever its tiny config must set).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from moe_merge.errors import CompatibilityError, ConfigError

ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")
MLP_KEY = "model.layers.{layer}.mlp.{proj}.weight"
# The norms a level routes with its projections, as paths inside a decoder layer (Qwen3 has q/k norms).
LAYER_NORMS = {"ffn": ("post_attention_layernorm",),
               "block": ("input_layernorm", "self_attn.q_norm", "self_attn.k_norm", "post_attention_layernorm")}


def transformers_class(model_type: str, prefix: str, name: str) -> type:
    """transformers' `{prefix}{name}` from the modeling module of `model_type`, e.g. LlamaDecoderLayer."""
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    return getattr(module, prefix + name)


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

    def cls(self, name: str) -> type:
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
ARCHITECTURE_NAMES = {"mixtral": "mixtral", "qwen": "qwen2_moe", "qwen2_moe": "qwen2_moe",
                      "qwen3": "qwen3_moe", "qwen3_moe": "qwen3_moe"}


@dataclass(frozen=True)
class Family:
    """A dense base family: its transformers classes, its default MoE output and the one it takes with a
    shared expert. Tied embeddings need nothing here: every family reads `tie_word_embeddings` from its config."""

    model_type: str
    prefix: str  # transformers' class prefix: {prefix}DecoderLayer, {prefix}RMSNorm, {prefix}RotaryEmbedding
    moe: MoEFormat
    moe_with_shared: MoEFormat | None

    def cls(self, name: str) -> type:
        return transformers_class(self.model_type, self.prefix, name)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "Llama", MIXTRAL, QWEN2_MOE),
    Family("mistral", "Mistral", MIXTRAL, QWEN2_MOE),
    Family("qwen2", "Qwen2", QWEN2_MOE, QWEN2_MOE),
    # Qwen2-MoE has no q_norm/k_norm, so a Qwen3 base cannot take a shared expert.
    Family("qwen3", "Qwen3", QWEN3_MOE, None),
)}


def choose_format(config, family: str, base_config: dict, base_path: Path) -> MoEFormat:
    """The stock MoE format a sparse FFN-level recipe writes from a base of `family`."""
    fam = FAMILIES[family]
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
        fmt = fam.moe_with_shared if config.shared_experts else fam.moe
    if config.shared_experts and fmt.shared_expert_key is None:
        raise ConfigError(
            f"`shared_experts` needs an output with a shared expert (Qwen2-MoE), which a {family} base cannot become"
        )
    if fmt.shared_expert_key is not None and not config.shared_experts:
        raise ConfigError(
            "Qwen2-MoE output needs exactly one entry in `shared_experts` (e.g. the base: "
            "`shared_experts: [{source_model: <base_model>}]`)"
        )
    for key in ("attention_bias", "mlp_bias"):
        if base_config.get(key) and not (key == "attention_bias" and fmt.model_type == "qwen2_moe" and family == "qwen2"):
            raise CompatibilityError(f"{base_path}/config.json sets `{key}: true`, which {fmt.architecture} cannot hold")
    return fmt


def is_mlp_tensor(name: str) -> bool:
    parts = name.split(".")
    return len(parts) == 6 and parts[0] == "model" and parts[1] == "layers" and parts[3] == "mlp" and parts[4] in MLP_PROJS


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        return int(parts[2])
    return None
