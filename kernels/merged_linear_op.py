"""Merged linear by K-concatenation: y = x·(W0 + Σ_e w_e Δ_e)ᵀ with a row of merge weights per token.

Why: x·(W0 + Σ_e w_e Δ_e)ᵀ = [x, w_1·x, …, w_E·x]·[W0; Δ_1; …; Δ_E]ᵀ, one GEMM over a reduction of
(E+1)·K whose left operand is x scaled row by row. Each weight byte is read once for the whole batch,
so decode (B flop per weight byte) runs at the floor of reading the E+1 matrices once, where forming a
weight per token reads (E+1+2B) of them (docs/kernels.md). The concatenated left operand is
never formed: each x tile is scaled by w[:, e] in fp32 as it is loaded, and one fp32 accumulator
takes every segment. When the output has too few tiles to fill the GPU (decode of a narrow layer),
the experts are split over programs and their partial sums added afterwards.
"""

import torch
import triton
import triton.language as tl

from moe_merge.kernels.kernel_utils import (
    GROUP_M,
    INTERPRETER,
    check_dtype,
    check_operand,
    fill_split,
    fp32_dot,
    join_splits,
    mm_k,
    prune_by_rows,
    split_output,
    tile_mn,
)

# Block sizes, all here. CUDA: autotuned per (rows bucket, N, K, E, dtypes) and cached on disk per device;
# the interpreter runs programs one by one, so it gets the smallest tiles tl.dot takes.
_CUDA_CONFIGS = [
    # decode: a few rows, memory-bound; narrow output tiles and deep pipelines keep loads in flight
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    # prefill: compute-bound; large tiles
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
]
_INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}
_SPLIT_TILE = 64  # output tile edge assumed when deciding the expert split (the decode configs' BLOCK_N)


@triton.jit(do_not_specialize=["M_BUCKET"])
def _merged_linear_kernel(
    x_ptr,
    w_ptr,
    deltas_ptr,
    base_ptr,
    y_ptr,
    M,
    N,
    K,
    E,
    M_BUCKET,  # autotuning key only: next power of two of M, so prefill lengths share a config
    x_stride_m,
    x_stride_k,
    w_stride_m,
    w_stride_e,
    d_stride_e,
    d_stride_n,
    d_stride_k,
    base_stride_n,
    base_stride_k,
    y_stride_split,
    y_stride_m,
    y_stride_n,
    HAS_BASE: tl.constexpr,
    SPLIT_E: tl.constexpr,
    FP32_DOT: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tile_mn(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_rows = x_ptr + offs_m[:, None] * x_stride_m  # [BLOCK_M, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_BASE:
        if split == 0:  # the W0 segment, unscaled, belongs to the first split
            base_cols = base_ptr + offs_n[None, :] * base_stride_n  # [1, BLOCK_N]
            acc = mm_k(
                acc, x_rows, x_stride_k, base_cols, base_stride_k, m_ok, n_ok, None, 0, K, False, FP32_DOT, BLOCK_K
            )
    per_split = tl.cdiv(E, SPLIT_E)
    for e in range(split * per_split, min(E, (split + 1) * per_split)):
        scale = tl.load(w_ptr + offs_m * w_stride_m + e * w_stride_e, mask=m_ok, other=0.0).to(tl.float32)
        delta_cols = deltas_ptr + tl.cast(e, tl.int64) * d_stride_e + offs_n[None, :] * d_stride_n
        acc = mm_k(acc, x_rows, x_stride_k, delta_cols, d_stride_k, m_ok, n_ok, scale, 0, K, True, FP32_DOT, BLOCK_K)
    y = y_ptr + split * y_stride_split + offs_m[:, None] * y_stride_m + offs_n[None, :] * y_stride_n
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_merged_linear_tuned = triton.autotune(
    configs=_CUDA_CONFIGS,
    key=["M_BUCKET", "N", "K", "E"],
    prune_configs_by={"early_config_prune": prune_by_rows},
    cache_results=True,
)(_merged_linear_kernel)


def _merged_linear(
    x: torch.Tensor,
    merge_weights: torch.Tensor,
    deltas: torch.Tensor,
    base: torch.Tensor | None = None,
    experts_split: int | None = None,
) -> torch.Tensor:
    """Launch the kernel. Any strides; nothing is copied.

    Args:
        x: `[M, K]` activations, fp32, fp16 or bf16.
        merge_weights: `[M, E]` a row per token, any float dtype (read in fp32).
        deltas: `[E, N, K]` task vectors, or expert weights when `base` is None; x's dtype.
        base: `[N, K]` or None; x's dtype.
        experts_split: programs sharing each output tile's experts; None fits the device (`fill_split`).
    Returns: `[M, N]` in x's dtype.
    """
    check_dtype("x", x)
    M, K = check_operand("x", x, {"M": None, "K": None}, like=x)
    E, N, _ = check_operand("deltas", deltas, {"E": None, "N": None, "K": K}, like=x)
    check_operand("merge_weights", merge_weights, {"M": M, "E": E}, like=x, same_dtype=False)
    if base is not None:
        check_operand("base", base, {"N": N, "K": K}, like=x)
    if E == 0:
        raise ValueError("deltas holds no expert (E=0); pass at least one")
    if M * N == 0:
        return x.new_zeros(M, N)
    split = experts_split or fill_split(triton.cdiv(M, _SPLIT_TILE) * triton.cdiv(N, _SPLIT_TILE), E, x.device)
    if not 1 <= split <= E:
        raise ValueError(f"experts_split={split} must be between 1 and the number of experts ({E})")

    y, y_strides = split_output(split, M, N, x.dtype, x.device)
    base_strides = (0, 0) if base is None else base.stride()
    kernel, blocks = (_merged_linear_kernel, _INTERPRETER_BLOCKS) if INTERPRETER else (_merged_linear_tuned, {})

    def grid(meta: dict) -> tuple[int, int]:
        # axis 0: output tiles, in GROUP_M-grouped order (tile_mn); axis 1: expert splits
        return triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split

    kernel[grid](
        x,
        merge_weights,
        deltas,
        base,
        y,
        M,
        N,
        K,
        E,
        triton.next_power_of_2(M),
        *x.stride(),
        *merge_weights.stride(),
        *deltas.stride(),
        *base_strides,
        *y_strides,
        HAS_BASE=base is not None,
        SPLIT_E=split,
        FP32_DOT=fp32_dot(x.dtype),
        GROUP_M=GROUP_M,
        **blocks,
    )
    return join_splits(y, split, x.dtype)


@torch.library.custom_op("moe_merge::merged_linear", mutates_args=())
def merged_linear(
    x: torch.Tensor, merge_weights: torch.Tensor, deltas: torch.Tensor, base: torch.Tensor | None
) -> torch.Tensor:
    """y[m] = x[m]·(base + Σ_e merge_weights[m, e]·deltas[e])ᵀ by the Triton kernel; `[M, N]`.
    `base` has no default, so autograd always sees four inputs."""
    return _merged_linear(x, merge_weights, deltas, base)


@merged_linear.register_fake
def _merged_linear_fake(
    x: torch.Tensor, merge_weights: torch.Tensor, deltas: torch.Tensor, base: torch.Tensor | None
) -> torch.Tensor:
    return x.new_empty(x.shape[0], deltas.shape[1])


def _setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad: torch.Tensor) -> tuple:
    """Gradients of every input, from grad = dL/dy `[M, N]`; router training needs x and merge_weights."""
    x, merge_weights, deltas, base = ctx.saved_tensors
    need_x, need_w, need_deltas, need_base = ctx.needs_input_grad
    grad_x = grad_w = grad_deltas = grad_base = None
    if need_x:  # grad·(W0 + Σ_e w_e Δ_e): the same op on the transposed weights, [M, K]
        grad_x = merged_linear(grad, merge_weights, deltas.transpose(1, 2), None if base is None else base.T)
    if need_w:  # dL/dw[m, e] = Σ_k (grad·Δ_e)[m, k]·x[m, k]
        grad_w = (torch.matmul(grad, deltas).float() * x.float()).sum(-1).T.to(merge_weights.dtype)  # [M, E]
    if need_deltas:  # dL/dΔ_e = Σ_m w[m, e]·grad[m]ᵀx[m]
        scaled = grad * merge_weights.T.unsqueeze(-1).to(grad.dtype)  # [E, M, N]
        grad_deltas = torch.matmul(scaled.transpose(1, 2), x)  # [E, N, K]
    if need_base:
        grad_base = grad.T @ x  # [N, K]
    return grad_x, grad_w, grad_deltas, grad_base


merged_linear.register_autograd(_backward, setup_context=_setup_context)
