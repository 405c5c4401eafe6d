"""`python -m benchmarks.parity_cap --smoke` runs end to end on the CPU and writes its JSON report: both cap settings
trained, scored at both lengths, their eta recorded. Only where the smoke path is fast: it runs in a subprocess
with a 20-second limit (about 4 s on the 2-core dev CPU, imports included), and the test is skipped when that
limit is reached. What this is not: a check of any parity result (the smoke settings say nothing about parity)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 20


def test_smoke_path_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "parity_cap.json"
    cmd = [sys.executable, "-m", "benchmarks.parity_cap", "--smoke", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        pytest.skip(f"the smoke path took more than {LIMIT_S} s on this machine")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [(r["arm"], r["eta_cap"], r["diverged"]) for r in report["runs"]] == [("cap", True, None),
                                                                                  ("nocap", False, None)]  # fmt: skip
    for r in report["runs"]:
        assert r["steps"] >= 1 and 0 <= r["test_len"]["beyond_train_token_accuracy"] <= 1
        assert 0 < r["eta"]["max"] <= r["eta"]["cap"] * 1.0001 or not r["eta_cap"]
    assert set(report["summary"]) == {"cap", "nocap"} and report["model_configs"]["nocap"]["eta_cap"] is False
    assert "running parity" in done.stdout and "nocap" in done.stdout
