"""The code is linted and formatted as pyproject.toml's [tool.ruff] says (ruff is pinned in the dev extra, as its
format changes between releases). Fix with `ruff check --fix . && ruff format .`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ruff(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if exe is None:
        pytest.fail("ruff is not installed: `pip install -e '.[dev]'`")
    return subprocess.run([exe, *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_finds_no_lint():
    result = ruff("check", "--no-cache", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_code_is_formatted():
    result = ruff("format", "--no-cache", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_check_sees_bad_code(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nx=1\n")
    assert ruff("check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), str(bad)).returncode == 1  # F401
    assert ruff("format", "--no-cache", "--check", str(bad)).returncode == 1
