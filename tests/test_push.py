"""`moe-merge push` against a loopback stand-in for the Hub: what arrives, what is refused before upload."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from moe_merge.assemble import assemble
from moe_merge.cli import main as cli_main
from moe_merge.config import MergeConfig
from moe_merge.export.push import PushError, push, validate_folder
from tests.conftest import pico_recipe
from tests.hub_standin import HubStandIn, pushing_env

TOKEN = "hf_standin_token"


@pytest.fixture(scope="module")
def model_dir(pico, tmp_path_factory):
    """A sharded dynamic model (remote code, index) as `assemble` writes it."""
    out = tmp_path_factory.mktemp("push") / "smear"
    return assemble(MergeConfig.model_validate(pico_recipe(pico, method="smear")), out, shard_size=60_000)


def _files(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("xet", ["hf_xet installed", "HF_HUB_DISABLE_XET"])
def test_push_uploads_every_file_to_the_branch(model_dir, tmp_path, xet):
    """The real CLI in a fresh process, HF_ENDPOINT and HF_TOKEN from the environment: huggingface_hub's own
    upload path (pipelined when hf_xet is installed, one create_commit without it)."""
    assert len(list(model_dir.glob("model-*.safetensors"))) > 1
    env = pushing_env(tmp_path, HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1" if xet == "HF_HUB_DISABLE_XET" else "")
    with HubStandIn(TOKEN) as hub:
        env["HF_ENDPOINT"] = hub.url
        args = ["push", str(model_dir), "me/smear", "--private", "--revision", "dev", "--commit-message", "first mix"]
        run = subprocess.run([sys.executable, "-m", "moe_merge.cli", *args], capture_output=True, text=True, env=env)
        assert run.returncode == 0, run.stderr
        assert f"{hub.url}/me/smear/commit/" in run.stdout
    repo = hub.repos["me/smear"]
    assert repo.private and repo.branches["main"] == {}
    assert repo.branches["dev"] == _files(model_dir)  # every file, byte for byte
    assert [(c.revision, c.summary) for c in hub.commits] == [("dev", "first mix")]
    assert "POST /api/models/me/smear/branch/dev" in hub.requests
    assert set(hub.unserved) <= {"GET /api/agent-harnesses"}  # an optional lookup; every upload call was served


def test_every_export_passes_the_checks(pico, model_dir, tmp_path):
    """Stock sparse, dynamic (remote code, sharded), baked dense; export-lora adapters: tests/test_export_lora.py."""
    from huggingface_hub import ModelCard

    stock = assemble(MergeConfig.model_validate(pico_recipe(pico)), tmp_path / "stock")
    assert cli_main(["bake", str(model_dir), str(tmp_path / "baked"), "--weights", "0.25,0.25,0.5"]) == 0
    for folder in (stock, model_dir, tmp_path / "baked"):
        assert validate_folder(folder) == "model"
    assert "| all | 0.25 | 0.25 | 0.5 |" in ModelCard.load(tmp_path / "baked" / "README.md").text


def test_refused_before_upload_with_the_file_named(model_dir, tmp_path, capsys):
    def broken(name, edit):
        folder = tmp_path / name
        shutil.copytree(model_dir, folder)
        edit(folder)
        return folder

    def drop_from_index(folder):
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        index["weight_map"].pop("model.norm.weight")
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    def drop_tensor(folder):  # from its shard and from the index alike: only loading notices
        from safetensors.torch import load_file, save_file

        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shard = folder / index["weight_map"].pop("model.norm.weight")
        tensors = load_file(shard)
        del tensors["model.norm.weight"]
        save_file(tensors, shard, metadata={"format": "pt"})
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    def local_base_model(folder):
        card = (folder / "README.md").read_text()
        (folder / "README.md").write_text(
            card.replace("library_name:", "base_model:\n- /models/base\nlibrary_name:", 1)
        )

    def absolute_source(folder):
        recipe = (folder / "moe-merge.yaml").read_text()
        (folder / "moe-merge.yaml").write_text(recipe.replace("base_model: ", "base_model: /home/me/models/", 1))

    cases = [
        (broken("index", drop_from_index), "holds ['model.norm.weight'] that the index does not list"),
        (broken("recipe", absolute_source), "names sources by absolute local path (/home/me/models/"),
        (broken("code", lambda f: (f / "modeling_moe_merge.py").unlink()), "modeling_moe_merge.py"),
        (broken("missing", drop_tensor), "does not load cleanly: missing keys ['model.norm.weight']"),
        (broken("card", local_base_model), "'/models/base', which is not a Hub repo id"),
        (broken("yaml", lambda f: (f / "README.md").write_text("---\nbase_model: [\n---\n")), "does not parse"),
    ]
    for folder, message in cases:
        with pytest.raises(PushError, match=re.escape(message)):
            validate_folder(folder)
    assert validate_folder(model_dir) == "model"
    # the CLI: a clear message, exit 2, and no request sent
    with HubStandIn(TOKEN) as hub:
        assert cli_main(["push", str(cases[0][0]), "me/x"]) == 2
    assert "index does not list" in capsys.readouterr().err and hub.requests == []


def test_no_network_no_token_and_offline_mode_are_clear_errors(model_dir, monkeypatch, tmp_path):
    import socket

    from huggingface_hub import constants

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # whatever this machine's environment says
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "stored_tokens"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(PushError, match="no Hugging Face token: set HF_TOKEN"):
        push(model_dir, "me/x")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(PushError, match=f"cannot reach the Hub at {closed}"):
        push(model_dir, "me/x")
    with HubStandIn("another token") as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        with pytest.raises(PushError, match="HTTP 401.*token is invalid"):
            push(model_dir, "me/x")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1, as offline clusters set it
        sent = len(hub.requests)
        with pytest.raises(PushError, match="HF_HUB_OFFLINE is set, so huggingface_hub will not connect"):
            push(model_dir, "me/x")
        assert len(hub.requests) == sent  # refused before any request
