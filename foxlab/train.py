"""Training small FoX models: ``train`` (notebook and CLI), exact resume, DDP, and the forgetting demo.

``train(...)`` runs AdamW (betas 0.9, 0.95; weight decay on matrices only), linear warmup then cosine decay to
``min_lr_ratio * lr``, gradient clipping, bf16 autocast on CUDA, periodic evaluation and a ``tqdm.auto`` progress
bar, and returns a ``TrainResult`` (model, tokenizer, per-step losses and learning rates, evaluations).

With ``out``, it writes ``out/metrics.json`` (``losses``: one per step, all steps so far) and checkpoints to
``out/checkpoint/``: ``save_pretrained`` (config + weights), the tokenizer, and ``training_state.pt`` (optimizer,
scheduler, RNG states, step, histories). A checkpoint is written into a temporary folder next to it and then
renamed into place, ``trainer_state.json`` last, so a crash mid-save leaves the previous checkpoint intact.
``resume=True`` continues from it: batches are a pure function of the step (``foxlab.data``), so the losses after a
resume equal those of an uninterrupted run (bitwise on CPU). Ctrl-C finishes the current step, saves a checkpoint
and returns with ``interrupted=True`` (a second Ctrl-C aborts at once).

Under ``torchrun --nproc_per_node N`` it trains with DistributedDataParallel (gloo on CPU, nccl on GPU), or with
``parallel="fsdp"`` sharded over the processes (FSDP2, ``foxlab.parallel``): the global batch is split over the
processes and the loss is normalised by the global number of scored tokens, so N processes follow the same
trajectory as one process with the same global batch. Checkpoints are the same whatever the number of processes
or mode, and a run can resume with another.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from .config import ForgettingTransformerConfig
from .data import BOS_ID, IGNORE_INDEX, PAD_ID, RESET_ID, ByteTokenizer, Task, make_task, task_from_spec
from .model import ForgettingTransformerForCausalLM
from .parallel import check_parallel, full_weights_model, load_optimizer_state, optimizer_state, wrap_model

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "training_state.pt"
MARKER_FILE = "trainer_state.json"  # written last: a checkpoint folder without it is incomplete
FORMAT_VERSION = 2  # 2: the optimizer state is keyed by parameter name (foxlab.parallel)
METRICS_EVERY_S = 10.0  # metrics.json is also rewritten at every checkpoint and evaluation
# Settings that may differ between a run and its resume (everything else must match, or the resumed run would
# not be the same run).
RESUMABLE_CHANGES = {"steps", "save_every", "eval_every", "progress", "device", "parallel"}


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
    """(model, tokenizer, training_state, info) from a checkpoint folder or a run folder that holds one."""
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint in {path}")
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
    """Sum of next-token cross-entropies over the scored targets (float32)."""
    with autocast:
        logits = model(input_ids=input_ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


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


def _build_task(task, task_kwargs, seq_len, seed) -> Task:
    if isinstance(task, Task):
        return task
    kwargs = dict(task_kwargs or {})
    if seq_len is not None:
        kwargs["seq_len"] = seq_len
    kwargs.setdefault("seed", seed)
    return make_task(task, **kwargs)


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
    grad_clip: float = 1.0,
    eval_every: int | None = None,
    eval_batches: int = 2,
    save_every: int | None = None,
    out: str | os.PathLike | None = None,
    resume: bool | str | os.PathLike = False,
    seed: int = 0,
    device: str | None = None,
    parallel: str = "ddp",
    tokenizer: ByteTokenizer | None = None,
    progress: bool = True,
    callback=None,
) -> TrainResult:
    """Train a FoX causal LM on a task; see the module docstring.

    Args:
        model: a model, a config, or None for ``ForgettingTransformerConfig.from_preset(preset, **overrides)``.
        task: ``segments``, ``recall``, ``text`` (``task_kwargs`` go to ``foxlab.data.make_task``) or a Task.
        steps: total optimizer steps (a resumed run continues up to ``steps``).
        batch_size: the global batch (split over DDP processes). lr: peak learning rate, reached after
            ``warmup_steps`` (default: 10% of the steps, at most 100), then cosine decay to ``min_lr_ratio * lr``.
        eval_every: evaluate on ``eval_batches`` batches of the task's eval split every so many steps (and at the
            end); None: only at the end. save_every: checkpoint every so many steps (needs ``out``); a checkpoint
            is always written at the end and on Ctrl-C when ``out`` is given.
        resume: True continues from ``out``'s checkpoint; a path continues from that checkpoint (writing to ``out``).
        seed: seeds the model's initialisation and the task's data.
        parallel: with several processes (torchrun), ``ddp`` (a copy of the model on each) or ``fsdp`` (weights,
            gradients and optimizer state sharded over them; then ``TrainResult.model`` is the sharded module and
            the checkpoint holds the whole model). See ``foxlab.parallel``.
        callback: called as ``callback(step, loss)`` after every step (e.g. to stop early by raising).
    """
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    for name, value in (("save_every", save_every), ("eval_every", eval_every)):
        if value is not None and (not isinstance(value, int) or value <= 0):
            raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if save_every and out is None:
        raise ValueError("save_every needs an output folder (out=...)")
    if resume and out is None and not isinstance(resume, (str, os.PathLike)):
        raise ValueError("resume=True needs the run's folder (out=...)")
    check_parallel(parallel)

    rank, world, dev, created_group = _setup_distributed(device)
    if batch_size % world:
        raise ValueError(f"batch_size ({batch_size}) must be divisible by the number of processes ({world})")
    per_rank = batch_size // world
    out = Path(out) if out is not None else None
    is_main = rank == 0
    say = tqdm.write if is_main else (lambda *_: None)

    task = _build_task(task, task_kwargs, seq_len, seed)
    warmup = min(100, max(1, steps // 10)) if warmup_steps is None else warmup_steps
    run = dict(task=task.spec(), steps=steps, batch_size=batch_size, lr=lr, min_lr_ratio=min_lr_ratio,
               warmup_steps=warmup, weight_decay=weight_decay, betas=list(betas), grad_clip=grad_clip,
               eval_every=eval_every, eval_batches=eval_batches, save_every=save_every, seed=seed,
               world_size=world, parallel=parallel, preset=preset if model is None else None,
               overrides=dict(overrides or {}) if model is None else None)

    # --- model, tokenizer, state ---
    state = None
    if resume:
        if model is not None:
            raise ValueError("resume loads the model from the checkpoint: pass no model")
        source = out if resume is True else Path(resume)
        ckpt = find_checkpoint(source)
        if ckpt is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {source}")
        model, tokenizer, state, info = load_checkpoint(ckpt, device="cpu")
        ignore = RESUMABLE_CHANGES | {"world_size", "model"}
        if info["run"].get("preset") is None:  # that run was given a model: its preset/overrides are not known
            ignore |= {"preset", "overrides"}
        saved = {k: v for k, v in info["run"].items() if k not in ignore}
        now = {k: v for k, v in run.items() if k not in ignore}
        if saved != now:
            diff = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
            raise ValueError(f"resume settings differ from the checkpoint's in {', '.join(diff)} "
                             f"(saved: {', '.join(f'{k}={saved.get(k)!r}' for k in diff)})")
        if state["step"] > steps:
            raise ValueError(f"the checkpoint is at step {state['step']}, past steps={steps}")
    else:
        if model is None or isinstance(model, ForgettingTransformerConfig):
            config = model or ForgettingTransformerConfig.from_preset(preset, **(overrides or {}))
            torch.manual_seed(seed)
            model = ForgettingTransformerForCausalLM(config)
        tokenizer = tokenizer or ByteTokenizer()
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(f"the model's vocab_size ({model.config.vocab_size}) is smaller than the tokenizer's "
                         f"({len(tokenizer)})")
    run["model"] = {k: v for k, v in model.config.to_diff_dict().items() if k != "transformers_version"}

    wrapped = wrap_model(model.train(), parallel, world, dev)  # before the optimizer: FSDP replaces the parameters
    optimizer = make_optimizer(model, lr, weight_decay, betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _Schedule(steps, warmup, min_lr_ratio))
    result = TrainResult(model=model, tokenizer=tokenizer, task=task, out=out)
    if state is not None:
        load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        # the same schedule, for this run's steps (a resume may extend a finished run)
        scheduler.lr_lambdas = [_Schedule(steps, warmup, min_lr_ratio) for _ in optimizer.param_groups]
        _set_rng_state(state["rng"])
        result.step, result.losses, result.lrs = state["step"], list(state["losses"]), list(state["lrs"])
        result.evals, result.elapsed_s = list(state["evals"]), state["elapsed_s"]
        say(f"resuming from {find_checkpoint(out if resume is True else resume)} at step {result.step}")

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else nullcontext()

    def metrics() -> dict:
        return {"losses": result.losses, "lrs": result.lrs, "evals": result.evals, "step": result.step,
                "steps": steps, "final_loss": result.losses[-1] if result.losses else None,
                "eval_loss": result.evals[-1]["loss"] if result.evals else None,
                "elapsed_s": round(result.elapsed_s, 3), "interrupted": result.interrupted, "run": run}

    def checkpoint() -> None:
        if out is None:
            return
        # Collective under FSDP (every process takes part); the whole state lands on rank 0.
        to_save, optimizer_saved = full_weights_model(model), optimizer_state(model, optimizer)
        if is_main:
            training_state = {"optimizer": optimizer_saved, "scheduler": scheduler.state_dict(),
                              "rng": _rng_state(), "step": result.step, "losses": result.losses,
                              "lrs": result.lrs, "evals": result.evals, "elapsed_s": result.elapsed_s,
                              "samples_seen": result.step * batch_size}
            info = {"format": FORMAT_VERSION, "step": result.step, "samples_seen": result.step * batch_size,
                    "run": run}
            save_checkpoint(out, to_save, tokenizer, training_state, info)
            _write_json(out / "metrics.json", metrics())
        if world > 1:
            dist.barrier()

    def run_eval() -> None:
        loss = evaluate(model, task, per_rank * world, eval_batches, dev, rank=rank, world=world, autocast=autocast)
        result.evals.append({"step": result.step, "loss": loss})

    if out is not None and is_main:
        out.mkdir(parents=True, exist_ok=True)
        existing = find_checkpoint(out) if not resume else None
        if existing is not None:
            say(f"note: {out} holds a checkpoint from an earlier run; starting over replaces it "
                "(resume to continue that run instead)")
    metrics_written = time.perf_counter()

    def write_metrics() -> None:  # all the losses so far, in case the run dies between checkpoints
        nonlocal metrics_written
        if out is not None and is_main:
            _write_json(out / "metrics.json", metrics())
            metrics_written = time.perf_counter()

    bar = tqdm(total=steps, initial=result.step, desc=f"train {task.name}", disable=not (progress and is_main),
               dynamic_ncols=True)
    stop = _StopOnSigint(say)
    in_update = False
    started = time.perf_counter()
    base_elapsed = result.elapsed_s
    try:
        with stop:
            while result.step < steps:
                batch = task.batch(result.step * batch_size + rank * per_rank, per_rank)
                ids, labels = batch["input_ids"].to(dev), batch["labels"].to(dev)
                count = _all_reduce(torch.tensor(float(scored_tokens(labels)), device=dev), world)
                optimizer.zero_grad(set_to_none=True)
                loss_sum = token_loss_sum(wrapped, ids, labels, autocast)
                # DDP and FSDP average gradients over processes: scale so the sum over them is the global mean.
                (loss_sum * (world / count.clamp(min=1))).backward()
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                lr_now = optimizer.param_groups[0]["lr"]
                loss = float(_all_reduce(loss_sum.detach(), world) / count.clamp(min=1))
                in_update = True  # from here until the step is recorded, an interrupt leaves no consistent state
                optimizer.step()
                scheduler.step()
                result.step += 1
                result.losses.append(loss)
                result.lrs.append(lr_now)
                in_update = False
                result.elapsed_s = base_elapsed + time.perf_counter() - started
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_now:.2e}", refresh=False)
                if callback is not None:
                    callback(result.step, loss)
                if eval_every and result.step % eval_every == 0 and result.step < steps:
                    run_eval()
                    say(f"step {result.step}: eval loss {result.evals[-1]['loss']:.4f}")
                    write_metrics()
                elif time.perf_counter() - metrics_written > METRICS_EVERY_S:
                    write_metrics()
                stop_now = stop.requested
                if world > 1:
                    flag = _all_reduce(torch.tensor(float(stop_now), device=dev), world)
                    stop_now = bool(flag > 0)
                if stop_now:
                    result.interrupted = True
                    break
                if save_every and result.step % save_every == 0 and result.step < steps:
                    checkpoint()
    except KeyboardInterrupt:
        result.interrupted = True
        if in_update:  # the parameters are half-updated: no consistent state to save
            bar.close()
            say("interrupted during an optimizer update: no checkpoint saved")
            raise
    finally:
        bar.close()
    if not result.interrupted and not (result.evals and result.evals[-1]["step"] == result.step):
        run_eval()
    checkpoint()
    if result.interrupted and out is not None:
        say(f"interrupted at step {result.step}; checkpoint saved in {out / CHECKPOINT_DIR} (resume to continue)")
    elif out is None and is_main and result.interrupted:
        say(f"interrupted at step {result.step}")
    if created_group:
        dist.destroy_process_group()
    return result


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


def demo(out: str | os.PathLike = "runs/demo", *, steps: int | None = None, seed: int = 0, progress: bool = True,
         device: str | None = None) -> dict:
    """Train ``tiny`` FoX on ``segments``, measure how much it forgets at resets, write the checkpoint,
    ``metrics.json`` and ``report.html`` under ``out``; returns the metrics."""
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
        result = train(out=out, seed=seed, progress=progress, device=device, **recipe)
    finally:
        torch.set_num_threads(threads)
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

    write_report(out / "report.html", model.cpu(), report_ids, tokenizer=result.tokenizer, losses=result.losses,
                 marked_positions=marks, title="foxlab demo: tiny FoX learns to forget at <reset>")
    metrics["total_time_s"] = round(time.perf_counter() - started, 2)
    _write_json(out / "metrics.json", metrics)
    return metrics
