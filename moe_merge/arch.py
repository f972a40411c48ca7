"""How each supported dense family maps onto a stock MoE architecture.

Every supported base is a SwiGLU decoder whose MLP is `model.layers.{i}.mlp.{gate,up,down}_proj`.
The output is written in the legacy per-expert layout, which transformers 4.x, 5.x and vLLM all
load without remote code (transformers 5 fuses the experts itself when loading).
"""

from __future__ import annotations

from dataclasses import dataclass

MLP_PROJS = ("gate_proj", "up_proj", "down_proj")
MLP_KEY = "model.layers.{layer}.mlp.{proj}.weight"


@dataclass(frozen=True)
class MoEFormat:
    model_type: str
    architecture: str
    expert_key: str  # .format(layer=, expert=, proj=) with proj already renamed
    router_key: str
    proj_names: dict[str, str]  # dense MLP projection -> expert projection name on disk
    shared_expert_key: str | None = None  # .format(layer=, proj=)
    shared_router_key: str | None = None

    def expert_tensor(self, layer: int, expert: int, proj: str) -> str:
        return self.expert_key.format(layer=layer, expert=expert, proj=self.proj_names[proj])


MIXTRAL = MoEFormat(
    model_type="mixtral",
    architecture="MixtralForCausalLM",
    expert_key="model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}.weight",
    router_key="model.layers.{layer}.block_sparse_moe.gate.weight",
    proj_names={"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"},
)
_QWEN_EXPERT = "model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
_SAME = {p: p for p in MLP_PROJS}
QWEN2_MOE = MoEFormat(
    model_type="qwen2_moe",
    architecture="Qwen2MoeForCausalLM",
    expert_key=_QWEN_EXPERT,
    router_key="model.layers.{layer}.mlp.gate.weight",
    proj_names=_SAME,
    shared_expert_key="model.layers.{layer}.mlp.shared_expert.{proj}.weight",
    shared_router_key="model.layers.{layer}.mlp.shared_expert_gate.weight",
)
QWEN3_MOE = MoEFormat(
    model_type="qwen3_moe",
    architecture="Qwen3MoeForCausalLM",
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
    """A dense base family: its default MoE output, and the one it takes with a shared expert."""

    moe: MoEFormat
    moe_with_shared: MoEFormat | None


FAMILIES: dict[str, Family] = {
    "llama": Family(MIXTRAL, QWEN2_MOE),
    "mistral": Family(MIXTRAL, QWEN2_MOE),
    "qwen2": Family(QWEN2_MOE, QWEN2_MOE),
    # Qwen2-MoE has no q_norm/k_norm, so a Qwen3 base cannot take a shared expert.
    "qwen3": Family(QWEN3_MOE, None),
}


def is_mlp_tensor(name: str) -> bool:
    parts = name.split(".")
    return len(parts) == 6 and parts[0] == "model" and parts[1] == "layers" and parts[3] == "mlp" and parts[4] in MLP_PROJS


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        return int(parts[2])
    return None
