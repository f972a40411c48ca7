"""Model cards: Hub metadata that round-trips through huggingface_hub, the resolved recipe, the quality table."""

from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from moe_merge import zoo
from moe_merge.assemble import assemble
from moe_merge.cli import main as cli_main
from moe_merge.config import MergeConfig
from moe_merge.errors import ConfigError
from moe_merge.quality import load_eval_rows
from tests.conftest import pico_recipe, write_recipe


def _hub_cache(tmp_path, models: dict[str, object], monkeypatch):
    """A Hugging Face cache holding `models` (repo id -> local directory), as `hf download` leaves it."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    for repo_id, src in models.items():
        root = cache / f"models--{repo_id.replace('/', '--')}"
        shutil.copytree(src, root / "snapshots" / ("0" * 40))
        (root / "refs").mkdir()
        (root / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))


def _yaml_block(text: str) -> dict:
    return yaml.safe_load(text.split("```yaml\n", 1)[1].split("\n```", 1)[0])


def test_card_lists_hub_repos_and_round_trips(pico, tmp_path, monkeypatch):
    ids = ["org/base"] + [f"org/expert{i}" for i in range(3)]
    _hub_cache(tmp_path, dict(zip(ids, [pico["base"], *pico["experts"]])), monkeypatch)
    recipe = pico_recipe(pico)
    recipe["base_model"] = ids[0]
    for e, repo_id in zip(recipe["experts"], ids[1:]):
        e["source_model"] = repo_id
    recipe["experts"].append(
        {
            "source_model": str(pico["experts"][0]),
            "name": "local",  # a local path stays out
            "positive_prompts": ["local x="],
        }
    )
    (tmp_path / "eval.jsonl").write_text(
        "".join(
            json.dumps({"prompt": p, "completion": "x", "expert": f"t{i % 2}"}) + "\n"
            for i, p in enumerate(["shift ab=", "back cd=", "swap ef="])
        )
    )
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    out = tmp_path / "moe"
    assert cli_main(["assemble", str(path), str(out), "--eval-data", str(tmp_path / "eval.jsonl")]) == 0

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == ids
    assert card.data.base_model_relation == "merge"
    assert (card.data.library_name, card.data.pipeline_tag) == ("transformers", "text-generation")
    assert {"moe", "merge", "moe-merge", "mixtral"} <= set(card.data.tags)
    card.save(tmp_path / "again.md")
    again = ModelCard.load(tmp_path / "again.md")
    assert again.data.to_dict() == card.data.to_dict() and again.content == card.content

    assert "![routing report](routing_report.png)" in card.text
    assert _yaml_block(card.text) == yaml.safe_load((out / "moe-merge.yaml").read_text())  # the resolved recipe
    assert "| model | t0 | t1 | mean |" in card.text and "| this model | 0% (2) | 0% (1) | 0% |" in card.text


def test_quality_table_equals_the_zoo_exact_match(zoo_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tasks = ["shift", "mirror"]
    words = {t: zoo.task_prompts(t)["eval_words"][:8] for t in tasks}
    rows = [
        {"prompt": zoo.prompt(t, w), "completion": zoo.apply_task(t, w), "expert": t} for t in tasks for w in words[t]
    ]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = zoo.zoo_recipe(zoo_dir, "mlp", method="smear")
    recipe["experts"] = recipe["experts"][:2]
    out = assemble(MergeConfig.model_validate(recipe), tmp_path / "smear", eval_data=tmp_path / "eval.jsonl")

    card = ModelCard.load(out / "README.md")
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    want = {t: zoo.exact_match(model, tok, t, words[t]) for t in tasks}  # the zoo's own scorer
    assert want["shift"] > 0.5  # a meaningful check, not 0 = 0
    row = " | ".join(f"{want[t]:.0%} (8)" for t in tasks)
    assert f"| this model | {row} | {sum(want.values()) / 2:.0%} |" in card.text
    # the oracle row: each task with the merge weights forced one-hot to its expert, by the zoo's own scorer
    generate, oracle = model.generate, {}
    for e, t in enumerate(tasks):
        model.generate = functools.partial(
            generate, merge_weights=torch.nn.functional.one_hot(torch.tensor(e), 2).float()
        )
        oracle[t] = zoo.exact_match(model, tok, t, words[t])
    cells = " | ".join(f"{oracle[t]:.0%}" for t in tasks)
    assert f"| oracle (merge weights one-hot to the task's expert) | {cells} | |" in card.text
    assert "also routed with per-input merge weights: nothing" in card.text  # MLP-only experts differ nowhere else
    assert "entering layer 1 of the static merge" in card.text
    assert "base_model" not in card.data.to_dict() and "base_model_relation" not in card.data.to_dict()  # local sources


def test_bad_eval_data_names_the_line(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ConfigError, match="eval.jsonl line 2: a row needs string fields `prompt` and `completion`"):
        load_eval_rows(path)
