"""Adaptive computation pruning (foxlab/acp.py) on every path that prunes: the chunked torch path, the Triton
kernels under TRITON_INTERPRET=1 (marker `interpret`) and on a CUDA GPU (marker `gpu`).

- exactness: with thresholds that no decay sits near (`quantized_gates`), a pruned path equals the float64
  dense attention that drops the same scores (conftest.masked_attention), outputs and all four gradients;
- the promise: with "auto", every query loses at most eps = e^log_eps of its attention weight, and the output
  and gradient errors against exact attention stay within the bounds that follow from it;
- the kernels never read what they skip (keys poisoned with NaN), and log f = 0 prunes nothing, bit for bit;
- the statistics equal a brute-force count over the dense mask.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import masked_attention, quantized_gates

from foxlab import ForgettingTransformerConfig, ForgettingTransformerForCausalLM, acp
from foxlab.attention import forgetting_attention

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = [
    pytest.param(("torch", "cpu"), id="torch"),
    pytest.param(("triton", "cpu"), id="triton-interpret", marks=[
        pytest.mark.interpret, pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")]),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
]


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(0.1)).item()


def inputs(B, Tq, Tk, H, Hkv, D, scale=1.0, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    q = torch.randn(B, Tq, H, D, generator=g) * scale
    k = torch.randn(B, Tk, Hkv, D, generator=g) * scale
    v = torch.randn(B, Tk, Hkv, D, generator=g)
    return q, k, v, g


def run(backend, device, q, k, v, log_f, d_out, **kw):
    """Output and the gradients of (q, k, v, log f) for one output gradient, on the given path."""
    leaves = [t.to(device).clone().requires_grad_() for t in (q, k, v, log_f)]
    kw = {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in kw.items()}
    out = forgetting_attention(*leaves, backend=backend, **kw)
    grads = torch.autograd.grad(out, leaves, d_out.to(device))
    return [t.cpu() for t in (out, *grads)]


def dense(q, k, v, log_f, d_out, threshold=None, **kw):
    """masked_attention's output, probabilities, masks and float64 gradients."""
    leaves = [t.double().requires_grad_() for t in (q, k, v, log_f)]
    out, probs, kept, visible = masked_attention(*leaves, threshold, **kw)
    grads = torch.autograd.grad(out, leaves, d_out.double())
    return [out.detach(), *grads], probs.detach(), kept, visible


SHAPES = [  # (B, Tq, Tk, H, Hkv, D, extra keywords)
    (2, 70, 70, 2, 2, 16, {}),
    (1, 97, 97, 4, 1, 32, {}),  # GQA, odd length
    (2, 23, 90, 4, 2, 16, {}),  # queries aligned to the last keys (chunked prefill)
    (1, 1, 90, 4, 2, 16, {}),  # decoding: one query, packed GQA rows, split keys
    (2, 3, 90, 8, 2, 16, {"seq_start": torch.tensor([0, 37])}),
    (2, 70, 70, 2, 1, 16, {"seq_start": torch.tensor([5, 40])}),
    (1, 90, 90, 2, 2, 16, {"cu_seqlens": torch.tensor([0, 17, 17, 60, 90])}),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:6])) + "".join(s[6]))
def test_pruned_equals_dense_with_the_same_mask(backend, shape):
    B, Tq, Tk, H, Hkv, D, kw = shape
    q, k, v, g = inputs(B, Tq, Tk, H, Hkv, D)
    log_f, threshold = quantized_gates(B, Tk, H, generator=g)
    d_out = torch.randn(q.shape, generator=g)
    ours = run(*backend, q, k, v, log_f, d_out, adaptive_threshold=threshold, **kw)
    ref, _, kept, visible = dense(q, k, v, log_f, d_out, threshold, **kw)
    assert (visible & ~kept).any(), "the test must prune something"
    for name, a, b in zip(("out", "dq", "dk", "dv", "dlog_f"), ours, ref):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) <= 1e-4, f"{name}: relative error {rel_err(a, b):.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [SHAPES[3], SHAPES[4], SHAPES[2]], ids=["decode", "decode-seq_start", "prefill"])
def test_pruned_from_prefix_sums(backend, shape):
    """The gate given as its prefix sums c (as a decoding cache passes it): the same pruned output, and the
    gradient of c (mapped to log f: dlog f_t = sum_{u >= t} dc_u) equals the per-token form's."""
    B, Tq, Tk, H, Hkv, D, kw = shape
    q, k, v, g = inputs(B, Tq, Tk, H, Hkv, D)
    log_f, threshold = quantized_gates(B, Tk, H, generator=g)
    d_out = torch.randn(q.shape, generator=g)
    device = backend[1]
    leaves = [t.to(device).clone().requires_grad_() for t in (q, k, v, log_f.cumsum(1))]
    out = forgetting_attention(*leaves[:3], log_fgate_cumsum=leaves[3], backend=backend[0],
                               adaptive_threshold=threshold.to(device), **{n: t.to(device) for n, t in kw.items()})
    grads = torch.autograd.grad(out, leaves, d_out.to(device))
    ours = [t.cpu() for t in (out, *grads[:3], grads[3].flip(1).cumsum(1).flip(1))]
    ref, _, kept, visible = dense(q, k, v, log_f, d_out, threshold, **kw)
    assert (visible & ~kept).any(), "the test must prune something"
    for name, a, b in zip(("out", "dq", "dk", "dv", "dlog_f"), ours, ref):
        assert rel_err(a, b) <= 1e-4, f"{name}: relative error {rel_err(a, b):.2e}"


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0][0] == "triton"])
@pytest.mark.parametrize("dq_tiles", [None, (16, 32)], ids=["dq-tiles-of-the-forward", "dq-tiles-of-its-own"])
def test_dq_reuses_the_forward_bounds_only_for_its_tiles(backend, dq_tiles, monkeypatch):
    """The dQ kernel takes the forward's query-block bounds when its tiles are the forward's (one bounds search
    fewer per step) and searches its own for other tiles; the gradients are exact either way."""
    from foxlab import kernels
    if dq_tiles is not None:
        monkeypatch.setitem(kernels.common._CONFIG_OVERRIDES, "dq", kernels.common._KernelConfig(*dq_tiles, 4, 1))
    searches = []
    search = kernels.blocked._pruning_bounds
    monkeypatch.setattr(kernels.blocked, "_pruning_bounds", lambda side, *a: searches.append(side) or search(side, *a))
    B, Tq, Tk, H, Hkv, D, kw = SHAPES[1]
    q, k, v, g = inputs(B, Tq, Tk, H, Hkv, D)
    log_f, threshold = quantized_gates(B, Tk, H, generator=g)
    d_out = torch.randn(q.shape, generator=g)
    ours = run(*backend, q, k, v, log_f, d_out, adaptive_threshold=threshold)
    ref, _, kept, visible = dense(q, k, v, log_f, d_out, threshold)
    assert (visible & ~kept).any(), "the test must prune something"
    assert searches.count("query") == (1 if dq_tiles is None else 2) and searches.count("key") == 1
    for name, a, b in zip(("out", "dq", "dk", "dv", "dlog_f"), ours, ref):
        assert rel_err(a, b) <= 1e-4, f"{name}: relative error {rel_err(a, b):.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Tq,Tk", [(64, 64), (1, 80), (9, 80)])
def test_no_forgetting_prunes_nothing_bit_for_bit(backend, Tq, Tk):
    q, k, v, g = inputs(2, Tq, Tk, 4, 2, 16)
    log_f = torch.zeros(2, Tk, 4)
    d_out = torch.randn(q.shape, generator=g)
    plain = run(*backend, q, k, v, log_f, d_out)
    pruned = run(*backend, q, k, v, log_f, d_out, adaptive_threshold="auto")
    for a, b in zip(plain, pruned):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Tq", [8, 70])  # the split-key (decoding) forward and the blocked one
def test_skipped_keys_are_never_read(backend, Tq):
    """Queries at the end of a long key sequence with strong forgetting: the early keys fall in tiles every query
    block skips. Poisoned with NaN, they must leave every output and gradient finite (and dk, dv zero there)."""
    B, Tk, H = 1, 200 + Tq, 2
    q, k, v, g = inputs(B, Tq, Tk, H, H, 16)
    log_f = torch.full((B, Tk, H), -0.5)
    threshold = torch.full((B, H), -20.0)  # keeps about the last 40 keys
    skipped = 96  # keys 0..95: every tile of them is pruned for every query (tiles of 16 to 64 keys)
    k[:, :skipped] = float("nan")
    v[:, :skipped] = float("nan")
    d_out = torch.randn(q.shape, generator=g)
    out, dq, dk, dv, dlog_f = run(*backend, q, k, v, log_f, d_out, adaptive_threshold=threshold)
    for t in (out, dq, dk[:, skipped:], dv[:, skipped:], dlog_f):
        assert torch.isfinite(t).all()
    if backend[0] == "triton":  # the kernels write zeros for keys no query reads
        assert dk[:, :skipped].abs().max() == 0 and dv[:, :skipped].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("log_eps", [-2.0, -6.0])
def test_auto_threshold_keeps_its_promise(backend, log_eps):
    """At most eps of any query's exact attention weight is dropped, and outputs and gradients move no more than
    that mass allows: with m_i <= eps the dropped mass of query i, A_i = ||dO_i||_1 max|v| and s the scale,
    |dO| <= 2 m max|v|, sum_j |dS'_ij - dS_ij| <= 6 m_i A_i, hence the bounds on dq, dk, dv and dlog f below."""
    B, T, H, D = 2, 130, 2, 16
    q, k, v, g = inputs(B, T, T, H, H, D, scale=0.35)
    log_f = F.logsigmoid(torch.randn(B, T, H, generator=g) + 1.0)
    d_out = torch.randn(q.shape, generator=g)
    delta = acp.threshold(q, k, "auto", log_eps=log_eps)
    exact, probs, _, visible = dense(q, k, v, log_f, d_out)
    _, _, kept, _ = dense(q, k, v, log_f, d_out, delta)
    dropped = (probs * (visible & ~kept)).sum(-1)  # (B, H, T)
    eps = math.exp(log_eps)
    assert dropped.max() <= eps and dropped.max() > eps * 1e-3, "the bound holds and the test prunes"

    out, dq, dk, dv, dlog_f = run(*backend, q, k, v, log_f, d_out, adaptive_threshold="auto", log_eps=log_eps)
    m = dropped.transpose(1, 2)  # (B, T, H)
    v_max, s, tol = v.abs().max(), D ** -0.5, 1e-5
    a = d_out.double().abs().sum(-1) * v_max  # (B, T, H)
    ds_row = 6 * m * a  # bound on sum_j |dS' - dS| per query row
    assert ((out - exact[0]).abs() <= 2 * m[..., None] * v_max + tol).all()
    assert ((dq - exact[1]).abs() <= s * k.abs().max() * ds_row[..., None] + tol).all()
    assert ((dk - exact[2]).abs().amax((1, 3)) <= s * q.abs().max() * ds_row.sum(1) + tol).all()
    assert ((dv - exact[3]).abs().amax((1, 3)) <= 2 * (m * d_out.abs().amax(-1)).sum(1) + tol).all()
    assert ((dlog_f - exact[4]).abs().amax(1) <= 2 * ds_row.sum(1) + tol).all()


@pytest.mark.parametrize("Tq,Tk,seq_start,tile", [(70, 70, None, (16, 16)), (33, 100, [0, 45], (32, 16)),
                                                   (100, 100, [30, 0], (64, 64))])
def test_statistics_equal_a_brute_force_count(Tq, Tk, seq_start, tile):
    B, H = 2, 3
    g = torch.Generator().manual_seed(0)
    log_f, threshold = quantized_gates(B, Tk, H, generator=g)
    seq_start = None if seq_start is None else torch.tensor(seq_start)
    q, k, v, _ = inputs(B, Tq, Tk, H, H, 8, seed=1)
    _, _, kept, visible = masked_attention(q, k, v, log_f, threshold, seq_start=seq_start)
    stats = acp.tile_statistics(log_f, threshold, num_queries=Tq, seq_start=seq_start, tile=tile)

    expected = (visible & ~kept).sum((-1, -2)) / visible.sum((-1, -2))
    torch.testing.assert_close(stats.pruned_fraction, expected.float())
    tm, tn = tile
    for qb in range(stats.tiles.shape[2]):
        for kb in range(stats.tiles.shape[3]):
            vis = visible[:, :, qb * tm:(qb + 1) * tm, kb * tn:(kb + 1) * tn].flatten(2)
            keep = kept[:, :, qb * tm:(qb + 1) * tm, kb * tn:(kb + 1) * tn].flatten(2)
            want = vis.any(-1).to(torch.int8) + (vis.any(-1) & ~keep.any(-1)).to(torch.int8)
            assert torch.equal(stats.tiles[:, :, qb, kb], want), (qb, kb)
    skipped = (stats.tiles == 2).sum((-1, -2)) / (stats.tiles > 0).sum((-1, -2))
    torch.testing.assert_close(stats.skipped_tile_fraction, skipped.float())


def test_threshold_arguments():
    q, k, _, _ = inputs(2, 5, 9, 4, 2, 16, seed=0)
    auto = acp.threshold(q, k, "auto", log_eps=-7.0, sm_scale=0.5)
    q_max = q.norm(dim=-1).amax(1)
    k_max = k.norm(dim=-1).amax(1).repeat_interleave(2, dim=1)
    torch.testing.assert_close(auto, -(2 * 0.5 * q_max * k_max + math.log(9)) - 7.0)
    assert acp.threshold(q, k, None) is None
    torch.testing.assert_close(acp.threshold(q, k, -3), torch.full((2, 4), -3.0))
    per_head = acp.threshold(q, k, torch.tensor([-1.0, -2.0, -3.0, -4.0]))
    assert per_head.shape == (2, 4) and per_head[1, 3] == -4
    for bad, match in [("fast", "auto"), (torch.zeros(3), "broadcast"), (0.5, "<= 0"), (True, "number"),
                       ([-1.0], "number")]:
        with pytest.raises(ValueError, match=match):
            acp.threshold(q, k, bad)
    with pytest.raises(ValueError, match="log_eps"):
        acp.threshold(q, k, "auto", log_eps=3)
    v = torch.randn(2, 9, 2, 16)
    with pytest.raises(ValueError, match="never prunes"):
        forgetting_attention(q, k, v, torch.zeros(2, 9, 4), adaptive_threshold="auto", backend="reference")


def test_model_prunes_within_the_bound_and_reports_statistics(one_thread):
    torch.manual_seed(0)
    config = ForgettingTransformerConfig.from_preset("tiny", fgate_init_timescales=[1.0, 16.0])
    model = ForgettingTransformerForCausalLM(config).eval()
    ids = torch.randint(4, 260, (2, 200))
    with torch.no_grad():
        exact = model(ids).logits
        greedy = model.generate(ids[:, :60], max_new_tokens=12, do_sample=False)
        config.acp_log_tolerance = -10.0
        pruned = model(ids).logits
        assert model.generate(ids[:, :60], max_new_tokens=12, do_sample=False).equal(greedy)
    assert 0 < (pruned - exact).abs().max() < 1e-3

    stats = acp.pruning_statistics(model, ids, log_eps=-10.0)
    assert stats["pruned_fraction"].shape == (2, 4) == stats["skipped_tile_fraction"].shape
    assert stats["pruned_fraction"].max() > 0.5  # a head with timescale 1 forgets almost everything
    assert stats["skipped_tile_fraction"].max() > 0
    with pytest.raises(ValueError, match="acp_log_tolerance"):
        ForgettingTransformerConfig.from_preset("tiny", acp_log_tolerance=2.0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0][0] == "triton"])
@pytest.mark.parametrize("c_layout", ["blocked", "strided"])
def test_fused_auto_threshold_matches_the_formula(backend, c_layout):
    """The Triton path computes "auto" in its own small kernels (decoding runs them every step). Heads whose decay
    cannot reach the threshold even at U = 0 skip their norms and get that U = 0 threshold instead (it prunes
    nothing there, as the exact one does); the others get the formula. GQA: a kv head is read if any of its group
    can prune."""
    from foxlab import kernels
    device = backend[1]
    q, k, _, g = inputs(3, 70, 150, 6, 2, 40, seed=3)
    log_f = F.logsigmoid(torch.randn(3, 150, 6, generator=g) + 2.0)
    log_f[:, :, [0, 1, 2, 4]] = 0.0  # kv head 0: no query head can prune; kv head 1: heads 3 and 5 can
    log_f[1, :, 3] = -1e-4  # a little decay, still not enough to prune anything
    c = log_f.cumsum(1)
    if c_layout == "blocked":  # as the blocked kernels hold it: base 2, (B, H, Tk) contiguous
        c, c_scale = (c * kernels.LOG2E).transpose(1, 2).contiguous().transpose(1, 2), 1.0
    else:  # as a decoding cache passes it: natural log, any strides
        c, c_scale = c.transpose(1, 2).contiguous().transpose(1, 2), kernels.LOG2E
    q, k, c = q.to(device), k.to(device), c.to(device)
    fused = (kernels.pruning._auto_threshold2(q, k, c, c_scale, 0.3, -4.0) / kernels.LOG2E).cpu()
    exact = acp.threshold(q, k, "auto", log_eps=-4.0, sm_scale=0.3).cpu()
    at_zero = torch.full_like(exact, -4.0 - math.log(150))
    prunable = torch.zeros(3, 6, dtype=torch.bool)
    prunable[:, [3, 5]] = True
    prunable[1, 3] = False
    torch.testing.assert_close(fused, torch.where(prunable, exact, at_zero))
    assert (exact < at_zero - 1).all()  # the norms matter wherever they are read


def brute_force_bounds(c2, delta, Tq, key_lo, query_hi, block_m, block_n):
    """What the pruning-bounds kernels must return, from the full kept/visible masks of one (batch, head):
    per query block (start, band), per key block (band, stop); c2 (Tk,) float32, delta a float32 scalar."""
    Tk = c2.shape[0]
    pos = torch.arange(Tk - Tq, Tk)
    keys = torch.arange(Tk)
    kept = (c2[pos][:, None] - c2[None, :]) >= delta  # float32, as the kernels compute it
    visible = (keys[None, :] <= pos[:, None]) & (keys[None, :] >= key_lo[:, None])
    query_rows = []
    for m0 in range(0, Tq, block_m):
        rows = slice(m0, min(m0 + block_m, Tq))
        lo = (int(key_lo[m0]) // block_n) * block_n
        mid = max((Tk - Tq + m0 + 1) // block_n * block_n, lo)
        blocks = range(lo, mid, block_n)
        any_kept = [bool(kept[rows, n:n + block_n].any()) for n in blocks]
        all_kept = [bool(kept[rows, n:n + block_n].all()) for n in blocks]
        start = lo + block_n * (any_kept.index(True) if True in any_kept else len(any_kept))
        band = lo + block_n * (all_kept.index(True) if True in all_kept else len(all_kept))
        query_rows.append((start, max(band, start)))
    key_rows = []
    for n0 in range(0, Tk, block_n):
        cols = slice(n0, min(n0 + block_n, Tk))
        q_end = min(int(query_hi[min(n0 + block_n, Tk) - 1]) - (Tk - Tq), Tq)
        mid = min(-(-max(n0 + block_n - 1 - (Tk - Tq), 0) // block_m) * block_m, q_end)
        mid = max(mid, (max(n0 - (Tk - Tq), 0) // block_m) * block_m)
        blocks = range(mid, q_end, block_m) if mid < q_end else range(0)
        # rows past q_end cannot see the block: a block's rows count up to q_end only
        some_pruned = [bool((~kept[m:min(m + block_m, q_end), cols]).any()) for m in blocks]
        all_pruned = [bool((~kept[m:min(m + block_m, q_end), cols]).all()) for m in blocks]
        band = mid + block_m * (some_pruned.index(True) if True in some_pruned else len(blocks))
        stop = mid + block_m * (all_pruned.index(True) if True in all_pruned else len(blocks))
        key_rows.append((min(band, q_end) if blocks else mid, min(stop, q_end) if blocks else mid))
    return torch.tensor(query_rows, dtype=torch.int32), torch.tensor(key_rows, dtype=torch.int32)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0][0] == "triton"])
@pytest.mark.parametrize("Tq,Tk,tile,seq_start", [(200, 200, (16, 32), None), (75, 331, (32, 16), None),
                                                  (130, 130, (64, 64), [0, 71])])
def test_pruning_bounds_equal_a_brute_force_search(backend, Tq, Tk, tile, seq_start):
    """The block bounds the kernels start and stop at, from the bounds kernels' binary searches, equal a search
    over the full masks: every fully pruned tile is skipped, every tile with a kept score is read."""
    from foxlab import kernels
    device, (block_m, block_n) = backend[1], tile
    B, H = 2, 3
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    log_f = F.logsigmoid(torch.randn(B, Tk, H, generator=g) * 2 + 2)
    c2 = (log_f.cumsum(1) * kernels.LOG2E).transpose(1, 2).contiguous()  # (B, H, Tk) as the kernels read it
    threshold2 = -torch.rand(B, H, generator=g) * 12 - 1
    starts = torch.tensor(seq_start or [0] * B, dtype=torch.int32)
    key_lo = starts[:, None].expand(B, Tq).contiguous()
    query_hi = torch.full((B, Tk), Tk, dtype=torch.int32)
    cfg = kernels.common._KernelConfig(block_m, block_n, 4, 1)
    vis = (lambda t: t.to(device)) if seq_start else (lambda t: None)
    args = (c2.to(device), vis(key_lo), threshold2.to(device), Tq, cfg)
    query_bounds = kernels.pruning._pruning_bounds("query", *args).cpu().view(B, H, -1, 2)
    args = (c2.to(device), vis(query_hi), threshold2.to(device), Tq, cfg)
    key_bounds = kernels.pruning._pruning_bounds("key", *args).cpu().view(B, H, -1, 2)
    for b in range(B):
        for h in range(H):
            want_q, want_k = brute_force_bounds(c2[b, h], threshold2[b, h], Tq, key_lo[b], query_hi[b], block_m,
                                                block_n)
            assert torch.equal(query_bounds[b, h], want_q), (b, h)
            assert torch.equal(key_bounds[b, h], want_k), (b, h)


def test_training_with_pruning_from_train_and_the_command_line(tmp_path, one_thread):
    """train(acp_log_tolerance=...) and --acp-log-tolerance switch pruning on; the losses stay those of exact
    attention up to the bound, and the saved model keeps the setting."""
    from foxlab.__main__ import main
    from foxlab.train import train

    kw = dict(steps=3, batch_size=2, seq_len=96, progress=False, overrides={"fgate_init_timescales": [1.0, 8.0]})
    exact = train(**kw)
    pruned = train(**kw, acp_log_tolerance=-8.0, out=tmp_path / "run")
    assert pruned.model.config.acp_log_tolerance == -8.0
    assert exact.losses != pruned.losses and max(abs(a - b) for a, b in zip(exact.losses, pruned.losses)) < 1e-3
    saved = ForgettingTransformerForCausalLM.from_pretrained(tmp_path / "run" / "checkpoint")
    assert saved.config.acp_log_tolerance == -8.0
    assert main(["train", "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--no-progress", "--out",
                 str(tmp_path / "cli"), "--acp-log-tolerance", "-10"]) == 0
    assert ForgettingTransformerForCausalLM.from_pretrained(tmp_path / "cli" / "checkpoint").config.acp_log_tolerance == -10
    assert main(["train", "--steps", "1", "--out", str(tmp_path / "bad"), "--acp-log-tolerance", "3"]) == 2


def test_pruning_figure_draws_the_statistics(one_thread):
    from foxlab import viz
    torch.manual_seed(0)
    config = ForgettingTransformerConfig.from_preset("tiny", fgate_init_timescales=[1.0, 64.0])
    model = ForgettingTransformerForCausalLM(config).eval()
    ids = torch.randint(4, 260, (1, 100))
    fig = viz.plot_pruning(model, ids, layer=1, head=0, tile=(16, 32))
    decay, tiles = fig.data
    stats = acp.pruning_statistics(model, ids, tile=(16, 32))["per_layer"][1]
    assert tiles.z.shape == (7, 4) and (tiles.z == stats.tiles[0, 0].numpy()).all()
    assert (tiles.z == 2).any() and "skipped" in tiles.text[-1][0]
    assert decay.z.shape == (100, 100)
    assert f"{stats.pruned_fraction[0, 0]:.0%} of the scores" in fig.layout.title.text
    with pytest.raises(ValueError, match="tile"):
        viz.plot_pruning(model, ids, layer=1, head=0, tile=(0, 16))
    with pytest.raises(IndexError, match="head 9 out of range"):
        viz.plot_pruning(model, ids, layer=1, head=9)
