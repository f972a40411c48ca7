"""Low-rank merged linear: y = x·(W0 + Σ_e w_e·B_e·A_e)ᵀ, never forming B_e·A_e.

Why: with LoRA or SVD task vectors the deltas add only E·r·(K + N) elements (+4 % for E = 8, r = 16
on 4096×11008), so a merged layer should cost one base GEMM. Two launches:
1. shrink: s = x·A_catᵀ, `[M, E·r]` in fp32 (A_cat stacks the E factors A_e row-wise);
2. expand fused into the base GEMM: after x·W0ᵀ, the same accumulator takes one more reduction
   segment of length E·r, (s ⊙ w[:, c // r])·B_catᵀ, where column c of B_cat is column c % r of B_{c // r}.
The rank intermediate stays fp32 in memory and is scaled in fp32 (vLLM dropped a kernel that stored it
in half precision); like vLLM's expand, it is rounded to the weights' dtype only as a tl.dot operand.
Both launches split their reduction (K) over programs when the output tiles cannot fill the GPU.
"""

import torch
import triton
import triton.language as tl

from moe_merge.kernels.kernel_utils import (
    GROUP_M,
    INTERPRETER,
    check_dtype,
    check_operand,
    dot_acc,
    fill_split,
    fp32_dot,
    join_splits,
    mm_k,
    prune_by_rows,
    split_output,
    tile_mn,
)

# Block sizes, all here. CUDA: autotuned per (rows bucket, shape, dtypes), cached on disk per device.
_SHRINK_CUDA_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_C": 32, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_C": 64, "BLOCK_K": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_C": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_C": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
_EXPAND_CUDA_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "BLOCK_C": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "BLOCK_C": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "BLOCK_C": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_C": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "BLOCK_C": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_C": 32}, num_warps=4, num_stages=4),
]
_INTERPRETER_SHRINK_BLOCKS = {"BLOCK_M": 16, "BLOCK_C": 16, "BLOCK_K": 16}
_INTERPRETER_EXPAND_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_C": 16}
_SPLIT_TILE = 64  # output tile edge assumed when deciding a K split
_K_ALIGN = 256  # a K split's chunk is a multiple of this, so of every BLOCK_K


@triton.jit(do_not_specialize=["M_BUCKET"])
def _shrink_kernel(
    x_ptr,
    a_ptr,
    s_ptr,
    M,
    K,
    C,
    R,
    K_PER_SPLIT,
    M_BUCKET,  # autotuning key only: next power of two of M
    x_stride_m,
    x_stride_k,
    a_stride_e,
    a_stride_r,
    a_stride_k,
    s_stride_split,
    s_stride_m,
    s_stride_c,
    FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = tl.program_id(2)
    m_ok = offs_m < M
    c_ok = offs_c < C
    a_cols = a_ptr + ((offs_c // R).to(tl.int64) * a_stride_e + (offs_c % R) * a_stride_r)[None, :]  # [1, BLOCK_C]
    k_lo = split * K_PER_SPLIT
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    acc = mm_k(
        acc,
        x_ptr + offs_m[:, None] * x_stride_m,
        x_stride_k,
        a_cols,
        a_stride_k,
        m_ok,
        c_ok,
        None,
        k_lo,
        min(K, k_lo + K_PER_SPLIT),
        False,
        FP32_DOT,
        BLOCK_K,
    )
    s = s_ptr + split * s_stride_split + offs_m[:, None] * s_stride_m + offs_c[None, :] * s_stride_c
    tl.store(s, acc, mask=m_ok[:, None] & c_ok[None, :])


@triton.jit(do_not_specialize=["M_BUCKET"])
def _expand_kernel(
    x_ptr,
    base_ptr,
    s_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    C,
    R,
    K_PER_SPLIT,
    M_BUCKET,  # autotuning key only: next power of two of M
    x_stride_m,
    x_stride_k,
    base_stride_n,
    base_stride_k,
    s_stride_m,
    s_stride_c,
    w_stride_m,
    w_stride_e,
    b_stride_e,
    b_stride_n,
    b_stride_r,
    y_stride_split,
    y_stride_m,
    y_stride_n,
    HAS_BASE: tl.constexpr,
    FP32_DOT: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_m, pid_n = tile_mn(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_BASE:  # this split's share of x·W0ᵀ
        k_lo = split * K_PER_SPLIT
        acc = mm_k(
            acc,
            x_ptr + offs_m[:, None] * x_stride_m,
            x_stride_k,
            base_ptr + offs_n[None, :] * base_stride_n,
            base_stride_k,
            m_ok,
            n_ok,
            None,
            k_lo,
            min(K, k_lo + K_PER_SPLIT),
            False,
            FP32_DOT,
            BLOCK_K,
        )
    if split == 0:  # the rank segment: (s ⊙ w[:, c // R])·B_catᵀ
        offs_c = tl.arange(0, BLOCK_C)
        for c in range(0, C, BLOCK_C):
            cs = c + offs_c
            c_ok = cs < C
            e = cs // R
            rows_cs = m_ok[:, None] & c_ok[None, :]
            s = tl.load(s_ptr + offs_m[:, None] * s_stride_m + cs[None, :] * s_stride_c, mask=rows_cs, other=0.0)
            w = tl.load(w_ptr + offs_m[:, None] * w_stride_m + e[None, :] * w_stride_e, mask=rows_cs, other=0.0)
            b_cat = (
                b_ptr + (e.to(tl.int64) * b_stride_e + (cs % R) * b_stride_r)[:, None] + offs_n[None, :] * b_stride_n
            )
            b = tl.load(b_cat, mask=c_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_C, BLOCK_N]
            acc = dot_acc((s * w.to(tl.float32)).to(b.dtype), b, acc, FP32_DOT)
    y = y_ptr + split * y_stride_split + offs_m[:, None] * y_stride_m + offs_n[None, :] * y_stride_n
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_shrink_tuned = triton.autotune(
    configs=_SHRINK_CUDA_CONFIGS,
    key=["M_BUCKET", "K", "C", "K_PER_SPLIT"],
    prune_configs_by={"early_config_prune": prune_by_rows},
    cache_results=True,
)(_shrink_kernel)
_expand_tuned = triton.autotune(
    configs=_EXPAND_CUDA_CONFIGS,
    key=["M_BUCKET", "N", "K", "C", "K_PER_SPLIT"],
    prune_configs_by={"early_config_prune": prune_by_rows},
    cache_results=True,
)(_expand_kernel)


def _k_chunk(tiles: int, K: int, device: torch.device, k_split: int | None) -> tuple[int, int]:
    """(programs per output tile, K elements each): about `k_split` if given, else what fills the device."""
    if k_split is not None and k_split < 1:
        raise ValueError(f"k_split={k_split} must be at least 1")
    wanted = k_split or fill_split(tiles, triton.cdiv(K, _K_ALIGN), device)
    align = 1 if INTERPRETER else _K_ALIGN
    chunk = triton.cdiv(triton.cdiv(max(K, 1), wanted), align) * align
    return triton.cdiv(max(K, 1), chunk), chunk


def _lowrank_merged_linear(
    x: torch.Tensor,
    merge_weights: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    base: torch.Tensor | None = None,
    k_split: int | None = None,
) -> torch.Tensor:
    """Launch shrink then expand. Any strides; nothing is copied.

    Args:
        x: `[M, K]` activations, fp32, fp16 or bf16.
        merge_weights: `[M, E]` a row per token, any float dtype (read in fp32).
        A: `[E, r, K]`; B: `[E, N, r]`; base: `[N, K]` or None; all in x's dtype.
        k_split: programs sharing each output tile's K (both launches); None fits the device.
    Returns: `[M, N]` in x's dtype.
    """
    check_dtype("x", x)
    M, K = check_operand("x", x, {"M": None, "K": None}, like=x)
    E, R, _ = check_operand("A", A, {"E": None, "r": None, "K": K}, like=x)
    _, N, _ = check_operand("B", B, {"E": E, "N": None, "r": R}, like=x)
    check_operand("merge_weights", merge_weights, {"M": M, "E": E}, like=x, same_dtype=False)
    if base is not None:
        check_operand("base", base, {"N": N, "K": K}, like=x)
    if E * R == 0:
        raise ValueError(f"A and B must hold at least one expert of rank 1 or more; got E={E}, r={R}")
    if M * N == 0:
        return x.new_zeros(M, N)
    C = E * R
    fp32 = fp32_dot(x.dtype)

    # 1. shrink: s = x·A_catᵀ [M, C] in fp32, unscaled (expand scales it, backward reuses the formula)
    splits, chunk = _k_chunk(triton.cdiv(M, _SPLIT_TILE) * triton.cdiv(C, _SPLIT_TILE), K, x.device, k_split)
    s, s_strides = split_output(splits, M, C, torch.float32, x.device)
    kernel, blocks = (_shrink_kernel, _INTERPRETER_SHRINK_BLOCKS) if INTERPRETER else (_shrink_tuned, {})

    def shrink_grid(meta: dict) -> tuple[int, int, int]:
        # axes: row blocks, rank-column blocks, K splits
        return triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(C, meta["BLOCK_C"]), splits

    kernel[shrink_grid](
        x,
        A,
        s,
        M,
        K,
        C,
        R,
        chunk,
        triton.next_power_of_2(M),
        *x.stride(),
        *A.stride(),
        *s_strides,
        FP32_DOT=fp32,
        **blocks,
    )
    s = join_splits(s, splits, torch.float32)

    # 2. expand, fused into the base GEMM as its last reduction segment
    splits, chunk = (
        (1, K)
        if base is None
        else _k_chunk(triton.cdiv(M, _SPLIT_TILE) * triton.cdiv(N, _SPLIT_TILE), K, x.device, k_split)
    )
    y, y_strides = split_output(splits, M, N, x.dtype, x.device)
    base_strides = (0, 0) if base is None else base.stride()
    kernel, blocks = (_expand_kernel, _INTERPRETER_EXPAND_BLOCKS) if INTERPRETER else (_expand_tuned, {})

    def expand_grid(meta: dict) -> tuple[int, int]:
        # axis 0: output tiles, in GROUP_M-grouped order (tile_mn); axis 1: K splits of the base segment
        return triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), splits

    kernel[expand_grid](
        x,
        base,
        s,
        merge_weights,
        B,
        y,
        M,
        N,
        K,
        C,
        R,
        chunk,
        triton.next_power_of_2(M),
        *x.stride(),
        *base_strides,
        *s.stride(),
        *merge_weights.stride(),
        *B.stride(),
        *y_strides,
        HAS_BASE=base is not None,
        FP32_DOT=fp32,
        GROUP_M=GROUP_M,
        **blocks,
    )
    return join_splits(y, splits, x.dtype)


@torch.library.custom_op("moe_merge::lowrank_merged_linear", mutates_args=())
def lowrank_merged_linear(
    x: torch.Tensor, merge_weights: torch.Tensor, A: torch.Tensor, B: torch.Tensor, base: torch.Tensor | None
) -> torch.Tensor:
    """y[m] = x[m]·(base + Σ_e merge_weights[m, e]·B_e·A_e)ᵀ by the Triton kernels; `[M, N]`.
    `base` has no default, so autograd always sees five inputs."""
    return _lowrank_merged_linear(x, merge_weights, A, B, base)


@lowrank_merged_linear.register_fake
def _lowrank_merged_linear_fake(
    x: torch.Tensor, merge_weights: torch.Tensor, A: torch.Tensor, B: torch.Tensor, base: torch.Tensor | None
) -> torch.Tensor:
    return x.new_empty(x.shape[0], B.shape[1])


def _setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad: torch.Tensor) -> tuple:
    """Gradients of every input, from grad = dL/dy `[M, N]`; router training needs x and merge_weights."""
    x, merge_weights, A, B, base = ctx.saved_tensors
    need_x, need_w, need_a, need_b, need_base = ctx.needs_input_grad
    grad_x = grad_w = grad_a = grad_b = grad_base = None
    w = merge_weights.to(grad.dtype).unsqueeze(-1)  # [M, E, 1]
    if need_x:  # grad·(W0 + Σ_e w_e B_e A_e): the same op with the factors' roles swapped, [M, K]
        grad_x = lowrank_merged_linear(
            grad, merge_weights, B.transpose(1, 2), A.transpose(1, 2), None if base is None else base.T
        )
    if need_w or need_a:
        grad_shrunk = torch.einsum("mn,enr->mer", grad, B)  # dL/d(w ⊙ s), [M, E, r]
    if need_w or need_b:
        shrunk = torch.einsum("mk,erk->mer", x, A)  # s, [M, E, r]
    if need_w:
        grad_w = (grad_shrunk.float() * shrunk.float()).sum(-1).to(merge_weights.dtype)  # [M, E]
    if need_a:
        grad_a = torch.einsum("mer,mk->erk", grad_shrunk * w, x)  # [E, r, K]
    if need_b:
        grad_b = torch.einsum("mn,mer->enr", grad, shrunk * w)  # [E, N, r]
    if need_base:
        grad_base = grad.T @ x  # [N, K]
    return grad_x, grad_w, grad_a, grad_b, grad_base


lowrank_merged_linear.register_autograd(_backward, setup_context=_setup_context)
