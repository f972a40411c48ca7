"""Merged matmuls: y = x·(W0 + Σ_e w_e Δ_e)ᵀ without forming a weight per token.

Four public ops, each with a torch reference in `reference.py` (the three kernels) and a Triton
implementation in `*_op.py`:

- `merged_linear(x [M, K], merge_weights [M, E], deltas [E, N, K], base [N, K] | None) -> [M, N]`
- `lowrank_merged_linear(x, merge_weights, A [E, r, K], B [E, N, r], base) -> [M, N]`
- `merge_weights_into(base, deltas, merge_weights [S, E]) -> [S, N, K]`
- `merged_linear_per_sequence(x [S, T, K], merge_weights [S, E], deltas, base) -> [S, T, N]`, which
  takes K-concatenation or materialize-then-GEMM by the cost model in `dispatch.py`.

Each call runs Triton or the reference as `MOE_MERGE_KERNELS` says (`dispatch.use_triton`): by default
Triton on CUDA tensors, the reference elsewhere, but for the low-rank op on half-precision CPU tensors, which runs
`native.py` (plain torch in the operands' dtype, tested against the reference). Importing this needs neither a GPU nor triton: the
op modules import triton, so they are loaded on the first call that runs a kernel.
"""

from typing import Literal

import torch

from moe_merge.kernels import native, reference
from moe_merge.kernels.dispatch import (
    Cost,
    DeviceRates,
    Strategy,
    choose_strategy,
    crossover_tokens,
    keep_decode_weights,
    use_native,
    use_triton,
)

__all__ = [
    "merged_linear",
    "lowrank_merged_linear",
    "merge_weights_into",
    "merged_linear_per_sequence",
    "crossover_tokens",
    "choose_strategy",
    "keep_decode_weights",
    "Cost",
    "DeviceRates",
]


def merged_linear(
    x: torch.Tensor, merge_weights: torch.Tensor, deltas: torch.Tensor, base: torch.Tensor | None = None
) -> torch.Tensor:
    """y[m] = x[m]·(base + Σ_e merge_weights[m, e]·deltas[e])ᵀ, `[M, N]` (see `reference.merged_linear`)."""
    if use_triton(x, deltas, base):
        from moe_merge.kernels import merged_linear_op

        return merged_linear_op.merged_linear(x, merge_weights, deltas, base)
    return reference.merged_linear(x, merge_weights, deltas, base)


def lowrank_merged_linear(
    x: torch.Tensor,
    merge_weights: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    base: torch.Tensor | None = None,
    B_cat: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[m] = x[m]·(base + Σ_e merge_weights[m, e]·B_e·A_e)ᵀ, `[M, N]` (see `reference.lowrank_merged_linear`).
    `B_cat` [N, E·r], B's experts side by side, spares the native path a copy of B per call."""
    if use_triton(x, A, B, base):
        from moe_merge.kernels import lowrank_op

        return lowrank_op.lowrank_merged_linear(x, merge_weights, A, B, base)
    if use_native(x):
        B_cat = B.transpose(0, 1).reshape(B.shape[1], -1) if B_cat is None else B_cat
        return native.lowrank_merged_linear(x, merge_weights, A, B_cat, base)
    return reference.lowrank_merged_linear(x, merge_weights, A, B, base)


def merge_weights_into(base: torch.Tensor | None, deltas: torch.Tensor, merge_weights: torch.Tensor) -> torch.Tensor:
    """Per-sequence weights `[S, N, K]` = base + Σ_e merge_weights[s, e]·deltas[e] (see `reference.merge_weights_into`)."""
    if use_triton(deltas, base):
        from moe_merge.kernels import materialize_op

        return materialize_op.merge_weights_into(base, deltas, merge_weights)
    return reference.merge_weights_into(base, deltas, merge_weights)


def merged_linear_per_sequence(
    x: torch.Tensor,
    merge_weights: torch.Tensor,
    deltas: torch.Tensor,
    base: torch.Tensor | None = None,
    strategy: Strategy | Literal["auto"] = "auto",
) -> torch.Tensor:
    """y[s, t] = x[s, t]·(base + Σ_e merge_weights[s, e]·deltas[e])ᵀ, one weight vector per sequence.

    Args:
        x: `[S, T, K]`, S sequences of T tokens; merge_weights: `[S, E]`; deltas: `[E, N, K]`;
        base: `[N, K]` or None.
        strategy: `kconcat` (merged_linear with the weights repeated per token), `materialize`
            (merge_weights_into, then one batched GEMM), or `auto`: `choose_strategy` by S, T and E.
    Returns: `[S, T, N]`.
    """
    if x.dim() != 3:
        raise ValueError(f"x has shape {list(x.shape)}; expected [S, T, K] (use merged_linear for [M, K] tokens)")
    S, T, K = x.shape
    if strategy == "auto":
        strategy = choose_strategy(
            T,
            S,
            deltas.shape[0],
            base is not None,
            x.element_size(),
            device=x.device,
            weight_bytes=S * deltas.shape[1] * K * x.element_size(),
        )
    if strategy == "materialize":
        return torch.bmm(x, merge_weights_into(base, deltas, merge_weights).transpose(1, 2))
    if strategy == "kconcat":
        per_token = merge_weights.repeat_interleave(T, dim=0)  # [S·T, E]
        return merged_linear(x.reshape(S * T, K), per_token, deltas, base).view(S, T, -1)
    raise ValueError(f"strategy={strategy!r}; choose auto, kconcat or materialize")
