"""`moe-merge assemble`: a recipe in, a checkpoint out.

Two outputs, one pipeline. Each path plans (`TensorPlan`s: what tensor comes from where):
- `stock.py`: sparse FFN level, a stock Mixtral / Qwen-MoE;
- `dynamic.py`: every other method and level, a moe_merge dynamic model.
Then both execute alike: `execute.py` streams every planned tensor into shards (`read.py` reads the sources);
the recipe's prompts run through the model as written, read back one block at a time (`lazy.py`, `prompts.py`);
the routers start from what they read there (`routing.py`); the routing report is measured on the written
checkpoint (`report.py`) and `output.py` writes everything beside the weights. `dryrun.py` prints either plan
with its sizes.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from moe_merge.config import MergeConfig
from moe_merge.errors import ConfigError
from moe_merge.outdir import refuse_existing
from moe_merge.recipe import open_recipe, portable
from moe_merge.sources import check_finite
from moe_merge.tokens import load_tokenizer

logger = logging.getLogger(__name__)


def assemble(
    config: MergeConfig,
    out_dir: Path | str,
    *,
    recipe_dir: Path | None = None,
    force: bool = False,
    device: str = "cpu",
    dtype: str | None = None,
    shard_size: int = 5 * 2**30,
    seed: int | None = None,
    eval_data: Path | None = None,
    allow_nonfinite: bool = False,
) -> Path:
    """Build the model described by `config` into `out_dir` (atomically). With `eval_data` (JSON lines of prompt,
    completion, expert), the model card gets the exact match of the result per task. A source holding NaN or Inf is
    refused before anything is built, unless `allow_nonfinite`."""
    from moe_merge.quality import load_eval_rows

    out_dir = Path(out_dir)
    refuse_existing(out_dir, force)
    eval_rows = load_eval_rows(eval_data) if eval_data else None  # a bad file fails before any work
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ValueError) as e:  # torch's word for a missing or unknown device varies
        raise ConfigError(
            f"--device {device}: {str(e).splitlines()[0]}; give a device this machine has, e.g. cpu"
        ) from None
    if dtype:
        config = config.model_copy(update={"dtype": dtype})
    recipe = open_recipe(config, recipe_dir)
    if not allow_nonfinite:
        check_finite([recipe.base, *recipe.experts, *([recipe.shared] if recipe.shared else [])])
    logger.info("everything not routed: %s", config.static_summary)
    seed = config.seed if seed is None else seed
    shown = replace(recipe, config=portable(config, recipe_dir, out_dir))  # as the output names its sources
    tokenizer = load_tokenizer(recipe.base.path)
    quality = (eval_data, eval_rows) if eval_data and eval_rows else None
    if config.dynamic:
        from moe_merge.assemble.dynamic import assemble_dynamic as run
    else:
        from moe_merge.assemble.stock import assemble_stock as run
    return run(
        recipe,
        out_dir,
        shown=shown,
        tokenizer=tokenizer,
        force=force,
        shard_size=shard_size,
        seed=seed,
        device=device,
        eval_data=quality,
    )
