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


def _row(stages: int) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "benchmarks.kernel_resources", "--kernels", "forward", "--chunks", "16", "--D", "16",
           "--E", "32", "--stages", str(stages)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=300).stdout
    return [c.strip() for c in out.strip().splitlines()[-1].strip("|").split("|")]


def test_compiles_for_hopper_without_a_gpu_and_reports_its_resources() -> None:
    name, n, shared, fits, regs, spill, _ = _row(1)
    assert (name, n, fits) == ("forward", "16", "yes")
    assert 0 < int(regs) <= 255 and int(spill) >= 0
    assert 0 < int(shared) < int(_row(3)[2])
