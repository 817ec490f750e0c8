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
