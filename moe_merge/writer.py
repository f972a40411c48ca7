"""Streamed, sharded safetensors output with Hugging Face names and index."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from moe_merge.outdir import DISK_FULL_WORDS


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, all or nothing: written beside `path` and renamed, so a crash or a full disk never
    leaves a half-written file. Its I/O errors come as text (SafetensorError); they are raised as the OSError they
    are, naming `path`, so that a full disk is reported as one."""
    path = Path(path)
    part = path.with_name(path.name + ".part")
    try:
        save_file(tensors, part, metadata=metadata)
        part.rename(path)
    except SafetensorError as e:
        code = errno.ENOSPC if any(w in str(e) for w in DISK_FULL_WORDS) else errno.EIO
        raise OSError(code, str(e), str(path)) from e
    finally:
        part.unlink(missing_ok=True)


class ShardWriter:
    """Buffer tensors up to `max_shard_bytes`, flush each full shard to disk, name them at the end.

    Peak memory is one shard's buffer, whatever the model's size.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int):
        self.out_dir, self.max_shard_bytes = Path(out_dir), max_shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list[set[str]] = []
        self.names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"tensor {name!r} written twice")
        self.names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self.buffer[name] = tensor.contiguous()
        self.buffer_bytes += nbytes
        self.total_bytes += nbytes

    def get(self, name: str) -> torch.Tensor:
        """A tensor added before: from the buffer, or read back from the shard it was flushed to."""
        if name in self.buffer:
            return self.buffer[name]
        for i, shard in enumerate(self.shards):
            if name in shard:
                with safe_open(self.out_dir / f"shard-{i:05d}.tmp", framework="pt") as f:
                    return f.get_tensor(name)
        raise KeyError(f"tensor {name!r} was not written")

    def flush(self) -> None:
        if not self.buffer:
            return
        save_tensors(self.buffer, self.out_dir / f"shard-{len(self.shards):05d}.tmp", metadata={"format": "pt"})
        self.shards.append(set(self.buffer))
        self.buffer, self.buffer_bytes = {}, 0

    def finalize(self) -> list[str]:
        """Rename shards to `model-0000i-of-0000n.safetensors` (or `model.safetensors`), write the index."""
        self.flush()
        n = len(self.shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            (self.out_dir / f"shard-{i:05d}.tmp").rename(self.out_dir / name)
        if n > 1:
            index = {
                "metadata": {"total_size": self.total_bytes},
                "weight_map": {t: names[i] for i, shard in enumerate(self.shards) for t in sorted(shard)},
            }
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names
