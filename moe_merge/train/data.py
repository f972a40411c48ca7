"""Data for router training: read with `datasets`, check every row, tokenize, pad.

A row is one of
- `text`: loss on every token;
- `prompt` + `completion`: loss on the completion only, and the routers read only the prompt, as
  they do in `generate`;
- `messages` (chat turns): the tokenizer's chat template renders them; the last turn is the
  completion, everything before it the prompt;
with an optional `expert` label (an expert's name or index) for supervised routing.

Every problem (missing field, empty file, wrong type, unknown expert) is reported before any
training starts, naming the file, the row and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moe_merge.errors import DataError

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
NO_LABEL = -1


def load_rows(path: Path | str, split: str = "train"):
    """A `datasets.Dataset` from a jsonl/json/csv/parquet file or a `save_to_disk` directory."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise DataError(
            f"data {path} does not exist; give a .jsonl, .json, .csv or .parquet file or a saved datasets directory"
        )
    if path.is_dir():
        try:
            data = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise DataError(f"{path} is a directory but not one written by datasets' save_to_disk ({e})") from None
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise DataError(f"{path} has splits {', '.join(data)}; it needs a {split!r} split")
            data = data[split]
        return data
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"data {path}: unknown format {path.suffix!r}; use one of {', '.join(FILE_FORMATS)}")
    if path.stat().st_size == 0:
        raise DataError(f"data {path} is empty; it needs rows with `text`, `prompt`+`completion` or `messages`")
    try:
        return datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as e:  # datasets wraps parser errors in several types; the message is what matters
        raise DataError(f"could not read {path} as {fmt}: {e}") from None


def row_kind(columns: list[str], source: str) -> str:
    if "text" in columns:
        return "text"
    if "prompt" in columns and "completion" in columns:
        return "prompt"
    if "messages" in columns:
        return "messages"
    raise DataError(
        f"{source}: rows need a `text` field, `prompt` + `completion` fields, or a `messages` field; "
        f"found {', '.join(columns) or 'none'}"
    )


def expert_index(label, expert_names: list[str], source: str, row: int) -> int:
    if label is None:
        return NO_LABEL
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise DataError(f"{source} row {row}: `expert` must be an expert name or index, got {type(label).__name__}")
    if isinstance(label, int):
        if not 0 <= label < len(expert_names):
            raise DataError(
                f"{source} row {row}: `expert` {label} is out of range; the model has {len(expert_names)} experts"
            )
        return label
    if label not in expert_names:
        raise DataError(
            f"{source} row {row}: `expert` {label!r} is not one of the model's experts: {', '.join(expert_names)}"
        )
    return expert_names.index(label)


def _text(value, field: str, source: str, row: int) -> str:
    if value is None:
        raise DataError(f"{source} row {row} has no `{field}`")
    if not isinstance(value, str):
        raise DataError(f"{source} row {row}: `{field}` must be a string, got {type(value).__name__}")
    return value


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def encode_row(
    row: dict, kind: str, tokenizer, expert_names: list[str], source: str, index: int, max_length: int
) -> dict:
    """input_ids, labels (-100 where there is no loss), routing_mask (1 = a token the routers read), expert."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if kind == "text":
        ids = _ids(tokenizer, _text(row["text"], "text", source, index), True) + eos
        n_prompt, loss_from = len(ids), 0
    else:
        if kind == "prompt":
            prompt_ids = _ids(tokenizer, _text(row["prompt"], "prompt", source, index), True)
            answer_ids = _ids(tokenizer, _text(row["completion"], "completion", source, index), False) + eos
        else:
            prompt_ids, answer_ids = _chat(tokenizer, row["messages"], source, index)
        ids = prompt_ids + answer_ids
        n_prompt = loss_from = len(prompt_ids)
    if not ids or loss_from >= len(ids):
        raise DataError(f"{source} row {index}: nothing to learn from (empty text or completion)")
    if len(ids) > max_length:
        raise DataError(f"{source} row {index}: {len(ids)} tokens, more than --max-length {max_length}")
    return {
        "input_ids": ids,
        "labels": [-100] * loss_from + ids[loss_from:],
        "routing_mask": [1] * n_prompt + [0] * (len(ids) - n_prompt),
        "expert": expert_index(row.get("expert"), expert_names, source, index),
    }


def _chat(tokenizer, messages, source: str, index: int) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{source}: rows have `messages` but the model's tokenizer has no chat template; "
            "write them as `prompt` + `completion` instead"
        )
    if (
        not isinstance(messages, list)
        or len(messages) < 2
        or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise DataError(f"{source} row {index}: `messages` must be a list of at least two {{role, content}} turns")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise DataError(f"{source} row {index}: the chat template does not render the last turn after the others")
    return _ids(tokenizer, prompt, False), _ids(tokenizer, full[len(prompt) :], False)


@dataclass
class Encoded:
    rows: list[dict]
    labelled: bool  # every row has an expert label

    def __len__(self) -> int:
        return len(self.rows)


def encode(dataset, tokenizer, expert_names: list[str], source: str, max_length: int = 2048) -> Encoded:
    """Check and tokenize every row up front, so bad data fails before step 0."""
    if len(dataset) == 0:
        raise DataError(f"{source} has no rows")
    kind = row_kind(list(dataset.column_names), source)
    rows = [encode_row(r, kind, tokenizer, expert_names, source, i, max_length) for i, r in enumerate(dataset)]
    return Encoded(rows, all(r["expert"] != NO_LABEL for r in rows))


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding: positions come from the attention mask, so the side does not change the result."""
    width = max(len(r["input_ids"]) for r in rows)

    def pad(key, value):
        return torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows])

    return {
        "input_ids": pad("input_ids", pad_id),
        "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]),
        "labels": pad("labels", -100),
        "routing_mask": pad("routing_mask", 0),
        "expert": torch.tensor([r["expert"] for r in rows]),
    }
