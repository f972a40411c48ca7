"""moe_merge.kernels: the Triton kernels against a float64 reference, the dispatcher, autograd.

Without a GPU the kernels run in Triton's interpreter. triton.jit reads TRITON_INTERPRET when a kernel
is decorated, i.e. when the op modules are first imported, so it is set here, at collection, before
any test runs (no other test module imports them). With a GPU the same tests run compiled on CUDA;
tests/test_kernels_gpu.py adds realistic shapes there.
"""

import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from moe_merge import kernels
from moe_merge.kernels import dispatch, reference

pytest.importorskip("triton")
from moe_merge.kernels import kernel_utils, lowrank_op, materialize_op, merged_linear_op

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # bf16: the interpreter upcasts its dots
TOL = {  # against float64, inputs of unit scale; about 3x the worst error seen over five seeds
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
# (M, N, K, E): nothing a multiple of the blocks, one token and one expert, sixteen experts
SHAPES = {"one-token-one-expert": (1, 16, 16, 1), "odd": (33, 17, 19, 3), "sixteen-experts": (2, 20, 24, 16)}


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert DEVICE == "cuda" or kernel_utils.INTERPRETER, (
        "the kernel modules were imported before TRITON_INTERPRET=1 was set; run tests/test_kernels.py on its own"
    )


def rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=DEVICE, dtype=dtype)


def softmax_weights(rows, experts):
    return torch.randn(rows, experts, dtype=torch.float64).softmax(-1).to(device=DEVICE, dtype=torch.float32)


def f64(t):
    return None if t is None else t.double()


def noncontiguous(t):
    """t's values with the last two dimensions swapped in memory and a gap after every element."""
    wide = torch.zeros(*t.shape[:-2], t.shape[-1], t.shape[-2], 2, dtype=t.dtype, device=t.device)
    wide[..., 0] = t.transpose(-1, -2)
    out = wide[..., 0].transpose(-1, -2)
    assert torch.equal(out, t) and not out.is_contiguous()
    return out


def dense_inputs(M, N, K, E, dtype, has_base):
    x, w = rand(M, K, dtype=dtype), softmax_weights(M, E)
    deltas, base = rand(E, N, K, dtype=dtype, scale=K**-0.5), rand(N, K, dtype=dtype, scale=K**-0.5)
    return x, w, deltas, base if has_base else None


def lowrank_inputs(M, N, K, E, r, dtype, has_base):
    x, w = rand(M, K, dtype=dtype), softmax_weights(M, E)
    A, B = rand(E, r, K, dtype=dtype, scale=K**-0.5), rand(E, N, r, dtype=dtype, scale=r**-0.5)
    return x, w, A, B, rand(N, K, dtype=dtype, scale=K**-0.5) if has_base else None


# --- merged_linear -----------------------------------------------------------------------------------


@pytest.mark.parametrize("has_base", [True, False], ids=["base", "no-base"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merged_linear_matches_float64_reference(dtype, shape, has_base):
    x, w, deltas, base = dense_inputs(*shape, dtype, has_base)
    y = merged_linear_op.merged_linear(x, w, deltas, base)
    assert y.shape == (shape[0], shape[1]) and y.dtype == dtype
    torch.testing.assert_close(
        y.double(), reference.merged_linear(f64(x), f64(w), f64(deltas), f64(base)), **TOL[dtype]
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split", [2, 3])
def test_merged_linear_split_over_experts_adds_up(split, dtype):
    """fp32 partial sums added, then cast: the path a GPU takes for decode (the interpreter splits only when told)."""
    x, w, deltas, base = dense_inputs(*SHAPES["odd"], dtype, True)
    y = merged_linear_op._merged_linear(x, w, deltas, base, experts_split=split)
    assert y.dtype == dtype
    torch.testing.assert_close(
        y.double(), reference.merged_linear(f64(x), f64(w), f64(deltas), f64(base)), **TOL[dtype]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_merged_linear_takes_any_strides(dtype):
    x, w, deltas, base = dense_inputs(*SHAPES["odd"], dtype, True)
    expected = reference.merged_linear(f64(x), f64(w), f64(deltas), f64(base))
    y = merged_linear_op.merged_linear(noncontiguous(x), noncontiguous(w), noncontiguous(deltas), noncontiguous(base))
    torch.testing.assert_close(y.double(), expected, **TOL[dtype])
    one_row = w[:1].expand_as(w)  # stride 0: every token shares a weight vector
    y = merged_linear_op.merged_linear(x, one_row, deltas, base)
    torch.testing.assert_close(
        y.double(), reference.merged_linear(f64(x), f64(one_row), f64(deltas), f64(base)), **TOL[dtype]
    )


def test_merged_linear_errors_name_the_argument():
    x, w, deltas, base = dense_inputs(*SHAPES["odd"], torch.float32, True)
    with pytest.raises(ValueError, match=r"deltas has shape \[3, 17, 18\]; expected \[E, N, K=19\]"):
        merged_linear_op.merged_linear(x, w, deltas[..., :-1], base)
    with pytest.raises(ValueError, match=r"merge_weights has shape \[33, 2\]; expected \[M=33, E=3\]"):
        merged_linear_op.merged_linear(x, w[:, :2], deltas, base)
    with pytest.raises(ValueError, match="base is torch.float16 but x is torch.float32; cast them to one dtype"):
        merged_linear_op.merged_linear(x, w, deltas, base.half())
    with pytest.raises(ValueError, match="x is torch.float64; the Triton kernels take"):
        merged_linear_op.merged_linear(x.double(), w, deltas.double(), None)


def test_empty_batches_and_reductions():
    assert merged_linear_op.merged_linear(rand(0, 4), softmax_weights(0, 2), rand(2, 3, 4), None).shape == (0, 3)
    y = lowrank_op.lowrank_merged_linear(rand(2, 0), softmax_weights(2, 2), rand(2, 1, 0), rand(2, 3, 1), rand(3, 0))
    assert torch.equal(y, torch.zeros(2, 3, device=DEVICE))


# --- lowrank_merged_linear ---------------------------------------------------------------------------

LOWRANK_SHAPES = {
    "one-token-rank-one": (1, 16, 16, 1, 1),
    "odd": (33, 17, 19, 3, 4),
    "sixteen-experts": (2, 20, 24, 16, 2),
}


@pytest.mark.parametrize("has_base", [True, False], ids=["base", "no-base"])
@pytest.mark.parametrize("shape", LOWRANK_SHAPES.values(), ids=LOWRANK_SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lowrank_merged_linear_matches_float64_reference(dtype, shape, has_base):
    x, w, A, B, base = lowrank_inputs(*shape, dtype, has_base)
    y = lowrank_op.lowrank_merged_linear(x, w, A, B, base)
    assert y.shape == (shape[0], shape[1]) and y.dtype == dtype
    expected = reference.lowrank_merged_linear(f64(x), f64(w), f64(A), f64(B), f64(base))
    torch.testing.assert_close(y.double(), expected, **TOL[dtype])


@pytest.mark.parametrize("has_base", [True, False], ids=["base", "no-base"])
@pytest.mark.parametrize("shape", LOWRANK_SHAPES.values(), ids=LOWRANK_SHAPES.keys())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_native_half_precision_lowrank_matches_float64_reference(dtype, shape, has_base):
    """The CPU path for half-precision models (kernels/native.py): its GEMMs in the operands' dtype, held to the
    float64 definition at the same tolerance as the kernels."""
    from moe_merge.kernels import native

    x, w, A, B, base = (t.cpu() if t is not None else None for t in lowrank_inputs(*shape, dtype, has_base))
    B_cat = B.transpose(0, 1).reshape(B.shape[1], -1)
    y = native.lowrank_merged_linear(x, w, A, B_cat, base)
    assert y.shape == (shape[0], shape[1]) and y.dtype == dtype
    expected = reference.lowrank_merged_linear(f64(x), f64(w), f64(A), f64(B), f64(base))
    torch.testing.assert_close(y.double(), expected, **TOL[dtype])


@pytest.mark.parametrize(
    ("env", "dtype", "expected"),
    [
        (None, torch.bfloat16, "native"),
        (None, torch.float16, "native"),
        (None, torch.float32, "torch"),
        ("torch", torch.bfloat16, "torch"),
    ],
)
def test_half_precision_off_cuda_runs_the_native_lowrank_path(env, dtype, expected, monkeypatch):
    from moe_merge.kernels import native

    calls = []
    monkeypatch.setattr(native, "lowrank_merged_linear", lambda *args: calls.append("native"))
    monkeypatch.setattr(reference, "lowrank_merged_linear", lambda *args: calls.append("torch"))
    if env is not None:
        monkeypatch.setenv(dispatch.ENV_VAR, env)
    x, w, A, B, base = (t.cpu() for t in lowrank_inputs(1, 16, 16, 1, 1, dtype, True))
    kernels.lowrank_merged_linear(x, w, A, B, base)
    assert calls == [expected]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k_split", [2, 5])
def test_lowrank_split_over_k_adds_up(k_split, dtype):
    x, w, A, B, base = lowrank_inputs(*LOWRANK_SHAPES["odd"], dtype, True)
    y = lowrank_op._lowrank_merged_linear(x, w, A, B, base, k_split=k_split)
    assert y.dtype == dtype
    torch.testing.assert_close(
        y.double(), reference.lowrank_merged_linear(f64(x), f64(w), f64(A), f64(B), f64(base)), **TOL[dtype]
    )


def test_the_interpreter_takes_the_gpu_dot_for_fp16_and_upcasts_only_bf16():
    """Which tl.dot a launch uses: fp16 operands as on a GPU (covered by every fp16 test above), bf16 upcast to fp32
    under the interpreter only (its bf16 dot is wrong); on a GPU only fp32 upcasts."""
    assert kernel_utils.fp32_dot(torch.float32)
    assert not kernel_utils.fp32_dot(torch.float16)
    assert kernel_utils.fp32_dot(torch.bfloat16) == kernel_utils.INTERPRETER


def test_lowrank_takes_any_strides():
    x, w, A, B, base = lowrank_inputs(*LOWRANK_SHAPES["odd"], torch.float16, True)
    expected = reference.lowrank_merged_linear(f64(x), f64(w), f64(A), f64(B), f64(base))
    y = lowrank_op.lowrank_merged_linear(*map(noncontiguous, (x, w, A, B, base)))
    torch.testing.assert_close(y.double(), expected, **TOL[torch.float16])


def test_lowrank_errors_name_the_argument():
    x, w, A, B, base = lowrank_inputs(*LOWRANK_SHAPES["odd"], torch.float32, True)
    with pytest.raises(ValueError, match=r"B has shape \[3, 17, 3\]; expected \[E=3, N, r=4\]"):
        lowrank_op.lowrank_merged_linear(x, w, A, B[..., :3], base)


# --- merge_weights_into ------------------------------------------------------------------------------

# (S, N, K, E): one sequence, odd sizes, more sequences than one program merges
MATERIALIZE_SHAPES = {"one-sequence": (1, 16, 16, 1), "odd": (3, 17, 19, 3), "many-sequences": (9, 8, 33, 2)}


@pytest.mark.parametrize("has_base", [True, False], ids=["base", "no-base"])
@pytest.mark.parametrize("shape", MATERIALIZE_SHAPES.values(), ids=MATERIALIZE_SHAPES.keys())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_weights_into_matches_float64_reference(dtype, shape, has_base):
    S, N, K, E = shape
    deltas, base, w = rand(E, N, K, dtype=dtype), rand(N, K, dtype=dtype) if has_base else None, softmax_weights(S, E)
    merged = materialize_op.merge_weights_into(base, deltas, w)
    assert merged.shape == (S, N, K) and merged.dtype == dtype
    torch.testing.assert_close(
        merged.double(), reference.merge_weights_into(f64(base), f64(deltas), f64(w)), **TOL[dtype]
    )


def test_merge_weights_into_takes_any_strides():
    S, N, K, E = MATERIALIZE_SHAPES["odd"]
    deltas, base, w = rand(E, N, K), rand(N, K), softmax_weights(S, E)
    merged = materialize_op.merge_weights_into(noncontiguous(base), noncontiguous(deltas), noncontiguous(w))
    torch.testing.assert_close(
        merged.double(), reference.merge_weights_into(f64(base), f64(deltas), f64(w)), **TOL[torch.float32]
    )


def test_custom_ops_are_registered_consistently():
    """torch.library.opcheck: schema, fake (torch.compile) and autograd registration of each op."""
    x, w, deltas, base = (t.requires_grad_() for t in dense_inputs(3, 16, 16, 2, torch.float32, True))
    A, B = rand(2, 2, 16).requires_grad_(), rand(2, 16, 2).requires_grad_()
    torch.library.opcheck(merged_linear_op.merged_linear, (x, w, deltas, base))
    torch.library.opcheck(lowrank_op.lowrank_merged_linear, (x, w, A, B, base))
    torch.library.opcheck(materialize_op.merge_weights_into, (base, deltas, w[:2]))


# --- autograd ----------------------------------------------------------------------------------------


def test_references_pass_gradcheck_in_float64():
    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    x, w, deltas, base, A, B = leaf(3, 5), leaf(3, 2), leaf(2, 4, 5), leaf(4, 5), leaf(2, 3, 5), leaf(2, 4, 3)
    assert torch.autograd.gradcheck(reference.merged_linear, (x, w, deltas, base))
    assert torch.autograd.gradcheck(reference.merged_linear, (x, w, deltas, None))
    assert torch.autograd.gradcheck(reference.lowrank_merged_linear, (x, w, A, B, base))
    assert torch.autograd.gradcheck(reference.merge_weights_into, (base, deltas, w))
    xs = leaf(3, 2, 5)  # 3 sequences of 2 tokens, on the reference path (CPU, float64)
    for strategy in ("kconcat", "materialize"):
        assert torch.autograd.gradcheck(
            lambda x_, w_, strategy=strategy: kernels.merged_linear_per_sequence(
                x_, w_, deltas, base, strategy=strategy
            ),
            (xs, w),
        )


def grads(fn, inputs, grad_out):
    """The gradients of (fn(*inputs)·grad_out).sum() for every input that is not None."""
    inputs = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    return torch.autograd.grad(fn(*inputs), [t for t in inputs if t is not None], grad_out)


@pytest.mark.parametrize("has_base", [True, False], ids=["base", "no-base"])
def test_merged_linear_gradients_match_reference(has_base):
    inputs, grad_out = dense_inputs(*SHAPES["odd"], torch.float32, has_base), rand(*SHAPES["odd"][:2])
    for got, want in zip(
        grads(merged_linear_op.merged_linear, inputs, grad_out), grads(reference.merged_linear, inputs, grad_out)
    ):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_lowrank_gradients_match_reference():
    inputs, grad_out = lowrank_inputs(*LOWRANK_SHAPES["odd"], torch.float32, True), rand(*LOWRANK_SHAPES["odd"][:2])
    for got, want in zip(
        grads(lowrank_op.lowrank_merged_linear, inputs, grad_out),
        grads(reference.lowrank_merged_linear, inputs, grad_out),
    ):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_merge_weights_into_gradients_match_reference():
    S, N, K, E = MATERIALIZE_SHAPES["odd"]
    inputs, grad_out = (rand(N, K), rand(E, N, K), softmax_weights(S, E)), rand(S, N, K)
    for got, want in zip(
        grads(materialize_op.merge_weights_into, inputs, grad_out),
        grads(reference.merge_weights_into, inputs, grad_out),
    ):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# --- dispatch ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["kconcat", "materialize"])
def test_per_sequence_strategies_match_reference(strategy, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    S, T, N, K, E = 3, 5, 17, 19, 2
    x, w, deltas, base = rand(S, T, K), softmax_weights(S, E), rand(E, N, K, scale=K**-0.5), rand(N, K, scale=K**-0.5)
    y = kernels.merged_linear_per_sequence(x, w, deltas, base, strategy=strategy)
    expected = reference.merged_linear(f64(x).reshape(S * T, K), f64(w).repeat_interleave(T, 0), f64(deltas), f64(base))
    torch.testing.assert_close(y.double(), expected.view(S, T, N), **TOL[torch.float32])


def test_crossover_is_the_field_notes_rule():
    rates = dispatch.DeviceRates(bandwidth=3.0e12, matmul_flops=3.0e12 * 267)
    for S, E in [(1, 2), (8, 4), (64, 8)]:  # bf16: T* = 267·(E + 1 + 2S)/(E·S)
        assert kernels.crossover_tokens(S, E, rates=rates) == pytest.approx(267 * (E + 1 + 2 * S) / (E * S))
    assert kernels.crossover_tokens(4, 1, has_base=False) == float("inf")  # nothing to merge


@pytest.mark.parametrize(
    ("tokens", "sequences", "experts", "expected"),
    [
        (1, 64, 8, "kconcat"),  # decode
        (16, 8, 4, "kconcat"),
        (2048, 1, 4, "materialize"),  # long prefill
        (512, 8, 8, "materialize"),
    ],
)
def test_strategy_follows_the_crossover(tokens, sequences, experts, expected):
    assert kernels.choose_strategy(tokens, sequences, experts) == expected


@pytest.mark.parametrize(
    ("device", "P", "b", "G", "sequences", "expected"),
    [
        ("cuda", 4096 * 4096, 2, 9, 1, True),  # one sequence reads a ninth of W0 and 8 deltas' bytes
        ("cuda", 4096 * 4096, 2, 9, 4, True),  # four ninths: forming the copies is repaid within the horizon
        ("cuda", 4096 * 14336, 2, 9, 4, False),  # above the copies' memory budget
        ("cpu", 768 * 2048, 4, 5, 1, True),
        ("cpu", 768 * 2048, 4, 5, 16, False),  # 16 copies take longer to read than K-concatenation over 5 weights
    ],
)
def test_decode_keeps_per_sequence_weights_where_they_pay_within_the_horizon(device, P, b, G, sequences, expected):
    """Dense task vectors: G = W0 and G - 1 deltas of P elements, b bytes each."""
    kept = kernels.Cost(sequences * P * b, 2 * sequences * P)
    form = kernels.Cost(G * P * b, 2 * sequences * G * P, dispatch.FORM_OPS)
    forming = kernels.Cost((G + sequences) * P * b, 2 * sequences * G * P, 2)
    assert kernels.keep_decode_weights(kept, form, forming, device=device) is expected


@pytest.mark.parametrize(("sequences", "expected"), [(1, True), (8, False)])
def test_a_low_rank_form_keeps_one_sequences_weight_only(sequences, expected):
    """Low-rank: a step reads about P either way, so one sequence keeps its weight for the ops it saves, and
    eight copies would read eight times the bytes."""
    P, b, factors = 4096 * 4096, 2, 8 * 16 * 2 * 4096
    kept = kernels.Cost(sequences * P * b, 2 * sequences * P)
    form = kernels.Cost((P + factors) * b, 2 * sequences * (P + factors), dispatch.FORM_OPS)
    forming = kernels.Cost((P + sequences * P) * b, 2 * sequences * 8 * 16 * P, 2)
    assert kernels.keep_decode_weights(kept, form, forming, device="cuda") is expected


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU tensors take Triton only under the interpreter")
@pytest.mark.parametrize(("env", "expected"), [(None, False), ("auto", False), ("torch", False), ("TRITON", True)])
def test_cpu_tensors_take_triton_only_when_forced(env, expected, monkeypatch):
    if env is not None:
        monkeypatch.setenv(dispatch.ENV_VAR, env)
    x = torch.zeros(2, 3)  # on CPU, with the interpreter on (this module)
    assert dispatch.use_triton(x) is expected


def test_bad_env_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="MOE_MERGE_KERNELS='cuda' is not a kernel backend; set it to one of auto, "):
        kernels.merged_linear(*dense_inputs(1, 16, 16, 1, torch.float32, True))


@pytest.mark.parametrize(
    ("public", "module", "op"),
    [
        ("merged_linear", merged_linear_op, "merged_linear"),
        ("lowrank_merged_linear", lowrank_op, "lowrank_merged_linear"),
        ("merge_weights_into", materialize_op, "merge_weights_into"),
    ],
)
@pytest.mark.parametrize("env", ["triton", "torch"])
def test_public_ops_run_the_backend_the_env_asks_for(public, module, op, env, monkeypatch):
    calls = []
    monkeypatch.setattr(module, op, lambda *args: calls.append("triton"))
    monkeypatch.setattr(reference, public, lambda *args: calls.append("torch"))
    monkeypatch.setenv(dispatch.ENV_VAR, env)
    x, w, deltas, base = dense_inputs(1, 16, 16, 1, torch.float32, True)
    args = {
        "merged_linear": (x, w, deltas, base),
        "lowrank_merged_linear": (x, w, deltas, deltas, base),
        "merge_weights_into": (base, deltas, w),
    }[public]
    getattr(kernels, public)(*args)
    assert calls == [env]


def run_python(script: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", dispatch.ENV_VAR)}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={**clean, **env})


@pytest.mark.skipif(DEVICE == "cuda", reason="checks a machine without a GPU")
def test_forcing_triton_on_cpu_without_the_interpreter_says_how():
    result = run_python(
        "import torch, moe_merge.kernels as k; k.merged_linear(torch.ones(1, 2), torch.ones(1, 1), "
        "torch.ones(1, 3, 2))",
        MOE_MERGE_KERNELS="triton",
    )
    assert result.returncode != 0
    assert "set TRITON_INTERPRET=1 before moe_merge's kernels are first used" in result.stderr


def test_forcing_triton_without_triton_installed_says_how():
    script = (
        "import sys; sys.modules['triton'] = None\n"  # make `import triton` fail
        "import torch, moe_merge.kernels as k\n"
        "args = torch.ones(1, 2), torch.ones(1, 1), torch.ones(1, 3, 2)\n"
        "assert k.merged_linear(*args).shape == (1, 3)  # auto on CPU: the reference\n"
        "import os; os.environ['MOE_MERGE_KERNELS'] = 'triton'\n"
        "k.merged_linear(*args)\n"
    )
    result = run_python(script)
    assert result.returncode != 0 and "AssertionError" not in result.stderr, result.stderr[-2000:]
    assert "the Triton kernels need triton" in result.stderr and "pip install 'moe-merge[triton]'" in result.stderr
