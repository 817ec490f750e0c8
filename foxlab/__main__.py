"""The ``foxlab`` command line.

    python -m foxlab train --preset tiny --task segments --steps 500 --seed 0 --save-every 100 --out runs/a
    python -m foxlab train ... --out runs/a --resume        # continue from runs/a/checkpoint
    python -m foxlab train ... --steps 800 --out runs/a --resume   # extend the finished run to 800 steps
    python -m foxlab demo [--out runs/demo]                 # tiny FoX learns to forget at <reset> (= make demo)
    torchrun --nproc_per_node 2 -m foxlab train ... [--parallel fsdp]   # on 2 GPUs (README: several machines)

Every flag is checked as the Python argument it sets is (``foxlab.train.TRAIN_SETTINGS``). Bad arguments exit with
status 2 and one line on stderr; a failure while training exits with 1; Ctrl-C saves a checkpoint and exits with
130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import PRESETS, SETTINGS, ForgettingTransformerConfig
from .data import TASKS
from .settings import SettingError, check_names
from .train import DEMO_SETTINGS, TRAIN_SETTINGS, UNSET, ResumeMismatch, find_checkpoint, why_no_checkpoint


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


class UsageError(Exception):
    """A bad argument found after parsing: reported as one line, exit status 2."""


def _setting(table: dict, name: str):
    """An argparse type for a flag that sets the Python argument ``name``: parsed and checked by its table row, so
    the flag accepts exactly what the argument does (argparse names the flag in the error)."""

    row = table[name]

    def parse(text: str):
        try:
            return row.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _override(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.replace("-", "_"), value


# The train() arguments that have a flag of the same name (--seq-len sets seq_len), with the flag's argparse options.
# Each flag parses and checks its value with the argument's TRAIN_SETTINGS row: a new flag needs one entry here.
TRAIN_FLAGS = {
    "preset": dict(default="tiny", help=f"model preset: {', '.join(PRESETS)} (default: tiny)"),
    "task": dict(default="segments", help=f"{', '.join(TASKS)} (default: segments)"),
    "seq_len": dict(default=None, help="sequence length (default: the task's)"),
    "steps": dict(required=True, help="total optimizer steps. With --resume a larger value extends the run: its "
                  "cosine schedule is stretched to the new total, so the remaining steps' learning rates differ "
                  "from the shorter run's (an extended run is not the same as a run of that length from the start)"),
    "batch_size": dict(default=16, help="global batch size (default: 16)"),
    "lr": dict(default=3e-3, help="peak learning rate (default: 3e-3)"),
    "warmup_steps": dict(default=None, help="default: 10%% of the steps, at most 100; a resumed run keeps its own"),
    "seed": dict(default=0, help="seeds the initialisation and the data (default: 0)"),
    "eval_every": dict(default=None, help="evaluate every N steps (and at the end)"),
    "eval_batches": dict(default=2, help="batches per evaluation (default: 2)"),
    "save_every": dict(default=None, help="checkpoint every K steps"),
    "device": dict(default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)"),
    "parallel": dict(default="ddp", help="under torchrun: ddp (a model copy per process) or fsdp (sharded weights "
                     "and optimizer state, for models too big for one GPU); default: ddp"),
    "acp_log_tolerance": dict(default=None, metavar="LOG_EPS",
                              help="adaptive computation pruning: skip the attention scores the forget gates have "
                                   "decayed below e^LOG_EPS of a query's weight, e.g. -10 (default: off)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="foxlab", description="Train and study small Forgetting Transformers.")
    sub = parser.add_subparsers(dest="command", metavar="{train,demo}", parser_class=_Parser)

    t = sub.add_parser("train", help="train a model on a task", description="Train a FoX model on a task.")
    for name, options in TRAIN_FLAGS.items():
        t.add_argument("--" + name.replace("_", "-"), type=_setting(TRAIN_SETTINGS, name), **options)
    t.add_argument("--override", action="append", type=_override, default=[], metavar="KEY=VALUE",
                   help="model setting, e.g. num_hidden_layers=3 or fgate_init_timescales=[1,64] (repeatable; "
                        "values are JSON)")
    t.add_argument("--text-file", default=None, help="for --task text: the text file (default: Python's stdlib)")
    t.add_argument("--out", required=True, help="run folder: metrics.json and checkpoint/")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in OUT/checkpoint, with the same settings (--steps may grow)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--cuda-graph", action="store_true",
                   help="replay each training step as one CUDA graph (one GPU): faster when the host holds the "
                        "GPU back, as with small models on fast GPUs")

    d = sub.add_parser("demo", help="train tiny FoX on segments and report how it forgets at resets",
                       description="Train tiny FoX on the segments task and report how it forgets at resets.")
    d.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    d.add_argument("--steps", type=_setting(DEMO_SETTINGS, "steps"), default=None,
                   help="override the demo's number of steps")
    d.add_argument("--seed", type=_setting(DEMO_SETTINGS, "seed"), default=0)
    d.add_argument("--device", type=_setting(DEMO_SETTINGS, "device"), default=None)
    d.add_argument("--resume", action="store_true", help="finish an interrupted demo in OUT")
    d.add_argument("--no-progress", action="store_true")
    return parser


def _writable_dir(path: str) -> Path:
    """``path``, once it is known that the run can create or write it (nothing is created: a bad invocation
    leaves no folder behind)."""
    out = Path(path)
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"cannot write to {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write to {path}: {existing} is not writable")
    return out


def _check_resume(out: str) -> None:
    if find_checkpoint(out) is None:
        raise UsageError(f"--resume: no checkpoint to resume from: {why_no_checkpoint(out)}")


def _check_train_args(args) -> None:
    if args.text_file is not None and args.task != "text":
        raise UsageError("--text-file is only for --task text")
    if args.text_file is not None and not Path(args.text_file).is_file():
        raise UsageError(f"text file not found: {args.text_file}")
    try:
        check_names((key for key, _ in args.override), SETTINGS)
        ForgettingTransformerConfig.from_preset(args.preset, **dict(args.override))
    except SettingError as e:
        raise UsageError(f"--override: {e}") from None
    if args.resume:
        _check_resume(args.out)
    _writable_dir(args.out)


def _flag(name: str) -> str | None:
    """The flag that sets train()'s setting ``name`` (as SettingError and ResumeMismatch name it), if any."""
    if name in TRAIN_FLAGS:
        return "--" + name.replace("_", "-")
    return {"task_kwargs['path']": "--text-file", "overrides": "--override", "cuda_graph": "--cuda-graph"}.get(name)


def _as_flags(name: str, value) -> str:
    """The command-line words that give setting ``name`` (as ResumeMismatch names it) the value ``value``."""
    if name.startswith("overrides["):
        key = name[len("overrides['"):-len("']")]
        return f"no --override {key}" if value is UNSET else f"--override {key}={json.dumps(value)}"
    flag = _flag(name)
    if flag is None:
        return f"{name}={value!r} (set from Python: no flag)"
    return f"no {flag}" if value in (None, UNSET) else f"{flag} {value}"


def _resume_mismatch(e: ResumeMismatch) -> str:
    listed = "; ".join(f"{_as_flags(name, now)} here, {_as_flags(name, old)} in that run"
                       for name, now, old in e.differences)
    fixes = " ".join(_as_flags(name, old) for name, _, old in e.differences)
    return (f"--resume: the settings differ from the run in {e.checkpoint}: {listed}. To continue that run, "
            f"pass {fixes}; to start a new one, use another --out (or leave out --resume)")


def _train(args) -> int:
    _check_train_args(args)
    from .train import train

    task_kwargs = {"path": args.text_file} if args.text_file else None
    result = train(overrides=dict(args.override), task_kwargs=task_kwargs, out=args.out, resume=args.resume,
                   progress=not args.no_progress, cuda_graph=args.cuda_graph,
                   **{name: getattr(args, name) for name in TRAIN_FLAGS})
    if result.interrupted:  # train() said where the checkpoint is and how to continue
        return 130
    if result.losses and os.environ.get("RANK", "0") == "0":  # under torchrun: once, not once per process
        last = result.evals[-1]["loss"] if result.evals else float("nan")
        print(f"done: {result.step} steps, final loss {result.losses[-1]:.4f}, eval loss {last:.4f}; "
              f"metrics in {Path(args.out) / 'metrics.json'}, checkpoint in {Path(args.out) / 'checkpoint'}")
    return 0


def _demo(args) -> int:
    if args.resume:
        _check_resume(args.out)
    out = _writable_dir(args.out)
    from .train import demo

    m = demo(out, steps=args.steps, seed=args.seed, progress=not args.no_progress, device=args.device,
             resume=args.resume)
    if m.get("interrupted"):  # train() said where the checkpoint is and how to continue
        return 130
    head = m["boundary_forget_head"]
    verdict = "it learned to forget at resets" if m["boundary_forget_ratio"] <= 0.5 else "no clear forgetting yet"
    optimal = f" (optimal {m['optimal_loss']:.3f})" if m.get("optimal_loss") is not None else ""
    print(f"trained tiny FoX on 'segments' for {m['step']} steps in {m['train_time_s']:.0f} s: "
          f"loss {m['final_loss']:.3f}, eval loss {m['eval_loss']:.3f}{optimal}")
    print(f"boundary_forget_ratio {m['boundary_forget_ratio']:.3g} (layer {head['layer']}, head {head['head']}: "
          f"mean f at <reset> / elsewhere): {verdict}")
    print(f"checkpoint: {out / 'checkpoint'}")
    print(f"metrics:    {out / 'metrics.json'}")
    print(f"report:     {out / 'report.html'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a bad argument (already reported in one line)
        return e.code if isinstance(e.code, int) else 2
    if args.command is None:
        print("foxlab: error: name a command, train or demo (foxlab --help says more)", file=sys.stderr)
        return 2
    try:
        return _train(args) if args.command == "train" else _demo(args)
    except ResumeMismatch as e:
        print(f"foxlab {args.command}: error: {_resume_mismatch(e)}", file=sys.stderr)
        return 2
    except UsageError as e:
        print(f"foxlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except SettingError as e:  # a bad setting that train() found (one that depends on others, the task's ...)
        flag = _flag(e.name or "")
        print(f"foxlab {args.command}: error: {flag + ': ' if flag else ''}{e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"foxlab {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print(f"foxlab {args.command}: stopped by Ctrl-C", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
