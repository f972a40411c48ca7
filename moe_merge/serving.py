"""Serving a dynamic model with transformers' own machinery: `transformers serve` and continuous batching.

`transformers serve OUT --trust-remote-code` loads a model class by name from the transformers module
(`config.architectures[0]`), so importing the model registers it there too (`register`).

Continuous batching (`generate_batch`, `transformers serve --continuous-batching`) packs every scheduled request into
one row of tokens (`cu_seq_lens_q`) over a paged KV cache, and calls the model with nothing per request. Three
small hooks make a per-request merge exact there, with no engine of our own:
- the model finds the requests of the batch it runs, in order, through the IO object of the batch processor,
  linked to the paged cache when the processor is made (`continuous_batching`);
- a request is routed from its own prompt when its prefill runs, and its merge weights [R, E] are kept on its
  `RequestState`: the scheduler drops them when the request finishes or is cancelled (a client gone mid-stream),
  with its KV blocks; a forked child copies them;
- a prompt is never split across batches (`WholePromptScheduler`), and prefix sharing, which skips a prompt's
  cached head, is off: the routers read the whole prompt in one forward, as the model alone does. A prompt longer
  than a batch holds is refused when it is added.
Sparse block and model levels keep a KV cache per expert layer, which the paged cache (built from the base
config) cannot hold: they are refused with the alternatives.
"""

from __future__ import annotations

import copy
import sys
import types
from dataclasses import dataclass

import torch
from transformers.generation.continuous_batching import scheduler as cb_scheduler

WEIGHTS = "moe_merge_weights"  # the RequestState attribute holding a request's merge weights [R, E]
IO = "moe_merge_io"  # the paged cache's link to its batch processor's inputs and outputs
SCHEDULER = "moe_merge_whole_prompts"


def register(model_class: type) -> None:
    """Make `transformers.<ModelClass>` resolve, as `transformers serve` looks the class up there by name. Some
    transformers imports put a new module object under `sys.modules["transformers"]` (importing
    `transformers.modeling_layers` does, in 5.24), so every `transformers` module object a loaded module holds
    gets the name, the server's included."""
    holders = [sys.modules.get("transformers"), *(getattr(m, "transformers", None) for m in list(sys.modules.values()))]
    for module in {
        id(m): m for m in holders if isinstance(m, types.ModuleType) and m.__name__ == "transformers"
    }.values():
        setattr(module, model_class.__name__, model_class)


class WholePromptScheduler(cb_scheduler.FIFOScheduler):
    """transformers' FIFO scheduler, but a new request joins a batch only if its whole prompt fits in what the
    batch has left, so that its prefill is never split (the routers read the whole prompt at once)."""

    def _process_candidates(self, candidates, token_budget, cache_budget, request_ids_to_remove_from_waiting):
        budget, requests, kept = token_budget, self.max_requests_per_batch, []
        for state in candidates:
            need = 1 if state.status == cb_scheduler.RequestStatus.DECODING else len(state.remaining_prefill_tokens)
            if need > budget or requests == 0:
                continue  # waits for a batch with room; decoding requests always fit a fresh batch
            kept.append(state)
            budget, requests = budget - need, requests - 1
        return super()._process_candidates(kept, token_budget, cache_budget, request_ids_to_remove_from_waiting)

    def finish_request(self, request_id: str) -> None:
        """A request ends with its KV blocks: its merge weights go too (the batch's lists may hold its state a
        while longer)."""
        forget(self.active_requests.get(request_id))
        super().finish_request(request_id)

    def clear_cancelled_requests(self):
        """A cancelled request (a client gone mid-stream) frees its merge weights with its KV blocks."""
        cancelled = super().clear_cancelled_requests()
        for state in cancelled:
            forget(state)
        return cancelled


def forget(state) -> None:
    """Drop a request's kept merge weights."""
    if state is not None and hasattr(state, WEIGHTS):
        delattr(state, WEIGHTS)


cb_scheduler.SCHEDULER_MAPPING[SCHEDULER] = WholePromptScheduler


def continuous_batching(model, init, generation_config=None, continuous_batching_config=None, **kwargs):
    """`model.init_continuous_batching`: transformers' manager with our scheduler, no prefix sharing, and the link
    from its paged cache to the batches it runs. `init` is transformers' own method."""
    from transformers import ContinuousBatchingConfig

    config = model.config
    if config.merging.mixes_outputs:
        raise ValueError(
            f"`sparse` at {config.level} level keeps a KV cache per expert layer, which continuous batching's paged "
            "cache cannot hold: serve it without continuous batching (`transformers serve` without "
            "--continuous-batching, or `generate`), or assemble `smear`, `wemoe` or `twin`"
        )
    cb = (
        copy.deepcopy(continuous_batching_config)
        if continuous_batching_config is not None
        else ContinuousBatchingConfig()
    )
    cb.allow_block_sharing = False
    cb.scheduler_type = SCHEDULER
    manager = init(generation_config=generation_config, continuous_batching_config=cb, **kwargs)
    if not getattr(manager, "_moe_merge_linked", False):
        create = manager._create_batch_processor

        def create_and_link():
            processor = create()
            setattr(processor.cache, IO, processor.inputs_and_outputs)
            return processor

        manager._create_batch_processor = create_and_link
        add = manager.add_request

        def add_request(input_ids, *args, **kw):
            limit = manager.continuous_batching_config.max_batch_tokens
            if limit is not None and len(input_ids) > limit:
                raise ValueError(
                    f"the prompt has {len(input_ids)} tokens; a batch holds {limit} and this model reads "
                    "each prompt whole: shorten it or raise `max_batch_tokens`"
                )
            return add(input_ids, *args, **kw)

        manager.add_request = add_request
        manager._moe_merge_linked = True
    return manager


@dataclass
class Packing:
    """A packed batch: S requests' tokens in one row. `segment` [T] is each token's request; `new` [S] marks the
    requests whose prompt this forward routes; `known` [S, R, E] holds the others' kept weights (zeros for new)."""

    segment: torch.Tensor
    counts: torch.Tensor
    new: torch.Tensor
    known: torch.Tensor
    states: list  # each request's RequestState, where the weights are kept
    bounds: list[tuple[int, int]]  # each request's token span [start, end) in the row

    @property
    def routes(self) -> bool:
        return bool(self.new.any())

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """[1, T, D] -> each request's mean over its tokens, [S, D] (float32 or wider)."""
        x = x[0].to(torch.promote_types(x.dtype, torch.float32))
        sums = x.new_zeros(len(self.counts), x.shape[-1]).index_add_(0, self.segment, x)
        return sums / self.counts.clamp(min=1).unsqueeze(-1).to(x.dtype)

    def spread(self, w: torch.Tensor | None) -> torch.Tensor | None:
        """Per-request weights [S, E] -> per-token [1, T, E]."""
        return None if w is None else w[self.segment].unsqueeze(0)

    def keep(self, weights: torch.Tensor) -> None:
        """Keep each newly routed request's weights [R, E] on its request state."""
        for s in self.new.nonzero().flatten().tolist():
            setattr(self.states[s], WEIGHTS, weights[s].detach().clone())


def packing_of(
    cache, cu_seq_lens_q: torch.Tensor, position_ids: torch.Tensor, num_routers: int, num_experts: int
) -> Packing:
    """The requests of the batch the paged `cache` runs now, with what routing each needs."""
    io = getattr(cache, IO, None)
    if io is None:
        raise RuntimeError(
            "this paged cache was not made by the model's `init_continuous_batching`: call "
            "`model.init_continuous_batching` (or `generate_batch`) so that each request is routed"
        )
    io = io.io_pairs[io.current_pair].host_io if hasattr(io, "io_pairs") else io  # async batching: the pair running
    requests = io.requests_in_batch
    cu = cu_seq_lens_q.tolist()
    T, device = position_ids.shape[-1], position_ids.device
    bounds = [(cu[i], cu[i + 1]) for i in range(len(requests))]
    segment = torch.zeros(T, dtype=torch.long)
    for s, (a, b) in enumerate(bounds):
        segment[a:b] = s
    known = torch.zeros(len(requests), num_routers, num_experts, dtype=torch.float32)
    new = torch.zeros(len(requests), dtype=torch.bool)
    starts = position_ids[0].tolist()
    for s, request in enumerate(requests):
        weights = getattr(request.state, WEIGHTS, None)
        if weights is not None:
            known[s] = weights
            continue
        a, b = bounds[s]
        if starts[a] != 0 or not request.has_new_token:
            raise RuntimeError(
                f"request {request.state.request_id}: its prompt reached the model in parts (positions {starts[a]}–"
                f"{starts[b - 1]}); this model routes on the whole prompt: serve it with the model's own "
                "`init_continuous_batching` and without parallel sampling (n > 1)"
            )
        new[s] = True
    counts = torch.tensor([b - a for a, b in bounds], dtype=torch.long)
    return Packing(
        segment.to(device), counts.to(device), new.to(device), known.to(device), [r.state for r in requests], bounds
    )
