"""Torch references for the merged matmuls: the slow, obvious definitions every fast path is tested against.

All three rest on one identity: x·(W0 + Σ_e w_e Δ_e)ᵀ = x·W0ᵀ + Σ_e w_e (x·Δ_eᵀ). They are exact,
differentiable in x, merge_weights and the weights, and run on any device and dtype. Merge weights are
never rounded to a half-precision dtype: the weighted sum is taken in float32 (or wider) and rounded
once, at the end, to the operands' dtype, as the Triton kernels do.
"""

from __future__ import annotations

import torch


def merged_linear(
    x: torch.Tensor, merge_weights: torch.Tensor, deltas: torch.Tensor, base: torch.Tensor | None = None
) -> torch.Tensor:
    """y[m] = x[m]·(base + Σ_e merge_weights[m, e]·deltas[e])ᵀ.

    Args:
        x: `[M, K]` inputs, one row per token.
        merge_weights: `[M, E]` one row of merge weights per token.
        deltas: `[E, N, K]` task vectors, or full expert weights when `base` is None (SMEAR's Σ p_e W_e).
        base: `[N, K]` or None.
    Returns: `[M, N]`.
    """
    acc = _accumulator(x.dtype)
    per_expert = torch.matmul(x.unsqueeze(0), deltas.transpose(-1, -2))  # [E, M, N]
    y = torch.einsum("me,emn->mn", merge_weights.to(acc), per_expert.to(acc))
    return (y if base is None else y + (x @ base.T).to(acc)).to(x.dtype)


def lowrank_merged_linear(
    x: torch.Tensor, merge_weights: torch.Tensor, A: torch.Tensor, B: torch.Tensor, base: torch.Tensor | None = None
) -> torch.Tensor:
    """y[m] = x[m]·(base + Σ_e merge_weights[m, e]·B_e·A_e)ᵀ, never forming B_e·A_e.

    Args:
        x: `[M, K]`; merge_weights: `[M, E]`; A: `[E, r, K]`; B: `[E, N, r]`; base: `[N, K]` or None.
    Returns: `[M, N]`.
    """
    acc = _accumulator(x.dtype)
    E, r, K = A.shape
    shrunk = x.to(acc) @ A.reshape(E * r, K).to(acc).T  # [M, E·r]: every expert's A at once, kept wide
    shrunk = (shrunk.view(-1, E, r) * merge_weights.to(acc).unsqueeze(-1)).view(-1, E * r)
    B_cat = B.transpose(0, 1).reshape(B.shape[1], E * r).to(acc)  # [N, E·r]: [B_1, ..., B_E] side by side
    if base is None:
        return (shrunk @ B_cat.T).to(x.dtype)
    return torch.addmm((x @ base.T).to(acc), shrunk, B_cat.T).to(x.dtype)


def merge_weights_into(base: torch.Tensor | None, deltas: torch.Tensor, merge_weights: torch.Tensor) -> torch.Tensor:
    """Per-sequence merged weights `[S, N, K]` = base + Σ_e merge_weights[s, e]·deltas[e].

    Args:
        base: `[N, K]` or None; deltas: `[E, N, K]`; merge_weights: `[S, E]`.
    """
    acc = _accumulator(deltas.dtype)
    merged = torch.einsum("se,enk->snk", merge_weights.to(acc), deltas.to(acc))
    return (merged if base is None else merged + base.to(acc)).to(deltas.dtype)


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)
