"""The merged linear layer equals the obvious per-sample reference in every form and path."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from moe_merge import kernels
from moe_merge import merged_linear as ml
from moe_merge.merged_linear import MergedLinear, merged_linear

E, N, K, R = 3, 5, 7, 2


@dataclass
class Experts:
    """E expert linear layers (W_e, b_e) fine-tuned from a base (W0, b0): what every form must merge."""

    W0: torch.Tensor
    b0: torch.Tensor
    W: torch.Tensor  # [E, N, K]
    b: torch.Tensor  # [E, N]


def _experts(form: str) -> Experts:
    g = torch.Generator().manual_seed(0)
    W0, b0 = torch.randn(N, K, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    if form == "lowrank":  # task vectors of rank R, which R factors hold exactly
        deltas = torch.randn(E, N, R, generator=g, dtype=torch.float64) @ torch.randn(
            E, R, K, generator=g, dtype=torch.float64
        )
    else:
        deltas = torch.randn(E, N, K, generator=g, dtype=torch.float64)
    return Experts(W0, b0, W0 + deltas, b0 + torch.randn(E, N, generator=g, dtype=torch.float64))


def _layer(form: str, bias: bool) -> MergedLinear:
    """The merged layer holding `_experts(form)`: E weights (full), W0 and E task vectors (dense), W0 and E factor
    pairs (lowrank)."""
    ex = _experts(form)
    layer = merged_linear(K, N, E, form, rank=R if form == "lowrank" else None, bias=bias).double()
    with torch.no_grad():
        if form == "full":
            layer.expert_weight.copy_(ex.W)
            if bias:
                layer.expert_bias.copy_(ex.b)
            return layer
        layer.weight.copy_(ex.W0)
        if bias:
            layer.bias.copy_(ex.b0)
            layer.delta_bias.copy_(ex.b - ex.b0)
        if form == "dense":
            layer.delta_weight.copy_(ex.W - ex.W0)
        else:
            U, S, Vh = torch.linalg.svd(ex.W - ex.W0)
            layer.lora_B.copy_(U[..., :R] * S[:, None, :R])
            layer.lora_A.copy_(Vh[:, :R])
    return layer


def _reference(form: str, bias: bool, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A Python loop over samples (and tokens), each with its own dense weight formed from the experts themselves:
    Σ_e w_e W_e for full (no base), W0 + Σ_e w_e (W_e − W0) for the forms with a base."""
    ex = _experts(form)
    out = torch.empty(*x.shape[:2], N, dtype=x.dtype)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            mix = w[b] if w.dim() == 2 else w[b, t]
            if form == "full":
                weight, shift = sum(m * W for m, W in zip(mix, ex.W)), sum(m * v for m, v in zip(mix, ex.b))
            else:
                weight = ex.W0 + sum(m * (W - ex.W0) for m, W in zip(mix, ex.W))
                shift = ex.b0 + sum(m * (v - ex.b0) for m, v in zip(mix, ex.b))
            out[b, t] = x[b, t] @ weight.T + (shift if bias else 0)
    return out


@pytest.mark.parametrize("form", ["full", "dense", "lowrank"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("tokens", [1, 4])
def test_batched_merging_equals_a_per_sample_loop(form, bias, per_token, tokens):
    layer = _layer(form, bias)
    x = torch.randn(4, tokens, K, dtype=torch.float64)
    w = torch.randn(4, tokens, E, dtype=torch.float64) if per_token else torch.randn(4, E, dtype=torch.float64)
    torch.testing.assert_close(layer(x, w), _reference(form, bias, x, w), rtol=0, atol=1e-12)


def test_materialized_and_k_concatenated_paths_agree(monkeypatch):
    layer = _layer("dense", True)
    x, w = torch.randn(3, 6, K, dtype=torch.float64), torch.randn(3, E, dtype=torch.float64)
    outs = []
    for choice in ("materialize", "kconcat"):
        monkeypatch.setattr(ml.kernels, "choose_strategy", lambda *a, c=choice, **k: c)
        outs.append(layer(x, w))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("form", ["full", "dense", "lowrank"])
def test_runs_of_sequences_sharing_their_weights_share_one_materialized_weight(monkeypatch, form):
    layer = _layer(form, True)
    monkeypatch.setattr(ml.kernels, "choose_strategy", lambda *a, **k: "materialize")
    rows = torch.randn(2, E, dtype=torch.float64)
    w = rows[torch.tensor([0, 0, 1, 1, 0])]  # three runs of two distinct vectors over five sequences
    x = torch.randn(5, 3, K, dtype=torch.float64)
    torch.testing.assert_close(layer(x, w), _reference(form, True, x, w), rtol=0, atol=1e-12)
    calls = []
    real = ml.kernels.merge_weights_into
    monkeypatch.setattr(ml.kernels, "merge_weights_into", lambda w0, s, v: calls.append(len(v)) or real(w0, s, v))
    layer(x, w)
    assert calls == ([1, 1, 1] if form != "lowrank" else [])  # one weight per run, formed one run at a time


def test_decode_never_materializes_whatever_the_batch_dtype_or_device():
    for device in ("cpu", "cuda"):
        assert kernels.choose_strategy(1, 4096, 16, element_size=2, device=device) == "kconcat"


def test_decode_never_materializes_on_cpu():
    assert (
        kernels.choose_strategy(1, 64, 8, element_size=2, device="cpu", weight_bytes=64 * 4096 * 4096 * 2) == "kconcat"
    )
    assert (
        kernels.choose_strategy(512, 4, 8, element_size=4, device="cpu", weight_bytes=4 * 256 * 256 * 4)
        == "materialize"
    )


def test_the_layer_asks_dispatch_with_its_device_and_copy_size(monkeypatch):
    """One cost model: the layer passes its device (whose measured rates decide) and what the copies would take."""
    calls = []
    real = kernels.choose_strategy
    monkeypatch.setattr(ml.kernels, "choose_strategy", lambda *a, **k: calls.append(k) or real(*a, **k))
    layer = _layer("dense", False)
    layer(torch.randn(3, 6, K, dtype=torch.float64), torch.randn(3, E, dtype=torch.float64))
    assert calls == [dict(has_base=True, element_size=8, device=torch.device("cpu"), weight_bytes=3 * N * K * 8)]
    assert kernels.dispatch.rates_for("cpu") is kernels.dispatch.RATES["cpu"]
    assert kernels.dispatch.RATES["cpu"].source.startswith("measured")


def test_weights_that_need_gradients_never_form_a_copy_per_sequence(monkeypatch):
    """Training routers: autograd would keep every W_b until the backward pass, B copies of each routed weight
    (measured: 2.6x the peak memory and 4.8x the step time of K-concatenation on a 200M model)."""
    monkeypatch.setattr(ml.kernels, "choose_strategy", lambda *a, **k: "materialize")
    formed = []
    monkeypatch.setattr(ml.kernels, "merge_weights_into", lambda *a: formed.append(a))
    layer = _layer("dense", False)
    w = torch.randn(3, E, dtype=torch.float64, requires_grad=True)
    layer(torch.randn(3, 6, K, dtype=torch.float64), w).sum().backward()
    assert not formed and w.grad is not None and w.grad.abs().sum() > 0


def test_gradients_reach_the_merge_weights():
    layer = _layer("lowrank", True)
    w = torch.randn(2, E, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, K, dtype=torch.float64, requires_grad=True)

    def f(x, w):
        return layer(x, w)

    assert torch.autograd.gradcheck(f, (x, w))


@pytest.mark.parametrize("form", ["full", "dense", "lowrank"])
@pytest.mark.parametrize("tokens", [1, 4])  # decode (K-concatenation) and prefill (per-sequence weights)
def test_bf16_layers_take_float32_merge_weights_and_do_not_rescale(form, tokens):
    """bf16 rounds 0.3 to 0.30078 and 0.4 to 0.40039: the mix below would sum to 1.00195 and, in the full form
    (no base), scale the whole layer by it. Merge weights stay float32 down to the kernels instead."""
    torch.manual_seed(0)
    layer = merged_linear(256, 128, E, form, rank=8 if form == "lowrank" else None, bias=True)
    for p in layer.parameters():
        torch.nn.init.normal_(p)
    layer.to(torch.bfloat16)
    w = torch.tensor([[0.3, 0.3, 0.4]] * 8)
    assert w.to(torch.bfloat16).double().sum(-1)[0].item() == pytest.approx(1.00195, abs=1e-5)
    x = torch.randn(8, tokens, 256).to(torch.bfloat16)
    with torch.no_grad():
        got = layer(x, w).double()
        weight, bias = layer.merged(w[0].double())  # every row has the same mix
    want = x.double() @ weight.double().T + bias.double()
    scale = (got * want).sum() / (want * want).sum()  # the least-squares factor from the reference to the output
    assert abs(scale.item() - 1) < 5e-4, scale.item()


def test_twin_over_lora_factors_merges_shared_plus_exclusive_parts():
    """With `offset` λ the factors are LoRA adapters and W0 the base (twin over LoRA experts): W = W0 + Σ_j (w_j +
    λ(1 − Σ w)) B_j A_j, which is the shared task arithmetic W0 + λ Σ_j B_j A_j plus Σ_e w_e (θ_e − shared); one-hot
    weights give an adapter's own weight, and zero weights the shared merge."""
    torch.manual_seed(0)
    layer = merged_linear(K, N, E, "lowrank", rank=R, offset=0.3).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p)
    deltas = torch.einsum("enr,erk->enk", layer.lora_B, layer.lora_A)  # each adapter's B·A
    shared = layer.weight + 0.3 * deltas.sum(0)
    x = torch.randn(4, 1, K, dtype=torch.float64)
    w = torch.randn(4, E, dtype=torch.float64)
    with torch.no_grad():
        got = layer(x, w)
    for b in range(4):
        weight = shared + torch.einsum("e,enk->nk", w[b], deltas + layer.weight - shared)  # Σ_e w_e (θ_e − shared)
        torch.testing.assert_close(got[b, 0], x[b, 0] @ weight.T, rtol=0, atol=1e-12)
    one_hot, zeros = torch.eye(E, dtype=torch.float64)[1], torch.zeros(E, dtype=torch.float64)
    torch.testing.assert_close(layer.merged(one_hot)[0], layer.weight + deltas[1], rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.merged(zeros)[0], shared, rtol=0, atol=1e-12)


def test_the_kept_side_by_side_factors_follow_an_in_place_update():
    """The native half-precision path reads a copy of B laid out side by side; changing B in place makes a new one."""
    torch.manual_seed(0)
    layer = merged_linear(64, 32, E, "lowrank", rank=4).to(torch.bfloat16)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, w = torch.randn(8, 1, 64).to(torch.bfloat16), torch.softmax(torch.randn(8, E), -1)
    with torch.no_grad():
        before = layer(x, w)
        layer.lora_B.mul_(3)
        after = layer(x, w)
        want = x[:, 0].double() @ layer.merged(w[0].double())[0].double().T
    assert not torch.equal(before, after)
    torch.testing.assert_close(after[0, 0].double(), want[0], rtol=2e-2, atol=2e-2)
