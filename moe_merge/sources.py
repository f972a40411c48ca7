"""Lazy access to the base and the experts, tensor by tensor.

An expert is either a full checkpoint directory or a PEFT LoRA adapter on top of the base; both
answer `get(name)` (the expert's full weight) and `delta(name)` (its task vector). Nothing is read
until asked for, and no file handle (or memory map) stays open between reads, so memory follows
what the caller holds rather than what it has read.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from moe_merge.arch import FAMILIES, MULTIMODAL, family_error
from moe_merge.errors import CompatibilityError, SourceError

logger = logging.getLogger(__name__)

SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
SAFETENSORS_DTYPES = {  # header codes of the float dtypes
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
# Fields that must agree between the base and every expert, with why.
MATCHING_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "vocab_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
)
# Where a multimodal checkpoint keeps its text model: stored prefix -> the text model's own. transformers 5 saves
# Gemma 3's under `language_model.model.` (its in-memory `model.language_model.` is also found in the wild).
TEXT_PREFIXES = (
    ("language_model.model.", "model."),
    ("model.language_model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
GGUF_MAGIC = b"GGUF"


def _local(ref: str, relative_to: Path | None) -> list[Path]:
    """Where `ref` may be on disk: relative to the recipe's directory first (a recipe means its own
    neighbours), then as given (absolute, or relative to the current directory)."""
    return ([relative_to / ref] if relative_to else []) + [Path(ref).expanduser()]


def resolve_path(ref: str, relative_to: Path | None = None) -> Path:
    """A local directory for `ref`: a path (absolute, relative to the recipe's directory, else to the current
    one) or a cached Hub id."""
    for candidate in _local(ref, relative_to):
        if candidate.is_dir():
            return candidate.absolute()
        if candidate.is_file():
            refuse_gguf(candidate)
            raise SourceError(
                f"model {ref!r} is the file {candidate.absolute()}; a model is a Hugging Face checkpoint "
                "directory (config.json + safetensors): give its directory"
            )
    if ref.count("/") == 1 and not Path(ref).exists():
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(ref, local_files_only=True))
        except Exception:
            pass
    raise SourceError(
        f"model {ref!r} is not a local directory nor in the Hugging Face cache; moe-merge reads local checkpoints: "
        f"fix the path, or download it first with `hf download {ref}`"
    )


def hub_id(ref: str, path: Path) -> str | None:
    """`ref` when it named a Hub repo, i.e. it was resolved from the Hugging Face cache; None for local paths."""
    from huggingface_hub import constants

    try:
        Path(path).resolve().relative_to(Path(constants.HF_HUB_CACHE).resolve())
    except ValueError:
        return None
    return ref.rsplit("+", 1)[-1]  # mergekit's `base+adapter`: the adapter is the source


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Tensor name -> {"dtype", "shape", "data_offsets"} from a safetensors file, reading only its header
    (an 8-byte little-endian length, then that many bytes of JSON): planning never touches tensor data.
    The header must describe the file: every entry well formed, the data exactly as long as they say."""
    redo = "re-download or re-save it"
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            raw = f.read(size) if 0 < size <= MAX_HEADER_BYTES else b""
        header = json.loads(raw)
        file_size = path.stat().st_size
    except (OSError, ValueError) as e:
        raise SourceError(f"{path} does not start with a safetensors header ({e}); {redo}") from None
    if len(raw) != size or not isinstance(header, dict):
        raise SourceError(f"{path} does not start with a safetensors header; {redo}")
    header.pop("__metadata__", None)
    end = 0
    for name, entry in header.items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("dtype"), str)
            and _ints(entry.get("shape"))
            and _ints(entry.get("data_offsets"))
            and len(entry["data_offsets"]) == 2
        ):
            raise SourceError(f"{path}: the header's entry for tensor {name!r} is malformed ({entry!r:.80}); {redo}")
        end = max(end, entry["data_offsets"][1])
    if 8 + size + end != file_size:
        raise SourceError(
            f"{path} is {file_size} bytes but its header describes {8 + size + end}: the file is "
            f"truncated or was overwritten; {redo}"
        )
    return header


def _ints(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and v >= 0 for v in value)


def text_model_name(name: str) -> str | None:
    """A multimodal checkpoint's tensor `name` as its text model names it, or None for another tower's tensor."""
    for stored, own in TEXT_PREFIXES:
        if name.startswith(stored):
            return own + name[len(stored) :]
    return None


def text_config_dict(config: dict, where: Path) -> dict:
    """The text model's config of a multimodal `config` (Gemma 3's `text_config`), with what the outer config
    says for the whole model (dtype, tied embeddings)."""
    text = config.get("text_config")
    if not isinstance(text, dict):
        raise SourceError(f"{where} has model_type {config.get('model_type')!r} but no `text_config` mapping")
    out = {**text, "model_type": MULTIMODAL[config["model_type"]]}
    for key in ("dtype", "torch_dtype", "tie_word_embeddings"):
        if key in config and key not in text:
            out[key] = config[key]
    return out


def refuse_gguf(path: Path) -> None:
    """A GGUF file (or a directory holding only GGUF files) where a checkpoint directory is expected."""
    files = [path] if path.is_file() else sorted(path.glob("*.gguf")) if path.is_dir() else []
    for f in files:
        with open(f, "rb") as fh:
            if fh.read(4) == GGUF_MAGIC:
                raise SourceError(
                    f"{f} is a GGUF file (llama.cpp's format); moe-merge reads Hugging Face checkpoint directories "
                    "(config.json + safetensors). Convert it first: `moe_merge.gguf.convert(GGUF_FILE, OUT_DIR)` "
                    "dequantizes it with transformers and saves a checkpoint (docs/recipe.md, Inputs)"
                )


class Checkpoint:
    """A local Hugging Face checkpoint: config.json plus safetensors (single or sharded) or .bin.

    A multimodal checkpoint whose text model a family supports (Gemma 3) is seen as that text model: `config` is
    its text config, and tensors are named, listed and read as the text model's (`model.layers...`), the other
    towers left out. `stored_config` keeps the file's own config."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            refuse_gguf(self.path)
            raise SourceError(f"{self.path} has no config.json; is it a Hugging Face model directory?")
        try:
            self.stored_config: dict = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise SourceError(f"{config_file} is not valid JSON: {e}") from None
        if not isinstance(self.stored_config, dict):
            raise SourceError(f"{config_file} is not a JSON object")
        self.multimodal = self.stored_config.get("model_type") in MULTIMODAL
        self.config: dict = text_config_dict(self.stored_config, config_file) if self.multimodal else self.stored_config
        self._bin_files: dict[str, dict[str, torch.Tensor]] = {}  # memory-mapped, unpickled once per file
        self._headers: dict[str, dict[str, dict]] = {}  # safetensors headers, read once per file
        stored_map = self._read_weight_map()
        self._stored: dict[str, str] = {}  # our name -> the name in the file, where they differ
        if self.multimodal:
            for stored in list(stored_map):
                if (own := text_model_name(stored)) is not None:
                    self._stored[own] = stored
            self.weight_map = {own: stored_map[stored] for own, stored in self._stored.items()}
        else:
            self.weight_map = stored_map

    def _read_weight_map(self) -> dict[str, str]:
        for index_name in (SAFE_INDEX, BIN_INDEX):
            index_file = self.path / index_name
            if index_file.is_file():
                return self._read_index(index_file)
        if (self.path / SAFE_SINGLE).is_file():
            return {k: SAFE_SINGLE for k in self.header(SAFE_SINGLE)}
        if (self.path / BIN_SINGLE).is_file():
            return {k: BIN_SINGLE for k in self._load_bin(BIN_SINGLE)}
        raise SourceError(
            f"no weights in {self.path}: expected {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}"
        )

    def _read_index(self, index_file: Path) -> dict[str, str]:
        """The index's weight map, checked against its shards: each a plain file name in this directory, present,
        and (safetensors) holding exactly the tensors the index gives it."""
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
            if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())):
                raise TypeError("`weight_map` is not a mapping of tensor names to file names")
        except (ValueError, KeyError, TypeError) as e:
            raise SourceError(
                f"{index_file} is not a valid index ({type(e).__name__}: {e}); re-download or re-save the checkpoint"
            ) from None
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard or shard in ("", ".", ".."):
                raise SourceError(
                    f"{index_file} names shard {shard!r}, which is not a file name in {self.path}; "
                    "an index may name only files beside it"
                )
            if not (self.path / shard).is_file():
                raise SourceError(f"{index_file} names shard {shard}, which is missing from {self.path}")
            if shard.endswith(".safetensors"):
                listed = {t for t, f in weight_map.items() if f == shard}
                held = set(self.header(shard))
                if held != listed:
                    extra, lost = sorted(held - listed), sorted(listed - held)
                    what = (
                        f"holds tensor {extra[0]!r}, which the index does not list"
                        if extra
                        else f"lacks tensor {lost[0]!r}, which the index puts there"
                    )
                    raise SourceError(
                        f"{self.path / shard} {what} ({index_file} does not describe its shards); "
                        "re-download or re-save the checkpoint"
                    )
        return weight_map

    def _load_bin(self, file: str) -> dict[str, torch.Tensor]:
        if file not in self._bin_files:
            try:  # mmap keeps it lazy; weights_only refuses pickled code
                self._bin_files[file] = torch.load(self.path / file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise SourceError(f"cannot read {self.path / file} safely ({e}); convert it to safetensors") from None
        return self._bin_files[file]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        file = self.weight_map.get(name)
        if file is None:
            raise SourceError(f"tensor {name!r} is not in {self.path}")
        stored = self._stored.get(name, name)
        if file.endswith(".bin"):
            return self._load_bin(file)[stored].clone()
        try:
            with safe_open(self.path / file, framework="pt") as f:
                return f.get_tensor(stored)
        except SafetensorError as e:
            raise SourceError(
                f"cannot read tensor {stored!r} from {self.path / file} ({e}); the file may be truncated"
            ) from None

    def header(self, file: str) -> dict[str, dict]:
        if file not in self._headers:
            self._headers[file] = read_safetensors_header(self.path / file)
        return self._headers[file]

    def _entry(self, name: str) -> dict:
        file, stored = self.weight_map[name], self._stored.get(name, name)
        entry = self.header(file).get(stored)
        if entry is None:
            raise SourceError(f"the index of {self.path} puts tensor {stored!r} in {file}, whose header lacks it")
        return entry

    def shape(self, name: str) -> tuple[int, ...]:
        """From the safetensors header (no data read); .bin files are memory-mapped instead."""
        if self.weight_map[name].endswith(".bin"):
            return tuple(self._load_bin(self.weight_map[name])[self._stored.get(name, name)].shape)
        return tuple(self._entry(name)["shape"])

    def nbytes(self, name: str) -> int:
        """Bytes of tensor `name` as stored."""
        if self.weight_map[name].endswith(".bin"):
            t = self._load_bin(self.weight_map[name])[self._stored.get(name, name)]
            return t.numel() * t.element_size()
        start, end = self._entry(name)["data_offsets"]
        return end - start

    def dtype(self, name: str) -> torch.dtype:
        """The dtype tensor `name` is stored in, from the safetensors header for the float types."""
        if self.weight_map[name].endswith(".bin"):
            return self._load_bin(self.weight_map[name])[self._stored.get(name, name)].dtype
        code = self._entry(name)["dtype"]
        return SAFETENSORS_DTYPES[code] if code in SAFETENSORS_DTYPES else self.get(name).dtype

    @property
    def family(self) -> str:
        """The family of the model (of its text model, for a multimodal checkpoint)."""
        return self.config.get("model_type", "?")

    def text_config(self):
        """The transformers config of the (text) model, as the dynamic model holds it."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.path)
        return config.get_text_config() if self.multimodal else config


class LoraExpert:
    """A PEFT LoRA adapter seen as a full expert: weight = base + scaling * B @ A on adapted modules."""

    def __init__(self, adapter_dir: Path | str, base: Checkpoint):
        from peft import LoraConfig
        from peft.utils import load_peft_weights
        from peft.utils.other import get_pattern_key

        self.path, self.base = Path(adapter_dir), base
        self.config = base.config
        try:
            cfg = LoraConfig.from_pretrained(str(self.path))
        except Exception as e:
            raise SourceError(f"{self.path / 'adapter_config.json'} is not a readable LoRA config: {e}") from None
        for field, why in (("use_dora", "DoRA"), ("lora_bias", "LoRA bias"), ("modules_to_save", "modules_to_save")):
            if getattr(cfg, field, None):
                raise SourceError(
                    f"{self.path}: {why} adapters are not supported yet (`{field}` is set in adapter_config.json); "
                    "merge it into a full checkpoint with peft's merge_and_unload and use that directory"
                )
        _check_targets(cfg, self.path / "adapter_config.json", base)
        try:
            weights = load_peft_weights(str(self.path), device="cpu")
        except Exception as e:
            raise SourceError(
                f"cannot read the weights of adapter {self.path} ({type(e).__name__}: {e}); re-download or re-save it"
            ) from None
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in weights.items():
            for part in ("lora_A", "lora_B"):
                if f".{part}." in key:
                    module = key.split(f".{part}.")[0].removeprefix("base_model.model.")
                    if base.multimodal:  # the text model's name; another tower's adapters change no text output
                        own = text_model_name(module + ".")
                        if own is None:
                            if part == "lora_A":
                                logger.warning(
                                    "%s: %s adapts a tower other than the text model; left out", self.path, module
                                )
                            break
                        module = own[:-1]
                    pairs.setdefault(module, {})[part] = tensor
                    break
            else:
                raise SourceError(
                    f"{self.path}: tensor {key!r} is not a LoRA A/B matrix; only linear LoRA is supported"
                )
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for module, ab in sorted(pairs.items()):
            name = f"{module}.weight"
            if name not in base:
                raise CompatibilityError(
                    f"adapter {self.path} targets {module!r}, which base {base.path} does not have: "
                    "the adapter was trained on another base"
                )
            A, B = ab["lora_A"], ab["lora_B"]
            out_f, in_f = base.shape(name)
            if cfg.fan_in_fan_out:
                out_f, in_f = in_f, out_f
            if A.shape[1] != in_f or B.shape[0] != out_f:
                raise CompatibilityError(
                    f"adapter {self.path} tensor {module}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit "
                    f"base {base.path} weight {(out_f, in_f)}: the adapter was trained on another base"
                )
            rank = cfg.rank_pattern.get(get_pattern_key(cfg.rank_pattern.keys(), module), cfg.r)
            alpha = cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), module), cfg.lora_alpha)
            scaling = alpha / rank**0.5 if cfg.use_rslora else alpha / rank
            self.factors[name] = (A, B, scaling)
        self.fan_in_fan_out = bool(cfg.fan_in_fan_out)

    def delta(self, name: str) -> torch.Tensor:
        if name not in self.factors:
            return torch.zeros(self.base.shape(name))
        A, B, scaling = self.factors[name]
        d = scaling * (B.float() @ A.float())
        return d.T if self.fan_in_fan_out else d

    def get(self, name: str) -> torch.Tensor:
        w = self.base.get(name)
        if name not in self.factors:
            return w
        return (w.float() + self.delta(name)).to(w.dtype)


Expert = Checkpoint | LoraExpert


def _check_targets(cfg, config_file: Path, base: Checkpoint) -> None:
    """Every `target_modules` entry names modules of the base (PEFT's rule: the full name, or its last parts); an
    adapter made for another architecture names modules this one lacks."""
    import re

    modules = [n.removesuffix(".weight") for n in base.keys() if n.endswith(".weight")]
    targets = cfg.target_modules
    if targets is None or targets == "all-linear":
        return
    if isinstance(targets, str):  # a regular expression over full module names
        if not any(re.fullmatch(targets, m) for m in modules):
            raise SourceError(
                f"{config_file}: `target_modules` {targets!r} matches no module of base {base.path}; the "
                "adapter was made for another architecture"
            )
        return
    for target in sorted(targets):
        if not any(m == target or m.endswith(f".{target}") for m in modules):
            known = sorted({m.rsplit(".", 1)[-1] for m in modules if ".layers." in m})
            raise SourceError(
                f"{config_file}: `target_modules` names {target!r}, which base {base.path} does not have "
                f"(its layers have: {', '.join(known)}); the adapter was made for another architecture"
            )


def check_finite(sources: list[Expert]) -> None:
    """Refuse NaN or Inf in any source, naming the file and the tensor: they would spread to every tensor merged
    from it, and to every output of a model that routes to it. Reads every tensor once."""
    from tqdm.auto import tqdm

    for src in tqdm(sources, desc="checking for NaN/Inf", unit="model", disable=None):
        for name, file, read in _tensors(src):
            t = read()
            if not t.is_floating_point() or torch.isfinite(t.sum(dtype=torch.float32)):
                continue  # any NaN or Inf makes the sum so: one pass, no mask (the count only for a suspect)
            if bad := int((~torch.isfinite(t)).sum()):
                raise SourceError(
                    f"{file}: tensor {name!r} holds {bad} NaN or Inf value{'s' * (bad > 1)} of {t.numel()}; "
                    "fix or re-download that checkpoint, or pass --allow-nonfinite to use it as it is"
                )


def check_model_dir(path: Path, allow_nonfinite: bool = False) -> None:
    """What `bake`, `export-lora` and `train-router` check before transformers loads a moe-merge output: its files
    (`Checkpoint`: config, index, headers) and, unless `allow_nonfinite`, every tensor for NaN and Inf."""
    checked = Checkpoint(path)
    if not allow_nonfinite:
        check_finite([checked])


def _tensors(src: Expert):
    """(name, file, read) for every tensor `src` stores."""
    if isinstance(src, LoraExpert):
        file = next(
            (src.path / f for f in ("adapter_model.safetensors", "adapter_model.bin") if (src.path / f).is_file()),
            src.path,
        )
        for name, (A, B, _) in src.factors.items():
            module = name.removesuffix(".weight")
            yield f"{module}.lora_A", file, lambda A=A: A
            yield f"{module}.lora_B", file, lambda B=B: B
        return
    for name, shard in src.weight_map.items():
        yield name, src.path / shard, lambda name=name: src.get(name)


def is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def source_parts(ref: str, relative_to: Path | None = None) -> list[str]:
    """`ref` as one source, or as mergekit's `base+adapter` pair when it names no directory as a whole
    (`runs/lr+wd` may be a directory)."""
    if "+" in ref and not any(p.is_dir() for p in _local(ref, relative_to)):
        return ref.split("+", 1)
    return [ref]


def open_expert(ref: str, base: Checkpoint, relative_to: Path | None = None) -> Expert:
    """Open an expert: a checkpoint directory, a LoRA adapter directory, or mergekit's `base+adapter`."""
    if len(parts := source_parts(ref, relative_to)) == 2:
        model_ref, adapter_ref = parts
        model_path = resolve_path(model_ref, relative_to)
        if model_path.resolve() != base.path.resolve():
            raise CompatibilityError(
                f"expert {ref!r} puts an adapter on {model_path}, but the base is {base.path}; "
                "moe-merge applies adapters to the recipe's base_model only"
            )
        ref = adapter_ref
    path = resolve_path(ref, relative_to)
    if is_adapter(path):
        return LoraExpert(path, base)
    expert = Checkpoint(path)
    check_compatible(base, expert)
    return expert


def check_compatible(base: Checkpoint, expert: Checkpoint) -> None:
    """Raise if `expert` cannot be an expert of `base`: family, sizes, tensors and tokenizer must agree."""
    if base.family not in FAMILIES:
        raise CompatibilityError(family_error(base.family, f"base {base.path}/config.json"))
    for field in MATCHING_FIELDS:
        a, b = base.config.get(field), expert.config.get(field)
        if a != b:
            raise CompatibilityError(
                f"`{field}` differs: {a!r} in {base.path}/config.json but {b!r} in {expert.path}/config.json; "
                "every expert must be fine-tuned from the base"
            )
    missing = sorted(set(base.weight_map) - set(expert.weight_map))
    if missing:
        raise CompatibilityError(f"{expert.path} lacks tensors the base {base.path} has, e.g. {missing[0]!r}")
    base_vocab, expert_vocab = _tokenizer_vocab(base.path), _tokenizer_vocab(expert.path)
    if base_vocab is not None and expert_vocab is not None and base_vocab != expert_vocab:
        raise CompatibilityError(
            f"tokenizers differ: {base.path}/tokenizer.json and {expert.path}/tokenizer.json have different "
            "vocabularies; every expert must use the base's tokenizer"
        )


def _tokenizer_vocab(path: Path) -> dict | None:
    file = path / "tokenizer.json"
    if not file.is_file():
        return None
    data = json.loads(file.read_text())
    added = {t["content"]: t["id"] for t in data.get("added_tokens", [])}
    return {"vocab": data.get("model", {}).get("vocab"), "added": added}
