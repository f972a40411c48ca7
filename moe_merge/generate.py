"""`moe-merge generate`: text from a model directory, and the merge weights that produced it."""

from __future__ import annotations

from pathlib import Path

import torch

from moe_merge.errors import SourceError
from moe_merge.tokens import load_tokenizer


def load(model_dir: Path):
    """Model and tokenizer from a moe-merge output (stock MoE or dynamic; importing moe_merge registers it)."""
    from transformers import AutoModelForCausalLM

    import moe_merge.modeling  # noqa: F401  registers the dynamic model with the Auto classes

    if not (Path(model_dir) / "config.json").is_file():
        raise SourceError(f"{model_dir} has no config.json; give a directory written by `moe-merge assemble`")
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), load_tokenizer(model_dir)


def routing_table(weights: torch.Tensor, names: list[str], every_router: bool) -> str:
    """weights [R, E] -> a text table, one row per router (or their mean)."""
    rows = weights if every_router else weights.mean(0, keepdim=True)
    labels = [f"router {k}" for k in range(len(rows))] if every_router and len(rows) > 1 else ["merge weights"]
    width = max(len(n) for n in names + ["expert"]) + 2
    lines = ["".ljust(14) + "".join(n.rjust(width) for n in names)]
    lines += [
        label.ljust(14) + "".join(f"{x:.3f}".rjust(width) for x in row.tolist()) for label, row in zip(labels, rows)
    ]
    return "\n".join(lines)


@torch.no_grad()
def generate(
    model_dir: Path,
    prompt: str,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
    show_routing: bool = False,
) -> str:
    model, tokenizer = load(model_dir)
    torch.manual_seed(seed)
    enc = tokenizer(prompt, return_tensors="pt")
    sample = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        return_dict_in_generate=True,
        **sample,
    )
    text = tokenizer.decode(out.sequences[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    print(text)
    if getattr(model.config, "model_type", None) == "moe_merge":
        w = model.model(**enc, use_cache=False).merge_weights[0].float()  # [R, E] or [R, T, E]
        if w.dim() == 3:
            w = w.mean(1)
            print("(per-token routing: weights averaged over the prompt)")
        names = model.config.expert_names or [str(e) for e in range(model.config.num_experts)]
        print(routing_table(w, names, show_routing))
    elif show_routing:
        print("(a stock sparse MoE routes each token; see routing_report.json in the model directory)")
    return text
