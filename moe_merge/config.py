"""The recipe: which experts, how to route them, how to build the rest of the model.

A mergekit-moe YAML is a valid recipe as it is; our keys extend it. Vocabulary used everywhere:

- **base**: the pretrained checkpoint every expert was fine-tuned from (`base_model`).
- **expert**: one fine-tune of the base, full or a PEFT LoRA adapter (`experts[].source_model`).
- **delta / task vector**: expert minus base, per tensor.
- **router**: maps a hidden state to merge weights; HF calls it `gate` in checkpoint keys.
- **merge weights**: the router's output, `[..., num_experts]`; after top-k they sum to 1.
- **level**: which parameters are per input: `ffn` (the MLP), `block` (every linear layer of a decoder
  block), `model` (whole expert models above shared first layers).
- **method**: `sparse` (top-k output mixing; at FFN level a stock Mixtral/Qwen-MoE), `smear` (routed
  parameter averaging), `wemoe` (base + routed task vectors), `twin` (shared merge + routed low-rank
  exclusive parts): the records in `methods.py`. Everything but sparse FFN is a moe_merge dynamic model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moe_merge.errors import ConfigError
from moe_merge.merge import MixupBase, StaticSpec, mixup_draws
from moe_merge.methods import LEVEL_RECORDS, METHODS, Level, LevelRecord, Method, Part, TwinSpec, WemoeSpec

RouterInit = Literal["hidden", "fit", "hidden_last", "cheap_embed", "random", "uniform"]
PROMPT_INITS = ("hidden", "fit", "hidden_last", "cheap_embed")  # the modes that read prompts
DYNAMIC_INITS = ("hidden", "random", "uniform")  # what the dynamic model's routers accept
PREPASS_DEFAULT = 1  # measured on both zoos: docs/dynamic-models.md, "The routing pre-pass"
# What `auto` router settings become, by the router: a stock sparse MoE's top-k gate (fitted by ridge regression
# under `fit`, calibrated so the mean top probability on the prompts is 0.9), or a dynamic model's router started
# from a discriminant of the prompts, whose own scale is kept (docs/dynamic-models.md measures both).
ROUTER_DEFAULTS: dict[str, dict[str, Any]] = {
    "stock": {"calibrate": 0.9, "ridge": 1e-3},
    "dynamic": {"calibrate": None, "ridge": 0.1},
}
# mergekit-moe's gate_mode spellings and what each becomes here.
GATE_MODE_ALIASES = {"hidden_avg": "hidden", "uniform_random": "uniform"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExpertSpec(_Strict):
    """One expert: a full fine-tune directory, a LoRA adapter directory, or `base+adapter`."""

    source_model: str
    name: str | None = Field(None, description="label in reports; defaults to the directory name")
    positive_prompts: list[str] = []
    negative_prompts: list[str] = []
    examples: list[str] = Field([], description="texts of this expert's task (prompt + completion), used by `fit`")
    eval_prompts: list[str] | None = Field(None, description="held-out prompts for the routing report")
    noise_scale: float | None = Field(None, description="mergekit: add N(0, noise_scale) to this expert's MLP weights")
    residual_scale: float | None = Field(None, description="mergekit: scale this expert's down_proj")

    @property
    def label(self) -> str:
        return self.name or Path(self.source_model.split("+")[-1].rstrip("/")).name


class RouterSpec(_Strict):
    """The routers: their kind, how they turn logits into merge weights, and their training-free start."""

    init: RouterInit = "hidden"
    kind: Literal["linear", "mlp", "constant"] = Field(
        "linear",
        description="dynamic models: linear, mlp (2 layers + ReLU), constant (input-independent, WEMoE depth 0)",
    )
    hidden_size: int | None = Field(None, ge=2, description="mlp routers: hidden width (default 2 x experts)")
    granularity: Literal["token", "sequence"] = Field(
        "sequence", description="dynamic models: one weight vector per sequence (from the prompt) or per token"
    )
    normalize: Literal["softmax", "topk", "none"] | None = Field(
        None,
        description="softmax | topk (renormalized) | none (raw, WEMoE-style); default topk for sparse, else softmax",
    )
    top_k: int | None = Field(None, ge=1, description="`topk`: experts kept; default `experts_per_token`")
    temperature: float = Field(1.0, gt=0.0, description="logits are divided by this before normalizing")
    calibrate: Annotated[float, Field(gt=0.0, lt=1.0)] | Literal["auto"] | None = Field(
        "auto",
        description="scale each router so the mean top probability on the prompts equals this; null keeps raw; "
        "auto: 0.9 for a stock sparse MoE's routers, null for a dynamic model's (config.ROUTER_DEFAULTS)",
    )
    ridge: Annotated[float, Field(gt=0.0)] | Literal["auto"] = Field(
        "auto",
        description="ridge strength, relative to the mean feature variance, of `fit` (stock) and of a dynamic "
        "router's discriminant; auto: 1e-3 and 0.1 (config.ROUTER_DEFAULTS)",
    )
    random_std: float = Field(0.02, gt=0.0, description="`random`: standard deviation of the router weights")
    prepass: int | None = Field(
        None,
        ge=0,
        description="dynamic models, per-sequence routing: the first router (whose weights also merge the "
        "embeddings) reads the prompt's states entering this layer of the static merge, run once at prefill "
        f"(0: its embeddings); default {PREPASS_DEFAULT}, capped at the base's layers − 1",
    )


class MixupDraw(_Strict):
    """`non_expert: mixup` (M³): one seeded draw of interpolation weights, applied through a base method. (Merge
    search keeps the best of many draws on a proxy: `moe-merge glue`.)"""

    base_method: MixupBase = "average"
    alpha: float = Field(0.5, gt=0.0, description="Beta(alpha, alpha) for two experts, Dirichlet(alpha) for more")
    seed: int = 0


class StaticMergeSpec(_Strict):
    """How non-expert tensors are merged when `non_expert` is not `base`."""

    scale: float | None = Field(
        None, description="lambda on the merged task vector; default 0.3 for task_arithmetic, else 1.0"
    )
    density: float = Field(0.5, gt=0.0, le=1.0, description="share of each task vector kept by ties / dare")
    weights: list[float] | None = Field(None, description="per-expert weights; default equal")
    mixup: MixupDraw = MixupDraw()


class MergeConfig(_Strict):
    base_model: str
    experts: list[ExpertSpec] = Field(min_length=1)
    shared_experts: list[ExpertSpec] = Field([], max_length=1)
    architecture: str | None = Field(
        None, description="output: mixtral | qwen (Qwen2-MoE) | qwen3; default from the base"
    )
    gate_mode: RouterInit = "hidden"  # mergekit-moe's name for `router.init`
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    experts_per_token: int = Field(2, ge=1)
    level: Level = "ffn"
    method: str = Field("sparse", description="a record of methods.METHODS: " + " | ".join(METHODS))
    non_expert: Literal["base", "average", "task_arithmetic", "ties", "dare_linear", "dare_ties", "mixup"] | None = (
        Field(
            None,
            description="static merge of what is not routed; default average (sparse, smear; mergekit-moe keeps the "
            "base's: `base`), task_arithmetic (wemoe); twin uses its shared merge; mixup: M³ (`merge.mixup`)",
        )
    )
    merge: StaticMergeSpec = StaticMergeSpec()
    router: RouterSpec | None = None
    wemoe: WemoeSpec = WemoeSpec()
    twin: TwinSpec = TwinSpec()
    dense_layers: int = Field(
        0, ge=0, description="model level: leading layers shared (statically merged) by all experts"
    )
    static: list[Part] | None = Field(
        None,
        description="dynamic models: parts kept as the static merge even where the experts differ (embeddings, "
        "norms, head); default none with per-sequence routing (everything that differs is routed); with per-token "
        "routing the embeddings (and a head tied to them), as no token has weights before it is embedded",
    )
    seed: int = 0

    @field_validator("gate_mode", mode="before")
    @classmethod
    def _mergekit_gate_modes(cls, v: Any) -> Any:
        return GATE_MODE_ALIASES.get(v, v) if isinstance(v, str) else v

    @field_validator("method")
    @classmethod
    def _registered(cls, v: str) -> str:
        if v not in METHODS:  # read at validation, so a method registered after import is accepted
            raise ValueError(f"`method: {v}` is not a merging method; choose one of {', '.join(METHODS)}")
        return v

    @field_validator("shared_experts", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return [] if v is None else v

    @model_validator(mode="after")
    def _check(self) -> MergeConfig:
        problems = self.merging.problems(self.level, self.router_spec.granularity, self.normalize)
        if self.dynamic and problems:
            raise ValueError(problems[0])
        self._check_routers()
        if self.experts_per_token > len(self.experts):
            raise ValueError(
                f"`experts_per_token` is {self.experts_per_token} but there are only {len(self.experts)} experts"
            )
        if self.merge.weights is not None and len(self.merge.weights) != len(self.experts):
            raise ValueError(f"`merge.weights` has {len(self.merge.weights)} entries for {len(self.experts)} experts")
        if self.router_init in PROMPT_INITS:
            self._check_prompts()
        if self.static is not None and self.router_spec.granularity == "token" and "embeddings" not in self.static:
            raise ValueError(
                "per-token routers have no merge weights before a token is embedded, so the embeddings "
                "stay static: add `embeddings` to `static` (or route per sequence)"
            )
        return self

    def _check_routers(self) -> None:
        """What the routers of a dynamic model, and those of a stock sparse MoE, can be."""
        if self.dynamic:
            if self.shared_experts:
                raise ValueError("`shared_experts` is a Qwen2-MoE feature of sparse FFN-level models only")
            for i, e in enumerate(self.experts):
                for field in ("noise_scale", "residual_scale"):
                    if getattr(e, field) is not None:
                        raise ValueError(
                            f"`experts[{i}].{field}` perturbs an expert's MLP in a stock sparse MoE (mergekit-moe); "
                            f"a dynamic model (`method: {self.method}`, `level: {self.level}`) merges the experts' "
                            "own weights: remove it"
                        )
            if self.router_init not in DYNAMIC_INITS:
                raise ValueError(
                    f"router init `{self.router_init}` is for stock sparse FFN-level routers; dynamic "
                    f"models take one of {', '.join(DYNAMIC_INITS)}"
                )
            spec = self.router_spec
            if spec.kind == "mlp" and spec.hidden_size is not None and spec.hidden_size < 2 * len(self.experts):
                raise ValueError(
                    f"`router.hidden_size: {spec.hidden_size}` is too narrow for {len(self.experts)} experts: "
                    f"an MLP router needs at least 2 x experts = {2 * len(self.experts)} hidden units"
                )
            if self.router_spec.kind == "constant" and self.router_init == "hidden":
                raise ValueError(
                    "a `constant` router ignores its input, so it cannot start from prompts; "
                    "set `router.init: random` (WEMoE: starts at task arithmetic) or `uniform`"
                )
        elif self.router and (
            self.router.kind != "linear"
            or self.router.granularity != "sequence"
            or self.router.normalize not in (None, "topk")
        ):
            raise ValueError(
                f"`method: {self.method}` at `level: {self.level}` (the defaults, where not given) writes a stock "
                "Mixtral/Qwen-MoE: its routers are linear, per token and top-k; `router.kind/granularity/normalize` "
                "apply to dynamic models (another `method` or `level`)"
            )
        if self.router and "gate_mode" in self.model_fields_set and self.router.init != self.gate_mode:
            raise ValueError(f"`gate_mode: {self.gate_mode}` and `router.init: {self.router.init}` disagree; give one")

    def _check_prompts(self) -> None:
        """Routers fitted on prompts need each expert's own."""
        for i, e in enumerate(self.experts):
            if not e.positive_prompts:
                raise ValueError(
                    f"`experts[{i}].positive_prompts` is empty; gate_mode `{self.router_init}` needs prompts"
                )
        keys = {(tuple(e.positive_prompts), tuple(e.negative_prompts)) for e in self.experts}
        if len(self.experts) > 1 and len(keys) == 1:
            raise ValueError(
                "every expert has the same positive and negative prompts, so their routers would be identical; "
                "give each expert prompts of its own task"
            )

    def resolved(self) -> dict:
        """Every field, defaults included, as written beside an output; loads back to the same recipe."""
        data = self.model_dump(mode="json")
        if self.router is not None:  # `gate_mode` is mergekit's spelling of `router.init`
            data["gate_mode"] = self.router.init
        return data

    @property
    def merging(self) -> Method:
        """The record of `method` (methods.py): what it routes, its forms, its static merge, its routers."""
        return METHODS[self.method]

    @property
    def level_record(self) -> LevelRecord:
        """The record of `level` (methods.py): what its merge weights reach."""
        return LEVEL_RECORDS[self.level]

    @property
    def dynamic(self) -> bool:
        """Whether the output is a moe_merge dynamic model rather than a stock sparse MoE."""
        return not self.merging.writes_stock(self.level)

    @property
    def settings(self) -> Any:
        """The method's own recipe section (`wemoe:`, `twin:`), None for a method without one."""
        return getattr(self, self.method) if self.merging.settings else None

    @property
    def static_merge(self) -> StaticSpec:
        """The static merge of what is not routed: the method's (methods.py), from `non_expert`, `merge:` and its
        section; `mixup` draws its λ here, from `merge.mixup`'s seed."""
        recipe = StaticSpec(self.non_expert or "average", self.merge.scale, self.merge.density, self.merge.weights)
        spec = self.merging.static(recipe, self.non_expert, self.settings)
        if spec.method != "mixup":
            return spec
        m = self.merge.mixup
        draw = mixup_draws(len(self.experts), m.alpha, 1, m.seed)[0]
        return StaticSpec("mixup", spec.scale, spec.density, draw, m.base_method)

    @property
    def static_method(self) -> str:
        """The static merge of what is not routed (`non_expert`, else the method's default)."""
        return self.static_merge.method

    @property
    def static_summary(self) -> str:
        """`static_method`, with mixup's draw: what cards, the dry run and the log show."""
        spec = self.static_merge
        if spec.method != "mixup":
            return spec.method
        m = self.merge.mixup
        lam = ", ".join(f"{x:.4f}" for x in spec.weights or ())
        return f"mixup ({m.base_method}, alpha {m.alpha}, seed {m.seed}: lambda = {lam})"

    @property
    def calibration_target(self) -> float | None:
        """`router.calibrate`, `auto` resolved (ROUTER_DEFAULTS)."""
        value = self.router_spec.calibrate
        return self._router_defaults["calibrate"] if value == "auto" else value

    @property
    def ridge(self) -> float:
        """`router.ridge`, `auto` resolved (ROUTER_DEFAULTS)."""
        value = self.router_spec.ridge
        return self._router_defaults["ridge"] if value == "auto" else value

    @property
    def _router_defaults(self) -> dict[str, Any]:
        return ROUTER_DEFAULTS["dynamic" if self.dynamic else "stock"]

    @property
    def top_k(self) -> int:
        return self.router_spec.top_k or self.experts_per_token

    @property
    def normalize(self) -> str:
        return self.router_spec.normalize or self.merging.default_normalize

    @property
    def router_init(self) -> str:
        return self.router.init if self.router else self.gate_mode

    @property
    def router_spec(self) -> RouterSpec:
        return self.router or RouterSpec(init=self.gate_mode)

    @property
    def prepass(self) -> int:
        """The layer of the static merge whose input states the first router reads (`router.prepass`)."""
        spec = self.router_spec.prepass
        return PREPASS_DEFAULT if spec is None else spec

    def static_parts(self, tied: bool) -> tuple[str, ...]:
        """The parts (embeddings, norms, head) kept static whether or not the experts differ there."""
        if self.static is not None:
            return tuple(self.static)
        if self.router_spec.granularity == "token":
            return ("embeddings", "head") if tied else ("embeddings",)
        return ()


def load_config(path: Path | str) -> MergeConfig:
    """Read and validate a recipe; errors name the field and its line in the file."""
    return load_yaml(path, MergeConfig, "a recipe is a mapping with at least `base_model` and `experts`")


def load_yaml(path: Path | str, schema: type[BaseModel], expected: str):
    """Read a YAML mapping and validate it against `schema`; errors name the field and its line in the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read recipe {path}: {e.strerror}") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {expected}")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, path, node)) from None


def _describe(error: ValidationError, path: Path, node: yaml.Node | None) -> str:
    lines = [f"invalid recipe {path}:"]
    for err in error.errors():
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        field = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[") or "(top level)"
        line = _line_of(node, loc)
        where = f" (line {line})" if line else ""
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field; check its spelling against the YAML reference in docs/recipe.md"
        lines.append(f"  `{field}`{where}: {msg}")
    return "\n".join(lines)


def _line_of(node: yaml.Node | None, loc: list) -> int | None:
    """1-based line of the deepest YAML node on the path `loc` that exists."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == key]
            if not match:
                break
            k, node = match[0]
            line = k.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line
