"""Run a recipe's prompts through the model being written and capture what its routers read: one runner for both
assembly paths.

The model reads its weights back from the checkpoint being written, one block at a time (lazy.py), so what the
routers are fitted on is what the checkpoint computes, and peak memory is one block. Prompts come in groups, each
one expert's: a calibration pass routes every row one-hot to its group's expert (perfect routing: the states that
expert's router must recognise); an eval pass routes as the finished model does.

Right padding: each prompt's real tokens sit at positions 0..n-1, as when it runs alone, and its last real token is
where `TokenSet.last_tokens` looks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moe_merge.routers.prompt_init import TokenSet


@dataclass
class PromptBatch:
    """Groups of prompts in one right-padded batch."""

    ids: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T], 1 for real tokens
    experts: torch.Tensor  # [B], the expert each row's group belongs to
    sizes: list[int]  # rows per group

    def forced(self, num_experts: int) -> torch.Tensor:
        """One-hot merge weights [B, E]: each row routed to its group's expert."""
        return nn.functional.one_hot(self.experts, num_experts).float()


def encode(tokenizer, groups: list[tuple[list[str], int]]) -> PromptBatch:
    """One batch of every group's prompts; a group is (prompts, expert)."""
    enc = tokenizer([p for ps, _ in groups for p in ps], return_tensors="pt", padding=True, padding_side="right")
    experts = torch.tensor([e for ps, e in groups for _ in ps], dtype=torch.long)
    return PromptBatch(enc["input_ids"], enc["attention_mask"], experts, [len(ps) for ps, _ in groups])


@torch.no_grad()
def capture(
    modules: list[nn.Module], run: Callable[[], object], batch: PromptBatch, output: bool = False
) -> list[list[TokenSet]]:
    """What each of `modules` reads (with `output`, returns first) while `run()` runs `batch`, in float32: per
    module, one TokenSet per group. A module that sees tokens flattened ([B·T, D]) gets them back as [B, T, D]; one
    that sees each row pooled ([B, D]) gets [B, 1, D], its mask all ones."""
    B, T = batch.ids.shape
    captured: list[torch.Tensor | None] = [None] * len(modules)

    def hook(i):
        def grab(_module, args, out=None):
            x = (out[0] if isinstance(out, tuple) else out) if output else args[0]
            captured[i] = x.detach().float().cpu()

        return grab

    handles = [
        m.register_forward_hook(hook(i)) if output else m.register_forward_pre_hook(hook(i))
        for i, m in enumerate(modules)
    ]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    out = []
    for i, x in enumerate(captured):
        if x is None:
            raise RuntimeError(f"internal error: module {i} ({type(modules[i]).__name__}) did not run on the prompts")
        if x.dim() == 2:  # tokens flattened [B·T, D], or rows pooled [B, D]
            x = x.view(B, x.shape[0] // B, -1)
        mask = batch.mask if x.shape[1] == T else torch.ones(B, 1)
        out.append([TokenSet(s, m) for s, m in zip(x.split(batch.sizes), mask.split(batch.sizes))])
    return out
