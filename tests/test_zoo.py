"""The tiny zoo: every model reaches its target wherever it is built, or the build fails and caches nothing."""

import hashlib
import json
import subprocess
import sys

import pytest
from safetensors import safe_open

from moe_merge import zoo
from moe_merge.tokens import load_tokenizer

TINY = zoo.Stage(lr=3e-3, cycle=10, cycles=1, target=0.0)  # ten steps, no target to speak of


@pytest.mark.parametrize("which", ["zoo_dir", "realistic_zoo"])
def test_every_expert_masters_its_own_task_only(which, request):
    """Measured here, on the checkpoints as loaded, not read back from zoo.json."""
    root = request.getfixturevalue(which)
    tok = load_tokenizer(root / "base")
    base = zoo.load_checkpoint(root / "base")
    assert min(zoo.scores(base, tok, zoo.BASE_TASKS).values()) >= 0.98
    assert max(zoo.scores(base, tok).values()) == 0.0
    manifest = json.loads((root / "zoo.json").read_text())
    for variant in zoo.VARIANTS:
        for task, rel in manifest["experts"][variant].items():
            expert = zoo.load_checkpoint(root / rel)
            own = zoo.scores(expert, tok, [task])[task]
            others = zoo.other_task_scores(expert, tok, [task])
            assert own >= 0.98 and max(others.values()) <= 0.05, (rel, own, others)


def test_realistic_zoo_has_what_real_checkpoints_bring(realistic_zoo):
    config = json.loads((realistic_zoo / "base" / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["pad_token_id"] is None and config["dtype"] == "bfloat16"
    tokenizer = json.loads((realistic_zoo / "base" / "tokenizer_config.json").read_text())
    assert tokenizer.get("pad_token") is None
    for rel in ("base", "full/shift"):
        with safe_open(realistic_zoo / rel / "model.safetensors", "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
            assert "lm_head.weight" not in f.keys()  # tied: the head is the embedding
    with safe_open(realistic_zoo / "full" / "back-lora" / "adapter_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}


def test_a_missed_target_fails_the_build_naming_the_model_and_caches_nothing(tmp_path):
    out = tmp_path / "zoo"
    with pytest.raises(zoo.ZooError, match=r"zoo base: \d+% exact match .* after 10 steps, below its target of 98%"):
        zoo.build_zoo(out, zoo.ZooSettings(base=zoo.Stage(lr=3e-3, cycle=10, cycles=1)))
    assert not out.exists() and not list(tmp_path.iterdir())
    # the base passes (no target), the first expert cannot in ten steps
    settings = zoo.ZooSettings(base=TINY, full=zoo.Stage(lr=3e-3, cycle=10, cycles=1))
    with pytest.raises(zoo.ZooError, match=r"zoo full/shift: \d+% exact match"):
        zoo.build_zoo(out, settings)
    assert not out.exists() and not list(tmp_path.iterdir())


def _digest(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_a_build_is_deterministic_for_a_seed_and_thread_count(tmp_path):
    settings = zoo.ZooSettings(base=TINY, full=TINY, mlp=TINY, lora=TINY)
    out = tmp_path / "zoo"
    first = _digest(zoo.build_zoo(out, settings))
    second = _digest(zoo.build_zoo(out, settings, force=True))
    assert len(first) > 30 and first == second


def test_the_cache_key_covers_code_settings_and_versions(monkeypatch, tmp_path):
    import transformers

    key = zoo.ZooSettings().key()
    assert zoo.ZooSettings(seed=1).key() != key and zoo.ZooSettings(realistic=True).key() != key
    assert zoo.ZooSettings(mlp=zoo.Stage(lr=1e-3, cycle=400)).key() != key
    monkeypatch.setattr(transformers, "__version__", "5.99.0")
    assert zoo.ZooSettings().key() != key
    monkeypatch.undo()
    edited = tmp_path / "zoo.py"
    edited.write_text(open(zoo.__file__).read() + "\n# an edit\n")
    monkeypatch.setattr(zoo, "__file__", str(edited))
    assert zoo.ZooSettings().key() != key


def test_prompts_and_eval_words_do_not_depend_on_global_state():
    here = {t: zoo.task_prompts(t) for t in zoo.EXPERT_TASKS}
    script = (
        "import json, torch; torch.manual_seed(123); torch.set_num_threads(1); torch.rand(7)\n"
        "from moe_merge import zoo\n"
        "print(json.dumps({t: zoo.task_prompts(t) for t in zoo.EXPERT_TASKS}))"
    )
    there = json.loads(
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    )
    assert here == there
    words = [set(here[t]["eval_words"]) for t in zoo.EXPERT_TASKS]
    assert all(len(w) == 64 for w in words) and len(set.union(*words)) == 64 * len(words)
    for t in zoo.EXPERT_TASKS:  # routing prompts and worked examples never hold an eval word
        seen = {p.split(" ")[1].rstrip("=").split("=")[0] for p in here[t]["positive_prompts"] + here[t]["examples"]}
        assert not seen & set(here[t]["eval_words"])
    assert zoo.apply_task("shift", "abz") == "bca" and zoo.apply_task("swap", "ab") == "ba"
    assert zoo.apply_task("cipher", zoo.apply_task("cipher", "hello")) == "hello"
