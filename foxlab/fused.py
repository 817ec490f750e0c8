"""Fused training ops: RMSNorm (with the residual add or an output gate folded in), SwiGLU, and the LM head with
its cross-entropy computed in chunks. FoX Pro's KV-shift and q/k norms: fused_inputs.py, on the norm math here.

Each element-wise op is one Triton kernel forward and one backward: a chain that PyTorch runs as several passes
over memory (saving several intermediates for backward) reads its inputs once and saves only them. In a training
step every fused op also costs host time (a Python autograd.Function and a Triton launch), often more than its
kernel takes on the GPU. The norm kernels take their inputs as rows one stride apart, so they read the column
slices of the attention's stacked projections (model.stacked_linear) where they lie, without a copy.
The model uses them on CUDA when the config's ``fuse_norm`` / ``fuse_swiglu`` / ``fuse_cross_entropy`` switches
are on (the default); on the CPU, or with a switch off, it runs the plain PyTorch ops. The chunked cross-entropy
runs everywhere: its per-chunk softmax is a Triton kernel on CUDA and plain PyTorch elsewhere.

Math (x rows over the last dim, n = its size, all arithmetic in float32, or float64 for float64 inputs)::

    rms_norm          s = x (+ residual)           y = s / sqrt(mean(s^2) + eps) * w  (* sigmoid(gate))
                      (per head: x (..., H, D), w (H, D), the mean over each head's D)
    swiglu            y = silu(g) * u = g * sigmoid(g) * u
    linear_cross_entropy   loss = sum_i [lse(h_i W^T) - (h_i W^T)_{y_i}] / n   over rows with y_i != ignore_index

Backward (r = 1 / sqrt(mean(s^2) + eps), s_hat = s r, dn = dy * w after the gate's factor)::

    ds = r (dn - s_hat mean(dn s_hat)) (+ the gradient that reaches the sum s itself)   dw = sum_rows dy s_hat
    dgate = dy * (s_hat w) * sig (1 - sig)       dg = dy u sig (1 + g (1 - sig))        du = dy g sig
    dlogits = (softmax(h W^T) - onehot(y)) / n   dh = dlogits W,   dW = dlogits^T h

The cross-entropy never holds the (rows x vocab) logits: chunk by chunk it computes the logits, the loss and
the logits' gradient (in place), and from it dh and dW, all inside the forward pass; backward only scales
them by the incoming gradient. The same scheme as the fused linear cross-entropy of Liger Kernel (Hsu et al.,
2024, arXiv 2410.10989), written here from the math above.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn as nn

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton on this platform: the plain PyTorch paths still work
    triton = None

IGNORE_INDEX = -100
# Rows x vocab entries of one chunk of logits at most: 2^28 is 512 MiB in bf16; chunks are a power of two
# rows (4096 for a 50304 vocab: on an H200, 16k tokens took 9.4 ms in 1024-row chunks, 7.3 ms in 4096-row ones).
CE_CHUNK_ELEMENTS = 2**28
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Elements one program of a row-wise kernel handles; under the interpreter tiny, so tests cross tile edges.
_TILE_ELEMENTS = 256 if _INTERPRET else 4096
_ELEMENTWISE_BLOCK = 64 if _INTERPRET else 1024
_CE_BLOCK = 64 if _INTERPRET else 4096
_MAX_ROW = 65536
# Whether torch.addmm(..., out_dtype=float32) works here (CUDA, torch >= 2.8); found out on first use.
_FP32_OUT_MATMUL = True

_jit = triton.jit if triton is not None else (lambda fn: fn)


def triton_wanted(x: torch.Tensor) -> bool:
    """Whether a model with a fuse_* switch on runs the Triton kernel for x: on CUDA, with Triton installed."""
    return x.is_cuda and triton is not None


def _check_triton(x: torch.Tensor, op: str) -> None:
    if triton is None:
        raise RuntimeError(f"{op} needs Triton, which is not installed (the model falls back to PyTorch ops)")
    if not x.is_cuda and not _INTERPRET:
        raise ValueError(f"{op} runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1), got {x.device}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"{op} takes float16, bfloat16, float32 or float64 tensors, got {x.dtype}")


# Launch arithmetic in plain Python: triton.cdiv and triton.next_power_of_2 cost microseconds per host call.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 arithmetic for float64 inputs (exact tests), else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _autocast_or(x: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype autocast would cast x to for a matmul, or ``dtype`` when autocast is off."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return dtype


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _programs(n_units: int, device: torch.device) -> int:
    """Programs of a persistent kernel: four per multiprocessor (four under the interpreter)."""
    return max(1, min(n_units, 4 * _multiprocessors(device)))


def _stand_in(dummy: torch.Tensor, *tensors):
    """The tensors, with ``dummy`` for each None: a pointer the kernel never reads (its constexpr flag is off), so
    that no None reaches a Triton function called from inside a kernel."""
    return [dummy if t is None else t for t in tensors]


def _row_strided(t: torch.Tensor, row_size: int) -> tuple[torch.Tensor, int]:
    """t as rows of ``row_size`` contiguous elements, and the stride between rows: t itself where its layout already is
    that (a column slice of a wider matmul's output, as the attention's stacked projections give), else a contiguous
    copy (stride ``row_size``). The kernels read such inputs in place: a copy is one more launch per step."""
    if t.numel() and t.stride(-1) == 1:
        try:
            return t, t.view(-1, row_size).stride(0)
        except RuntimeError:  # rows of t are not one stride apart
            pass
    return t.contiguous(), row_size


def _check_float_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got "
                         f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")


def _same_shape(name: str, t: torch.Tensor | None, x: torch.Tensor, x_name: str = "x") -> None:
    """t (optional) must be a floating-point tensor of x's shape, on x's device."""
    if t is None:
        return
    _check_float_tensor(name, t)
    if t.shape != x.shape:
        raise ValueError(f"{name} must have the shape of {x_name} {tuple(x.shape)}, got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but {x_name} is on {x.device}")


# --------------------------------------------------------------------------------------------------
# RMSNorm, optionally with the residual add before it and a sigmoid gate after it
# --------------------------------------------------------------------------------------------------


@_jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@_jit
def _rms_normalize(s, w, eps, group_size):
    """(s / sqrt(mean(s^2) + eps) * w, rstd) for s (BLOCK_M, BLOCK_G, BLOCK_D), each group's mean over its
    ``group_size`` features (padding is 0), w (BLOCK_G, BLOCK_D); rstd (BLOCK_M, BLOCK_G)."""
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=2) / group_size + eps)
    return s * rstd[:, :, None] * w[None, :, :], rstd


@_jit
def _rms_norm_input_grad(dn, s_hat, rstd, group_size):
    """ds = rstd (dn - s_hat mean(dn s_hat)): the norm's backward to its input s, from dn = dy * w (after the gate's
    factor) and s_hat = s * rstd, per group."""
    return rstd[:, :, None] * (dn - s_hat * (tl.sum(dn * s_hat, axis=2) / group_size)[:, :, None])


@_jit
def _group_tile(n_groups, group_size, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """The layout of one row of n_groups groups of group_size features (heads of D): (groups (BLOCK_G,), cols
    (BLOCK_D,), in_row: the real features (BLOCK_G, BLOCK_D), offs: their offsets within the row)."""
    groups, cols = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
    in_row = (groups[:, None] < n_groups) & (cols[None, :] < group_size)
    return groups, cols, in_row, groups[:, None] * group_size + cols[None, :]


@_jit
def _program_rows(program, rows_per_program, n_rows):
    """[begin, end): the rows a program of a persistent backward kernel owns (it also sums their dW)."""
    begin = program * rows_per_program
    return begin, tl.minimum(begin + rows_per_program, n_rows)


@_jit
def _rms_norm_fwd_rows(X, stride_x, R, GATE, stride_gate, W, Y, S, RSTD, tile, n_rows, n_groups, group_size, eps,
                       HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr, ACC: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows tile*BLOCK_M.. of X (n_rows, n_groups, group_size), W (n_groups, group_size) (one group: shared):
    S = X + R, Y = S * RSTD * W (* sigmoid(GATE)), RSTD (n_rows, n_groups) one per group. Rows of X and GATE are
    ``stride_x`` / ``stride_gate`` elements apart, R, Y and S contiguous."""
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    groups, _, in_row, w_offs = _group_tile(n_groups, group_size, BLOCK_G, BLOCK_D)
    mask = (rows < n_rows)[:, None, None] & in_row[None, :, :]
    offs = rows[:, None, None] * (n_groups * group_size) + w_offs[None, :, :]
    s = tl.load(X + rows[:, None, None] * stride_x + w_offs[None, :, :], mask=mask, other=0.0).to(ACC)
    if HAS_RESIDUAL:  # the sum is stored, then normalized as stored (what x + residual would give)
        s = (s + tl.load(R + offs, mask=mask, other=0.0).to(ACC)).to(S.dtype.element_ty)
        tl.store(S + offs, s, mask=mask)
        s = s.to(ACC)
    w = tl.load(W + w_offs, mask=in_row, other=0.0).to(ACC)
    y, rstd = _rms_normalize(s, w, eps, group_size)
    if HAS_GATE:
        gate = tl.load(GATE + rows[:, None, None] * stride_gate + w_offs[None, :, :], mask=mask, other=0.0)
        y = y * _sigmoid(gate.to(ACC))
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    rstd_offs = rows[:, None] * n_groups + groups[None, :]
    tl.store(RSTD + rstd_offs, rstd, mask=(rows < n_rows)[:, None] & (groups < n_groups)[None, :])


@_jit
def _rms_norm_fwd_kernel(X, stride_x, R, GATE, stride_gate, W, Y, S, RSTD, n_rows, n_groups, group_size, eps,
                         HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """`_rms_norm_fwd_rows` over X, one tile of rows per program."""
    _rms_norm_fwd_rows(X, stride_x, R, GATE, stride_gate, W, Y, S, RSTD, tl.program_id(0), n_rows, n_groups,
                       group_size, eps, HAS_RESIDUAL, HAS_GATE, ACC, BLOCK_M, BLOCK_G, BLOCK_D)


@_jit
def _rms_norm_bwd_rows(S, stride_s, W, GATE, stride_gate, RSTD, DY, DS, DX, DR, DGATE, DW_PARTIAL, program, n_rows,
                       rows_per_program, n_groups, group_size, dw_stride, HAS_RESIDUAL: tl.constexpr,
                       HAS_GATE: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """dX (= dR with a residual) and dGATE for the rows of S (n_rows, n_groups, group_size) that ``program`` owns,
    the module docstring's backward per group; its partial sum of dW goes to row ``program`` of DW_PARTIAL (rows
    ``dw_stride`` apart, n_groups x group_size of them used; zeros when it owns no rows). Rows of S and GATE are
    ``stride_s`` / ``stride_gate`` elements apart, the other tensors contiguous."""
    groups, _, in_row, w_offs = _group_tile(n_groups, group_size, BLOCK_G, BLOCK_D)
    w = tl.load(W + w_offs, mask=in_row, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_G, BLOCK_D], dtype=ACC)
    row_begin, row_end = _program_rows(program, rows_per_program, n_rows)
    for start in range(row_begin, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None, None] & in_row[None, :, :]
        offs = rows[:, None, None] * (n_groups * group_size) + w_offs[None, :, :]
        rstd_mask = row_ok[:, None] & (groups < n_groups)[None, :]
        rstd = tl.load(RSTD + rows[:, None] * n_groups + groups[None, :], mask=rstd_mask, other=0.0)
        s_hat = tl.load(S + rows[:, None, None] * stride_s + w_offs[None, :, :], mask=mask, other=0.0).to(ACC)
        s_hat *= rstd[:, :, None]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
        if HAS_GATE:
            gate = tl.load(GATE + rows[:, None, None] * stride_gate + w_offs[None, :, :], mask=mask, other=0.0)
            sig = _sigmoid(gate.to(ACC))
            dgate = dy * s_hat * w[None, :, :] * sig * (1.0 - sig)
            tl.store(DGATE + offs, dgate.to(DGATE.dtype.element_ty), mask=mask)
            dy = dy * sig
        dw += tl.sum(dy * s_hat, axis=0)
        ds = _rms_norm_input_grad(dy * w[None, :, :], s_hat, rstd, group_size)
        if HAS_RESIDUAL:
            ds += tl.load(DS + offs, mask=mask, other=0.0).to(ACC)
            tl.store(DR + offs, ds.to(DR.dtype.element_ty), mask=mask)
        tl.store(DX + offs, ds.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + program * dw_stride + w_offs, dw, mask=in_row)


@_jit
def _rms_norm_bwd_kernel(S, stride_s, W, GATE, stride_gate, RSTD, DY, DS, DX, DR, DGATE, DW_PARTIAL, n_rows,
                         rows_per_program, n_groups, group_size, HAS_RESIDUAL: tl.constexpr, HAS_GATE: tl.constexpr,
                         ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """`_rms_norm_bwd_rows` over S, one stretch of rows per program."""
    _rms_norm_bwd_rows(S, stride_s, W, GATE, stride_gate, RSTD, DY, DS, DX, DR, DGATE, DW_PARTIAL, tl.program_id(0),
                       n_rows, rows_per_program, n_groups, group_size, n_groups * group_size, HAS_RESIDUAL, HAS_GATE,
                       ACC, BLOCK_M, BLOCK_G, BLOCK_D)


def _norm_rows(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int]:
    """(rows, groups) of x for weight (D,) (one group per row of D) or (G, D) (rows of G groups of D)."""
    groups = weight.shape[0] if weight.dim() == 2 else 1
    return x.numel() // (groups * weight.shape[-1]), groups


def _weight_stride(weight: torch.Tensor | None) -> int:
    """Elements between two groups' (heads') weights: D for per-head weights (G, D), 0 for one vector (D,) shared
    by all (or none)."""
    return weight.shape[-1] if weight is not None and weight.dim() == 2 else 0


@functools.lru_cache(maxsize=None)
def _norm_meta(groups: int, group_size: int, acc: torch.dtype) -> dict:
    """The norm kernels' compile-time arguments for rows of ``groups`` groups of ``group_size`` (cached: the same few
    dicts every step): BLOCK_M rows, BLOCK_G >= groups, BLOCK_D >= group_size per program."""
    block_g, block_d = _next_pow2(groups), _next_pow2(group_size)
    block_m = max(1, _TILE_ELEMENTS // (block_g * block_d))
    return dict(ACC=_tl_dtype(acc), BLOCK_M=block_m, BLOCK_G=block_g, BLOCK_D=block_d,
                num_warps=8 if block_m * block_g * block_d >= 8192 else 4)


def _rows_per_program(rows: int, programs: int, block_m: int) -> int:
    """Rows each program of a norm backward takes: a multiple of BLOCK_M, all ``rows`` covered."""
    return _cdiv(_cdiv(rows, programs), block_m) * block_m


def _weight_grad(dw: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """weight's gradient from its partial dW already summed over the programs, one row of D per group it was
    computed for: as it is for per-group weights (G, D) (or a vector (D,) that ran as one group), summed over the
    groups for one vector (D,) that all of them share."""
    dw = dw.view(-1, weight.shape[-1])
    return (dw.sum(dim=0) if weight.dim() == 1 and dw.shape[0] > 1 else dw.view(weight.shape)).to(weight.dtype)


def _rms_norm_launch(x, weight, eps, out_dtype, residual=None, gate=None):
    """The norm's forward kernel: (y, s, rstd (rows, groups), stride_s, gate, stride_gate), s the sum x + residual
    (x itself without one) and gate as the kernel read them (in place where their rows are one stride apart)."""
    rows, groups = _norm_rows(x, weight)
    row_size = groups * weight.shape[-1]
    x, stride_x = _row_strided(x, row_size)  # x and gate are read in place, the outputs written contiguous
    gate, stride_gate = _row_strided(gate, row_size) if gate is not None else (None, 0)
    acc = _acc_dtype(x, weight)
    meta = _norm_meta(groups, weight.shape[-1], acc)
    y = x.new_empty(x.shape, dtype=out_dtype)
    rstd = x.new_empty((rows, groups), dtype=acc)
    s, stride_s = x, stride_x
    if residual is not None:
        residual = residual.contiguous()
        s, stride_s = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype)), row_size
    if rows:
        _rms_norm_fwd_kernel[(_cdiv(rows, meta["BLOCK_M"]),)](
            x, stride_x, x if residual is None else residual, x if gate is None else gate, stride_gate, weight, y,
            s, rstd, rows, groups, weight.shape[-1], eps, HAS_RESIDUAL=residual is not None,
            HAS_GATE=gate is not None, **meta)
    return y, s, rstd, stride_s, gate, stride_gate


class _RMSNormFunction(torch.autograd.Function):
    """One norm, optionally with the residual add before it and the gate after it. Outputs y, or (y, s) with a
    residual."""

    @staticmethod
    def forward(ctx, x, weight, residual, gate, eps, out_dtype):
        y, s, rstd, stride_s, gate, stride_gate = _rms_norm_launch(x, weight, eps, out_dtype, residual, gate)
        ctx.save_for_backward(s, weight, gate, rstd)
        ctx.dtypes = (x.dtype, residual.dtype if residual is not None else None)
        ctx.strides = (stride_s, stride_gate)
        return (y, s) if residual is not None else y

    @staticmethod
    def backward(ctx, dy, ds=None):
        s, weight, gate, rstd = ctx.saved_tensors
        x_dtype, r_dtype = ctx.dtypes
        stride_s, stride_gate = ctx.strides
        has_residual = r_dtype is not None
        rows, groups = rstd.shape
        meta = _norm_meta(groups, weight.shape[-1], rstd.dtype)
        programs = _programs(_cdiv(rows, meta["BLOCK_M"]), s.device)
        dx = s.new_empty(s.shape, dtype=x_dtype)
        dr = s.new_empty(s.shape, dtype=r_dtype) if has_residual else dx
        if has_residual:  # the gradient reaching the sum s itself; None when s did not reach the loss
            ds = torch.zeros_like(s) if ds is None else ds.contiguous()
        dgate = gate.new_empty(gate.shape) if gate is not None else None
        # every program writes its partial dW, rows or not
        dw_partial = (torch.empty if rows else torch.zeros)((programs, weight.numel()), dtype=rstd.dtype,
                                                            device=s.device)
        if rows:
            _rms_norm_bwd_kernel[(programs,)](
                s, stride_s, weight, s if gate is None else gate, stride_gate, rstd, dy.contiguous(),
                s if ds is None else ds, dx, dr,
                s if dgate is None else dgate, dw_partial, rows, _rows_per_program(rows, programs, meta["BLOCK_M"]),
                groups, weight.shape[-1],
                HAS_RESIDUAL=has_residual, HAS_GATE=gate is not None, **meta)
        return dx, _weight_grad(dw_partial.sum(dim=0), weight), dr if has_residual else None, dgate, None, None


def _check_norm_input(x, weight, eps, x_name: str = "x", w_name: str = "weight") -> None:
    """x a floating tensor; weight (D,) = x's last dim, or (G, D) = x's last two (per-head weights)."""
    _check_float_tensor(x_name, x)
    trailing = tuple(x.shape[-weight.dim():]) if isinstance(weight, torch.Tensor) and weight.dim() <= x.dim() else ()
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (1, 2) or tuple(weight.shape) != trailing:
        raise ValueError(f"{w_name} must have shape ({x.shape[-1]},) ({x_name}'s last dim) or {tuple(x.shape[-2:])} "
                         f"(its last two: one weight vector per head), got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    if _next_pow2(weight.shape[0] if weight.dim() == 2 else 1) * _next_pow2(x.shape[-1]) > _MAX_ROW:
        raise ValueError(f"rms_norm takes weights of at most {_MAX_ROW} elements (padded to powers of two), got "
                         f"{tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"{w_name} is on {weight.device} but {x_name} is on {x.device}")
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, residual: torch.Tensor | None = None,
             gate: torch.Tensor | None = None, out_dtype: torch.dtype | None = None):
    """Fused RMSNorm over the last dim, one Triton kernel forward and one backward.

    Args:
        x: (..., D). weight: (D,), or (G, D) for x (..., G, D): each of the G vectors of D (a head's) normalized
            with its own weights. eps: added to mean(s^2).
        residual: optional tensor of x's shape added first: s = x + residual.
        gate: optional tensor of x's shape: the output is multiplied by sigmoid(gate) (FoX Pro's output gate).
        out_dtype: dtype of y; by default autocast's dtype when autocast is on (what the next matmul would
            cast it to), else x's.
    Returns:
        y = s / sqrt(mean(s^2) + eps) * weight (* sigmoid(gate)), the mean over the last dim, and with
        ``residual`` also the sum s, in the promoted dtype of x and residual (the residual stream).
    """
    _check_norm_input(x, weight, eps)
    _same_shape("residual", residual, x)
    _same_shape("gate", gate, x)
    _check_triton(x, "rms_norm")
    out_dtype = out_dtype or _autocast_or(x, x.dtype)
    return _RMSNormFunction.apply(x, weight.contiguous(), residual, gate, float(eps), out_dtype)


# --------------------------------------------------------------------------------------------------
# SwiGLU: silu(gate) * up
# --------------------------------------------------------------------------------------------------


@_jit
def _swiglu_fwd_kernel(G, U, Y, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Y = G * sigmoid(G) * U over n elements."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(ACC)
    u = tl.load(U + offs, mask=mask, other=0.0).to(ACC)
    tl.store(Y + offs, (g * _sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


@_jit
def _swiglu_bwd_kernel(G, U, DY, DG, DU, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """DG = DY U sig (1 + G (1 - sig)), DU = DY G sig with sig = sigmoid(G); sigmoid recomputed, not saved."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(ACC)
    u = tl.load(U + offs, mask=mask, other=0.0).to(ACC)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
    sig = _sigmoid(g)
    tl.store(DG + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dy * g * sig).to(DU.dtype.element_ty), mask=mask)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u):
        g, u = g.contiguous(), u.contiguous()
        y = torch.empty_like(g)
        n = g.numel()
        if n:
            _swiglu_fwd_kernel[(_cdiv(n, _ELEMENTWISE_BLOCK),)](
                g, u, y, n, ACC=_tl_dtype(_acc_dtype(g)), BLOCK=_ELEMENTWISE_BLOCK, num_warps=4)
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        if n:
            _swiglu_bwd_kernel[(_cdiv(n, _ELEMENTWISE_BLOCK),)](
                g, u, dy, dg, du, n, ACC=_tl_dtype(_acc_dtype(g)), BLOCK=_ELEMENTWISE_BLOCK, num_warps=4)
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up as one Triton kernel (and one for backward, which saves only gate and up).

    gate, up: the same shape and dtype (the MLP's two projections). Returns that shape and dtype.
    """
    _check_float_tensor("gate", gate)
    _same_shape("up", up, gate, "gate")
    if up.dtype != gate.dtype:
        raise ValueError(f"gate and up must share one dtype, got {gate.dtype} and {up.dtype}")
    _check_triton(gate, "swiglu")
    return _SwiGLUFunction.apply(gate, up)


# --------------------------------------------------------------------------------------------------
# LM head + cross-entropy in chunks
# --------------------------------------------------------------------------------------------------


@_jit
def _cross_entropy_kernel(LOGITS, TARGETS, LOSS, SCALE, n_cols, ignore_index, COMPUTE_GRAD: tl.constexpr,
                          ACC: tl.constexpr, BLOCK: tl.constexpr):
    """One row: loss = lse - logit[target] (0 if ignored, NaN if the target is out of range); with
    COMPUTE_GRAD the row is overwritten by its gradient (softmax - onehot) * scale."""
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * n_cols
    target = tl.load(TARGETS + row)
    cols = tl.arange(0, BLOCK)
    m = tl.max(tl.full([BLOCK], float("-inf"), ACC), axis=0)
    total = tl.sum(tl.zeros([BLOCK], ACC), axis=0)
    for start in range(0, n_cols, BLOCK):
        x = tl.load(ptr + start + cols, mask=start + cols < n_cols, other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(total)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < n_cols)
    target_logit = tl.load(ptr + tl.where(in_range, target, 0)).to(ACC)
    loss = tl.where(valid, tl.where(in_range, lse - target_logit, float("nan")), 0.0)
    tl.store(LOSS + row, loss)
    if COMPUTE_GRAD:
        scale = tl.where(valid, tl.load(SCALE).to(ACC), 0.0)
        for start in range(0, n_cols, BLOCK):
            idx = start + cols
            x = tl.load(ptr + idx, mask=idx < n_cols, other=0.0).to(ACC)
            grad = (tl.exp(x - lse) - tl.where(idx == target, 1.0, 0.0)) * scale
            tl.store(ptr + idx, grad.to(LOGITS.dtype.element_ty), mask=idx < n_cols)


def _chunk_cross_entropy(logits, targets, scale, ignore_index, compute_grad, use_triton) -> torch.Tensor:
    """Per-row losses (float32, or float64) of one chunk of logits; with compute_grad the logits are replaced
    in place by their gradient (softmax - onehot) * scale (0 on ignored rows)."""
    acc = _acc_dtype(logits)
    if use_triton:
        loss = torch.empty(logits.shape[0], dtype=acc, device=logits.device)
        block = min(_CE_BLOCK, _next_pow2(logits.shape[1]))
        _cross_entropy_kernel[(logits.shape[0],)](
            logits, targets, loss, scale, logits.shape[1], ignore_index, COMPUTE_GRAD=compute_grad,
            ACC=_tl_dtype(acc), BLOCK=block, num_warps=8 if block >= 2048 else 4)
        return loss
    x = logits.to(acc)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)[:, None]
    lse = torch.logsumexp(x, dim=-1)
    loss = torch.where(valid, lse - x.gather(1, safe)[:, 0], 0.0)
    if compute_grad:
        grad = torch.exp(x - lse[:, None]).scatter_add_(1, safe, torch.full_like(lse[:, None], -1.0))
        logits.copy_(grad * torch.where(valid, scale, 0.0)[:, None])
    return loss


def _add_weight_grad(dw: torch.Tensor, dlogits: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """dw + dlogits^T h, summed in dw's float32: cuBLAS writes float32 from 16-bit inputs directly on CUDA (no
    rounded 16-bit partial, no extra pass over the (vocab x hidden) gradient per chunk)."""
    global _FP32_OUT_MATMUL
    if dw.dtype == dlogits.dtype:
        return dw.addmm_(dlogits.T, h)
    if dw.is_cuda and _FP32_OUT_MATMUL:
        try:
            return torch.addmm(dw, dlogits.T, h, out_dtype=dw.dtype)
        except (TypeError, RuntimeError):  # torch < 2.8, or a GPU whose cuBLAS path lacks it
            _FP32_OUT_MATMUL = False
    return dw.add_(dlogits.T @ h)


def _chunked_loss(hidden, weight, targets, scale, ignore_index, chunk_size, compute_grad):
    """The forward pass of `linear_cross_entropy`: (loss, dh or None, dW or None), chunk by chunk."""
    dtype = _autocast_or(hidden, hidden.dtype)
    w = weight.to(dtype)
    use_triton = triton_wanted(hidden)
    n = hidden.shape[0]
    losses = []
    dh = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if compute_grad else None
    dw = torch.zeros(weight.shape, dtype=_acc_dtype(w), device=hidden.device) if compute_grad else None
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size].to(dtype)
            logits = h @ w.T
            losses.append(_chunk_cross_entropy(logits, targets[start:start + chunk_size], scale, ignore_index,
                                               compute_grad, use_triton))
            if compute_grad:  # logits now hold their gradient
                torch.mm(logits, w, out=dh[start:start + chunk_size])
                dw = _add_weight_grad(dw, logits, h)
            del logits  # freed before the next chunk's are allocated: one chunk of logits alive at a time, not two
    loss = torch.cat(losses).sum() * scale if losses else (torch.zeros((), device=hidden.device) * scale)
    return loss, dh, dw


class _LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, scale, ignore_index, chunk_size):
        loss, dh, dw = _chunked_loss(hidden, weight, targets, scale, ignore_index, chunk_size, compute_grad=True)
        ctx.save_for_backward(dh, dw)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.consumed = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.consumed:
            raise RuntimeError("linear_cross_entropy keeps its gradients from the forward pass and scales them in "
                               "place: backward through it can run only once (no retain_graph)")
        ctx.consumed = True
        dh, dw = ctx.saved_tensors
        grad_loss = grad_loss.to(dw.dtype)
        d_hidden = dh.mul_(grad_loss.to(dh.dtype)).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        d_weight = dw.mul_(grad_loss).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return d_hidden, d_weight, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         ignore_index: int = IGNORE_INDEX, num_items_in_batch=None,
                         chunk_size: int | None = None) -> torch.Tensor:
    """Cross-entropy of the logits hidden @ weight^T against targets, without ever holding all the logits.

    Args:
        hidden: (N, C) final hidden states. weight: (V, C) the LM head. targets: (N,) int class per row,
            ``ignore_index`` for rows that are not scored.
        num_items_in_batch: divide the summed loss by this (an int or a 0-d tensor; transformers' convention for
            gradient accumulation) instead of by the number of scored rows.
        chunk_size: rows per chunk; by default the largest power of two that keeps one chunk's logits within
            CE_CHUNK_ELEMENTS entries.
    Returns:
        The mean (or sum / num_items_in_batch) loss, a 0-d float32 tensor (float64 for float64 inputs).

    Logits are computed in autocast's dtype when autocast is on, else in hidden's dtype; softmax and loss in
    float32. When a gradient is needed, dh and dW are computed chunk by chunk during this call, and the backward
    pass only scales them: it can run once per call. On CUDA the per-chunk softmax is a Triton kernel; elsewhere
    PyTorch ops (an out-of-range target gives a NaN loss on CUDA and an error elsewhere).
    """
    for name, t, dims in (("hidden", hidden, 2), ("weight", weight, 2), ("targets", targets, 1)):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            raise ValueError(f"{name} must be a {dims}-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must have shape (vocab, {hidden.shape[1]}), got {tuple(weight.shape)}")
    if targets.shape[0] != hidden.shape[0] or targets.is_floating_point():
        raise ValueError(f"targets must be an integer tensor of shape ({hidden.shape[0]},), got "
                         f"{targets.dtype} {tuple(targets.shape)}")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating-point tensor, got {hidden.dtype}")
    if weight.device != hidden.device or targets.device != hidden.device:
        raise ValueError(f"hidden, weight and targets must be on one device, got {hidden.device}, "
                         f"{weight.device}, {targets.device}")
    if not triton_wanted(hidden):  # the check costs a host sync on CUDA, where the kernel returns NaN instead
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(f"targets must lie in [0, {weight.shape[0]}) or be ignore_index ({ignore_index}), got "
                             f"{targets[bad][:5].tolist()}")
    if chunk_size is None:
        chunk_size = 2 ** max(0, (CE_CHUNK_ELEMENTS // weight.shape[0]).bit_length() - 1)
    elif not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    targets = targets.contiguous()
    acc = _acc_dtype(hidden, weight)
    count = (targets != ignore_index).sum() if num_items_in_batch is None else num_items_in_batch
    if isinstance(count, torch.Tensor):
        scale = (1.0 / count.to(hidden.device, acc)).reshape(())
    else:  # filled on the device, not copied there: a CUDA graph can capture it
        scale = torch.full((), 1.0 / count if count else float("inf"), dtype=acc, device=hidden.device)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropyFunction.apply(hidden, weight, targets, scale, ignore_index, chunk_size)
    return _chunked_loss(hidden, weight, targets, scale, ignore_index, chunk_size, compute_grad=False)[0]


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                   ignore_index: int = IGNORE_INDEX, num_items_in_batch=None) -> torch.Tensor:
    """The next-token loss of a causal LM from its final hidden states (B, T, C) and labels (B, T):
    position t predicts labels[:, t + 1] (the last position predicts nothing), as transformers' loss does."""
    if not isinstance(labels, torch.Tensor) or labels.shape != hidden.shape[:2] or labels.is_floating_point():
        raise ValueError(f"labels must be an integer tensor of shape (batch, seq_len) = {tuple(hidden.shape[:2])}, "
                         f"got {labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__} "
                         f"{tuple(getattr(labels, 'shape', ()))}")
    labels = labels.to(hidden.device)
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], dim=1)
    return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                ignore_index=ignore_index, num_items_in_batch=num_items_in_batch)


# --------------------------------------------------------------------------------------------------
# The module the model swaps in
# --------------------------------------------------------------------------------------------------


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm that can add a residual first and gate its output, fused into one Triton kernel on CUDA.

    ``forward(x, residual=None, gate=None)`` returns norm(x + residual) (* sigmoid(gate)), plus the sum
    x + residual when a residual is given. With ``fused=False``, on the CPU, or without Triton it runs the
    same math as plain PyTorch ops (nn.RMSNorm's).
    """

    def __init__(self, dim: int, eps: float, fused: bool = False):
        super().__init__(dim, eps=eps)
        self.fused = fused

    def forward(self, x, residual=None, gate=None):
        if self.fused and triton_wanted(x):
            return rms_norm(x, self.weight, self.eps, residual=residual, gate=gate)
        if residual is not None:
            x = x + residual
        y = super().forward(x)
        if gate is not None:
            y = y * torch.sigmoid(gate)
        return (y, x) if residual is not None else y
