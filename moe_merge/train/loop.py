"""`moe-merge train-router`: fine-tune only the routers of a moe-merge dynamic model or a stock
Mixtral / Qwen-MoE export, with accelerate (one process, or `accelerate launch` for several).

One loop, nanoGPT-shaped: the rows of every global batch are a pure function of (seed, step), so a
resumed run and a run on N processes see the same data as an uninterrupted single-process run.
The run directory holds:

    RUN_DIR/args.json                   the settings; --resume refuses different ones
    RUN_DIR/log.jsonl                   one line per evaluation and per logged step
    RUN_DIR/checkpoints/step-000050/    accelerate state: routers.safetensors, optimizer, RNG, trainer_state.json,
                                        best_routers.safetensors (the best so far)
    RUN_DIR/best/routers.safetensors    the routers with the best held-out objective (step 0 included)
    RUN_DIR/model/                      the export: the input model with the best routers, same layout

Every other parameter is frozen and stays bit-identical.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from tqdm.auto import tqdm

from moe_merge.errors import DataError, MoEMergeError, OutputError, OutputExistsError
from moe_merge.outdir import disk_full, locked
from moe_merge.train import data as train_data
from moe_merge.train import objectives
from moe_merge.writer import save_tensors

logger = logging.getLogger(__name__)

ROUTERS_FILE = "routers.safetensors"
BEST_FILE = "best_routers.safetensors"
STATE_FILE = "trainer_state.json"
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")
BETTER_BY, BETTER_BY_AT_LEAST = 0.01, 1e-3  # a later step must lower the best held-out objective by this share
# of it, and by at least this much, to replace it
# Settings that change the result: --resume refuses a run directory written with other values.
RESUME_KEYS = (
    "model_dir",
    "data",
    "eval_data",
    "eval_fraction",
    "steps",
    "lr",
    "batch_size",
    "grad_accum",
    "objective",
    "warmup",
    "weight_decay",
    "max_grad_norm",
    "seed",
    "max_length",
)


@dataclass
class TrainRouterArgs:
    data: Path
    eval_data: Path | None = None
    eval_fraction: float = 0.1  # carved from `data` with `seed` when `eval_data` is not given
    steps: int = 200
    lr: float = 3e-3
    batch_size: int = 16  # rows per optimizer micro-step, over all processes
    grad_accum: int = 1
    objective: dict[str, float] = field(default_factory=lambda: {"lm": 1.0})
    warmup: float = 0.1  # share of steps with a linear warm-up; cosine decay to lr/10 after
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    dtype: str = "auto"  # the frozen weights': auto (the checkpoint's) | float32 | bfloat16 | float16
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    eval_every: int = 50
    save_every: int = 50
    seed: int = 0
    max_length: int = 2048
    resume: bool = False
    force: bool = False
    trust_remote_code: bool = False
    allow_nonfinite: bool = False  # load a model holding NaN or Inf (refused by default, naming the tensor)


def lr_at(step: int, args: TrainRouterArgs) -> float:
    warmup = max(1, round(args.warmup * args.steps))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_rows(n: int, step: int, micro: int, args: TrainRouterArgs) -> list[int]:
    """Row indices of the global batch at (step, micro), epochs reshuffled; process r of N trains on [r::N]."""
    start = (step * args.grad_accum + micro) * args.batch_size
    return [_epoch_order(n, args.seed, p // n)[p % n] for p in range(start, start + args.batch_size)]


@functools.lru_cache(maxsize=2)  # a batch spans at most two epochs
def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()


# ----------------------------------------------------------------------------- model and data


def load_model(model_dir: Path, trust_remote_code: bool, dtype: str = "auto", allow_nonfinite: bool = False):
    """The model with its frozen weights in `dtype` (auto: the checkpoint's, bf16 stays bf16) and its routers in
    float32, its tokenizer, and the dtype it was saved in (the export keeps it). Checked first
    (`sources.check_model_dir`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import moe_merge.modeling  # noqa: F401  registers model_type `moe_merge`
    from moe_merge.recipe import DTYPES
    from moe_merge.sources import check_model_dir
    from moe_merge.tokens import load_tokenizer

    if not (model_dir / "config.json").is_file():
        raise MoEMergeError(f"{model_dir} has no config.json; give a directory written by `moe-merge assemble`")
    check_model_dir(model_dir, allow_nonfinite)
    saved = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code).dtype or torch.float32
    frozen = saved if dtype == "auto" else DTYPES[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=frozen, trust_remote_code=trust_remote_code)
    objectives.routers_in_float32(model)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    return model, tokenizer, saved


def expert_names(model, model_dir: Path) -> list[str]:
    """Names `expert` labels may use: the dynamic config's, or the recipe's that `assemble` wrote beside a stock MoE."""
    if not objectives.is_stock(model):
        return list(model.config.expert_names)
    n = getattr(model.config, "num_local_experts", None) or model.config.num_experts
    recipe = model_dir / "moe-merge.yaml"
    if recipe.is_file():
        from moe_merge.config import MergeConfig, load_config

        config: MergeConfig = load_config(recipe)
        names = [e.label for e in config.experts]
        if len(names) == n:
            return names
    return [str(i) for i in range(n)]


def split_data(args: TrainRouterArgs, tokenizer, names: list[str]):
    """Encoded train and held-out rows; every row checked before training starts."""
    rows = train_data.load_rows(args.data)
    if args.eval_data is not None:
        held = train_data.load_rows(args.eval_data, split="validation")
        train, held_source = rows, str(args.eval_data)
    else:
        if not 0 < args.eval_fraction < 1:
            raise MoEMergeError(f"--eval-fraction must be between 0 and 1, got {args.eval_fraction}")
        if len(rows) < 2:
            raise DataError(f"{args.data} has {len(rows)} row(s); at least 2 are needed to hold some out")
        parts = rows.train_test_split(test_size=args.eval_fraction, seed=args.seed)
        train, held, held_source = parts["train"], parts["test"], f"{args.data} (held-out part)"
    return (
        train_data.encode(train, tokenizer, names, str(args.data), args.max_length),
        train_data.encode(held, tokenizer, names, held_source, args.max_length),
    )


def router_state(model, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: params[n].detach().float().cpu().contiguous() for n in names}


@torch.no_grad()
def load_router_state(model, path: Path) -> None:
    params = dict(model.named_parameters())
    for name, value in load_file(path).items():
        if name not in params:
            raise MoEMergeError(f"{path} holds router {name!r}, which this model does not have")
        params[name].copy_(value)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model, held: train_data.Encoded, args: TrainRouterArgs, stock: bool, k: int, raw: bool, accelerator, pad_id: int
) -> dict[str, float]:
    """Held-out objective (every term, weighted as in training), LM loss and routing accuracy, over all processes."""
    model.eval()
    weights = dict(args.objective, lm=args.objective.get("lm", 0.0))
    sums = torch.zeros(len(weights) + 3, dtype=torch.float64, device=accelerator.device)
    for start in range(
        accelerator.process_index * args.batch_size, len(held), args.batch_size * accelerator.num_processes
    ):
        batch = _to(train_data.collate(held.rows[start : start + args.batch_size], pad_id), accelerator.device)
        _, terms, out = objectives.objective(model, batch, weights, stock, k, raw=raw)
        n = batch["input_ids"].shape[0]
        sums[: len(weights)] += torch.stack([terms[t].double() * n for t in weights])
        sums[-3] += n
        if held.labelled:
            logits, mask = objectives.routing_logits(out, batch, stock)
            hits, total = objectives.routing_hits(logits, mask, batch["expert"])
            sums[-2] += hits
            sums[-1] += total
    sums = accelerator.reduce(sums, reduction="sum")
    model.train()
    means = {t: float(sums[i] / sums[-3]) for i, t in enumerate(weights)}
    result = {"objective": sum(args.objective[t] * means[t] for t in args.objective), "lm": means["lm"]}
    if held.labelled:
        result["routing_accuracy"] = float(sums[-2] / sums[-1])
    return result


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


# ----------------------------------------------------------------------------- the run


def _prepare_run_dir(run_dir: Path, args: TrainRouterArgs, model_dir: Path, accelerator) -> dict | None:
    """Create or reopen RUN_DIR; return the latest complete checkpoint's trainer state when resuming.

    A run killed with -9 may have left a checkpoint half-written (`step-N.tmp`, removed here) and log lines past
    its last checkpoint (dropped: the resumed run writes them again)."""
    record = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(args).items() if k in RESUME_KEYS}
    record["model_dir"] = str(model_dir.absolute())
    latest = None
    if args.resume and (run_dir / "args.json").is_file():
        before = json.loads((run_dir / "args.json").read_text())
        changed = [k for k in RESUME_KEYS if before.get(k) != record.get(k)]
        if changed:
            raise MoEMergeError(
                f"--resume: {run_dir} was trained with other settings ({', '.join(changed)}); "
                "resume with the same ones, or start a new run directory"
            )
        steps = sorted((run_dir / "checkpoints").glob("step-[0-9]*[0-9]"))
        latest = json.loads((steps[-1] / STATE_FILE).read_text()) | {"dir": str(steps[-1])} if steps else None
    elif run_dir.exists() and any(run_dir.iterdir()) and not args.resume:  # --resume of a run killed before its
        if not args.force:  # settings were written: start it afresh
            raise OutputExistsError(
                f"run directory {run_dir} already exists; pass --resume to continue it or --force to start over"
            )
        if accelerator.is_main_process:
            shutil.rmtree(run_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        (run_dir / "best").mkdir(exist_ok=True)
        part = run_dir / "args.json.part"  # renamed into place: a kill never leaves settings half-written
        part.write_text(json.dumps(record, indent=2))
        part.rename(run_dir / "args.json")
        for tmp in (run_dir / "checkpoints").glob("*.tmp"):
            shutil.rmtree(tmp)
            logger.warning("removed %s, a checkpoint that a killed run left half-written", tmp)
        _truncate_log(run_dir / "log.jsonl", latest["step"] if latest else -1)
    accelerator.wait_for_everyone()
    return latest


def _truncate_log(log: Path, step: int) -> None:
    """Keep the log lines of steps up to `step` (those a resumed run does not write again)."""
    if not log.is_file():
        return
    kept = []
    for line in log.read_text().splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):  # the line a kill cut short
            pass
    log.write_text("".join(kept))


def _check_launcher() -> None:
    """`accelerate launch --cpu --num_processes N` starts N processes only through mpirun; without it one
    process runs and thinks it is alone. Say so instead of training on 1/N of the intended setup."""
    if (
        os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        and "MASTER_ADDR" in os.environ
        and "WORLD_SIZE" not in os.environ
        and "PMI_SIZE" not in os.environ
        and "OMPI_COMM_WORLD_SIZE" not in os.environ
    ):
        raise MoEMergeError(
            "`accelerate launch --cpu --num_processes N` started a single process (accelerate needs mpirun for "
            "several CPU processes); on CPU run `accelerate launch --multi_gpu --num_processes N ...` (gloo) or "
            "`torchrun --nproc_per_node N -m moe_merge.cli train-router ...`"
        )


def train_router(model_dir: Path | str, run_dir: Path | str, args: TrainRouterArgs) -> dict:
    """Train the routers; write checkpoints, the best routers and the export; return a summary."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import GradientAccumulationPlugin

    model_dir, run_dir = Path(model_dir), Path(run_dir).absolute()
    if args.batch_size < 1 or args.steps < 1 or args.grad_accum < 1:
        raise MoEMergeError("--steps, --batch-size and --grad-accum must be at least 1")
    _check_launcher()
    accelerator = Accelerator(
        cpu=not torch.accelerator.is_available(),  # so that several CPU processes run gloo DDP
        mixed_precision=args.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=args.grad_accum, sync_with_dataloader=False),
    )
    try:
        with locked(run_dir) if accelerator.is_main_process else contextlib.nullcontext():
            return _train(accelerator, model_dir, run_dir, args)
    finally:
        accelerator.end_training()
        if accelerator.num_processes == 1:  # accelerate's state is a process-wide singleton; let the next run set it
            AcceleratorState._reset_state(reset_partial_state=True)


def _train(accelerator, model_dir: Path, run_dir: Path, args: TrainRouterArgs) -> dict:
    from accelerate.utils import set_seed

    if args.batch_size % accelerator.num_processes:
        raise MoEMergeError(
            f"--batch-size {args.batch_size} must be a multiple of the {accelerator.num_processes} processes"
        )
    set_seed(args.seed)
    model, tokenizer, saved_dtype = load_model(model_dir, args.trust_remote_code, args.dtype, args.allow_nonfinite)
    train, held = split_data(args, tokenizer, expert_names(model, model_dir))
    if "routing" in args.objective and not train.labelled:
        raise DataError(f"objective `routing` needs an `expert` label on every row of {args.data}")
    latest = _prepare_run_dir(run_dir, args, model_dir, accelerator)
    run = Run(accelerator, model, args, run_dir, held, tokenizer.pad_token_id)
    accelerator.print(
        f"trainable parameters: {run.n_train:,} of {run.n_total:,} "
        f"({100 * run.n_train / run.n_total:.3f} %), in {len(run.trainable)} router tensors; "
        f"{len(train)} training rows, {len(held)} held out"
    )
    start = run.resume(latest) if latest is not None else run.consider(0)
    bar = tqdm(
        range(start, args.steps),
        desc="training routers",
        disable=not accelerator.is_local_main_process or None,
        initial=start,
        total=args.steps,
    )
    for step in bar:
        loss = run.step(train, step)
        bar.set_postfix(loss=f"{loss:.4f}")
        done = step + 1
        if done % args.eval_every == 0 or done == args.steps:
            run.consider(done)
        if done % args.save_every == 0 or done == args.steps:
            run.checkpoint(done)
    return run.finish(tokenizer, model_dir, saved_dtype)


class Run:
    """One router-training run on its accelerator: the prepared model and optimizer, the best routers so far,
    the log and the checkpoints. Every method is called on every process; only the main one writes."""

    def __init__(self, accelerator, model, args: TrainRouterArgs, run_dir: Path, held: train_data.Encoded, pad_id: int):
        self.accelerator, self.args, self.run_dir, self.held, self.pad_id = accelerator, args, run_dir, held, pad_id
        self.stock, self.k, self.raw = (
            objectives.is_stock(model),
            objectives.top_k(model),
            objectives.raw_weights(model),
        )
        self.trainable = objectives.freeze_all_but_routers(model)
        self.frozen_dtype = next(p.dtype for p in model.parameters() if not p.requires_grad)
        self.n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.n_total = sum(p.numel() for p in model.parameters())
        if args.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        optimizer = torch.optim.AdamW(objectives.router_param_groups(model), lr=args.lr, weight_decay=args.weight_decay)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.unwrapped = accelerator.unwrap_model(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.best: dict | None = None
        self.train_seconds = 0.0
        # accelerate saves the optimizer and RNG; the routers are saved here, the frozen rest never
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)

    def _save_hook(self, models, weights, out) -> None:
        weights.clear()
        if self.accelerator.is_main_process:
            save_tensors(router_state(self.unwrapped, self.trainable), Path(out) / ROUTERS_FILE)

    def _load_hook(self, models, src) -> None:
        load_router_state(self.unwrapped, Path(src) / ROUTERS_FILE)
        models.clear()

    def log(self, entry: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")

    def consider(self, step: int) -> int:
        """Evaluate on the held-out rows; keep the routers if they beat the best so far by more than `BETTER_BY` of
        its objective and `BETTER_BY_AT_LEAST` (less is noise on a few dozen rows: the routers there first stay).
        Returns `step`."""
        metrics = evaluate(
            self.model, self.held, self.args, self.stock, self.k, self.raw, self.accelerator, self.pad_id
        )
        self.log({"step": step, "eval": metrics})
        margin = max(BETTER_BY * abs(self.best["objective"]), BETTER_BY_AT_LEAST) if self.best is not None else 0.0
        if self.best is None or metrics["objective"] < self.best["objective"] - margin:
            self.best = {"step": step, **metrics}
            if self.accelerator.is_main_process:
                save_tensors(router_state(self.unwrapped, self.trainable), self.run_dir / "best" / ROUTERS_FILE)
        self.accelerator.print(f"step {step}: held-out " + ", ".join(f"{m} {v:.4f}" for m, v in metrics.items()))
        return step

    def checkpoint(self, step: int) -> None:
        """accelerate's state plus the trainer state and the best routers, written beside and renamed into place."""
        final = self.run_dir / "checkpoints" / f"step-{step:06d}"
        tmp = final.with_name(final.name + ".tmp")
        try:
            self.accelerator.save_state(str(tmp))
            if self.accelerator.is_main_process:
                state = {"step": step, "best": self.best, "train_seconds": self.train_seconds}
                (tmp / STATE_FILE).write_text(json.dumps(state))
                shutil.copy2(self.run_dir / "best" / ROUTERS_FILE, tmp / BEST_FILE)  # the best as of this step
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)
        except Exception as e:
            full = disk_full(e, tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            if full:
                raise OutputError(f"{full}; `--resume` continues from the last complete checkpoint") from e
            raise
        self.accelerator.wait_for_everyone()

    def resume(self, latest: dict) -> int:
        """Load the latest checkpoint; returns the step it was taken at."""
        self.accelerator.load_state(latest["dir"])
        if self.accelerator.is_main_process:
            shutil.copy2(Path(latest["dir"]) / BEST_FILE, self.run_dir / "best" / ROUTERS_FILE)
        self.best, self.train_seconds = latest["best"], latest["train_seconds"]
        self.accelerator.print(f"resumed from {latest['dir']} at step {latest['step']}")
        return latest["step"]

    def step(self, train: train_data.Encoded, step: int) -> float:
        """One optimizer step over the global batch of `step`; logs it and returns its loss."""
        args, acc = self.args, self.accelerator
        t0 = time.perf_counter()
        lr = lr_at(step, args)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["scale"]
        seen = []
        for micro in range(args.grad_accum):
            global_rows = batch_rows(len(train), step, micro, args)
            mine = global_rows[acc.process_index :: acc.num_processes]
            seen += mine
            batch = _to(train_data.collate([train.rows[i] for i in mine], self.pad_id), acc.device)
            with acc.accumulate(self.model):
                loss, terms, _ = objectives.objective(
                    self.model,
                    batch,
                    args.objective,
                    self.stock,
                    self.k,
                    objectives.totals([train.rows[i] for i in global_rows]),
                    acc.num_processes,
                    self.raw,
                )
                acc.backward(loss)
                if acc.sync_gradients and args.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.params, args.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        self.train_seconds += time.perf_counter() - t0
        trained = acc.gather(torch.tensor(seen, device=acc.device)).tolist()  # every process's rows
        # each process's terms are its share of the global batch's means, N x its sum over the global count:
        # their mean over processes is the global batch's value
        values = acc.reduce(torch.stack([loss.detach(), *terms.values()]), reduction="mean").tolist()
        self.log(
            {
                "step": step + 1,
                "lr": lr,
                **dict(zip(["loss", *terms], values)),
                "rows": hashlib.sha256(str(sorted(trained)).encode()).hexdigest()[:16],
            }
        )
        return values[0]

    def finish(self, tokenizer, model_dir: Path, saved_dtype: torch.dtype) -> dict:
        """Load the best routers, export the model and the summary; return the summary."""
        acc, args, best = self.accelerator, self.args, self.best
        assert best is not None, "step 0 (or the resumed checkpoint) is always evaluated"
        load_router_state(self.unwrapped, self.run_dir / "best" / ROUTERS_FILE)
        summary = {
            "steps": args.steps,
            "best": best,
            "seconds_per_step": self.train_seconds / max(1, args.steps),
            "train_minutes": self.train_seconds / 60,
            "processes": acc.num_processes,
            "device": str(acc.device),
            "trainable_parameters": self.n_train,
            "frozen_dtype": str(self.frozen_dtype).removeprefix("torch."),
            **peak_memory(acc.device),
        }
        if acc.is_main_process:
            export(self.unwrapped, tokenizer, model_dir, self.run_dir / "model", saved_dtype, summary)
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        acc.wait_for_everyone()
        acc.print(
            f"{summary['seconds_per_step']:.3f} s per step, {summary['train_minutes']:.2f} min of training; "
            f"best held-out objective {best['objective']:.4f} at step {best['step']}; wrote {self.run_dir / 'model'}"
        )
        return summary


def peak_memory(device: torch.device) -> dict:
    """This process's peak memory so far: allocated CUDA memory on a GPU, else the resident set."""
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_of": "cuda allocated"}
    try:  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent through fork and exec
        kib = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_memory_bytes": kib * 1024, "peak_memory_of": "process RSS"}


def export(model, tokenizer, model_dir: Path, out: Path, dtype: torch.dtype, summary: dict) -> None:
    """The input directory with the trained routers: same files, same layout, same dtype; written atomically.
    moe-merge.yaml names its sources from the new place, and a dynamic model's routing report is measured
    again, on the model as written."""
    from transformers import AutoModelForCausalLM

    from moe_merge.assemble import report
    from moe_merge.config import load_config
    from moe_merge.outdir import atomic_output_dir
    from moe_merge.recipe import portable

    model.eval()
    with atomic_output_dir(out, force=True) as tmp:
        for f in model_dir.iterdir():
            if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES):
                shutil.copy2(f, tmp / f.name)
        model.to(dtype).save_pretrained(tmp)
        (tmp / "router_training.json").write_text(json.dumps(summary, indent=2))
        if not (model_dir / "moe-merge.yaml").is_file():
            return
        try:
            config = load_config(model_dir / "moe-merge.yaml")
            recipe = portable(config, model_dir, out)
        except MoEMergeError as e:  # written by another release, or its sources moved: keep it as it was
            logger.warning(
                "%s copied unchanged and its routing report not measured again: %s", model_dir / "moe-merge.yaml", e
            )
            return
        (tmp / "moe-merge.yaml").write_text(yaml.safe_dump(recipe.resolved(), sort_keys=False))
        if not objectives.is_stock(model):
            with torch.no_grad():
                written = AutoModelForCausalLM.from_pretrained(tmp).to(model.device).eval()
                rep = report.routing_report(written, tokenizer, config, list(model.config.expert_names))
            report.write(rep, tmp)
