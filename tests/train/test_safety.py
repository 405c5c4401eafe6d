"""Nothing lost, nothing silent: non-finite steps are skipped and stop a diverged run without touching the good
checkpoints; SIGINT / SIGTERM end a run with a checkpoint and exit 0; a resume keeps one clean log (metrics and
TensorBoard) and falls back past a damaged checkpoint; a resume that would change the run is refused, naming
every difference, unless `allow_changes` names it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nestlearn.train import TrainConfig, TrainingDiverged, train
from nestlearn.train import loop as loop_mod
from tests.train.conftest import make_data
from tests.train.helpers import TINY, checkpoints, losses, records

REPO = Path(__file__).resolve().parents[2]


def test_a_diverging_resume_keeps_the_good_checkpoint_and_stops(data, tmp_path) -> None:
    """Resumed at an absurd learning rate: the non-finite steps are skipped and logged, no checkpoint is written
    from them, `keep_last=1` keeps the good one, and the run stops with TrainingDiverged."""
    common = dict(data=str(data), out=str(tmp_path), steps=30, keep_last=1, **TINY)
    train(TrainConfig(stop_at=3, **common))
    with pytest.raises(TrainingDiverged, match=r"3 non-finite steps in a row .* newest good checkpoint"):
        train(TrainConfig(lr=1e30, allow_changes=("lr",), max_nonfinite=3, **common))
    assert checkpoints(tmp_path) == ["step_0000003"]
    rows = records(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert rows[-1]["nonfinite_steps"] == 2 and rows[-1]["grad_norm"] is None  # the third one raised
    bad = [r for r in rows if r.get("grad_norm") is None]
    assert len(bad) == 2 and all(r["step"] > 3 for r in bad)


def test_nonfinite_steps_are_skipped_not_applied(data, tmp_path, monkeypatch) -> None:
    """A single NaN batch (injected) leaves the weights untouched: the run equals one that never saw that step's
    update, and it goes on."""
    real = loop_mod.next_token_loss
    calls = {"n": 0}

    def poisoned(logits, targets):
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * float("nan") if calls["n"] == 2 else loss  # the second training step

    monkeypatch.setattr(loop_mod, "next_token_loss", poisoned)
    train(TrainConfig(data=str(data), out=str(tmp_path), steps=4, **{**TINY, "eval_every": 100, "ckpt_every": 100}))
    rows = records(tmp_path)
    assert rows[1]["loss"] is None and rows[1]["nonfinite_steps"] == 1
    assert rows[2]["loss"] is not None and rows[3]["nonfinite_steps"] == 1
    assert checkpoints(tmp_path) == ["step_0000004"]


def test_sigterm_finishes_the_step_checkpoints_and_resumes_exactly(data, tmp_path, monkeypatch, capsys) -> None:
    common = dict(data=str(data), steps=6, **{**TINY, "ckpt_every": 100})
    train(TrainConfig(out=str(tmp_path / "whole"), **common))
    real = loop_mod._train_step

    def step_then_signal(run, micro, deadline):
        if run.step == 2:  # during the third step
            signal.raise_signal(signal.SIGTERM)
        return real(run, micro, deadline)

    monkeypatch.setattr(loop_mod, "_train_step", step_then_signal)
    train(TrainConfig(out=str(tmp_path / "cut"), **common))
    assert "stopped by SIGTERM at step 3/6" in capsys.readouterr().out
    assert checkpoints(tmp_path / "cut") == ["step_0000003"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    monkeypatch.undo()
    train(TrainConfig(out=str(tmp_path / "cut"), **common))
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "nestlearn.train", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "NESTLEARN_DEBUG": "0"}


def test_ctrl_c_saves_and_exits_0_then_the_log_resumes_cleanly(data, tmp_path) -> None:
    """The real command: SIGINT mid-run -> one line, exit 0, a checkpoint; a cut-off last line in metrics.jsonl
    is tolerated; the resumed run logs each step once, and TensorBoard purges the overlap."""
    args = [f"data={data}", f"out={tmp_path}", "model=debug", "variant=transformer", "seq_len=16", "batch_size=4",
            "steps=100000", "log_every=1", "eval_every=100000", "ckpt_every=100000", "warmup=1",
            "model_overrides.n_layers=2", "model_overrides.d_model=32", "model_overrides.n_heads=2",
            "model_overrides.mlp_hidden=48"]  # fmt: skip
    proc = subprocess.Popen(_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 5) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "Traceback" not in out
    assert len([line for line in out.splitlines() if line.startswith("stopped by SIGINT")]) == 1
    (stop,) = checkpoints(tmp_path)
    stopped_at = int(stop.split("_")[1])
    logged = [r["step"] for r in records(tmp_path)]
    assert logged[-1] == stopped_at
    # work logged after the checkpoint (a killed run) and a line cut off mid-write
    with open(metrics, "a") as f:
        f.write(json.dumps({"step": stopped_at + 1, "loss": 1.0}) + "\n" + '{"step": 99, "lo')
    result = subprocess.run(_command(*args[:-9], f"stop_at={stopped_at + 3}", *args[-9:]), capture_output=True,
                            text=True, env=_env(), timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    steps = [r["step"] for r in records(tmp_path)]
    assert steps == list(range(1, stopped_at + 4))
    assert (tmp_path / "loss.png").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == steps


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(data, tmp_path, capsys) -> None:
    common = dict(data=str(data), steps=9, **TINY)
    train(TrainConfig(out=str(tmp_path / "whole"), **common))
    train(TrainConfig(out=str(tmp_path / "cut"), stop_at=6, **common))
    weights = tmp_path / "cut" / "checkpoints" / "step_0000006" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    train(TrainConfig(out=str(tmp_path / "cut"), **common))
    out = capsys.readouterr().out
    assert "step_0000006 is damaged and passed over" in out and "resuming from" in out and "step_0000003" in out
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    assert checkpoints(tmp_path / "cut")[-1] == "step_0000009"


def test_a_checkpoint_with_nan_weights_counts_as_damaged(data, tmp_path, capsys) -> None:
    """Checkpoints written by older versions could hold NaN: they are passed over like torn ones."""
    import torch
    from safetensors.torch import load_file

    from nestlearn.io import save_bundle

    common = dict(data=str(data), out=str(tmp_path), steps=9, **TINY)
    train(TrainConfig(stop_at=6, **common))
    path = tmp_path / "checkpoints" / "step_0000006"
    tensors = load_file(path / "model.safetensors")
    meta = json.loads((path / "model.json").read_text())
    meta.pop("tensors_sha256")
    save_bundle(path, "model", {k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, meta)
    train(TrainConfig(stop_at=7, **common))
    out = capsys.readouterr().out
    assert "step_0000006 is damaged and passed over (its weights hold NaN or inf" in out
    assert checkpoints(tmp_path) == ["step_0000003", "step_0000006"]  # the NaN one replaced by a good one


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"lr": 1e-3}, "lr 0.0003 in the checkpoint, 0.001 now"),
        ({"steps": 12}, "steps 9 in the checkpoint, 12 now"),
        ({"seq_len": 8}, "seq_len 16 in the checkpoint, 8 now"),
        ({"batch_size": 2}, "batch_size 4 in the checkpoint, 2 now"),
        ({"warmup": 5}, "warmup 2 in the checkpoint, 5 now"),
        ({"optimizer": "muon"}, "optimizer 'adamw' in the checkpoint, 'muon' now"),
        ({"model_overrides": {**TINY["model_overrides"], "d_model": 64}}, "model d_model 32 -> 64"),
    ],
)
def test_a_resume_that_changes_the_run_is_refused_naming_the_field(data, tmp_path, change, named) -> None:
    common = dict(data=str(data), out=str(tmp_path), steps=9, **TINY)
    train(TrainConfig(stop_at=3, **common))
    with pytest.raises(ValueError, match="allow_changes=") as info:
        train(TrainConfig(**{**common, **change}))
    assert named in str(info.value)


def test_allowed_changes_continue(data, tmp_path, capsys) -> None:
    common = dict(data=str(data), out=str(tmp_path), steps=9, **TINY)
    train(TrainConfig(stop_at=3, **common))
    train(TrainConfig(**{**common, "steps": 6, "optimizer": "muon", "allow_changes": ("steps", "optimizer")}))
    out = capsys.readouterr().out
    assert "resuming with changed settings (allowed)" in out and "its state starts fresh" in out
    assert [s for s, *_ in losses(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_other_data_is_refused_on_resume(data, tmp_path) -> None:
    other = make_data(tmp_path / "other", {"plays": {"a": "To be, or not to be. " * 300}})
    train(TrainConfig(data=str(data), out=str(tmp_path / "run"), steps=6, stop_at=3, **TINY))
    with pytest.raises(ValueError, match=r"data .*train\.bin.* differ from the checkpoint's"):
        train(TrainConfig(data=str(other), out=str(tmp_path / "run"), steps=6, **TINY))


def test_out_of_time_ends_evaluated_and_checkpointed_logging_each_step_once(data, tmp_path, capsys) -> None:
    train(TrainConfig(data=str(data), out=str(tmp_path), steps=50, max_minutes=1e-5, **{**TINY, "log_every": 1}))
    rows = records(tmp_path)
    assert [r["step"] for r in rows] == [1] and rows[0]["val_loss"] is not None
    assert checkpoints(tmp_path) == ["step_0000001"]
    assert "out of time (1e-05 min) at step 1/50" in capsys.readouterr().out
