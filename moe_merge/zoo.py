"""The tiny zoo: a deterministic base LM and experts fine-tuned from it on synthetic tasks.

Every task maps a lowercase word letter by letter ("shift abc=" -> "bcd"). The base learns the
format on a few maps (`copy`, `skip`, `flip`); each expert learns one new letter map. Two variants share the base:

- `full/`: experts fine-tune every weight, so part of what they learn lives in attention;
- `mlp/`: experts fine-tune only their MLPs, so perfect FFN-level routing recovers them exactly.

Each variant has full fine-tunes (`shift`, `mirror`, `rotate`) and PEFT LoRA adapters (`back`,
`swap`). Tests, examples, the demo and the benchmarks all build on it; it is cached by content
(arch + a version tag), so a second call costs nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moe_merge.outdir import atomic_output_dir

logger = logging.getLogger(__name__)

ZOO_VERSION = "3"
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

# Each task is a permutation of the alphabet, applied letter by letter.
TASKS: dict[str, list[int]] = {
    "copy": [i for i in range(26)],
    "skip": [(i + 2) % 26 for i in range(26)],
    "flip": [(i + 7) % 26 for i in range(26)],
    "shift": [(i + 1) % 26 for i in range(26)],
    "back": [(i - 1) % 26 for i in range(26)],
    "mirror": [25 - i for i in range(26)],
    "swap": [i ^ 1 for i in range(26)],
    "rotate": [(i + 13) % 26 for i in range(26)],
}
# The base learns several maps, so that its attention carries the task word to every position,
# as a real LM carries its context; the experts then each learn a map the base never saw.
BASE_TASKS = ("copy", "skip", "flip")
FULL_EXPERTS = ("shift", "mirror", "rotate")
LORA_EXPERTS = ("back", "swap")
EXPERT_TASKS = FULL_EXPERTS + LORA_EXPERTS
VARIANTS = ("full", "mlp")
ARCHS = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class TrainSpec:
    steps: int
    lr: float
    batch_size: int = 64


BASE_TRAIN = TrainSpec(steps=900, lr=3e-3, batch_size=32)
EXPERT_TRAIN = TrainSpec(steps=250, lr=4e-3, batch_size=32)
LORA_TRAIN = TrainSpec(steps=150, lr=5e-3, batch_size=32)


def apply_task(task: str, word: str) -> str:
    table = TASKS[task]
    return "".join(ALPHABET[table[ALPHABET.index(c)]] for c in word)


def prompt(task: str, word: str) -> str:
    return f"{task} {word}="


def random_words(n: int, seed: int, min_len: int = 4, max_len: int = 7) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return ["".join(ALPHABET[i] for i in torch.randint(0, 26, (k,), generator=g).tolist()) for k in lengths]


def task_prompts(task: str) -> dict[str, list[str]]:
    """Prompts a recipe can use for `task`: routing prompts, worked examples, held-out eval words."""
    seed = 1000 + list(TASKS).index(task)
    positive = [prompt(task, w) for w in random_words(4, seed)]
    examples = [prompt(task, w) + apply_task(task, w) for w in random_words(16, seed + 100)]
    eval_words = random_words(64, seed + 200)
    return {
        "positive_prompts": positive,
        "examples": examples,
        "eval_prompts": [prompt(task, w) for w in eval_words[:16]],
        "eval_words": eval_words,
    }


def router_training_rows(per_task: int, seed: int = 0) -> list[dict]:
    """Mixed-task `prompt`/`completion` rows labelled with their expert, for router training; no held-out
    eval word among them."""
    rows = []
    for k, task in enumerate(EXPERT_TASKS):
        held_out = set(task_prompts(task)["eval_words"])
        words = [w for w in random_words(per_task + 16, seed * 1009 + 5000 + k) if w not in held_out][:per_task]
        rows += [{"prompt": prompt(task, w), "completion": apply_task(task, w), "expert": task} for w in words]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    return [rows[i] for i in order]


# ----------------------------------------------------------------------------- tokenizer and model


def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + list(" =" + ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def model_config(arch: str, vocab_size: int, **overrides):
    from transformers import AutoConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown zoo arch {arch!r}; choose one of {', '.join(ARCHS)}")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    common.update({"qwen3": {"head_dim": 16}, "mistral": {"sliding_window": None}}.get(arch, {}))
    common.update(overrides)
    return AutoConfig.for_model(arch, **common)


# ----------------------------------------------------------------------------- data and training


def encode_batch(task_words: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (loss on the answer and EOS only)."""
    rows, label_rows = [], []
    for task, word in task_words:
        p = [BOS_ID] + [_char_id(c) for c in prompt(task, word)]
        a = [_char_id(c) for c in apply_task(task, word)] + [EOS_ID]
        rows.append(p + a)
        label_rows.append([-100] * len(p) + a)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD_ID)
    labels = torch.full((len(rows), width), -100)
    for i, (r, lab) in enumerate(zip(rows, label_rows)):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(lab)] = torch.tensor(lab)
    return ids, (ids != PAD_ID).long(), labels


def _char_id(c: str) -> int:
    return len(SPECIAL_TOKENS) + (" =" + ALPHABET).index(c)


def train(model, tasks: list[str], spec: TrainSpec, seed: int, desc: str) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    warmup = max(1, spec.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / spec.steps)))
    )
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in tqdm(range(spec.steps), desc=desc, leave=False, disable=None):
        words = random_words(spec.batch_size, seed * 100_003 + step)
        picks = torch.randint(0, len(tasks), (spec.batch_size,), generator=g).tolist()
        ids, mask, labels = encode_batch([(tasks[k], w) for k, w in zip(picks, words)])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


@torch.no_grad()
def exact_match(model, tokenizer, task: str, words: list[str], batch_size: int = 64) -> float:
    """Share of `words` whose greedy completion equals the task's answer exactly."""
    hits = 0
    for i in range(0, len(words), batch_size):
        chunk = words[i : i + batch_size]
        enc = tokenizer([prompt(task, w) for w in chunk], return_tensors="pt", padding=True, padding_side="left")
        enc = {k: v.to(model.device) for k, v in enc.items()}
        out = model.generate(
            **enc, max_new_tokens=9, do_sample=False, pad_token_id=PAD_ID, eos_token_id=EOS_ID
        )
        for w, row in zip(chunk, out[:, enc["input_ids"].shape[1] :]):
            text = tokenizer.decode(row, skip_special_tokens=False).split("</s>")[0]
            hits += text == apply_task(task, w)
    return hits / len(words)


# ----------------------------------------------------------------------------- building


def default_cache_dir() -> Path:
    root = os.environ.get("MOE_MERGE_CACHE") or Path.home() / ".cache" / "moe_merge"
    return Path(root) / "zoo"


def ensure_zoo(arch: str = "llama", cache_dir: Path | None = None) -> Path:
    """The cached zoo for `arch`, built on first use."""
    path = Path(cache_dir or default_cache_dir()) / f"{arch}-v{ZOO_VERSION}"
    if not (path / "zoo.json").exists():
        build_zoo(path, arch=arch, force=True)
    return path


def build_zoo(out_dir: Path | str, arch: str = "llama", force: bool = False, seed: int = 0) -> Path:
    """Train the base and every expert of both variants into `out_dir` (about two minutes on 2 cores)."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    with atomic_output_dir(out_dir, force=force) as tmp:
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_config(model_config(arch, len(tokenizer)))
        train(base, list(BASE_TASKS), BASE_TRAIN, seed=seed, desc="zoo base")
        _save(base, tokenizer, tmp / "base")
        scores: dict[str, dict[str, float]] = {}
        for variant in VARIANTS:
            for k, task in enumerate(EXPERT_TASKS):
                torch.manual_seed(seed + k)
                model = AutoModelForCausalLM.from_pretrained(tmp / "base")
                if task in LORA_EXPERTS:
                    model = get_peft_model(model, _lora_config(task, variant))
                    model.peft_config["default"].base_model_name_or_path = str(out_dir / "base")
                    train(model, [task], LORA_TRAIN, seed=seed + 10 + k, desc=f"zoo {variant}/{task}")
                    name = f"{task}-lora"
                    model.save_pretrained(tmp / variant / name)
                    score_model = model.merge_and_unload()
                else:
                    for n, p in model.named_parameters():
                        p.requires_grad_(variant == "full" or ".mlp." in n)
                    train(model, [task], EXPERT_TRAIN, seed=seed + 10 + k, desc=f"zoo {variant}/{task}")
                    name = task
                    _save(model, tokenizer, tmp / variant / name)
                    score_model = model
                scores[f"{variant}/{name}"] = {t: exact_match(score_model, tokenizer, t, _eval_words(t)) for t in EXPERT_TASKS}
                logger.info("zoo %s/%s: %s", variant, name, scores[f"{variant}/{name}"])
        scores["base"] = {t: exact_match(base, tokenizer, t, _eval_words(t)) for t in EXPERT_TASKS}
        manifest = {
            "arch": arch,
            "version": ZOO_VERSION,
            "seed": seed,
            "experts": {
                variant: {t: f"{variant}/{t}-lora" if t in LORA_EXPERTS else f"{variant}/{t}" for t in EXPERT_TASKS}
                for variant in VARIANTS
            },
            "exact_match": scores,
            "tasks": {t: task_prompts(t) for t in EXPERT_TASKS},
        }
        (tmp / "zoo.json").write_text(json.dumps(manifest, indent=2))
    return out_dir


def _eval_words(task: str) -> list[str]:
    return task_prompts(task)["eval_words"]


def _lora_config(task: str, variant: str):
    from peft import LoraConfig

    targets = ["gate_proj", "up_proj", "down_proj"]
    if variant == "full":
        targets += ["q_proj", "k_proj", "v_proj", "o_proj"]
    if task == "swap":  # exercise rsLoRA and per-module rank/alpha patterns
        return LoraConfig(
            r=8, lora_alpha=16, target_modules=targets, use_rslora=True,
            rank_pattern={"down_proj": 4}, alpha_pattern={"up_proj": 8},
        )
    return LoraConfig(r=8, lora_alpha=16, target_modules=targets)


def _save(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


PERTURB = {"mlp": (".mlp.",), "linear": ("_proj.",), "all": ("",)}


def pico_checkpoint(path: Path, arch: str = "llama", seed: int = 0, base: Path | None = None, perturb: str = "mlp",
                    hidden: int = 32, intermediate: int = 64, layers: int = 2) -> Path:
    """An untrained checkpoint for tests and benchmarks; with `base`, a copy of it with some weights
    perturbed, i.e. an expert that differs from the base only where asked: its MLPs (`mlp`), every linear
    layer of its blocks (`linear`), or every weight (`all`)."""
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer()
    extra = {"head_dim": hidden // 4} if arch == "qwen3" else {}
    config = model_config(arch, len(tok), hidden_size=hidden, intermediate_size=intermediate,
                          num_hidden_layers=layers, **extra)
    torch.manual_seed(seed)
    if base is None:
        model = AutoModelForCausalLM.from_config(config)
    else:
        model = AutoModelForCausalLM.from_pretrained(base)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if any(part in name for part in PERTURB[perturb]):
                    p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def zoo_recipe(zoo_dir: Path, variant: str, **overrides) -> dict:
    """A moe-merge recipe (as a dict) that assembles one variant of the zoo."""
    manifest = json.loads((Path(zoo_dir) / "zoo.json").read_text())
    experts = []
    for task, rel in manifest["experts"][variant].items():
        p = manifest["tasks"][task]
        experts.append({
            "name": task,
            "source_model": str(Path(zoo_dir) / rel),
            "positive_prompts": p["positive_prompts"],
            "examples": p["examples"],
            "eval_prompts": p["eval_prompts"],
        })
    recipe = {"base_model": str(Path(zoo_dir) / "base"), "experts_per_token": 1, "experts": experts}
    recipe.update(overrides)
    return recipe
