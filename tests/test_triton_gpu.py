"""The Triton kernels on a CUDA GPU: realistic shapes, 16-bit inputs, all four gradients.

References run on the GPU too: the exact float64 reference where the (T, T) scores fit, else the
chunked torch path on float32 copies. bf16/fp16 must land within 1e-2 relative error, float32 (which
the kernels multiply in IEEE float32, not tf32) within 1e-4.
"""

import pytest
import torch
import torch.nn.functional as F

from fused_cases import attention_with_output_norm, compare

from foxlab.attention import forgetting_attention, forgetting_attention_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(0.1)).item()


def make_inputs(B, Tq, Tk, H, Hkv, D, dtype):
    q = torch.randn(B, Tq, H, D, device="cuda", dtype=dtype)
    k = torch.randn(B, Tk, Hkv, D, device="cuda", dtype=dtype)
    v = torch.randn(B, Tk, Hkv, D, device="cuda", dtype=dtype)
    log_f = F.logsigmoid(torch.randn(B, Tk, H, device="cuda") + 3.0)  # gate logits ~ N(3, 1): f ~ 0.95, a long memory
    return q, k, v, log_f


def check(B, Tq, H, D, dtype=torch.bfloat16, Tk=None, Hkv=None, cumsum=False, **kw):
    """Compare output and gradients with the reference; returns the Triton output and gradients. With ``cumsum`` the
    kernels get the gate as its prefix sums (log_fgate_cumsum, heads-first storage as the cache keeps it) and the
    gradient of c is mapped to log f (dlog f_t = sum_{u >= t} dc_u)."""
    Tk = Tq if Tk is None else Tk
    Hkv = H if Hkv is None else Hkv
    q, k, v, log_f = make_inputs(B, Tq, Tk, H, Hkv, D, dtype)
    gate = log_f.cumsum(1).transpose(1, 2).contiguous().transpose(1, 2) if cumsum else log_f
    leaves = [t.clone().requires_grad_() for t in (q, k, v, gate)]
    if cumsum:
        out = forgetting_attention(*leaves[:3], log_fgate_cumsum=leaves[3], backend="triton", **kw)
    else:
        out = forgetting_attention(*leaves, backend="triton", **kw)
    d_out = torch.randn_like(out)
    grads = list(torch.autograd.grad(out, leaves, d_out))
    if cumsum:
        grads[3] = grads[3].flip(1).cumsum(1).flip(1)

    exact = B * H * Tq * Tk <= 2**25
    ref_dtype = torch.float64 if exact else torch.float32
    ref_leaves = [t.detach().to(ref_dtype).requires_grad_() for t in (q, k, v, log_f)]
    if exact:
        ref = forgetting_attention_reference(*ref_leaves, **kw)
    else:
        ref = forgetting_attention(*ref_leaves, backend="torch", **kw)
    ref_grads = torch.autograd.grad(ref, ref_leaves, d_out.to(ref_dtype))

    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for name, a, b in zip(("out", "dq", "dk", "dv", "dlog_f"), (out, *grads), (ref, *ref_grads)):
        assert not torch.isnan(a).any(), f"{name} has NaN"
        err = rel_err(a, b)
        print(f"{name} {err:.1e}", end="  ")
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol}"
    print()
    return out, grads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_head_dims_and_dtypes(D, dtype):
    check(2, 1024, 4, D, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scale_kernel_rounds_like_torch(dtype):
    """The Hopper backward's last pass, float32 dQ sums times the scale into dq, rounds as torch does."""
    from foxlab.kernels import blocked
    x = torch.randn(3 * blocked._SCALE_BLOCK + 77, device="cuda") * 30
    y = torch.empty(x.shape, dtype=dtype, device="cuda")
    blocked._scale_kernel[(4,)](x, y, 0.125, x.numel(), BLOCK=blocked._SCALE_BLOCK)
    assert torch.equal(y, (x * 0.125).to(dtype))


@pytest.mark.parametrize("D", [48, 80, 96, 192])
def test_non_power_of_two_head_dims(D):
    check(2, 777, 4, D)


@pytest.mark.parametrize("T,D", [(8192, 64), (8192, 128), (4096, 256)])
def test_long_sequences(T, D):
    check(1, T, 4, D)


def test_float32_is_ieee_accurate():
    check(2, 700, 4, 64, torch.float32)


def test_gqa():
    check(2, 2048, 8, 64, Hkv=2)
    check(1, 1000, 8, 128, Hkv=1)


def test_varlen():
    lengths = torch.randint(1, 1500, (6,))
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).cuda()
    check(1, int(offsets[-1]), 4, 128, Hkv=2, cu_seqlens=offsets)


@pytest.mark.parametrize("cumsum", [False, True], ids=["log_f", "cumsum"])
@pytest.mark.parametrize("Tq,Tk", [(256, 2048), (333, 1001), (17, 4096)])
def test_chunked_prefill(Tq, Tk, cumsum):
    check(2, Tq, 4, 128, Tk=Tk, cumsum=cumsum)


@pytest.mark.parametrize("cumsum", [False, True], ids=["log_f", "cumsum"])
@pytest.mark.parametrize("Tq", [1, 4, 16])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_decode(Tq, D, cumsum):
    check(4, Tq, 8, D, Tk=4099, Hkv=2, cumsum=cumsum)


def test_decode_long_cache_from_prefix_sums():
    """32k cached keys, the gate's prefix sums reaching ~ -1700: the split kernel takes their differences first."""
    check(1, 1, 16, 64, Tk=32768, Hkv=4, cumsum=True)
    check(1, 64, 16, 128, Tk=8192, Hkv=16, cumsum=True, seq_start=torch.tensor([100], device="cuda"))


def test_decode_matches_full_forward():
    """The split-key decode of the last position equals the last row of the full forward."""
    q, k, v, log_f = make_inputs(2, 3000, 3000, 4, 4, 128, torch.bfloat16)
    full = forgetting_attention(q, k, v, log_f, backend="triton")
    last = forgetting_attention(q[:, -1:], k, v, log_f, backend="triton")
    assert rel_err(last, full[:, -1:]) <= 1e-2


def test_left_padding_rows_without_keys():
    seq_start = torch.tensor([0, 700, 2048], device="cuda")
    out, grads = check(3, 2048, 4, 64, seq_start=seq_start)
    assert out[2].abs().max() == 0 and out[1, :700].abs().max() == 0
    assert all(g[2].abs().max() == 0 for g in grads)
    out, grads = check(3, 1, 4, 64, Tk=2048, seq_start=seq_start)  # decode: batch row 2 sees nothing
    assert out[2].abs().max() == 0


def test_auto_backend_uses_triton_on_cuda():
    q, k, v, log_f = make_inputs(1, 300, 300, 2, 2, 64, torch.bfloat16)
    out = forgetting_attention(q.requires_grad_(), k, v, log_f)
    assert "Triton" in type(out.grad_fn).__name__


@pytest.mark.parametrize("B,T,H,Hkv,D", [(2, 2048, 8, 8, 64), (1, 4096, 8, 2, 128), (2, 1000, 4, 4, 96),
                                       (1, 4096, 4, 2, 64)])  # the last: the long-sequence forward tiles
def test_pruning_bf16(B, T, H, Hkv, D):
    """ACP at realistic sizes in bf16: the pruned kernels against the pruned torch path in float32, same threshold
    (gates on a 1/16 grid and thresholds between grid points, so both drop exactly the same scores)."""
    from conftest import quantized_gates
    q, k, v, _ = make_inputs(B, T, T, H, Hkv, D, torch.bfloat16)
    log_f, threshold = (t.cuda() for t in quantized_gates(B, T, H))
    leaves = [t.clone().requires_grad_() for t in (q, k, v, log_f)]
    out = forgetting_attention(*leaves, backend="triton", adaptive_threshold=threshold)
    d_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, d_out)
    ref_leaves = [t.detach().float().requires_grad_() for t in (q, k, v, log_f)]
    ref = forgetting_attention(*ref_leaves, backend="torch", adaptive_threshold=threshold)
    ref_grads = torch.autograd.grad(ref, ref_leaves, d_out.float())
    for name, a, b in zip(("out", "dq", "dk", "dv", "dlog_f"), (out, *grads), (ref, *ref_grads)):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) <= 1e-2, f"{name}: relative error {rel_err(a, b):.2e}"


@pytest.mark.parametrize("Tq,Tk,H,Hkv,D,per_head,with_gate", [
    (1024, 1024, 12, 12, 64, True, True),   # fox-pro-125m's heads
    (777, 777, 8, 2, 128, False, True),     # GQA, one shared weight vector
    (300, 300, 4, 4, 96, True, False),      # the norm without the gate
    (1, 4096, 16, 4, 128, True, True),      # decoding: the split kernel, then the norm's kernel
])
def test_output_norm_in_the_kernels(Tq, Tk, H, Hkv, D, per_head, with_gate):
    """FoX Pro's output norm (and gate) inside the attention kernels, bf16, against the float64 reference followed by
    the plain norm: the output and all six gradients."""
    weight = 1 + 0.5 * torch.randn((H, D) if per_head else (D,), device="cuda")
    gate = torch.randn(2, Tq, H, D, device="cuda", dtype=torch.bfloat16) * 2 if with_gate else None
    errors = compare(attention_with_output_norm("triton"), attention_with_output_norm("reference"),
                     (*make_inputs(2, Tq, Tk, H, Hkv, D, torch.bfloat16), weight, gate), 1e-2)
    print(" ".join(f"{name} {err:.1e}" for name, err in errors.items()))


# --------------------------------------------------------------------------------------------------
# Hopper: the warp-specialized forward and backward (kernels/hopper.py, hopper_backward.py) and the portable
# kernels they replace there.
# --------------------------------------------------------------------------------------------------

def _hopper():
    from foxlab.kernels import blocked
    return blocked.hopper if torch.cuda.get_device_capability() == (9, 0) else None


hopper_only = pytest.mark.skipif(not torch.cuda.is_available() or _hopper() is None,
                                 reason="needs an sm_90 GPU and a Triton with Gluon")


@pytest.fixture
def warp_specialized_calls(monkeypatch):
    """The shapes of q that hopper.forward ran, in order."""
    hopper, calls = _hopper(), []
    forward = hopper.forward
    monkeypatch.setattr(hopper, "forward", lambda q, *rest: calls.append(tuple(q.shape)) or forward(q, *rest))
    return calls


@pytest.fixture
def warp_specialized_backward_calls(monkeypatch):
    """The shapes of q that hopper_backward.backward ran, in order."""
    from foxlab.kernels import hopper_backward
    calls, backward = [], hopper_backward.backward
    monkeypatch.setattr(hopper_backward, "backward",
                        lambda do, q, *rest: calls.append(tuple(q.shape)) or backward(do, q, *rest))
    return calls


@hopper_only
@pytest.mark.parametrize("D", [64, 128])  # at 64 the row sums come from the tensor cores (`hopper._sums_by_mma`)
@pytest.mark.parametrize("B,T,H,Hkv,dtype", [
    (2, 1000, 4, 4, torch.bfloat16),  # T not a multiple of the 128-row tiles
    (1, 129, 4, 2, torch.float16),    # GQA, one row past a tile, c2's rows not 16 bytes apart (padded)
    (3, 257, 2, 1, torch.float16),    # one kv head for two query heads; the second consumer's rows all past T
    (1, 100, 4, 4, torch.bfloat16),   # shorter than one tile
    (1, 4096, 8, 8, torch.bfloat16),  # more tiles than SMs: the persistent loop's later rounds
])
def test_warp_specialized_forward(warp_specialized_calls, B, T, H, Hkv, dtype, D):
    """Output and all four gradients (the backward reads its lse) against the reference."""
    check(B, T, H, D, dtype, Hkv=Hkv)
    assert warp_specialized_calls == [(B, T, H, D)]


@hopper_only
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("heads_per_group", [2, 8, 30])
def test_warp_specialized_forward_tile_orders(monkeypatch, warp_specialized_calls, heads_per_group, D):
    """360 tiles (12 per (batch, head), 30 of those, two heads per kv head) on fewer SMs, so programs take several,
    in groups of one kv head, of four (the first group of three) and of all 30 (`hopper._longest_first`)."""
    monkeypatch.setattr(_hopper(), "_heads_per_group", lambda *args: heads_per_group)
    check(5, 1500, 6, D, torch.bfloat16, Hkv=3)
    assert warp_specialized_calls == [(5, 1500, 6, D)]


@hopper_only
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("T", [3000, 3001])
def test_warp_specialized_and_portable_forwards_agree(monkeypatch, T, D):
    """Same inputs through both forwards: O to bf16 rounding, the lse (what the backward reads) to float32's."""
    from foxlab.kernels import blocked
    q, k, v, log_f = make_inputs(2, T, T, 4, 2, D, torch.bfloat16)
    c2 = blocked._base2_prefix_sums(log_f, False)
    o_ws, lse_ws, *_ = blocked._triton_forward(q, k, v, c2, None, None, D ** -0.5)
    monkeypatch.setattr(_hopper(), "enabled", False)
    o, lse, *_ = blocked._triton_forward(q, k, v, c2, None, None, D ** -0.5)
    assert rel_err(o_ws, o) <= 4e-3
    assert (lse_ws - lse).abs().max() <= 1e-3 * lse.abs().max().clamp_min(1)


@hopper_only
def test_warp_specialized_forward_reads_stacked_projections(warp_specialized_calls):
    """q, k, v as column slices of one (B, T, 3 * H * D) projection: rows 3 * H * D apart, read by TMA in place."""
    B, T, H, D = 2, 700, 4, 128
    qkv = torch.randn(B, T, 3, H, D, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    log_f = F.logsigmoid(torch.randn(B, T, H, device="cuda") + 3.0)
    out = forgetting_attention(q, k, v, log_f, backend="triton")
    ref = forgetting_attention_reference(*(t.double() for t in (q, k, v, log_f)))
    assert warp_specialized_calls == [(B, T, H, D)]
    assert rel_err(out, ref) <= 1e-2


@hopper_only
@pytest.mark.parametrize("case", ["padding", "chunked prefill", "pruning", "head dim 80", "float32", "output norm"])
def test_portable_forward_where_the_warp_specialized_one_does_not_apply(warp_specialized_calls, case):
    B, T, H, D = 2, 512, 4, 80 if case == "head dim 80" else 128
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    q, k, v, log_f = make_inputs(B, T, T, H, H, D, dtype)
    kw = {"padding": dict(seq_start=torch.tensor([0, 100], device="cuda")), "pruning": dict(adaptive_threshold="auto"),
          "output norm": dict(output_norm_weight=torch.ones(D, device="cuda"))}.get(case, {})
    if case == "chunked prefill":
        q = q[:, -100:]
    out = forgetting_attention(q, k, v, log_f, backend="triton", **kw)
    assert torch.isfinite(out).all() and not warp_specialized_calls


@hopper_only
def test_portable_forward_on_hopper(monkeypatch):
    """The portable forward still serves everything the warp-specialized one does (other GPUs run it)."""
    monkeypatch.setattr(_hopper(), "enabled", False)
    check(2, 1024, 4, 128, Hkv=2)
    check(1, 333, 4, 128, torch.float16)


@hopper_only
@pytest.mark.parametrize("B,T,H,Hkv,D,dtype,cumsum", [
    (2, 1000, 4, 4, 128, torch.bfloat16, False),  # T not a multiple of the 128-key programs or 64-row blocks
    (1, 129, 4, 2, 128, torch.float16, False),    # GQA: a program sums dK, dV over two heads; vectors padded to 132
    (3, 257, 2, 1, 64, torch.float16, False),     # one kv head for two query heads, head dim 64
    (1, 100, 4, 4, 64, torch.bfloat16, False),    # shorter than one program's keys
    (2, 333, 4, 4, 64, torch.bfloat16, True),     # the gate as its prefix sums: dc straight from the sums
    (1, 4096, 8, 8, 128, torch.bfloat16, False),  # many tiles adding into the same dQ rows, more than SMs
])
def test_warp_specialized_backward(warp_specialized_backward_calls, B, T, H, Hkv, D, dtype, cumsum):
    """All four gradients against the reference."""
    check(B, T, H, D, dtype, Hkv=Hkv, cumsum=cumsum)
    assert warp_specialized_backward_calls == [(B, T, H, D)]


@hopper_only
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("heads_per_group", [1, 4, 15])
def test_warp_specialized_backward_tile_orders(monkeypatch, warp_specialized_backward_calls, heads_per_group, D):
    """180 tiles (12 per (batch, kv head), 15 of those) on fewer SMs, so programs take several, in groups of one
    head, of four (the first group of three) and of all 15 (`hopper_backward._tile_keys`)."""
    from foxlab.kernels import hopper_backward
    B, T, H, Hkv = 5, 1500, 6, 3
    head_bytes = 2 * T * (H // Hkv) * D * 2  # q and dO of one (batch, kv head)
    monkeypatch.setattr(hopper_backward, "Q_DO_IN_L2", heads_per_group * head_bytes)
    check(B, T, H, D, torch.bfloat16, Hkv=Hkv)
    assert warp_specialized_backward_calls == [(B, T, H, D)]


@hopper_only
@pytest.mark.parametrize("D", [64, 128])
def test_warp_specialized_backward_with_short_memory(warp_specialized_backward_calls, D):
    """Gates near 0.3: each query sees a few recent keys, and dlog f is a small sum next to dS's rounding. At head dim
    64 the kernel sums dS rounded to 16 bits (`hopper_backward._sums_by_mma`): dlog f must stay as accurate as dq."""
    B, T, H = 2, 777, 4
    q, k, v, _ = make_inputs(B, T, T, H, H, D, torch.bfloat16)
    log_f = F.logsigmoid(torch.randn(B, T, H, device="cuda") - 1.0)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, log_f)]
    out = forgetting_attention(*leaves, backend="triton")
    d_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, d_out)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v, log_f)]
    ref_grads = torch.autograd.grad(forgetting_attention_reference(*ref_leaves), ref_leaves, d_out.double())
    errors = [rel_err(a, b) for a, b in zip(grads, ref_grads)]
    assert errors[3] <= max(2 * errors[0], 5e-3), f"dq, dk, dv, dlog f relative errors: {errors}"
    assert warp_specialized_backward_calls == [(B, T, H, D)]


@hopper_only
@pytest.mark.parametrize("T,D", [(3000, 128), (3001, 64)])
def test_warp_specialized_and_portable_backwards_agree(monkeypatch, T, D):
    """Same inputs through both backwards: the gradients to 16-bit rounding (dQ's sums come in another order)."""
    from foxlab.kernels import blocked
    q, k, v, log_f = make_inputs(2, T, T, 4, 2, D, torch.bfloat16)
    do = torch.randn_like(q)
    c2 = blocked._base2_prefix_sums(log_f, False)
    o, lse, *_ = blocked._triton_forward(q, k, v, c2, None, None, D ** -0.5)
    args = (do, q, k, v, log_f, o, lse, None, None, None, D ** -0.5)
    fast = blocked._triton_backward(*args)[:4]
    monkeypatch.setattr(blocked.hopper_backward, "enabled", False)
    portable = blocked._triton_backward(*args)[:4]
    for name, a, b in zip(("dq", "dk", "dv", "dlog_f"), fast, portable):
        assert rel_err(a, b) <= 4e-3, name


@hopper_only
def test_warp_specialized_backward_under_the_output_norm(warp_specialized_backward_calls):
    """With FoX Pro's output norm the forward is portable (its epilogue holds the norm), the backward is not: the
    delta kernel takes dY back to dO first."""
    B, T, H, D = 2, 300, 4, 128
    weight = 1 + 0.5 * torch.randn(D, device="cuda")
    errors = compare(attention_with_output_norm("triton"), attention_with_output_norm("reference"),
                     (*make_inputs(B, T, T, H, H, D, torch.bfloat16), weight, None), 1e-2)
    assert warp_specialized_backward_calls == [(B, T, H, D)], errors


@hopper_only
@pytest.mark.parametrize("case", ["padding", "chunked prefill", "pruning", "head dim 96", "float32"])
def test_portable_backward_where_the_warp_specialized_one_does_not_apply(warp_specialized_backward_calls, case):
    B, T, H, D = 2, 512, 4, 96 if case == "head dim 96" else 128
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    q, k, v, log_f = (t.requires_grad_() for t in make_inputs(B, T, T, H, H, D, dtype))
    kw = {"padding": dict(seq_start=torch.tensor([0, 100], device="cuda")), "pruning": dict(adaptive_threshold="auto")
          }.get(case, {})
    query = q[:, -100:] if case == "chunked prefill" else q
    out = forgetting_attention(query, k, v, log_f, backend="triton", **kw)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v, log_f))
    assert all(torch.isfinite(g).all() for g in grads) and not warp_specialized_backward_calls


@hopper_only
def test_deterministic_algorithms_take_the_portable_backward(warp_specialized_backward_calls):
    """torch.use_deterministic_algorithms: the portable backward, whose sums have a fixed order, twice bitwise."""
    q, k, v, log_f = (t.requires_grad_() for t in make_inputs(1, 300, 300, 2, 2, 128, torch.bfloat16))
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        runs = [torch.autograd.grad(forgetting_attention(q, k, v, log_f, backend="triton").float().square().sum(),
                                    (q, k, v, log_f)) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(False)
    assert not warp_specialized_backward_calls
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@hopper_only
def test_portable_backward_on_hopper(monkeypatch):
    """The portable backward still serves everything the warp-specialized one does (other GPUs run it)."""
    from foxlab.kernels import blocked
    monkeypatch.setattr(blocked.hopper_backward, "enabled", False)
    check(2, 1024, 4, 64, Hkv=2)
    check(1, 333, 4, 128, torch.float16)
