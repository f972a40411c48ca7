"""What every assembled output holds beside its weights and config, written alike for a stock MoE and a dynamic
model: the base's tokenizer and generation config, the resolved recipe, the routing report, and the model card
with the exact match of the model as saved on the eval rows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml

from moe_merge.assemble import report
from moe_merge.recipe import Recipe, copy_companions

CardWriter = Callable[[Path, Recipe, dict, "dict | None"], None]


def finish(
    tmp: Path,
    recipe: Recipe,
    shown: Recipe,
    rep: dict,
    *,
    tokenizer,
    eval_data: tuple[Path, list[dict]] | None,
    device: str,
    write_card: CardWriter,
) -> None:
    """Complete the output in `tmp`, whose weights and config are written. `shown` is the recipe as the output
    names its sources (`recipe.portable`)."""
    quality = None
    if eval_data is not None:
        from transformers import AutoModelForCausalLM

        import moe_merge.modeling  # noqa: F401  # registers the dynamic model with the Auto classes
        from moe_merge.quality import quality_table

        model = AutoModelForCausalLM.from_pretrained(tmp).to(device).eval()  # type: ignore[arg-type]
        quality = quality_table(model, tokenizer, *eval_data)
        del model
    copy_companions(recipe.base.path, tmp)
    (tmp / "moe-merge.yaml").write_text(yaml.safe_dump(shown.config.resolved(), sort_keys=False))
    report.write(rep, tmp)
    write_card(tmp, shown, rep, quality)
