"""`moe-merge push`: check an output directory, then upload it to the Hugging Face Hub.

The checks run before a byte is sent and catch what would make the Hub copy useless: the model loads
(transformers builds it on the meta device from the folder: no missing, unexpected or misshapen
tensor; remote code only through files the folder holds), the weight index covers every tensor of
every safetensors file and nothing else, and the model card's metadata parses, with `base_model`
naming Hub repos. The upload is huggingface_hub's: create_repo, create_branch for a revision, then
upload_folder. The token comes from HF_TOKEN or the saved login; HF_ENDPOINT points elsewhere (the
tests use a loopback stand-in).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from moe_merge.errors import PushError
from moe_merge.sources import read_safetensors_header

INDEX_SUFFIX = ".safetensors.index.json"


def validate_folder(folder: Path | str) -> str:
    """Raise PushError naming the file and the fix if `folder` is not ready to upload; returns "model" or "adapter"."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PushError(f"{folder} is not a directory")
    _check_card(folder)
    _check_recipe(folder)
    _check_index(folder)
    if (folder / "adapter_config.json").is_file():
        _check_adapter(folder)
        return "adapter"
    if not (folder / "config.json").is_file():
        raise PushError(f"{folder} has neither config.json nor adapter_config.json: it is not a model directory")
    _check_model_loads(folder)
    return "model"


def _check_card(folder: Path) -> None:
    from huggingface_hub import ModelCard
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = folder / "README.md"
    if not path.is_file():
        raise PushError(
            f"{folder} has no README.md; the Hub needs a model card (moe-merge writes one with every output)"
        )
    try:
        data = ModelCard.load(path).data
    except Exception as e:  # yaml and huggingface_hub raise several types; the message is what matters
        raise PushError(
            f"the metadata block of {path} does not parse ({e}); fix the YAML between the --- lines"
        ) from None
    base_model = data.base_model
    for ref in [base_model] if isinstance(base_model, str) else base_model or []:
        try:
            validate_repo_id(ref)
        except HFValidationError:
            raise PushError(
                f"{path}: `base_model` lists {ref!r}, which is not a Hub repo id (the Hub refuses local "
                "paths); replace it with the repo id or remove it"
            ) from None


def _check_recipe(folder: Path) -> None:
    """The resolved recipe names its sources by Hub id or relative path; an absolute one would publish this
    machine's directory layout and resolve nowhere else."""
    import yaml

    path = folder / "moe-merge.yaml"
    if not path.is_file():
        return
    try:
        recipe = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PushError(f"{path} is not valid YAML ({e}); fix it or remove it") from None
    if not isinstance(recipe, dict):
        raise PushError(f"{path} is not a recipe (a mapping with `base_model` and `experts`); fix it or remove it")
    entries = (recipe.get("experts") or []) + (recipe.get("shared_experts") or [])
    refs = [recipe.get("base_model")] + [e.get("source_model") for e in entries if isinstance(e, dict)]
    local = [r for r in refs if isinstance(r, str) and any(Path(part).is_absolute() for part in r.split("+"))]
    if local:
        raise PushError(
            f"{path} names sources by absolute local path ({local[0]}): write them as Hub ids or as paths "
            "relative to the folder (moe-merge assemble does), then push"
        )


def _check_index(folder: Path) -> None:
    """Every safetensors file belongs to exactly one index (or is a lone file), and index and headers agree."""
    files = {p.name for p in folder.glob("*.safetensors")}
    indexed: set[str] = set()
    for index_path in sorted(folder.glob(f"*{INDEX_SUFFIX}")):
        try:
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise PushError(f"{index_path} is not a safetensors index with a `weight_map` ({e})") from None
        by_file: dict[str, set[str]] = {}
        for tensor, file in weight_map.items():
            by_file.setdefault(file, set()).add(tensor)
        for file, tensors in sorted(by_file.items()):
            if file not in files:
                raise PushError(f"{index_path.name} maps tensors to {file}, which {folder} lacks; re-save the model")
            held = set(read_safetensors_header(folder / file))
            if held != tensors:
                extra, missing = sorted(held - tensors), sorted(tensors - held)
                raise PushError(
                    f"{index_path.name} and the header of {file} disagree: "
                    + (f"{file} holds {extra[:3]} that the index does not list; " if extra else "")
                    + (f"the index puts {missing[:3]} in {file}, which lacks them; " if missing else "")
                    + "re-save the model"
                )
        indexed |= set(by_file)
    stray = sorted(files - indexed)
    if indexed and stray:
        raise PushError(f"{folder}: {', '.join(stray)} is in no index file; remove it or re-save the model")
    if not indexed and len(stray) > 1:
        raise PushError(
            f"{folder} holds {len(stray)} safetensors files ({', '.join(stray)}) but no index naming "
            "their tensors; re-save the model"
        )
    for file in stray:  # a lone file: its header at least must read
        read_safetensors_header(folder / file)


def _check_model_loads(folder: Path) -> None:
    """transformers builds the model from the folder on the meta device: names and shapes, no tensor data."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import moe_merge.modeling  # noqa: F401  (registers model_type moe_merge)

    config = json.loads((folder / "config.json").read_text())
    for ref in (config.get("auto_map") or {}).values():
        ref = ref[0] if isinstance(ref, list) else ref
        module = ref.rsplit(".", 1)[0]
        if ref and "--" not in ref and not (folder / f"{module}.py").is_file():  # `repo--module.Class` lives elsewhere
            raise PushError(
                f"config.json's auto_map names {module}.py, which {folder} lacks: the model could not "
                "load with trust_remote_code; copy it back or re-save the model"
            )
    try:
        AutoConfig.from_pretrained(folder)
        loaded: Any = AutoModelForCausalLM.from_pretrained(  # (model, loading info) with output_loading_info
            folder, device_map="meta", output_loading_info=True, ignore_mismatched_sizes=True
        )
        info = loaded[1]
    except Exception as e:  # transformers raises many types for a bad folder; the message is what matters
        raise PushError(f"{folder} does not load with transformers: {e}") from None
    problems = {k: sorted(info[k])[:3] for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[k]}
    if problems:
        found = "; ".join(f"{k.replace('_', ' ')} {v}" for k, v in problems.items())
        raise PushError(f"{folder} does not load cleanly: {found}; re-save the model")


def _check_adapter(folder: Path) -> None:
    from peft import PeftConfig

    try:
        config = PeftConfig.from_pretrained(str(folder))
    except Exception as e:  # peft raises several types; the message is what matters
        raise PushError(f"{folder / 'adapter_config.json'} does not load with peft: {e}") from None
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        raise PushError(f"{folder} has adapter_config.json but no adapter_model.safetensors")
    names = set(read_safetensors_header(path))
    for name in names:
        pair = name.replace("lora_A", "lora_B") if "lora_A" in name else name.replace("lora_B", "lora_A")
        if pair not in names:
            raise PushError(f"{path}: {name} has no matching {pair}; re-export the adapter")
    if not names:
        raise PushError(f"{path} holds no tensors ({config.peft_type} adapter)")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection failures: huggingface_hub 1.x speaks httpx, 2.x httpx2."""
    errors = []
    for name in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except ImportError:
            pass
    return tuple(errors)


def push(
    folder: Path | str,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Validate `folder`, create `repo_id` if needed (and the `revision` branch), upload; returns the commit URL."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    folder = Path(folder)
    validate_folder(folder)
    token = get_token()
    if token is None:
        raise PushError("no Hugging Face token: set HF_TOKEN, or log in once with `hf auth login`")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            commit_message=commit_message or f"Upload {folder.name} with moe-merge",
        )
    except OfflineModeIsEnabled:
        raise PushError("HF_HUB_OFFLINE is set, so huggingface_hub will not connect; unset it to push") from None
    except _transport_errors() as e:
        raise PushError(
            f"cannot reach the Hub at {api.endpoint} ({e}); check the network connection "
            "(or HF_ENDPOINT, if it points at a mirror)"
        ) from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        hint = {
            401: "the token is invalid: set HF_TOKEN or run `hf auth login`",
            403: f"the token may not write to {repo_id}: use a write token",
        }.get(status, "see the message")
        said = (e.server_message or str(e)).strip().replace("\n", " ")
        raise PushError(f"the Hub at {api.endpoint} refused the upload (HTTP {status}: {said}); {hint}") from None
    return info.commit_url
