"""The Triton kernels on the CPU (TRITON_INTERPRET=1) against the float64 reference.

Every test draws fresh random inputs and compares the output and all four gradients (q, k, v, log f)
by relative error ||a - b|| / ||b||. Shapes stay tiny: the interpreter runs each program in Python.
Run with `make test-interpret` (TRITON_INTERPRET must be set before Triton is imported).
bfloat16 is left to tests/test_triton_gpu.py: the interpreter's tl.dot miscomputes bfloat16 operands.
"""

import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.interpret

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before Triton is imported: run `make test-interpret`",
                allow_module_level=True)

from fused_cases import attention_with_output_norm, compare  # noqa: E402

from foxlab import kernels  # noqa: E402
from foxlab.attention import forgetting_attention, forgetting_attention_reference  # noqa: E402


def rel_err(a, b):
    """||a - b|| / ||b||, with a floor for gradients that vanish exactly (a single visible key, say)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(0.1)).item()


def make_inputs(B, Tq, Tk, H, Hkv, D, dtype=torch.float32):
    q = torch.randn(B, Tq, H, D, dtype=dtype)
    k = torch.randn(B, Tk, Hkv, D, dtype=dtype)
    v = torch.randn(B, Tk, Hkv, D, dtype=dtype)
    # Gates between ~0.3 and ~0.99 so that c spans a few units over these lengths.
    log_f = F.logsigmoid(torch.randn(B, Tk, H) * 1.5 + 2.0)
    return q, k, v, log_f


def run_both(q, k, v, log_f, **kw):
    """(Triton output, its 4 gradients), (float64 reference output, its 4 gradients) for one random dO."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v, log_f)]
    out = forgetting_attention(*leaves, backend="triton", **kw)
    d_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, d_out)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, log_f)]
    ref = forgetting_attention_reference(*ref_leaves, **kw)
    ref_grads = torch.autograd.grad(ref, ref_leaves, d_out.double())
    return (out, *grads), (ref, *ref_grads)


def check(B=2, Tq=33, Tk=None, H=2, Hkv=None, D=32, dtype=torch.float32, tol=1e-4, **kw):
    Tk = Tq if Tk is None else Tk
    Hkv = H if Hkv is None else Hkv
    ours, ref = run_both(*make_inputs(B, Tq, Tk, H, Hkv, D, dtype), **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dlog_f"), ours, ref):
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), f"{name} has NaN/inf"
        assert rel_err(a, b) <= tol, f"{name}: relative error {rel_err(a, b):.2e}"
    return ours


@pytest.mark.parametrize("T", [1, 7, 33, 65])
def test_causal_lengths(T):
    check(Tq=T)


@pytest.mark.parametrize("D", [16, 48, 80])
def test_head_dims(D):
    check(Tq=21, D=D)


@pytest.mark.parametrize("Hkv", [1, 2])
def test_gqa(Hkv):
    check(Tq=33, H=4, Hkv=Hkv, D=48)


@pytest.mark.parametrize("Tq,Tk", [(1, 1), (1, 40), (7, 65), (16, 33), (20, 33), (33, 50), (40, 65)])
def test_queries_aligned_to_last_keys(Tq, Tk):
    """Up to 64 rows (Tq x the 2 heads of a group) take the packed split-key (decoding) forward."""
    check(Tq=Tq, Tk=Tk, H=4, Hkv=2)


@pytest.mark.parametrize("Tq,H,Hkv", [(1, 8, 1), (3, 8, 2), (5, 8, 1), (3, 6, 2), (7, 9, 3)])
def test_decode_packs_gqa_groups(Tq, H, Hkv):
    """Decoding packs the query heads of a group into one tile: 8, 4 or 3 heads, 1 to 40 rows (a power-of-two group
    loads its gate sums once per head and key, a group of 3 once per row)."""
    check(Tq=Tq, Tk=50, H=H, Hkv=Hkv, D=48, seq_start=torch.tensor([0, 20]))


@pytest.mark.parametrize("jump", [3.0, 40.0], ids=["within-the-margin", "past-the-margin"])
def test_an_old_key_that_outscores_the_recent_ones(jump):
    """The kernels visit the diagonal block first, then older keys: an old key whose score beats every recent one,
    by a little or by a lot, raises the running max late (and the scores' reference prefix sum is not the key's)."""
    q, k, v, log_f = make_inputs(2, 65, 65, 2, 2, 32)
    q = q / q.norm(dim=-1, keepdim=True) * 4.0
    k[:, :5] = q[:, -1:] * (jump / 4.0)  # keys 0-4 line up with the last query: score ~ jump nats above the rest
    ours, ref = run_both(q, k, v, log_f * 0.01)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dlog_f"), ours, ref):
        assert rel_err(a, b) <= 1e-4, f"{name}: relative error {rel_err(a, b):.2e}"


def test_sm_scale():
    check(Tq=33, sm_scale=0.3)


def test_seq_start_left_padding():
    check(Tq=65, seq_start=torch.tensor([0, 40]))
    check(Tq=5, Tk=40, seq_start=torch.tensor([3, 37]), H=4, Hkv=1)


def test_rows_without_keys_give_zeros():
    """Rows before seq_start see no key: zero output and zero gradients, never NaN (both forward paths)."""
    for Tq, Tk in ((33, 33), (4, 20)):
        seq_start = torch.tensor([Tk, 10])  # batch row 0 sees nothing at all
        out, dq, dk, dv, dlog_f = check(Tq=Tq, Tk=Tk, seq_start=seq_start)
        assert out[0].abs().max() == 0 and dq[0].abs().max() == 0
        assert dk[0].abs().max() == 0 and dv[0].abs().max() == 0 and dlog_f[0].abs().max() == 0
        first_seen = 10 - (Tk - Tq)  # query rows of batch row 1 before key 10
        if first_seen > 0:
            assert out[1, :first_seen].abs().max() == 0


@pytest.mark.parametrize("offsets", [[0, 7, 7, 30, 50], [0, 50], [0, 1, 17, 50]])
def test_varlen(offsets):
    check(B=1, Tq=50, H=4, Hkv=2, cu_seqlens=torch.tensor(offsets))


def test_strided_inputs():
    """Head-major storage (B, H, T, D) viewed as (B, T, H, D): only the last dim is contiguous."""
    q, k, v, log_f = make_inputs(2, 33, 33, 2, 2, 32)
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    ours, ref = run_both(q, k, v, log_f)
    assert max(rel_err(a, b) for a, b in zip(ours, ref)) <= 1e-4


@pytest.mark.parametrize("loads", ["tma", "pointers"])
@pytest.mark.parametrize("case", [dict(Tq=65, H=4, Hkv=2), dict(Tq=40, Tk=65, H=4, Hkv=1),
                                  dict(Tq=65, seq_start=torch.tensor([0, 40])),
                                  dict(B=1, Tq=50, H=4, Hkv=2, cu_seqlens=torch.tensor([0, 7, 30, 50]))],
                         ids=["gqa", "prefill", "left-padding", "varlen"])
def test_forward_loads_tiles_through_tma_or_pointers(monkeypatch, loads, case):
    """The blocked forward's and dQ's two ways of loading tiles give the reference: TMA descriptors (tiles may reach
    into the next sequence's rows, which the masks drop) and pointers."""
    monkeypatch.setattr(kernels.common, "_TMA_LOADS", {"fwd": loads == "tma", "dq": loads == "tma"})
    made, describe = [], kernels.blocked._tma_descriptor
    monkeypatch.setattr(kernels.blocked, "_tma_descriptor", lambda t, rows: made.append(rows) or describe(t, rows))
    check(D=32, **case)
    assert len(made) == (5 if loads == "tma" else 0)  # q, k and v for the forward, k and v for dQ


def test_tma_only_where_a_descriptor_can_read_the_layout():
    q = torch.randn(2, 33, 4, 32)
    assert kernels.common._tma_wanted("fwd", q, q, q)
    stacked = torch.randn(2, 33, 400)  # the stacked projections: column slices, rows 400 floats apart
    k, v = (stacked[..., i * 128:(i + 1) * 128].unflatten(-1, (4, 32)) for i in (1, 2))
    assert kernels.common._tma_wanted("fwd", q, k, v)
    assert not kernels.common._tma_wanted("dq", *(torch.randn(2, 33, 4, 48) for _ in range(3)))  # D not a power of 2
    assert not kernels.common._tma_wanted("fwd", *(torch.randn(1, 8, 1, 256) for _ in range(3)))  # 1 KiB rows of a head
    cache = torch.randn(2, 64, 4, 32)[:, :33]  # a cache's first 33 of 64 positions: batch rows 64 positions apart
    assert not kernels.common._tma_wanted("fwd", q, cache, cache)
    rows_8_bytes_off = torch.randn(2, 33, 130)[..., :128].unflatten(-1, (4, 32))  # rows 520 bytes apart
    assert not kernels.common._tma_wanted("fwd", q, rows_8_bytes_off, k)


def test_scale_kernel_rounds_like_torch():
    """The one-kernel backward's last pass (Hopper: float32 dQ sums into dq) is scale * x rounded to 16 bits, bit
    for bit as torch rounds it, at a size that is not a multiple of the block. float16 only: the interpreter
    truncates to bfloat16 where GPUs round to nearest (tests/test_triton_gpu.py checks bfloat16)."""
    from foxlab.kernels import blocked
    x = torch.randn(3 * blocked._SCALE_BLOCK + 77) * 30
    y = torch.empty(x.shape, dtype=torch.float16)
    blocked._scale_kernel[(4,)](x, y, 0.125, x.numel(), BLOCK=blocked._SCALE_BLOCK)
    assert torch.equal(y, (x * 0.125).to(torch.float16))


def test_float16():
    check(Tq=33, D=48, dtype=torch.float16, tol=1e-2)


def test_float16_gate_gradient_before_the_first_query():
    """A few queries after many keys (decoding, chunked prefill): dlog f at the early keys is a small difference
    of sums over the whole sequence. The kernels' row sums of dS must cancel the rounding of the stored output
    there (they did not once: 1e-3 absolute error where the exact value is ~1e-6, tests/test_triton_gpu in bf16)."""
    ours, ref = run_both(*make_inputs(1, 4, 600, 2, 2, 64, torch.float16))
    early = slice(0, 500)
    assert (ours[4][:, early].double() - ref[4][:, early]).abs().max() <= 1e-4
    assert rel_err(ours[4], ref[4]) <= 2e-3


@pytest.mark.parametrize("tiles", [(16, 16), (16, 32), (32, 16)])
def test_other_tile_shapes(monkeypatch, tiles):
    """The loop bounds for other (BLOCK_M, BLOCK_N) pairs, with an offset and left padding."""
    config = kernels.common._KernelConfig(*tiles, 1, 1)
    for kind in ("fwd", "dkdv", "dq"):
        monkeypatch.setitem(kernels.common._CONFIG_OVERRIDES, kind, config)
    monkeypatch.setattr(kernels.blocked, "_GATE_BLOCK", 16)  # the gate's prefix sums carry across blocks too
    check(Tq=37, Tk=50, H=2, Hkv=1, seq_start=torch.tensor([0, 13]))
    check(B=1, Tq=45, cu_seqlens=torch.tensor([0, 16, 29, 45]))


def run_cumsum_form(q, k, v, log_f, **kw):
    """The Triton output and the gradients of (q, k, v, c) with the gate given as its prefix sums c; the gradient
    of c mapped to log f (dlog f_t = sum_{u >= t} dc_u) so that it compares with the per-token form's."""
    c = log_f.cumsum(1).transpose(1, 2).contiguous().transpose(1, 2)  # heads-first storage, as the cache keeps it
    leaves = [t.clone().requires_grad_() for t in (q, k, v, c)]
    out = forgetting_attention(*leaves[:3], log_fgate_cumsum=leaves[3], backend="triton", **kw)
    d_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, d_out)
    dlog_f = grads[3].flip(1).cumsum(1).flip(1)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, log_f)]
    ref = forgetting_attention_reference(*ref_leaves, **kw)
    ref_grads = torch.autograd.grad(ref, ref_leaves, d_out.double())
    return (out, *grads[:3], dlog_f), (ref, *ref_grads)


@pytest.mark.parametrize("Tq,Tk,H,Hkv,kw", [
    (1, 50, 8, 2, {}),  # decoding: c read in place by the split kernel
    (3, 41, 4, 1, {"seq_start": torch.tensor([0, 17])}),
    (40, 65, 4, 2, {}),  # 80 packed rows: two row tiles of the split kernel... or the blocked forward
    (33, 33, 2, 2, {"seq_start": torch.tensor([5, 0])}),  # the blocked forward from c (one multiply, no scan)
    (50, 50, 4, 2, {"cu_seqlens": torch.tensor([0, 20, 50])}),
])
def test_prefix_sum_input_equals_the_reference(Tq, Tk, H, Hkv, kw):
    B = 1 if "cu_seqlens" in kw else 2
    ours, ref = run_cumsum_form(*make_inputs(B, Tq, Tk, H, Hkv, 24), **kw)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dlog_f"), ours, ref):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) <= 1e-4, f"{name}: relative error {rel_err(a, b):.2e}"


@pytest.mark.parametrize("Tq,Tk,Hkv", [(1, 70, 1), (9, 70, 2), (40, 70, 2), (70, 70, 1)])
def test_split_kernel_for_any_rows(monkeypatch, Tq, Tk, Hkv):
    """The split-key forward on every shape (forced): several row tiles, splits that no row reaches causally,
    a split count above one and one."""
    monkeypatch.setattr(kernels.split, "_DECODE_MAX_ROWS", 32)
    monkeypatch.setattr(kernels.split, "_split_wanted", lambda q, k: True)
    for splits in (4, 1):
        monkeypatch.setattr(kernels.split, "_SPLIT_PROGRAMS_PER_SM", splits)
        check(Tq=Tq, Tk=Tk, H=4, Hkv=Hkv, D=16, seq_start=torch.tensor([0, 9]))
        ours, ref = run_cumsum_form(*make_inputs(2, Tq, Tk, 4, Hkv, 16))
        assert max(rel_err(a, b) for a, b in zip(ours, ref)) <= 1e-4


@pytest.mark.parametrize("merge_steps,merge_elements", [(0, 128), (100, 128)],
                         ids=["combine_kernel", "last_program_in_steps"])
def test_split_kernel_merges(monkeypatch, merge_steps, merge_elements):
    """The splits' merge either way: `_combine_kernel` after the split kernel, or the last program of a tile in
    several steps (128 elements: 2 rows x 4 splits x head dim 16 per step); a group of one head and of two, a
    padded row tile, left padding (a row that sees no key). Forward only: the merge has no backward of its own."""
    monkeypatch.setattr(kernels.split, "_split_wanted", lambda q, k: True)
    monkeypatch.setattr(kernels.split, "_SPLIT_PROGRAMS_PER_SM", 4)
    monkeypatch.setattr(kernels.split, "_LAST_MERGES_MAX_STEPS", merge_steps)
    monkeypatch.setattr(kernels.split, "_COMBINE_ELEMENTS", merge_elements)
    for Tq, H, Hkv in ((9, 4, 2), (21, 2, 2)):
        q, k, v, log_f = make_inputs(2, Tq, 70, H, Hkv, 16)
        c = log_f.cumsum(1).transpose(1, 2).contiguous().transpose(1, 2)
        seq_start = torch.tensor([0, 65])
        out = forgetting_attention(q, k, v, log_fgate_cumsum=c, backend="triton", seq_start=seq_start)
        ref = forgetting_attention_reference(q.double(), k.double(), v.double(), log_f.double(), seq_start=seq_start)
        assert torch.isfinite(out).all()
        assert rel_err(out, ref) <= 1e-4


def test_dispatch():
    q, k, v, log_f = make_inputs(1, 5, 5, 2, 2, 16)
    # "auto" on CPU tensors stays on the torch path, float64 included; "triton" refuses float64.
    forgetting_attention(q.double(), k.double(), v.double(), log_f, backend="auto")
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        forgetting_attention(q.double(), k.double(), v.double(), log_f, backend="triton")


def test_short_grids_take_narrow_forward_tiles(monkeypatch):
    """The head-dim-128 forward's 128-row tiles run when their grid fills at least two waves of the GPU (132 SMs
    here); a shorter grid (chunked prefill of few queries) takes 64-row tiles of 4 warps. No GPU needed: only the
    choice is checked."""
    common = kernels.common
    monkeypatch.setattr(common, "_multiprocessors", lambda device: 132)
    cuda = torch.device("cuda")
    wide = common._candidate_configs("fwd", 128, torch.bfloat16, cuda, grid_rows=(16384, 16))[0]
    narrow = common._candidate_configs("fwd", 128, torch.bfloat16, cuda, grid_rows=(512, 16))[0]
    edge = common._candidate_configs("fwd", 128, torch.bfloat16, cuda, grid_rows=(128 * 17, 16))[0]  # 272 >= 264
    assert (wide.block_m, wide.num_warps) == (128, 8) and (edge.block_m, edge.num_warps) == (128, 8)
    assert (narrow.block_m, narrow.block_n, narrow.num_warps) == (64, wide.block_n, 4)
    assert common._candidate_configs("fwd", 64, torch.bfloat16, cuda, grid_rows=(512, 16))[0].block_m == 64


def test_long_sequences_take_wider_key_tiles_at_head_dim_64():
    """From 4096 keys on, the head-dim-64 TMA forward reads 128 keys per step (16-bit inputs); shorter sequences,
    head dim 128 and float32 keep their first choice. No GPU needed: only the choice is checked."""
    common, cuda = kernels.common, torch.device("cuda")
    choice = lambda D, keys, dtype=torch.bfloat16: common._candidate_configs("fwd_tma", D, dtype, cuda,  # noqa: E731
                                                                            keys=keys)[0]
    assert (choice(64, 4096).block_m, choice(64, 4096).block_n) == (64, 128)
    assert choice(64, 4095) == choice(64, 0) == common._GPU_CONFIGS[("fwd", 64)]  # shared with the pointer forward
    assert choice(128, 16384) == common._GPU_CONFIGS[("fwd_tma", 128)]
    assert choice(64, 16384, torch.float32).block_n <= 64
    fallbacks = common._candidate_configs("fwd_tma", 64, torch.bfloat16, cuda, keys=8192)[1:]
    assert fallbacks and all(c.block_m * c.block_n < 64 * 128 for c in fallbacks)


@pytest.mark.parametrize("B,Tq,Tk,H,Hkv,D,per_head,with_gate", [
    (2, 33, 33, 2, 2, 32, True, True),     # blocked kernels, per-head weights and the gate
    (1, 70, 70, 4, 2, 24, False, True),    # GQA, a shared weight vector, an odd head dim
    (2, 17, 17, 3, 3, 16, True, False),    # the norm without the gate
    (2, 1, 40, 4, 2, 32, True, True),      # decoding: the split kernel, then the norm's own kernel
])
def test_output_norm_in_the_kernels(B, Tq, Tk, H, Hkv, D, per_head, with_gate):
    """The Triton kernels with FoX Pro's output norm (and gate) inside against the float64 reference followed by the
    plain norm: the output and all gradients (q, k, v, log f, the norm's weight, the gate)."""
    weight = 1 + 0.5 * torch.randn((H, D) if per_head else (D,))
    gate = torch.randn(B, Tq, H, D) * 2 if with_gate else None
    compare(attention_with_output_norm("triton"), attention_with_output_norm("reference"),
            (*make_inputs(B, Tq, Tk, H, Hkv, D), weight, gate), 1e-4)


def test_warp_specialized_forward_only_on_hopper_gpus():
    """hopper.py's forward and hopper_backward.py's backward need an sm_90 GPU: never on the CPU (the interpreter
    runs the portable kernels)."""
    if kernels.blocked.hopper is None:
        pytest.skip("this Triton has no Gluon")
    q = torch.randn(1, 256, 2, 128, dtype=torch.bfloat16)  # what it takes on an sm_90 GPU
    assert not kernels.blocked.hopper.usable(q, q, q)
    assert not kernels.blocked.hopper_backward.usable(q, q, q, q)


def test_warp_specialized_forward_groups_heads_to_stay_in_l2(monkeypatch):
    """`hopper._heads_per_group`: all heads where one round of programs reads K and V within KV_IN_L2 anyway, else
    as many whole kv heads as fit there, at least one."""
    hopper = kernels.blocked.hopper
    if hopper is None:
        pytest.skip("this Triton has no Gluon")
    monkeypatch.setattr(hopper, "KV_IN_L2", 32 * 2**20)
    mib = 2**20
    assert hopper._heads_per_group(512, 132, mib // 8, 1) == 512  # (32, 512, 16, 64): 132 heads x 128 KiB fit
    assert hopper._heads_per_group(256, 132, mib // 2, 1) == 64  # (8, 2048, 32, 64)
    assert hopper._heads_per_group(16, 132, 8 * mib, 1) == 4  # (1, 32768, 16, 64)
    assert hopper._heads_per_group(16, 132, 64 * mib, 1) == 1  # one head past the budget: one at a time
    assert hopper._heads_per_group(64, 132, 2 * mib, 4) == 64  # 16 kv heads of 2 MiB
    assert hopper._heads_per_group(256, 132, 2 * mib, 4) == 64  # 64 kv heads: 16 at a time, 4 query heads each
    assert hopper._heads_per_group(3, 2, 64 * mib, 1) == 1  # fewer tiles than SMs, heads past the budget
