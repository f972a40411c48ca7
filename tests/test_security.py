"""No pickle but `weights_only=True`, no remote code unless asked, no write outside OUT_DIR, no token in any output."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from moe_merge.cli import main as cli_main
from tests.conftest import pico_recipe, write_recipe
from tests.hub_standin import HubStandIn, pushing_env

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = [p for d in ("moe_merge", "kernels", "routers") for p in sorted((ROOT / d).rglob("*.py"))]


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


@pytest.mark.parametrize("path", PACKAGE, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_unsafe_unpickling_and_no_remote_code_by_default(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n and n.split(".")[0] in ("pickle", "dill", "cloudpickle", "joblib") for n in names), (
                f"{path}:{node.lineno} imports a pickle module"
            )
    for call, name in _calls(tree):
        keywords = {k.arg: k.value for k in call.keywords}
        if name.endswith("torch.load") or name == "load" and "map_location" in keywords:
            value = keywords.get("weights_only")
            assert isinstance(value, ast.Constant) and value.value is True, (
                f"{path}:{call.lineno}: {name}(...) without weights_only=True"
            )
        value = keywords.get("trust_remote_code")
        assert not (isinstance(value, ast.Constant) and value.value is True), (
            f"{path}:{call.lineno}: trust_remote_code=True; it must come from the user (--trust-remote-code)"
        )


def test_the_scan_sees_what_it_forbids():
    bad = ast.parse("import pickle\ntorch.load(f)\nAutoModel.from_pretrained(p, trust_remote_code=True)\n")
    calls = [(name, {k.arg: ast.unparse(k.value) for k in c.keywords}) for c, name in _calls(bad)]
    assert ("torch.load", {}) in calls and ("AutoModel.from_pretrained", {"trust_remote_code": "True"}) in calls


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.mark.parametrize("shard", ["../outside.safetensors", "ABSOLUTE", "sub/../../outside.safetensors"])
def test_a_crafted_index_cannot_point_outside_its_checkpoint(pico, tmp_path, shard, capsys):
    """The index splits a checkpoint into a shard beside it and one outside, which exists and holds the rest: only
    the guard can refuse it."""
    import shutil

    from safetensors.torch import load_file, save_file

    expert = tmp_path / "crafted"
    shutil.copytree(pico["experts"][0], expert)
    tensors = load_file(expert / "model.safetensors")
    (expert / "model.safetensors").unlink()
    (expert / "sub").mkdir()
    first, *rest = sorted(tensors)
    save_file({n: tensors[n] for n in rest}, expert / "model-00001-of-00002.safetensors")
    save_file({first: tensors[first]}, tmp_path / "outside.safetensors")
    shard = str(tmp_path / "outside.safetensors") if shard == "ABSOLUTE" else shard
    assert (expert / shard).is_file()
    weight_map = {n: "model-00001-of-00002.safetensors" for n in rest} | {first: shard}
    (expert / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    recipe = pico_recipe(pico)
    recipe["experts"][0]["source_model"] = str(expert)
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    before = _files(tmp_path)
    assert cli_main(["assemble", str(path), str(tmp_path / "out")]) == 2
    assert f"names shard {shard!r}, which is not a file name in {expert}" in capsys.readouterr().err
    assert _files(tmp_path) == before  # nothing written anywhere


def test_outputs_stay_inside_out_dir(pico, tmp_path):
    """Every file a command writes is under its output (or beside it, hidden, while it runs)."""
    recipe = write_recipe(tmp_path / "recipe.yaml", pico_recipe(pico, method="smear"))
    before = _files(tmp_path)
    assert cli_main(["assemble", str(recipe), str(tmp_path / "out" / "smear")]) == 0
    assert (
        cli_main(["bake", str(tmp_path / "out" / "smear"), str(tmp_path / "out" / "baked"), "--weights", "1,0,0"]) == 0
    )
    assert (
        cli_main(["export-lora", str(tmp_path / "out" / "smear"), str(tmp_path / "out" / "lora"), "--weights", "1,0,0"])
        == 0
    )
    written = _files(tmp_path) - before
    assert written and all(f.startswith(("out/smear", "out/baked", "out/lora")) or f == "out" for f in written)


def test_the_token_reaches_no_file_and_no_log(pico, tmp_path):
    from moe_merge.assemble import assemble
    from moe_merge.config import MergeConfig

    token = "hf_SECRETtoken1234567890"
    folder = assemble(MergeConfig.model_validate(pico_recipe(pico, method="smear")), tmp_path / "smear")
    env = pushing_env(tmp_path, HF_HUB_DISABLE_XET="1")
    outputs = []
    with HubStandIn(token) as hub:
        for given in (token, "hf_WRONGtoken0987654321"):  # accepted, then refused with 401
            env.update(HF_ENDPOINT=hub.url, HF_TOKEN=given)
            run = subprocess.run(
                [sys.executable, "-m", "moe_merge.cli", "-vv", "push", str(folder), "me/smear"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
            )
            outputs += [run.stdout, run.stderr]
            assert run.returncode == (0 if given == token else 2), run.stderr
    assert "HTTP 401" in outputs[-1]
    for secret in (token, "hf_WRONGtoken0987654321"):
        assert not any(secret in text for text in outputs)
        for f in [*folder.rglob("*"), *(tmp_path / "hf").rglob("*")]:
            assert not f.is_file() or secret.encode() not in f.read_bytes(), f
        assert not any(secret.encode() in data for c in hub.commits for data in c.files.values())
