"""The merging methods and the levels, one small frozen record each, and the registries everything else reads.

A level (`LevelRecord`) says what the merge weights reach: the linear layers of each decoder layer a parameter
merge routes and the norms that go with them (ffn: the MLP's; block: every one), or whole expert models (model).

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

A method with settings of its own keeps them in a recipe section named after it (`wemoe:`, `twin:`), whose
schema is defined here beside it; its hooks read that section, never the rest of the recipe.

Adding a method is one entry here and its tests; the recipe's `method` and `level` fields, the dynamic model,
the plans, `bake` and `export-lora` all read these records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moe_merge.arch import ATTN_PROJS, MLP_PROJS
from moe_merge.merge import StaticSpec

Level = Literal["ffn", "block", "model"]
Form = Literal["full", "dense", "lowrank"]
Part = Literal["embeddings", "norms", "head"]  # what is routed beside the linear layers, where the experts differ
LEVELS: tuple[Level, ...] = get_args(Level)
FORMS: tuple[Form, ...] = get_args(Form)
PARTS: tuple[Part, ...] = get_args(Part)


@dataclass(frozen=True)
class LevelRecord:
    """One level: what its merge weights reach. The dynamic model, the plans and the exports read these records."""

    name: Level
    projections: tuple[str, ...]  # the linear layers of each decoder layer a parameter merge routes
    norms: tuple[Literal["attention", "mlp"], ...]  # which of a family's layer norms are routed with them
    whole_models: bool = False  # above `dense_layers`, every expert runs its own layers, final norm and head

    @property
    def routes_attention(self) -> bool:
        """Whether the attention is routed too, its router reading the block's input (else the MLP's input)."""
        return "attention" in self.norms


LEVEL_RECORDS: dict[str, LevelRecord] = {
    "ffn": LevelRecord("ffn", MLP_PROJS, ("mlp",)),
    "block": LevelRecord("block", ATTN_PROJS + MLP_PROJS, ("attention", "mlp")),
    "model": LevelRecord("model", (), (), whole_models=True),
}


class Settings(BaseModel):
    """A method's recipe section."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class WemoeSpec(Settings):
    """Weight-Ensembling MoE: static task arithmetic outside the MLPs, routed task vectors inside."""

    scale: float = Field(0.3, description="lambda of the static task arithmetic, and the constant routers' start")


class EnergyRank(Settings):
    """Twin's rank chosen per matrix: the smallest that holds `energy` of the exclusive part's Σ σ²."""

    energy: float = Field(gt=0.0, le=1.0)


class TwinSpec(Settings):
    """Twin-Merging: a shared static merge plus each expert's exclusive part, compressed by SVD."""

    shared: Literal["task_arithmetic", "ties"] = "task_arithmetic"
    scale: float | None = Field(
        None, description="lambda of the shared merge (default 0.3 for task_arithmetic, 1 for ties)"
    )
    density: float = Field(0.5, gt=0.0, le=1.0, description="ties: share of each task vector kept")
    rank: int | EnergyRank | None = Field(
        None,
        description="SVD rank of the exclusive parts: a number of singular vectors (capped at min(out, in)), or "
        "`{energy: 0.99}`, per matrix the smallest rank holding that share of its energy; give this or `rank_fraction`",
    )
    rank_fraction: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="SVD rank as a share of min(out, in) (1.0: full rank, exact); default 0.5 when `rank` is not given",
    )

    @field_validator("rank", mode="before")
    @classmethod
    def _whole_rank(cls, v: Any) -> Any:
        if isinstance(v, (bool, float)):  # 1.0 would read as rank 1, not as full rank
            raise ValueError(
                f"`rank: {v}` must be a whole number of singular vectors (e.g. 32); for a share of "
                f"min(out, in) write `rank_fraction: {v}` instead (1.0 is full rank, exact)"
            )
        return v

    @model_validator(mode="before")
    @classmethod
    def _one_rank(cls, data: Any) -> Any:
        if isinstance(data, dict):
            if "router_layer" in data:
                raise ValueError(
                    "`twin.router_layer` is now `router.prepass`: the layer of the shared model whose "
                    "input states the router reads, in a pass run once at prefill"
                )
            if data.get("rank") is not None and data.get("rank_fraction") is not None:
                raise ValueError(
                    "give `twin.rank` (a number of singular vectors) or `twin.rank_fraction` (a share of "
                    "min(out, in)), not both"
                )
            if data.get("rank") is None and data.get("rank_fraction") is None:
                data = {**data, "rank_fraction": 0.5}
        return data

    @field_validator("rank")
    @classmethod
    def _positive(cls, v: Any) -> Any:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"`rank: {v}` must be at least 1")
        return v

    def rank_for(self, out_features: int, in_features: int) -> int | None:
        """The SVD rank of one out x in matrix; None when it is chosen by energy, per matrix, as it is built."""
        full = min(out_features, in_features)
        if isinstance(self.rank, EnergyRank):
            return None
        if self.rank is not None:
            return min(full, self.rank)
        return max(1, round((self.rank_fraction or 0.0) * full))  # validation sets rank_fraction when rank is None

    @property
    def energy(self) -> float | None:
        return self.rank.energy if isinstance(self.rank, EnergyRank) else None


@dataclass(frozen=True)
class Method:
    """One merging method. The defaults are the common case; a subclass overrides `static`, `rank`, `energy` or
    `prepass_weights` where its recipe section (`settings`, the recipe's field named after it) decides them."""

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
    settings: type[Settings] | None = None  # the schema of its recipe section, the field named after the method

    def __post_init__(self):
        if (self.form is None) != self.mixes_outputs:
            raise ValueError(f"method {self.name!r}: a method that merges parameters names its `form`, and only it")

    def static(self, recipe: StaticSpec, non_expert: str | None, settings: Any) -> StaticSpec:
        """The static merge of what this method does not route: the experts' average. (mergekit-moe keeps the base's;
        where experts changed their attention, LoRA adapters on every linear layer say, the average keeps their
        changes and the base's drops them: on the real zoo's adapters a stock Mixtral's every-token-right oracle
        reads 88-100 % with the base's attention and 100 % with the average. Where experts only changed MLPs, the
        two are the same tensors.) `recipe` is the recipe's own: `non_expert` (else the average) with `merge:`'s
        settings."""
        return recipe

    def rank(self, settings: Any, out_features: int, in_features: int) -> int | None:
        """The SVD rank of one routed out x in projection (svd methods only); None when `energy` decides it."""
        return None

    def energy(self, settings: Any) -> float | None:
        """The share of each exclusive part's Σ σ² its rank holds, where the rank is chosen per matrix."""
        return None

    def prepass_weights(self, settings: Any, num_experts: int) -> list[float]:
        """The merge weights of the static model the routing pre-pass runs: here the experts' average. Routers that
        start constant (`router.init: random` with raw weights) start there too."""
        return [1.0 / num_experts] * num_experts

    @property
    def mixes_outputs(self) -> bool:
        """Every expert's layers run and their outputs are mixed (sparse), instead of their parameters merged."""
        return self.merges == "outputs"

    def writes_stock(self, level: str) -> bool:
        """Whether this method at `level` is a stock sparse MoE (Mixtral / Qwen-MoE) rather than a dynamic model:
        outputs mixed at the MLP only."""
        return self.mixes_outputs and level == "ffn"

    @property
    def part_form(self) -> Form:
        """The form of a routed vector (norm gain, bias) or table: full where the experts are averaged whole."""
        return "full" if self.form in (None, "full") else "dense"

    def problems(self, level: str, granularity: str, normalize: str) -> list[str]:
        """What this method cannot do at `level` with these routers, each as a sentence naming the recipe field."""
        out = []
        if level not in self.levels:
            out.append(
                f"`level: {level}` mixes whole expert models, which is `method: sparse`, not `{self.name}`"
                if LEVEL_RECORDS[level].whole_models
                else f"`method: {self.name}` does not run at `level: {level}`"
            )
        if granularity == "token" and (self.shared_router or LEVEL_RECORDS[level].whole_models):
            out.append(
                f"{self.name} at {level} level routes once per sequence; `router.granularity` must be `sequence`"
            )
        if self.averages and normalize == "none":
            out.append(
                f"`method: {self.name}` averages the experts' {self.merges}, so its merge weights must sum to "
                "one: `router.normalize` must be softmax or topk (raw weights on task vectors are `method: "
                "wemoe`)"
            )
        return out


@dataclass(frozen=True)
class Wemoe(Method):
    def static(self, recipe: StaticSpec, non_expert: str | None, settings: WemoeSpec) -> StaticSpec:
        if non_expert is not None:
            return recipe
        return StaticSpec("task_arithmetic", settings.scale, recipe.density, recipe.weights)

    def prepass_weights(self, settings: WemoeSpec, num_experts: int) -> list[float]:
        return [settings.scale] * num_experts  # task arithmetic, the start of its routers


@dataclass(frozen=True)
class Twin(Method):
    def static(self, recipe: StaticSpec, non_expert: str | None, settings: TwinSpec) -> StaticSpec:
        return StaticSpec(non_expert or settings.shared, settings.scale, settings.density, None)

    def rank(self, settings: TwinSpec, out_features: int, in_features: int) -> int | None:
        return settings.rank_for(out_features, in_features)

    def energy(self, settings: TwinSpec) -> float | None:
        return settings.energy

    def prepass_weights(self, settings: TwinSpec, num_experts: int) -> list[float]:
        return [0.0] * num_experts  # the shared model: Twin-Merging's extra forward


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "sparse",
            "top-k mixing of the experts' outputs (at ffn level a stock Mixtral / Qwen-MoE)",
            merges="outputs",
            averages=True,
            levels=LEVELS,
            default_normalize="topk",
        ),
        Method("smear", "routed averaging of the experts' parameters (SMEAR)", form="full", averages=True),
        Wemoe(
            "wemoe",
            "the base plus routed task vectors, static task arithmetic elsewhere (WEMoE)",
            form="dense",
            pools_outputs=True,
            settings=WemoeSpec,
        ),
        Twin(
            "twin",
            "a shared static merge plus routed low-rank exclusive parts (Twin-Merging)",
            form="lowrank",
            w0="static",
            svd=True,
            shared_router=True,
            settings=TwinSpec,
        ),
    )
}

# Every (method, level) that assembles a dynamic model, level by level, parameter merges before output mixing: what
# the demo, the real-model tests and benchmarks run, so that a new record reaches all of them.
DYNAMIC_PAIRS: tuple[tuple[str, Level], ...] = tuple(
    (m.name, level)
    for level in LEVELS
    for m in sorted(METHODS.values(), key=lambda m: m.mixes_outputs)
    if level in m.levels and not m.writes_stock(level)
)
