"""What a generation keeps of its routing between steps, as one more layer of its KV cache.

Per-sequence routers decide at prefill; every decode step then needs each sequence's merge weights [B, R, E] and,
where the merged linears chose so, each sequence's merged weight W_b [B, N, K] (merged_linear.py). Kept in the
cache, they follow every batch operation generation applies to it: `reorder_cache` (beam search),
`batch_select_indices` and `batch_repeat_interleave` (rows dropped or repeated), `crop` (assisted decoding rolls
tokens back, not routing) and `reset`. The model finds the layer at the end of `cache.layers`
(`RoutingState.of`); the cache's own methods walk it with the attention layers.
"""

from __future__ import annotations

import torch


class RoutingState:
    """Per-sequence merge weights [B, R, E] and the kept merged weights, one entry per merged linear (its `slot`)."""

    is_sliding = False
    is_compileable = True
    is_croppable = True
    supports_early_init = False

    def __init__(self, num_slots: int):
        self.weights: torch.Tensor | None = None
        self.kept: list[torch.Tensor | None] = [None] * num_slots
        self.decided = [False] * num_slots  # whether slot i keeps W_b (in `kept`) or reads its own tensors (None)
        self.forming = False  # True during a prefill: merged linears that form W_b anyway keep them

    def __repr__(self) -> str:
        shape = None if self.weights is None else tuple(self.weights.shape)
        return f"RoutingState(weights={shape}, kept={sum(k is not None for k in self.kept)}/{len(self.kept)})"

    @classmethod
    def of(cls, cache, num_slots: int, create: bool) -> RoutingState | None:
        """The routing layer of `cache` (appended last, after the attention layers), created if asked."""
        if cache.layers and isinstance(cache.layers[-1], cls):
            return cache.layers[-1]
        if not create:
            return None
        state = cls(num_slots)
        cache.layers.append(state)
        return state

    def start(self) -> None:
        """A new prefill: forget the last sequences' routing."""
        self.weights, self.forming = None, True
        self.kept, self.decided = [None] * len(self.kept), [False] * len(self.kept)

    def keep(self, slot: int, merged: torch.Tensor | None) -> torch.Tensor | None:
        """Slot `slot`'s decision: its sequences' merged weights [B, N, K], or None to read its own tensors."""
        self.kept[slot], self.decided[slot] = merged, True
        return merged

    def nbytes(self) -> int:
        """The memory this state holds, in bytes (merge weights and kept weights)."""
        return sum(t.numel() * t.element_size() for t in (self.weights, *self.kept) if t is not None)

    def _apply(self, fn) -> None:
        self.weights = None if self.weights is None else fn(self.weights)
        self.kept = [None if k is None else fn(k) for k in self.kept]

    # the layer interface that Cache's batch-wide methods call on every layer
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens_to_remove: int) -> None:
        """Rolling tokens back keeps the routing: it was decided on the prompt."""

    def reset(self) -> None:
        self._apply(lambda t: None)
        self.decided, self.forming = [False] * len(self.kept), False

    def get_max_length(self) -> int:
        return -1

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass
