"""The blocked kernels compiled for Hopper (sm_90) on the CPU (benchmarks/sass.py): the TMA variants really issue TMA
loads, and the training tiles fit in registers without spilling. No GPU needed."""

import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sass = pytest.importorskip("sass")  # needs Triton's NVIDIA backend tools, which its wheels ship


@pytest.mark.parametrize("kernel, head_dim, tile", [("fwd", 64, (64, 64, 4, 3)), ("fwd", 128, (64, 64, 4, 3)),
                                                    ("dq", 128, (128, 64, 8, 3))])
def test_tma_variants_issue_tma_loads_and_nothing_spills(kernel, head_dim, tile):
    block_m, block_n, warps, stages = tile
    rows = {tma: sass.inspect_kernel(kernel, head_dim, (block_m, block_n), warps, stages, tma)
            for tma in (False, True)}
    print(f"\n{kernel} D{head_dim} {tile}: {rows}")
    assert rows[True]["UTMALDG"] > 0 and rows[False]["UTMALDG"] == 0
    assert rows[True]["HGMMA"] > 0 and rows[False]["HGMMA"] > 0  # both on Hopper's warpgroup matrix units
    assert rows[True]["stack"] == 0 and rows[False]["stack"] == 0


@pytest.mark.parametrize("head_dim", [64, 128])
def test_warp_specialized_forward_compiles_for_hopper(head_dim):
    """kernels/hopper.py's Gluon forward compiles with this Triton for sm_90: TMA loads, asynchronous warp-group
    matmuls, mbarrier waits and the register split between producer and consumers (setmaxnreg); at head dim 64
    with the row sums as narrow matmuls (`hopper._sums_by_mma`), which must not spill, and O out by TMA stores
    (`hopper._o_by_tma`)."""
    from foxlab.kernels import blocked
    if blocked.hopper is None:
        pytest.skip("this Triton has no Gluon")
    row = sass.inspect_warp_specialized(head_dim)
    print(f"\nwarp-specialized forward D{head_dim}: {row}")  # stack: 0 with Triton 3.6, ~60 bytes with 3.9
    assert row["UTMALDG"] > 0 and row["HGMMA"] > 0 and row["SYNCS"] > 0 and row["USETMAXREG"] > 0
    assert row["shared_kib"] <= 227  # one program per SM fits
    assert (row["UTMASTG"] > 0) == (head_dim == 64)
    if head_dim == 64:
        assert row["stack"] == 0


@pytest.mark.parametrize("head_dim", [64, 128])
def test_warp_specialized_backward_compiles_for_hopper(head_dim):
    """kernels/hopper_backward.py's Gluon backward compiles for sm_90: TMA loads, warp-group matmuls, mbarriers,
    setmaxnreg, and the dQ writer's TMA reductions (dQ) and atomic adds (row sums)."""
    from foxlab.kernels import blocked
    if blocked.hopper_backward is None:
        pytest.skip("this Triton has no Gluon")
    row = sass.inspect_warp_specialized(head_dim, backward=True)
    print(f"\nwarp-specialized backward D{head_dim}: {row}")  # D128 stack: 104 bytes with Triton 3.6 and 3.9
    assert row["UTMALDG"] > 0 and row["HGMMA"] > 0 and row["USETMAXREG"] > 0
    assert row["UTMAREDG"] > 0 and row["REDG"] > 0
    assert row["shared_kib"] <= 227
