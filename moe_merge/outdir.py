"""Write a directory all at once: into a hidden sibling, renamed into place only on success."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moe_merge.errors import OutputExistsError


@contextmanager
def atomic_output_dir(out_dir: Path | str, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out_dir` when the block succeeds.

    On any exception the temporary directory is removed and `out_dir` is left as it was. An
    existing `out_dir` is replaced only with `force=True`, and only after the new one is complete.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not force:
        raise OutputExistsError(f"output directory {out_dir} already exists; pass --force to overwrite it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out_dir)
