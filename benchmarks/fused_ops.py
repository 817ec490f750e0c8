"""The fused training ops, one at a time: foxlab's Triton kernels against eager PyTorch, torch.compile and
Liger Kernel (when installed), forward + backward, at the fox-125m training shapes.

    python benchmarks/fused_ops.py                  # 8 x 2048 tokens, hidden 768, vocab 50304 (bf16 autocast)
    python benchmarks/fused_ops.py --json ops.json  # keep every number
    python benchmarks/fused_ops.py --device cpu --tokens 256   # a smoke run of the script itself
    python benchmarks/fused_ops.py --tokens 64 --timing host --no-compile   # host time per call (tiny tensors)

Each row times one forward and backward (torch.autograd.grad against a fixed random cotangent) with
triton.testing.do_bench (median ms launched from Python, host overhead included: "ms") and replayed from a CUDA
graph (GPU time only: "gpu_ms"), and reports the peak memory the call allocates beyond its inputs. ``--timing host``
runs 200 calls back to back and divides by 200 ("host_us"): with tiny tensors the GPU keeps up, so this is the
host's cost of one forward + backward (Python, autograd, launches) that a training step pays per call.
torch.compile rows also report their compile time (default mode, one shape) as first_call_s.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from foxlab import fused, fused_inputs  # noqa: E402

try:
    from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    LIGER_VERSION = importlib.metadata.version("liger-kernel")
except ImportError:
    LIGER_VERSION = None

EPS = 1e-6


def host_us(fn, device, calls=200) -> float:
    """Microseconds per call of fn run back to back (host-bound with tiny tensors)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def time_ms(fn, device, graph=False) -> float:
    """Median ms of fn launched from Python (host overhead included), or replayed from a CUDA graph (GPU only)."""
    if device.type == "cuda":
        from triton.testing import do_bench, do_bench_cudagraph
        if graph:
            return do_bench_cudagraph(fn, rep=40, return_mode="median")
        return do_bench(fn, warmup=10, rep=40, return_mode="median")
    fn()
    start = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - start) / 3 * 1e3


def fwd_bwd(fn, inputs, autocast):
    """A closure running fn(*inputs) and its backward to every input that requires grad."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    with autocast():
        out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    cotangents = [torch.randn_like(o) for o in outs]

    def run():
        with autocast():
            out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.grad(outs, leaves, cotangents)
    return run


def measure(name, impl, fn, inputs, autocast, device, results, timings=("eager",)):
    row = dict(op=name, impl=impl)
    try:
        start = time.perf_counter()
        run = fwd_bwd(fn, inputs, autocast)  # the first call compiles (Triton JIT, torch.compile)
        run()
        row["first_call_s"] = round(time.perf_counter() - start, 2)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            run()
            torch.cuda.synchronize()
            row["peak_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        for timing in timings:
            if timing == "host":
                row["host_us"] = round(host_us(run, device), 1)
            else:
                row["gpu_ms" if timing == "graph" else "ms"] = round(time_ms(run, device, graph=timing == "graph"), 4)
    except Exception as exc:  # a row that fails is recorded, the others still run
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    print(json.dumps(row), flush=True)
    results.append(row)


def leaf(shape, device, dtype, scale=1.0):
    return (torch.randn(shape, device=device, dtype=dtype) * scale).requires_grad_()


def op_cases(tokens, hidden, inter, heads, head_dim, vocab, device, chunks):
    """(op name, {impl: fn}, inputs) at the model's shapes. bf16 where the model has bf16 (matmul outputs), float32
    for the residual stream and the weights."""
    bf16 = torch.bfloat16 if device.type == "cuda" else torch.float32
    w = (1 + 0.1 * torch.randn(hidden, device=device)).requires_grad_()
    wd = (1 + 0.1 * torch.randn(heads, head_dim, device=device)).requires_grad_()  # per-head weights
    wk = (1 + 0.1 * torch.randn(heads, head_dim, device=device)).requires_grad_()
    x, h = leaf((tokens, hidden), device, torch.float32), leaf((tokens, hidden), device, bf16)
    g, u = leaf((tokens, inter), device, bf16), leaf((tokens, inter), device, bf16)
    per_head = leaf((tokens, heads, head_dim), device, bf16)
    gate = leaf((tokens, heads, head_dim), device, bf16)
    shift_q, shift_x = (leaf((8, tokens // 8, heads, head_dim), device, bf16) for _ in range(2))
    shift_a = leaf((8, tokens // 8, heads), device, bf16)
    shift_v, shift_av = leaf(shift_x.shape, device, bf16), leaf(shift_a.shape, device, bf16)
    lm_w, final = leaf((vocab, hidden), device, torch.float32, 0.02), leaf((tokens, hidden), device, bf16)
    targets = torch.randint(0, vocab, (tokens,), device=device)

    def plain_norm(x, w):
        return F.rms_norm(x, (x.shape[-1],), w, EPS).to(bf16)

    def plain_add_norm(h, x, w):
        s = x + h
        return F.rms_norm(s, (s.shape[-1],), w, EPS).to(bf16), s

    def plain_head_norm(t, w):  # the model's HeadRMSNorm
        return F.rms_norm(t, (t.shape[-1],), eps=EPS) * w

    def plain_gate_norm(o, g, w):
        return plain_head_norm(o, w) * torch.sigmoid(g)

    def plain_shift(x, a):
        before = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        a = torch.sigmoid(a)[..., None]
        return a * before + (1 - a) * x

    def plain_ce(hid, weight, t):
        return F.cross_entropy(F.linear(hid, weight).float(), t)

    def ours_ce(chunk):
        return lambda hid, weight, t: fused.linear_cross_entropy(hid, weight, t, chunk_size=chunk)

    norm, add_norm = "rmsnorm (T, 768) fp32 -> bf16", "add + rmsnorm (bf16 branch, fp32 stream)"
    glu = "swiglu (T, 2048) bf16"
    head_norm, gate_norm = "per-head rmsnorm (T, 12, 64) bf16", "output norm + gate (T, 12, 64) bf16"
    inputs_step = "attention inputs: k, v kv-shift + q, k per-head rmsnorm (3 x (8, T/8, 12, 64)) bf16"
    shift, ce = "kv-shift (8, T/8, 12, 64) bf16", f"lm head + cross-entropy (T, 768) x {vocab}"
    impls = {
        norm: {"eager": plain_norm, "ours": lambda x, w: fused.rms_norm(x, w, EPS, out_dtype=bf16)},
        add_norm: {"eager": plain_add_norm,
                   "ours": lambda h, x, w: fused.rms_norm(h, w, EPS, residual=x, out_dtype=bf16)},
        glu: {"eager": lambda g, u: F.silu(g) * u, "ours": fused.swiglu},
        head_norm: {"eager": plain_head_norm, "ours": lambda t, w: fused.rms_norm(t, w, EPS)},
        gate_norm: {"eager": plain_gate_norm, "ours": lambda o, g, w: fused.rms_norm(o, w, EPS, gate=g)},
        shift: {"eager": plain_shift, "ours": lambda x, a: fused_inputs.token_shift(x, None, a)},
        inputs_step: {"eager": lambda q, k, v, ak, av, wq, wk: (plain_head_norm(q, wq),
                                                                 plain_head_norm(plain_shift(k, ak), wk),
                                                                 plain_shift(v, av)),
                      "ours, four calls": lambda q, k, v, ak, av, wq, wk: (
                          fused.rms_norm(q, wq, EPS), fused.rms_norm(fused_inputs.token_shift(k, None, ak), wk, EPS),
                          fused_inputs.token_shift(v, None, av)),
                      "ours, one launch": lambda q, k, v, ak, av, wq, wk: fused_inputs.attention_inputs(
                          q, k, v, q_weight=wq, k_weight=wk, eps=EPS, k_shift_logits=ak, v_shift_logits=av)},
        ce: {"eager": plain_ce, **{f"ours chunk {c}": ours_ce(c) for c in chunks}},
    }
    if LIGER_VERSION is not None:  # Liger's own dtype handling: norms return the input's dtype
        liger_ce = LigerFusedLinearCrossEntropyLoss()
        impls[norm]["liger"] = lambda x, w: LigerRMSNormFunction.apply(x, w, EPS)
        impls[add_norm]["liger"] = lambda h, x, w: LigerFusedAddRMSNormFunction.apply(h.float(), x, w, EPS)
        impls[glu]["liger"] = LigerSiLUMulFunction.apply
        impls[ce]["liger"] = lambda hid, weight, t: liger_ce(weight.to(hid.dtype), hid, t)
    inputs = {norm: (x, w), add_norm: (h, x, w), glu: (g, u), head_norm: (per_head, wd),
              gate_norm: (per_head, gate, wd), shift: (shift_x, shift_a),
              inputs_step: (shift_q, shift_x, shift_v, shift_a, shift_av, wd, wk), ce: (final, lm_w, targets)}
    cases = [(name, impls[name], inputs[name]) for name in impls]
    return cases


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8 * 2048)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--timing", nargs="+", choices=("eager", "graph", "host"), default=["eager", "graph"],
                        help="eager: launched from Python (ms); graph: replayed from a CUDA graph, GPU time (gpu_ms); "
                             "host: calls back to back, us per call (host_us; use tiny --tokens)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    # bf16 autocast as in training; the CPU smoke run stays in float32
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    results = []
    print(f"torch {torch.__version__}, liger-kernel {LIGER_VERSION}, device "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}", flush=True)
    for name, impls, inputs in op_cases(args.tokens, 768, 2048, 12, 64, args.vocab, device, args.chunks):
        for impl, fn in impls.items():
            measure(name, impl, fn, inputs, autocast, device, results, args.timing)
        if not args.no_compile:
            torch._dynamo.reset()
            measure(name, "torch.compile", torch.compile(impls["eager"]), inputs, autocast, device, results,
                    args.timing)
    if args.json:
        args.json.write_text(json.dumps(dict(device=str(device), torch=torch.__version__, liger=LIGER_VERSION,
                                             tokens=args.tokens, results=results), indent=1))


if __name__ == "__main__":
    main()
