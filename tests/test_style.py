"""The code is linted and formatted as pyproject.toml's [tool.ruff] says, and the package type-checks as its
[tool.mypy] says (both pinned in the dev extra, as their verdicts change between releases). Fix with
`ruff check --fix . && ruff format .`; see what mypy finds with `mypy`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tool(name: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    exe = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} is not installed: `pip install -e '.[dev]'`")
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True)


def ruff(*args: str) -> subprocess.CompletedProcess:
    return tool("ruff", *args)


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


def test_mypy_finds_no_type_errors():
    result = tool("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_sees_a_none_read_as_a_value(tmp_path):
    """The check is on: strict optional, the pydantic plugin, a wrong return type."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from pydantic import BaseModel\n\n"
        "class Spec(BaseModel):\n    rank: int | None = None\n\n"
        "def twice(spec: Spec) -> int:\n    return spec.rank * 2\n\n"
        "Spec(rank='x', other=1)\n"
    )
    result = tool("mypy", "--config-file", str(ROOT / "pyproject.toml"), str(bad), cwd=tmp_path)
    assert result.returncode == 1, result.stdout
    assert 'Unsupported operand types for * ("None" and "int")' in result.stdout
