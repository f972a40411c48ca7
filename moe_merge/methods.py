"""The merging methods, one small frozen record each, and the registry everything else reads.

A method says what its merge weights act on and how the rest of the model is built:
- `merges`: the experts' `parameters` (one merged linear per routed projection) or their `outputs`
  (sparse: every expert's whole layers run and their outputs are mixed);
- `form`: how a routed projection holds dense experts (full | dense | lowrank), and `w0`, the
  weight the task vectors are added to (the base, or the static merge);
- `static`: the merge of everything that is not routed;
- where its routers sit (one per layer, or one `shared_router` reading the pre-pass) and whether a
  router pools its outputs over the prompt (WEMoE) or its inputs;
- `prepass_weights`: the fixed merge weights of its static model, which the routing pre-pass runs
  (and which a router reads its layer's routed norm with before its weights are known);
- whether its merge weights must sum to one (the averaging methods).

Adding a method is one entry here and its tests; the recipe's `method` field, the dynamic model,
the plans, `bake` and `export-lora` all read these records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from moe_merge.config import MergeConfig

Level = Literal["ffn", "block", "model"]
Form = Literal["full", "dense", "lowrank"]
LEVELS: tuple[Level, ...] = ("ffn", "block", "model")
FORMS: tuple[Form, ...] = ("full", "dense", "lowrank")
PARTS = ("embeddings", "norms", "head")  # what is routed beside the linear layers, where the experts differ


@dataclass(frozen=True)
class StaticSpec:
    """A static merge of one tensor over the experts: peft merge_utils' method and its arguments."""

    method: str  # base | average | task_arithmetic | ties | dare_linear | dare_ties | mixup
    scale: float | None
    density: float
    weights: list[float] | None  # mixup: its drawn λ
    base_method: str = "average"  # mixup: how λ applies


@dataclass(frozen=True)
class Method:
    """One merging method. The defaults are the common case; a subclass overrides `static`, `rank` or
    `prepass_weights` where its recipe section decides them."""

    name: str
    summary: str
    merges: Literal["parameters", "outputs"] = "parameters"
    form: Form | None = None  # dense experts' form in a merged linear; None when outputs are mixed
    w0: Literal["base", "static"] = "base"  # what the task vectors are added to (dense and lowrank forms)
    svd: bool = False  # the low-rank parts are SVDs of expert − w0, whatever the experts are
    averages: bool = False  # Σ_e w_e θ_e with Σ w ≠ 1 is not a merge: weights must sum to one
    shared_router: bool = False  # one router, reading the pre-pass, serves every layer
    pools_outputs: bool = False  # route each token, then average the router outputs over the prompt
    levels: tuple[Level, ...] = ("ffn", "block")
    default_normalize: str = "softmax"

    def static(self, cfg: MergeConfig) -> StaticSpec:
        """The static merge of what this method does not route: the experts' average. (mergekit-moe keeps the base's;
        where experts changed their attention, LoRA adapters on every linear layer say, the average keeps their
        changes and the base's drops them: on the real zoo's adapters a stock Mixtral's every-token-right oracle
        reads 88-100 % with the base's attention and 100 % with the average. Where experts only changed MLPs, the
        two are the same tensors.)"""
        return cfg.static_spec(cfg.non_expert or "average", cfg.merge.scale, cfg.merge.density, cfg.merge.weights)

    def rank(self, cfg: MergeConfig, out_features: int, in_features: int) -> int | None:
        """The SVD rank of one routed out x in projection (svd methods only)."""
        return None

    def prepass_weights(self, cfg: MergeConfig, num_experts: int) -> list[float]:
        """The merge weights of the static model the routing pre-pass runs: here the experts' average."""
        return [1.0 / num_experts] * num_experts

    @property
    def part_form(self) -> Form:
        """The form of a routed vector (norm gain, bias) or table: full where the experts are averaged whole."""
        return "full" if self.form in (None, "full") else "dense"

    def problems(self, level: str, granularity: str, normalize: str) -> list[str]:
        """What this method cannot do at `level` with these routers, each as a sentence naming the recipe field."""
        out = []
        if level not in self.levels:
            out.append(f"`level: {level}` mixes whole expert models, which is `method: sparse`, not `{self.name}`"
                       if level == "model" else f"`method: {self.name}` does not run at `level: {level}`")
        if granularity == "token" and (self.shared_router or level == "model"):
            out.append(f"{self.name} at {level} level routes once per sequence; `router.granularity` must be `sequence`")
        if self.averages and normalize == "none":
            out.append(f"`method: {self.name}` averages the experts' {self.merges}, so its merge weights must sum to "
                       "one: `router.normalize` must be softmax or topk (raw weights on task vectors are `method: "
                       "wemoe`)")
        return out


@dataclass(frozen=True)
class Wemoe(Method):
    def static(self, cfg: MergeConfig) -> StaticSpec:
        if cfg.non_expert is not None:
            return super().static(cfg)
        return cfg.static_spec("task_arithmetic", cfg.wemoe.scale, cfg.merge.density, cfg.merge.weights)

    def prepass_weights(self, cfg: MergeConfig, num_experts: int) -> list[float]:
        return [cfg.wemoe.scale] * num_experts  # task arithmetic, the start of its routers


@dataclass(frozen=True)
class Twin(Method):
    def static(self, cfg: MergeConfig) -> StaticSpec:
        return cfg.static_spec(cfg.non_expert or cfg.twin.shared, cfg.twin.scale, cfg.twin.density, None)

    def rank(self, cfg: MergeConfig, out_features: int, in_features: int) -> int:
        return cfg.twin.rank_for(out_features, in_features)

    def prepass_weights(self, cfg: MergeConfig, num_experts: int) -> list[float]:
        return [0.0] * num_experts  # the shared model: Twin-Merging's extra forward


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("sparse", "top-k mixing of the experts' outputs (at ffn level a stock Mixtral / Qwen-MoE)",
           merges="outputs", averages=True, levels=LEVELS, default_normalize="topk"),
    Method("smear", "routed averaging of the experts' parameters (SMEAR)", form="full", averages=True),
    Wemoe("wemoe", "the base plus routed task vectors, static task arithmetic elsewhere (WEMoE)", form="dense",
          pools_outputs=True),
    Twin("twin", "a shared static merge plus routed low-rank exclusive parts (Twin-Merging)", form="lowrank",
         w0="static", svd=True, shared_router=True),
)}
METHOD_NAMES = tuple(METHODS)
