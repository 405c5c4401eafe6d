"""Config values are typed by their field wherever they come from, and every mistake in a user's input ends the
command with one line naming the field and the fix, before any work is done (no traceback)."""

from __future__ import annotations

import re

import pytest
import torch

from nestlearn.train import TrainConfig, load_config
from nestlearn.train.command import main
from tests.train.helpers import checkpoints, records

TINY_ARGS = ["model=debug", "variant=transformer", "seq_len=16", "batch_size=4", "warmup=1", "log_every=1",
             "eval_every=100", "eval_windows=2", "ckpt_every=3", "model_overrides.n_layers=2",
             "model_overrides.d_model=32", "model_overrides.n_heads=2", "model_overrides.mlp_hidden=48"]  # fmt: skip


@pytest.mark.parametrize("raw", ["3e-3", "1e-4", "0.003", "3E-3"])
def test_exponents_are_floats_on_the_command_line(raw) -> None:
    cfg = load_config(None, ["data=d", f"lr={raw}", f"matrix_lr={raw}", f"model_overrides.cms_lr={raw}"])
    assert cfg.lr == float(raw) and isinstance(cfg.lr, float) and isinstance(cfg.matrix_lr, float)
    assert cfg.model_overrides["cms_lr"] == float(raw) and isinstance(cfg.model_overrides["cms_lr"], float)


def test_yaml_values_are_typed_by_their_field(tmp_path) -> None:
    (tmp_path / "c.yaml").write_text(
        "data: d\nlr: 3e-4\nsteps: 1e3\nwarmup: '10'\ncompile: 'yes'\nmax_minutes: 2\nallow_changes: lr,steps\n"
        "model_overrides: {cms_lr: 1e-3, cms_levels: [null, 64], mem_chunk: '16'}\n"
    )
    cfg = load_config(str(tmp_path / "c.yaml"), [])
    assert (cfg.lr, cfg.steps, cfg.warmup, cfg.compile, cfg.max_minutes) == (3e-4, 1000, 10, True, 2.0)
    assert isinstance(cfg.lr, float) and isinstance(cfg.steps, int) and isinstance(cfg.max_minutes, float)
    assert cfg.allow_changes == ("lr", "steps")
    assert cfg.model_overrides == {"cms_lr": 1e-3, "cms_levels": (None, 64), "mem_chunk": 16}


def test_python_configs_are_typed_too() -> None:
    assert TrainConfig(data="d", lr="3e-3", steps="20").lr == 3e-3  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["lr=abc"], "lr: expected a number, got 'abc'"),
        (["steps=ten"], "steps: expected an integer, got 'ten'"),
        (["steps=2.5"], "steps: expected an integer, got 2.5"),
        (["lr=-1"], "lr must be a positive number"),
        (["variant=hop"], "unknown variant 'hop'; choose one of hope, hope_attention"),
        (["model=21M"], "unknown preset|unknown model '21M'; choose one of debug, 20M"),
        (["optimizer=adam"], "unknown optimizer 'adam'; choose one of adamw"),
        (["schedule=linear"], "schedule: expected one of 'cosine', 'wsd', 'constant'"),
        (
            ["model_overrides.cms_lrr=0.1"],
            r"model_overrides.cms_lrr is not a model setting \(did you mean 'cms_lr'\?\)",
        ),
        (["model_overrides.d_model=wide"], "model_overrides.d_model: expected an integer, got 'wide'"),
        (["stpes=3"], r"unknown config keys \['stpes'\] \(did you mean 'steps'\?\)"),
        (["device=gpu"], "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        (["allow_changes=lrr"], r"allow_changes names \['lrr'\]; valid names: all, data"),
        (["lr=[1,"], "lr: cannot read"),
    ],
)
def test_bad_values_are_one_line_naming_the_field(args, message, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main([f"data={tmp_path}", f"out={tmp_path / 'run'}", *args])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("nestlearn train: "), err
    assert re.search(message, err), err


def _one_line_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_malformed_yaml_is_named_with_its_line(tmp_path, capsys) -> None:
    (tmp_path / "c.yaml").write_text("data: d\nlr: [0.1\nsteps: 3\n")
    err = _one_line_error(["--config", str(tmp_path / "c.yaml")], capsys)
    assert "is not valid YAML" in err and "line" in err


def test_missing_data_is_one_line(tmp_path, capsys) -> None:
    err = _one_line_error([f"data={tmp_path / 'nowhere'}", f"out={tmp_path / 'run'}", *TINY_ARGS], capsys)
    assert "is not a prepared dataset" in err and "nestlearn data prepare" in err


def test_an_unwritable_out_fails_before_any_work(data, tmp_path, capsys) -> None:
    (tmp_path / "a_file").write_text("")
    err = _one_line_error([f"data={data}", f"out={tmp_path / 'a_file' / 'run'}", "steps=3", *TINY_ARGS], capsys)
    assert "cannot write to out=" in err and "choose a writable directory" in err
    assert "step " not in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(data, tmp_path, capsys) -> None:
    err = _one_line_error([f"data={data}", f"out={tmp_path}", "device=cuda", *TINY_ARGS], capsys)
    assert "device=cuda but CUDA is not available" in err and "device=cpu" in err


def test_vocab_override_smaller_than_the_data_is_named(data, tmp_path, capsys) -> None:
    err = _one_line_error([f"data={data}", f"out={tmp_path}", *TINY_ARGS, "model_overrides.vocab_size=100"], capsys)
    assert "model_overrides.vocab_size = 100 is smaller than the data's vocabulary (256" in err


def test_an_optimizer_changed_on_resume_is_one_line(data, tmp_path, capsys) -> None:
    main([f"data={data}", f"out={tmp_path}", "steps=6", "stop_at=3", *TINY_ARGS])
    err = _one_line_error([f"data={data}", f"out={tmp_path}", "steps=6", "optimizer=muon", *TINY_ARGS], capsys)
    assert "optimizer 'adamw' in the checkpoint, 'muon' now" in err and "allow_changes=optimizer" in err
    assert checkpoints(tmp_path) == ["step_0000003"]


def test_warmup_longer_than_the_run_warns_and_trains(data, tmp_path, capsys) -> None:
    main([f"data={data}", f"out={tmp_path}", *TINY_ARGS, "steps=3", "warmup=5"])
    assert "warning: warmup (5) >= steps (3)" in capsys.readouterr().err
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3]


def test_debug_shows_the_traceback(tmp_path) -> None:
    with pytest.raises(ValueError, match="lr: expected a number"):
        main(["--debug", f"data={tmp_path}", "lr=abc"])


@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
def test_damaged_data_is_refused_before_any_step(tmp_path, capsys, damage) -> None:
    """A truncated or overwritten train.bin is refused in one line before any step (unchecked, a truncated file trains
    silently and overwritten bytes fail at a later step with IndexError)."""
    from tests.train.conftest import make_data

    data = make_data(tmp_path / "data")
    tokens = data / "train.bin"
    raw = bytearray(tokens.read_bytes())
    tokens.write_bytes(raw[:-10] if damage == "truncate" else raw[:100] + b"\xff" * 10 + raw[110:])
    err = _one_line_error([f"data={data}", f"out={tmp_path / 'run'}", "steps=3", *TINY_ARGS], capsys)
    assert "train.bin" in err and ("truncated" in err or "SHA-256" in err or "vocabulary" in err), err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
