"""The merged linear layers every parameter-merging method uses: y = x·(W0 + Σ_e w_e·Δ_e)ᵀ + b.

One class per form, chosen when the model is built (`merged_linear`):
- `FullMergedLinear`: E expert weights and no W0 (SMEAR with dense experts: Σ p_e θ_e, one matrix fewer);
- `DenseMergedLinear`: W0 and E dense task vectors;
- `LowRankMergedLinear`: W0 and E low-rank task vectors B_e·A_e (LoRA or SVD factors), never reconstructed.
W0 is the base's weight, or the static merge for methods that add their task vectors to it (twin). Twin over LoRA
adapters needs neither: its shared task arithmetic is θ0 + λ Σ_j B_j A_j and each exclusive part θ_e − shared is
B_e A_e − λ Σ_j B_j A_j, so shared + Σ_e w_e (θ_e − shared) = θ0 + Σ_j (w_j + λ (1 − Σ_e w_e)) B_j A_j: W0 = the
base and the adapters' own factors, exact at their rank and in any dtype (`offset` = λ).

Every call takes its merge weights as an argument: [B, E] per sequence or [B, T, E] per token.
Decode (one token per sequence) never loops over samples: it uses x·W0ᵀ + Σ_e w_e (x·Δ_eᵀ), which reads
each weight once for the whole batch, or, where `kernels.keep_decode_weights` says it is cheaper (a few
sequences, or a small model where every op's overhead counts), each sequence's W_b, formed by the prefill (which
then runs on it too) and kept in the generation's `RoutingState` (a layer of the KV cache, routing_state.py) under
the module's `slot`. A
prefill with per-sequence weights may materialize W_b once per sequence and run one GEMM, when
`kernels.choose_strategy` says so.

Each form also gives, for one fixed weight vector, its merged weight (`merged`, for bake) and that
weight as a dense part plus low-rank factors (`parts`, for export-lora), so neither export looks
inside the layer.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_merge import kernels
from moe_merge.methods import FORMS
from moe_merge.routing_state import RoutingState

Factors = tuple[torch.Tensor, torch.Tensor]  # A [r, K], B [N, r]


class MergedLinear(nn.Module):
    """What every form shares: shapes, the forward pass and the slot its kept decode weights take; each form gives
    its W0, its stack of weights or deltas, and its bias."""

    form: str

    def __init__(self, in_features: int, out_features: int, num_experts: int):
        super().__init__()
        self.in_features, self.out_features, self.num_experts = in_features, out_features, num_experts
        self.slot = (
            0  # its index among the model's merged linears (MoEMergeModel numbers them): where RoutingState keeps W_b
        )

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, form={self.form}"

    def forward(self, x: torch.Tensor, w: torch.Tensor, state: RoutingState | None = None) -> torch.Tensor:
        """x [B, T, K] with merge weights w [B, E] (per sequence) or [B, T, E] (per token), float32 or wider down to
        the kernels. `state`: a generation's kept per-sequence weights (given where w are the weights it holds)."""
        B, T, K = x.shape
        w = w.to(x.device)  # with device_map the router may sit on another device
        kept = self._kept(w, x, state) if state is not None and (T == 1 or state.forming) and w.dim() == 2 else None
        if kept is not None:
            y = nn.functional.linear(x, kept[0]) if B == 1 else torch.bmm(x, kept.transpose(1, 2))
        elif (
            w.dim() == 2
            and T > 1
            and self._stack() is not None
            and not w.requires_grad
            and kernels.choose_strategy(
                T,
                B,
                self.num_experts,
                has_base=self._w0() is not None,
                element_size=x.element_size(),
                device=x.device,
                weight_bytes=B * self.out_features * K * x.element_size(),
            )
            == "materialize"
        ):
            y = self._materialized(x, w)
        elif T == 1 and w.dim() == 2:  # a decode step: one token per sequence, its weights as they are
            y = self._per_token(x.view(B, K), w).view(B, 1, -1)
        else:
            w_tok = w.unsqueeze(1).expand(B, T, -1) if w.dim() == 2 else w  # [B, T, E]
            y = self._per_token(x.reshape(B * T, K), w_tok.reshape(B * T, -1)).view(B, T, -1)
        bias = self._merged_bias(w if w.dim() == 3 else w.unsqueeze(1))  # [B, T or 1, N]
        return y if bias is None else y + bias.to(self.stored_dtype)

    @property
    def has_bias(self) -> bool:
        return getattr(self, "expert_bias", None) is not None or getattr(self, "bias", None) is not None

    def _materialized(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x·W_bᵀ with W_b = W0 + Σ_e w_be Δ_e formed per sequence, for weights that need no gradient (training
        the routers keeps to K-concatenation: autograd would hold every W_b until the backward pass, B copies of
        every routed weight). A run of consecutive sequences with the same weights (beams, a merge search scoring
        each candidate on many rows, assembly's prompts forced to their expert) shares one W and one GEMM, one
        run at a time."""
        if len(w) > 1:
            starts = torch.cat([w.new_ones(1, dtype=torch.bool), (w[1:] != w[:-1]).any(-1)]).nonzero().squeeze(1)
            if len(starts) < len(w):
                bounds = starts.tolist() + [len(w)]
                return torch.cat(
                    [
                        x[a:b] @ kernels.merge_weights_into(self._w0(), self._stack(), w[a : a + 1])[0].T
                        for a, b in zip(bounds, bounds[1:])
                    ]
                )
        return torch.bmm(x, kernels.merge_weights_into(self._w0(), self._stack(), w).transpose(1, 2))

    def _per_token(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return kernels.merged_linear(x, w, self._stack(), self._w0())

    def _kept(self, w: torch.Tensor, x: torch.Tensor, state: RoutingState) -> torch.Tensor | None:
        """Each sequence's merged weight [B, N, K] for its per-sequence weights w [B, E], kept in `state`; None where
        reading the form's own tensors every step is cheaper. Decided once, by the prefill (so that every decode step
        finds the state as the next one will: one compiled graph), else by the first decode step."""
        if not state.decided[self.slot]:
            state.keep(self.slot, self._materialize(w) if self._keeps(w, x) else None)
        return state.kept[self.slot]

    def _keeps(self, w: torch.Tensor, x: torch.Tensor) -> bool:
        """Whether decode steps should run on the B sequences' merged weights (`kernels.keep_decode_weights`)."""
        S, P, b = len(w), self.in_features * self.out_features, x.element_size()
        kept = kernels.Cost(S * P * b, 2 * S * P)
        return kernels.keep_decode_weights(kept, *self._decode_costs(S, b), device=x.device)

    def _materialize(self, w: torch.Tensor) -> torch.Tensor:
        """W_b = W0 + Σ_e w_be Δ_e for weights w [B, E]: [B, N, K] in the stored dtype, summed in float32 or wider."""
        return kernels.merge_weights_into(self._w0(), self._stack(), w)

    def _decode_costs(self, S: int, b: int) -> tuple[kernels.Cost, kernels.Cost]:
        """(one decode step of S sequences on this form's own tensors, forming their S merged weights), at b bytes
        per element: both read W0 and the E weights or deltas; forming writes S weights of P elements."""
        read = sum(t.numel() for t in (self._w0(), self._stack()) if t is not None)
        P = self.in_features * self.out_features
        return (
            kernels.Cost(read * b, 2 * S * read, kernels.dispatch.FORM_OPS),
            kernels.Cost((read + S * P) * b, 2 * S * read, 2),
        )

    def _w0_or_stack(self) -> torch.Tensor:
        w = self._w0()
        if w is None:
            w = self._stack()
        assert w is not None, "every form stores W0 or the stacked expert weights"
        return w

    @property
    def stored_dtype(self) -> torch.dtype:
        """The dtype its weights are stored in (the model's)."""
        return self._w0_or_stack().dtype

    def _widest(self) -> torch.dtype:
        """float32, or the layer's dtype if wider: the dtype `merged` and `parts` compute in."""
        return torch.promote_types(self._w0_or_stack().dtype, torch.float32)

    # each form: its W0 (or None), its stack of dense weights or deltas (or None), its bias terms
    def _w0(self) -> torch.Tensor | None:
        raise NotImplementedError

    def _stack(self) -> torch.Tensor | None:
        raise NotImplementedError

    def _merged_bias(self, w: torch.Tensor) -> torch.Tensor | None:
        raise NotImplementedError

    def rows(self, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Rows `ids` [B, T] of the merged weight, for merge weights w [B, E] or [B, T, E]: an embedding lookup
        that reads E rows per token and never forms a merged table. [B, T, K] in the stored dtype."""
        w = (w.unsqueeze(1).expand(*ids.shape, -1) if w.dim() == 2 else w).to(self._widest())
        return self._rows(ids, w).to(self.stored_dtype)

    def _rows(self, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merged(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The dense weight and bias for one fixed weight vector w [E] (for baking), in float32 or wider."""
        raise NotImplementedError

    @torch.no_grad()
    def parts(self, w: torch.Tensor) -> tuple[list[torch.Tensor], list[Factors], torch.Tensor | None]:
        """The merged weight for w [E], in float64, as it is made: dense terms [N, K] (summed in this order),
        low-rank factors (A, B) whose B·A add to them, and the bias (or None). export-lora subtracts the base
        from the first term, so that a weight equal to the base gives an exact zero."""
        raise NotImplementedError


class FullMergedLinear(MergedLinear):
    """E expert weights θ_e: W = Σ_e w_e θ_e (the weights sum to one)."""

    form = "full"

    def __init__(self, in_features: int, out_features: int, num_experts: int, bias: bool = False):
        super().__init__(in_features, out_features, num_experts)
        self.expert_weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.expert_bias = nn.Parameter(torch.empty(num_experts, out_features)) if bias else None

    def _w0(self):
        return None

    def _stack(self):
        return self.expert_weight

    def _merged_bias(self, w):
        return None if self.expert_bias is None else w @ self.expert_bias.to(w.dtype)

    def _rows(self, ids, w):
        return torch.einsum("bte,ebtk->btk", w, self.expert_weight[:, ids].to(w.dtype))

    @torch.no_grad()
    def merged(self, w):
        dtype = self._widest()
        w = w.to(dtype)
        weight = torch.einsum("e,enk->nk", w, self.expert_weight.to(dtype))
        return weight, None if self.expert_bias is None else w @ self.expert_bias.to(dtype)

    @torch.no_grad()
    def parts(self, w):
        w = w.double()
        bias = None if self.expert_bias is None else w @ self.expert_bias.double()
        return [torch.einsum("e,enk->nk", w, self.expert_weight.double())], [], bias


class _WithW0(MergedLinear):
    """Forms that add routed task vectors to W0: `weight` (and `bias`) plus E bias deltas."""

    def __init__(self, in_features: int, out_features: int, num_experts: int, bias: bool):
        super().__init__(in_features, out_features, num_experts)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.delta_bias = nn.Parameter(torch.empty(num_experts, out_features)) if bias else None

    def _w0(self):
        return self.weight

    def _merged_bias(self, w):
        return self._bias(w, w.dtype)

    def _bias(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        if self.bias is None or self.delta_bias is None:
            return None
        return self.bias.to(dtype) + w @ self.delta_bias.to(dtype)


class DenseMergedLinear(_WithW0):
    """W0 and E dense task vectors Δ_e: W = W0 + Σ_e w_e Δ_e."""

    form = "dense"

    def __init__(self, in_features: int, out_features: int, num_experts: int, bias: bool = False):
        super().__init__(in_features, out_features, num_experts, bias)
        self.delta_weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))

    def _stack(self):
        return self.delta_weight

    def _rows(self, ids, w):
        return self.weight[ids].to(w.dtype) + torch.einsum("bte,ebtk->btk", w, self.delta_weight[:, ids].to(w.dtype))

    @torch.no_grad()
    def merged(self, w):
        dtype = self._widest()
        w = w.to(dtype)
        weight = self.weight.to(dtype) + torch.einsum("e,enk->nk", w, self.delta_weight.to(dtype))
        return weight, self._bias(w, dtype)

    @torch.no_grad()
    def parts(self, w):
        w = w.double()
        return (
            [self.weight.double(), torch.einsum("e,enk->nk", w, self.delta_weight.double())],
            [],
            self._bias(w, torch.float64),
        )


class LowRankMergedLinear(_WithW0):
    """W0 and E low-rank task vectors B_e·A_e of rank r: W = W0 + Σ_e c_e B_e A_e, never formed in the forward, with
    c = w, or c_e = w_e + offset · (1 − Σ w) (twin over LoRA adapters: see the module's docstring)."""

    form = "lowrank"

    def __init__(
        self, in_features: int, out_features: int, num_experts: int, rank: int, bias: bool = False, offset: float = 0.0
    ):
        super().__init__(in_features, out_features, num_experts, bias)
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_features))
        self.lora_B = nn.Parameter(torch.empty(num_experts, out_features, rank))
        self.offset = offset
        self._b_cat: tuple[tuple, torch.Tensor] | None = None  # B's experts side by side, for the native path

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_A.shape[1]}" + (
            f", offset={self.offset}" if self.offset else ""
        )

    def coefficients(self, w: torch.Tensor) -> torch.Tensor:
        """What each expert's factors are multiplied by, for merge weights w [..., E]."""
        return torch.add(w, 1 - w.sum(-1, keepdim=True), alpha=self.offset) if self.offset else w

    def _stack(self):
        return None  # the factors are multiplied, never stacked into dense deltas

    def _per_token(self, x, w):
        return kernels.lowrank_merged_linear(
            x, self.coefficients(w), self.lora_A, self.lora_B, self.weight, B_cat=self.b_cat()
        )

    def b_cat(self) -> torch.Tensor:
        """[N, E·r]: the B_e side by side, a copy kept while B stays as it is (its storage and version: an in-place
        update or a move makes a new one); B's own layout where it takes gradients, and in a compiled graph, which
        cannot compare storages and lays the operand out itself."""
        B = self.lora_B
        if (B.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
            return B.transpose(0, 1).reshape(B.shape[1], -1)
        key = (B.data_ptr(), B._version, B.dtype, B.device)
        if self._b_cat is None or self._b_cat[0] != key:
            self._b_cat = (key, B.detach().transpose(0, 1).reshape(B.shape[1], -1).contiguous())
        return self._b_cat[1]

    def _materialize(self, w):
        dtype = self._widest()
        low = torch.einsum(
            "be,enr,erk->bnk", self.coefficients(w.to(dtype)), self.lora_B.to(dtype), self.lora_A.to(dtype)
        )
        return (self.weight.to(dtype) + low).to(self.stored_dtype)

    def _decode_costs(self, S, b):
        E, r, _ = self.lora_A.shape
        read = self.weight.numel() + self.lora_A.numel() + self.lora_B.numel()
        step = kernels.Cost(read * b, 2 * S * read, kernels.dispatch.FORM_OPS)
        return step, kernels.Cost((read + S * self.weight.numel()) * b, 2 * S * E * r * self.weight.numel(), 2)

    def _rows(self, ids, w):
        low = torch.einsum(
            "bte,ebtr,erk->btk", self.coefficients(w), self.lora_B[:, ids].to(w.dtype), self.lora_A.to(w.dtype)
        )
        return self.weight[ids].to(w.dtype) + low

    def _widest(self):
        return torch.promote_types(self.lora_A.dtype, torch.float32)

    @torch.no_grad()
    def merged(self, w):
        dtype = self._widest()
        w = w.to(dtype)
        c = self.coefficients(w)
        weight = self.weight.to(dtype) + torch.einsum("e,enr,erk->nk", c, self.lora_B.to(dtype), self.lora_A.to(dtype))
        return weight, self._bias(w, dtype)

    @torch.no_grad()
    def parts(self, w):
        w = w.double()
        c = self.coefficients(w)
        A, B = self.lora_A.double(), self.lora_B.double()
        factors = [(c[e] * A[e], B[e]) for e in range(self.num_experts) if c[e] != 0]
        return [self.weight.double()], factors, self._bias(w, torch.float64)


def merged_linear(
    in_features: int,
    out_features: int,
    num_experts: int,
    form: str,
    rank: int | None = None,
    bias: bool = False,
    offset: float = 0.0,
) -> MergedLinear:
    """The merged linear of `form` (full | dense | lowrank; lowrank needs its rank, and takes an `offset`)."""
    if form == "full":
        return FullMergedLinear(in_features, out_features, num_experts, bias)
    if form == "dense":
        return DenseMergedLinear(in_features, out_features, num_experts, bias)
    if form == "lowrank":
        if not rank:
            raise ValueError("a `lowrank` merged linear needs a rank")
        return LowRankMergedLinear(in_features, out_features, num_experts, rank, bias, offset)
    raise ValueError(f"unknown merged-linear form {form!r}; choose one of {', '.join(FORMS)}")
