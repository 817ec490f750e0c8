"""Compile a blocked attention kernel for Hopper (sm_90) on the CPU and count what it became: registers, spills
(stack bytes), shared memory and the SASS instruction mix. No GPU needed; the Triton wheel ships ptxas, cuobjdump and nvdisasm.

    python benchmarks/sass.py                                  # the forward, head dim 128, 64 x 64 tiles, TMA and not
    python benchmarks/sass.py --kernel dq --head-dim 64 --tile 64,64,4,3
    python benchmarks/sass.py --kernel dkdv --tile 32,64,4,3   # dK/dV (pointer loads only)
    PYTHONPATH=/path/to/triton-3.6 python benchmarks/sass.py   # as another Triton compiles it (the device's, say)

The arguments get the attributes a real launch infers (pointers and strides divisible by 16), or the loads would
not vectorize and the counts would describe another kernel (benchmarks/NOTES.md, "CPU-side compile checks").
Two kernels that compile to the same SASS run at the same speed: a timing difference between them is outside them.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from foxlab.kernels import blocked  # noqa: E402

KERNELS = {"fwd": blocked._fwd_kernel, "dq": blocked._bwd_dq_kernel, "dkdv": blocked._bwd_dkdv_kernel}
# The flag whose two settings `main` compares (the dK/dV kernel has none: it is compiled once).
VARIANT = {"fwd": "TMA", "dq": "TMA", "dkdv": None}
FLOAT_POINTERS = {"C", "KEY_LO", "QUERY_HI", "DELTA", "BOUNDS", "LSE", "W_OUT", "GATE", "Y", "RSTD_OUT", "THRESHOLD",
                  "DC_ROW", "DC_COL"}
TILE_POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
WATCHED = ("UTMALDG", "UTMASTG", "UTMAREDG", "LDGSTS", "LDG", "STG", "REDG", "HGMMA", "MUFU", "SYNCS", "USETMAXREG")


def signature(kernel: str, head_dim: int, tile: tuple[int, int], variant: bool) -> tuple[dict, dict, dict]:
    """(types, constexprs, attributes) of a bf16, causal, unpadded, unpruned launch of ``kernel``."""
    fn = KERNELS[kernel]
    block_m, block_n = tile
    described = {"fwd": {"Q": block_m, "K": block_n, "V": block_n}, "dq": {"K": block_n, "V": block_n}, "dkdv": {}}
    rows = described[kernel] if variant else {}
    constexprs = dict(GROUP=1, HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, MASK_LO=False,
                      PRUNE=False, DOT_PRECISION="tf32", OUT_NORM=False, OUT_GATE=False, EVEN_M=True, TMA=variant)
    types, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if i in fn.constexprs:
            types[name] = "constexpr"
        elif name in rows:
            types[name] = f"tensordesc<bf16[{rows[name]}, {head_dim}]>"
        elif name in TILE_POINTERS or name in FLOAT_POINTERS:
            types[name] = "*bf16" if name in TILE_POINTERS else "*fp32"
        else:
            types[name] = "fp32" if name in ("qk_scale", "sm_scale", "out_eps") else "i32"
        if types[name].startswith("*") or (name.startswith("stride_") and not name.startswith("stride_lo")):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return types, {k: v for k, v in constexprs.items() if k in fn.arg_names}, attrs


def inspect_kernel(kernel: str, head_dim: int, tile, warps: int, stages: int, variant: bool) -> dict:
    """Registers, stack bytes, shared memory, and the SASS mix of ``kernel`` ("fwd", "dq", "dkdv"), its VARIANT
    flag set to ``variant``."""
    types, constexprs, attrs = signature(kernel, head_dim, tile, variant)
    compiled = triton.compile(ASTSource(KERNELS[kernel], types, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=warps, num_stages=stages, enable_fp_fusion=True))
    return resources(compiled)


def inspect_warp_specialized(head_dim: int, backward: bool = False) -> dict:
    """`inspect_kernel` for hopper.py's warp-specialized forward or hopper_backward.py's backward (Gluon; their tiles
    are fixed), bf16, one kv head per query head."""
    import torch
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from foxlab.kernels import hopper, hopper_backward

    x, vec = torch.zeros(2, 256, 2, head_dim, dtype=torch.bfloat16), torch.zeros(2, 2, 256)
    if backward:
        fn, rows, keys = hopper_backward._bwd_kernel, hopper_backward.BLOCK_M, hopper_backward.BLOCK_N
        descs = dict(q_desc=(x, rows), do_desc=(x, rows), k_desc=(x, keys), v_desc=(x, keys), lse_desc=(vec, rows),
                     delta_desc=(vec, rows), c_desc=(vec, rows), dq_desc=(x.float(), rows, head_dim // 2))
    else:
        fn, rows, keys = hopper._fwd_kernel, hopper.BLOCK_M, hopper.BLOCK_N
        descs = dict(q_desc=(x, rows), k_desc=(x, keys), v_desc=(x, keys), c_desc=(vec, keys), o_desc=(x, rows))
    descs = {name: hopper._descriptor(*args) for name, args in descs.items()}
    types = {name: "constexpr" if i in fn.constexprs else mangle_type(descs[name]) if name in descs
             else "*bf16" if name in ("O", "DK", "DV") else "*fp32" if name in FLOAT_POINTERS
             else "*i32" if name == "NEXT_TILE"
             else "fp32" if name.endswith("_scale") else "i32" for i, name in enumerate(fn.arg_names)}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if types[name].startswith("*")}
    source = GluonASTSource(fn, types, dict(GROUP=1, HEAD_DIM=head_dim), attrs)
    return resources(triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, maxnreg=168)))


def resources(compiled) -> dict:
    """Registers, stack bytes, shared memory and the SASS mix of a kernel compiled for sm_90."""
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        Path(cubin).write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([tools / "cuobjdump", "-res-usage", cubin], capture_output=True, text=True).stdout
        sass = subprocess.run([tools / "nvdisasm", "-c", cubin], capture_output=True, text=True).stdout
    ops = Counter(m.group(1).split(".")[0] for m in re.finditer(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass))
    field = lambda key: int(re.search(rf"{key}:(\d+)", usage).group(1))  # noqa: E731
    return dict(registers=field("REG"), stack=field("STACK"), shared_kib=round(compiled.metadata.shared / 1024, 1),
                instructions=sum(ops.values()),
                **{op: ops[op] for op in WATCHED})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", choices=list(KERNELS), default="fwd")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--tile", default="64,64,4,3", help="block_m,block_n,warps,stages")
    args = parser.parse_args(argv)
    block_m, block_n, warps, stages = (int(x) for x in args.tile.split(","))
    print(f"triton {triton.__version__}, {args.kernel}, head dim {args.head_dim}, tile {args.tile}, bf16, sm_90")
    for variant in (False, True) if VARIANT[args.kernel] else (False,):
        row = inspect_kernel(args.kernel, args.head_dim, (block_m, block_n), warps, stages, variant)
        label = f"{VARIANT[args.kernel]}={variant!s:5} " if VARIANT[args.kernel] else ""
        print(f"  {label}" + ", ".join(f"{k} {v}" for k, v in row.items()))


if __name__ == "__main__":
    main()
