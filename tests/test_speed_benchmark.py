"""`benchmarks/speed.py`: the smoke path of the train, blocks and decode sections runs in-process on the CPU and
gives one finite row per planned measurement (fla's row says it needs CUDA), with ratios to the section's
reference, the table and the JSON; a failing row is recorded rather than raised; rows past `--max-minutes` are
skipped; the MFU's FLOP count follows its formula. The peers section is not run here (its packages are not
installed on CI). What this is not: a check of any speed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import speed
from nestlearn.models import preset

FAST = ["--smoke", "--device", "cpu", "--warmup", "0", "--train-steps", "1", "--reps", "1", "--decode-steps", "2"]


# Every train row but HOPE's compiled projection step: its rows differ only in config fields (checked below) and
# Inductor's compile of the step takes about a minute of the CPU suite (the layer's tests run the compiled path).
UNCOMPILED = [row for row in speed.TRAIN_ROWS if not row[2].get("compile_projection")]


def test_the_compiled_rows_are_valid_configs() -> None:
    compiled = [row for row in speed.TRAIN_ROWS if row not in UNCOMPILED]
    assert len(compiled) == 3
    for _, variant, over in compiled:
        assert preset("debug", variant, **over).compile_projection


def test_smoke_sections_give_every_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "speed.json"
    rows = speed.main([*FAST, "--decode-warmup", "2", "--sections", "train,blocks,decode", "--json", str(out),
                       "--train-rows", "^(?!.*compiled projection)"])  # fmt: skip
    plan = speed.SMOKE
    n_train, n_blocks = len(plan.train) * len(UNCOMPILED), 4 * len(plan.block_T)
    assert len(rows) == n_train + n_blocks + 2 * len(plan.contexts)
    for r in rows:
        if r["name"] == "fla Gated DeltaNet":
            assert r["error"].startswith("skipped") and r["ratio"] is None
            continue
        assert "error" not in r, r
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 and r["ratio"] > 0
        assert r["ratio"] == pytest.approx(1.0) or not r["ref"]
    train = [r for r in rows if r["section"] == "train"]
    assert [r["name"] for r in train] == [label for label, _, _ in UNCOMPILED]
    assert all(r["mfu"] is None and math.isfinite(r["final_loss"]) for r in train)  # no peak FLOP/s on a CPU
    attention = next(r for r in rows if r["name"].startswith("attention"))
    assert "SDPA backend: flash (CPU)" in attention["note"]
    decode = [r for r in rows if r["section"] == "decode"]
    assert {(r["name"], r["group"]) for r in decode} == {(v, f"decode ctx={c}") for v in ("transformer", "hope")
                                                         for c in plan.contexts}  # fmt: skip
    saved = json.loads(out.read_text())
    assert saved["header"].startswith("# device=cpu") and " triton=" in saved["header"]
    assert len(saved["rows"]) == len(rows) and saved["meta"]["smoke"] is True
    table = capsys.readouterr().out.split("\n\n")[-1]
    assert table.count("\n| train |") == n_train and table.count("\n| decode |") == 2 * len(plan.contexts)


def test_compile_rows_run_the_model_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--compile`: each matched row again under `torch.compile` (here with the aot_eager backend, to keep Inductor's
    compile out of the CPU suite; the variants' own compile tests are in tests/models and tests/train), named
    "+ torch.compile", its warm-up (which compiles) in the note; online CMS levels included, as `nestlearn train
    compile=true` compiles them."""
    compiled: list[str] = []
    real = torch.compile

    def spy(model: torch.nn.Module, **kwargs: object) -> object:
        compiled.append(model.config.variant)
        return real(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", spy)
    rows = speed.main(
        [*FAST, "--sections", "train", "--compile", "--no-eager", "--train-rows", "^hope_attention, online"]
    )
    assert [r["name"] for r in rows] == ["transformer", "transformer + torch.compile",
                                         "hope_attention, online CMS + torch.compile"]  # fmt: skip
    assert compiled == ["transformer", "hope_attention"]
    for row in rows[1:]:
        assert "error" not in row and "warm-up with compile" in row["note"]
        assert math.isfinite(row["final_loss"]) and row["tokens_per_s"] > 0


def test_failures_and_the_time_limit_are_rows() -> None:
    def oom() -> dict:
        raise torch.OutOfMemoryError("CUDA out of memory")

    def broken() -> dict:
        raise ValueError("first line\nsecond line")

    assert speed.guarded(oom, "cpu") == {"error": "out of memory"}
    assert speed.guarded(broken, "cpu") == {"error": "ValueError: first line ... second line"}  # the cause's line
    rows = speed.main([*FAST, "--sections", "train,decode", "--max-minutes", "0"])
    assert rows and all(r["error"] == "skipped: --max-minutes reached" for r in rows)


def test_model_flops_follow_the_formula() -> None:
    assert speed.mean_keys(4) == pytest.approx(2.5)  # causal: (T + 1) / 2
    assert speed.mean_keys(4, span=2) == pytest.approx(1.75)  # window 2: 1, 2, 2, 2
    assert speed.mean_keys(4, segment=2) == pytest.approx(1.5)  # segments of 2: 1, 2, 1, 2
    cfg = preset("debug", "transformer")
    n, T = 1_000_000, 64
    assert speed.model_flops_per_token(cfg, n, T) == pytest.approx(6 * n + 12 * cfg.d_model * cfg.n_layers * 32.5)
    mag = preset("debug", "titans_mag")
    assert speed.attention_keys(mag, 64) == pytest.approx(mag.n_persistent + 32.5)  # window 2048 > T
    assert speed.attention_keys(preset("debug", "hope"), 64) == 0


def test_train_rows_pick_rows_and_keep_the_reference() -> None:
    args = speed.parse([*FAST, "--graphs", "--no-eager", "--train-rows", "^hope, static"])
    modes = [(label, mode) for (label, _, _), mode in speed._train_modes(args)]
    assert modes == [("transformer", "eager"), ("transformer", "graphs"), ("hope, static CMS", "graphs"),
                     ("hope, static CMS, fused kernels", "graphs"),
                     ("hope, static CMS, compiled projection", "graphs"),
                     ("hope, static CMS, compiled projection, budget 0.05", "graphs")]  # fmt: skip


def test_train_presets_pick_presets_and_refuse_unknown_ones() -> None:
    args = speed.parse(["--device", "cpu", "--train-presets", "20M", "--train-rows", "^transformer$"])
    assert [row["shape"] for row, _ in speed.train_jobs(args, args.plan)] == ["20M: 8 x 2048"]
    with pytest.raises(SystemExit):
        speed.parse(["--device", "cpu", "--train-presets", "20m"])


def test_memory_save_every_reaches_the_recurrent_rows_only() -> None:
    args = speed.parse(["--memory-save-every", "0"])
    assert speed.save_every("hope", args) == {"memory_save_every": 0} and speed.save_every("transformer", args) == {}


def test_graphs_and_compile_rows_follow_each_row() -> None:
    """`--graphs` adds a CUDA-graph row right after every train row, `--compile` a compiled one after that."""
    modes = [(label, mode) for (label, _, _), mode in speed._train_modes(speed.parse([*FAST, "--graphs", "--compile"]))]
    labels = [label for label, _, _ in speed.TRAIN_ROWS]
    assert modes == [(label, mode) for label in labels for mode in ("eager", "graphs", "compile")]
    assert {mode for _, mode in speed._train_modes(speed.parse(FAST))} == {"eager"}


def test_decode_impl_reaches_the_memory_models_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--decode-impl chunk`: HOPE's decode rows build their model on that impl, Transformer++ keeps its config."""
    seen: dict[str, str] = {}

    def fake_decode(carry: dict, ctx: int, plan: speed.Plan, args: object) -> dict:
        cfg = carry["model"].config
        seen[cfg.variant] = cfg.impl
        return {}

    monkeypatch.setattr(speed, "decode_at", fake_decode)
    args = speed.parse(["--device", "cpu", "--smoke", "--contexts", "64", "--decode-impl", "chunk"])
    for _, job in speed.decode_jobs(args, args.plan):
        job()
    assert seen == {"transformer": "auto", "hope": "chunk"}
