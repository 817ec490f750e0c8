"""Run by tests/test_train.py under ``torchrun --nproc_per_node 2`` (CPU, gloo): every multi-process run the tests
check, in one launch (starting the processes costs more than the runs).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_runs.py FOLDER RUN_JSON

RUN_JSON: train()'s keyword arguments (tests/test_train.py's RUN). Writes, under FOLDER:
    cli/     the command line with DDP: RUN's whole run
    fsdp/    train(parallel="fsdp"), stopped after step 5 (both processes raise KeyboardInterrupt there)
    resumed/ train(parallel="fsdp") resuming FOLDER/one (a one-process checkpoint the test wrote) to the end
"""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from foxlab.__main__ import main as cli
from foxlab.train import train


def cli_args(run: dict, out: Path) -> list[str]:
    overrides = [arg for k, v in run["overrides"].items() for arg in ("--override", f"{k}={v}")]
    return ["train", *overrides, "--task", run["task"], "--seq-len", str(run["seq_len"]), "--batch-size",
            str(run["batch_size"]), "--steps", str(run["steps"]), "--lr", str(run["lr"]), "--seed", str(run["seed"]),
            "--eval-every", str(run["eval_every"]), "--eval-batches", str(run["eval_batches"]), "--device",
            run["device"], "--out", str(out), "--no-progress"]


def join_group(prefix: str) -> None:
    """The process group for the train() calls after the command line's (which made and destroyed its own). Its
    keys in torchrun's store get their own prefix: a second group under the default keys can find the first
    group's stale addresses there and fail to connect, or hang."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    dist.init_process_group("gloo", store=dist.PrefixStore(prefix, store), rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]))


def stop_after(step_to_stop: int):
    def callback(step, loss):
        if step == step_to_stop:
            raise KeyboardInterrupt
    return callback


if __name__ == "__main__":
    folder, run = Path(sys.argv[1]), json.loads(sys.argv[2])
    if cli(cli_args(run, folder / "cli")) != 0:
        sys.exit("the command line failed")
    join_group("fsdp-runs")  # train() uses it and leaves it
    stopped = train(out=folder / "fsdp", parallel="fsdp", callback=stop_after(5), **run)
    if not (stopped.interrupted and stopped.step == 5):
        sys.exit(f"the FSDP run did not stop at step 5 (step {stopped.step})")
    train(out=folder / "resumed", resume=folder / "one", parallel="fsdp", **run)
    dist.destroy_process_group()
