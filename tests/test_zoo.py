"""The tiny zoo: each expert masters its task and only its task; the base knows none of them."""

import pytest

from moe_merge import zoo
from tests.conftest import read_json


def test_experts_master_their_own_task_only(zoo_dir):
    manifest = read_json(zoo_dir / "zoo.json")
    for variant in zoo.VARIANTS:
        for task, rel in manifest["experts"][variant].items():
            scores = manifest["exact_match"][rel]
            assert scores[task] >= 0.95, (rel, scores)
            assert max(v for t, v in scores.items() if t != task) <= 0.1, (rel, scores)
    assert max(manifest["exact_match"]["base"].values()) <= 0.1


def test_recorded_scores_are_what_the_checkpoints_do(zoo_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(zoo_dir / "mlp" / "mirror")
    tok = AutoTokenizer.from_pretrained(zoo_dir / "mlp" / "mirror")
    recorded = read_json(zoo_dir / "zoo.json")["exact_match"]["mlp/mirror"]
    for task in ("mirror", "shift"):
        assert zoo.exact_match(model, tok, task, zoo.task_prompts(task)["eval_words"]) == pytest.approx(recorded[task])


def test_tasks_and_prompts_are_deterministic():
    assert zoo.task_prompts("shift") == zoo.task_prompts("shift")
    assert zoo.apply_task("shift", "abz") == "bca" and zoo.apply_task("swap", "ab") == "ba"
