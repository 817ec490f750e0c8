"""Shared by the fused-op tests (interpreter and GPU): exact PyTorch references and the comparison helper.

Every comparison draws fresh random inputs, runs the op and its reference (in float64) on copies, and compares
every output and every input gradient for one random cotangent by relative error ||a - b|| / ||b||.
"""

import math

import torch
import torch.nn.functional as F

from foxlab import fused, fused_inputs
from foxlab.attention import forgetting_attention


def ref_rms_norm(x, weight, eps, residual=None, gate=None):
    s = x + residual if residual is not None else x
    y = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * weight
    if gate is not None:
        y = y * torch.sigmoid(gate)
    return (y, s) if residual is not None else y


def ref_swiglu(gate, up):
    return F.silu(gate) * up


def ref_token_shift(x, previous, a_logits):
    before = torch.cat([previous if previous is not None else torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    a = torch.sigmoid(a_logits)[..., None]
    return a * before + (1 - a) * x


def attention_with_output_norm(backend):
    """forgetting_attention on ``backend`` with FoX Pro's output norm and gate, as compare() calls it: (q, k, v,
    log_f, weight, gate or None)."""
    def run(q, k, v, log_f, weight, gate):
        return forgetting_attention(q, k, v, log_f, backend=backend, output_norm_weight=weight, output_gate=gate,
                                    output_norm_eps=1e-5)
    return run


def ref_linear_cross_entropy(hidden, weight, targets, **kwargs):
    return F.cross_entropy(hidden @ weight.T, targets, ignore_index=fused.IGNORE_INDEX)


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def compare(op, reference, tensors, tol, **kwargs):
    """Run op(*tensors, **kwargs) and reference on float64 copies; check outputs and gradients of the floating
    tensors (None and integer tensors pass through). Returns {name: relative error}."""
    def leaves(dtype=None):
        out = []
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t = t.detach().clone() if dtype is None else t.detach().to(dtype)
                t.requires_grad_()
            out.append(t)
        return out

    ours_in, ref_in = leaves(), leaves(torch.float64)
    ours = op(*ours_in, **kwargs)
    ref = reference(*ref_in, **kwargs)
    ours, ref = (ours, ref) if isinstance(ours, tuple) else ((ours,), (ref,))
    cotangents = [torch.randn_like(o, dtype=torch.float64) for o in ref]
    grad_of = [i for i, t in enumerate(ours_in) if isinstance(t, torch.Tensor) and t.requires_grad]
    ours_grads = torch.autograd.grad(ours, [ours_in[i] for i in grad_of],
                                     [c.to(o.dtype) for c, o in zip(cotangents, ours)])
    ref_grads = torch.autograd.grad(ref, [ref_in[i] for i in grad_of], cotangents)
    errors = {}
    for name, a, b in [*((f"out{i}", a, b) for i, (a, b) in enumerate(zip(ours, ref))),
                       *((f"d{i}", a, b) for i, a, b in zip(grad_of, ours_grads, ref_grads))]:
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name} has NaN/inf"
        errors[name] = rel_err(a, b)
    assert all(e <= tol for e in errors.values()), f"relative errors above {tol}: {errors}"
    return errors


def random_weight(shape, device, dtype):
    return (1 + 0.5 * torch.randn(shape, device=device)).to(dtype)


def rms_norm_cases(device, dtype, residual_dtype=None):
    """(x, weight, eps, residual, gate) for rms_norm: odd row counts and widths, plain / residual / gate / both;
    per-head weights (heads, D) too (odd head counts, with and without the gate)."""
    residual_dtype = residual_dtype or dtype
    for shape in [(3, 37), (2, 5, 100), (2, 7, 3, 48)]:
        x = torch.randn(shape, device=device, dtype=dtype)
        w = random_weight(shape[-1], device, dtype)
        for residual, gate in [(False, False), (True, False), (False, True), (True, True)]:
            r = torch.randn(shape, device=device, dtype=residual_dtype) if residual else None
            g = torch.randn(shape, device=device, dtype=dtype) * 2 if gate else None
            yield x, w, 1e-6, r, g
    for shape in [(2, 7, 3, 48), (5, 1, 20), (3, 9, 5, 16)]:
        x = torch.randn(shape, device=device, dtype=dtype)
        for gate in (False, True):
            g = torch.randn(shape, device=device, dtype=dtype) * 2 if gate else None
            yield x, random_weight(shape[-2:], device, dtype), 1e-5, None, g


# Which of FoX Pro's input steps an attention_inputs case runs: (q/k norms, k shift, v shift, a previous token)
INPUT_STEPS = [(True, True, True, False), (True, True, True, True), (True, False, False, False),
               (False, True, True, True), (False, True, False, False), (False, False, True, True),
               (True, True, False, False), (True, False, True, True)]


def attention_inputs_cases(device, dtype, sizes=((2, 7, 3, 1, 20, True), (1, 13, 4, 2, 48, False),
                                                 (3, 5, 2, 5, 16, True))):
    """(q, k, v, q_weight, k_weight, k_shift_logits, v_shift_logits, k_previous, v_previous) for attention_inputs:
    every combination of steps a config can ask for (INPUT_STEPS), per-head and shared weights, odd sizes, k and v
    with fewer heads than q (grouped-query) or more."""
    for B, T, H, Hkv, D, per_head in sizes:
        for norm, shift_k, shift_v, previous in INPUT_STEPS:
            weights = [(H, D), (Hkv, D)] if per_head else [(D,), (D,)]
            yield (torch.randn(B, T, H, D, device=device, dtype=dtype),
                   *(torch.randn(B, T, Hkv, D, device=device, dtype=dtype) for _ in "kv"),
                   *(random_weight(shape, device, dtype) if norm else None for shape in weights),
                   *(torch.randn(B, T, Hkv, device=device, dtype=dtype) * 2 if on else None for on in (shift_k, shift_v)),
                   *(torch.randn(B, 1, Hkv, D, device=device, dtype=dtype) if previous and on else None
                     for on in (shift_k, shift_v)))


def attention_inputs_op(q, k, v, q_weight, k_weight, k_shift_logits, v_shift_logits, k_previous, v_previous):
    return fused_inputs.attention_inputs(q, k, v, q_weight=q_weight, k_weight=k_weight, eps=1e-5,
                                  k_shift_logits=k_shift_logits, v_shift_logits=v_shift_logits, k_previous=k_previous,
                                  v_previous=v_previous)


def ref_attention_inputs(q, k, v, q_weight, k_weight, k_shift_logits, v_shift_logits, k_previous, v_previous):
    """The unfused order: shift k and v, then normalize q and k."""
    if k_shift_logits is not None:
        k = ref_token_shift(k, k_previous, k_shift_logits)
    if v_shift_logits is not None:
        v = ref_token_shift(v, v_previous, v_shift_logits)
    if q_weight is not None:
        q, k = ref_rms_norm(q, q_weight, 1e-5), ref_rms_norm(k, k_weight, 1e-5)
    return q, k, v


def rms_norm_op(x, w, eps, residual=None, gate=None):
    return fused.rms_norm(x, w, eps, residual=residual, gate=gate)


def token_shift_cases(device, dtype):
    for B, T, H, D, with_previous in [(2, 9, 3, 5, False), (1, 17, 2, 48, True), (3, 1, 1, 7, True)]:
        x = torch.randn(B, T, H, D, device=device, dtype=dtype)
        previous = torch.randn(B, 1, H, D, device=device, dtype=dtype) if with_previous else None
        yield x, previous, torch.randn(B, T, H, device=device, dtype=dtype) * 2


def cross_entropy_cases(device, dtype):
    """(hidden, weight, targets, chunk_size): odd sizes, a quarter of the rows ignored, chunks that do not divide."""
    for N, C, V, chunk in [(29, 11, 100, 8), (7, 33, 1, 3), (40, 16, 257, 64), (5, 8, 50, 1)]:
        targets = torch.randint(0, V, (N,), device=device)
        targets[::4] = fused.IGNORE_INDEX
        yield (torch.randn(N, C, device=device, dtype=dtype), torch.randn(V, C, device=device, dtype=dtype) / C**0.5,
               targets, chunk)


def from_column_slices(fn, *groups):
    """fn whose first tensor arguments are cut from wide (..., width) tensors, as the attention's stacked projections
    give them: wide tensor j is cut into the slices ``groups[j]`` (trailing shapes: each slice the next prod(shape)
    columns viewed as (..., *shape)), with 3 columns left over. ``fn(*slices, *rest)``; the kernels read such
    slices in place (rows a stride apart), the references as any tensor."""
    def wrapped(*args):
        slices = []
        for wide, shapes in zip(args, groups):
            start = 0
            for shape in shapes:
                slices.append(wide[..., start:start + math.prod(shape)].unflatten(-1, shape))
                start += math.prod(shape)
        return fn(*slices, *args[len(groups):])
    return wrapped


def column_slice_cases(device, dtype):
    """(op, reference, tensors) for the norms and shifts on column slices of wide tensors: FoX Pro's q, k, v and
    output gate cut from one projection output, its shift logits from another; odd sizes, a shared-weight norm
    whose rows are not one stride apart (copied), and a gate 2 columns out of step with x."""
    B, T, H, Hkv, D = 2, 7, 3, 1, 20

    def wide(width):
        return torch.randn(B, T, width + 3, device=device, dtype=dtype)

    head, kv = (H, D), (Hkv, D)

    def sliced(op):  # q, k, v and the output gate cut from one wide tensor, the two shift logits from another
        return from_column_slices(lambda q, k, v, _, a_k, a_v, wq, wk, p_k, p_v: op(q, k, v, wq, wk, a_k, a_v, p_k, p_v),
                                  [head, kv, kv, head], [(Hkv,), (Hkv,)])

    norm_gate = from_column_slices(lambda x, g, w, eps: fused.rms_norm(x, w, eps, gate=g), [head, head])
    ref_norm_gate = from_column_slices(lambda x, g, w, eps: ref_rms_norm(x, w, eps, gate=g), [head, head])
    yield norm_gate, ref_norm_gate, (wide(2 * H * D), random_weight(head, device, dtype), 1e-5)
    odd_gate = from_column_slices(lambda _, x, g, w, eps: fused.rms_norm(x, w, eps, gate=g), [(2,), head, head])
    ref_odd_gate = from_column_slices(lambda _, x, g, w, eps: ref_rms_norm(x, w, eps, gate=g), [(2,), head, head])
    yield odd_gate, ref_odd_gate, (wide(2 * H * D + 2), random_weight(head, device, dtype), 1e-5)
    shared = from_column_slices(lambda x, w, eps: fused.rms_norm(x, w, eps), [head])
    yield shared, from_column_slices(lambda x, w, eps: ref_rms_norm(x, w, eps), [head]), (
        wide(H * D), random_weight(D, device, dtype), 1e-5)
    for with_previous in (False, True):
        previous = [torch.randn(B, 1, Hkv, D, device=device, dtype=dtype) if with_previous else None for _ in "kv"]
        yield sliced(attention_inputs_op), sliced(ref_attention_inputs), (
            wide(2 * (H + Hkv) * D), wide(2 * Hkv) * 2, random_weight(head, device, dtype),
            random_weight(kv, device, dtype), *previous)
        one = from_column_slices(lambda _, x, a, p: fused_inputs.token_shift(x, p, a), [(1,), kv], [(Hkv,)])
        ref_one = from_column_slices(lambda _, x, a, p: ref_token_shift(x, p, a), [(1,), kv], [(Hkv,)])
        yield one, ref_one, (wide(Hkv * D + 1), wide(Hkv) * 2, previous[0])
