"""What the Triton ops share: the fp32-accumulating dot, the K loop, the tile order, argument checks.

Importing this module imports triton; `moe_merge.kernels` does so only when a kernel is about to run.
"""

import functools

import torch
import triton
import triton.language as tl

from moe_merge.kernels.dispatch import SUPPORTED_DTYPES

# Whether the kernels of this process run in Triton's interpreter. triton.jit reads TRITON_INTERPRET
# when a kernel is decorated, i.e. when the op modules are imported, just after this line.
INTERPRETER: bool = triton.knobs.runtime.interpret
GROUP_M = 8  # output tiles are visited in groups of GROUP_M row-blocks, so neighbours share weight tiles in L2


def fp32_dot(dtype: torch.dtype) -> bool:
    """Whether tl.dot takes fp32 operands at full precision: for fp32 inputs (what torch's matmul does
    by default), and for bf16 in the interpreter, whose bf16 dot is wrong (errors of 1e10 measured with
    triton 3.9; its fp16 dot is right, so fp16 takes the GPU's path there too)."""
    return dtype == torch.float32 or (INTERPRETER and dtype == torch.bfloat16)


def fill_split(tiles: int, max_split: int, device: torch.device) -> int:
    """Into how many programs to split each output tile's reduction so the launch fills the GPU.

    Prefill has tiles to spare (1); decode of a narrow layer has fewer tiles than two per SM, so the
    reduction is shared and the partial sums added afterwards. The interpreter runs programs one by
    one, so it never splits unless asked to.
    """
    if device.type != "cuda" or INTERPRETER:
        return 1
    return max(1, min(max_split, triton.cdiv(2 * _sm_count(device.index), tiles)))


@functools.cache
def _sm_count(device_index: int) -> int:  # a tensor's CUDA device always has an index
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_output(
    split: int, rows: int, cols: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """What a launch split `split` ways writes, and its (split, row, column) strides: the output
    [rows, cols] itself for one split, fp32 partial sums [split, rows, cols] for several (`join_splits`)."""
    if split == 1:
        out = torch.empty(rows, cols, dtype=dtype, device=device)
        r, c = out.stride()
        return out, (0, r, c)
    out = torch.empty(split, rows, cols, dtype=torch.float32, device=device)
    s, r, c = out.stride()
    return out, (s, r, c)


def join_splits(out: torch.Tensor, split: int, dtype: torch.dtype) -> torch.Tensor:
    """The output from what `split_output` gave: the partial sums added in fp32, then cast."""
    return out if split == 1 else out.sum(0).to(dtype)


def check_operand(
    name: str,
    tensor: torch.Tensor,
    dims: dict[str, int | None],
    like: torch.Tensor,
    like_name: str = "x",
    same_dtype: bool = True,
) -> torch.Size:
    """Raise a ValueError naming `name` unless it is a floating tensor of shape `dims` (name -> size,
    None: any) on the device of `like` and, with `same_dtype`, of its dtype; return its shape."""
    shape = tuple(tensor.shape)
    if len(shape) != len(dims) or any(size is not None and got != size for got, size in zip(shape, dims.values())):
        expected = ", ".join(k if v is None else f"{k}={v}" for k, v in dims.items())
        raise ValueError(f"{name} has shape {list(shape)}; expected [{expected}]")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} is {tensor.dtype}; it must be a floating-point tensor")
    if tensor.device != like.device:
        raise ValueError(f"{name} is on {tensor.device} but {like_name} is on {like.device}; move them to one device")
    if same_dtype and tensor.dtype != like.dtype:
        raise ValueError(f"{name} is {tensor.dtype} but {like_name} is {like.dtype}; cast them to one dtype")
    return tensor.shape


def check_dtype(name: str, tensor: torch.Tensor) -> None:
    """Raise unless the kernels take the dtype of `tensor`, the operand every other one but
    merge_weights must match."""
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{name} is {tensor.dtype}; the Triton kernels take {', '.join(map(str, SUPPORTED_DTYPES))} "
            "(set MOE_MERGE_KERNELS=torch for other dtypes)"
        )


def prune_by_rows(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Autotuning prune: drop configs whose BLOCK_M exceeds the rows (M_BUCKET) a launch has (every
    config list holds a BLOCK_M = 16 config, so one is always left)."""
    rows = max(16, named_args["M_BUCKET"])
    return [c for c in configs if c.kwargs["BLOCK_M"] <= rows]


@triton.jit
def dot_acc(a, b, acc, FP32_DOT: tl.constexpr):
    """acc + a·b, accumulated in fp32; FP32_DOT upcasts both operands first (see `fp32_dot`)."""
    if FP32_DOT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def tile_mn(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of program `pid`, visiting GROUP_M row blocks per column sweep."""
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def mm_k(
    acc,
    a_rows,
    a_stride_k,
    b_cols,
    b_stride_k,
    row_mask,
    col_mask,
    row_scale,
    k_lo,
    k_hi,
    HAS_SCALE: tl.constexpr,
    FP32_DOT: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc[BM, BN] + (row_scale ⊙ A)[:, k_lo:k_hi] · B[k_lo:k_hi, :], one BLOCK_K slice at a time.

    a_rows: [BM, 1] pointers to the tile's rows of A at k = 0; b_cols: [1, BN] pointers to its columns
    of B at k = 0. With HAS_SCALE, row i of the A slice is multiplied by row_scale[i] in fp32 and
    rounded back to B's dtype before the dot (fp32 accumulation either way).
    """
    offs_k = tl.arange(0, BLOCK_K)
    for k in range(k_lo, k_hi, BLOCK_K):
        ks = k + offs_k
        k_ok = ks < k_hi
        a = tl.load(a_rows + ks[None, :] * a_stride_k, mask=row_mask[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_cols + ks[:, None] * b_stride_k, mask=k_ok[:, None] & col_mask[None, :], other=0.0)
        if HAS_SCALE:
            a = (a.to(tl.float32) * row_scale[:, None]).to(b.dtype)
        acc = dot_acc(a, b, acc, FP32_DOT)
    return acc
