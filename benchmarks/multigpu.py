"""The trainer on two GPUs, checked and timed in one go (the numbers in BENCHMARKS.md come from this script).

    python benchmarks/multigpu.py OUT            # a machine with 2 GPUs: OUT/multigpu.log and OUT/multigpu.json
    python benchmarks/multigpu.py OUT --smoke    # the same steps on the CPU (gloo), tiny sizes: checks the script

(foxlab installed, or PYTHONPATH=. from the repository's root.)

1. A small model (4 blocks of width 512, the text task, 120 steps, global batch 16 x 512):
   - one GPU, uninterrupted: the reference run;
   - one GPU stopped by SIGINT, then resumed on two GPUs with FSDP (1 -> 2);
   - two GPUs with DDP under torchrun, SIGINT sent to torchrun's process group as Ctrl-C in a terminal does:
     both processes must finish their step, save one checkpoint and exit; then resumed on one GPU (2 -> 1).
   Each run's losses against the reference's, and the FSDP run's checkpoint loaded back on the CPU.
2. fox-360m, 2048-token sequences (benchmarks/train_throughput.py): tokens/s on one GPU (batch 8 and 16) and on
   two (global batch 16, DDP and FSDP), and the largest loss differences between the runs with batch 16.
Single-GPU runs that do not depend on each other run at the same time, one on each GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
SMALL = ["--preset", "tiny", "--override", "hidden_size=512", "--override", "num_hidden_layers=4", "--override",
         "num_heads=8", "--task", "text", "--seq-len", "512", "--batch-size", "16", "--steps", "120", "--lr",
         "1e-3", "--eval-every", "20", "--eval-batches", "1", "--no-progress"]
SMOKE_SMALL = ["--preset", "tiny", "--override", "hidden_size=32", "--override", "num_heads=2", "--task", "text",
               "--seq-len", "64", "--batch-size", "4", "--steps", "200", "--lr", "1e-3", "--eval-every", "20",
               "--eval-batches", "1", "--no-progress", "--device", "cpu"]
STOP_MARK = "step 20: eval loss"  # rank 0 prints it after step 20: the moment to press Ctrl-C


class Runner:
    """Starts commands in their own process groups, logs their output into one file, stops them with SIGINT."""

    def __init__(self, out: Path, runs: Path, smoke: bool):
        self.runs, self.smoke = runs, smoke
        self.timeout = 600 if smoke else 150  # seconds a run may take (a hung run must not eat the GPU time)
        self.log = open(out / "multigpu.log", "a")

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.log.write(text + "\n")
        self.log.flush()

    def start(self, name: str, cmd: list[str], gpus: str) -> dict:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore",
               "OMP_NUM_THREADS": "1" if self.smoke else "4"}
        if not self.smoke:
            env["CUDA_VISIBLE_DEVICES"] = gpus
        output = self.runs / f"{name}.txt"
        sink = open(output, "w")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        self.say(f"== {name} (GPUs {gpus}): {' '.join(cmd)}")
        return {"name": name, "proc": proc, "sink": sink, "output": output, "started": time.perf_counter()}

    def interrupt_at_mark(self, run: dict) -> float | None:
        """SIGINT to the run's process group once its output shows STOP_MARK; the time it was sent."""
        end = time.perf_counter() + self.timeout
        while time.perf_counter() < end and run["proc"].poll() is None:
            if STOP_MARK in run["output"].read_text():
                os.killpg(run["proc"].pid, signal.SIGINT)
                return time.perf_counter()
            time.sleep(0.02)
        return None

    def wait(self, run: dict) -> dict:
        try:
            run["proc"].wait(max(1.0, run["started"] + self.timeout - time.perf_counter()))
        except subprocess.TimeoutExpired:
            os.killpg(run["proc"].pid, signal.SIGKILL)
            run["proc"].wait()
        run["rc"], run["seconds"] = run["proc"].returncode, time.perf_counter() - run["started"]
        run["sink"].close()
        text = run["output"].read_text()
        self.say(f"== {run['name']}: exit {run['rc']} after {run['seconds']:.1f} s\n{text.rstrip()}\n")
        run["text"] = text
        return run


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def max_diff(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        raise ValueError(f"runs of different lengths: {len(a)} and {len(b)}")
    return max(abs(x - y) for x, y in zip(a, b))


def eval_losses(m: dict) -> list[float]:
    return [e["loss"] for e in m["evals"]]


def small_runs(r: Runner, runs: Path, res: dict) -> None:
    """Section 1 of the module docstring; fills ``res`` as it goes (what was measured stays if a step fails)."""
    small = SMOKE_SMALL if r.smoke else SMALL
    cli = [sys.executable, "-m", "foxlab", "train", *small]
    one = r.start("one_gpu", [*cli, "--out", str(runs / "one")], "0")
    stopped = r.start("one_gpu_ctrl_c", [*cli, "--out", str(runs / "one_stopped")], "1")
    r.interrupt_at_mark(stopped)
    r.wait(one)
    r.wait(stopped)
    reference = metrics(runs / "one")
    k1 = metrics(runs / "one_stopped")["step"]
    res.update({"reference_final_loss": reference["losses"][-1], "one_gpu_exit": one["rc"],
                "one_gpu_ctrl_c": {"exit": stopped["rc"], "stopped_at": k1}})

    ddp = r.start("two_gpu_ddp_ctrl_c", [*TORCHRUN, "-m", "foxlab", "train", *small, "--out", str(runs / "two")],
                  "0,1")
    sent = r.interrupt_at_mark(ddp)
    r.wait(ddp)
    info = json.loads((runs / "two" / "checkpoint" / "trainer_state.json").read_text())
    two_stopped = metrics(runs / "two")
    # The command line's last words, one line from each process: "interrupted at step N/STEPS; ..."
    reports = [line for line in ddp["text"].splitlines() if re.match(r"interrupted at step \d+/\d+;", line)]
    res["two_gpu_ddp_ctrl_c"] = {
        "torchrun_exit": ddp["rc"], "checkpoint_step": info["step"], "worker_reports": reports,
        "both_workers_stopped_at_checkpoint_step": len(reports) == 2 and all(
            line.startswith(f"interrupted at step {info['step']}/") for line in reports),
        "killed_by_torchrun": "forcefully exiting" in ddp["text"],
        "seconds_from_sigint_to_exit": None if sent is None else round(ddp["started"] + ddp["seconds"] - sent, 2),
        "max_loss_diff_vs_one_gpu_before_stop": max_diff(two_stopped["losses"], reference["losses"][:info["step"]])}

    back = r.start("resume_two_on_one", [*cli, "--out", str(runs / "two"), "--resume"], "0")
    r.wait(back)
    resumed = metrics(runs / "two")
    res["resume_2_to_1"] = {
        "exit": back["rc"], "from_step": info["step"], "steps": len(resumed["losses"]),
        "kept_losses_before_resume": resumed["losses"][:info["step"]] == two_stopped["losses"],
        "max_loss_diff_vs_one_gpu": max_diff(resumed["losses"], reference["losses"]),
        "max_eval_diff_vs_one_gpu": max_diff(eval_losses(resumed), eval_losses(reference))}

    fsdp = r.start("resume_one_on_two_fsdp", [*TORCHRUN, "-m", "foxlab", "train", *small, "--parallel", "fsdp",
                                              "--out", str(runs / "one_stopped"), "--resume"], "0,1")
    r.wait(fsdp)
    resumed = metrics(runs / "one_stopped")
    res["resume_1_to_2_fsdp"] = {
        "exit": fsdp["rc"], "from_step": k1, "steps": len(resumed["losses"]),
        "losses_before_resume_equal_reference": resumed["losses"][:k1] == reference["losses"][:k1],
        "max_loss_diff_vs_one_gpu": max_diff(resumed["losses"], reference["losses"]),
        "max_eval_diff_vs_one_gpu": max_diff(eval_losses(resumed), eval_losses(reference))}
    res["fsdp_checkpoint"] = checkpoint_check(runs / "one_stopped", runs / "one")


def checkpoint_check(fsdp_run: Path, reference_run: Path) -> dict:
    """The FSDP run's checkpoint loads with AutoModelForCausalLM on the CPU; its weights against the reference's."""
    import torch
    from transformers import AutoModelForCausalLM

    import foxlab  # noqa: F401  (registers the Auto classes)

    model = AutoModelForCausalLM.from_pretrained(fsdp_run / "checkpoint")
    reference = AutoModelForCausalLM.from_pretrained(reference_run / "checkpoint").state_dict()
    config = json.loads((fsdp_run / "checkpoint" / "config.json").read_text())
    return {"architectures": config["architectures"], "parameters": sum(p.numel() for p in model.parameters()),
            "max_weight_diff_vs_one_gpu": max(float((p - reference[n]).abs().max())
                                              for n, p in model.state_dict().items()),
            "weights_finite": all(bool(torch.isfinite(p).all()) for p in model.parameters())}


def throughput_runs(r: Runner, runs: Path, res: dict) -> None:
    """Section 2 of the module docstring."""
    results = runs / "throughput.jsonl"
    results.unlink(missing_ok=True)
    script = [str(ROOT / "benchmarks" / "train_throughput.py"), "--json", str(results)]
    if r.smoke:
        script += ["--preset", "tiny", "--seq-len", "64", "--steps", "6", "--warmup", "2", "--device", "cpu"]
    one16 = r.start("fox360m_1gpu_b16", [sys.executable, *script, "--batch-size", "16"], "0")
    one8 = r.start("fox360m_1gpu_b8", [sys.executable, *script, "--batch-size", "8"], "1")
    r.wait(one16)
    r.wait(one8)
    for mode in ("ddp", "fsdp"):
        r.wait(r.start(f"fox360m_2gpu_{mode}", [*TORCHRUN, *script, "--batch-size", "16", "--parallel", mode], "0,1"))
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    by = {(line["gpus"], line["batch_size"], line["parallel"]): line for line in lines}
    one16, one8 = by[(1, 16, "none")], by[(1, 8, "none")]
    ddp, fsdp = by[(2, 16, "ddp")], by[(2, 16, "fsdp")]
    res.update({"runs": [{k: v for k, v in line.items() if k != "losses"} for line in lines],
            "ddp_speedup_same_global_batch": round(ddp["tokens_per_s"] / one16["tokens_per_s"], 3),
            "ddp_speedup_same_per_gpu_batch": round(ddp["tokens_per_s"] / one8["tokens_per_s"], 3),
            "fsdp_speedup_same_per_gpu_batch": round(fsdp["tokens_per_s"] / one8["tokens_per_s"], 3),
            "max_loss_diff_ddp_vs_one_gpu": max_diff(ddp["losses"], one16["losses"]),
            "max_loss_diff_fsdp_vs_ddp": max_diff(fsdp["losses"], ddp["losses"]),
            "final_loss_one_gpu": one16["losses"][-1]})


def versions() -> dict:
    import torch
    import transformers

    found = {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0],
             "date": time.strftime("%Y-%m-%d"), "gpus": [torch.cuda.get_device_name(i)
                                                          for i in range(torch.cuda.device_count())],
             "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                    "NVSHMEM_DISABLE_NVLS")}}
    try:
        import triton

        found["triton"] = triton.__version__
        found["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True).stdout.split()[:1]
        found["topology"] = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True).stdout
        usage = subprocess.run([*TORCHRUN[:3], "--help"], capture_output=True, text=True).stdout
        found["torchrun_shutdown_timeout_option"] = "--shutdown-timeout" in usage
    except (ImportError, OSError):
        pass
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder for multigpu.log and multigpu.json")
    p.add_argument("--runs", default=None, help="folder for the runs' checkpoints (default: OUT/runs)")
    p.add_argument("--smoke", action="store_true", help="on the CPU with tiny sizes, to check this script")
    p.add_argument("--only", choices=("small", "throughput"), default=None)
    args = p.parse_args()
    out = Path(args.out)
    runs = Path(args.runs) if args.runs else out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    r = Runner(out, runs, args.smoke)
    results = {"versions": versions()}
    sections = {"small": small_runs, "throughput": throughput_runs}
    for name, run in sections.items():
        if args.only in (None, name):
            started = time.perf_counter()
            results[name] = {}
            try:
                run(r, runs, results[name])
            except Exception as e:  # keep what was measured, and go on with the other section
                results[name]["error"] = f"{type(e).__name__}: {e}"
            results[name + "_seconds"] = round(time.perf_counter() - started, 1)
            (out / "multigpu.json").write_text(json.dumps(results, indent=1))
    r.say(json.dumps({k: v for k, v in results.items() if k != "versions"}, indent=1))


if __name__ == "__main__":
    main()
