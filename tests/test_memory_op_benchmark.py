"""`benchmarks/memory_op.py`'s model-shaped rows on CPU: `--switches` builds that memory (the Titans variants'
plain GD with the clip, HOPE's projection memories' self-generated values) and `--paths` times only the named
paths, with the table printed without the chunk form's row. What this is not: a timing (the numbers are whatever
this machine gives)."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks import memory_op


@pytest.mark.parametrize("switches", ["titans", "self_values"])
def test_switches_and_paths_pick_the_rows(switches: str, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "rows.json"
    argv = ["memory_op", "--device", "cpu", "--kinds", "mlp", "--switches", switches, "--cases", "1,32,16,2,16",
            "--paths", "chunk", "--warmup", "0", "--reps", "1", "--threads", "1", "--json", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    memory_op.main()
    (row,) = json.loads(out.read_text())["rows"]
    assert row["switches"] == switches
    timed = sorted(k for k in row if k.endswith("_tok_s"))
    assert timed == ["fwd_chunk_tok_s", "fwd_sdpa_tok_s", "fwdbwd_chunk_tok_s", "fwdbwd_sdpa_tok_s"]  # no naive
    printed = capsys.readouterr().out
    assert f"| mlp | {switches} | 1 | 32 | 16 | 2 | 16 | fwdbwd | chunk |" in printed


def test_switches_reach_the_memory_spec(monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(memory_op, "memory_inputs", lambda *a: seen.append(a[4]) or {})
    monkeypatch.setattr(memory_op, "timeit", lambda *a: 1.0)
    monkeypatch.setattr(memory_op, "paths", lambda *a: {})
    args = type("A", (), {"switches": "titans", "paths": "chunk", "naive_tokens": 8, "naive_reps": 1, "fla": False,
                          "warmup": 0, "reps": 1})()  # fmt: skip
    memory_op.bench_case((1, 8, 8, 1, 16), "mlp", "cpu", args)
    assert seen[0].dgd is False and seen[0].max_grad_norm == 3.0
    memory_op.bench_case((1, 8, 8, 1, 16), "linear", "cpu", args)
    assert seen[-1].kind == "linear" and seen[-1].max_grad_norm is None  # the switches are the MLP memory's
