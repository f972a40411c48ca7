"""The recipe: which experts, how to route them, how to build the rest of the model.

A mergekit-moe YAML is a valid recipe as it is; our keys extend it. Vocabulary used everywhere:

- **base**: the pretrained checkpoint every expert was fine-tuned from (`base_model`).
- **expert**: one fine-tune of the base, full or a PEFT LoRA adapter (`experts[].source_model`).
- **delta / task vector**: expert minus base, per tensor.
- **router**: maps a hidden state to merge weights; HF calls it `gate` in checkpoint keys.
- **merge weights**: the router's output, `[..., num_experts]`; after top-k they sum to 1.
- **level**: where experts are swapped in (`ffn` here; `block` and `model` need the dynamic runtime).
- **method**: `sparse` (Mixtral top-k output mixing) here; `smear | wemoe | twin` need the dynamic runtime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moe_merge.errors import ConfigError

GateInit = Literal["hidden", "fit", "hidden_last", "cheap_embed", "random", "uniform"]
PROMPT_INITS = ("hidden", "fit", "hidden_last", "cheap_embed")  # the modes that read prompts
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
    """How router weights are initialised from prompts (training-free)."""

    init: GateInit = "hidden"
    calibrate: float | None = Field(
        0.9, gt=0.0, lt=1.0,
        description="scale each layer's router so the mean top probability on the prompts equals this; null keeps raw",
    )
    ridge: float = Field(1e-3, gt=0.0, description="`fit`: ridge strength, relative to the mean feature variance")
    random_std: float = Field(0.02, gt=0.0, description="`random`: standard deviation of the router weights")


class StaticMergeSpec(_Strict):
    """How non-expert tensors are merged when `non_expert` is not `base`."""

    scale: float | None = Field(None, description="lambda on the merged task vector; default 0.3 for task_arithmetic, else 1.0")
    density: float = Field(0.5, gt=0.0, le=1.0, description="share of each task vector kept by ties / dare")
    weights: list[float] | None = Field(None, description="per-expert weights; default equal")


class MergeConfig(_Strict):
    base_model: str
    experts: list[ExpertSpec] = Field(min_length=1)
    shared_experts: list[ExpertSpec] = Field([], max_length=1)
    architecture: str | None = Field(None, description="output: mixtral | qwen (Qwen2-MoE) | qwen3; default from the base")
    gate_mode: GateInit = "hidden"
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    experts_per_token: int = Field(2, ge=1)
    level: Literal["ffn", "block", "model"] = "ffn"
    method: Literal["sparse", "smear", "wemoe", "twin"] = "sparse"
    non_expert: Literal["base", "average", "task_arithmetic", "ties", "dare_linear", "dare_ties"] = "base"
    merge: StaticMergeSpec = StaticMergeSpec()
    router: RouterSpec | None = None
    seed: int = 0

    @field_validator("gate_mode", mode="before")
    @classmethod
    def _mergekit_gate_modes(cls, v: Any) -> Any:
        return GATE_MODE_ALIASES.get(v, v)

    @field_validator("shared_experts", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return [] if v is None else v

    @model_validator(mode="after")
    def _check(self) -> MergeConfig:
        if self.level != "ffn" or self.method != "sparse":
            raise ValueError(
                f"`level: {self.level}` with `method: {self.method}` needs the dynamic merging runtime, which this "
                "version does not have yet; use `level: ffn` and `method: sparse` for a stock Mixtral/Qwen-MoE"
            )
        if self.experts_per_token > len(self.experts):
            raise ValueError(
                f"`experts_per_token` is {self.experts_per_token} but there are only {len(self.experts)} experts"
            )
        if self.router and "gate_mode" in self.model_fields_set and self.router.init != self.gate_mode:
            raise ValueError(f"`gate_mode: {self.gate_mode}` and `router.init: {self.router.init}` disagree; give one")
        if self.merge.weights is not None and len(self.merge.weights) != len(self.experts):
            raise ValueError(f"`merge.weights` has {len(self.merge.weights)} entries for {len(self.experts)} experts")
        if self.gate_init in PROMPT_INITS:
            for i, e in enumerate(self.experts):
                if not e.positive_prompts:
                    raise ValueError(f"`experts[{i}].positive_prompts` is empty; gate_mode `{self.gate_init}` needs prompts")
            keys = {(tuple(e.positive_prompts), tuple(e.negative_prompts)) for e in self.experts}
            if len(self.experts) > 1 and len(keys) == 1:
                raise ValueError(
                    "every expert has the same positive and negative prompts, so their routers would be identical; "
                    "give each expert prompts of its own task"
                )
        return self

    @property
    def gate_init(self) -> str:
        return self.router.init if self.router else self.gate_mode

    @property
    def router_spec(self) -> RouterSpec:
        return self.router or RouterSpec(init=self.gate_mode)


def load_config(path: Path | str) -> MergeConfig:
    """Read and validate a recipe; errors name the field and its line in the file."""
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
        raise ConfigError(f"{path}: a recipe is a mapping with at least `base_model` and `experts`")
    try:
        return MergeConfig.model_validate(data)
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
            msg = "unknown field; check its spelling against the YAML reference in README.md"
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
