"""moe_merge.kernels compiled on a CUDA device: realistic shapes, autotuning, auto dispatch, CUDA graphs.

Skipped without CUDA; tests/test_kernels.py runs the same kernels there (compiled on CUDA, interpreted
on CPU) at tiny shapes.
"""

import pytest
import torch

from moe_merge import kernels
from moe_merge.kernels import dispatch, reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# (M, N, K, E): decode of an up projection, a batch on a down projection, an odd-sized prefill
SHAPES = {"decode-up": (1, 11008, 4096, 8), "batch-down": (64, 4096, 11008, 4), "odd-prefill": (300, 1000, 1000, 2)}
MAX_REL_ERROR = {torch.bfloat16: 1e-2, torch.float16: 2e-3}  # ‖y − fp32 reference‖ / ‖fp32 reference‖


@pytest.fixture(autouse=True)
def _compiled(monkeypatch):
    from moe_merge.kernels import kernel_utils

    torch.manual_seed(0)
    monkeypatch.delenv("MOE_MERGE_KERNELS", raising=False)
    assert not kernel_utils.INTERPRETER, "TRITON_INTERPRET=1 is set: these tests are for the compiled kernels"


def test_auto_runs_triton_on_cuda_tensors_of_kernel_dtypes(monkeypatch):
    x = torch.zeros(2, 3, device="cuda")
    assert dispatch.use_triton(x) and dispatch.use_triton(x.half())
    assert not dispatch.use_triton(x.double())  # a dtype the kernels do not take: the reference
    monkeypatch.setenv("MOE_MERGE_KERNELS", "torch")
    assert not dispatch.use_triton(x)


def rel_error(got, expected):
    return ((got.float() - expected).norm() / expected.norm()).item()


def inputs(M, N, K, E, dtype):
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    w = torch.randn(M, E, device="cuda").softmax(-1)
    deltas = torch.randn(E, N, K, device="cuda", dtype=dtype) * K**-0.5
    return x, w, deltas, torch.randn(N, K, device="cuda", dtype=dtype) * K**-0.5


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", MAX_REL_ERROR, ids=str)
def test_merged_linear_at_model_shapes(dtype, shape):
    x, w, deltas, base = inputs(*shape, dtype)
    y = kernels.merged_linear(x, w, deltas, base)  # auto: Triton on CUDA
    assert rel_error(y, reference.merged_linear(x.float(), w, deltas.float(), base.float())) < MAX_REL_ERROR[dtype]


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_lowrank_at_model_shapes(shape):
    M, N, K, E = shape
    x, w, _, base = inputs(M, N, K, 1, torch.bfloat16)
    w = torch.randn(M, E, device="cuda").softmax(-1)
    A = torch.randn(E, 16, K, device="cuda", dtype=torch.bfloat16) * K**-0.5
    B = torch.randn(E, N, 16, device="cuda", dtype=torch.bfloat16) * 0.25
    y = kernels.lowrank_merged_linear(x, w, A, B, base)
    expected = reference.lowrank_merged_linear(x.float(), w, A.float(), B.float(), base.float())
    assert rel_error(y, expected) < MAX_REL_ERROR[torch.bfloat16]


def test_merge_weights_into_at_model_shape():
    deltas = torch.randn(4, 4096, 4096, device="cuda", dtype=torch.bfloat16)
    base, w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16), torch.randn(8, 4, device="cuda")
    merged = kernels.merge_weights_into(base, deltas, w)
    expected = reference.merge_weights_into(base.float(), deltas.float(), w)
    assert rel_error(merged, expected) < MAX_REL_ERROR[torch.bfloat16]


@pytest.mark.parametrize("strategy", ["kconcat", "materialize"])
def test_per_sequence_prefill_both_strategies(strategy):
    x = torch.randn(2, 300, 1024, device="cuda", dtype=torch.bfloat16)
    _, _, deltas, base = inputs(1, 2048, 1024, 4, torch.bfloat16)
    w = torch.randn(2, 4, device="cuda").softmax(-1)
    y = kernels.merged_linear_per_sequence(x, w, deltas, base, strategy=strategy)
    expected = reference.merged_linear(
        x.view(600, 1024).float(), w.repeat_interleave(300, 0), deltas.float(), base.float()
    )
    assert rel_error(y.view(600, -1), expected) < MAX_REL_ERROR[torch.bfloat16]


def test_decode_replays_in_a_cuda_graph():
    x, w, deltas, base = inputs(8, 4096, 4096, 4, torch.bfloat16)
    eager = kernels.merged_linear(x, w, deltas, base)  # compiles and autotunes outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kernels.merged_linear(x, w, deltas, base)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(captured, kernels.merged_linear(x, w, deltas, base))
    assert not torch.equal(captured, eager)


def test_router_gradients_on_cuda_match_reference():
    x, w, deltas, base = inputs(16, 512, 256, 4, torch.float32)
    grad = torch.randn(16, 512, device="cuda")
    got = torch.autograd.grad(kernels.merged_linear(x.requires_grad_(), w.requires_grad_(), deltas, base), (x, w), grad)
    want = torch.autograd.grad(reference.merged_linear(x, w, deltas, base), (x, w), grad)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
