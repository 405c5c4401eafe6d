"""Loading a trained run: the newest intact checkpoint of a run directory (a damaged newer one is named and passed
over, as resume does) or a given checkpoint, the model in eval mode with the trained weights and the checkpoint's
SHA-256; every bad input (no directory, not a run, no checkpoint, all damaged, a damaged checkpoint given,
tokenizer files missing) is one line naming the fix; the Hugging Face export reloads with the same logits; the
report records the checkpoint, commit, seed and numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from nestlearn.eval import export_hf, load_run, write_report
from nestlearn.io import load_bundle
from tests.eval.conftest import STEPS, copy_run, one_line_error


def _newest(run: Path) -> Path:
    return run / "checkpoints" / f"step_{STEPS:07d}"


def _damage(checkpoint: Path) -> None:
    path = checkpoint / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_run_loads_its_newest_checkpoint_with_the_trained_weights(run) -> None:
    loaded = load_run(run)
    tensors, meta = load_bundle(_newest(run), "model")
    assert loaded.step == STEPS and loaded.checkpoint == _newest(run) and not loaded.model.training
    assert loaded.info["sha256"] == meta["tensors_sha256"] and loaded.info["variant"] == "hope_attention"
    assert loaded.tokenizer.identity == {"name": "bytes", "vocab_size": 256}
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, tensors[name]), name
    again = load_run(_newest(run))  # a checkpoint directory directly
    assert again.info["run"] is None and again.info["sha256"] == loaded.info["sha256"]


def test_a_damaged_newest_checkpoint_is_passed_over(run, tmp_path, capsys) -> None:
    copy = copy_run(run, tmp_path)
    _damage(_newest(copy))
    loaded = load_run(copy)
    assert loaded.step == 3
    assert "step_0000006 is damaged and passed over" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", r"does not exist or is not a directory; give the `out` directory of `nestlearn train`"),
        ("not a run", r"is not a training run \(it has no checkpoints/ directory\); give the `out` directory"),
        ("no checkpoint", r"holds no checkpoint yet; train longer"),
        ("all damaged", r"every checkpoint in .* is damaged \(2 tried; the newest, step_0000006: .*SHA-256"),
        ("damaged checkpoint", r"checkpoint .*step_0000006 is damaged \(.*\); give its run directory"),
        ("hf tokenizer", r"local Hugging Face tokenizer 'hf:mytok', whose directory is not recorded; pass --tokenizer"),
    ],
)
def test_bad_runs_are_one_line_naming_the_fix(case, message, run, tmp_path, capsys) -> None:
    target = tmp_path / "nothing"
    if case == "not a run":
        target.mkdir()
    elif case == "no checkpoint":
        (target / "checkpoints").mkdir(parents=True)
    elif case != "missing":
        target = copy_run(run, tmp_path)
        if case in ("all damaged", "damaged checkpoint"):
            for checkpoint in (target / "checkpoints").iterdir():
                _damage(checkpoint)
            target = _newest(target) if case == "damaged checkpoint" else target
        else:
            meta_path = _newest(target) / "model.json"
            meta = json.loads(meta_path.read_text())
            meta["tokenizer"] = {"name": "hf:mytok", "vocab_size": 256, "files": {}}
            meta_path.write_text(json.dumps(meta))
            target = _newest(target)
    err = one_line_error(["eval", "lm", str(target), "--device", "cpu"], capsys)
    assert err.startswith("nestlearn eval lm: ")
    assert re.search(message, err), err


def test_missing_tokenizer_files_are_named(run) -> None:
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match=r"tokenizer 'hf:/no/such/dir' of checkpoint .* cannot be loaded \(.*"
                                         r"does not exist.*\); restore its files"):  # fmt: skip
        load_run(run, tokenizer="hf:/no/such/dir")


def test_hugging_face_export_reloads_with_the_same_logits(run, tmp_path) -> None:
    pytest.importorskip("transformers", minversion="5.20")
    from transformers import AutoModelForCausalLM

    import nestlearn.models.hf  # noqa: F401  (registers the model type)

    loaded = load_run(run)
    out = export_hf(loaded, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 256, (2, 21))
    with torch.no_grad():
        ours, _ = loaded.model(ids)
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=0)
    assert json.loads((out / "nestlearn_checkpoint.json").read_text())["sha256"] == loaded.info["sha256"]


def test_the_report_records_where_its_numbers_come_from(run, tmp_path) -> None:
    loaded = load_run(run)
    path = write_report(tmp_path / "r" / "x.json", "lm", {"windows": 2, "data": tmp_path}, {"loss": float("nan")},
                        loaded, seed=3)  # fmt: skip
    report = json.loads(path.read_text())
    assert report["kind"] == "lm" and report["seed"] == 3 and report["commit"] and report["date"].startswith("20")
    assert report["checkpoint"]["sha256"] == loaded.info["sha256"] and report["checkpoint"]["step"] == STEPS
    assert report["config"] == {"windows": 2, "data": str(tmp_path)} and report["numbers"] == {"loss": None}
