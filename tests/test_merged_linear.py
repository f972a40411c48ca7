"""The merged linear layer equals the obvious per-sample reference in every form and path."""

from __future__ import annotations

import pytest
import torch

from moe_merge import merged_linear as ml
from moe_merge.merged_linear import MergedLinear

E, N, K, R = 3, 5, 7, 2


def _layer(form: str, bias: bool) -> MergedLinear:
    torch.manual_seed(0)
    layer = MergedLinear(K, N, E, form, rank=R if form == "lowrank" else None, bias=bias).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p)
    return layer


def _reference(layer: MergedLinear, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A Python loop over samples (and tokens), each with its own dense weight."""
    out = torch.empty(*x.shape[:2], N, dtype=x.dtype)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            weight, bias = layer.merged(w[b] if w.dim() == 2 else w[b, t])
            out[b, t] = x[b, t] @ weight.T + (bias if bias is not None else 0)
    return out


@pytest.mark.parametrize("form", ["full", "dense", "lowrank"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("tokens", [1, 4])
def test_batched_merging_equals_a_per_sample_loop(form, bias, per_token, tokens):
    layer = _layer(form, bias)
    x = torch.randn(4, tokens, K, dtype=torch.float64)
    w = torch.randn(4, tokens, E, dtype=torch.float64) if per_token else torch.randn(4, E, dtype=torch.float64)
    layer.merge_weights = w
    torch.testing.assert_close(layer(x), _reference(layer, x, w), rtol=0, atol=1e-12)


def test_materialised_and_k_concatenated_paths_agree(monkeypatch):
    layer = _layer("dense", True)
    x, w = torch.randn(3, 6, K, dtype=torch.float64), torch.randn(3, E, dtype=torch.float64)
    layer.merge_weights = w
    outs = []
    for choice in (True, False):
        monkeypatch.setattr(ml, "materialize_pays", lambda *a, c=choice: c)
        outs.append(layer(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-12)


def test_decode_never_materialises_on_cpu():
    assert not ml.materialize_pays(64, 1, 8, 4096, 4096, 2, torch.device("cpu"))
    assert ml.materialize_pays(4, 512, 8, 256, 256, 4, torch.device("cpu"))


def test_calling_without_merge_weights_is_an_error():
    with pytest.raises(RuntimeError, match="without merge weights"):
        _layer("dense", False)(torch.randn(1, 1, K, dtype=torch.float64))


def test_gradients_reach_the_merge_weights():
    layer = _layer("lowrank", True)
    w = torch.randn(2, E, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, K, dtype=torch.float64, requires_grad=True)

    def f(x, w):
        layer.merge_weights = w
        return layer(x)

    assert torch.autograd.gradcheck(f, (x, w))
