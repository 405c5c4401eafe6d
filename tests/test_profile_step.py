"""`benchmarks/profile_step.py`: the profile of one training step runs on CPU at the debug preset and prints its
table (the top ops with their self time), config overrides parse as JSON with a clear message otherwise. What this
is not: a check of any time."""

from __future__ import annotations

import pytest

from benchmarks import profile_step


def test_a_cpu_step_profile_prints_its_top_ops(capsys: pytest.CaptureFixture[str]) -> None:
    got = profile_step.main(["--device", "cpu", "--preset", "debug", "--batch", "1", "--seq", "16", "--top", "3",
                             "--warmup", "1", "--set", "n_layers=1", "--set", "cms_online_layers=[]"])  # fmt: skip
    assert got["step_s"] > 0 and len(got["top"]) == 3 and all(r["self_ms"] >= 0 for r in got["top"])
    out = capsys.readouterr().out
    assert "# hope debug 1 x 16" in out and "| op / kernel | calls | self time (ms) | share |" in out


def test_overrides_parse_as_json() -> None:
    got = profile_step.overrides(["mem_chunk=32", "cms_online_layers=[]"])
    assert got == {"mem_chunk": 32, "cms_online_layers": ()}
    with pytest.raises(SystemExit, match="write FIELD=JSON"):
        profile_step.overrides(["mem_chunk"])
    with pytest.raises(SystemExit, match="the value is not JSON"):
        profile_step.overrides(["memory_activation=gelu"])
