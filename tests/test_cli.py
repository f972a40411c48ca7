"""The command line says what the code does, and passes the user's choices through."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from transformers import GenerationMixin

from moe_merge.assemble import assemble
from moe_merge.cli import build_parser
from moe_merge.config import MergeConfig
from moe_merge.errors import MoEMergeError
from moe_merge.generate import generate
from moe_merge.train.loop import TrainRouterArgs, _check_launcher
from tests.conftest import pico_recipe

ROOT = Path(__file__).parent.parent


def _help(verb: str) -> str:
    verbs = build_parser()._subparsers._group_actions[0].choices
    return " ".join(verbs[verb].format_help().split())


def test_train_router_help_suggests_a_launch_that_is_not_refused(monkeypatch):
    text = _help("train-router")
    assert "accelerate launch --multi_gpu --num_processes N" in text
    # what the help calls refused, is: `--cpu` makes accelerate set these and start a single process
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(MoEMergeError, match="--multi_gpu --num_processes N"):
        _check_launcher()


def test_learning_rate_help_says_it_is_relative():
    text = _help("train-router")
    assert "relative learning rate: each router's step is lr times the RMS of its own parameters" in text
    assert TrainRouterArgs.lr == 3e-3 and "(default 3e-3)" in text


def test_every_default_the_help_states_is_the_parsers():
    """A `(default X)` in any verb's help, where X is a value, is the default the parser gives (the words after a
    comma or colon explain it); defaults that depend on the recipe or the model are described, not valued."""
    import re

    verbs = build_parser()._subparsers._group_actions[0].choices
    stated = 0
    for verb, parser in verbs.items():
        for action in parser._actions:
            found = re.search(r"\(default:? ([^,:)]*)", action.help or "")
            if found is None or action.default is None:
                continue
            said = found.group(1).strip()
            try:
                assert float(said) == float(action.default), (verb, action.dest)
            except ValueError:
                assert said == str(action.default), (verb, action.dest, said)
            stated += 1
    assert stated >= 15


def test_generate_passes_a_pad_id_of_zero(pico, tmp_path, monkeypatch):
    """The zoo's pad id is 0, which `pad_token_id or eos` used to drop."""
    out = assemble(MergeConfig.model_validate(pico_recipe(pico, method="smear")), tmp_path / "smear")
    seen = {}
    real = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    generate(out, "shift ab=", max_new_tokens=2)
    assert seen["pad_token_id"] == 0


def test_no_message_points_to_a_file_the_package_does_not_ship():
    for folder in ("moe_merge", "kernels", "routers"):
        for path in (ROOT / folder).rglob("*.py"):
            assert "FIELD-NOTES" not in path.read_text(), os.path.relpath(path, ROOT)


def test_moe_merge_zoo_and_demo_call_what_they_name(monkeypatch, tmp_path, capsys):
    """The zoos and the demos take minutes each (the zoos build in the tests' session fixtures through the same
    functions; the demo is the README's first command): here, that each flag reaches its builder, and that an
    existing directory is refused before any work."""
    from moe_merge import demo, realzoo, zoo
    from moe_merge.cli import main as cli_main

    (tmp_path / "taken").mkdir()
    assert cli_main(["zoo", str(tmp_path / "taken"), "--arch", "qwen3"]) == 2
    assert "already exists" in capsys.readouterr().err and not any((tmp_path / "taken").iterdir())
    calls: list = []
    monkeypatch.setattr(zoo, "build_zoo", lambda out, settings, force: calls.append((out, settings, force)))
    assert cli_main(["zoo", str(tmp_path / "z"), "--arch", "qwen3", "--realistic"]) == 0
    assert calls.pop() == (tmp_path / "z", zoo.ZooSettings(arch="qwen3", realistic=True), False)
    monkeypatch.setattr(realzoo, "build_real_zoo", lambda out, settings, force: calls.append((out, settings, force)))
    monkeypatch.setattr(demo, "run_demo", lambda out: calls.append(("demo", out)))
    monkeypatch.setattr(demo, "run_real_demo", lambda out, real: calls.append(("real demo", out, real)))
    assert cli_main(["zoo", str(tmp_path / "z"), "--real", "gemma3", "--force"]) == 0
    assert calls.pop() == (tmp_path / "z", realzoo.RealZooSettings(base="gemma3"), True)
    assert cli_main(["zoo", str(tmp_path / "z"), "--real", "smollm2", "--arch", "qwen3"]) == 2
    assert "--arch and --realistic describe the tiny zoo" in capsys.readouterr().err and not calls
    assert cli_main(["demo", "--out", str(tmp_path / "d")]) == 0
    assert calls.pop() == ("demo", tmp_path / "d")
    assert cli_main(["demo", "--real", "smollm2"]) == 0
    assert calls.pop() == ("real demo", Path("demo-out"), "smollm2")
