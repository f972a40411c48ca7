"""Every supported family, each against its own transformers model: one-hot merge weights reproduce each expert, with
the cache, padding and sliding windows; Gemma 3's multimodal checkpoints merge as their text model; what is refused
(a stock MoE from a Gemma base, Phi-3's fused layout, a GGUF file given as a checkpoint) is refused clearly."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_merge.arch import FAMILIES as FAMILY_TABLE
from moe_merge.assemble import assemble
from moe_merge.cli import main as cli_main
from moe_merge.config import MergeConfig
from moe_merge.zoo import build_tokenizer
from tests.conftest import pico_recipe, write_recipe
from tests.fixtures import pico_checkpoint
from tests.test_dynamic import _build, _enc, _expert_model, _positions

FAMILIES = ["mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"]
# transformers' eager attention (Gemma 2's, for its soft-capping) gives NaN on left padding in float64: float32 there
DTYPES = {"gemma2": (torch.float32, 2e-5)}


def _family_sources(arch, root, name="all", perturb="all"):
    """A pico base of `arch` in `root` (made once) and two experts perturbed as `perturb` says."""
    base = root / "base"
    if not base.exists():
        pico_checkpoint(base, arch=arch)
    experts = [root / f"{name}{i}" for i in range(2)]
    for i, path in enumerate(experts):
        if not path.exists():
            pico_checkpoint(path, arch=arch, seed=i + 1, base=base, perturb=perturb)
    return {"base": base, "x": experts}


def _reproduces_its_experts(sources, method, level, arch, extra=None):
    dtype, atol = DTYPES.get(arch, (torch.float64, 1e-9))
    model, tok, recipe = _build(sources, method, level, "x", extra or {}, dtype)
    enc = _enc(tok)
    real = enc["attention_mask"].bool()
    for e in range(2):
        got = model(**enc, merge_weights=torch.tensor([1.0 - e, float(e)], dtype=dtype)).logits
        want = _expert_model(recipe, e, dtype)(**enc, position_ids=_positions(enc)).logits
        torch.testing.assert_close(got[real], want[real], rtol=0, atol=atol)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**enc, **kw), model.generate(**enc, use_cache=False, **kw))
    return model


@pytest.mark.parametrize("arch", FAMILIES)
def test_every_family_reproduces_its_experts_and_generates_with_the_cache(arch, tmp_path):
    """Qwen2's attention biases (merged as bias task vectors), Qwen3's q/k norms, Mistral's layout; Gemma's (1 + w)
    norms and scaled embeddings, Gemma 2's and 3's norms after attention and MLP, their sliding-window layers (a
    window shorter than the prompts; Gemma 3's with a RoPE of their own) and Gemma 2's soft-capping. Every weight of
    the experts differs, so the embeddings, every norm and the head are routed too."""
    sources = _family_sources(arch, tmp_path)
    if arch == "qwen2":  # make the attention biases differ too
        from safetensors.torch import load_file, save_file

        for i, path in enumerate(sources["x"]):
            sd = load_file(path / "model.safetensors")
            for k in sd:
                if k.endswith("q_proj.bias"):
                    sd[k] = sd[k] + 0.1 * (i + 1)
            save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    for method, extra in (("smear", {}), ("twin", {"twin": {"rank": 64}})):
        model = _reproduces_its_experts(sources, method, "block", arch, extra)
        assert model.config.routed_parts == ["embeddings", "norms", "head"]


GEMMA_CASES = [(m, lv) for m in ("smear", "wemoe", "twin") for lv in ("ffn", "block")] + [
    ("sparse", "block"),
    ("sparse", "model"),
]


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text"])
@pytest.mark.parametrize("method,level", GEMMA_CASES, ids=[f"{m}-{lv}" for m, lv in GEMMA_CASES])
def test_gemma_reproduces_its_experts_with_every_method_and_level(arch, method, level, tmp_path_factory):
    """At ffn level the experts differ in their MLPs and the MLP's own norms (Gemma: the norms before and after the
    MLP, not the one after attention); at block and model level in every weight."""
    root = tmp_path_factory.getbasetemp() / f"gemma-{arch}"
    if level == "ffn":
        sources = _family_sources(arch, root, "ffn", (".mlp.", *FAMILY_TABLE[arch].mlp_norms))
    else:
        sources = _family_sources(arch, root)
    model = _reproduces_its_experts(sources, method, level, arch, {"twin": {"rank": 64}} if method == "twin" else {})
    if level == "ffn":  # the MLP's norms are routed, the attention's are not
        layer = model.model.layers[0]
        assert type(layer.pre_feedforward_layernorm).__name__ == "MergedNorm"
        assert type(layer.post_feedforward_layernorm).__name__ == "MergedNorm"
        assert type(layer.post_attention_layernorm).__name__.endswith("RMSNorm")


def test_a_gemma_base_has_no_stock_moe_and_says_which_methods_run_on_it(tmp_path, capsys):
    sources = _family_sources("gemma3_text", tmp_path, "mlp", "mlp")
    recipe = write_recipe(tmp_path / "r.yaml", pico_recipe({"base": sources["base"], "experts": sources["x"]}))
    assert cli_main(["assemble", str(recipe), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "transformers has no MoE architecture for a gemma3_text base" in err
    assert "`method: smear | wemoe | twin`" in err and not (tmp_path / "out").exists()


def test_a_qwen3_base_cannot_take_a_shared_expert_and_says_so(tmp_path, capsys):
    """Qwen2-MoE is the only stock MoE with a shared expert, and it has no q/k norms for a Qwen3 base."""
    sources = _family_sources("qwen3", tmp_path, "mlp", "mlp")
    recipe = pico_recipe({"base": sources["base"], "experts": sources["x"]})
    recipe["shared_experts"] = [{"source_model": str(sources["base"])}]
    assert cli_main(["assemble", str(write_recipe(tmp_path / "r.yaml", recipe)), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "`shared_experts` needs an output with a shared expert (Qwen2-MoE), which a qwen3 base" in err
    assert not (tmp_path / "out").exists()


def _gemma3_multimodal(path, seed: int, base=None):
    """A tiny Gemma 3 with a vision tower (Gemma3ForConditionalGeneration), saved as transformers saves it: the text
    model under `language_model.model.`; with `base`, a copy with every weight perturbed."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    tok = build_tokenizer()
    torch.manual_seed(seed)
    if base is None:
        text = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
            vocab_size=len(tok),
            sliding_window=4,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"],
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        vision = dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        model = Gemma3ForConditionalGeneration(
            Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=3)
        )
    else:
        model = Gemma3ForConditionalGeneration.from_pretrained(base)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_a_multimodal_gemma3_merges_as_its_text_model(tmp_path, caplog):
    """Gemma 3 checkpoints with a vision tower (`model_type: gemma3`, a `text_config`): full fine-tunes and a LoRA
    adapter whose targets also match the vision tower's q_proj. The output is a text-only dynamic model whose one-hot
    weights give each expert's own text logits; the adapter's vision-tower factors are left out, with a warning."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import Gemma3ForConditionalGeneration

    base = _gemma3_multimodal(tmp_path / "base", 0)
    full = _gemma3_multimodal(tmp_path / "full", 1, base)
    torch.manual_seed(2)
    peft = get_peft_model(
        Gemma3ForConditionalGeneration.from_pretrained(base),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    assert any("vision_tower" in n and "lora_A" in n for n, _ in peft.named_parameters())
    peft.save_pretrained(tmp_path / "lora")
    recipe = {
        "base_model": str(base),
        "method": "smear",
        "level": "block",
        "experts": [
            {"source_model": str(full), "positive_prompts": ["shift abc="]},
            {"source_model": str(tmp_path / "lora"), "positive_prompts": ["mirror xy="]},
        ],
    }
    out = assemble(MergeConfig.model_validate(recipe), tmp_path / "out")
    assert "adapts a tower other than the text model" in caplog.text
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.text_config.model_type == "gemma3_text"
    tok = build_tokenizer()
    enc = _enc(tok)
    real = enc["attention_mask"].bool()
    lora_model = PeftModel.from_pretrained(Gemma3ForConditionalGeneration.from_pretrained(base), tmp_path / "lora")
    for e, expert in enumerate([Gemma3ForConditionalGeneration.from_pretrained(full), lora_model]):
        with torch.no_grad():
            want = expert.eval()(**enc, position_ids=_positions(enc)).logits
            got = model(**enc, merge_weights=torch.eye(2)[e]).logits
        torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5)


def test_a_gguf_file_given_as_a_checkpoint_is_refused_naming_it(pico, tmp_path, capsys):
    """llama.cpp's files start with the bytes `GGUF`; a directory of them is no Hugging Face checkpoint either."""
    gguf = tmp_path / "models" / "model.Q4_K_M.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(60))
    for given in (gguf.parent, gguf):
        recipe = write_recipe(tmp_path / "r.yaml", pico_recipe(pico, base_model=str(given), method="smear"))
        assert cli_main(["assemble", str(recipe), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert f"{gguf} is a GGUF file" in err and "moe_merge.gguf.convert" in err, err
    assert not (tmp_path / "out").exists()


def test_phi3_is_refused_with_the_reason(tmp_path, capsys):
    """Phi-3 fuses q, k, v into `qkv_proj` and gate, up into `gate_up_proj`: no row of the family table fits it."""
    from transformers import Phi3Config, Phi3ForCausalLM

    tok = build_tokenizer()
    Phi3ForCausalLM(
        Phi3Config(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            pad_token_id=0,
        )
    ).save_pretrained(tmp_path / "phi3")
    tok.save_pretrained(tmp_path / "phi3")
    recipe = write_recipe(
        tmp_path / "r.yaml",
        {
            "base_model": str(tmp_path / "phi3"),
            "method": "smear",
            "experts_per_token": 1,
            "experts": [{"source_model": str(tmp_path / "phi3"), "positive_prompts": ["a"]}],
        },
    )
    assert cli_main(["assemble", str(recipe), str(tmp_path / "out")]) == 2
    assert (
        "model_type 'phi3', which moe-merge does not support (its attention and MLP are fused"
        in capsys.readouterr().err
    )
