"""The exact reference and the chunked PyTorch path against an independent float64 loop."""

import math

import pytest
import torch
import torch.nn.functional as F

from foxlab.attention import _forgetting_attention_chunked, forgetting_attention, forgetting_attention_reference


def loop_attention(q, k, v, log_f, scale=None, seq_start=None, cu_seqlens=None):
    """Forgetting attention (docs/fox.md) token by token, float64: O_i = sum_j softmax_j(s q_i.k_j + sum log f) v_j."""
    q, k, v, log_f = (t.double() for t in (q, k, v, log_f))
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(D) if scale is None else scale
    seg = [0] * Tk
    if cu_seqlens is not None:
        for s, (a, b) in enumerate(zip(cu_seqlens.tolist(), cu_seqlens.tolist()[1:])):
            seg[a:b] = [s] * (b - a)
    out = torch.zeros(B, Tq, H, D, dtype=torch.float64)
    for b in range(B):
        first = 0 if seq_start is None else int(seq_start[b])
        for h in range(H):
            kh = h // (H // Hkv)
            for i in range(Tq):
                p = Tk - Tq + i
                keys = [j for j in range(first, p + 1) if seg[j] == seg[p]]
                if not keys:
                    continue
                logits = torch.stack([scale * q[b, i, h] @ k[b, j, kh] + log_f[b, j + 1:p + 1, h].sum() for j in keys])
                w = torch.softmax(logits, dim=0)
                out[b, i, h] = sum(w[n] * v[b, j, kh] for n, j in enumerate(keys))
    return out


def make_inputs(B, Tq, Tk, H, Hkv, D, dtype=torch.float64, requires_grad=False):
    q = torch.randn(B, Tq, H, D, dtype=dtype)
    k = torch.randn(B, Tk, Hkv, D, dtype=dtype)
    v = torch.randn(B, Tk, Hkv, D, dtype=dtype)
    log_f = F.logsigmoid(torch.randn(B, Tk, H, dtype=torch.float64) + 2)
    if dtype != torch.float64:
        log_f = log_f.float()
    return [t.requires_grad_(requires_grad) for t in (q, k, v, log_f)]


SHAPES = [  # (B, Tq, Tk, H, Hkv, D)
    (2, 7, 7, 4, 4, 8),     # odd length
    (1, 1, 1, 2, 2, 16),    # T = 1
    (2, 5, 13, 4, 2, 8),    # Tq < Tk with GQA
    (1, 1, 9, 6, 2, 12),    # decoding one query against a cache
    (3, 11, 11, 4, 1, 6),   # multi-query attention
]


@pytest.mark.parametrize("shape", SHAPES)
def test_reference_matches_loop(shape):
    q, k, v, log_f = make_inputs(*shape)
    ref = forgetting_attention_reference(q, k, v, log_f)
    torch.testing.assert_close(ref, loop_attention(q, k, v, log_f), rtol=1e-12, atol=1e-12)


def test_reference_seq_start_and_scale_match_loop():
    q, k, v, log_f = make_inputs(3, 6, 9, 4, 2, 8)
    seq_start = torch.tensor([0, 4, 9])  # the last row sees no key at all
    out = forgetting_attention_reference(q, k, v, log_f, seq_start=seq_start, sm_scale=0.3)
    torch.testing.assert_close(out, loop_attention(q, k, v, log_f, 0.3, seq_start), rtol=1e-12, atol=1e-12)
    assert torch.all(out[2] == 0)


def test_reference_varlen_matches_loop():
    q, k, v, log_f = make_inputs(1, 12, 12, 2, 1, 8)
    cu = torch.tensor([0, 5, 6, 12])
    out = forgetting_attention_reference(q, k, v, log_f, cu_seqlens=cu)
    torch.testing.assert_close(out, loop_attention(q, k, v, log_f, cu_seqlens=cu), rtol=1e-12, atol=1e-12)


def test_reference_gradcheck():
    q, k, v, log_f = make_inputs(2, 4, 6, 4, 2, 5, requires_grad=True)
    seq_start = torch.tensor([0, 2])
    assert torch.autograd.gradcheck(
        lambda *x: forgetting_attention_reference(*x, seq_start=seq_start), (q, k, v, log_f))


def test_reference_gradients_match_loop():
    inputs = make_inputs(1, 5, 7, 2, 1, 4, requires_grad=True)
    grad_out = torch.randn(1, 5, 2, 4, dtype=torch.float64)
    g_ref = torch.autograd.grad((forgetting_attention_reference(*inputs) * grad_out).sum(), inputs)
    g_loop = torch.autograd.grad((loop_attention(*inputs) * grad_out).sum(), inputs)
    for a, b in zip(g_ref, g_loop):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_no_gate_equals_sdpa_causal():
    q, k, v, _ = make_inputs(2, 9, 9, 4, 4, 8, dtype=torch.float32)
    out = forgetting_attention_reference(q, k, v, torch.zeros(2, 9, 4))
    sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    torch.testing.assert_close(out, sdpa.transpose(1, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,chunk", [((2, 13, 13, 4, 2, 8), 4), ((1, 9, 20, 2, 2, 6), 5), ((1, 1, 5, 2, 1, 4), 3)])
def test_chunked_matches_reference_with_gradients(shape, chunk):
    inputs = make_inputs(*shape, requires_grad=True)
    seq_start = torch.tensor([1] + [0] * (shape[0] - 1))
    ref = forgetting_attention_reference(*inputs, seq_start=seq_start)
    q, k, v, log_f = inputs
    out = _forgetting_attention_chunked(q, k, v, log_f.cumsum(1), 1 / math.sqrt(shape[-1]), seq_start, None,
                                        chunk_size=chunk)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * grad_out).sum(), inputs),
                    torch.autograd.grad((ref * grad_out).sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_chunked_varlen_and_torch_backend():
    q, k, v, log_f = make_inputs(1, 600, 600, 2, 1, 4)  # more than one default chunk
    cu = torch.tensor([0, 250, 251, 600])
    out = forgetting_attention(q, k, v, log_f, cu_seqlens=cu, backend="torch")
    torch.testing.assert_close(out, forgetting_attention_reference(q, k, v, log_f, cu_seqlens=cu))


def test_low_precision_inputs_keep_dtype_and_accuracy():
    q, k, v, log_f = make_inputs(1, 8, 8, 2, 2, 16, dtype=torch.bfloat16)
    out = forgetting_attention(q, k, v, log_f, backend="torch")
    assert out.dtype == torch.bfloat16
    exact = loop_attention(q, k, v, log_f)
    assert (out.double() - exact).norm() / exact.norm() < 1e-2


def test_return_probs_rows_sum_to_one():
    q, k, v, log_f = make_inputs(2, 5, 8, 2, 2, 4)
    _, probs = forgetting_attention_reference(q, k, v, log_f, seq_start=torch.tensor([0, 3]), return_probs=True)
    assert probs.shape == (2, 2, 5, 8)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 5, dtype=torch.float64))
    assert torch.all(probs[1, :, :, :3] == 0)  # padded keys get no weight
    assert torch.all(torch.triu(probs[0, 0, :, 3:], diagonal=1) == 0)  # causal: nothing from the future


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_prefix_sum_input_equals_per_token_gates(backend):
    """log_fgate_cumsum = cumsum(log f) from any origin gives the per-token form's output; the gradient of c maps to
    that of log f by a suffix sum (c_t depends on log f_0..t)."""
    q, k, v, log_f = make_inputs(2, 5, 13, 4, 2, 8, requires_grad=True)
    c = (log_f.detach().cumsum(1) - 7.0).requires_grad_()  # another origin: only differences matter
    seq_start = torch.tensor([0, 3])
    out = forgetting_attention(q, k, v, log_f, seq_start=seq_start, backend=backend)
    out_c = forgetting_attention(q, k, v, log_fgate_cumsum=c, seq_start=seq_start, backend=backend)
    torch.testing.assert_close(out_c, out, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(out)
    (dlog_f,) = torch.autograd.grad(out, log_f, grad_out)
    (dc,) = torch.autograd.grad(out_c, c, grad_out)
    torch.testing.assert_close(dc.flip(1).cumsum(1).flip(1), dlog_f, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gates,message", [
    (dict(), "exactly one of log_fgate"),
    (dict(log_fgate=torch.zeros(1, 6, 4), log_fgate_cumsum=torch.zeros(1, 6, 4)), "exactly one of log_fgate"),
    (dict(log_fgate_cumsum=torch.zeros(1, 6, 2)), r"log_fgate_cumsum must have shape \(batch, Tk, heads\)"),
    (dict(log_fgate_cumsum=torch.zeros(1, 6, 4, dtype=torch.bfloat16)), "log_fgate_cumsum must be float32"),
])
def test_bad_gate_forms_name_the_argument(gates, message):
    q, k = torch.zeros(1, 4, 4, 8), torch.zeros(1, 6, 2, 8)
    for backend in ("torch", "reference"):
        with pytest.raises(ValueError, match=message):
            forgetting_attention(q, k, k, backend=backend, **gates)


BAD_INPUTS = [
    (dict(q=torch.zeros(2, 4, 4)), "q must have shape"),
    (dict(k=torch.zeros(1, 6, 3, 8), v=torch.zeros(1, 6, 3, 8)), "k/v heads"),
    (dict(v=torch.zeros(1, 6, 2, 4)), "v must have the shape of k"),
    (dict(k=torch.zeros(1, 3, 2, 8), v=torch.zeros(1, 3, 2, 8), log_fgate=torch.zeros(1, 3, 4)), "more positions"),
    (dict(log_fgate=torch.zeros(1, 5, 4)), r"log_fgate must have shape \(batch, Tk, heads\) = \(1, 6, 4\)"),
    (dict(log_fgate=torch.zeros(1, 6, 4, dtype=torch.bfloat16)), "log_fgate must be float32"),
    (dict(k=torch.zeros(1, 6, 2, 8, dtype=torch.float64)), "share one dtype"),
    (dict(sm_scale=-1.0), "sm_scale"),
    (dict(seq_start=torch.zeros(2, dtype=torch.long)), "seq_start"),
    (dict(cu_seqlens=torch.tensor([0, 3, 5])), "cu_seqlens"),
    (dict(backend="cuda"), "backend must be one of"),
]


@pytest.mark.parametrize("override,message", BAD_INPUTS)
def test_bad_inputs_name_the_argument(override, message):
    args = dict(q=torch.zeros(1, 4, 4, 8), k=torch.zeros(1, 6, 2, 8), v=torch.zeros(1, 6, 2, 8),
                log_fgate=torch.zeros(1, 6, 4))
    args.update(override)
    kwargs = {name: args.pop(name) for name in ("sm_scale", "seq_start", "cu_seqlens", "backend") if name in args}
    with pytest.raises(ValueError, match=message):
        forgetting_attention(args["q"], args["k"], args["v"], args["log_fgate"], **kwargs)
