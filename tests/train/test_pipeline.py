"""`nestlearn train`: exact resume after a stop, 2-process DDP == 1 process (CPU, gloo), schedules, configs from
YAML / Python / overrides, and bad input (unknown key, corrupt checkpoint, other tokenizer, full disk) named with
the previous checkpoint left intact."""

from __future__ import annotations

import json

import pytest

from nestlearn.train import TrainConfig, load_config, lr_factor, train
from nestlearn.train import checkpoints as train_mod
from tests.train.helpers import TINY, losses, one_process, torchrun


def test_stop_and_resume_gives_the_same_loss_curve(data, tmp_path) -> None:
    train(TrainConfig(data=str(data), out=str(tmp_path / "a"), steps=6, **TINY))
    train(TrainConfig(data=str(data), out=str(tmp_path / "b"), steps=6, stop_at=3, **TINY))  # "killed" at step 3
    assert [s for s, *_ in losses(tmp_path / "b")] == [1, 2, 3]
    train(TrainConfig(data=str(data), out=str(tmp_path / "b"), steps=6, **TINY))  # resumes from step 3
    assert losses(tmp_path / "b") == losses(tmp_path / "a")  # bit-identical on CPU
    ckpts = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert ckpts == ["step_0000003", "step_0000006"]
    meta = json.loads((tmp_path / "a" / "checkpoints" / "step_0000006" / "trainer.json").read_text())
    assert meta["tokenizer"]["name"] == "bytes" and meta["config"]["steps"] == 6 and meta["code_version"]
    assert (tmp_path / "a" / "loss.png").is_file()


def test_keep_last_n(data, tmp_path) -> None:
    train(TrainConfig(data=str(data), out=str(tmp_path), steps=9, keep_last=2, **{**TINY, "ckpt_every": 2}))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000008", "step_0000009"]


def test_two_process_ddp_equals_one_process(data, tmp_path) -> None:
    """Same global batch: 2 ranks x 2 sequences == 1 process x 4, with online CMS levels learning per rank."""
    common = [f"data={data}", "model=debug", "variant=hope_attention", "seq_len=16", "batch_size=4", "steps=3",
              "warmup=1", "log_every=1", "eval_every=3", "eval_windows=2", "ckpt_every=3",
              "model_overrides.n_layers=2", "model_overrides.d_model=32", "model_overrides.n_heads=2",
              "model_overrides.mlp_hidden=32", "model_overrides.cms_levels=[null,8]",
              "model_overrides.cms_lr=[0.0,0.1]"]  # fmt: skip
    one_process([*common, f"out={tmp_path / 'one'}"])
    torchrun(2, [*common, f"out={tmp_path / 'two'}"])
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, *_ in one] == [1, 2, 3]
    for (s1, l1, v1), (s2, l2, v2) in zip(one, two, strict=True):
        assert s1 == s2 and abs(l1 - l2) < 1e-5 and (v1 is None) == (v2 is None)


def test_schedules() -> None:
    cfg = TrainConfig(data="x", steps=100, warmup=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == 1.0
    assert lr_factor(99, cfg) == pytest.approx(0.1, abs=1e-3)
    wsd = TrainConfig(data="x", steps=100, warmup=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_factor(50, wsd) == 1.0 and lr_factor(90, wsd) == pytest.approx(0.5)


def test_config_files_and_overrides(tmp_path) -> None:
    (tmp_path / "c.yaml").write_text("data: d\nsteps: 50\nmodel_overrides: {cms_lr: 0.01}\n")
    cfg = load_config(str(tmp_path / "c.yaml"), ["lr=0.001", "model_overrides.cms_variant=nested"])
    assert cfg.steps == 50 and cfg.lr == 0.001 and cfg.model_overrides == {"cms_lr": 0.01, "cms_variant": "nested"}
    (tmp_path / "c.py").write_text("from nestlearn.train import TrainConfig\nconfig = TrainConfig(data='d', steps=7)\n")
    assert load_config(str(tmp_path / "c.py"), []).steps == 7
    with pytest.raises(ValueError, match=r"unknown config keys \['stpes'\]"):
        load_config(None, ["data=d", "stpes=3"])
    with pytest.raises(ValueError, match="needs `data`"):
        load_config(None, ["steps=3"])
    with pytest.raises(ValueError, match="not divisible by grad_accum"):
        TrainConfig(data="d", batch_size=6, grad_accum=4)


def test_corrupt_checkpoint_is_refused(data, tmp_path) -> None:
    train(TrainConfig(data=str(data), out=str(tmp_path), steps=6, stop_at=3, **TINY))
    weights = tmp_path / "checkpoints" / "step_0000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"corrupt|truncated|does not match"):
        train(TrainConfig(data=str(data), out=str(tmp_path), steps=6, **TINY))


def test_checkpoint_from_another_tokenizer_is_refused(data, tmp_path) -> None:
    train(TrainConfig(data=str(data), out=str(tmp_path), steps=6, stop_at=3, **TINY))
    path = tmp_path / "checkpoints" / "step_0000003" / "model.json"
    meta = json.loads(path.read_text())
    meta["tokenizer"] = {"name": "gpt2", "vocab_size": 50257}
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="made with tokenizer 'gpt2'"):
        train(TrainConfig(data=str(data), out=str(tmp_path), steps=6, **TINY))


def test_full_disk_mid_save_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch) -> None:
    train(TrainConfig(data=str(data), out=str(tmp_path), steps=6, stop_at=3, **TINY))
    real = train_mod.save_bundle

    def failing(directory, name, tensors, meta):
        if name == "optimizer":
            raise OSError(28, "No space left on device")
        return real(directory, name, tensors, meta)

    monkeypatch.setattr(train_mod, "save_bundle", failing)
    with pytest.raises(OSError, match="No space left"):
        train(TrainConfig(data=str(data), out=str(tmp_path), steps=6, **TINY))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000003"]  # no temporary left
    monkeypatch.undo()
    train(TrainConfig(data=str(data), out=str(tmp_path), steps=6, **TINY))  # resumes from the intact one
    assert (tmp_path / "checkpoints" / "step_0000006").is_dir()


def test_two_process_fsdp2_with_resume_equals_one_process(data, tmp_path) -> None:
    """FSDP2 (`fully_shard`, gloo on CPU): 2 ranks, stopped at step 3 and resumed from the gathered checkpoint,
    give the single-process losses."""
    common = [f"data={data}", "model=debug", "variant=transformer", "seq_len=16", "batch_size=4", "steps=6",
              "warmup=1", "log_every=1", "eval_every=3", "eval_windows=2", "ckpt_every=3",
              "model_overrides.n_layers=2", "model_overrides.d_model=32", "model_overrides.n_heads=2",
              "model_overrides.mlp_hidden=32"]  # fmt: skip
    one_process([*common, f"out={tmp_path / 'one'}"])
    torchrun(2, [*common, "distributed=fsdp", "stop_at=3", f"out={tmp_path / 'two'}"])
    torchrun(2, [*common, "distributed=fsdp", f"out={tmp_path / 'two'}"])
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [s for s, *_ in two] == [1, 2, 3, 4, 5, 6]
    for (_, l1, v1), (_, l2, v2) in zip(one, two, strict=True):
        assert abs(l1 - l2) < 1e-5 and (v1 is None or abs(v1 - v2) < 1e-5)


def test_fsdp_refuses_what_it_cannot_shard(data) -> None:
    with pytest.raises(ValueError, match="needs torchrun"):
        train(TrainConfig(data=str(data), distributed="fsdp", steps=1, **TINY))


def test_accumulation_matches_one_big_batch_and_logs_everything(data, tmp_path) -> None:
    """grad_accum = 2 runs the step's batch in two halves: the losses equal one batch's up to float rounding."""
    train(TrainConfig(data=str(data), out=str(tmp_path / "one"), steps=3, **TINY))
    train(TrainConfig(data=str(data), out=str(tmp_path / "acc"), steps=3, grad_accum=2, **TINY))
    for (_, a, _), (_, b, _) in zip(losses(tmp_path / "one"), losses(tmp_path / "acc"), strict=True):
        assert abs(a - b) < 1e-5
    assert any((tmp_path / "one" / "tensorboard").iterdir())


def test_a_deep_optimizer_trains(data, tmp_path) -> None:
    train(TrainConfig(data=str(data), out=str(tmp_path), steps=4, optimizer="muon", **TINY))
    rows = losses(tmp_path)
    assert rows[-1][1] < rows[0][1]
