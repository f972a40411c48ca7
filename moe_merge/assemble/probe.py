"""Run prompts through the MoE being assembled, one decoder layer at a time.

Only one layer's weights are ever in memory. Each layer is the output architecture's own stock
decoder layer, so what the routers are fitted on, and what the routing report measures, is what
transformers will compute when it loads the result.

Two kinds of prompt batch ("streams") flow through:
- calibration streams of expert e are routed one-hot to e, which is what perfect routing would
  do; their MLP inputs are the states expert e's router must recognise;
- eval streams are routed by the routers just fitted, as the finished model routes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moe_merge.arch import MoEFormat
from moe_merge.routers.prompt_init import TokenSet


@dataclass
class Stream:
    """A right-padded batch of prompts and its residual stream at the current layer."""

    ids: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T]
    hidden: torch.Tensor  # [B, T, H]
    expert: int  # the expert these prompts belong to
    force: bool  # route one-hot to `expert` (calibration) or by the router (eval)


def make_streams(tokenizer, embed: torch.Tensor, prompts: list[list[str]], force: bool) -> list[Stream | None]:
    """One stream per expert from its prompts (None where an expert has none)."""
    streams: list[Stream | None] = []
    for expert, texts in enumerate(prompts):
        if not texts:
            streams.append(None)
            continue
        enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
        mask = enc["attention_mask"]
        streams.append(Stream(enc["input_ids"], mask, embed[enc["input_ids"]].float(), expert, force))
    return streams


class LayerRunner:
    """Holds the output config and builds its stock decoder layers (`fmt`'s classes) from per-layer state dicts."""

    def __init__(self, config, fmt: MoEFormat, device: str = "cpu"):
        self.config, self.device = config, torch.device(device)
        self.layer_cls = fmt.cls("DecoderLayer")
        config._attn_implementation = "sdpa"
        config._experts_implementation = "eager"
        self.rotary = fmt.cls("RotaryEmbedding")(config).to(self.device)

    def build(self, layer_idx: int, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
        with torch.device("meta"):
            layer = self.layer_cls(self.config, layer_idx)
        layer.load_state_dict({k: v.float().to(self.device) for k, v in state_dict.items()}, strict=True, assign=True)
        return layer.eval()

    @torch.no_grad()
    def step(self, layer: torch.nn.Module, stream: Stream) -> tuple[TokenSet, torch.Tensor]:
        """Advance `stream` through `layer`; return the MLP input and the router logits [B, T, E]."""
        captured = {}

        def grab_input(_module, args):
            captured["x"] = args[0]

        def route(_module, _args, out):
            captured["logits"] = out[0]
            if stream.force:
                n, dev = out[0].shape[0], out[0].device
                return (
                    out[0],
                    torch.ones(n, 1, dtype=out[1].dtype, device=dev),
                    torch.full((n, 1), stream.expert, device=dev),
                )
            return out

        mlp: Any = layer.mlp  # a stock sparse MoE block
        hooks = [mlp.register_forward_pre_hook(grab_input), mlp.gate.register_forward_hook(route)]
        try:
            b, t = stream.ids.shape
            stream.hidden = stream.hidden.to(self.device, next(layer.parameters()).dtype)
            position_ids = torch.arange(t, device=self.device).unsqueeze(0).expand(b, t)
            position_embeddings = self.rotary(stream.hidden, position_ids)
            # Right padding and a causal mask: real tokens never see padding, so no mask is needed.
            stream.hidden = layer(
                stream.hidden, attention_mask=None, position_ids=position_ids, position_embeddings=position_embeddings
            )
        finally:
            for h in hooks:
                h.remove()
        return TokenSet(captured["x"].cpu(), stream.mask), captured["logits"].reshape(b, t, -1).cpu()
