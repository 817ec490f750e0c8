"""One training step, end to end: foxlab's models with the fuse_* switches on and off, and transformers' Llama.

    python benchmarks/train_step.py                      # the BENCHMARKS.md table (one CUDA GPU)
    python benchmarks/train_step.py --liger --ablation   # + fox-125m on Liger Kernel's ops, + one switch at a time
    python benchmarks/train_step.py --long               # + fox-125m at 1 x 16384 tokens
    python benchmarks/train_step.py --long --acp-log-tolerance TOL # + the same with adaptive computation pruning
    python benchmarks/train_step.py --gpu-time           # + kernel time per step (--no-cuda-graph: no graph rows)
    python benchmarks/train_step.py --repeat 3           # every row three times, interleaved; targets from medians
    python benchmarks/train_step.py --trainer            # + foxlab's train() itself, eager and with cuda_graph=True
    python benchmarks/train_step.py --device cpu --preset-size tiny --batch 2 --seq 64   # a smoke run

A step is forward, backward and a fused AdamW update (torch.optim.AdamW(fused=True) on CUDA) under bf16
autocast with float32 weights, on random tokens (labels = inputs). Each row builds its model on the GPU,
runs --warmup steps (Triton compiles its kernels there), then times --steps steps, each on its own (no synchronize
between them). tokens/s = batch x seq / the median step time (a shared host that slows down for a few steps moves
the mean, not the median); host CPU ms: the process's CPU time per step, all threads; peak = torch.cuda.max_memory_allocated over the whole row (weights,
optimizer state, activations), in GiB. --gpu-time adds the kernel time of one step (torch.profiler): far below the
step time, the step waits on the host (Python, kernel launches), and the CUDA-graph rows (on CUDA, unless
--no-cuda-graph) show the step without that (foxlab.cuda_graph.GraphedStep, what ``train(cuda_graph=True)`` runs).
fla's ForgettingTransformer (flash-linear-attention, an optional benchmark-only import, never one of foxlab's) runs
at fox-125m's size with its fused ops on, when it is installed; otherwise its rows are skipped with the reason, and
the closing summary checks issue 12's targets against fla's earlier measurement (FLA_TOKENS_PER_S) instead.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import inspect
import json
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from foxlab import ForgettingTransformerConfig, ForgettingTransformerForCausalLM, fused  # noqa: E402
from foxlab.cuda_graph import WARMUP_STEPS, GraphedStep  # noqa: E402

SWITCHES = ("fuse_norm", "fuse_swiglu", "fuse_cross_entropy")
FLA_TOKENS_PER_S = 243.6e3  # fla's ForgettingTransformer, fused ops on, same setting (H200, measured earlier)
FLA_LABEL = "fla ForgettingTransformer, fox-{size} size, its fused ops"


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def foxlab_model(preset: str, **overrides):
    return ForgettingTransformerForCausalLM(ForgettingTransformerConfig.from_preset(preset, **overrides))


def llama_model(size: str):
    """transformers' LlamaForCausalLM with SDPA attention, shaped like foxlab's transformer preset of that size."""
    cfg = ForgettingTransformerConfig.from_preset(f"transformer-{size}")
    llama = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps, initializer_range=cfg.initializer_range,
        max_position_embeddings=32768, tie_word_embeddings=False, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(llama)


def fla_importable() -> str | None:
    """None when fla's ForgettingTransformer imports here, else why not (its rows are then skipped)."""
    try:
        importlib.import_module("fla.models.forgetting_transformer")
    except Exception as exc:  # ImportError, or an fla that breaks on this torch / triton / transformers
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return None


def fla_model(size: str, pro: bool = False):
    """fla's ForgettingTransformerForCausalLM shaped like foxlab's fox preset of that size (``pro``: its qk_norm and
    output gate on, the FoX Pro parts fla has), with its fused ops on: fused RMSNorm, SwiGLU and the fused linear
    cross-entropy (no full logits, as foxlab's fuse_cross_entropy)."""
    from fla.models.forgetting_transformer import ForgettingTransformerConfig as FlaConfig
    from fla.models.forgetting_transformer import ForgettingTransformerForCausalLM as FlaForCausalLM
    cfg = ForgettingTransformerConfig.from_preset(f"fox-{size}")
    fla = FlaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size,
        hidden_act="swish", norm_eps=cfg.norm_eps, initializer_range=cfg.initializer_range,
        tie_word_embeddings=False, qk_norm=pro, use_output_gate=pro, fuse_norm=True, fuse_swiglu=True,
        fuse_cross_entropy=False, fuse_linear_cross_entropy=True)
    return FlaForCausalLM(fla)


@contextmanager
def liger_ops():
    """Route foxlab's fused ops through Liger Kernel where it has them (plain and add+RMSNorm, SwiGLU, the fused
    linear cross-entropy); the gated norm and the KV-shift stay foxlab's."""
    from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    ours = fused.rms_norm, fused.swiglu, fused.linear_cross_entropy
    liger_ce = LigerFusedLinearCrossEntropyLoss()

    def rms_norm(x, weight, eps, *, residual=None, gate=None, out_dtype=None):
        if gate is not None:
            return ours[0](x, weight, eps, gate=gate, out_dtype=out_dtype)
        if residual is not None:
            return LigerFusedAddRMSNormFunction.apply(x.to(residual.dtype), residual, weight, eps)
        return LigerRMSNormFunction.apply(x, weight, eps)

    def linear_cross_entropy(hidden, weight, targets, *, ignore_index=-100, num_items_in_batch=None, chunk_size=None):
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else hidden.dtype
        return liger_ce(weight.to(dtype), hidden.to(dtype), targets)

    fused.rms_norm, fused.swiglu, fused.linear_cross_entropy = (rms_norm, LigerSiLUMulFunction.apply,
                                                                linear_cross_entropy)
    try:
        yield
    finally:
        fused.rms_norm, fused.swiglu, fused.linear_cross_entropy = ours


def gpu_busy_ms(step) -> float:
    """Milliseconds the GPU spends in kernels during one step (torch.profiler): the step time with no host
    overhead. Far below the wall-clock step time means the step waits on Python and kernel launches."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(event.self_device_time_total for event in prof.key_averages()) / 1e3


def host_top(step, top: int) -> list[dict]:
    """The ops with the most host time in one step (torch.profiler, CPU side; a custom autograd.Function's entry
    includes its Triton launches): where a host-bound step's time goes. The profiler adds overhead of its own."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [dict(op=e.key[:60], calls=e.count, self_host_ms=round(e.self_cpu_time_total / 1e3, 2)) for e in events]


def _fresh_peak(device: torch.device) -> None:
    """Free what the previous row left and restart the peak count: its model must not count in this row's peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _error_text(exc: Exception) -> str:
    """A failed row's record: the exception's type and first line."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def time_steps(step, steps: int, cuda: bool) -> tuple[list[float], float]:
    """(each step's wall seconds, the process's CPU ms per step) over ``steps`` calls of ``step``. No synchronize
    between steps (the last one waits for the GPU): their median is robust to a host that slows down now and then,
    as shared machines do."""
    times, cpu_start = [], time.process_time()
    last = time.perf_counter()
    for _ in range(steps):
        step()
        now = time.perf_counter()
        times.append(now - last)
        last = now
    if cuda:
        torch.cuda.synchronize()
    times[-1] += time.perf_counter() - last
    return times, round((time.process_time() - cpu_start) / steps * 1e3, 2)


def run_row(label, build, batch, seq, steps, warmup, device, context=nullcontext, gpu_time=False,
            graph=False, host_ops=0) -> dict:
    """Build a model, train it for warmup + steps steps on random tokens; tokens/s and peak memory. With ``graph``
    the step is captured once in a CUDA graph and replayed."""
    row = dict(model=label, batch=batch, seq=seq)
    cuda = device.type == "cuda"
    model = optimizer = None
    try:
        with context():
            _fresh_peak(device)
            torch.manual_seed(0)  # the same weights and tokens for a model with its switches on and off
            with torch.device(device):
                model = build().train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                          fused=cuda, capturable=graph)
            vocab = model.config.vocab_size
            ids = torch.randint(0, vocab, (batch, seq), device=device)
            # CUDA graphs need autocast's cast cache off (a cached cast would outlive the capture)
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda, cache_enabled=not graph)

            def train_step():
                with autocast:
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
                optimizer.step()
                return loss.detach()  # the step's autograd graph must not outlive it

            def step():
                loss = train_step()
                optimizer.zero_grad(set_to_none=True)
                return loss

            if graph:  # its first calls are eager, then one captures: all of them within the warm-up
                step = GraphedStep(train_step, optimizer)
                warmup = max(warmup, WARMUP_STEPS + 1)

            start = time.perf_counter()
            for i in range(warmup):
                loss = step()
                if i == 0:
                    row["first_loss"] = round(loss.item(), 4)
            row["warmup_s"] = round(time.perf_counter() - start, 1)
            if cuda:
                torch.cuda.synchronize()
            times, row["host_cpu_ms"] = time_steps(step, steps, cuda)
            if cuda and gpu_time:
                row["gpu_busy_ms"] = round(gpu_busy_ms(step), 2)
            if cuda and host_ops:
                row["host_top"] = host_top(step, host_ops)
        row["tokens_per_s"] = round(batch * seq / statistics.median(times))
        row["step_ms"] = round(statistics.median(times) * 1e3, 2)
        row["mean_step_ms"] = round(sum(times) / steps * 1e3, 2)
        if cuda:
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["parameters_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    except Exception as exc:  # a failing row is recorded; the others still run
        row["error"] = _error_text(exc)
    finally:
        del model, optimizer
    print(json.dumps(row), flush=True)
    return row


def rows(args):
    """(label, builder, batch, seq, context) per row, in the order they run (the table's rows first)."""
    size = args.preset_size
    if size == "tiny":  # the smoke run: the three families at the tiny preset's size
        pro = dict(qk_norm=True, use_output_gate=True, use_output_norm=True, use_k_shift=True, use_v_shift=True)
        kinds = [("fox", "tiny", {}), ("fox-pro", "tiny", pro), ("transformer", "tiny", dict(fgate_type="none",
                                                                                          use_rope=True))]
    else:
        kinds = [(kind, f"{kind}-{size}", {}) for kind in ("fox", "fox-pro", "transformer")]

    def build(preset, **overrides):
        return lambda: foxlab_model(preset, **overrides)

    on, off = dict.fromkeys(SWITCHES, True), dict.fromkeys(SWITCHES, False)
    fox = kinds[0][1]
    table = [(f"foxlab {kind}-{size}, {state}", build(preset, **extra, **switches), nullcontext)
             for kind, preset, extra in kinds for switches, state in ((off, "plain"), (on, "fused"))]
    if size != "tiny":
        table.append((f"transformers Llama (SDPA), transformer-{size} size", lambda: llama_model(size), nullcontext))
    if size != "tiny" and not args.no_fla:
        reason = fla_importable()
        if reason:
            print(f"note: fla's rows are skipped: {reason}")
        else:
            table += [(FLA_LABEL.format(size=size), lambda: fla_model(size), nullcontext),
                      (FLA_LABEL.format(size=size) + ", qk_norm and output gate", lambda: fla_model(size, pro=True),
                       nullcontext)]
    if args.liger:
        table.append((f"foxlab fox-{size}, Liger Kernel ops", build(fox, **on), liger_ops))
    if args.ablation:
        table += [(f"foxlab fox-{size}, only {switch}", build(fox, **{**off, switch: True}), nullcontext)
                  for switch in SWITCHES]
    specs = [(label, builder, args.batch, args.seq, context) for label, builder, context in table]
    if args.cuda_graph and args.device.startswith("cuda"):  # fused rows: the plain ones are GPU-bound already
        specs += [(f"{label}, CUDA graph", builder, args.batch, args.seq, "graph") for label, builder, context in table
                  if context is nullcontext and label.endswith(", fused")]
    if args.long or args.acp_log_tolerance is not None:
        long_seq = args.batch * args.seq
        specs.append((f"foxlab fox-{size}, fused, 1 x {long_seq}", build(fox, **on), 1, long_seq, nullcontext))
        if args.acp_log_tolerance is None:
            pass
        elif "acp_log_tolerance" not in inspect.signature(ForgettingTransformerConfig.__init__).parameters:
            print("note: this foxlab has no acp_log_tolerance config field yet; the ACP row is skipped")
        else:
            specs.append((f"foxlab fox-{size}, fused, ACP log tolerance {args.acp_log_tolerance}, 1 x {long_seq}",
                          build(fox, **on, acp_log_tolerance=args.acp_log_tolerance), 1, long_seq, nullcontext))
    return specs


def run_trainer_row(preset: str, graph: bool, batch: int, seq: int, steps: int, warmup: int, device) -> dict:
    """``foxlab.train.train`` itself on the recall task (its batches cost ~1 ms of host time), eagerly or with
    ``cuda_graph``: the median time between two steps' callbacks over the last ``steps`` steps."""
    from foxlab.train import train

    label = f"foxlab train(), {preset}" + (", cuda_graph=True" if graph else "")
    row, stamps = dict(model=label, batch=batch, seq=seq), []
    warmup = max(warmup, WARMUP_STEPS) if graph else warmup  # the eager steps and the capture are not timed
    _fresh_peak(device)
    try:
        train(preset=preset, task="recall", seq_len=seq, batch_size=batch, steps=warmup + steps + 1, lr=3e-4,
              eval_batches=1, device=str(device), cuda_graph=graph, progress=False,
              callback=lambda step, loss: stamps.append(time.perf_counter()))
        times = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]
        row.update(tokens_per_s=round(batch * seq / statistics.median(times)),
                   step_ms=round(statistics.median(times) * 1e3, 2), mean_step_ms=round(sum(times) / steps * 1e3, 2))
        if device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    except Exception as exc:
        row["error"] = _error_text(exc)
    print(json.dumps(row), flush=True)
    return row


def print_targets(results, size: str) -> None:
    """Issue 12's speed targets from the fused rows: wall clock, GPU busy time, and CUDA-graph replay."""
    def speed(label, key):
        """The median over the row's runs (--repeat): host-bound rows vary by 10-20% from minute to minute."""
        runs = [r for r in results if r["model"] == label]
        if key == "busy":
            values = [r["batch"] * r["seq"] / r["gpu_busy_ms"] * 1e3 for r in runs if r.get("gpu_busy_ms")]
        else:
            values = [r["tokens_per_s"] for r in runs if r.get("tokens_per_s")]
        return statistics.median(values) if values else None

    fox, pro = f"foxlab fox-{size}, fused", f"foxlab fox-pro-{size}, fused"
    llama = f"transformers Llama (SDPA), transformer-{size} size"
    measured = speed(FLA_LABEL.format(size=size), "wall")
    modes = (("wall clock", "wall", ""), ("GPU busy", "busy", ""), ("CUDA graph", "wall", ", CUDA graph"))
    for name, key, suffix in modes:
        f, p, lm = speed(fox + suffix, key), speed(pro + suffix, key), speed(llama, "wall")
        # fla against fla in the same mode where it ran (its GPU busy time; wall clock for the graph rows)
        fla, fla_name = speed(FLA_LABEL.format(size=size), key), f"fla {'busy' if key == 'busy' else 'wall'}, this run"
        if not measured and size == "125m":
            fla, fla_name = FLA_TOKENS_PER_S, f"fla recorded earlier ({FLA_TOKENS_PER_S / 1e3:.1f}k)"
        parts = [f"fox / {fla_name} (>= 1.15) {f / fla:.2f}" if f and fla else None,
                 f"fox-pro / fox (>= 0.8) {p / f:.2f}" if f and p else None,
                 f"fox / Llama wall (>= 1.0) {f / lm:.2f}" if f and lm else None]
        if any(parts):
            print(f"targets, {name}: " + "; ".join(x for x in parts if x))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset-size", default="125m", help="125m, 360m, 760m, or tiny (smoke run)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--gpu-time", action="store_true", help="also profile one step: GPU busy time (kernels)")
    parser.add_argument("--host-profile", type=int, default=0, metavar="N",
                        help="also list the N ops with the most host time in one step")
    parser.add_argument("--liger", action="store_true", help="add fox with Liger Kernel's ops (needs liger-kernel)")
    parser.add_argument("--ablation", action="store_true", help="add fox with one switch on at a time")
    parser.add_argument("--no-fla", action="store_true", help="leave out fla's rows even when fla is installed")
    parser.add_argument("--long", action="store_true", help="add fox at 1 x (batch x seq) tokens")
    parser.add_argument("--acp-log-tolerance", type=float, default=None,
                        help="add fox at 1 x (batch x seq) tokens with adaptive computation pruning at this tolerance")
    parser.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=True,
                        help="add each fused foxlab row again with the whole step replayed as a CUDA graph, as "
                             "train(cuda_graph=True) runs it (default: on, CUDA only)")
    parser.add_argument("--trainer", action="store_true",
                        help="add foxlab's train() itself for fox and fox-pro, eager and with cuda_graph=True")
    parser.add_argument("--rows", default="", help="run only the rows whose label contains one of these (separated by |)")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="skip the rows left after this long")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the rows this many times, interleaved (A, B, A, B); the targets use the medians")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    meta = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name() if device.type == "cuda"
                else "cpu", torch=torch.__version__, triton=version("triton"), transformers=transformers.__version__,
                liger_kernel=version("liger-kernel"), fla=version("flash-linear-attention"),
                fla_core=version("fla-core"))
    print(json.dumps(meta), flush=True)
    started, results = time.perf_counter(), []
    wanted = [w.strip() for w in args.rows.split("|") if w.strip()]
    specs = [spec for spec in rows(args) if not wanted or any(w in spec[0] for w in wanted)]
    for label, build, batch, seq, context in specs * args.repeat:
        if time.perf_counter() - started > args.budget_s:
            results.append(dict(model=label, skipped="time budget"))
            continue
        graph = context == "graph"
        results.append(run_row(label, build, batch, seq, args.steps, args.warmup, device,
                               nullcontext if graph else context, args.gpu_time and not graph, graph,
                               0 if graph else args.host_profile))
    if args.trainer and args.preset_size == "tiny":
        print("note: --trainer runs the fox and fox-pro presets, which have no tiny size; skipped")
    elif args.trainer:
        for _ in range(args.repeat):
            results += [run_trainer_row(f"{model}-{args.preset_size}", graph, args.batch, args.seq, args.steps,
                                        args.warmup, device)
                        for model in ("fox", "fox-pro") for graph in (False, True)]
    meta["fp32_out_matmul"] = fused._FP32_OUT_MATMUL  # whether the chunked loss summed dW with addmm(out_dtype)
    print("\n| model | tokens/s | peak GiB | step ms, median (mean) | host CPU ms | GPU busy ms | tokens/s at GPU busy |"
          "\n|---|---|---|---|---|---|---|")
    for r in results:
        at_busy = round(r["batch"] * r["seq"] / r["gpu_busy_ms"] * 1e3) if r.get("gpu_busy_ms") else "-"
        print(f"| {r['model']} | {r.get('tokens_per_s', r.get('error', r.get('skipped')))} | {r.get('peak_gib', '-')} "
              f"| {r.get('step_ms', '-')} ({r.get('mean_step_ms', '-')}) | {r.get('host_cpu_ms', '-')} "
              f"| {r.get('gpu_busy_ms', '-')} | {at_busy} |")
    print_targets(results, args.preset_size)
    if args.json:
        args.json.write_text(json.dumps(dict(meta, results=results), indent=1))


if __name__ == "__main__":
    main()
