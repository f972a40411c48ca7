"""Start routers from the states the recipe's prompts produce where each router reads (prompts.py captures them),
for both paths.

Both read the same prompts, routed one-hot to their expert: `positive_prompts` and worked `examples` (more samples
of the task), and `negative_prompts` (what the expert is not). The estimators differ because the routers do:
- a stock MoE's gate is bias-free rows [E, H] on raw MLP inputs, read top-k: `gate_rows` (the `router.init` modes of
  mergekit-moe), calibrated to a mean top probability;
- a dynamic model's router standardizes its input and has a bias: `init_routers` fits a linear discriminant
  (routers/prompt_init.py) in those coordinates.
"""

from __future__ import annotations

import torch

from moe_merge.assemble.lazy import compute_device
from moe_merge.assemble.prompts import capture, encode
from moe_merge.config import PROMPT_INITS, MergeConfig
from moe_merge.errors import ConfigError
from moe_merge.routers import prompt_init
from moe_merge.routers.prompt_init import TokenSet

KINDS = ("positive_prompts", "negative_prompts", "examples")


def calibration_groups(config: MergeConfig) -> list[tuple[list[str], int]]:
    """The calibration pass's groups (prompts, expert): every expert's positive prompts, then every expert's
    negative ones, then its examples (a group may be empty)."""
    return [(getattr(spec, kind) or [], e) for kind in KINDS for e, spec in enumerate(config.experts)]


def by_kind(sets: list, config: MergeConfig) -> dict[str, list]:
    """What was captured for `calibration_groups`, per kind of prompt, one entry per expert (None: it has none)."""
    E = len(config.experts)
    return {
        kind: [s if getattr(spec, kind) else None for s, spec in zip(sets[k * E : (k + 1) * E], config.experts)]
        for k, kind in enumerate(KINDS)
    }


# ----------------------------------------------------------------------------------------- stock gates


def gate_rows(
    config: MergeConfig,
    states: dict[str, list[TokenSet | None]],
    embed_means: tuple[list, list],
    hidden_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, float | None]:
    """One stock gate [E, H] as `router.init` says, from the states its prompts give (`by_kind`), calibrated
    (`router.calibrate`) on their tokens; returns it and its calibration scale (None: not calibrated)."""
    spec, num_experts = config.router_spec, len(config.experts)
    positive, negative, examples = (states[k] for k in KINDS)
    init = spec.init
    if init == "hidden":
        weight = prompt_init.hidden(positive, negative)  # type: ignore[arg-type]  # validated: every expert has prompts
    elif init == "hidden_last":
        weight = prompt_init.hidden_last(positive, negative)  # type: ignore[arg-type]
    elif init == "fit":
        weight = prompt_init.fit([_join(p, x) for p, x in zip(positive, examples)], config.ridge)
    elif init == "cheap_embed":
        weight = prompt_init.cheap_embed(*embed_means)
    elif init == "random":
        weight = prompt_init.random(num_experts, hidden_size, spec.random_std, generator)
    else:
        weight = prompt_init.uniform(num_experts, hidden_size, generator)
    tokens = [s.tokens() for s in positive + examples if s is not None]
    if config.calibration_target is not None and init in PROMPT_INITS and tokens:
        return prompt_init.calibrate(weight, torch.cat(tokens), config.calibration_target)
    return weight, None


def shared_gate(shared: TokenSet | None, positive: list[TokenSet | None], hidden_size: int) -> torch.Tensor:
    """Qwen2-MoE's sigmoid gate on the shared expert: zero (a constant 0.5) unless the shared expert has prompts,
    then their direction against the routed experts' prompts, as mergekit does."""
    if shared is None:
        return torch.zeros(1, hidden_size)
    others = torch.cat([p.prompt_means() for p in positive if p is not None])
    return prompt_init.direction_rows([shared.prompt_means()], [others])


def _join(a: TokenSet | None, b: TokenSet | None) -> TokenSet:
    """Two right-padded sets of one expert as one."""
    parts = [s for s in (a, b) if s is not None]
    if len(parts) == 1:
        return parts[0]
    width = max(s.states.shape[1] for s in parts)
    pad = torch.nn.functional.pad
    return TokenSet(
        torch.cat([pad(s.states, (0, 0, 0, width - s.states.shape[1])) for s in parts]),
        torch.cat([pad(s.mask, (0, width - s.mask.shape[1])) for s in parts]),
    )


# ----------------------------------------------------------------------------------------- dynamic routers


def init_routers(model, tokenizer, config: MergeConfig, seed: int) -> list[float | None]:
    """Start every router of a dynamic model as the recipe says; returns each router's calibration scale (None if
    none). Every router with prompts to read first standardizes its input by their spread (routers/router.py),
    whatever its start."""
    spec, rs = config.router_spec, model.routers()
    g = torch.Generator().manual_seed(seed)
    positive = negative = None
    if all(e.positive_prompts for e in config.experts):
        groups = calibration_groups(config)
        batch, device = encode(tokenizer, groups), compute_device(model)

        def run():
            model.model(
                input_ids=batch.ids.to(device),
                attention_mask=batch.mask.to(device),
                merge_weights=batch.forced(model.config.num_experts).to(device),
                use_cache=False,
            )  # the decoder: routers read it, no logits needed

        per_router = [by_kind([s.prompt_means() for s in sets], config) for sets in capture(rs, run, batch)]
        # Worked examples, where given, are more samples of the same task: they steady the discriminant.
        positive = [
            [torch.cat([p, x]) if x is not None else p for p, x in zip(k["positive_prompts"], k["examples"])]
            for k in per_router
        ]
        negative = [k["negative_prompts"] for k in per_router]
        for r, pos in zip(rs, positive):
            r.set_standardization(torch.cat(pos))
    if spec.init == "uniform":
        for r in rs:
            r.set_constant(0.0)
        return [None] * len(rs)
    if spec.init == "random":
        for r in rs:
            if config.normalize == "none":  # raw weights start where the pre-pass runs (WEMoE: task arithmetic)
                r.set_constant(config.merging.prepass_weights(config.settings, 1)[0], generator=g)
            else:
                r.set_random(spec.random_std, generator=g)
        return [None] * len(rs)
    if positive is None or negative is None:
        raise ConfigError(f"`router.init: {spec.init}` needs `positive_prompts` for every expert")
    scales = []
    for r, pos, neg in zip(rs, positive, negative):
        pos = [r.standardize(p) for p in pos]
        neg = [r.standardize(n) if n is not None else None for n in neg]
        weight, bias = prompt_init.lda(pos, neg, config.ridge)
        scale = None
        if config.calibration_target is not None and config.normalize != "none":
            weight, scale = prompt_init.calibrate(weight, torch.cat(pos), config.calibration_target, bias=bias)
            bias = bias * scale
        r.set_rows(weight, bias, generator=g)
        scales.append(scale)
    return scales
