"""Write a directory all at once: into a hidden sibling, renamed into place only on success.

Beside OUT_DIR while a process writes it:

    .OUT_DIR.lock       flock-ed for the whole write: a second writer fails at once, naming the first
    .OUT_DIR.tmp-PID    the new directory
    .OUT_DIR.old-PID    with --force, the previous OUT_DIR while the new one takes its name (only where
                        the file system cannot swap two directories in one step)

A process killed with -9 leaves its tmp (or old) directory behind, and the kernel drops its lock. The next
writer, holding the lock, knows their owners are dead: it removes the tmp directories, and puts an old one
back if OUT_DIR is missing.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from moe_merge.errors import OutputError, OutputExistsError

logger = logging.getLogger(__name__)

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
DISK_FULL_WORDS = ("No space left on device", "StorageFull", "os error 28", "Disk quota exceeded")  # Rust's wording


def refuse_existing(out_dir: Path | str, force: bool) -> None:
    """Fail before any work when `out_dir` exists and may not be replaced (`atomic_output_dir` checks again)."""
    if Path(out_dir).exists() and not force:
        raise OutputExistsError(
            f"output directory {Path(out_dir).absolute()} already exists; pass --force to overwrite it"
        )


@contextmanager
def atomic_output_dir(out_dir: Path | str, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `out_dir` when the block succeeds.

    On any exception the temporary directory is removed and `out_dir` is left as it was. An existing
    `out_dir` is replaced only with `force=True`, and only after the new one is complete.
    """
    out_dir = Path(out_dir).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with locked(out_dir):
        _recover(out_dir)
        refuse_existing(out_dir, force)
        tmp = _sibling(out_dir, "tmp")
        tmp.mkdir()
        try:
            yield tmp
            _replace(tmp, out_dir)
        except BaseException as e:
            full = disk_full(e, tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            if full:
                raise full from e
            raise


def _sibling(out_dir: Path, kind: str) -> Path:
    return out_dir.parent / f".{out_dir.name}.{kind}-{os.getpid()}"


@contextmanager
def locked(out_dir: Path) -> Iterator[None]:
    """Hold `.OUT_DIR.lock` for the block; fail at once if another process holds it."""
    path = out_dir.parent / f".{out_dir.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputError(
                f"another process (pid {owner}) is writing {out_dir} now; wait for it to finish, or write elsewhere"
            ) from None
        try:  # the file we locked may have been unlinked by a writer that just finished: lock the one at `path`
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _recover(out_dir: Path) -> None:
    """Clean up after writers of `out_dir` that were killed (the caller holds the lock, so none is alive)."""
    for old in sorted(out_dir.parent.glob(f".{out_dir.name}.old-*")):
        if out_dir.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(out_dir)
            logger.warning("restored %s from %s, left by a run killed while replacing it", out_dir, old.name)
    for tmp in sorted(out_dir.parent.glob(f".{out_dir.name}.tmp-*")):
        shutil.rmtree(tmp, ignore_errors=True)
        logger.warning("removed %s, the partial output of a run that was killed", tmp)


def _replace(tmp: Path, out_dir: Path) -> None:
    """Give `tmp` the name `out_dir`: a plain rename, or with an existing `out_dir` an atomic swap where the
    file system has one (then the old directory is removed)."""
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    if not _exchange(tmp, out_dir):
        old = _sibling(out_dir, "old")
        out_dir.rename(old)
        tmp.rename(out_dir)
        tmp = old
    shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux's renameat2 RENAME_EXCHANGE); False where that is not available."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if (err := ctypes.get_errno()) in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def disk_full(e: BaseException, tmp: Path) -> OutputError | None:
    """The error to raise when `e`, raised while writing into `tmp`, says the disk is full; else None. It names the
    file: the error's own, else the newest in `tmp` (the one being written: not every writer says which)."""
    if not (e.errno in DISK_FULL if isinstance(e, OSError) else any(w in str(e) for w in DISK_FULL_WORDS)):
        return None
    file = getattr(e, "filename", None) or max(
        (p for p in tmp.rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime_ns, default=tmp
    )
    free = shutil.disk_usage(tmp.parent).free
    return OutputError(
        f"cannot write {file}: no space left on the disk of {tmp.parent} "
        f"({free / 2**30:.1f} GiB free now). The partial output was removed; free space (`moe-merge assemble "
        "--dry-run` gives a recipe's output size) and run again"
    )
