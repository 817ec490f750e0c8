"""The ``foxlab`` command line.

    python -m foxlab train --preset tiny --task segments --steps 500 --seed 0 --save-every 100 --out runs/a
    python -m foxlab train ... --out runs/a --resume        # continue from runs/a/checkpoint
    python -m foxlab demo [--out runs/demo]                 # tiny FoX learns to forget at <reset> (= make demo)
    torchrun --nproc_per_node 2 -m foxlab train ... [--parallel fsdp]   # on 2 GPUs (README: several machines)

Bad arguments exit with status 2 and one line on stderr; a failure while training exits with 1; Ctrl-C saves a
checkpoint and exits with 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


class UsageError(Exception):
    """A bad argument found after parsing: reported as one line, exit status 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _override(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.replace("-", "_"), value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="foxlab", description="Train and study small Forgetting Transformers.")
    sub = parser.add_subparsers(dest="command", metavar="{train,demo}", parser_class=_Parser)

    t = sub.add_parser("train", help="train a model on a task", description="Train a FoX model on a task.")
    t.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    t.add_argument("--override", action="append", type=_override, default=[], metavar="KEY=VALUE",
                   help="config override, e.g. num_hidden_layers=3 or fgate_init_timescales=[1,64] (repeatable)")
    t.add_argument("--task", default="segments", help="segments, recall or text (default: segments)")
    t.add_argument("--text-file", default=None, help="for --task text: the text file (default: Python's stdlib)")
    t.add_argument("--seq-len", type=_positive_int, default=None, help="sequence length (default: the task's)")
    t.add_argument("--steps", type=int, required=True, help="total optimizer steps")
    t.add_argument("--batch-size", type=_positive_int, default=16, help="global batch size (default: 16)")
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: 3e-3)")
    t.add_argument("--warmup-steps", type=int, default=None, help="default: 10%% of the steps, at most 100")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-every", type=_positive_int, default=None, help="evaluate every N steps (and at the end)")
    t.add_argument("--eval-batches", type=_positive_int, default=2, help="batches per evaluation (default: 2)")
    t.add_argument("--save-every", type=_positive_int, default=None, help="checkpoint every K steps")
    t.add_argument("--out", required=True, help="run folder: metrics.json and checkpoint/")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    t.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                   help="under torchrun: ddp (a model copy per process) or fsdp (sharded weights and optimizer "
                        "state, for models too big for one GPU); default: ddp")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    d = sub.add_parser("demo", help="train tiny FoX on segments and report how it forgets at resets",
                       description="Train tiny FoX on the segments task and report how it forgets at resets.")
    d.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    d.add_argument("--steps", type=_positive_int, default=None, help="override the demo's number of steps")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default=None)
    d.add_argument("--no-progress", action="store_true")
    return parser


def _writable_dir(path: str) -> Path:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UsageError(f"cannot write to {path}: {e.strerror or e}") from None
    return out


def _check_train_args(args) -> None:
    from .config import PRESETS
    from .data import TASKS

    if args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    if args.task not in TASKS:
        raise UsageError(f"unknown task {args.task!r}; choose one of {', '.join(TASKS)}")
    if args.steps <= 0:
        raise UsageError(f"--steps must be a positive integer, got {args.steps}")
    if args.text_file is not None and args.task != "text":
        raise UsageError("--text-file is only for --task text")
    if args.text_file is not None and not Path(args.text_file).is_file():
        raise UsageError(f"text file not found: {args.text_file}")
    if args.resume:
        from .train import find_checkpoint

        if find_checkpoint(args.out) is None:
            raise UsageError(f"--resume: no checkpoint in {args.out}")
    _writable_dir(args.out)


def _train(args) -> int:
    _check_train_args(args)
    from .train import train

    task_kwargs = {"path": args.text_file} if args.text_file else None
    result = train(preset=args.preset, overrides=dict(args.override), task=args.task, task_kwargs=task_kwargs,
                   seq_len=args.seq_len, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                   warmup_steps=args.warmup_steps, eval_every=args.eval_every, eval_batches=args.eval_batches,
                   save_every=args.save_every,
                   out=args.out, resume=args.resume, seed=args.seed, device=args.device, parallel=args.parallel,
                   progress=not args.no_progress)
    if result.interrupted:
        print(f"interrupted at step {result.step}/{args.steps}; checkpoint in {Path(args.out) / 'checkpoint'}; "
              "continue with --resume", file=sys.stderr)
        return 130
    if result.losses and os.environ.get("RANK", "0") == "0":  # under torchrun: once, not once per process
        last = result.evals[-1]["loss"] if result.evals else float("nan")
        print(f"done: {result.step} steps, final loss {result.losses[-1]:.4f}, eval loss {last:.4f}; "
              f"metrics in {Path(args.out) / 'metrics.json'}, checkpoint in {Path(args.out) / 'checkpoint'}")
    return 0


def _demo(args) -> int:
    out = _writable_dir(args.out)
    from .train import demo

    m = demo(out, steps=args.steps, seed=args.seed, progress=not args.no_progress, device=args.device)
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
        parser.print_help(sys.stderr)
        return 2
    try:
        return _train(args) if args.command == "train" else _demo(args)
    except UsageError as e:
        print(f"foxlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"foxlab {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"foxlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
