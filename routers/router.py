"""Routers of the dynamic model: a hidden state in, merge-weight logits out, then a normalization.

Kinds (`kind`):
- `linear`: W h + b;
- `mlp`: W2 ReLU(W1 h + b1) + b2, two layers;
- `constant`: b alone, merge weights that do not depend on the input (WEMoE's depth 0, AdaMerging).

Routers keep float32 (or wider) parameters and compute their logits in float32 whatever dtype the
model is cast to or loaded in: prompt-fitted routers have weights in the hundreds, and bf16 rounding
is the size of their logit gaps.

Every router first standardizes its input, (h − center) · scale per feature, with the mean and spread
of its input over the recipe's prompts (`set_standardization`; identity until set). Pooled hidden
states share a large common part and differ between tasks by little, so a router reading them raw
needs weights in the hundreds: a router trained from zero (WEMoE's task-arithmetic start) would need
thousands of Adam steps to grow them, and a fitted one moves by as little. Standardized, the weights
that separate the tasks are of order one.

Every kind can start as a prompt-initialised linear router (`set_rows`; the MLP is set up so its
output is exactly that linear router's) or as a constant (`set_constant`; WEMoE starts its routers at
task arithmetic, b = lambda with the last weight at zero).
"""

from __future__ import annotations

import torch
from torch import nn

KINDS = ("linear", "mlp", "constant")
NORMALIZATIONS = ("softmax", "topk", "none")


class Router(nn.Module):
    input_center: torch.Tensor
    input_scale: torch.Tensor

    def __init__(self, hidden_size: int, num_experts: int, kind: str = "linear", mlp_hidden_size: int | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown router kind {kind!r}; choose one of {', '.join(KINDS)}")
        self.kind, self.num_experts = kind, num_experts
        if kind == "linear":
            self.proj = nn.Linear(hidden_size, num_experts)
        elif kind == "mlp":
            width = mlp_hidden_size or 2 * num_experts
            if width < 2 * num_experts:
                raise ValueError(f"an MLP router needs at least 2 x {num_experts} hidden units, got {width}")
            self.fc1 = nn.Linear(hidden_size, width)
            self.fc2 = nn.Linear(width, num_experts)
        else:
            self.bias = nn.Parameter(torch.zeros(num_experts))
        self.register_buffer("input_center", torch.zeros(hidden_size))
        self.register_buffer("input_scale", torch.ones(hidden_size))

    @torch.no_grad()
    def set_standardization(self, states: torch.Tensor) -> None:
        """Standardize inputs with the per-feature mean and spread of `states` [N, H] (the router's inputs on
        prompts). A feature that does not vary gets the typical features' scale, not an infinite one."""
        states = states.double()
        std = states.std(0) if len(states) > 1 else torch.ones_like(states[0])
        std = std.clamp(min=1e-3 * std.mean().clamp(min=1e-12))
        self.input_center.copy_(states.mean(0))
        self.input_scale.copy_(1.0 / std)

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] in the coordinates the router's weights read, float32 or wider."""
        return (x.to(self._dtype()) - self.input_center) * self.input_scale

    def _apply(self, fn, recurse=True):
        """`model.to(torch.bfloat16)` and kin move a router but never narrow it below float32."""

        def keep_wide(t):
            t = fn(t)
            return t.float() if t.is_floating_point() and t.element_size() < 4 else t

        return super()._apply(keep_wide, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> logits [..., E], in float32 (or the router's wider dtype) whatever the model dtype."""
        x = self.standardize(x)
        if self.kind == "linear":
            logits = self.proj(x)
        elif self.kind == "mlp":
            logits = self.fc2(torch.relu(self.fc1(x)))
        else:
            logits = self.bias.expand(*x.shape[:-1], self.num_experts)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @torch.no_grad()
    def set_rows(
        self, rows: torch.Tensor, bias: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> None:
        """Become the linear router h -> rows @ standardize(h) + bias. The MLP uses ReLU(z) - ReLU(-z) = z."""
        num_experts = rows.shape[0]
        bias = torch.zeros(num_experts) if bias is None else bias
        if self.kind == "linear":
            self.proj.weight.copy_(rows)
            self.proj.bias.copy_(bias)
        elif self.kind == "mlp":
            self.fc1.weight[:num_experts] = rows
            self.fc1.weight[num_experts : 2 * num_experts] = -rows
            extra = self.fc1.weight[2 * num_experts :]
            extra.copy_(torch.randn(extra.shape, generator=generator) * 0.02)
            self.fc1.bias.zero_()
            self.fc1.bias[:num_experts] = bias
            self.fc1.bias[num_experts : 2 * num_experts] = -bias
            eye = torch.eye(num_experts, dtype=rows.dtype)
            self.fc2.weight.zero_()
            self.fc2.weight[:, :num_experts] = eye
            self.fc2.weight[:, num_experts : 2 * num_experts] = -eye
            self.fc2.bias.zero_()
        else:
            raise ValueError("a `constant` router has no input weights to initialise from prompts; use init `random`")

    @torch.no_grad()
    def set_constant(self, value: float, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """Output `value` for every expert whatever the input; hidden weights random, so training can move off it."""
        if self.kind == "linear":
            self.proj.weight.zero_()
            self.proj.bias.fill_(value)
        elif self.kind == "mlp":
            self.fc1.weight.copy_(torch.randn(self.fc1.weight.shape, generator=generator) * std)
            self.fc1.bias.zero_()
            self.fc2.weight.zero_()
            self.fc2.bias.fill_(value)
        else:
            self.bias.fill_(value)

    @torch.no_grad()
    def set_random(self, std: float, generator: torch.Generator | None = None) -> None:
        for p in self.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std if p.dim() > 1 else torch.zeros_like(p))

    @torch.no_grad()
    def scale_(self, factor: float) -> None:
        """Multiply the output logits by `factor` (temperature calibration)."""
        last = {"linear": self.proj, "mlp": self.fc2}.get(self.kind)
        if last is None:
            self.bias.mul_(factor)
        else:
            last.weight.mul_(factor)
            last.bias.mul_(factor)


def normalize(logits: torch.Tensor, mode: str, temperature: float = 1.0, top_k: int = 1) -> torch.Tensor:
    """Merge weights from router logits [..., E]: softmax, top-k renormalized softmax, or raw (`none`)."""
    if mode == "softmax":
        return torch.softmax(logits / temperature, dim=-1)
    if mode == "topk":
        top, idx = torch.topk(logits / temperature, top_k, dim=-1)
        return torch.zeros_like(logits).scatter(-1, idx, torch.softmax(top, dim=-1))
    if mode == "none":
        return logits
    raise ValueError(f"unknown router normalization {mode!r}; choose one of {', '.join(NORMALIZATIONS)}")


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each sequence's real tokens, summed in float32 or wider: states [B, T, D], mask [B, T]
    (1 = real) -> [B, D]. Left or right padding changes nothing."""
    states = states.to(torch.promote_types(states.dtype, torch.float32))
    m = mask.to(device=states.device, dtype=states.dtype).unsqueeze(-1)  # layers may sit on other devices
    return (states * m).sum(1) / m.sum(1).clamp(min=1)
