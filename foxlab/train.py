"""Training small FoX models: ``train`` (notebook and CLI), exact resume, DDP, and the forgetting demo.

``train(...)`` runs AdamW (betas 0.9, 0.95; weight decay on matrices only), linear warmup then cosine decay to
``min_lr_ratio * lr``, gradient clipping, bf16 autocast on CUDA, periodic evaluation and a ``tqdm.auto`` progress
bar, and returns a ``TrainResult`` (model, tokenizer, per-step losses and learning rates, evaluations). With
``cuda_graph=True`` each step after the third is one CUDA graph replay (``foxlab.cuda_graph``).

With ``out``, it writes ``out/metrics.json`` (``losses``: one per step, all steps so far) and checkpoints to
``out/checkpoint/``: ``save_pretrained`` (config + weights), the tokenizer, and ``training_state.pt`` (optimizer,
scheduler, RNG states, step, histories). A checkpoint is written into a temporary folder next to it and then
renamed into place, ``trainer_state.json`` last, so a crash mid-save leaves the previous checkpoint intact.
``resume=True`` continues from it: batches are a pure function of the step (``foxlab.data``), so the losses after a
resume equal those of an uninterrupted run (bitwise on CPU). Ctrl-C finishes the current step, saves a checkpoint
and returns with ``interrupted=True`` (a second Ctrl-C aborts at once). A resume with a larger ``steps`` extends a
run, keeping its other settings (``train`` says what that changes).

Every argument is checked against its row in ``TRAIN_SETTINGS`` (``foxlab.settings``): a wrong name, type or value
raises ``SettingError`` naming it, before anything runs.

Under ``torchrun --nproc_per_node N`` it trains with DistributedDataParallel (gloo on CPU, nccl on GPU), or with
``parallel="fsdp"`` sharded over the processes (FSDP2, ``foxlab.parallel``): the global batch is split over the
processes and the loss is normalised by the global number of scored tokens, so N processes follow the same
trajectory as one process with the same global batch. Checkpoints are the same whatever the number of processes
or mode, and a run can resume with another.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from .config import PRESETS, ForgettingTransformerConfig
from .data import BOS_ID, IGNORE_INDEX, PAD_ID, RESET_ID, TASKS, ByteTokenizer, Task, make_task
from .cuda_graph import GraphedStep, make_capturable, portable_state
from .model import ForgettingTransformerForCausalLM
from .settings import Setting, SettingError, check_names, checked, choice, flag, integer, number, path
from .parallel import PARALLEL_MODES, full_weights_model, load_optimizer_state, optimizer_state, wrap_model

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "training_state.pt"
MARKER_FILE = "trainer_state.json"  # written last: a checkpoint folder without it is incomplete
FORMAT_VERSION = 2  # 2: the optimizer state is keyed by parameter name (foxlab.parallel)
METRICS_EVERY_S = 10.0  # metrics.json is also rewritten at every checkpoint and evaluation
# Settings that may differ between a run and its resume (everything else must match, or the resumed run would
# not be the same run). A larger ``steps`` extends a run: see ``train``.
RESUMABLE_CHANGES = {"steps", "save_every", "eval_every", "progress", "device", "parallel"}


def device_problem(device) -> str | None:
    """None if torch can run on ``device`` here, else why not (for the ``device`` setting)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        return f"must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got {device!r}"
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "it finds no CUDA GPU"
        return f"{device!r} is not available: this torch ({torch.__version__}) is {build}; use 'cpu'"
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"{device!r} is not available: this machine has {torch.cuda.device_count()} CUDA device(s)"
    if dev.type == "mps" and not torch.backends.mps.is_available():
        return f"{device!r} is not available on this machine"
    return None


# What every argument of train() accepts (foxlab.settings); a new argument needs its row here. The command line
# parses its flags with the same rows.
TRAIN_SETTINGS: dict[str, Setting] = {
    "model": Setting((ForgettingTransformerForCausalLM, ForgettingTransformerConfig), optional=True,
                     text="a ForgettingTransformerForCausalLM or a ForgettingTransformerConfig"),
    "preset": choice(*PRESETS),
    "overrides": Setting(dict, optional=True, text="a dict of config settings"),
    "task": Setting((str, Task), choices=tuple(TASKS), text=f"one of {', '.join(map(repr, TASKS))} or a Task"),
    "task_kwargs": Setting(dict, optional=True, text="a dict of the task's arguments"),
    "seq_len": integer(low=1, optional=True),
    "steps": integer(low=1),
    "batch_size": integer(low=1),
    "lr": number(above=0),
    "min_lr_ratio": number(0, 1),
    "warmup_steps": integer(low=0, optional=True),
    "weight_decay": number(low=0),
    "betas": Setting(list, length=2, low=0, below=1),
    "grad_clip": number(low=0, optional=True),
    "eval_every": integer(low=1, optional=True),
    "eval_batches": integer(low=1),
    "save_every": integer(low=1, optional=True),
    "out": path(optional=True),
    "resume": Setting((bool, str, os.PathLike), text="True, False or a checkpoint's path"),
    "seed": integer(low=0),
    "device": Setting((str, torch.device), optional=True, extra=device_problem,
                      text="a torch device ('cpu', 'cuda', 'cuda:1', ...)"),
    "tokenizer": Setting(PreTrainedTokenizerBase, optional=True, text="a tokenizer (default: ByteTokenizer)"),
    "progress": flag(),
    "parallel": choice(*PARALLEL_MODES),
    "acp_log_tolerance": number(low=-1e4, high=0, optional=True),
    "callback": Setting(Callable, optional=True, text="a function callback(step, loss)"),
    "cuda_graph": flag(),
}


# --------------------------------------------------------------------------------------------------
# Results, schedule, optimizer
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What ``train`` returns. ``losses``/``lrs``: one per step from step 1; ``evals``: {"step", "loss"} dicts."""

    model: ForgettingTransformerForCausalLM
    tokenizer: ByteTokenizer
    task: Task
    losses: list[float] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    step: int = 0
    interrupted: bool = False
    elapsed_s: float = 0.0
    out: Path | None = None

    @property
    def checkpoint(self) -> Path | None:
        return None if self.out is None else find_checkpoint(self.out)


def lr_factor(step: int, steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """The learning-rate multiplier of update ``step`` (0-based): linear warmup, then cosine to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class _Schedule:
    """A picklable LambdaLR multiplier (``lr_factor`` with fixed arguments)."""

    def __init__(self, steps, warmup_steps, min_lr_ratio):
        self.steps, self.warmup_steps, self.min_lr_ratio = steps, warmup_steps, min_lr_ratio

    def __call__(self, step):
        return lr_factor(step, self.steps, self.warmup_steps, self.min_lr_ratio)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95)):
    """AdamW with weight decay on matrices (embeddings, projections) only; biases and norm weights get none."""
    decay = [p for _, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for _, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=1e-8)


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def _is_complete(path: Path) -> bool:
    return (path / MARKER_FILE).is_file() and (path / STATE_FILE).is_file() and (path / "config.json").is_file()


def find_checkpoint(out: str | os.PathLike) -> Path | None:
    """The latest complete checkpoint under ``out`` (or ``out`` itself if it is one); None if there is none.

    ``out/checkpoint`` normally; ``out/checkpoint.prev`` only if a save died between its two renames."""
    out = Path(out)
    for candidate in (out, out / CHECKPOINT_DIR, out / (CHECKPOINT_DIR + ".prev")):
        if candidate.is_dir() and _is_complete(candidate):
            return candidate
    return None


def why_no_checkpoint(path: str | os.PathLike) -> str:
    """Why ``find_checkpoint(path)`` finds nothing, in words: what the folder is and what it lacks."""
    path = Path(path)
    if not path.exists():
        return f"{path} does not exist"
    if not path.is_dir():
        return f"{path} is a file, not a run or checkpoint folder"
    folder = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
    present = {p.name for p in folder.iterdir()}
    missing = [name for name in ("config.json", STATE_FILE, MARKER_FILE) if name not in present]
    if len(missing) == 3:
        return f"{path} holds no checkpoint: no {CHECKPOINT_DIR}/ folder, no config.json, no {STATE_FILE}"
    if "config.json" in present and STATE_FILE not in present and MARKER_FILE not in present:
        return (f"{folder} is a saved model, not a training checkpoint: it has config.json but no {STATE_FILE} "
                f"(optimizer, RNG and step) or {MARKER_FILE}; load the model alone with "
                f"AutoModelForCausalLM.from_pretrained({str(folder)!r})")
    return f"{folder} is not a complete training checkpoint: {', '.join(missing)} missing"


def _model_card(info: dict) -> str:
    """README.md of a checkpoint: what it is and how to load it (transformers alone does not know the model)."""
    run = info.get("run", {})
    task = run.get("task", {}).get("name", "?")
    return f"""# A foxlab Forgetting Transformer checkpoint

Written by foxlab's trainer at step {info.get("step")} of {run.get("steps")} (task `{task}`). The model type,
`forgetting_transformer` (the Forgetting Transformer, Lin et al., ICLR 2025, arXiv 2503.02130), is not built into
transformers: install foxlab and `import foxlab` first, which registers the model and its byte tokenizer with the
Auto classes. Without that import transformers reports an unknown model type and suggests upgrading itself, which
does not help.

```python
import foxlab
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
```

`{STATE_FILE}` and `{MARKER_FILE}` hold the training state: `python -m foxlab train ... --resume` (or
`train(..., resume=True)`) continues the run.
"""


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():  # saved with as many GPUs as that machine showed
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


@contextmanager
def _quiet_hf():
    """No transformers progress bars ("Writing model shards", "Loading weights") while saving or loading."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temporary file in the same folder, then os.replace)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(out: str | os.PathLike, model, tokenizer, training_state: dict, info: dict) -> Path:
    """Write ``out/checkpoint`` atomically: everything goes into ``out/.checkpoint-tmp-*`` first, then the old
    checkpoint is renamed to ``checkpoint.prev``, the new one to ``checkpoint``, and ``checkpoint.prev`` removed.
    A crash at any point leaves a complete checkpoint that ``find_checkpoint`` finds."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f".{CHECKPOINT_DIR}-tmp-*"):  # left by an earlier crash
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_DIR}-tmp-", dir=out))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        with _quiet_hf():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        torch.save(training_state, tmp / STATE_FILE)
        (tmp / "README.md").write_text(_model_card(info))
        for file in tmp.iterdir():  # some writers (safetensors) make private files: give them a normal file's mode
            if file.is_file():
                os.chmod(file, 0o666 & ~_umask())
        _write_json(tmp / MARKER_FILE, info)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final, prev = out / CHECKPOINT_DIR, out / (CHECKPOINT_DIR + ".prev")
    if final.exists():
        if prev.exists() and _is_complete(final):
            shutil.rmtree(prev)
        if not prev.exists():
            os.rename(final, prev)
        else:  # final is incomplete and prev is the good one: drop final
            shutil.rmtree(final)
    os.rename(tmp, final)
    shutil.rmtree(prev, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike, device="cpu"):
    """(model, tokenizer, training_state, info) from a checkpoint folder or a run folder that holds one.

    To load only the model, anywhere: ``import foxlab`` then ``AutoModelForCausalLM.from_pretrained(folder)``."""
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"no training checkpoint to load: {why_no_checkpoint(path)}")
    model_type = json.loads((ckpt / "config.json").read_text()).get("model_type")
    if model_type != ForgettingTransformerConfig.model_type:
        raise ValueError(f"{ckpt} holds a {model_type!r} model, not a foxlab "
                         f"{ForgettingTransformerConfig.model_type!r} one")
    with _quiet_hf():
        model = ForgettingTransformerForCausalLM.from_pretrained(ckpt, dtype=torch.float32).to(device)
        tokenizer = ByteTokenizer.from_pretrained(ckpt)
    state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
    info = json.loads((ckpt / MARKER_FILE).read_text())
    return model, tokenizer, state, info


# --------------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------------


def _setup_distributed(device: str | None):
    """(rank, world_size, device, created_group). Initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not (dist.is_available() and dist.is_initialized()):
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, torch.device(dev), False
    created = False
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        dist.init_process_group("nccl" if use_cuda else "gloo")
        created = True
    rank, world = dist.get_rank(), dist.get_world_size()
    if device is None:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count()))))
        torch.cuda.set_device(dev)
    return rank, world, dev, created


def _all_reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(t)
    return t


# --------------------------------------------------------------------------------------------------
# Loss and evaluation
# --------------------------------------------------------------------------------------------------


def scored_tokens(labels: torch.Tensor) -> int:
    """How many targets a batch scores (the model predicts labels[:, 1:] from positions :-1)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def token_loss_sum(model, input_ids: torch.Tensor, labels: torch.Tensor, autocast) -> torch.Tensor:
    """Sum of next-token cross-entropies over the scored targets (float32).

    The model computes it (``num_items_in_batch=1`` turns its mean into the sum), so training goes through the
    chunked LM-head loss when ``fuse_cross_entropy`` is on and never holds the (tokens x vocab) logits.
    """
    with autocast:
        return model(input_ids=input_ids, labels=labels, use_cache=False, num_items_in_batch=1).loss.float()


@torch.no_grad()
def evaluate(model, task: Task, batch_size: int, num_batches: int, device=None, *, rank=0, world=1,
             autocast=None) -> float:
    """Mean loss per scored token over ``num_batches`` batches of the task's eval split (split over ranks)."""
    device = device or next(model.parameters()).device
    autocast = autocast or nullcontext()
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    per_rank = batch_size // world
    for b in range(num_batches):
        batch = task.batch(b * batch_size + rank * per_rank, per_rank, split="eval")
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        totals[0] += token_loss_sum(model, ids, labels, autocast).double()
        totals[1] += scored_tokens(labels)
    model.train(was_training)
    totals = _all_reduce(totals, world)
    return float(totals[0] / totals[1].clamp(min=1))


# --------------------------------------------------------------------------------------------------
# Ctrl-C
# --------------------------------------------------------------------------------------------------


class _StopOnSigint:
    """While active (main thread only): the first SIGINT asks the loop to stop after the current step; a second
    one raises KeyboardInterrupt at once."""

    def __init__(self, say):
        self.requested, self.say, self.previous = False, say, None

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.say("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to abort now)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            try:
                self.previous = signal.signal(signal.SIGINT, self._handler)
            except ValueError:
                self.previous = None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


# --------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------


RESUME_HINT = "resume=True, or --resume on the command line, continues it"


def _note_earlier_run(out: Path, say) -> None:
    """Say that a new run in ``out`` replaces the checkpoint an earlier run left there."""
    ckpt = find_checkpoint(out)
    if ckpt is None:
        return
    info = json.loads((ckpt / MARKER_FILE).read_text())
    step, total = info.get("step"), info.get("run", {}).get("steps")
    if step is not None and total is not None and step < total:
        say(f"note: {out} holds an unfinished run (step {step} of {total}); this run starts over and replaces it "
            f"({RESUME_HINT} instead)")
    else:
        say(f"note: {out} holds an earlier run ({step} steps); this run replaces it")


def _build_task(task, task_kwargs, seq_len, seed) -> Task:
    if isinstance(task, Task):
        return task
    kwargs = dict(task_kwargs or {})
    if seq_len is not None:
        kwargs["seq_len"] = seq_len
    kwargs.setdefault("seed", seed)
    check_names(kwargs, inspect.signature(TASKS[task]).parameters, f"task {task!r}: ")
    try:
        return make_task(task, **kwargs)
    except ValueError as e:  # a value the task cannot use (seq_len too short, a missing text file, ...)
        raise SettingError(f"task {task!r}: {e}", "task_kwargs") from e


def default_warmup(steps: int) -> int:
    """The warmup of a run of ``steps`` steps when none is given: 10% of them, at least 1, at most 100."""
    return min(100, max(1, steps // 10))


class _Unset:
    """A setting that a run's record does not have (an override given to one run only)."""

    def __repr__(self):
        return "unset"


UNSET = _Unset()


class ResumeMismatch(SettingError):
    """A resume whose settings differ from the checkpoint's run. ``differences``: (setting, value now, value in
    the checkpoint's run) for each, with the task's and the overrides' entries one by one."""

    def __init__(self, checkpoint: Path, differences: list[tuple[str, object, object]]):
        self.checkpoint, self.differences = checkpoint, differences
        listed = "; ".join(f"{name} is {now!r} here but {old!r} in that run" for name, now, old in differences)
        fixes = ", ".join(f"no {name}" if old is UNSET else f"{name}={old!r}" for name, _, old in differences)
        super().__init__(
            f"cannot resume the run in {checkpoint}: {listed}. To continue that run, pass its values ({fixes}); to "
            f"start a new one, use another out folder (or no resume). Only {', '.join(sorted(RESUMABLE_CHANGES))} "
            "may change on resume (a larger steps extends the run)", differences[0][0])


def run_differences(saved: dict, now: dict) -> list[tuple[str, object, object]]:
    """(setting, value in ``now``, value in ``saved``) for each setting that defines a run and differs between
    two runs' records (``info["run"]``). The task's fields are named as train() takes them (``task``,
    ``seq_len``, ``task_kwargs['path']``), the overrides one by one (``overrides['num_heads']``)."""
    ignore = RESUMABLE_CHANGES | {"world_size", "model"}
    if saved.get("preset") is None:  # that run was given a model: its preset/overrides are not known
        ignore |= {"preset", "overrides"}

    def flat(run: dict) -> dict:
        run = json.loads(json.dumps(run, default=str))  # compare as saved: tuples as lists, paths as str
        entries = {}
        for key, value in run.items():
            if key == "task":
                for part, x in value.items():
                    if part == "seed" and x == run.get("seed"):
                        continue  # the run's seed (reported under seed)
                    entries["task" if part == "name" else "seq_len" if part == "seq_len" else
                            f"task_kwargs[{part!r}]"] = x
            elif key == "overrides" and isinstance(value, dict):
                entries.update({f"overrides[{k!r}]": x for k, x in value.items()})
            elif key not in ignore:
                entries[key] = value
        return entries

    old, new = flat(saved), flat(now)
    return [(k, new.get(k, UNSET), old.get(k, UNSET)) for k in sorted(old.keys() | new.keys())
            if old.get(k, UNSET) != new.get(k, UNSET)]


def _resume(source: Path, run: dict, warmup_steps: int | None, say):
    """(model, tokenizer, training state) of the checkpoint in ``source``, once its run is known to be this one.

    A resume keeps the run's warmup (resolved to a number when the run started) unless ``warmup_steps`` is given;
    a larger ``steps`` extends the run (see train)."""
    ckpt = find_checkpoint(source)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint to resume from: {why_no_checkpoint(source)}")
    model, tokenizer, state, info = load_checkpoint(ckpt, device="cpu")
    saved = info["run"]
    run["warmup_steps"] = saved["warmup_steps"] if warmup_steps is None else warmup_steps
    differences = run_differences(saved, run)
    if differences:
        raise ResumeMismatch(ckpt, differences)
    if state["step"] > run["steps"]:
        raise SettingError(f"steps ({run['steps']}) is before the checkpoint's step ({state['step']}): steps is "
                           "the run's total, so it must be at least that", "steps")
    say(f"resuming from {ckpt} at step {state['step']}")
    if run["steps"] > saved["steps"]:
        say(f"extending the run from {saved['steps']} to {run['steps']} steps: the cosine schedule now ends at step "
            f"{run['steps']}, so the learning rate of the remaining steps follows the longer schedule (the run is "
            f"not the same as one of {run['steps']} steps from the start)")
    return model, tokenizer, state


def _check_train_arguments(model, tokenizer, overrides, steps, warmup_steps, save_every, out, resume) -> None:
    """The settings that only make sense together (TRAIN_SETTINGS checks each one alone)."""
    if save_every and out is None:
        raise SettingError("save_every needs an output folder (out=...)", "save_every")
    if resume and out is None and not isinstance(resume, (str, os.PathLike)):
        raise SettingError("resume=True needs the run's folder (out=...)", "resume")
    if resume and (model is not None or tokenizer is not None):
        raise SettingError("resume loads the model and tokenizer from the checkpoint: pass neither",
                           "model" if model is not None else "tokenizer")
    if model is not None and overrides:
        raise SettingError("overrides apply to the preset's config: with a model given, set its config instead",
                           "overrides")
    if warmup_steps is not None and warmup_steps > steps:
        raise SettingError(f"warmup_steps ({warmup_steps}) must be at most steps ({steps})", "warmup_steps")


def _new_model(model, tokenizer, preset: str, overrides: dict | None, seed: int):
    """(model, tokenizer) of a new run: the model as given, or built (seeded) from a config or the preset."""
    if model is None or isinstance(model, ForgettingTransformerConfig):
        config = model or ForgettingTransformerConfig.from_preset(preset, **(overrides or {}))
        torch.manual_seed(seed)
        model = ForgettingTransformerForCausalLM(config)
    return model, tokenizer or ByteTokenizer()


class _Session:
    """One call of train() on this process: the model (and its DDP/FSDP wrapper), optimizer and schedule, the
    run's record ``run`` (train()'s settings, as checkpoints store them) and the result being filled in; and what
    is done with them: a step, an evaluation, metrics and checkpoints in ``out`` (written by rank 0)."""

    def __init__(self, model, tokenizer, task: Task, run: dict, state: dict | None, out: Path | None, rank: int,
                 world: int, dev: torch.device, cuda_graph: bool = False):
        self.model, self.tokenizer, self.task, self.run, self.out = model, tokenizer, task, run, out
        self.rank, self.world, self.dev, self.is_main = rank, world, dev, rank == 0
        self.per_rank = run["batch_size"] // world
        self.wrapped = wrap_model(model.train(), run["parallel"], world, dev)  # first: FSDP replaces the parameters
        self.optimizer = make_optimizer(model, run["lr"], run["weight_decay"], tuple(run["betas"]))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._schedule())
        self.result = TrainResult(model=model, tokenizer=tokenizer, task=task, out=out)
        if state is not None:
            self._restore(state)
        # A CUDA graph replays the whole step (foxlab.cuda_graph): its batch goes into fixed tensors (``inputs``)
        self.graphed = GraphedStep(self._graph_update, self.optimizer, device=dev) if cuda_graph else None
        self.inputs: dict[str, torch.Tensor] | None = None
        self.next_batch: tuple[int, dict] | None = None  # (step, batch), made ahead of its step
        if cuda_graph:
            make_capturable(self.optimizer)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not cuda_graph)
                         if dev.type == "cuda" else nullcontext())
        self.in_update = False  # between the optimizer's update and the step's record: no consistent state
        self.metrics_written = time.perf_counter()

    def _schedule(self) -> _Schedule:
        return _Schedule(self.run["steps"], self.run["warmup_steps"], self.run["min_lr_ratio"])

    def _restore(self, state: dict) -> None:
        """Continue from a checkpoint's training state: optimizer, schedule, random generators, records."""
        optimizer, scheduler, result = self.optimizer, self.scheduler, self.result
        load_optimizer_state(self.model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        # the schedule for this run's steps (a resume may extend a run), and the next step's rate under it
        scheduler.lr_lambdas = [self._schedule() for _ in optimizer.param_groups]
        for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base_lr * factor(scheduler.last_epoch)
        _set_rng_state(state["rng"])
        result.step, result.losses, result.lrs = state["step"], list(state["losses"]), list(state["lrs"])
        result.evals, result.elapsed_s = list(state["evals"]), state["elapsed_s"]

    def metrics(self) -> dict:
        r = self.result
        return {"losses": r.losses, "lrs": r.lrs, "evals": r.evals, "step": r.step, "steps": self.run["steps"],
                "final_loss": r.losses[-1] if r.losses else None,
                "eval_loss": r.evals[-1]["loss"] if r.evals else None,
                "elapsed_s": round(r.elapsed_s, 3), "interrupted": r.interrupted, "run": self.run}

    def write_metrics(self) -> None:
        """All the losses so far, in case the run dies between checkpoints."""
        if self.out is not None and self.is_main:
            _write_json(self.out / "metrics.json", self.metrics())
            self.metrics_written = time.perf_counter()

    def checkpoint(self) -> None:
        if self.out is None:
            return
        # Collective under FSDP (every process takes part); the whole state lands on rank 0.
        to_save, optimizer_saved = full_weights_model(self.model), optimizer_state(self.model, self.optimizer)
        if self.is_main:
            r = self.result
            samples = r.step * self.run["batch_size"]
            training_state = {"optimizer": portable_state(optimizer_saved),
                              "scheduler": portable_state(self.scheduler.state_dict()),
                              "rng": _rng_state(), "step": r.step, "losses": r.losses, "lrs": r.lrs,
                              "evals": r.evals, "elapsed_s": r.elapsed_s, "samples_seen": samples}
            info = {"format": FORMAT_VERSION, "step": r.step, "samples_seen": samples, "run": self.run}
            save_checkpoint(self.out, to_save, self.tokenizer, training_state, info)
            _write_json(self.out / "metrics.json", self.metrics())
        if self.world > 1:
            dist.barrier()

    def run_eval(self) -> None:
        loss = evaluate(self.model, self.task, self.per_rank * self.world, self.run["eval_batches"], self.dev,
                        rank=self.rank, world=self.world, autocast=self.autocast)
        self.result.evals.append({"step": self.result.step, "loss": loss})

    def step(self) -> tuple[float, float]:
        """One optimizer step on the next global batch: (mean loss per scored token, the learning rate used)."""
        r, world, dev = self.result, self.world, self.dev
        batch = self._batch(r.step)
        scheduler = self.scheduler
        lr_now = scheduler.base_lrs[0] * scheduler.lr_lambdas[0](scheduler.last_epoch)  # param_groups' lr, as a float
        if self.graphed is not None:
            count = self._fill_inputs(batch)
            self.in_update = True
            loss_sum = self.graphed()
        else:
            ids, labels = batch["input_ids"].to(dev), batch["labels"].to(dev)
            count = _all_reduce(torch.tensor(float(scored_tokens(labels)), device=dev), world)
            self.optimizer.zero_grad(set_to_none=True)
            loss_sum = self._loss_and_grads(ids, labels, count)
            self.in_update = True
            self.optimizer.step()
        if r.step + 1 < self.run["steps"]:  # built while the GPU runs this step (reading the loss waits for it)
            self.next_batch = (r.step + 1, self._batch(r.step + 1))
        loss = float(_all_reduce(loss_sum, world) / count.clamp(min=1))
        scheduler.step()
        r.step += 1
        r.losses.append(loss)
        r.lrs.append(lr_now)
        self.in_update = False
        return loss, lr_now

    def _batch(self, step: int) -> dict[str, torch.Tensor]:
        """This process's part of the global batch of ``step`` (a pure function of the step)."""
        if self.next_batch is not None and self.next_batch[0] == step:
            return self.next_batch[1]
        return self.task.batch(step * self.run["batch_size"] + self.rank * self.per_rank, self.per_rank)

    def _loss_and_grads(self, ids, labels, count) -> torch.Tensor:
        """Forward and backward of this process's batch, gradients clipped; returns its summed loss (detached)."""
        loss_sum = token_loss_sum(self.wrapped, ids, labels, self.autocast)
        # DDP and FSDP average gradients over processes: scale so the sum over them is the global mean.
        (loss_sum * (self.world / count.clamp(min=1))).backward()
        if self.run["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.run["grad_clip"])
        return loss_sum.detach()

    def _graph_update(self) -> torch.Tensor:
        """The step that the CUDA graph captures, reading the batch from ``inputs``."""
        loss_sum = self._loss_and_grads(self.inputs["ids"], self.inputs["labels"], self.inputs["count"])
        self.optimizer.step()
        return loss_sum

    def _fill_inputs(self, batch) -> torch.Tensor:
        """Copy a batch into the graph's fixed input tensors (made from the first); returns its scored-token count."""
        ids, labels = batch["input_ids"], batch["labels"]
        count = float(scored_tokens(labels))
        if self.inputs is None:
            self.inputs = {"ids": ids.to(self.dev), "labels": labels.to(self.dev),
                           "count": torch.tensor(count, device=self.dev)}
            return self.inputs["count"]
        if ids.shape != self.inputs["ids"].shape or labels.shape != self.inputs["labels"].shape:
            raise RuntimeError(f"cuda_graph: every batch must have the shape of the first, "
                               f"{tuple(self.inputs['ids'].shape)}; task {self.task.name!r} gave {tuple(ids.shape)}")
        self.inputs["ids"].copy_(ids, non_blocking=True)
        self.inputs["labels"].copy_(labels, non_blocking=True)
        self.inputs["count"].fill_(count)
        return self.inputs["count"]

    def _evaluate_or_write_metrics(self, say) -> None:
        r, eval_every = self.result, self.run["eval_every"]
        if eval_every and r.step % eval_every == 0 and r.step < self.run["steps"]:
            self.run_eval()
            say(f"step {r.step}: eval loss {r.evals[-1]['loss']:.4f}")
            self.write_metrics()
        elif time.perf_counter() - self.metrics_written > METRICS_EVERY_S:
            self.write_metrics()

    def _stop_requested(self, stop: _StopOnSigint) -> bool:
        """Ctrl-C on any process stops them all after the same step."""
        if self.world == 1:
            return stop.requested
        return bool(_all_reduce(torch.tensor(float(stop.requested), device=self.dev), self.world) > 0)

    def loop(self, progress: bool, callback, say) -> None:
        """Steps up to the run's total, evaluating, saving and writing metrics on the way. Ctrl-C stops after the
        current step with ``result.interrupted`` set (during an optimizer update it re-raises: nothing to save)."""
        r, steps, save_every = self.result, self.run["steps"], self.run["save_every"]
        bar = tqdm(total=steps, initial=r.step, desc=f"train {self.task.name}",
                   disable=not (progress and self.is_main), dynamic_ncols=True)
        stop = _StopOnSigint(say)
        started, base_elapsed = time.perf_counter(), r.elapsed_s
        try:
            with stop:
                while r.step < steps:
                    loss, lr_now = self.step()
                    r.elapsed_s = base_elapsed + time.perf_counter() - started
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_now:.2e}", refresh=False)
                    if callback is not None:
                        callback(r.step, loss)
                    self._evaluate_or_write_metrics(say)
                    if self._stop_requested(stop):
                        r.interrupted = True
                        break
                    if save_every and r.step % save_every == 0 and r.step < steps:
                        self.checkpoint()
        except KeyboardInterrupt:
            r.interrupted = True
            if self.in_update:  # the parameters are half-updated: no consistent state to save
                bar.close()
                say("interrupted during an optimizer update: no checkpoint saved")
                raise
        finally:
            bar.close()

    def finish(self, say) -> None:
        """The last evaluation (unless interrupted or just done) and the last checkpoint."""
        r = self.result
        if not r.interrupted and not (r.evals and r.evals[-1]["step"] == r.step):
            self.run_eval()
        self.checkpoint()
        if r.interrupted:
            saved = f": checkpoint saved in {self.out / CHECKPOINT_DIR} ({RESUME_HINT})" if self.out is not None else ""
            say(f"interrupted at step {r.step}/{self.run['steps']}{saved}")


@checked(TRAIN_SETTINGS)
def train(
    model: ForgettingTransformerForCausalLM | ForgettingTransformerConfig | None = None,
    *,
    preset: str = "tiny",
    overrides: dict | None = None,
    task: str | Task = "segments",
    task_kwargs: dict | None = None,
    seq_len: int | None = None,
    steps: int = 500,
    batch_size: int = 16,
    lr: float = 3e-3,
    min_lr_ratio: float = 0.1,
    warmup_steps: int | None = None,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    grad_clip: float | None = 1.0,
    eval_every: int | None = None,
    eval_batches: int = 2,
    save_every: int | None = None,
    out: str | os.PathLike | None = None,
    resume: bool | str | os.PathLike = False,
    seed: int = 0,
    device: str | None = None,
    parallel: str = "ddp",
    acp_log_tolerance: float | None = None,
    tokenizer: ByteTokenizer | None = None,
    progress: bool = True,
    callback=None,
    cuda_graph: bool = False,
) -> TrainResult:
    """Train a FoX causal LM on a task; see the module docstring. Every argument is checked (``TRAIN_SETTINGS``):
    a wrong name, type or value raises ``SettingError`` naming it.

    Args:
        model: a model, a config, or None for ``ForgettingTransformerConfig.from_preset(preset, **overrides)``.
        task: ``segments``, ``recall``, ``text`` (``task_kwargs`` go to ``foxlab.data.make_task``) or a Task.
        steps: total optimizer steps (a resumed run continues up to ``steps``).
        batch_size: the global batch (split over DDP processes). lr: peak learning rate, reached after
            ``warmup_steps`` (default: 10% of the steps, at most 100), then cosine decay to ``min_lr_ratio * lr``
            (in [0, 1]). grad_clip: the largest gradient norm (0 or None: no clipping).
        eval_every: evaluate on ``eval_batches`` batches of the task's eval split every so many steps (and at the
            end); None: only at the end. save_every: checkpoint every so many steps (needs ``out``); a checkpoint
            is always written at the end and on Ctrl-C when ``out`` is given.
        resume: True continues from ``out``'s checkpoint; a path continues from that checkpoint (writing to ``out``).
            The run's settings must be the same as when it started (a ``ResumeMismatch`` error lists those that
            are not), except ``steps``, ``save_every``, ``eval_every``, ``device`` and ``progress``; the warmup is
            the run's own unless ``warmup_steps`` is given. A larger ``steps`` extends a (finished) run: the cosine
            schedule is stretched to the new total, so the remaining steps' learning rates follow the longer
            schedule (the rate goes back up from where the shorter schedule ended). An extended run is therefore
            not the same as a run of the longer total from the start, whose decay began later.
        seed: seeds the model's initialisation and the task's data.
        parallel: with several processes (torchrun), ``ddp`` (a copy of the model on each) or ``fsdp`` (weights,
            gradients and optimizer state sharded over them; then ``TrainResult.model`` is the sharded module and
            the checkpoint holds the whole model). See ``foxlab.parallel``.
        acp_log_tolerance: adaptive computation pruning for this run, log eps <= 0 (e.g. -10: every layer skips
            the scores its gates have decayed below e^-10 of a query's weight; ``foxlab.acp``); sets the model
            config's ``acp_log_tolerance``. None keeps the config's (off unless it says otherwise). A resume may
            change it.
        callback: called as ``callback(step, loss)`` after every step (e.g. to stop early by raising).
        cuda_graph: run each step as one CUDA graph replay (``foxlab.cuda_graph``) after three eager ones: the
            speed of the GPU when the host would hold it back (small models on fast GPUs). One CUDA process only;
            every batch must have the first one's shape. The optimizer is then the fused, capturable AdamW, whose
            rounding differs slightly from the default one: losses agree with an eager run to about 1e-4, not
            bitwise. A checkpoint resumes in either mode.
    """
    _check_train_arguments(model, tokenizer, overrides, steps, warmup_steps, save_every, out, resume)
    rank, world, dev, created_group = _setup_distributed(device)
    if cuda_graph and (dev.type != "cuda" or world > 1):
        where = f"device {dev}" if dev.type != "cuda" else f"{world} processes"
        raise SettingError(f"cuda_graph=True needs one process on a CUDA device, got {where}", "cuda_graph")
    if batch_size % world:
        raise SettingError(f"batch_size ({batch_size}) must be divisible by the number of processes ({world})",
                           "batch_size")
    out = Path(out) if out is not None else None
    say = tqdm.write if rank == 0 else (lambda *_: None)
    task = _build_task(task, task_kwargs, seq_len, seed)
    run = dict(task=task.spec(), steps=steps, batch_size=batch_size, lr=lr, min_lr_ratio=min_lr_ratio,
               warmup_steps=default_warmup(steps) if warmup_steps is None else warmup_steps,
               weight_decay=weight_decay, betas=list(betas), grad_clip=grad_clip,
               eval_every=eval_every, eval_batches=eval_batches, save_every=save_every, seed=seed,
               world_size=world, parallel=parallel, preset=preset if model is None else None,
               overrides=dict(overrides or {}) if model is None else None)
    if resume:
        model, tokenizer, state = _resume(out if resume is True else Path(resume), run, warmup_steps, say)
    else:
        (model, tokenizer), state = _new_model(model, tokenizer, preset, overrides, seed), None
    if model.config.vocab_size < len(tokenizer):
        raise SettingError(f"the model's vocab_size ({model.config.vocab_size}) is smaller than the tokenizer's "
                           f"({len(tokenizer)})", "tokenizer")
    if acp_log_tolerance is not None:
        model.config.acp_log_tolerance = acp_log_tolerance
    run["model"] = {k: v for k, v in model.config.to_diff_dict().items() if k != "transformers_version"}

    session = _Session(model, tokenizer, task, run, state, out, rank, world, dev, cuda_graph)
    if out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            _note_earlier_run(out, say)
    session.loop(progress, callback, say)
    session.finish(say)
    if created_group:
        dist.destroy_process_group()
    return session.result


# --------------------------------------------------------------------------------------------------
# Forgetting at boundaries, and the demo
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def boundary_forget_ratio(model, input_ids: torch.Tensor, marked: torch.Tensor | None = None) -> dict:
    """How much each head forgets at marked positions (default: ``<reset>`` tokens) compared to elsewhere.

    For every layer and head: mean f_t over marked tokens / mean f_t over the other tokens (``<bos>`` and
    ``<pad>`` excluded). Returns {"ratio": the lowest one (the head that forgets most at the marks), "layer",
    "head", "per_head": [[ratio per head] per layer], "f_marked"/"f_other": the same grids of means}.
    A ratio well below 1 (<= 0.5, say) means the model learned to forget at the marks."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = model(input_ids=input_ids.to(device), use_cache=False, output_forget_gates=True)
    model.train(was_training)
    marked = (input_ids == RESET_ID) if marked is None else marked.bool()
    other = ~marked & (input_ids != BOS_ID) & (input_ids != PAD_ID)
    if not marked.any() or not other.any():
        raise ValueError("need both marked and unmarked tokens to compare")
    marked, other = marked.to(device), other.to(device)
    f_marked, f_other, ratios = [], [], []
    for log_f in out.forget_gates:
        f = log_f.float().exp()  # (B, T, H)
        fm, fo = f[marked].mean(0), f[other].mean(0)
        f_marked.append(fm.tolist())
        f_other.append(fo.tolist())
        ratios.append((fm / fo).tolist())
    layer, head = min(((l, h) for l in range(len(ratios)) for h in range(len(ratios[l]))),
                      key=lambda lh: ratios[lh[0]][lh[1]])
    return {"ratio": ratios[layer][head], "layer": layer, "head": head, "per_head": ratios,
            "f_marked": f_marked, "f_other": f_other}


# The demo's recipe: `tiny` as it is, on `segments` (128 tokens, segments of 8-48). In tuning runs (2 CPU cores
# each) every head's gate at <reset> fell below 1% of its value elsewhere within 50 steps; by 300 steps the loss
# is within a few hundredths of a nat of the Bayes-optimal loss.
DEMO = dict(preset="tiny", overrides=dict(), task="segments", task_kwargs=dict(seq_len=128, min_segment=8,
            max_segment=48), steps=300, batch_size=16, lr=3e-3)


DEMO_SETTINGS = {**{k: TRAIN_SETTINGS[k] for k in ("out", "seed", "progress", "device")},
                 "steps": integer(low=1, optional=True), "resume": flag()}


@checked(DEMO_SETTINGS)
def demo(out: str | os.PathLike = "runs/demo", *, steps: int | None = None, seed: int = 0, progress: bool = True,
         device: str | None = None, resume: bool = False) -> dict:
    """Train ``tiny`` FoX on ``segments``, measure how much it forgets at resets, write the checkpoint,
    ``metrics.json`` and ``report.html`` under ``out``; returns the metrics. Interrupted (Ctrl-C), it returns the
    metrics so far (``interrupted`` true) without the report; ``resume=True`` then finishes the run."""
    out = Path(out)
    started = time.perf_counter()
    recipe = {**DEMO, "steps": steps or DEMO["steps"]}
    on_cpu = str(device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")
    threads = torch.get_num_threads()
    if on_cpu:
        # The tiny model gains little from a second thread, and one thread keeps the time steady on a busy
        # machine (two OpenMP threads sharing two cores with other work slowed steps by up to 10x in our runs).
        torch.set_num_threads(1)
    try:
        result = train(out=out, seed=seed, progress=progress, device=device, resume=resume, **recipe)
    finally:
        torch.set_num_threads(threads)
    if result.interrupted:
        return json.loads((out / "metrics.json").read_text())
    train_s = time.perf_counter() - started
    model, task = result.model, result.task
    sample = task.batch(0, 16, split="eval")["input_ids"]
    forgetting = boundary_forget_ratio(model, sample)
    optimal = task.optimal_loss(sample) if hasattr(task, "optimal_loss") else None
    metrics = json.loads((out / "metrics.json").read_text())
    metrics.update({"boundary_forget_ratio": forgetting["ratio"], "boundary_forget_head":
                    {"layer": forgetting["layer"], "head": forgetting["head"]},
                    "boundary_forget_ratio_per_head": forgetting["per_head"],
                    "f_at_reset": forgetting["f_marked"], "f_elsewhere": forgetting["f_other"],
                    "optimal_loss": optimal, "train_time_s": round(train_s, 2)})
    report_ids = sample[:1]
    marks = [int(i) for i in task.marked_positions(report_ids)[0].nonzero().flatten()]
    _write_json(out / "metrics.json", metrics)
    from .viz import write_report

    losses = {"train": result.losses, "eval": [(e["step"], e["loss"]) for e in result.evals]}
    write_report(out / "report.html", model.cpu(), report_ids, tokenizer=result.tokenizer, losses=losses,
                 marked_positions=marks, title="foxlab demo: tiny FoX learns to forget at <reset>",
                 description=task.describe(), metrics=metrics)
    metrics["total_time_s"] = round(time.perf_counter() - started, 2)
    _write_json(out / "metrics.json", metrics)
    return metrics
