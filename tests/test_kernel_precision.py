"""`benchmarks/kernel_precision.py`: tf32 rounding is exact where it should be, and the table orders the precisions
as their mantissas do."""

from __future__ import annotations

import torch

from benchmarks.kernel_precision import NAMES, main, round_tf32


def test_round_tf32_rounds_to_nearest_even_at_ten_bits() -> None:
    ulp = 2.0**-10
    x = torch.tensor([1.0, 1 + ulp, 1 + ulp / 2, 1 + 3 * ulp / 2, 1 + ulp / 2 + 2**-20, -3.0, 0.0])
    want = torch.tensor([1.0, 1 + ulp, 1.0, 1 + 2 * ulp, 1 + ulp, -3.0, 0.0])  # ties to even; above a tie rounds up
    assert torch.equal(round_tf32(x), want)
    y = torch.randn(10_000)
    assert float(((round_tf32(y) - y).abs() / y.abs()).max()) <= 2.0**-11


def test_the_table_orders_the_precisions() -> None:
    table = main(["--seq", "96", "--heads", "2", "--dim", "8", "--chunk", "16"])
    for name in NAMES:
        assert table["float32"][name] < table["tf32"][name] < table["bf16"][name], name
        assert table["bf16"][name] < 0.1
