"""Tokenizers as moe-merge batches them: a pad token where the model ships none.

Llama and Mistral tokenizers have no pad token, yet prompts of different lengths must be batched
(router fitting, routing reports, training, evaluation). Padded positions are masked everywhere, so
any id will do; the choice lives in memory only and never reaches the tokenizer files we copy.
"""

from __future__ import annotations

from pathlib import Path

from moe_merge.errors import SourceError


def pad_token_for(tokenizer) -> None:
    """Give `tokenizer` a pad token if it has none: its EOS, else UNK, else token 0."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or tokenizer.convert_ids_to_tokens(0)


def load_tokenizer(path: Path | str, trust_remote_code: bool = False):
    """The tokenizer saved in `path`, ready for batching."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises several types for a missing or broken tokenizer
        raise SourceError(f"cannot load the tokenizer from {path}: {e}") from None
    pad_token_for(tokenizer)
    return tokenizer
