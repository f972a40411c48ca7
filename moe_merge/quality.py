"""The model card's quality table: exact match of greedy completions, per task, on the user's eval data.

The eval file is JSON lines with `prompt`, `completion` and an optional `expert` (the task's column;
rows without one count under `all`): the same rows router training reads, so one file serves both.
Beside the routed scores, a dynamic model's table holds the oracle: each expert's task with the merge
weights forced one-hot to that expert. Where the routed score falls short of the oracle the routers are
to blame; where the oracle falls short of the expert, the merge's capacity is.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from moe_merge.errors import ConfigError


def load_eval_rows(path: Path | str) -> list[dict]:
    """Every row checked before any model runs; errors name the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"eval data {path} does not exist; give a .jsonl file of rows with `prompt`, `completion` and `expert`"
        )
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{path} line {i} is not JSON ({e}); each line is one object with `prompt` and `completion`"
            ) from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prompt", "completion")):
            raise ConfigError(f"{path} line {i}: a row needs string fields `prompt` and `completion`")
        rows.append({"prompt": row["prompt"], "completion": row["completion"], "task": str(row.get("expert", "all"))})
    if not rows:
        raise ConfigError(f"eval data {path} has no rows")
    return rows


@contextlib.contextmanager
def contiguous_head(model):
    """`generate` hands the head a strided slice (each row's last position); torch multiplies a strided [B, 1, H] by a
    weight that needs no gradient as B copies of the weight (gigabytes per step for a 262,144-row head: 5.6 s per
    call measured on Gemma 3 in bf16), and a contiguous one as one GEMM (0.02 s). So the head gets it contiguous."""
    head = model.get_output_embeddings()
    handle = head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:])) if head else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


@torch.no_grad()
def exact_match(
    model, tokenizer, rows: list[dict], batch_size: int = 32, merge_weights: torch.Tensor | None = None
) -> dict[str, tuple[float, int]]:
    """Task -> (share of rows whose greedy completion, up to the end-of-sequence token, is `completion`; rows).
    `merge_weights` ([E], dynamic models) forces the routing."""
    from moe_merge.tokens import pad_token_for

    pad_token_for(tokenizer)
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    scores = {}
    for task, task_rows in by_task.items():
        hits = 0
        for i in range(0, len(task_rows), batch_size):
            chunk = task_rows[i : i + batch_size]
            enc = tokenizer([r["prompt"] for r in chunk], return_tensors="pt", padding=True, padding_side="left")
            longest = max(len(tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) for r in chunk)
            forced = {} if merge_weights is None else {"merge_weights": merge_weights}
            with contiguous_head(model):
                out = model.generate(
                    **enc.to(model.device),
                    max_new_tokens=longest + 1,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    **forced,
                )
            for r, ids in zip(chunk, out[:, enc["input_ids"].shape[1] :]):
                hits += tokenizer.decode(ids, skip_special_tokens=True).strip() == r["completion"].strip()
        scores[task] = (hits / len(task_rows), len(task_rows))
    return scores


def oracle_scores(model, tokenizer, rows: list[dict]) -> dict[str, tuple[float, int]]:
    """Each expert's task (rows whose `task` is an expert's name) with the merge weights one-hot to that expert."""
    names = list(getattr(model.config, "expert_names", None) or [])
    scores = {}
    for e, name in enumerate(names):
        own = [r for r in rows if r["task"] == name]
        if own:
            one_hot = torch.nn.functional.one_hot(torch.tensor(e), len(names)).float()
            scores.update(exact_match(model, tokenizer, own, merge_weights=one_hot))
    return scores


def quality_table(model, tokenizer, path: Path, rows: list[dict]) -> dict:
    """What the card's quality section shows: routed scores and, for a dynamic model, the oracle's."""
    model.eval()
    table = {"file": Path(path).name, "scores": exact_match(model, tokenizer, rows)}
    if getattr(model.config, "model_type", None) == "moe_merge":
        table["oracle"] = oracle_scores(model, tokenizer, rows)
    return table
