"""Forgetting-attention speed on one CUDA GPU: foxlab's Triton kernels against the alternatives.

    python benchmarks/attention.py            # five training shapes (those of the ACP paper's table), bf16, causal
    python benchmarks/attention.py --quick    # two small shapes, a smoke test
    python benchmarks/attention.py --tune     # sweep block sizes per kernel and head dim first
    python benchmarks/attention.py --decode-only [--decode-sweep]   # decoding and chunked prefill only

Rows: foxlab (Triton; on Hopper its forward and backward are kernels/hopper.py's and hopper_backward.py's
warp-specialized ones), foxlab with the portable forward kernel instead, and with the portable backward, foxlab
with adaptive computation pruning ("+ ACP": threshold "auto", log eps = -10),
the FoX paper's own kernel with and without its ACP (when a copy of it sits in `.anchors/`, a git-ignored
folder: it is another project's code, benchmarked, never imported by foxlab), torch SDPA with the flash
and cuDNN backends and no gate (the ceiling), torch flex_attention
with a FoX score_mod (forward; its backward is attempted and whatever it does is recorded), the exact
reference (small T only), and fla's parallel_forgetting_attn when importable. Times are medians of
GPU time, replayed from CUDA graphs (triton.testing.do_bench_cudagraph) so that host-side launch cost
stays out; the last column times foxlab and SDPA launched eagerly from Python (do_bench), host
overhead included. TFLOP/s count causal FLOPs as docs/fox.md does: forward = 2 B H T^2 D,
backward = 2.5 x forward. "x SDPA" is the ratio of SDPA's time to this row's, measured in the same run.
Decoding and chunked prefill read a bf16 cache whose gate is stored as prefix sums c (as foxlab's cache keeps
it); "x SDPA time" there is foxlab's time over SDPA's (the target is <= 1.15).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from foxlab import kernels  # noqa: E402
from foxlab.attention import forgetting_attention  # noqa: E402

SHAPES = [(4, 4096, 16, 128), (1, 16384, 16, 128), (8, 2048, 32, 64), (2, 8192, 16, 64), (1, 32768, 16, 64)]
QUICK_SHAPES = [(2, 2048, 16, 128), (4, 2048, 16, 64)]
# --tune: one representative shape per head dim, and candidate (BLOCK_M, BLOCK_N, num_warps, num_stages)
# per kernel that compile for sm_90 without register spills (benchmarks/NOTES.md).
TUNE_SHAPES = {64: (2, 8192, 16, 64), 128: (1, 16384, 16, 128), 256: (2, 4096, 8, 256)}
TUNE_CANDIDATES = {
    ("fwd", 64): [(64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 4, 2), (64, 32, 4, 3), (64, 128, 4, 2), (64, 128, 4, 3),
                  (128, 32, 8, 3), (128, 128, 8, 3), (128, 64, 8, 3)],
    ("fwd", 128): [(64, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4)],
    ("fwd", 256): [(128, 32, 8, 3), (128, 32, 8, 2), (64, 32, 4, 2), (64, 64, 8, 2)],
    ("dkdv", 64): [(64, 64, 4, 3), (32, 64, 4, 3), (64, 64, 4, 2), (32, 64, 4, 4), (64, 128, 8, 3),
                   (32, 128, 8, 3), (16, 64, 4, 3)],
    ("dkdv", 128): [(32, 128, 8, 3), (32, 128, 8, 2), (16, 64, 4, 3), (16, 128, 8, 3), (32, 64, 4, 3), (64, 64, 8, 2)],
    ("dkdv", 256): [(64, 32, 8, 2), (32, 32, 8, 2), (16, 32, 4, 2)],
    ("dq", 64): [(64, 32, 4, 3), (128, 32, 8, 3), (64, 32, 4, 4), (64, 64, 4, 3), (128, 128, 8, 2),
                 (128, 64, 8, 3), (64, 128, 4, 2)],
    ("dq", 128): [(128, 64, 8, 2), (128, 64, 8, 3), (64, 32, 4, 3), (128, 32, 8, 3), (64, 64, 4, 3)],
    ("dq", 256): [(128, 32, 8, 2), (128, 32, 8, 3), (64, 16, 4, 2)],
}


def make_inputs(B, T, H, D, dtype=torch.bfloat16):
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=dtype) for _ in range(3))
    log_f = F.logsigmoid(torch.randn(B, T, H, device="cuda") + 3.0)  # gate logits ~ N(3, 1)
    return q, k, v, log_f


def bench(fn) -> float:
    """Median GPU time (ms) of fn replayed from a CUDA graph: host-side launch cost left out (eager timing, with a
    note, for code that cannot be captured)."""
    try:
        return do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception as e:
        print(f"    (no CUDA graph: {type(e).__name__}: {str(e).splitlines()[0][:100]}; timed eagerly)", flush=True)
        torch.cuda.synchronize()
        return bench_eager(fn)


def bench_eager(fn) -> float:
    """Median time (ms) of fn launched from Python as a user would, host overhead included."""
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def host_overhead_us() -> float:
    """Microseconds of host time per tiny CUDA op (a launch-bound lower bound for eager code)."""
    x = torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(1000):
        x.add_(1)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def peak_mib(fn) -> float:
    """Memory allocated by one call beyond what was already held."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure(attn, leaves, eager=False) -> dict:
    """Forward and forward+backward medians (ms) and peak memory of attn(*leaves) -> (B, T, H, D)."""
    def forward():
        with torch.no_grad():
            attn(*leaves)

    d_out = torch.randn_like(attn(*leaves))

    def step():
        torch.autograd.grad(attn(*leaves), leaves, d_out, allow_unused=True)

    out = {"fwd_ms": bench(forward)}
    try:
        step()
    except Exception as e:  # flex_attention's backward through the captured gate, typically
        out["bwd_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        out["peak_mib"] = peak_mib(forward)
        torch.cuda.empty_cache()
        return out
    out["fwdbwd_ms"] = bench(step)
    out["peak_mib"] = peak_mib(step)
    if eager:
        out["eager_fwd_ms"] = bench_eager(forward)
        out["eager_fwdbwd_ms"] = bench_eager(step)
    return out


def sdpa_flash(q, k, v, log_f):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return o.transpose(1, 2)


def sdpa_head_major(backend_name):
    """SDPA on contiguous (B, H, T, D) inputs, its own layout: the strongest no-gate baseline."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, backend_name)

    def attn(q, k, v, log_f):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return attn


def make_flex(T):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    torch._dynamo.reset()  # a fresh compile per shape: past 8 recompiles dynamo falls back to unfused code
    flex = torch.compile(flex_attention, dynamic=False)
    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, T, T)

    def attn(q, k, v, log_f):
        c = log_f.cumsum(1).transpose(1, 2)  # (B, H, T)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + c[b, h, q_idx] - c[b, h, kv_idx]

        o = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=score_mod, block_mask=block_mask)
        return o.transpose(1, 2)

    return attn


def paper_attention(adaptive_threshold=None):
    """The FoX paper's kernel (github zhixuan-lin/forgetting-transformer, ops/forgetting_attention.py), if a
    copy is in .anchors/; on its own head-major layout (head_first=True)."""
    anchors = Path(__file__).resolve().parents[1] / ".anchors"
    if not (anchors / "paper_forgetting_attention.py").exists():
        return None
    sys.path.insert(0, str(anchors))
    from paper_forgetting_attention import forgetting_attention as paper

    def attn(q, k, v, log_f):
        return paper(q, k, v, log_f, head_first=True, adaptive_threshold=adaptive_threshold)

    return attn


def foxlab_acp(q, k, v, log_f):
    return forgetting_attention(q, k, v, log_f, backend="triton", adaptive_threshold="auto")


@contextlib.contextmanager
def portable(*modules):
    """foxlab with its portable kernels where these Hopper modules' kernels (kernels.blocked.hopper,
    .hopper_backward) would run, for the measurement inside (forward and backward)."""
    modules = [m for m in modules if m is not None]  # None: this Triton has no Gluon
    for module in modules:
        module.enabled = False
    try:
        yield
    finally:
        for module in modules:
            module.enabled = True


def fla_attention():
    try:
        from fla.ops.forgetting_attn import parallel_forgetting_attn
    except ImportError:
        return None
    return lambda q, k, v, log_f: parallel_forgetting_attn(q, k, v, log_f)


def run_shape(shape, with_flex, with_reference, log_f=None) -> list[dict]:
    B, T, H, D = shape
    q, k, v, gates = make_inputs(B, T, H, D)
    log_f = gates if log_f is None else log_f
    leaves = [t.requires_grad_() for t in (q, k, v, log_f)]
    head_major = [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in leaves[:3]]
    head_major.append(log_f.detach().transpose(1, 2).contiguous().requires_grad_())
    foxlab = lambda *a: forgetting_attention(*a, backend="triton")  # noqa: E731
    impls = [("foxlab triton", foxlab, True),
             ("foxlab triton + ACP", foxlab_acp, True),
             ("foxlab triton, portable forward", foxlab, False),
             ("foxlab triton, portable backward", foxlab, False),
             ("SDPA flash (no gate)", sdpa_flash, True)]  # (name, function, also time it eagerly)
    hopper_kernels = {"foxlab triton, portable forward": [kernels.blocked.hopper],
                      "foxlab triton, portable backward": [kernels.blocked.hopper_backward]}
    # The same SDPA on its own contiguous head-major layout, flash and cuDNN: ratios use the fastest SDPA row.
    extra = [("SDPA flash (no gate), (B,H,T,D)", sdpa_head_major("FLASH_ATTENTION")),
             ("SDPA cuDNN (no gate), (B,H,T,D)", sdpa_head_major("CUDNN_ATTENTION"))]
    for name, threshold in (("paper kernel", None), ("paper kernel + ACP", "auto")):
        paper = paper_attention(threshold)
        if paper is not None:
            extra.append((name, paper))
    if with_flex:
        impls.append(("flex_attention", make_flex(T), False))
    if with_reference and B * H * T * T <= 2**30:
        impls.append(("reference", lambda *a: forgetting_attention(*a, backend="reference"), False))
    fla = fla_attention()
    if fla is not None:
        impls.append(("fla parallel_forgetting_attn", fla, False))
    rows = []
    for name, attn, eager, inputs in [(*i, leaves) for i in impls] + [(n, a, n.startswith("paper"), head_major)
                                                                       for n, a in extra]:
        try:
            with portable(*hopper_kernels.get(name, [])):
                result = measure(attn, inputs, eager)
        except Exception as e:
            result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
            torch.cuda.empty_cache()
        rows.append({"shape": shape, "impl": name, **result})
        print(f"  {name}: {result}", flush=True)
    return rows


def demo_gates(checkpoint: Path, B: int, T: int, H: int) -> torch.Tensor | None:
    """Log forget gates (B, T, H) of a trained model: the `make demo` FoX (tiny, 300 steps on the segments task)
    run on segments sequences of length T; its 2 layers x 4 heads, tiled over H heads. None without it."""
    if not (checkpoint / "config.json").exists():
        return None
    from transformers import AutoModelForCausalLM

    from foxlab.data import SegmentsTask
    model = AutoModelForCausalLM.from_pretrained(checkpoint).cuda().eval()
    ids = SegmentsTask(seq_len=T).batch(0, B, split="eval")["input_ids"].cuda()
    with torch.no_grad():
        gates = torch.cat(model(ids, output_forget_gates=True).forget_gates, dim=-1)  # (B, T, 8)
    return gates.repeat(1, 1, -(-H // gates.shape[-1]))[..., :H].contiguous()


def run_acp(shapes, checkpoint: Path) -> None:
    """Pruning's two limits: gates that allow none (log f = 0, ACP only adds its bookkeeping) and the gates of a
    trained model (the demo FoX), and between them the main table's random gates (logits ~ N(3, 1)); foxlab with
    and without ACP, and the paper's kernel + ACP, same inputs."""
    print("| (B, T, H, D) | gates | foxlab fwd / fwd+bwd ms | foxlab + ACP fwd / fwd+bwd ms | ACP speed-up "
          "fwd+bwd | paper + ACP fwd+bwd ms | foxlab + ACP / paper + ACP | paper + ACP fwd+bwd ms (eager) | "
          "foxlab + ACP fwd+bwd ms (eager) | eager ratio |")
    print("|---" * 10 + "|")
    for shape in shapes:
        B, T, H, D = shape
        q, k, v, random_gates = make_inputs(B, T, H, D)
        trained = demo_gates(checkpoint, B, T, H)
        for label, log_f in (("log f = 0", torch.zeros(B, T, H, device="cuda")), ("N(3, 1) logits", random_gates),
                             ("demo model", trained)):
            if log_f is None:
                continue
            leaves = [t.requires_grad_() for t in (q, k, v, log_f)]
            plain = measure(lambda *a: forgetting_attention(*a, backend="triton"), leaves)
            pruned = measure(foxlab_acp, leaves, eager=True)
            paper, head_major = paper_attention("auto"), [t.detach().transpose(1, 2).contiguous().requires_grad_()
                                                          for t in leaves]
            nan = float("nan")
            theirs = measure(paper, head_major, eager=True) if paper else dict(fwdbwd_ms=nan, eager_fwdbwd_ms=nan)
            ours, ours_eager = pruned["fwdbwd_ms"], pruned["eager_fwdbwd_ms"]
            print(f"| {shape} | {label} | {plain['fwd_ms']:.3f} / {plain['fwdbwd_ms']:.3f} | {pruned['fwd_ms']:.3f} / "
                  f"{ours:.3f} | {plain['fwdbwd_ms'] / ours:.2f} | {theirs['fwdbwd_ms']:.3f} | "
                  f"{ours / theirs['fwdbwd_ms']:.2f} | {theirs['eager_fwdbwd_ms']:.3f} | {ours_eager:.3f} | "
                  f"{ours_eager / theirs['eager_fwdbwd_ms']:.2f} |", flush=True)


def run_acp_training_step(T: int = 16384) -> None:
    """Tokens/s of one fox-125m training step (forward, backward, AdamW; bf16 autocast) at T tokens, ACP off and
    on, with the paper's initialization (gate bias 0) and with log-spaced gate timescales of 16 to 4096 tokens."""
    from foxlab import ForgettingTransformerConfig, ForgettingTransformerForCausalLM
    ids = torch.randint(0, 50304, (1, T), device="cuda")
    for init in (None, [16.0, 4096.0]):
        for tolerance in (None, -10.0):
            torch.manual_seed(0)
            config = ForgettingTransformerConfig.from_preset("fox-125m", fgate_init_timescales=init,
                                                             acp_log_tolerance=tolerance)
            model = ForgettingTransformerForCausalLM(config).cuda().train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            ms = bench_eager(step)
            print(f"fox-125m T={T} gate init {init or 'bias 0'} ACP {tolerance}: {ms:.1f} ms/step, "
                  f"{T / ms * 1e3 / 1e3:.1f}k tokens/s", flush=True)
            del model, opt
            torch.cuda.empty_cache()


DECODE_SHAPES = [(1, 4096, 16, 16, 128), (8, 8192, 32, 8, 128), (1, 32768, 16, 16, 64), (32, 2048, 16, 4, 64)]
# Chunked prefill: Tq new tokens against a cache of Tk, per (B, H, Hkv, D).
PREFILL_HEADS = [(1, 16, 16, 128), (2, 32, 8, 64)]
PREFILL_TQ, PREFILL_TK = (16, 64, 256, 512), (8192, 32768)
# --decode-sweep: split-kernel candidates (programs per SM, BLOCK_N, num_warps, num_stages) at the decode shapes
# (the sweep lifts the library's cap of 2 warps per 16 rows, `split._WARPS_PER_16_ROWS`, so 4 means 4); at the
# prefill shapes, programs per SM x who merges the splits (the last program of a tile: in at most 1 step or in any
# number; _LAST_MERGES_MAX_STEPS).
DECODE_CANDIDATES = [(2, 64, 2, 3), (2, 64, 4, 3), (2, 64, 1, 3), (1, 64, 2, 3), (4, 32, 1, 2), (2, 128, 2, 3),
                     (1, 128, 4, 3)]
SWEEP_PREFILL_SHAPES = [(1, 16, 8192, 16, 16, 128), (1, 64, 32768, 16, 16, 128), (2, 16, 8192, 32, 8, 64),
                        (2, 64, 8192, 32, 8, 64)]


def cache_inputs(B, Tq, Tk, H, Hkv, D):
    """q (B, Tq, H, D) and a bf16 cache: k, v (B, Tk, Hkv, D), the gates' prefix sums c as the cache stores them
    ((B, H, Tk) float32, viewed (B, Tk, H)) and the per-token log gates."""
    q = torch.randn(B, Tq, H, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, Tk, Hkv, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    log_f = F.logsigmoid(torch.randn(B, Tk, H, device="cuda") + 3.0)
    c = log_f.transpose(1, 2).cumsum(-1).transpose(1, 2)
    return q, k, v, c, log_f


def sdpa_cache_ms(q, k, v) -> float:
    """The fastest SDPA without a gate, queries aligned to the last keys (causal_lower_right): GQA through
    enable_gqa, or k and v expanded to every query head beforehand (more bytes, other kernels); the faster."""
    from torch.nn.attention.bias import causal_lower_right
    Tq, Tk = q.shape[1], k.shape[1]
    mask = None if Tq == 1 else causal_lower_right(Tq, Tk)
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    group = q.shape[2] // k.shape[2]
    ke, ve = (t.repeat_interleave(group, dim=1) for t in (kh, vh))
    times = []
    for kw in (dict(k=kh, v=vh, enable_gqa=True), dict(k=ke, v=ve)):
        try:
            times.append(bench(lambda: F.scaled_dot_product_attention(qh, kw["k"], kw["v"], attn_mask=mask,
                                                                      enable_gqa=kw.get("enable_gqa", False))))
        except RuntimeError as e:
            print(f"    (SDPA {'GQA' if 'enable_gqa' in kw else 'expanded'}: {str(e).splitlines()[0][:100]})")
    return min(times)


def foxlab_cache_ms(q, k, v, c, **kw) -> float:
    return bench(lambda: forgetting_attention(q, k, v, log_fgate_cumsum=c, backend="triton", **kw))


def run_decode():
    """One query against a cache of Tk keys: GPU time, K/V bytes read per second, ratio to SDPA (same run)."""
    print("| (B, Tk, H, Hkv, D) | foxlab us (cache's c) | x SDPA time | GB/s of K+V | foxlab us (per-token log f) "
          "| foxlab + ACP us (c) | SDPA (no gate) us |")
    print("|---" * 7 + "|")
    for B, Tk, H, Hkv, D in DECODE_SHAPES:
        q, k, v, c, log_f = cache_inputs(B, 1, Tk, H, Hkv, D)
        fox = foxlab_cache_ms(q, k, v, c)
        per_token = bench(lambda: forgetting_attention(q, k, v, log_f, backend="triton"))
        pruned = foxlab_cache_ms(q, k, v, c, adaptive_threshold="auto")
        sdpa = sdpa_cache_ms(q, k, v)
        print(f"| {(B, Tk, H, Hkv, D)} | {fox * 1e3:.1f} | {fox / sdpa:.2f} | {2 * k.numel() * 2 / fox / 1e6:.0f} | "
              f"{per_token * 1e3:.1f} | {pruned * 1e3:.1f} | {sdpa * 1e3:.1f} |", flush=True)


def run_prefill():
    """Chunked prefill: Tq new queries against Tk cached keys (the last Tq of them theirs), foxlab from the cache's c
    (its choice of kernel; the split-key and the blocked forward each forced), SDPA with a lower-right causal mask."""
    print("| (B, Tq, Tk, H, Hkv, D) | foxlab us | x SDPA time | split fwd us | blocked fwd us | SDPA (no gate) us |")
    print("|---" * 6 + "|")
    wanted = kernels.split._split_wanted
    for B, H, Hkv, D in PREFILL_HEADS:
        for Tk in PREFILL_TK:
            for Tq in PREFILL_TQ:
                q, k, v, c, _ = cache_inputs(B, Tq, Tk, H, Hkv, D)
                fox = foxlab_cache_ms(q, k, v, c)
                forced = {"split" if wanted(q, k) else "blocked": fox}
                for kernel, choice in (("split", True), ("blocked", False)):
                    if kernel not in forced:
                        kernels.split._split_wanted = lambda q, k: choice
                        forced[kernel] = foxlab_cache_ms(q, k, v, c)
                kernels.split._split_wanted = wanted
                sdpa = sdpa_cache_ms(q, k, v)
                print(f"| {(B, Tq, Tk, H, Hkv, D)} | {fox * 1e3:.1f} | {fox / sdpa:.2f} | {forced['split'] * 1e3:.1f} "
                      f"| {forced['blocked'] * 1e3:.1f} | {sdpa * 1e3:.1f} |", flush=True)
                del q, k, v, c


def sweep_decode():
    """Time the split kernel's candidate settings (DECODE_CANDIDATES) at each decode and sweep prefill shape; print
    them fastest first."""
    defaults = kernels.split._SPLIT_PROGRAMS_PER_SM, kernels.split._LAST_MERGES_MAX_STEPS
    wanted, warps_cap = kernels.split._split_wanted, kernels.split._WARPS_PER_16_ROWS
    kernels.split._split_wanted = lambda q, k: True
    decode_shapes = [(B, 1, Tk, H, Hkv, D) for B, Tk, H, Hkv, D in DECODE_SHAPES]
    for shape in decode_shapes + SWEEP_PREFILL_SHAPES:
        q, k, v, c, _ = cache_inputs(*shape)
        times = {}
        if shape in decode_shapes:
            settings = [(per_sm, defaults[1], cfg) for per_sm, *cfg in DECODE_CANDIDATES]
        else:
            settings = [(per_sm, steps, None) for per_sm in (1, 2) for steps in (1, 1000)]
        for per_sm, steps, cfg in settings:
            kernels.split._SPLIT_PROGRAMS_PER_SM, kernels.split._LAST_MERGES_MAX_STEPS = per_sm, steps
            if cfg is not None:
                kernels.common._CONFIG_OVERRIDES["decode"] = kernels.common._KernelConfig(16, *cfg)
            kernels.split._WARPS_PER_16_ROWS = 4 if cfg is not None else warps_cap
            try:
                times[(per_sm, steps, *(cfg or ()))] = foxlab_cache_ms(q, k, v, c)
            except Exception as e:
                print(f"  {shape} {(per_sm, steps, cfg)}: {type(e).__name__}: {str(e)[:100]}", flush=True)
            kernels.common._CONFIG_OVERRIDES.pop("decode", None)
        ranked = sorted(times.items(), key=lambda kv: kv[1])
        print(f"decode sweep {shape} (per SM, last-merge steps[, BLOCK_N, warps, stages]): "
              + ", ".join(f"{c}: {t * 1e3:.1f}" for c, t in ranked), flush=True)
    kernels.split._SPLIT_PROGRAMS_PER_SM, kernels.split._LAST_MERGES_MAX_STEPS = defaults
    kernels.split._split_wanted, kernels.split._WARPS_PER_16_ROWS = wanted, warps_cap


def print_table(rows):
    fwd_flops = {r["shape"]: 2 * math.prod(r["shape"][:1] + r["shape"][2:]) * r["shape"][1] ** 2 for r in rows}
    sdpa = {}  # per shape, the fastest SDPA variant (fwd+bwd) is the baseline of every ratio
    for r in rows:
        if r["impl"].startswith("SDPA") and "fwdbwd_ms" in r:
            if r["shape"] not in sdpa or r["fwdbwd_ms"] < sdpa[r["shape"]]["fwdbwd_ms"]:
                sdpa[r["shape"]] = r
    head = (f"| (B, T, H, D) | implementation | fwd ms | fwd TFLOP/s | fwd x SDPA | fwd+bwd ms | fwd+bwd TFLOP/s "
            f"| fwd+bwd x SDPA | peak MiB | eager fwd / fwd+bwd ms |")
    print(head)
    print("|---" * 10 + "|")
    for r in rows:
        s, base = r["shape"], sdpa.get(r["shape"], {})
        if "error" in r:
            print(f"| {s} | {r['impl']} | {r['error']} | | | | | | | |")
            continue
        fwd = r["fwd_ms"]
        cells = [f"{fwd:.3f}", f"{fwd_flops[s] / fwd / 1e9:.0f}",
                 f"{base['fwd_ms'] / fwd:.2f}" if "fwd_ms" in base else "-"]
        if "fwdbwd_ms" in r:
            t = r["fwdbwd_ms"]
            cells += [f"{t:.3f}", f"{3.5 * fwd_flops[s] / t / 1e9:.0f}",
                      f"{base['fwdbwd_ms'] / t:.2f}" if "fwdbwd_ms" in base else "-"]
        else:
            cells += [r.get("bwd_error", "-"), "", ""]
        eager = f"{r['eager_fwd_ms']:.3f} / {r['eager_fwdbwd_ms']:.3f}" if "eager_fwd_ms" in r else "-"
        print(f"| {s} | {r['impl']} | " + " | ".join(cells) + f" | {r['peak_mib']:.0f} | {eager} |")


def tune():
    """Time each candidate configuration of each kernel per head dim; return the fastest of each."""
    best = {}
    for D, (B, T, H, _) in TUNE_SHAPES.items():
        q, k, v, log_f = make_inputs(B, T, H, D)
        scale = D ** -0.5
        c2 = kernels.blocked._base2_prefix_sums(log_f, False)
        o, lse, _ = kernels.blocked._triton_forward(q, k, v, c2, None, None, scale)
        d_out = torch.randn_like(o)
        calls = {"fwd": lambda: kernels.blocked._triton_forward(q, k, v, c2, None, None, scale),
                 "dkdv": lambda: kernels.blocked._triton_backward(d_out, q, k, v, log_f, o, lse, None, None, None,
                                                                  scale),
                 "dq": lambda: kernels.blocked._triton_backward(d_out, q, k, v, log_f, o, lse, None, None, None,
                                                                scale)}
        for kind in ("fwd", "dkdv", "dq"):  # the whole backward is timed; dq with the best dkdv pinned
            times = {}
            for cand in TUNE_CANDIDATES[(kind, D)]:
                kernels.common._CONFIG_OVERRIDES[kind] = kernels.common._KernelConfig(*cand)
                try:
                    times[cand] = bench(calls[kind])
                except Exception as e:
                    print(f"  D={D} {kind} {cand}: {type(e).__name__}: {str(e)[:100]}", flush=True)
            ranked = sorted(times.items(), key=lambda kv: kv[1])
            print(f"D={D} {kind} {(B, T, H, D)}: " + ", ".join(f"{c}: {t:.3f}" for c, t in ranked), flush=True)
            best[(kind, D)] = ranked[0][0]
            kernels.common._CONFIG_OVERRIDES[kind] = kernels.common._KernelConfig(*ranked[0][0])
        kernels.common._CONFIG_OVERRIDES.clear()
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two small shapes, no flex_attention")
    parser.add_argument("--tune", action="store_true", help="sweep block sizes first and use the best")
    parser.add_argument("--no-flex", action="store_true", help="skip flex_attention (its compile is slow)")
    parser.add_argument("--json", help="write all measurements here")
    parser.add_argument("--acp", action="store_true", help="also: ACP with log f = 0 and with trained gates, and "
                        "a fox-125m training step at 16k tokens with ACP off and on")
    parser.add_argument("--acp-only", action="store_true", help="only the ACP tables (implies --acp)")
    parser.add_argument("--no-training-step", action="store_true", help="with --acp-only: leave out the training step")
    parser.add_argument("--decode-only", action="store_true", help="only the decoding and chunked-prefill tables")
    parser.add_argument("--decode-sweep", action="store_true", help="with --decode-only: time the split kernel's "
                        "configurations first")
    parser.add_argument("--demo-checkpoint", default="runs/demo/checkpoint", type=Path,
                        help="the trained model whose gates --acp uses (make demo writes it)")
    args = parser.parse_args()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{datetime.date.today().isoformat()}; host overhead {host_overhead_us():.1f} us per tiny CUDA op",
          flush=True)
    if args.decode_only:
        if args.decode_sweep:
            sweep_decode()
        run_decode()
        run_prefill()
        return
    if args.acp_only:
        run_acp(shapes, args.demo_checkpoint)
        if not args.no_training_step:
            run_acp_training_step()
        return
    best = {}
    if args.tune:
        best = tune()
        for (kind, D), cand in best.items():
            print(f"best {kind} D={D}: {cand}", flush=True)
    rows = []
    for shape in shapes:
        if best:  # the tuned tiles of this head dim
            for (kind, D), cand in best.items():
                if D == shape[3]:
                    kernels.common._CONFIG_OVERRIDES[kind] = kernels.common._KernelConfig(*cand)
        print(f"{shape}:", flush=True)
        rows += run_shape(shape, with_flex=not (args.quick or args.no_flex), with_reference=args.quick)
        kernels.common._CONFIG_OVERRIDES.clear()
    print_table(rows)
    run_decode()
    run_prefill()
    if args.acp:
        run_acp(shapes, args.demo_checkpoint)
        run_acp_training_step()
    if args.json:
        Path(args.json).write_text(json.dumps({"device": props.name, "torch": torch.__version__,
                                               "triton": triton.__version__, "rows": rows,
                                               "tuned": {f"{k}/{d}": c for (k, d), c in best.items()}}, indent=1))


if __name__ == "__main__":
    main()
