"""Run `moe-merge ARGS...` and kill it with SIGKILL at its N-th write under ROOT: the reliability tests' kill -9
at a chosen point. A write is a file opened for writing, a safetensors file saved, a rename, or a file or directory
made or removed; only those under ROOT count (not the caches a first run fills). With N = 0 it runs to the end and
prints how many writes it made, as the last line of stderr.

    python -m tests.crash N ROOT ARGS...
"""

from __future__ import annotations

import builtins
import io
import os
import shutil
import signal
import sys


def _count_writes(kill_at: int, root: str) -> list[int]:
    count = [0]

    def under_root(path, *args, **kwargs) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.path.abspath(path).startswith(root)

    def wrap(fn, writes=under_root):
        def wrapped(*args, **kwargs):
            if writes(*args, **kwargs):
                count[0] += 1
                if count[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return wrapped

    def opens_for_writing(file, mode="r", *args, **kwargs):
        return any(c in mode for c in "wax+") and under_root(file)

    builtins.open = io.open = wrap(io.open, opens_for_writing)
    for name in ("rename", "replace", "mkdir", "rmdir", "unlink"):
        setattr(os, name, wrap(getattr(os, name)))
    shutil.rmtree = wrap(shutil.rmtree)

    import safetensors.torch  # and every module that took `save_file` by name before this ran
    import transformers.modeling_utils

    save = wrap(safetensors.torch.save_file, lambda tensors, filename, *a, **kw: under_root(filename))
    safetensors.torch.save_file = save
    transformers.modeling_utils.safe_save_file = save
    try:
        import accelerate.utils.other

        accelerate.utils.other.safe_save_file = save
    except ImportError:
        pass
    return count


def main() -> int:
    kill_at, root, argv = int(sys.argv[1]), os.path.abspath(sys.argv[2]), sys.argv[3:]
    count = _count_writes(kill_at, root)
    from moe_merge.cli import main as cli_main

    rc = cli_main(argv)
    print(f"writes: {count[0]}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
