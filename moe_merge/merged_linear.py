"""The merged linear layer every dynamic method uses: y = x·(W0 + Σ_e w_e·Δ_e)ᵀ + b.

It holds one of three forms, chosen when the model is built:
- `full`: E expert weights and no base (SMEAR with dense experts: Σ p_e θ_e, one matrix fewer);
- `dense`: a base W0 and E dense task vectors;
- `lowrank`: a base W0 and E low-rank task vectors B_e·A_e (LoRA or SVD factors), never reconstructed.

The owning layer sets `merge_weights` before calling it: [B, E] per sequence or [B, T, E] per token.
Decode (one token per sequence) never loops over samples nor copies a weight per sample: it uses
x·W0ᵀ + Σ_e w_e (x·Δ_eᵀ), which reads each weight once for the whole batch. A long prefill with
per-sequence weights may instead materialise W_b once per sequence and run one GEMM (`materialize_pays`).
"""

from __future__ import annotations

import torch
from torch import nn

from moe_merge import kernels

FORMS = ("full", "dense", "lowrank")
# Above this, a per-sequence weight copy costs more memory than it saves time.
MATERIALIZE_BUDGET_BYTES = 256 * 2**20


def materialize_pays(batch: int, tokens: int, experts: int, out_features: int, in_features: int,
                     element_size: int, device: torch.device) -> bool:
    """Whether forming W_b = W0 + Σ_e w_be Δ_e per sequence beats the K-concatenated product.

    Per sequence, K-concatenation does (E+1)·T multiply-adds per weight element; materialising does
    E + T, plus writing and re-reading B weight copies. On a CPU (compute-bound) materialising wins
    from T = 2 if the copies fit the budget. On a GPU, decode is bandwidth-bound: K-concat reads
    (E+1)·P bytes, materialising (E+1+2B)·P, so it only pays once T > 267·(E+1+2B)/(E·B) (H100's
    ratio of bf16 FLOP/s to bytes/s: ~8e14 / 3.0e12).
    """
    if batch * out_features * in_features * element_size > MATERIALIZE_BUDGET_BYTES:
        return False
    if device.type == "cpu":
        return tokens >= 2
    return tokens > 267 * (experts + 1 + 2 * batch) / (experts * batch)


class MergedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, num_experts: int, form: str = "dense",
                 rank: int | None = None, bias: bool = False):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"unknown merged-linear form {form!r}; choose one of {', '.join(FORMS)}")
        if form == "lowrank" and not rank:
            raise ValueError("a `lowrank` merged linear needs a rank")
        self.in_features, self.out_features, self.num_experts, self.form = in_features, out_features, num_experts, form
        E, N, K = num_experts, out_features, in_features
        if form == "full":
            self.expert_weight = nn.Parameter(torch.empty(E, N, K))
            self.expert_bias = nn.Parameter(torch.empty(E, N)) if bias else None
        else:
            self.weight = nn.Parameter(torch.empty(N, K))
            self.bias = nn.Parameter(torch.empty(N)) if bias else None
            self.delta_bias = nn.Parameter(torch.empty(E, N)) if bias else None
            if form == "dense":
                self.delta_weight = nn.Parameter(torch.empty(E, N, K))
            else:
                self.lora_A = nn.Parameter(torch.empty(E, rank, K))
                self.lora_B = nn.Parameter(torch.empty(E, N, rank))
        self.merge_weights: torch.Tensor | None = None  # set by the owning layer for one call

    def extra_repr(self) -> str:
        rank = f", rank={self.lora_A.shape[1]}" if self.form == "lowrank" else ""
        return f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, form={self.form}{rank}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.merge_weights
        if w is None:
            raise RuntimeError("MergedLinear was called without merge weights; call it through its decoder layer")
        B, T, K = x.shape  # [B, T, K]; w stays float32 (or wider) down to the kernels
        w = w.to(x.device)  # with device_map the router may sit on another device
        base = None if self.form == "full" else self.weight
        deltas = self.expert_weight if self.form == "full" else getattr(self, "delta_weight", None)
        if w.dim() == 2 and deltas is not None and materialize_pays(
            B, T, self.num_experts, self.out_features, K, x.element_size(), x.device
        ):
            W = kernels.merge_weights_into(base, deltas, w)  # [B, N, K]
            y = torch.bmm(x, W.transpose(1, 2))
        else:
            w_tok = w.unsqueeze(1).expand(B, T, -1) if w.dim() == 2 else w  # [B, T, E]
            x2, w2 = x.reshape(B * T, K), w_tok.reshape(B * T, -1)
            if self.form == "lowrank":
                y = kernels.lowrank_merged_linear(x2, w2, self.lora_A, self.lora_B, base)
            else:
                y = kernels.merged_linear(x2, w2, deltas, base)
            y = y.view(B, T, -1)
        return y + self._merged_bias(w) if self._has_bias() else y

    def _has_bias(self) -> bool:
        return (self.expert_bias if self.form == "full" else self.bias) is not None

    def _merged_bias(self, w: torch.Tensor) -> torch.Tensor:
        w = w if w.dim() == 3 else w.unsqueeze(1)  # [B, T or 1, E]
        if self.form == "full":
            bias = w @ self.expert_bias.to(w.dtype)
        else:
            bias = self.bias.to(w.dtype) + w @ self.delta_bias.to(w.dtype)
        return bias.to(self._dtype())

    def _dtype(self) -> torch.dtype:
        return (self.expert_weight if self.form == "full" else self.weight).dtype

    @torch.no_grad()
    def merged(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dense weight and bias for one fixed weight vector w [E] (for baking), in float32 or wider."""
        dtype = torch.promote_types(self.lora_A.dtype if self.form == "lowrank" else next(self.parameters()).dtype, torch.float32)
        p = {k: v.to(dtype) for k, v in self.named_parameters() if v is not None}
        w = w.to(dtype)
        if self.form == "full":
            weight = torch.einsum("e,enk->nk", w, p["expert_weight"])
        elif self.form == "dense":
            weight = p["weight"] + torch.einsum("e,enk->nk", w, p["delta_weight"])
        else:
            weight = p["weight"] + torch.einsum("e,enr,erk->nk", w, p["lora_B"], p["lora_A"])
        bias = None
        if self._has_bias():
            bias = w @ p["expert_bias"] if self.form == "full" else p["bias"] + w @ p["delta_bias"]
        return weight, bias
