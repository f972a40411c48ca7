"""Expert sources: lazy checkpoints, LoRA adapters through peft, compatibility checks."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_merge.errors import CompatibilityError, SourceError
from moe_merge.sources import Checkpoint, LoraExpert, check_compatible, open_expert
from tests.fixtures import pico_checkpoint as make_pico


def test_sharded_and_bin_checkpoints_read_like_the_single_file(pico, tmp_path):
    single = Checkpoint(pico["base"])
    tensors = load_file(pico["base"] / "model.safetensors")
    names = sorted(tensors)
    sharded = tmp_path / "sharded"
    shutil.copytree(pico["base"], sharded)
    (sharded / "model.safetensors").unlink()
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, sharded / file)
    weight_map = {k: f for f, keys in halves.items() for k in keys}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    binary = tmp_path / "bin"
    shutil.copytree(pico["base"], binary)
    (binary / "model.safetensors").unlink()
    torch.save(tensors, binary / "pytorch_model.bin")
    for other in (Checkpoint(sharded), Checkpoint(binary)):
        assert sorted(other.keys()) == names
        for k in names:
            assert torch.equal(other.get(k), single.get(k))


@pytest.mark.parametrize("variant", ["full", "mlp"])
def test_lora_delta_matches_peft_merge_and_unload(zoo_dir, variant):
    """rsLoRA, rank_pattern and alpha_pattern (the swap adapter uses all three) are honoured."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = Checkpoint(zoo_dir / "base")
    for name in ("back-lora", "swap-lora"):
        expert = LoraExpert(zoo_dir / variant / name, base)
        merged = (
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo_dir / "base"), zoo_dir / variant / name)
            .merge_and_unload()
            .state_dict()
        )
        assert expert.factors, "no LoRA factors read"
        for key in base.keys():
            torch.testing.assert_close(expert.get(key), merged[key], rtol=0, atol=1e-6)


def test_mergekit_base_plus_adapter_spelling(zoo_dir):
    base = Checkpoint(zoo_dir / "base")
    expert = open_expert(f"{zoo_dir / 'base'}+{zoo_dir / 'mlp' / 'back-lora'}", base)
    assert isinstance(expert, LoraExpert)


def test_dora_adapters_are_refused_by_name(zoo_dir, tmp_path):
    adapter = tmp_path / "dora"
    shutil.copytree(zoo_dir / "mlp" / "back-lora", adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match="DoRA.*use_dora"):
        LoraExpert(adapter, Checkpoint(zoo_dir / "base"))


def test_adapter_for_another_base_is_refused(zoo_dir, tmp_path):
    other = make_pico(tmp_path / "other", hidden=48)  # different hidden size
    with pytest.raises(CompatibilityError, match="trained on another base"):
        LoraExpert(zoo_dir / "mlp" / "back-lora", Checkpoint(other))


def test_mismatched_hidden_size_names_both_files_and_the_field(pico, tmp_path):
    other = make_pico(tmp_path / "wide", hidden=48)
    with pytest.raises(CompatibilityError) as e:
        check_compatible(Checkpoint(pico["base"]), Checkpoint(other))
    msg = str(e.value)
    assert "`hidden_size`" in msg and str(pico["base"]) in msg and str(other) in msg


def test_different_tokenizer_is_refused(pico, tmp_path):
    other = tmp_path / "retok"
    shutil.copytree(pico["experts"][0], other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(CompatibilityError, match="tokenizers differ"):
        check_compatible(Checkpoint(pico["base"]), Checkpoint(other))


def test_truncated_safetensors_names_the_file(pico, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(pico["experts"][0], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="model.safetensors"):
        Checkpoint(broken).get("model.layers.1.mlp.down_proj.weight")


def test_missing_directory_says_what_to_do():
    with pytest.raises(SourceError, match="not a local directory"):
        open_expert("/nonexistent/expert", None)
