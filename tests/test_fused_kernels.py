"""The fused ops' Triton kernels on the CPU (TRITON_INTERPRET=1) against exact PyTorch references.

float64 inputs make the kernels compute in float64, so outputs and gradients must match to ~1e-12; float32
within 1e-5. A tiny model with every fuse_* switch on (its Triton kernels forced on the CPU) must give the loss
and gradients of the same model with them off. Run with `make test-interpret`.
"""

import os

import pytest
import torch

pytestmark = pytest.mark.interpret

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 set before Triton is imported: run `make test-interpret`",
                allow_module_level=True)

from conftest import VARIANTS, tiny_model  # noqa: E402
from fused_cases import (  # noqa: E402
    attention_inputs_cases, attention_inputs_op, column_slice_cases, compare, cross_entropy_cases,
    ref_attention_inputs, ref_linear_cross_entropy, ref_rms_norm, ref_swiglu, ref_token_shift, rms_norm_cases,
    rms_norm_op, token_shift_cases,
)

from foxlab import fused, fused_inputs  # noqa: E402

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """Make the model (and the chunked loss) take the Triton paths for CPU tensors."""
    monkeypatch.setattr(fused, "triton_wanted", lambda x: True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rms_norm(dtype):
    for tensors in rms_norm_cases("cpu", dtype):
        compare(rms_norm_op, ref_rms_norm, tensors, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_attention_inputs(dtype):
    for tensors in attention_inputs_cases("cpu", dtype):
        compare(attention_inputs_op, ref_attention_inputs, tensors, TOL[dtype])


def test_attention_inputs_with_one_output_unused():
    """Only q reaches the loss: k's and v's gradients are zeros, q's those of its norm alone (float64, exact)."""
    q, k, v, wq, wk, a_k, a_v = (torch.randn(shape, dtype=torch.float64).requires_grad_() for shape in
                                 [(2, 5, 3, 16), (2, 5, 1, 16), (2, 5, 1, 16), (3, 16), (1, 16), (2, 5, 1), (2, 5, 1)])
    y, _, _ = fused_inputs.attention_inputs(q, k, v, q_weight=wq, k_weight=wk, eps=1e-5, k_shift_logits=a_k,
                                     v_shift_logits=a_v)
    cotangent = torch.randn_like(y)
    torch.autograd.backward(y, cotangent)
    expected = torch.autograd.grad(ref_rms_norm(q, wq, 1e-5), (q, wq), cotangent)
    torch.testing.assert_close((q.grad, wq.grad), expected, rtol=0, atol=1e-12)
    for t in (k, v, wk, a_k, a_v):
        assert not t.grad.any()


def test_rms_norm_residual_in_float32_branch_in_float64():
    """The block's case: a float32 residual stream plus a branch of another dtype; the sum keeps the wider one."""
    x, r = torch.randn(5, 40, dtype=torch.float64), torch.randn(5, 40)
    y, s = fused.rms_norm(x, torch.ones(40, dtype=torch.float64), 1e-6, residual=r)
    assert s.dtype == torch.float64 and y.dtype == torch.float64
    torch.testing.assert_close(s, x + r, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_swiglu(dtype):
    for shape in [(1,), (3, 77), (2, 5, 130)]:
        compare(fused.swiglu, ref_swiglu, (torch.randn(shape, dtype=dtype) * 3, torch.randn(shape, dtype=dtype)),
                TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_token_shift(dtype):
    for tensors in token_shift_cases("cpu", dtype):
        compare(fused_inputs.token_shift, ref_token_shift, tensors, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_norms_and_shifts_on_column_slices(dtype):
    for op, reference, tensors in column_slice_cases("cpu", dtype):
        compare(op, reference, tensors, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_cross_entropy_kernel(dtype, triton_on_cpu):
    for hidden, weight, targets, chunk in cross_entropy_cases("cpu", dtype):
        compare(fused.linear_cross_entropy, ref_linear_cross_entropy, (hidden, weight, targets), TOL[dtype],
                chunk_size=chunk)


def test_cross_entropy_kernel_flags_out_of_range_targets_with_nan(triton_on_cpu):
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    loss = fused.linear_cross_entropy(hidden, weight, torch.tensor([1, 2, 10, 3]))
    assert torch.isnan(loss)


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-head-norms", "shared-norms"])
def test_model_with_fused_kernels_matches_plain_model(shared, backend, triton_on_cpu, one_thread):
    """FoX Pro (every fused op has a use in it), its q/k/o norms with per-head or shared weights: loss and every
    parameter gradient, switches on (Triton kernels) vs off (PyTorch ops), float32. With the Triton attention backend
    the output norm and gate run inside the attention kernels. tests/test_fused_gpu.py runs all variants on a GPU."""
    ids = torch.randint(4, 260, (2, 13))
    labels = ids.clone()
    labels[0, :3] = -100
    results = {}
    for on in (True, False):
        model = tiny_model(seed=3, fuse_norm=on, fuse_swiglu=on, fuse_cross_entropy=on, **VARIANTS["fox-pro"],
                           qk_norm_share_param_across_head=shared, output_norm_share_param_across_head=shared,
                           attn_backend=backend if on else "auto").train()
        with torch.no_grad():  # norm weights away from their initial ones, so a wrong head's weight shows
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(1.0, 0.5)
        out = model(ids, labels=labels)
        assert (out.logits is None) == on
        out.loss.backward()
        results[on] = out.loss, {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-6)
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_fused_kv_shift_decodes_like_plain(backend, triton_on_cpu, one_thread):
    """Greedy generation of FoX Pro reads the KV-shift's cached last key/value: same tokens with the kernels (with
    the Triton backend, decoding's split kernel and then the output norm's own kernel)."""
    ids = torch.randint(4, 260, (2, 6))
    tokens = {}
    for on in (True, False):
        model = tiny_model(seed=2, fuse_norm=on, fuse_swiglu=on, **VARIANTS["fox-pro"],
                           attn_backend=backend if on else "auto")
        tokens[on] = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(tokens[True], tokens[False])
