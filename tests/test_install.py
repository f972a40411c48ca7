"""Packaging: kernels/ and routers/ install as moe_merge.kernels and moe_merge.routers, never bare."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_wheel_installs_subpackages_under_moe_merge(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp_path / "dist").glob("moe_merge-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "moe_merge/kernels/__init__.py" in names and "moe_merge/routers/prompt_init.py" in names
    assert {"moe_merge/assemble/dynamic.py", "moe_merge/export/lora.py", "moe_merge/train/loop.py"} <= set(names)
    assert not {"moe_merge/dynamic.py", "moe_merge/train_router.py", "moe_merge/bake.py"} & set(names)  # moved
    assert not [n for n in names if n.split("/")[0] in ("kernels", "routers")]
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    script = (
        "import moe_merge, moe_merge.kernels, moe_merge.routers.prompt_init, moe_merge.cli, importlib.util;"
        "import moe_merge.assemble.dynamic, moe_merge.export.lora, moe_merge.train.loop;"
        f"assert moe_merge.__file__.startswith({str(target)!r}), moe_merge.__file__;"
        "assert importlib.util.find_spec('routers') is None;"
        "print('OK')"
    )
    # a fresh interpreter, away from the repository, with the wheel's copy first on the path
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]


def test_importing_moe_merge_needs_no_gpu_or_triton():
    script = (
        "import sys; sys.modules['triton'] = None;"  # make `import triton` fail
        "import moe_merge, moe_merge.kernels, moe_merge.routers, moe_merge.assemble; print('OK')"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]
