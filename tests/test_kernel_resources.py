"""`python -m benchmarks.kernel_resources` compiles a kernel for sm_90 on a machine without a GPU and reports its
shared memory and ptxas's registers (the numbers that set `adjoint.MAX_CHUNK_FORWARD` / `MAX_CHUNK_BACKWARD`);
more pipeline stages need more shared memory, which is why the launchers use one. Run as a subprocess: the test
session runs Triton in its interpreter (tests/conftest.py), which compiles nothing."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def _rows(stages: int, *extra: str) -> list[list[str]]:
    """The table's rows (one per kernel, chunk, precision and warps), each a list of its cells."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "benchmarks.kernel_resources", "--kernels", "forward", "--chunks", "16", "--D", "16",
           "--E", "32", "--stages", str(stages), *extra]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=300).stdout
    table = [line for line in out.strip().splitlines() if line.startswith("|")][2:]  # past the header and its rule
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in table]


def _row(stages: int, *extra: str) -> list[str]:
    (row,) = _rows(stages, *extra)
    return row


def test_compiles_for_hopper_without_a_gpu_and_reports_its_resources() -> None:
    name, n, precision, warps, shared, fits, regs, spill, _ = _row(1)
    assert (name, n, precision, warps, fits) == ("forward", "16", "tf32x3", "8", "yes")
    assert 0 < int(regs) <= 255 and int(spill) >= 0
    assert 0 < int(shared) < int(_row(3)[4])


def test_takes_the_precision_and_warps_it_is_given() -> None:
    """One-pass tf32 keeps one copy of each dot operand where tf32x3 keeps two (high and low parts): less shared
    memory at the same shape. Both precisions at 4 warps in one run (one interpreter start instead of three; the
    defaults, tf32x3 and 8 warps, are the test above's)."""
    one_pass, three_pass = _rows(1, "--precisions", "tf32,tf32x3", "--warps", "4")
    assert one_pass[2:4] == ["tf32", "4"] and three_pass[2:4] == ["tf32x3", "4"]
    assert int(one_pass[4]) < int(three_pass[4])
