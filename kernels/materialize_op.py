"""Per-sequence merged weights: W_s = W0 + Σ_e w_se·Δ_e, `[S, N, K]`, for long prefill.

Why: with one weight vector per sequence and many tokens each, forming W_s once and running a dense
GEMM beats K-concatenation (see `dispatch.crossover_tokens`). Forming them is memory-bound, so each
program owns one [BLOCK_N, BLOCK_K] tile of the weight and reads every expert's tile of it once for a
whole block of sequences, accumulating the BLOCK_S merged tiles in fp32 registers: (E + 1)·P bytes
read and S·P written, where a loop over sequences reads the experts S times.
"""

import torch
import triton
import triton.language as tl

from moe_merge.kernels.kernel_utils import INTERPRETER, check_dtype, check_operand

# Block sizes, all here. BLOCK_S is set by the host from S (below); the weight tile is autotuned on CUDA.
_CUDA_CONFIGS = [
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 64}, num_warps=8),
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 128}, num_warps=8),
    triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8),
]
_INTERPRETER_BLOCKS = {"BLOCK_N": 8, "BLOCK_K": 16}
_MAX_BLOCK_S = 4 if INTERPRETER else 8  # sequences merged per program: BLOCK_S·BLOCK_N·BLOCK_K fp32 registers


@triton.jit
def _materialize_kernel(
    base_ptr,
    deltas_ptr,
    w_ptr,
    out_ptr,
    S,
    N,
    K,
    E,
    base_stride_n,
    base_stride_k,
    d_stride_e,
    d_stride_n,
    d_stride_k,
    w_stride_s,
    w_stride_e,
    o_stride_s,
    o_stride_n,
    o_stride_k,
    HAS_BASE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    blocks_k = tl.cdiv(K, BLOCK_K)
    offs_n = (tl.program_id(0) // blocks_k) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = (tl.program_id(0) % blocks_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_s = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_ok = offs_s < S
    tile_ok = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    acc = tl.zeros((BLOCK_S, BLOCK_N, BLOCK_K), dtype=tl.float32)
    if HAS_BASE:
        base = tl.load(
            base_ptr + offs_n[:, None] * base_stride_n + offs_k[None, :] * base_stride_k, mask=tile_ok, other=0.0
        )
        acc += base.to(tl.float32)[None, :, :]
    delta_tile = offs_n[:, None] * d_stride_n + offs_k[None, :] * d_stride_k  # [BLOCK_N, BLOCK_K]
    for e in range(0, E):
        delta = tl.load(deltas_ptr + tl.cast(e, tl.int64) * d_stride_e + delta_tile, mask=tile_ok, other=0.0)
        w = tl.load(w_ptr + offs_s * w_stride_s + e * w_stride_e, mask=s_ok, other=0.0).to(tl.float32)  # [BLOCK_S]
        acc += w[:, None, None] * delta.to(tl.float32)[None, :, :]
    out = (
        out_ptr
        + offs_s.to(tl.int64)[:, None, None] * o_stride_s
        + offs_n[None, :, None] * o_stride_n
        + offs_k[None, None, :] * o_stride_k
    )
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=s_ok[:, None, None] & tile_ok[None, :, :])


_materialize_tuned = triton.autotune(configs=_CUDA_CONFIGS, key=["S", "N", "K", "E"], cache_results=True)(
    _materialize_kernel
)


def _merge_weights_into(base: torch.Tensor | None, deltas: torch.Tensor, merge_weights: torch.Tensor) -> torch.Tensor:
    """Launch the kernel. Any strides; nothing is copied.

    Args:
        base: `[N, K]` or None; deltas' dtype.
        deltas: `[E, N, K]` task vectors (expert weights when base is None), fp32, fp16 or bf16.
        merge_weights: `[S, E]` one row per sequence, any float dtype (read in fp32).
    Returns: `[S, N, K]`, contiguous, in deltas' dtype.
    """
    check_dtype("deltas", deltas)
    E, N, K = check_operand("deltas", deltas, {"E": None, "N": None, "K": None}, like=deltas, like_name="deltas")
    S, _ = check_operand(
        "merge_weights", merge_weights, {"S": None, "E": E}, like=deltas, like_name="deltas", same_dtype=False
    )
    if base is not None:
        check_operand("base", base, {"N": N, "K": K}, like=deltas, like_name="deltas")
    out = torch.empty(S, N, K, dtype=deltas.dtype, device=deltas.device)
    if out.numel() == 0:
        return out
    block_s = min(triton.next_power_of_2(S), _MAX_BLOCK_S)
    base_strides = (0, 0) if base is None else base.stride()
    kernel, blocks = (_materialize_kernel, _INTERPRETER_BLOCKS) if INTERPRETER else (_materialize_tuned, {})

    def grid(meta: dict) -> tuple[int, int]:
        # axis 0: weight tiles; axis 1: blocks of BLOCK_S sequences (each re-reads the expert tiles)
        return triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]), triton.cdiv(S, block_s)

    kernel[grid](
        base,
        deltas,
        merge_weights,
        out,
        S,
        N,
        K,
        E,
        *base_strides,
        *deltas.stride(),
        *merge_weights.stride(),
        *out.stride(),
        HAS_BASE=base is not None,
        BLOCK_S=block_s,
        **blocks,
    )
    return out


@torch.library.custom_op("moe_merge::merge_weights_into", mutates_args=())
def merge_weights_into(base: torch.Tensor | None, deltas: torch.Tensor, merge_weights: torch.Tensor) -> torch.Tensor:
    """`[S, N, K]` = base + Σ_e merge_weights[s, e]·deltas[e], by the Triton kernel."""
    return _merge_weights_into(base, deltas, merge_weights)


@merge_weights_into.register_fake
def _merge_weights_into_fake(
    base: torch.Tensor | None, deltas: torch.Tensor, merge_weights: torch.Tensor
) -> torch.Tensor:
    return deltas.new_empty(merge_weights.shape[0], *deltas.shape[1:])


def _setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad: torch.Tensor) -> tuple:
    """Gradients of every input, from grad = dL/dW `[S, N, K]`."""
    base, deltas, merge_weights = ctx.saved_tensors
    need_base, need_deltas, need_w = ctx.needs_input_grad
    grad_base = grad.sum(0) if need_base else None  # [N, K]
    grad_deltas = torch.einsum("se,snk->enk", merge_weights.to(grad.dtype), grad) if need_deltas else None
    grad_w = torch.einsum("snk,enk->se", grad, deltas).to(merge_weights.dtype) if need_w else None  # [S, E]
    return grad_base, grad_deltas, grad_w


merge_weights_into.register_autograd(_backward, setup_context=_setup_context)
