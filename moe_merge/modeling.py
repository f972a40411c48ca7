"""The dynamic merging model: routers compute merge weights per input, and every routed part applies
W0 + Σ_e w_e Δ_e (or Σ_e w_e θ_e) to its input, batched and with the KV cache.

Read top to bottom: config → decoder layers → model → causal LM. Attention, RoPE, masks and the cache are
the base family's own transformers modules; routed projections, norms, embeddings and head are swapped in.

Methods and levels (the vocabulary of the recipe):
- `smear` / `wemoe` at `ffn` | `block`: one router per layer, merging that layer's MLP and its norm (ffn)
  or every linear layer and norm of the block (block).
- `twin` at `ffn` | `block`: one router, whose weights serve every layer.
- `sparse` at `block`: each layer holds every expert's whole decoder layer and mixes the top-k outputs.
- `sparse` at `model`: `dense_layers` shared layers, then one router picks expert models for the rest
  (layers, final norm and LM head) and mixes their logits.
Where the experts differ there (`routed_parts`), the embeddings take the first router's weights and the
final norm and head the last router's; the rest of the model is a static merge.

Merge weights are per sequence or per token, and travel as arguments: every merged module takes its weights in
its call. Per-sequence weights are decided once, at prefill: the first router reads a pre-pass of the prompt
through the static merge (the method's fixed weights) up to layer `prepass_layers`, so that the embeddings can be
merged before the first layer; the other per-layer routers read the masked mean of their own layer's input. The
weights come back as `outputs.merge_weights` [B, R, E] (R routers) and stay in the KV cache, in its last layer
(`RoutingState`, routing_state.py), for the decode steps, which never run the pre-pass. Passing `merge_weights`
yourself ([E], [B, E] or [B, R, E]) forces them, at prefill or at any step.

Continuous batching (transformers' paged cache, `generate_batch`, `transformers serve --continuous-batching`)
packs many requests into one row; serving.py routes each from its own prompt and keeps its weights with its
request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.configuration_utils import SubConfigSpec
from transformers.generation.continuous_batching import PagedAttentionCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from moe_merge.arch import ATTN_PROJS, FAMILIES, MLP_PROJS, Family, family_error
from moe_merge.errors import ModelConfigError
from moe_merge.merged_linear import MergedLinear, merged_linear
from moe_merge.merged_norm import MergedEmbedding, MergedNorm
from moe_merge.methods import LEVEL_RECORDS, LEVELS, METHODS, PARTS, LevelRecord, Method
from moe_merge.routers.router import Router, masked_mean, normalize
from moe_merge.routing_state import RoutingState
from moe_merge.serving import Packing, continuous_batching, packing_of, register

# transformers 5.24 renamed the KV cache `past_key_values` -> `cache` (outputs, masks, attention);
# 5.23 knows only the old name. Every call into transformers passes the cache under the installed name.
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@strict
class MoEMergeConfig(PreTrainedConfig):
    r"""A base-architecture config (`text_config`) plus how its experts are merged.

    `delta_forms` maps each routed projection name (`gate_proj`, ..., `embed_tokens`, `lm_head`) to its
    merged-linear form (`full` | `dense` | `lowrank`); `delta_ranks` gives the rank of the low-rank ones, by
    name or, where it differs per layer (rank by energy), by `"{layer}.{name}"`; `lowrank_offset` is twin's λ where
    its low-rank factors are the LoRA adapters' own (merged_linear.py). `routed_parts` are the parts
    beside the linear layers that are merged per input (embeddings, norms, head); `prepass_layers` and
    `prepass_weights` define the static pre-pass the first router reads.
    """

    model_type = "moe_merge"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    num_experts: int = 2
    expert_names: list[str] | None = None
    method: str = "smear"
    level: str = "ffn"
    delta_forms: dict[str, str] = field(default_factory=dict)
    delta_ranks: dict[str, int] = field(default_factory=dict)
    lowrank_offset: float | None = None
    router_kind: str = "linear"
    router_hidden_size: int | None = None
    router_granularity: str = "sequence"
    router_normalize: str = "softmax"
    router_top_k: int = 1
    router_temperature: float = 1.0
    routed_parts: list[str] = field(default_factory=list)
    prepass_layers: int = 0
    prepass_weights: list[float] | None = None
    dense_layers: int = 0
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.method not in METHODS or self.level not in LEVELS:
            raise ModelConfigError(
                f"`method` {self.method!r} / `level` {self.level!r}: choose from {tuple(METHODS)} / {LEVELS}"
            )
        text = self.get_text_config()
        if text.model_type not in FAMILIES:
            raise ModelConfigError(family_error(text.model_type, "`text_config`"))
        if getattr(text, "use_bidirectional_attention", False):
            raise ModelConfigError(
                "`text_config.use_bidirectional_attention` is set: that is an encoder (embedding "
                "model), not a causal LM; moe-merge merges causal LMs"
            )
        if self.merging.writes_stock(self.level):
            raise ModelConfigError(
                "sparse FFN-level models are stock Mixtral/Qwen-MoE checkpoints, not moe_merge models"
            )
        problems = self.merging.problems(self.level, self.router_granularity, self.router_normalize)
        if problems:
            raise ModelConfigError(problems[0])
        self.tie_word_embeddings = bool(text.tie_word_embeddings)
        if unknown := set(self.routed_parts) - set(PARTS):
            raise ModelConfigError(f"`routed_parts` {sorted(unknown)}: choose from {PARTS}")
        if self.router_granularity == "token" and "embeddings" in self.routed_parts:
            raise ModelConfigError(
                "per-token routers cannot merge the embeddings: no token has weights before it is embedded"
            )
        if self.prepass_weights is not None and len(self.prepass_weights) != self.num_experts:
            raise ModelConfigError(
                f"`prepass_weights` has {len(self.prepass_weights)} values for {self.num_experts} experts"
            )

    @property
    def merging(self) -> Method:
        """The record of `method` (methods.py)."""
        return METHODS[self.method]

    @property
    def level_record(self) -> LevelRecord:
        """The record of `level` (methods.py): what its merge weights reach."""
        return LEVEL_RECORDS[self.level]

    @property
    def family(self) -> Family:
        """The base family's record (arch.py): its classes and where its norms sit."""
        return FAMILIES[self.get_text_config().model_type]

    @property
    def num_routers(self) -> int:
        """R: routers whose weights `merge_weights` [B, R, E] holds."""
        one = self.merging.shared_router or self.level_record.whole_models
        return 1 if one else self.get_text_config().num_hidden_layers

    def router_of_layer(self, layer: int) -> int:
        """The router (index into R) whose merge weights decoder layer `layer` uses."""
        return 0 if self.num_routers == 1 else layer

    def routes(self, part: str) -> bool:
        """Whether `part` (embeddings, norms, head) is merged per input."""
        return part in self.routed_parts

    def rank_of(self, layer: int | None, name: str) -> int | None:
        """The low-rank form's rank of projection `name` in `layer` (None for the embeddings and head)."""
        return self.delta_ranks.get(f"{layer}.{name}", self.delta_ranks.get(name))

    def static_weights(self) -> list[float]:
        """The fixed merge weights of the static model the pre-pass runs."""
        return self.prepass_weights or [1.0 / self.num_experts] * self.num_experts

    def check_merge_weights(self, weights: torch.Tensor) -> None:
        """Refuse given merge weights [..., E] that an averaging method cannot read: Σ_e w_e θ_e with Σ w = 2 is
        twice the model, not a merge of it."""
        if not self.merging.averages:
            return
        sums = weights.double().sum(-1)
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
            raise ModelConfigError(
                f"`{self.method}` averages its experts, so merge weights must sum to one; these sum to "
                f"{sorted({round(x, 4) for x in sums.flatten().tolist()})[:4]}: divide them by their sum "
                "(a task-vector method, wemoe or twin, takes any weights)"
            )


@dataclass
class MoEMergeModelOutput(BaseModelOutputWithPast):
    """The decoder's output (its cache under `CACHE`) plus the routing: merge weights [B, R, E] per sequence or
    [B, R, T, E] per token, and the router logits of the same shape (None where forced)."""

    merge_weights: torch.Tensor | None = None
    router_logits: torch.Tensor | None = None


@dataclass
class MoEMergeOutput(CausalLMOutputWithPast):
    """The causal-LM output (its cache under the installed transformers' name, `CACHE`) plus the routing."""

    merge_weights: torch.Tensor | None = None  # [B, R, E] per sequence, [B, R, T, E] per token
    router_logits: torch.Tensor | None = None  # same shape, before normalization; None where forced


def _stock(text_config, name: str):
    """The base family's own transformers class `{prefix}{name}`, e.g. LlamaDecoderLayer."""
    return FAMILIES[text_config.model_type].cls(name)


def stock_norm(text_config) -> nn.Module:
    """The family's own RMSNorm over the hidden size."""
    return _stock(text_config, "RMSNorm")(text_config.hidden_size, eps=text_config.rms_norm_eps)


def embed_scale(text_config) -> float | None:
    """What the family multiplies its embeddings by (Gemma: sqrt(hidden_size)), or None."""
    return text_config.hidden_size**0.5 if FAMILIES[text_config.model_type].scaled_embeddings else None


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma 2's final-logit soft-capping, cap · tanh(logits / cap); the logits unchanged without a cap."""
    return logits if not cap else torch.tanh(logits / cap) * cap


def stock_layer(text_config, layer_idx: int, cache_idx: int | None = None) -> nn.Module:
    """The base family's own decoder layer; `cache_idx` is where its attention keeps its KV cache."""
    layer = _stock(text_config, "DecoderLayer")(text_config, layer_idx)
    layer.self_attn.layer_idx = layer_idx if cache_idx is None else cache_idx
    return layer


def apply(module: nn.Module, x: torch.Tensor, weights: torch.Tensor | None, state: RoutingState | None = None):
    """module(x), with its merge weights where it is merged (a linear, a norm, an embedding): a stock module (a
    norm or projection the experts share) takes x alone. `state` reaches merged linears (their kept weights)."""
    if isinstance(module, MergedLinear):
        return module(x, weights, state)
    if isinstance(module, (MergedNorm, MergedEmbedding)):
        return module(x, weights)
    return module(x)


class Routing:
    """How merge weights come from router inputs, as the config says."""

    def __init__(self, config: MoEMergeConfig):
        self.granularity, self.mode = config.router_granularity, config.router_normalize
        self.temperature, self.top_k = config.router_temperature, config.router_top_k
        # WEMoE routes each token and averages the router outputs; the others route the pooled states.
        self.pool_outputs = config.merging.pools_outputs

    def route(
        self,
        router: Router,
        states: torch.Tensor,
        routing_mask: torch.Tensor | Packing | None,
        given: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(weights used, router logits or None). Per-sequence routers read the prompt at prefill only
        (`routing_mask` set); per-token routers read every step. Given weights win; the logits are still
        reported. In a packed batch (`Packing`) the requests being prefilled take their routed weights, the others
        their kept ones (`given`), all [S, E]."""
        if routing_mask is None and self.granularity == "sequence":
            return given, None
        if isinstance(routing_mask, Packing):
            logits = routing_mask.pool(router(states)) if self.pool_outputs else router(routing_mask.pool(states))
            weights = normalize(logits, self.mode, self.temperature, self.top_k)
            assert given is not None, "a packed batch gives every request's kept weights (zeros for new ones)"
            return torch.where(routing_mask.new.unsqueeze(-1), weights, given), logits
        mask = routing_mask if routing_mask is not None else torch.ones(states.shape[:2], device=states.device)
        weights, logits = self(router, states, mask)
        return (weights if given is None else given), logits

    def __call__(self, router: Router, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states [B, T, H], mask [B, T] -> (weights, logits): [B, E] per sequence or [B, T, E] per token."""
        if self.granularity == "token":
            logits = router(states)
            return normalize(logits, self.mode, self.temperature, self.top_k), logits
        if self.pool_outputs:
            logits = masked_mean(router(states), mask)
        else:
            logits = router(masked_mean(states, mask))
        return normalize(logits, self.mode, self.temperature, self.top_k), logits


class MoEMergeDecoderLayer(GradientCheckpointingLayer):
    """The base family's decoder layer with its routed projections and norms merged per input (smear, wemoe, twin).

    The layer's attention, MLP and norms are the family's own modules (arch.Family says where its norms sit:
    before attention and MLP, and after them too in Gemma 2 and 3), with the routed ones swapped for merged
    ones. With its own router (smear, wemoe) it routes on the input of the part it merges: the MLP input at ffn
    level, the attention input at block level, normalized by the static merge's gain where the norm is routed
    too. Without one (twin), or when the pre-pass already routed it, weights come from the model.
    """

    self_attn: Any  # the family's own attention and MLP modules, whatever their class
    mlp: Any

    def __init__(self, config: MoEMergeConfig, layer_idx: int, routed: bool):
        super().__init__()
        text, family = config.get_text_config(), config.family
        for name, module in stock_layer(text, layer_idx).named_children():  # attention, MLP, norms, in its order
            setattr(self, name, module)
        self.attention_norm, self.mlp_norm = family.attention_norms[0], family.mlp_norms[0]  # each part's input norm
        self.post_attention_norm, self.post_mlp_norm = family.post_attention_norm, family.post_mlp_norm
        self.level = config.level_record
        self.attn_merged: list[nn.Module] = []  # merged with this layer's weights: the attention's ...
        self.mlp_merged: list[nn.Module] = []  # ... and the MLP's, with their norms
        for owner, names, merged in (
            (self.self_attn, ATTN_PROJS, self.attn_merged),
            (self.mlp, MLP_PROJS, self.mlp_merged),
        ):
            for name in names:
                if name in config.delta_forms:
                    old = getattr(owner, name)
                    new = merged_linear(
                        old.in_features,
                        old.out_features,
                        config.num_experts,
                        config.delta_forms[name],
                        config.rank_of(layer_idx, name),
                        bias=old.bias is not None,
                        offset=config.lowrank_offset or 0.0,
                    )
                    setattr(owner, name, new)
                    merged.append(new)
        for path in family.layer_norms(self.level.norms) if config.routes("norms") else ():
            owner_name, _, name = path.rpartition(".")
            owner = self.get_submodule(owner_name) if owner_name else self
            own: Any = getattr(owner, name, None)  # the family's own norm, if this layer has one there
            if own is not None:
                norm = MergedNorm(
                    own.weight.shape[0],
                    config.num_experts,
                    config.merging.part_form,
                    own.variance_epsilon if hasattr(own, "variance_epsilon") else own.eps,
                    unit_offset=family.unit_offset_norms,
                )
                setattr(owner, name, norm)
                (self.mlp_merged if path in family.mlp_norms else self.attn_merged).append(new)
        self.router = (
            Router(text.hidden_size, config.num_experts, config.router_kind, config.router_hidden_size)
            if routed
            else None
        )
        self.routing = Routing(config)
        self.static_weights = config.static_weights()
        self._rope, self._eager = family.fn("apply_rotary_pos_emb"), family.fn("eager_attention_forward")

    def _norm(self, path: str | None, x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        """Norm `path` (a name in the layer) applied to x; x itself for a family without it."""
        return x if path is None else apply(getattr(self, path), x, w)

    def _route(self, hidden_states, norm: str, routing_mask, given):
        """Route on norm(hidden_states); a routed norm takes the static merge's gain, as its weights are not known yet."""
        if self.router is None or (routing_mask is None and self.routing.granularity == "sequence"):
            return given, None
        static = torch.tensor(self.static_weights, device=hidden_states.device).expand(hidden_states.shape[0], -1)
        return self.routing.route(self.router, self._norm(norm, hidden_states, static), routing_mask, given)

    def attention(self, x, w, state, position_embeddings, attention_mask, cache=None, **kwargs) -> torch.Tensor:
        """The family's attention (as its own module computes it: q/k norms where it has them, RoPE, the cache,
        the configured attention function, Gemma 2's soft-capping) with its projections and norms merged by w."""
        attn = self.self_attn
        shape = (*x.shape[:-1], -1, attn.head_dim)
        q, k, v = (apply(getattr(attn, name), x, w, state).view(shape) for name in ("q_proj", "k_proj", "v_proj"))
        if hasattr(attn, "q_norm"):  # over head_dim, before the heads move: [B, T, heads, head_dim]
            q, k = apply(attn.q_norm, q, w), apply(attn.k_norm, k, w)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = self._rope(q, k, *position_embeddings)
        if cache is not None and CACHE == "cache":
            k, v = cache.update(k, v, attn.layer_idx, kwargs=kwargs)
        elif isinstance(cache, PagedAttentionCache):  # 5.23: the paged attention function updates it, as `cache`
            kwargs["cache"] = cache
        elif cache is not None:
            k, v = cache.update(k, v, attn.layer_idx)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, self._eager)
        extra = {
            name: getattr(attn, key)
            for name, key in (("sliding_window", "sliding_window"), ("softcap", "attn_logit_softcapping"))
            if hasattr(attn, key)
        }
        out, _ = interface(
            attn,
            q,
            k,
            v,
            attention_mask,
            dropout=attn.attention_dropout if self.training else 0.0,
            scaling=attn.scaling,
            **extra,
            **kwargs,
        )
        return apply(attn.o_proj, out.reshape(*x.shape[:-1], -1).contiguous(), w, state)

    def feed_forward(self, x, w, state) -> torch.Tensor:
        """The family's gated MLP, down(act(gate(x)) · up(x)), its projections merged by w."""
        mlp = self.mlp
        return apply(
            mlp.down_proj, mlp.act_fn(apply(mlp.gate_proj, x, w, state)) * apply(mlp.up_proj, x, w, state), w, state
        )

    def forward(
        self,
        hidden_states,
        merge_weights=None,
        routing_mask=None,
        attention_mask=None,
        position_ids=None,
        position_embeddings=None,
        state: RoutingState | None = None,
        packing: Packing | None = None,
        **kwargs,
    ):
        """merge_weights: this layer's [B, E] (or [B, T, E]) if already known; routing_mask: [B, T] when its router
        is to read the prompt, else None; state: the generation's kept weights (routing_state.py); packing: a
        packed batch's requests, whose weights are [S, E]; the cache comes in `kwargs` under its `CACHE` name.
        Returns (hidden_states, weights used, router logits or None)."""
        cache = kwargs.pop(CACHE, None)
        residual = hidden_states
        logits = None
        if self.level.routes_attention:  # block level: the router reads the block's input
            merge_weights, logits = self._route(hidden_states, self.attention_norm, routing_mask, merge_weights)
        w = merge_weights if packing is None else packing.spread(merge_weights)
        x = self._norm(self.attention_norm, hidden_states, w)
        x = self.attention(x, w, state, position_embeddings, attention_mask, cache, position_ids=position_ids, **kwargs)
        hidden_states = residual + self._norm(self.post_attention_norm, x, w)
        residual = hidden_states
        if not self.level.routes_attention:  # ffn level: the router reads the MLP's input
            merge_weights, logits = self._route(hidden_states, self.mlp_norm, routing_mask, merge_weights)
            w = merge_weights if packing is None else packing.spread(merge_weights)
        x = self.feed_forward(self._norm(self.mlp_norm, hidden_states, w), w, state)
        return residual + self._norm(self.post_mlp_norm, x, w), merge_weights, logits


class MoEMergeSparseBlock(GradientCheckpointingLayer):
    """`sparse` at block level: every expert's whole decoder layer, mixed by top-k weights.

    Each expert layer keeps its own KV cache, so every expert runs on every sequence: a sequence's
    cache then matches whatever weights it was routed with.
    """

    def __init__(self, config: MoEMergeConfig, layer_idx: int):
        super().__init__()
        text = config.get_text_config()
        L = text.num_hidden_layers
        self.experts = nn.ModuleList(stock_layer(text, layer_idx, layer_idx + e * L) for e in range(config.num_experts))
        self.router = Router(text.hidden_size, config.num_experts, config.router_kind, config.router_hidden_size)
        self.routing = Routing(config)

    def forward(self, hidden_states, merge_weights=None, routing_mask=None, **kwargs):
        merge_weights, logits = self.routing.route(self.router, hidden_states, routing_mask, merge_weights)
        w = merge_weights.unsqueeze(1) if merge_weights.dim() == 2 else merge_weights  # [B, 1 or T, E], float32
        out = sum(w[..., e : e + 1] * expert(hidden_states, **kwargs) for e, expert in enumerate(self.experts))
        return out.to(hidden_states.dtype), merge_weights, logits


class MoEMergeExpertStack(nn.Module):
    """`sparse` at model level: one expert model above the shared layers: its layers, final norm and head."""

    def __init__(self, config: MoEMergeConfig, expert: int):
        super().__init__()
        text = config.get_text_config()
        L = text.num_hidden_layers
        self.layers = nn.ModuleList(stock_layer(text, i, i + expert * L) for i in range(config.dense_layers, L))
        self.norm = stock_norm(text)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)


class MoEMergePreTrainedModel(PreTrainedModel):
    config_class = MoEMergeConfig
    config: MoEMergeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = [
        "MoEMergeDecoderLayer",
        "MoEMergeSparseBlock",
        "MoEMergeExpertStack",
        *(f"{family.prefix}DecoderLayer" for family in FAMILIES.values()),
    ]
    _keep_in_fp32_modules_strict = ["router."]  # see routers/router.py: bf16 rounding would move the routing
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    @torch.no_grad()
    def _init_weights(self, module):
        """Random weights for `from_config`, and the buffers no checkpoint holds (RoPE tables, Gemma's embedding
        scale); loading and building overwrite every weight."""
        std = self.config.get_text_config().initializer_range
        unit_offset = self.config.family.unit_offset_norms  # Gemma's gains are 1 + w: w = 0 is the identity
        if isinstance(module, MergedLinear):
            for name, p in module.named_parameters(recurse=False):
                init.normal_(p, 0.0, std) if name in ("weight", "expert_weight", "lora_A") else init.zeros_(p)
        elif isinstance(module, MergedNorm):
            for name, p in module.named_parameters(recurse=False):
                init.zeros_(p) if name == "delta_weight" or unit_offset else init.ones_(p)
        elif isinstance(module, Router):
            for p in module.parameters(recurse=False):
                init.zeros_(p)
            init.zeros_(module.input_center)
            init.ones_(module.input_scale)
        elif "RotaryEmbedding" in type(module).__name__ and not hasattr(module, "original_inv_freq"):
            fresh = type(module)(module.config)  # a RoPE per layer type (Gemma 3): its tables from its config
            for name, buffer in fresh.named_buffers():
                init.copy_(module.get_buffer(name), buffer)
        elif "RMSNorm" in type(module).__name__ and unit_offset:
            init.zeros_(module.weight)
        else:
            super()._init_weights(module)
            if hasattr(module, "scalar_embed_scale"):  # Gemma's scaled embedding: a buffer no checkpoint holds
                init.constant_(module.embed_scale, module.scalar_embed_scale)


def merged_table(config: MoEMergeConfig, name: str) -> MergedLinear:
    """The experts' embedding tables or heads (`name`: embed_tokens | lm_head) as a merged linear H -> V."""
    text = config.get_text_config()
    return merged_linear(
        text.hidden_size, text.vocab_size, config.num_experts, config.delta_forms[name], config.rank_of(None, name)
    )


class MoEMergeModel(MoEMergePreTrainedModel):
    def __init__(self, config: MoEMergeConfig):
        super().__init__(config)
        text = config.get_text_config()
        if text._attn_implementation is None:  # as the family's own model would choose (Gemma 2: eager, for softcap)
            attn = config._attn_implementation or "sdpa"
            text._attn_implementation = (
                attn if attn != "sdpa" or config.family.cls("PreTrainedModel")._supports_sdpa else "eager"
            )
        L = text.num_hidden_layers
        if not 0 <= config.prepass_layers < L:
            raise ValueError(f"`prepass_layers` is {config.prepass_layers}; it must be in [0, {L})")
        scale = embed_scale(text)
        self.embed_tokens: nn.Module
        if config.routes("embeddings"):
            self.embed_tokens = MergedEmbedding(merged_table(config, "embed_tokens"), scale)
        elif scale is not None:
            self.embed_tokens = _stock(text, "TextScaledWordEmbedding")(
                text.vocab_size, text.hidden_size, text.pad_token_id, embed_scale=scale
            )
        else:
            self.embed_tokens = nn.Embedding(text.vocab_size, text.hidden_size, text.pad_token_id)
        self.rotary_emb = _stock(text, "RotaryEmbedding")(config=text)
        self.router = None  # the model's own router: the shared one (twin), or the one above the dense layers
        method = config.merging
        if config.level_record.whole_models:
            if not 0 <= config.dense_layers < L:
                raise ValueError(f"`dense_layers` is {config.dense_layers}; it must be in [0, {L})")
            self.layers = nn.ModuleList(stock_layer(text, i) for i in range(config.dense_layers))
            self.router = Router(text.hidden_size, config.num_experts, config.router_kind, config.router_hidden_size)
            self.experts = nn.ModuleList(MoEMergeExpertStack(config, e) for e in range(config.num_experts))
        elif method.mixes_outputs:
            self.layers = nn.ModuleList(MoEMergeSparseBlock(config, i) for i in range(L))
        elif method.shared_router:
            self.layers = nn.ModuleList(MoEMergeDecoderLayer(config, i, routed=False) for i in range(L))
            self.router = Router(text.hidden_size, config.num_experts, config.router_kind, config.router_hidden_size)
        else:
            self.layers = nn.ModuleList(MoEMergeDecoderLayer(config, i, routed=True) for i in range(L))
        if not config.level_record.whole_models:
            self.norm: nn.Module
            if config.routes("norms"):
                self.norm = MergedNorm(
                    text.hidden_size,
                    config.num_experts,
                    method.part_form,
                    text.rms_norm_eps,
                    unit_offset=config.family.unit_offset_norms,
                )
            else:
                self.norm = stock_norm(text)
        self.routing = Routing(config)
        self.gradient_checkpointing = False
        self.num_slots = 0  # merged linears that may keep per-sequence weights in a RoutingState, numbered
        for layer in self.layers:
            for module in layer.modules():
                if isinstance(module, MergedLinear):
                    module.slot, self.num_slots = self.num_slots, self.num_slots + 1
        self.post_init()

    @property
    def first_router(self) -> Router:
        """The router the pre-pass feeds: the model's own, else layer 0's."""
        return self.router if self.router is not None else self.layers[0].router

    @property
    def compute_device(self) -> torch.device:
        """Where the model computes: its RoPE tables' device (with device_map, its blocks may sit elsewhere)."""
        return next(self.rotary_emb.buffers()).device

    def _rope(self, h: torch.Tensor, position_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) for each layer type: the same for every type, or a RoPE per type (Gemma 3)."""
        types = set(self._layer_types())
        if self.config.family.rope_per_layer_type:
            return {t: self.rotary_emb(h, position_ids, t) for t in types}
        cos_sin = self.rotary_emb(h, position_ids)
        return dict.fromkeys(types, cos_sin)

    # ------------------------------------------------------------------------------------ helpers

    def _layer_types(self) -> list[str]:
        text = self.config.get_text_config()
        types = getattr(text, "layer_types", None)
        if types is None:
            kind = "sliding_attention" if getattr(text, "sliding_window", None) else "full_attention"
            types = [kind] * text.num_hidden_layers
        return list(types)

    def _ensure_cache_layers(self, cache: Cache) -> None:
        """Sparse block and model levels keep one KV cache per expert layer (E x the base's layers), which
        generation's cache, built from the base config, lacks: a DynamicCache gets the missing layers here; a
        cache of fixed size (StaticCache and its kin) is refused for them. Parameter-merging models take any cache."""
        if not self.config.merging.mixes_outputs:
            return
        if not isinstance(cache, DynamicCache):
            raise ValueError(
                f"`sparse` at {self.config.level} level keeps a KV cache per expert layer, which a "
                f"{type(cache).__name__} cannot hold: pass a DynamicCache or none (in `generate`, leave "
                "`cache_implementation` unset)"
            )
        text = self.config.get_text_config()
        types = self._layer_types()
        needed = text.num_hidden_layers * self.config.num_experts
        attention = [layer for layer in cache.layers if not isinstance(layer, RoutingState)]
        for at in range(len(attention), needed):  # before the routing layer, which stays last
            kind = types[at % len(types)]
            cache.layers.insert(
                at,
                DynamicSlidingWindowLayer(sliding_window=text.sliding_window)
                if kind == "sliding_attention"
                else DynamicLayer(),
            )

    def _masks(self, inputs_embeds, attention_mask, cache, position_ids) -> dict:
        if isinstance(attention_mask, dict):  # continuous batching's masks, made per layer type
            return attention_mask
        kwargs = dict(
            config=self.config.get_text_config(),
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE: cache},
        )
        masks = {"full_attention": create_causal_mask(**kwargs)}
        if "sliding_attention" in self._layer_types():
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
        return masks

    def given_weights(self, merge_weights: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        """[E] | [B, E] | [B, R, E] -> [B, R, E], in float32 or wider (merge weights never round to bf16)."""
        if merge_weights is None:
            return None
        R, E = self.config.num_routers, self.config.num_experts
        w = torch.as_tensor(merge_weights, device=self.compute_device)
        w = w.to(torch.promote_types(w.dtype, torch.float32)) if w.is_floating_point() else w.float()
        if w.shape[-1] != E:
            raise ValueError(f"`merge_weights` has {w.shape[-1]} experts in its last dimension; this model has {E}")
        if w.dim() == 1:
            w = w.expand(batch, E)
        if w.dim() == 2:
            w = w.unsqueeze(1).expand(-1, R, -1)
        if w.dim() != 3 or w.shape[:2] != (batch, R):
            raise ValueError(
                f"`merge_weights` must be [E], [B, E] or [B, R, E] = [{batch}, {R}, {E}]; got {tuple(merge_weights.shape)}"
            )
        return w

    def _positions(self, inputs_embeds, attention_mask, position_ids, past: int) -> torch.Tensor:
        if position_ids is not None:
            return position_ids
        T = inputs_embeds.shape[1]
        if attention_mask is not None:  # left padding: count real tokens, as if each sequence ran alone
            return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        return (torch.arange(T, device=inputs_embeds.device) + past).unsqueeze(0)

    def _routing_mask(self, routing_mask, attention_mask, inputs_embeds, prefill: bool) -> torch.Tensor | None:
        """The tokens the routers read: at prefill the given mask, else the attention mask, else every token;
        afterwards none (per-sequence weights are fixed and per-token routers read each new token)."""
        B, T, _ = inputs_embeds.shape
        if not prefill:
            return None
        if routing_mask is not None:
            return routing_mask
        if attention_mask is not None:
            return attention_mask[:, -T:]
        return torch.ones(B, T, device=inputs_embeds.device)

    def _check_given(self, given: torch.Tensor | None, prefill: bool) -> None:
        if prefill and given is not None:
            self.config.check_merge_weights(given)
        if self.config.router_granularity == "sequence" and not prefill and given is None:
            raise ValueError(
                "this model routes once per sequence, at prefill, and keeps the weights in the KV cache the prefill "
                "filled; pass that cache, or the prefill's `outputs.merge_weights` as `merge_weights=`, at every "
                "decode step (`generate` does this)"
            )

    # ------------------------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        use_cache=None,
        merge_weights=None,
        routing_mask=None,
        output_hidden_states=None,
        past_key_values=None,
        **kwargs,
    ) -> MoEMergeModelOutput:
        """`last_hidden_state` is [B, T, H], or at model level each expert model's [E, B, T, H]. `routing_mask`
        [B, T] marks the tokens the routers read at prefill (default: the attention mask); training passes the
        prompt's tokens so that routing sees what `generate` will see. Given `inputs_embeds` are used as they
        are, merged embeddings or not. The KV cache is `cache` (transformers >= 5.24) or `past_key_values` (5.23).
        A packed batch (continuous batching: `cu_seq_lens_q` and a paged cache) routes each request on its own
        prompt and returns per-token weights [1, R, T, E]."""
        cache = past_key_values if cache is None else cache
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        use_cache = getattr(self.config.get_text_config(), "use_cache", True) if use_cache is None else use_cache
        packing = self._packing(cache, position_ids, kwargs)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config.get_text_config())
        if cache is not None and packing is None:
            self._ensure_cache_layers(cache)
        past = cache.get_seq_length() if cache is not None and packing is None else 0
        prefill = self._is_prefill(cache, past) if packing is None else packing.routes
        # Per-sequence weights are decided at prefill, from the pre-pass, before anything is embedded; afterwards
        # they are given. At prefill the routers run also when weights are forced: their logits are reported.
        prepass = prefill and self.config.router_granularity == "sequence"
        batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        given = self.given_weights(merge_weights, batch) if packing is None else packing.known
        state = self._routing_state(cache, prefill) if packing is None else None
        if state is not None and not prefill and given is None:
            given = state.weights
        keep = state if state is not None and (prefill or given is state.weights) else None  # its kept weights hold
        routes = Routes(given, self.config.num_routers)
        if packing is None:
            self._check_given(routes.given, prefill)
        static = torch.tensor(self.config.static_weights(), device=self.compute_device).expand(batch, -1)
        spread = (lambda w: w) if packing is None else packing.spread  # per-request weights -> what modules take
        h = (
            inputs_embeds
            if inputs_embeds is not None
            else self._embed(input_ids, static if prepass else spread(routes.weights(0)))
        )
        position_ids = self._positions(h, attention_mask, position_ids, past)
        routing_mask = self._routing_mask(routing_mask, attention_mask, h, prefill) if packing is None else packing
        types = self._layer_types()
        by_type = self._by_type(h, attention_mask, cache, position_ids)
        common = dict(position_ids=position_ids, **{CACHE: cache})
        if prepass:
            routes.set(
                0,
                *(
                    self._prepass(h, static, routing_mask, attention_mask, position_ids, kwargs, routes.weights(0))
                    if packing is None
                    else self._prepass_packed(input_ids, packing, kwargs)
                ),
            )
            if inputs_embeds is None and self.config.routes("embeddings"):
                h = self._embed(input_ids, spread(routes.weights(0)))
        hidden = [h] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if isinstance(layer, (MoEMergeDecoderLayer, MoEMergeSparseBlock)):
                k = self.config.router_of_layer(i)
                routes_here = layer.router is not None and not routes.has(k)
                extra = {"state": keep, "packing": packing} if isinstance(layer, MoEMergeDecoderLayer) else {}
                h, w, logits = layer(
                    h,
                    merge_weights=routes.weights(k),
                    routing_mask=routing_mask if routes_here else None,
                    **by_type[types[i]],
                    **extra,
                    **common,
                    **kwargs,
                )
                if routes_here:
                    routes.set(k, w, logits)
            else:
                h = layer(h, **by_type[types[i]], **common, **kwargs)
            if hidden is not None:
                hidden.append(h)
        if self.config.level_record.whole_models:
            last = self._expert_models(h, by_type, common, kwargs)
        else:
            last = apply(self.norm, h, spread(routes.weights(-1)))
        weights = routes.stacked("used")
        if state is not None and prefill:
            state.weights, state.forming = weights, False
        if packing is not None:
            assert weights is not None, "a packed batch's requests always have merge weights"
            if packing.routes:
                packing.keep(weights)
            weights = weights[packing.segment].transpose(0, 1).unsqueeze(0)  # [1, R, T, E]
        return MoEMergeModelOutput(
            last_hidden_state=last,
            hidden_states=tuple(hidden) if hidden else None,
            merge_weights=weights,
            router_logits=routes.stacked("logits"),
            **{CACHE: cache},
        )

    def _is_prefill(self, cache, past: int | torch.Tensor) -> bool:
        """Whether this forward starts a sequence (routes it). A static cache counts its tokens in a tensor (so
        that compiled steps need no host sync); there the routing layer says whether a prefill already ran."""
        if not isinstance(past, torch.Tensor):
            return past == 0
        state = RoutingState.of(cache, self.num_slots, create=False)
        if state is not None:
            return state.weights is None
        if self.config.router_granularity == "sequence" and not torch.is_grad_enabled():
            return True  # a prefill makes the routing layer: none yet, none ran
        return bool(past == 0)  # per-token routers or training keep no routing layer: one host sync

    def _packing(self, cache, position_ids, kwargs) -> Packing | None:
        """A continuous batch's requests (serving.py), where the batch is packed and routing is per sequence."""
        if kwargs.get("cu_seq_lens_q") is None or self.config.router_granularity != "sequence":
            return None
        return packing_of(
            cache, kwargs["cu_seq_lens_q"], position_ids, self.config.num_routers, self.config.num_experts
        )

    def _prepass_packed(self, input_ids, packing: Packing, kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first router's weights [S, E] in a packed batch: the requests being prefilled read their prompts,
        each as alone (the pre-pass runs them as a left-padded batch of their own); the others keep theirs."""
        new = packing.new.nonzero().flatten().tolist()
        prompts = [input_ids[0, a:b] for a, b in (packing.bounds[s] for s in new)]
        T = max(len(p) for p in prompts)
        ids = input_ids.new_zeros(len(prompts), T)
        mask = torch.zeros(len(prompts), T, dtype=torch.long, device=input_ids.device)
        for row, p in enumerate(prompts):
            ids[row, T - len(p) :], mask[row, T - len(p) :] = p, 1
        static = torch.tensor(self.config.static_weights(), device=self.compute_device).expand(len(prompts), -1)
        h = self._embed(ids, static)
        rest = {k: v for k, v in kwargs.items() if k not in PACKED_KWARGS}
        weights, _ = self._prepass(h, static, mask, mask, self._positions(h, mask, None, 0), rest, None)
        routed = packing.known[:, 0].clone()
        routed[packing.new] = weights.to(routed.dtype)
        return routed, None

    def _routing_state(self, cache, prefill: bool) -> RoutingState | None:
        """The generation's routing layer in its KV cache (routing_state.py), started anew at prefill. None without a
        cache, with gradients (training keeps nothing between calls) and for per-token routers (nothing to keep)."""
        if cache is None or torch.is_grad_enabled() or self.config.router_granularity != "sequence":
            return None
        state = RoutingState.of(cache, self.num_slots, create=prefill)
        if state is not None and prefill:
            state.start()
        return state

    def _embed(self, input_ids: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        return apply(self.embed_tokens, input_ids, weights)

    def _by_type(self, h, attention_mask, cache, position_ids) -> dict[str, dict]:
        """Each layer type's (sliding-window or full attention) mask and RoPE."""
        rope, masks = self._rope(h, position_ids), self._masks(h, attention_mask, cache, position_ids)
        return {t: dict(attention_mask=masks[t], position_embeddings=rope[t]) for t in set(self._layer_types())}

    def _prepass(self, h, static, routing_mask, attention_mask, position_ids, kwargs, given):
        """The first router's (weights, logits) from the prompt's states entering layer `prepass_layers` of the
        static merge, h being its embeddings. No cache (its masks are its own): it runs once, at prefill, and
        decode never sees it."""
        types, dense = self._layer_types(), self.config.dense_layers
        by_type = self._by_type(h, attention_mask, None, position_ids) if self.config.prepass_layers else {}
        common = {"position_ids": position_ids, CACHE: None}
        for i in range(self.config.prepass_layers):
            here = {**by_type[types[i]], **common, **kwargs}
            if self.config.level_record.whole_models and i >= dense:  # the expert models' layers, their outputs mixed
                h = sum(
                    static[:, e, None, None] * expert.layers[i - dense](h, **here)
                    for e, expert in enumerate(self.experts)
                ).to(h.dtype)
            elif isinstance(self.layers[i], (MoEMergeDecoderLayer, MoEMergeSparseBlock)):
                h = self.layers[i](h, merge_weights=static, **here)[0]
            else:
                h = self.layers[i](h, **here)
        return self.routing.route(self.first_router, h, routing_mask, given)

    def _expert_models(self, h, by_type, common, kwargs) -> torch.Tensor:
        """Model level: each expert model's layers and final norm above the dense layers, [E, B, T, H]."""
        types, outs = self._layer_types(), []
        for expert in self.experts:
            assert isinstance(expert, MoEMergeExpertStack)
            x = h
            for j, layer in enumerate(expert.layers):
                x = layer(x, **by_type[types[self.config.dense_layers + j]], **common, **kwargs)
            outs.append(expert.norm(x))
        return torch.stack([o.to(h.device) for o in outs])  # experts may sit on other devices


# what continuous batching passes besides the model's own arguments: the packed batch and its paged cache's indices
PACKED_KWARGS = (
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
    "read_index",
    "write_index",
    "block_table",
    "logits_indices",
    "logits_processor_args",
    "is_causal",
)


class Routes:
    """The merge weights given for one forward pass and those its R routers used, by router."""

    def __init__(self, given: torch.Tensor | None, num_routers: int):
        self.given = given  # [B, R, E] or None
        self.used: list[torch.Tensor | None] = [None] * num_routers
        self.logits: list[torch.Tensor | None] = [None] * num_routers

    def has(self, router: int) -> bool:
        """Whether `router` already ran in this pass."""
        return self.used[router] is not None

    def weights(self, router: int) -> torch.Tensor | None:
        """What a part reading `router` merges with: the router's if it already ran, else the given weights."""
        if self.used[router] is not None:
            return self.used[router]
        return None if self.given is None else self.given[:, router]

    def set(self, router: int, weights: torch.Tensor | None, logits: torch.Tensor | None) -> None:
        self.used[router], self.logits[router] = weights, logits

    def stacked(self, which: str) -> torch.Tensor | None:
        """[B, R, E] (or [B, R, T, E]) on one device (with device_map, layers sit on several); None if any is."""
        if which == "used" and self.given is not None and all(x is None for x in self.used):
            return self.given
        xs = [self.weights(k) for k in range(len(self.used))] if which == "used" else self.logits
        present = [x for x in xs if x is not None]
        return torch.stack([x.to(present[0].device) for x in present], 1) if len(present) == len(xs) else None


class MoEMergeForCausalLM(MoEMergePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MoEMergeConfig):
        super().__init__(config)
        self.model = MoEMergeModel(config)
        text = config.get_text_config()
        if (
            config.level_record.whole_models
        ):  # no shared head: each expert's head is its own (its tied embedding, if tied)
            self._tied_weights_keys = {}
        elif config.routes("head"):  # a tied head is the embeddings' very table: merged with the same weights
            self.lm_head = merged_table(config, "lm_head" if "lm_head" in config.delta_forms else "embed_tokens")
            self._tied_weights_keys = {"lm_head": "model.embed_tokens.table"}
        else:
            self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.vocab_size = text.vocab_size
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def routers(self) -> list[Router]:
        """The routers in the order of `merge_weights`' R dimension."""
        inner = self.model
        return [inner.router] if inner.router is not None else [layer.router for layer in inner.layers]

    def get_output_embeddings(self):
        return None if self.config.level_record.whole_models else self.lm_head

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        merge_weights=None,
        routing_mask=None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states=None,
        past_key_values=None,
        **kwargs,
    ) -> MoEMergeOutput:
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=past_key_values if cache is None else cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            merge_weights=merge_weights,
            routing_mask=routing_mask,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        weights = out.merge_weights
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        # contiguous: torch multiplies a strided [B, 1, H] slice by a frozen weight as B copies of the weight (a
        # 262,144-row head: gigabytes per step); a contiguous one folds into one GEMM
        last = out.last_hidden_state[..., keep, :].contiguous()
        cap = getattr(self.config.get_text_config(), "final_logit_softcapping", None)  # Gemma 2
        if (
            self.config.level_record.whole_models
        ):  # each expert's output (soft-capped as it would be alone), mixed in float32
            w = weights[:, 0]  # [B, E]
            logits = sum(
                w[:, e, None, None] * softcap(expert.lm_head(last[e]), cap).to(w.device)
                for e, expert in enumerate(self.model.experts)
            ).to(last.dtype)
        elif isinstance(self.lm_head, MergedLinear):  # the last router's weights, per sequence or per token
            w = weights[:, -1] if weights.dim() == 3 else weights[:, -1, keep]
            logits = softcap(self.lm_head(last, w), cap)
        else:
            logits = softcap(self.lm_head(last), cap)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.vocab_size, **kwargs)
        return MoEMergeOutput(
            loss=loss,
            logits=logits,
            hidden_states=out.hidden_states,
            merge_weights=weights,
            router_logits=out.router_logits,
            **{CACHE: getattr(out, CACHE)},
        )

    def create_masks_for_generate(self, attention_mask=None, **kwargs):
        """`generate` turns the 2D mask into 4D ones before the forward on a compileable (static) cache; this model
        keeps the 2D mask: its routers read the prompt's tokens from it, and it makes each layer type's mask from
        the base config itself."""
        return attention_mask

    def init_continuous_batching(self, generation_config=None, continuous_batching_config=None, **kwargs):
        """transformers' continuous batching (`generate_batch`, `transformers serve --continuous-batching`), each
        request routed on its own prompt and merged with its own weights (serving.py)."""
        return continuous_batching(
            self, super().init_continuous_batching, generation_config, continuous_batching_config, **kwargs
        )

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beams and `num_return_sequences` repeat every tensor along dim 0; a given `merge_weights` of [E] or
        [B, E] has no batch dim to repeat along, so it becomes [B, R, E] first."""
        if model_kwargs.get("merge_weights") is not None:
            batch = (
                input_ids.shape[0]
                if input_ids is not None and input_ids.numel()
                else model_kwargs["inputs_embeds"].shape[0]
            )
            model_kwargs["merge_weights"] = self.model.given_weights(model_kwargs["merge_weights"], batch)
        return super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        """Without a KV cache (`use_cache=False`) nothing keeps the weights decided at prefill: pass them on, so
        that every later full forward merges with them instead of routing anew on the text so far."""
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        if getattr(outputs, CACHE) is None and outputs.merge_weights is not None and outputs.merge_weights.dim() == 3:
            model_kwargs["merge_weights"] = outputs.merge_weights
        return model_kwargs


AutoConfig.register("moe_merge", MoEMergeConfig, exist_ok=True)
AutoModelForCausalLM.register(MoEMergeConfig, MoEMergeForCausalLM, exist_ok=True)
register(MoEMergeForCausalLM)
