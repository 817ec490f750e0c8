"""GPU time of each blocked kernel (forward, dK/dV, dQ), exact vs ACP, under launch-configuration variants.

    python benchmarks/kernel_times.py                         # the default shapes and variants
    python benchmarks/kernel_times.py --shapes 8,2048,32,64 --caps none,168

One row per (shape, kernel, register cap): the kernel's mean GPU time (torch.profiler, over --iters forward +
backward passes) without pruning and with adaptive_threshold="auto" while log f = 0, where nothing can be
pruned, and their ratio. This is where the ACP overhead target of BENCHMARKS.md is taken apart kernel by kernel.
A register cap (ptxas -maxnreg) of the pruning variants replaces the default configuration's for that head dim.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from foxlab import kernels  # noqa: E402
from foxlab.attention import forgetting_attention  # noqa: E402

KERNELS = {"fwd": "_fwd_kernel", "dkdv": "_bwd_dkdv_kernel", "dq": "_bwd_dq_kernel"}


def kernel_times(shape, adaptive_threshold, iters: int) -> dict[str, float]:
    """Mean GPU microseconds per call of each blocked kernel, over `iters` forward + backward passes."""
    B, T, H, D = shape
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    log_f = torch.zeros(B, T, H, device="cuda", requires_grad=True)
    do = torch.randn_like(q)

    def step():
        forgetting_attention(q, k, v, log_f, adaptive_threshold=adaptive_threshold, backend="triton").backward(do)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    totals = defaultdict(float)
    for event in prof.events():
        for kind, name in KERNELS.items():
            if event.name.startswith(name):
                totals[kind] += event.device_time
    return {kind: totals[kind] / iters for kind in KERNELS}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="8,2048,32,64;2,8192,16,64;4,4096,16,128",
                        help="B,T,H,D separated by ';'")
    parser.add_argument("--caps", default="default,none,168",
                        help="register caps: 'default' (the configuration table), 'none' or a number")
    parser.add_argument("--kinds", default="fwd,dkdv,dq", help="the kernels a cap applies to")
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    common = kernels.common
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'shape':>20} {'kernel':>5} {'cap':>8} {'exact us':>9} {'ACP us':>9} {'ACP/exact':>9}")
    for text in args.shapes.split(";"):
        shape = tuple(int(x) for x in text.split(","))
        block_d = max(16, 1 << (shape[3] - 1).bit_length())
        for cap in args.caps.split(","):
            common._CONFIG_OVERRIDES.clear()
            if cap != "default":
                for kind in args.kinds.split(","):
                    common._CONFIG_OVERRIDES[kind] = dataclasses.replace(
                        common._GPU_CONFIGS[(kind, block_d)], prune_max_registers=None if cap == "none" else int(cap))
            exact = kernel_times(shape, None, args.iters)
            pruned = kernel_times(shape, "auto", args.iters)
            for kind in KERNELS:
                print(f"{text:>20} {kind:>5} {cap:>8} {exact[kind]:9.1f} {pruned[kind]:9.1f} "
                      f"{pruned[kind] / exact[kind]:9.3f}", flush=True)
    common._CONFIG_OVERRIDES.clear()


if __name__ == "__main__":
    main()
