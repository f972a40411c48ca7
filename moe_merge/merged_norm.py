"""Merged RMSNorm gains and merged token embeddings: the parts of a decoder that are not linear layers,
merged per input like the linear ones.

Full fine-tunes move the embedding table, every norm and the head; a static average of those is what
kept block and model levels from recovering their experts. Both modules take their merge weights as an argument,
as the merged linears do, and never form a merged table:
- `MergedNorm`: RMSNorm(x) · g with g = Σ_e w_e g_e (full form) or g0 + Σ_e w_e (g_e − g0) (dense); Gemma's
  norms store w and scale by (1 + w), so for them the merge is of the stored w and the gain is 1 + that (the
  same thing wherever the merge weights sum to one, and what task vectors on w mean otherwise);
- `MergedEmbedding`: Σ_e w_e E_e[token], the rows of a merged linear H -> V (`MergedLinear.rows`), so that
  a tied head is the very same module; times sqrt(hidden_size) for Gemma, as its own embedding does.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_merge.merged_linear import MergedLinear


class MergedNorm(nn.Module):
    """An RMSNorm whose gain is merged per input: x · rsqrt(mean(x²) + eps) · g (Llama, Mistral, Qwen2/3: the
    normed x is cast to the model's dtype, then scaled) or · (1 + g) in float32, then cast (Gemma, `unit_offset`)."""

    def __init__(self, hidden_size: int, num_experts: int, form: str, eps: float, unit_offset: bool = False):
        super().__init__()
        if form not in ("full", "dense"):
            raise ValueError(f"a merged norm is `full` or `dense`, not {form!r}")
        self.form, self.variance_epsilon, self.unit_offset = form, eps, unit_offset
        if form == "full":
            self.expert_weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        else:
            self.weight = nn.Parameter(torch.empty(hidden_size))
            self.delta_weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, form={self.form}, eps={self.variance_epsilon}, unit_offset={self.unit_offset}"
        )

    @property
    def num_experts(self) -> int:
        return (self.expert_weight if self.form == "full" else self.delta_weight).shape[0]

    def gain(self, w: torch.Tensor) -> torch.Tensor:
        """g for merge weights w [..., E] -> [..., H], in float32 or wider."""
        if self.form == "full":
            return w @ self.expert_weight.to(w.dtype)
        return self.weight.to(w.dtype) + w @ self.delta_weight.to(w.dtype)

    @torch.no_grad()
    def merged(self, w: torch.Tensor) -> tuple[torch.Tensor, None]:
        """The stored gain (Gemma: its w) for one fixed weight vector w [E] (for baking), in float32 or wider, and
        no bias."""
        stored = self.expert_weight if self.form == "full" else self.weight
        return self.gain(w.to(torch.promote_types(stored.dtype, torch.float32))), None

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [B, T, ..., H] with merge weights w [B, E] or [B, T, E]."""
        dtype = x.dtype
        h = x.to(torch.float32)  # as the families' RMSNorm computes it (float32 even for a float64 model)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        g = self.gain(w.to(x.device, torch.promote_types(w.dtype, torch.float32)))
        g = g.unsqueeze(1) if g.dim() == 2 else g  # [B, T or 1, H]
        g = g.view(*g.shape[:2], *([1] * (x.dim() - 3)), g.shape[-1])  # q/k norms see [B, T, heads, head_dim]
        stored = self.expert_weight if self.form == "full" else self.weight
        if self.unit_offset:  # Gemma: (x · (1 + w)) in float32, then the model's dtype
            return (h * (1.0 + g.to(stored.dtype).float())).to(dtype)
        return g.to(stored.dtype) * h.to(dtype)


class MergedEmbedding(nn.Module):
    """Token embeddings Σ_e w_e E_e[token], stored as the merged linear `table` (H -> V, a head's shape), times
    `scale` in the table's dtype where the family scales its embeddings (Gemma: sqrt(hidden_size))."""

    def __init__(self, table: MergedLinear, scale: float | None = None):
        super().__init__()
        self.table, self.scale = table, scale

    def forward(self, input_ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] with merge weights w [B, E] or [B, T, E]."""
        rows = self.table.rows(input_ids, w.to(input_ids.device))
        return (
            rows if self.scale is None else rows * torch.tensor(self.scale).to(rows.dtype)
        )  # as Gemma: float32, then cast
