"""Half-precision merged matmuls in plain torch, for half-precision tensors where the Triton kernels do not run (CPU).

`reference.py` keeps every intermediate in float32: right as a definition, but on a CPU each of its casts is a copy
of a weight (A, B, W0's output) per call, and its float32 GEMMs are slower than the half-precision ones the base
model runs. Here every GEMM runs in the operands' dtype (CPU bf16 GEMMs accumulate in float32 and round once), the
merge weights scale the rank-r intermediate in float32, which is rounded once to the operands' dtype before the
up-projection, as PEFT's LoRA layers do in bf16. `tests/test_kernels.py` holds it to `reference` at the dtype's
tolerance.
"""

from __future__ import annotations

import torch


def lowrank_merged_linear(
    x: torch.Tensor, merge_weights: torch.Tensor, A: torch.Tensor, B_cat: torch.Tensor, base: torch.Tensor | None = None
) -> torch.Tensor:
    """y[m] = x[m]·(base + Σ_e merge_weights[m, e]·B_e·A_e)ᵀ.

    Args:
        x: `[M, K]`; merge_weights: `[M, E]`, float32 or wider; A: `[E, r, K]`;
        B_cat: `[N, E·r]`, the B_e side by side (`LowRankMergedLinear` keeps it); base: `[N, K]` or None.
    Returns: `[M, N]` in x's dtype.
    """
    E, r, K = A.shape
    shrunk = x @ A.reshape(E * r, K).T  # [M, E·r]
    scaled = (shrunk.view(-1, E, r) * merge_weights.unsqueeze(-1)).view(-1, E * r).to(x.dtype)  # weighted in float32
    if base is None:
        return scaled @ B_cat.T
    return torch.addmm(x @ base.T, scaled, B_cat.T)
