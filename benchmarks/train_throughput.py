"""Training throughput of foxlab's trainer (tokens/s), on one GPU or several under torchrun.

    python benchmarks/train_throughput.py --preset fox-360m --batch-size 8                      # one GPU
    torchrun --nproc_per_node 2 benchmarks/train_throughput.py --preset fox-360m --batch-size 16 [--parallel fsdp]

Runs ``foxlab.train.train`` as the command line does (bf16 autocast, AdamW, gradient clipping, fp32 weights) on
the ``text`` task, whose batches cost a few milliseconds to make, and times the steps after ``--warmup`` (the
first ones compile the Triton kernels and fill the allocator). ``--batch-size`` is the global batch, split over
the processes. Rank 0 prints one JSON line (tokens/s, ms per step, peak memory of its GPU, the losses) and
appends it to ``--json``. With the same global batch, runs on any number of GPUs follow the same losses.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from foxlab.train import train


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="fox-360m")
    p.add_argument("--batch-size", type=int, default=8, help="global batch (default: 8)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--warmup", type=int, default=8, help="untimed first steps (default: 8)")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default=None, help="default: cuda (cpu: a smoke run of this script)")
    p.add_argument("--json", default=None, help="append the result line to this file")
    args = p.parse_args(argv)
    if not 0 < args.warmup < args.steps:
        p.error(f"--warmup must be between 1 and --steps - 1, got {args.warmup}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    stamps = []  # wall time after each step (the loss is read back every step, so the GPU has finished it)
    result = train(preset=args.preset, task="text", seq_len=args.seq_len, steps=args.steps,
                   batch_size=args.batch_size, lr=args.lr, eval_batches=1, parallel=args.parallel, device=args.device,
                   progress=False, callback=lambda step, loss: stamps.append(time.perf_counter()))
    timed = args.steps - args.warmup
    seconds = stamps[-1] - stamps[args.warmup - 1]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    on_gpu = torch.cuda.is_available() and not str(args.device or "cuda").startswith("cpu")
    line = {"preset": args.preset, "gpus": world, "parallel": args.parallel if world > 1 else "none",
            "batch_size": args.batch_size, "seq_len": args.seq_len, "timed_steps": timed,
            "ms_per_step": round(1e3 * seconds / timed, 2),
            "tokens_per_s": round(timed * args.batch_size * args.seq_len / seconds),
            "peak_gib_rank0": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
            "device": torch.cuda.get_device_name() if on_gpu else "cpu", "torch": torch.__version__,
            "losses": result.losses}
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(line))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(line) + "\n")
    return line


if __name__ == "__main__":
    main()
