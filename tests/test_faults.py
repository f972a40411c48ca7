"""Faults: kill -9 at seeded points, a full disk, two writers at once, a push that dies, sources holding NaN.

Each test proves a row of docs/reliability.md's table. The kills run the real CLI in a child process
(`tests/crash.py`), killed with SIGKILL at its N-th write, N drawn with a fixed seed from the writes an
uninterrupted run makes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moe_merge.assemble import assemble
from moe_merge.cli import main as cli_main
from moe_merge.config import MergeConfig
from moe_merge.outdir import locked
from moe_merge.zoo import router_training_rows
from tests.conftest import pico_recipe, write_recipe
from tests.hub_standin import HubStandIn, pushing_env

ROOT = Path(__file__).resolve().parent.parent
SEED = 20261201
KILLS = 2  # kill points per command: the first into a new OUT_DIR, the second over an existing one (--force)


def crash(kill_at: int, args: list, under: Path) -> subprocess.CompletedProcess:
    """`moe-merge ARGS` in a child process, killed at its `kill_at`-th write under `under` (0: never)."""
    return subprocess.run(
        [sys.executable, "-m", "tests.crash", str(kill_at), str(under), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def writes_of(run: subprocess.CompletedProcess) -> int:
    assert run.returncode == 0, run.stderr
    return int(run.stderr.splitlines()[-1].removeprefix("writes: "))


def tree(folder: Path) -> dict[str, str] | None:
    """sha256 of every file under `folder`, by relative path; None when it does not exist."""
    if not folder.exists():
        return None
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def leftovers(out: Path) -> list[str]:
    """What writers of `out` keep beside it while they run: temp dirs, an old copy, the lock."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


@pytest.fixture(scope="module")
def inputs(pico, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("faults")
    smear = assemble(MergeConfig.model_validate(pico_recipe(pico, method="smear")), root / "smear")
    data = root / "rows.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n" for r in router_training_rows(8)
        )
    )
    return {
        "stock": write_recipe(root / "stock.yaml", pico_recipe(pico)),
        "dynamic": write_recipe(root / "wemoe.yaml", pico_recipe(pico, method="wemoe", level="block")),
        "smear": smear,
        "data": data,
    }


# Each command twice: as the test runs it, and a variant whose output differs (the OUT_DIR that already exists).
COMMANDS = {
    "assemble (stock)": (
        lambda i, out: ["assemble", i["stock"], out, "--shard-size", "60K"],
        lambda i, out: ["assemble", i["stock"], out, "--dtype", "bfloat16"],
    ),
    "assemble (dynamic)": (
        lambda i, out: ["assemble", i["dynamic"], out, "--shard-size", "60K"],
        lambda i, out: ["assemble", i["dynamic"], out, "--dtype", "bfloat16"],
    ),
    "bake": (
        lambda i, out: ["bake", i["smear"], out, "--weights", "0.2,0.3,0.5"],
        lambda i, out: ["bake", i["smear"], out, "--weights", "1,0,0"],
    ),
    "export-lora": (
        lambda i, out: ["export-lora", i["smear"], out, "--weights", "0.2,0.3,0.5"],
        lambda i, out: ["export-lora", i["smear"], out, "--weights", "1,0,0"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_kill_9_leaves_the_old_output_or_the_new_one_and_the_next_run_cleans_up(inputs, tmp_path, command):
    args, other = (lambda out, f=f: f(inputs, out) for f in COMMANDS[command])
    n = writes_of(crash(0, args(tmp_path / "uninterrupted"), tmp_path))
    expected = tree(tmp_path / "uninterrupted")
    points = sorted(random.Random(f"{SEED} {command}").sample(range(1, n), KILLS))
    killed = 0
    for k, point in enumerate(points):
        out = tmp_path / f"out{k}"
        before = None
        if existing := k % 2 == 1:
            assert crash(0, other(out), tmp_path).returncode == 0
            before = tree(out)
            assert before != expected
        run = crash(point, args(out) + ["--force"] * existing, tmp_path)
        killed += run.returncode == -signal.SIGKILL
        assert tree(out) in (before, expected), f"killed at write {point} of {n}: OUT_DIR is neither old nor new"
        rerun = crash(0, args(out) + ["--force"] * out.exists(), tmp_path)  # the next run, as a user starts it
        assert rerun.returncode == 0, rerun.stderr
        assert tree(out) == expected  # byte for byte the uninterrupted run's
        assert leftovers(out) == []
    assert killed == KILLS  # every kill landed before the command finished


@pytest.mark.slow
def test_train_router_killed_resumes_from_its_last_checkpoint_to_the_uninterrupted_result(inputs, tmp_path):
    def args(run_dir):
        return [
            "train-router",
            inputs["smear"],
            "--data",
            inputs["data"],
            "--out",
            run_dir,
            "--steps",
            4,
            "--batch-size",
            4,
            "--eval-every",
            2,
            "--save-every",
            1,
            "--lr",
            0.05,
        ]

    def result(run_dir):  # every file byte for byte, but for the timings
        files = {k: v for k, v in tree(run_dir).items() if not k.endswith(("summary.json", "router_training.json"))}
        for state in run_dir.glob("checkpoints/*/trainer_state.json"):
            files[state.relative_to(run_dir).as_posix()] = {**json.loads(state.read_text()), "train_seconds": None}
        return files

    n = writes_of(crash(0, args(tmp_path / "uninterrupted"), tmp_path))
    expected = result(tmp_path / "uninterrupted")
    for k, point in enumerate(sorted(random.Random(f"{SEED} train-router").sample(range(1, n), KILLS))):
        run_dir = tmp_path / f"run{k}"
        assert crash(point, args(run_dir), tmp_path).returncode == -signal.SIGKILL
        resumed = crash(0, args(run_dir) + ["--resume"], tmp_path)
        assert resumed.returncode == 0, resumed.stderr
        assert result(run_dir) == expected, f"killed at write {point} of {n}"


# ----------------------------------------------------------------------------- a full disk


@pytest.fixture
def disk_full(monkeypatch):
    """Every safetensors save writes half its bytes, then fails as safetensors does when the disk is full."""
    import safetensors.torch
    import transformers.modeling_utils

    import moe_merge.writer

    real = safetensors.torch.save_file

    def full(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise SafetensorError(
            'Error while serializing: Os { code: 28, kind: StorageFull, message: "No space left on device" }'
        )

    for module in (safetensors.torch, moe_merge.writer, transformers.modeling_utils):
        monkeypatch.setattr(
            module, "save_file" if module is not transformers.modeling_utils else "safe_save_file", full
        )


@pytest.mark.parametrize("command", [*COMMANDS, "train-router"])
def test_a_full_disk_names_the_file_and_leaves_nothing(inputs, tmp_path, capsys, disk_full, command):
    out = tmp_path / "new" / "out"  # its parent too is made
    if command == "train-router":
        args = [
            "train-router",
            inputs["smear"],
            "--data",
            inputs["data"],
            "--out",
            out,
            "--steps",
            2,
            "--batch-size",
            4,
        ]
    else:
        args = COMMANDS[command][0](inputs, out)
    assert cli_main(list(map(str, args))) == 2
    err = capsys.readouterr().err
    if command == "train-router":  # the run directory stays for --resume, nothing half-written in it
        assert re.search(rf"cannot write {re.escape(str(out))}/\S+\.safetensors: .*No space left on device", err), err
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
            "args.json",
            "best",
            "checkpoints",
            "log.jsonl",
        ]
    else:
        file = rf"{re.escape(str(out.parent))}/\.out\.tmp-\d+/\S+\.(safetensors|tmp)"
        assert re.search(rf"cannot write {file}: no space left on the disk", err), err
        assert not out.exists()
    assert leftovers(out) == []


# ----------------------------------------------------------------------------- two writers


def test_a_second_writer_of_the_same_output_fails_at_once(inputs, tmp_path):
    out = tmp_path / "moe"
    with locked(out):  # another process is writing OUT_DIR
        run = crash(0, ["assemble", inputs["stock"], out], tmp_path)
    assert run.returncode == 2
    assert f"another process (pid {os.getpid()}) is writing {out}" in run.stderr
    assert not out.exists()


@pytest.mark.slow
def test_two_assemblies_into_one_output_give_one_complete_model(inputs, tmp_path):
    reference = tmp_path / "reference"
    assert cli_main(["assemble", str(inputs["stock"]), str(reference)]) == 0
    out = tmp_path / "moe"
    cmd = [sys.executable, "-m", "moe_merge.cli", "assemble", str(inputs["stock"]), str(out)]
    runs = [subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in runs]
    assert sorted(rc for rc, _ in results) == [0, 2]
    failed = next(err for rc, err in results if rc == 2)
    assert "is writing" in failed or "already exists" in failed
    assert tree(out) == tree(reference)
    assert leftovers(out) == []


# ----------------------------------------------------------------------------- a push that dies


def test_a_push_killed_before_its_commit_completes_when_run_again(inputs, tmp_path):
    token = "hf_standin_token"
    env = pushing_env(tmp_path, HF_TOKEN=token, HF_HUB_DISABLE_XET="1")
    folder = inputs["smear"]
    with HubStandIn(token) as hub:
        env["HF_ENDPOINT"] = hub.url
        cmd = [sys.executable, "-m", "moe_merge.cli", "push", str(folder), "me/smear"]
        first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        hub.before_commit = lambda: os.kill(first.pid, signal.SIGKILL)  # dies with its files on the wire
        assert first.wait() == -signal.SIGKILL
        assert hub.commits == [] and hub.repos["me/smear"].branches["main"] == {}
        hub.before_commit = None
        again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        assert again.returncode == 0, again.stderr
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert hub.repos["me/smear"].branches["main"] == files
    assert len(hub.commits) == 1


# ----------------------------------------------------------------------------- NaN and Inf


def _poisoned(pico, tmp_path, value: float) -> Path:
    """A copy of the first pico expert with one value of one MLP weight replaced."""
    import shutil

    expert = tmp_path / "poisoned"
    shutil.copytree(pico["experts"][0], expert)
    tensors = load_file(expert / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = value
    save_file(tensors, expert / "model.safetensors", metadata={"format": "pt"})
    return expert


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_source_holding_nan_or_inf_is_refused_before_any_work(pico, tmp_path, capsys, value):
    recipe = pico_recipe(pico, method="smear")
    recipe["experts"][0]["source_model"] = str(_poisoned(pico, tmp_path, value))
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    assert cli_main(["assemble", str(path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert (
        f"{tmp_path / 'poisoned' / 'model.safetensors'}: tensor 'model.layers.1.mlp.up_proj.weight' holds 1 NaN" in err
    )
    assert "--allow-nonfinite" in err and not (tmp_path / "out").exists()
    assert cli_main(["assemble", str(path), str(tmp_path / "out"), "--allow-nonfinite"]) == 0


def test_large_finite_values_are_not_taken_for_inf(pico, tmp_path):
    """The check sums each tensor in float32 first: values near the float32 limit overflow that sum to Inf, and must
    still pass, as they are finite."""
    from moe_merge.sources import Checkpoint, check_finite

    expert = _poisoned(pico, tmp_path, 3e38)
    tensors = load_file(expert / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 6] = 3e38
    save_file(tensors, expert / "model.safetensors", metadata={"format": "pt"})
    assert not torch.isfinite(tensors["model.layers.1.mlp.up_proj.weight"].sum(dtype=torch.float32))
    check_finite([Checkpoint(expert)])


def test_a_model_holding_nan_is_refused_by_bake_export_lora_and_train_router(inputs, tmp_path, capsys):
    import shutil

    model = tmp_path / "smear"
    shutil.copytree(inputs["smear"], model)
    file = model / "model.safetensors"
    tensors = load_file(file)
    name = "model.layers.1.mlp.up_proj.expert_weight"
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, file, metadata={"format": "pt"})
    for args in (
        ["bake", model, tmp_path / "baked", "--weights", "1,0,0"],
        ["export-lora", model, tmp_path / "lora", "--weights", "1,0,0"],
        ["train-router", model, "--data", inputs["data"], "--out", tmp_path / "run"],
    ):
        assert cli_main(list(map(str, args))) == 2
        assert f"{file}: tensor {name!r} holds 1 NaN" in capsys.readouterr().err
    assert cli_main(list(map(str, ["bake", model, tmp_path / "baked", "--weights", "1,0,0", "--allow-nonfinite"]))) == 0
