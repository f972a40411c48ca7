"""The tiny zoo: a deterministic base LM and experts fine-tuned from it on synthetic tasks.

Every task maps a lowercase word letter by letter ("shift abc=" -> "bcd"). The base learns the
format on a few maps (`copy`, `skip`, `flip`); each expert learns one new letter map. Two variants share the base:

- `full/`: experts fine-tune every weight, so part of what they learn lives in attention;
- `mlp/`: experts fine-tune only their MLPs, so perfect FFN-level routing recovers them exactly.

Each variant has full fine-tunes (`shift`, `mirror`, `cipher`) and PEFT LoRA adapters (`back`,
`swap`). Tests, examples, the demo and the benchmarks all build on it.

Merge search needs a zoo with structure to find, so the plain (not realistic) zoo also has `search/`:
a second seed of the `shift` expert, a harmful expert (trained on shuffled targets: each prompt's
answer is another word's), a second family (`search/family2/`: a base of the same architecture and
vocab from another initialisation, with `back` and `swap` experts) and one model of another
architecture (`search/alien`, an untrained Qwen3 of the same vocab).

Tiny models learn in sudden jumps after plateaus of varying length, so a fixed number of steps can
land at 100 % on one machine and 0 % on another. Every model therefore trains until it reaches its
target on held-out words, and the build fails, naming the model and its score, if one does not by
its step cap; checked again on the saved checkpoint, each expert must also stay at or below `leak`
on every other task. A build is deterministic for a given seed and thread count (the thread count is
fixed while it runs), and its cache key covers this file, the settings and the torch, transformers
and peft versions.

The `realistic` variant has what real checkpoints bring and ours otherwise hide: no pad token (Llama,
Mistral), input and output embeddings tied (Qwen3-0.6B, Llama-3.2), weights saved in bf16, and a SentencePiece
tokenizer as Llama and Mistral ship it (`tokenizer.model`, which llama.cpp's converters read, beside `tokenizer.json`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from moe_merge.arch import FAMILIES
from moe_merge.errors import ZooError
from moe_merge.outdir import atomic_output_dir
from moe_merge.tokens import load_tokenizer

logger = logging.getLogger(__name__)

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
    "cipher": [
        (i + 13) % 26 for i in range(26)
    ],  # ROT13; named "rotate", it left experts on plateaus for thousands of steps
}
# The base learns several maps, so that its attention carries the task word to every position,
# as a real LM carries its context; the experts then each learn a map the base never saw.
BASE_TASKS = ("copy", "skip", "flip")
FULL_EXPERTS = ("shift", "mirror", "cipher")
LORA_EXPERTS = ("back", "swap")
EXPERT_TASKS = FULL_EXPERTS + LORA_EXPERTS
VARIANTS = ("full", "mlp")
FAMILY2_EXPERTS = ("back", "swap")
TRAIN_SEEDS = 10**7  # training batches draw words from seeds above the ones prompts and eval words use
ARCHS = tuple(FAMILIES)


@dataclass(frozen=True)
class Stage:
    """How one kind of zoo model trains: AdamW in cosine cycles of `cycle` steps from `lr` down to zero, until
    the exact match on its task's held-out eval words, measured at the end of a cycle, reaches `target`; at
    most `cycles`. A cycle's end is a settled model; the next cycle's restart shakes one off a plateau."""

    lr: float
    cycle: int
    cycles: int = 4
    target: float = 0.98
    batch_size: int = 32

    def lr_factor(self, step: int) -> float:
        """The learning rate at 0-based `step`, relative to `lr`: a linear warm-up over the first tenth of
        the first cycle (from scratch, a shorter one stalls the base for a thousand steps), then the cycles."""
        phase = (step % self.cycle) / self.cycle
        return min(1.0, (step + 1) / max(1, self.cycle // 10)) * 0.5 * (1 + math.cos(math.pi * phase))


@dataclass(frozen=True)
class ZooSettings:
    arch: str = "llama"
    realistic: bool = False  # no pad token, tied embeddings, bf16 weights, a SentencePiece tokenizer
    seed: int = 0
    threads: int = 2  # torch's intra-op threads while building: results depend on it
    leak: float = 0.05  # the most an expert may score on another task (where its answer differs from that task's)
    base: Stage = field(default_factory=lambda: Stage(lr=3e-3, cycle=900))
    full: Stage = field(default_factory=lambda: Stage(lr=3e-3, cycle=400))  # full fine-tunes, every weight
    mlp: Stage = field(default_factory=lambda: Stage(lr=3e-3, cycle=400))  # full fine-tunes, MLPs only
    lora: Stage = field(default_factory=lambda: Stage(lr=5e-3, cycle=300))

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ZooError(f"unknown zoo arch {self.arch!r}; choose one of {', '.join(ARCHS)}")

    @property
    def name(self) -> str:
        return self.arch + ("-realistic" if self.realistic else "")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype checkpoints are saved and scored in."""
        return torch.bfloat16 if self.realistic else torch.float32

    def key(self) -> str:
        """What the cached zoo depends on: this file, the settings and the versions that train it."""
        import peft
        import transformers

        h = hashlib.sha256(Path(__file__).read_bytes())
        h.update(json.dumps(asdict(self), sort_keys=True).encode())
        h.update(f"torch {torch.__version__} transformers {transformers.__version__} peft {peft.__version__}".encode())
        return h.hexdigest()[:12]


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


def build_tokenizer(pad: bool = True):
    """One token per character. Without `pad`, no pad token is declared, as Llama and Mistral ship theirs."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + list(" =" + ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>" if pad else None
    )


def build_sentencepiece_tokenizer():
    """The realistic zoo's tokenizer, of the kind Llama and Mistral ship: a SentencePiece BPE model (saved as
    `tokenizer.model`) and the transformers tokenizer of its vocabulary, with no pad token. Its ids are
    `build_tokenizer`'s, one per character, with no dummy prefix: the zoo trains on those ids (`_char_id`)."""
    import io

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    chars = " =" + ALPHABET
    text = "".join(c * (len(chars) - k) for k, c in enumerate(chars))  # the trainer numbers pieces by frequency
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([text]),
        model_writer=model,
        model_type="bpe",
        vocab_size=len(SPECIAL_TOKENS) + len(chars),  # no room for a merge: every piece is one character
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        unk_id=SPECIAL_TOKENS.index("<unk>"),
        pad_id=-1,
        control_symbols=["<pad>"],
        character_coverage=1.0,
        byte_fallback=False,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_by_whitespace=False,
        num_threads=1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    want = SPECIAL_TOKENS + [c.replace(" ", "\u2581") for c in chars]
    if pieces != want:
        raise ZooError(f"the SentencePiece trainer numbered the pieces {pieces}, not {want}")
    tok = LlamaTokenizer(
        vocab={p: i for i, p in enumerate(pieces)}, merges=[], add_prefix_space=False, add_bos_token=True
    )
    tok.sentencepiece_model = model.getvalue()  # transformers writes tokenizer.json only; _save_tokenizer adds it
    return tok


def _save_tokenizer(tokenizer, path: Path) -> None:
    tokenizer.save_pretrained(path)
    if hasattr(tokenizer, "sentencepiece_model"):
        (Path(path) / "tokenizer.model").write_bytes(tokenizer.sentencepiece_model)


def model_config(arch: str, vocab_size: int, **overrides):
    from transformers import AutoConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown zoo arch {arch!r}; choose one of {', '.join(ARCHS)}")
    common: dict[str, Any] = dict(
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
    common.update(FAMILY_FIELDS.get(arch, {}))
    common.update(overrides)
    if "head_dim" in common and "hidden_size" in overrides and "head_dim" not in overrides:
        common["head_dim"] = common["hidden_size"] // common["num_attention_heads"]
    if arch == "gemma3_text" and "layer_types" not in overrides:  # both kinds of layer, however few
        common["layer_types"] = [
            ("sliding_attention", "full_attention")[i % 2] for i in range(common["num_hidden_layers"])
        ]
    return AutoConfig.for_model(arch, **common)


# What a tiny config of each family must set beyond the common fields. Gemma 2 and 3 get a sliding window shorter
# than the prompts, so that their sliding-window layers differ from their full ones.
_GEMMA_WINDOW = {"head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 16}
FAMILY_FIELDS: dict[str, dict[str, Any]] = {
    "qwen3": {"head_dim": 16},
    "mistral": {"sliding_window": None},
    "gemma": {"head_dim": 16},
    "gemma2": {**_GEMMA_WINDOW, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
    "gemma3_text": _GEMMA_WINDOW,
}


# ----------------------------------------------------------------------------- data and training


def encode_batch(
    task_words: list[tuple[str, str]], answers: list[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels (loss on the answer and EOS only). `answers` replaces the
    tasks' own (the harmful expert's shuffled targets)."""
    rows, label_rows = [], []
    for i, (task, word) in enumerate(task_words):
        p = [BOS_ID] + [_char_id(c) for c in prompt(task, word)]
        a = [_char_id(c) for c in (answers[i] if answers else apply_task(task, word))] + [EOS_ID]
        rows.append(p + a)
        label_rows.append([-100] * len(p) + a)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), EOS_ID)  # masked out: any id would do
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, (r, lab) in enumerate(zip(rows, label_rows)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, : len(lab)] = torch.tensor(lab)
    return ids, mask, labels


def _char_id(c: str) -> int:
    return len(SPECIAL_TOKENS) + (" =" + ALPHABET).index(c)


def train_to_target(model, tasks: list[str], stage: Stage, seed: int, name: str, score, shuffled: bool = False) -> int:
    """Train `model` on `tasks` until `score(model)` reaches the stage's target; returns the steps it took.
    `shuffled` trains on shuffled targets (each row answers another row's word) for one cycle, with no target.

    Batches are drawn from (seed, step) alone and never hold an eval word.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=stage.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, stage.lr_factor)
    held_out = {w for t in tasks for w in task_prompts(t)["eval_words"]}
    g = torch.Generator().manual_seed(seed)
    reached = 0.0
    model.train()
    max_steps = stage.cycle * stage.cycles
    for step in tqdm(range(1, max_steps + 1), desc=f"zoo {name}", leave=False, disable=None):
        words = [
            w for w in random_words(2 * stage.batch_size, TRAIN_SEEDS + seed * 100_003 + step) if w not in held_out
        ]
        picks = torch.randint(0, len(tasks), (stage.batch_size,), generator=g).tolist()
        batch = [(tasks[k], w) for k, w in zip(picks, words)]
        answers = [apply_task(t, w) for t, w in batch[1:] + batch[:1]] if shuffled else None
        ids, mask, labels = encode_batch(batch, answers)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if shuffled and step == stage.cycle:
            model.eval()
            return step
        if step % stage.cycle == 0:
            model.eval()
            reached = score(model)
            model.train()
            logger.debug("zoo %s: step %d, loss %.4f, held-out exact match %.3f", name, step, loss.item(), reached)
            if reached >= stage.target:
                model.eval()
                return step
    raise ZooError(
        f"zoo {name}: {reached:.0%} exact match on its held-out words after {max_steps} steps, "
        f"below its target of {stage.target:.0%}; the zoo was not built (give its Stage more `cycles`, or "
        "check the training settings in moe_merge/zoo.py)"
    )


@torch.no_grad()
def exact_match(model, tokenizer, task: str, words: list[str], batch_size: int = 64) -> float:
    """Share of `words` whose greedy completion equals the task's answer exactly (`tokenizer` needs a pad
    token: `moe_merge.tokens.load_tokenizer` gives it one)."""
    hits = 0
    for i in range(0, len(words), batch_size):
        chunk = words[i : i + batch_size]
        enc = tokenizer([prompt(task, w) for w in chunk], return_tensors="pt", padding=True, padding_side="left")
        enc = {k: v.to(model.device) for k, v in enc.items()}
        out = model.generate(
            **enc,
            max_new_tokens=9,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        for w, row in zip(chunk, out[:, enc["input_ids"].shape[1] :]):
            text = tokenizer.decode(row, skip_special_tokens=False).split(tokenizer.eos_token)[0]
            hits += text == apply_task(task, w)
    return hits / len(words)


def scores(model, tokenizer, tasks=EXPERT_TASKS) -> dict[str, float]:
    """Exact match on each task's 64 eval words."""
    return {t: exact_match(model, tokenizer, t, task_prompts(t)["eval_words"]) for t in tasks}


# ----------------------------------------------------------------------------- building


def default_cache_dir() -> Path:
    root = os.environ.get("MOE_MERGE_CACHE") or Path.home() / ".cache" / "moe_merge"
    return Path(root) / "zoo"


def ensure_zoo(arch: str = "llama", realistic: bool = False, cache_dir: Path | None = None) -> Path:
    """The cached zoo for `arch` (and variant), built on first use and whenever its code, settings or
    library versions change."""
    settings = ZooSettings(arch=arch, realistic=realistic)
    path = Path(cache_dir or default_cache_dir()) / f"{settings.name}-{settings.key()}"
    if not (path / "zoo.json").exists():
        build_zoo(path, settings, force=True)
    return path


def build_zoo(out_dir: Path | str, settings: ZooSettings | None = None, force: bool = False) -> Path:
    """Train the base and every expert of both variants into `out_dir` (a few minutes on 2 cores); raise
    ZooError, leaving nothing behind, if any model misses its target."""
    settings = settings or ZooSettings()
    out_dir = Path(out_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        with atomic_output_dir(out_dir, force=force) as tmp:
            results = _build(tmp, out_dir, settings)
            manifest = {
                "settings": asdict(settings),
                "key": settings.key(),
                "experts": {
                    variant: {t: f"{variant}/{t}-lora" if t in LORA_EXPERTS else f"{variant}/{t}" for t in EXPERT_TASKS}
                    for variant in VARIANTS
                },
                "search": search_models(settings),
                "training": results,
                "tasks": {t: task_prompts(t) for t in EXPERT_TASKS},
            }
            (tmp / "zoo.json").write_text(json.dumps(manifest, indent=2))
    finally:
        torch.set_num_threads(threads)
    return out_dir


def _build(tmp: Path, out_dir: Path, settings: ZooSettings) -> dict[str, dict]:
    """Every model of the zoo into `tmp`; returns, per model, the steps it took and its scores as saved."""
    from transformers import AutoModelForCausalLM

    seed = settings.seed
    torch.manual_seed(seed)
    shipped = build_sentencepiece_tokenizer() if settings.realistic else build_tokenizer()
    _save_tokenizer(shipped, tmp / "base")
    tokenizer = load_tokenizer(tmp / "base")  # with a pad token for batching, in memory only
    config = model_config(
        settings.arch,
        len(tokenizer),
        tie_word_embeddings=settings.realistic,
        pad_token_id=None if settings.realistic else PAD_ID,
    )
    base = AutoModelForCausalLM.from_config(config)
    steps = train_to_target(
        base, list(BASE_TASKS), settings.base, seed, "base", _scorer(tokenizer, BASE_TASKS, settings)
    )
    _save(base, tmp / "base", settings.dtype, shipped)
    results = {"base": _check(tmp / "base", tokenizer, None, settings.base, steps, settings.leak)}
    for variant in VARIANTS:
        for k, task in enumerate(EXPERT_TASKS):
            name = f"{variant}/{task}-lora" if task in LORA_EXPERTS else f"{variant}/{task}"
            torch.manual_seed(seed + k)
            # Any: transformers' and PEFT's annotations disagree across the tested releases on what this becomes
            model: Any = AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32)
            if task in LORA_EXPERTS:
                from peft import get_peft_model

                model = get_peft_model(model, _lora_config(task, variant))
                model.peft_config["default"].base_model_name_or_path = str(out_dir / "base")
                stage = settings.lora
            else:
                for n, p in model.named_parameters():
                    p.requires_grad_(variant == "full" or ".mlp." in n)
                stage = settings.full if variant == "full" else settings.mlp
            steps = train_to_target(model, [task], stage, seed + 10 + k, name, _scorer(tokenizer, [task], settings))
            _save(model, tmp / name, settings.dtype, shipped)
            results[name] = _check(tmp / name, tokenizer, task, stage, steps, settings.leak)
            logger.info("zoo %s: %d steps, %s", name, steps, results[name]["exact_match"])
    if not settings.realistic:
        results.update(_build_search(tmp, settings, tokenizer, shipped))
    return results


def search_models(settings: ZooSettings) -> dict[str, dict]:
    """The models merge search reads (`search/`), each with its family and task; empty for the realistic zoo."""
    if settings.realistic:
        return {}
    models: dict[str, dict] = {
        "full/shift": {"family": "base", "task": "shift"},
        "search/shift-seed1": {"family": "base", "task": "shift"},
        "search/harmful": {"family": "base", "task": None},
    }
    models.update({f"search/family2/{t}": {"family": "search/family2/base", "task": t} for t in FAMILY2_EXPERTS})
    models["search/alien"] = {"family": None, "task": None}
    return models


def _build_search(tmp: Path, settings: ZooSettings, tokenizer, shipped) -> dict[str, dict]:
    """`search/`: a second `shift` seed and a harmful expert on the base; a second family; another architecture."""
    from transformers import AutoModelForCausalLM

    seed, results = settings.seed, {}

    def fine_tune(base: Path, name: str, task: str, k: int, shuffled: bool = False) -> None:
        torch.manual_seed(seed + k)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        steps = train_to_target(
            model, [task], settings.full, seed + k, name, _scorer(tokenizer, [task], settings), shuffled=shuffled
        )
        _save(model, tmp / name, settings.dtype, shipped)
        results[name] = (
            {"steps": steps, "exact_match": scores(model, tokenizer, [task])}
            if shuffled
            else _check(tmp / name, tokenizer, task, settings.full, steps, settings.leak)
        )

    fine_tune(tmp / "base", "search/shift-seed1", "shift", 101)
    fine_tune(tmp / "base", "search/harmful", "shift", 102, shuffled=True)
    torch.manual_seed(seed + 1000)  # another initialisation: the same architecture and vocab, another family
    config = model_config(settings.arch, len(tokenizer))
    other = AutoModelForCausalLM.from_config(config)
    steps = train_to_target(
        other,
        list(BASE_TASKS),
        settings.base,
        seed + 1000,
        "search/family2/base",
        _scorer(tokenizer, BASE_TASKS, settings),
    )
    _save(other, tmp / "search/family2/base", settings.dtype, shipped)
    results["search/family2/base"] = _check(
        tmp / "search/family2/base", tokenizer, None, settings.base, steps, settings.leak
    )
    for k, task in enumerate(FAMILY2_EXPERTS):
        fine_tune(tmp / "search/family2/base", f"search/family2/{task}", task, 103 + k)
    torch.manual_seed(seed + 2000)
    alien_arch = "qwen3" if settings.arch != "qwen3" else "llama"
    _save(
        AutoModelForCausalLM.from_config(model_config(alien_arch, len(tokenizer))),
        tmp / "search/alien",
        settings.dtype,
        shipped,
    )
    return results


def _scorer(tokenizer, tasks, settings: ZooSettings):
    """Held-out exact match (the worst of `tasks`) of a model rounded to the dtype it will be saved in."""

    def score(model) -> float:
        rounded = copy.deepcopy(model).to(settings.dtype) if settings.dtype != torch.float32 else model
        return min(scores(rounded, tokenizer, tasks).values())

    return score


def _save(model, path: Path, dtype: torch.dtype, tokenizer) -> None:
    """The checkpoint in `dtype` (a LoRA adapter: its factors), with the tokenizer as shipped beside a full model."""
    model.to(dtype)
    if hasattr(model, "peft_config"):
        model.save_pretrained(path, save_embedding_layers=False)  # LoRA on linear layers only; the vocab is the base's
    else:
        model.save_pretrained(path)
        _save_tokenizer(tokenizer, path)


def _check(path: Path, tokenizer, task: str | None, stage: Stage, steps: int, leak: float) -> dict:
    """Load the saved checkpoint as a user would and score it on the eval words: its own task (the base: its
    own tasks) at the stage's target, and at most `leak` on every other expert task, counted on the words where
    that task's answer differs from its own (`shift` and `swap` agree on words of even letters only)."""
    model = load_checkpoint(path)
    own = [task] if task else list(BASE_TASKS)
    name = "base" if task is None else f"{path.parent.name}/{path.name}"
    got = scores(model, tokenizer, own)
    for t, v in got.items():
        if v < stage.target:
            raise ZooError(
                f"zoo {name}: {v:.0%} exact match on its {t} eval words as saved, below the target of "
                f"{stage.target:.0%}; the zoo was not built"
            )
    leaks = other_task_scores(model, tokenizer, own)
    for t, v in leaks.items():
        if v > leak:
            raise ZooError(
                f"zoo {name}: {v:.0%} exact match on {t}, a task it was not trained on (at most "
                f"{leak:.0%} allowed); the zoo was not built"
            )
    return {"steps": steps, "exact_match": got, "leak": leaks}


def other_task_scores(model, tokenizer, own: list[str]) -> dict[str, float]:
    """Exact match on every other expert task, on the eval words where its answer differs from each of `own`'s
    (`shift` and `swap` agree on words of even letters: a perfect shift expert gets those 3 % of swap right)."""
    out = {}
    for t in EXPERT_TASKS:
        if t not in own:
            words = [w for w in task_prompts(t)["eval_words"] if all(apply_task(o, w) != apply_task(t, w) for o in own)]
            out[t] = exact_match(model, tokenizer, t, words)
    return out


def load_checkpoint(path: Path):
    """A zoo model as users load it: a full checkpoint in its saved dtype, or a LoRA adapter on the base."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(path.parent.parent / "base")
        return PeftModel.from_pretrained(base, path).eval()
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _lora_config(task: str, variant: str):
    from peft import LoraConfig

    targets = ["gate_proj", "up_proj", "down_proj"]
    if variant == "full":
        targets += ["q_proj", "k_proj", "v_proj", "o_proj"]
    if task == "swap":  # exercise rsLoRA and per-module rank/alpha patterns
        return LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=targets,
            use_rslora=True,
            rank_pattern={"down_proj": 4},
            alpha_pattern={"up_proj": 8},
        )
    return LoraConfig(r=8, lora_alpha=16, target_modules=targets)


def zoo_recipe(zoo_dir: Path, variant: str, **overrides) -> dict:
    """A moe-merge recipe (as a dict) that assembles one variant of the zoo."""
    manifest = json.loads((Path(zoo_dir) / "zoo.json").read_text())
    experts = []
    for task, rel in manifest["experts"][variant].items():
        p = manifest["tasks"][task]
        experts.append(
            {
                "name": task,
                "source_model": str(Path(zoo_dir) / rel),
                "positive_prompts": p["positive_prompts"],
                "examples": p["examples"],
                "eval_prompts": p["eval_prompts"],
            }
        )
    recipe = {"base_model": str(Path(zoo_dir) / "base"), "experts_per_token": 1, "experts": experts}
    recipe.update(overrides)
    return recipe


def eval_rows(tasks=EXPERT_TASKS, per_task: int = 64) -> list[dict]:
    """Held-out rows (prompt, completion, expert) on each task's eval words."""
    return [
        {"prompt": prompt(t, w), "completion": apply_task(t, w), "expert": t}
        for t in tasks
        for w in task_prompts(t)["eval_words"][:per_task]
    ]
