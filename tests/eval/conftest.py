"""Shared by the evaluation tests: a tiny byte-level dataset with a held-out source and one tiny trained run
(Hope-Attention whose online CMS level learns every 8 tokens, 6 steps, checkpoints at steps 3 and 6), both
made once per session; `copy_run` gives a test its own copy to damage; `one_line_error` runs a command that
must fail with one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nestlearn.data import shards as shards_mod
from nestlearn.data.shards import prepare
from nestlearn.data.tokenizer import ByteTokenizer
from nestlearn.eval.command import main
from nestlearn.train import TrainConfig, train
from tests.data.test_shards import CORPUS
from tests.train.helpers import SMALL, TINY

STEPS = 6
ONLINE = {**SMALL, "cms_levels": (None, 8), "cms_lr": (0.0, 0.1)}
RUN = {**TINY, "variant": "hope_attention", "model_overrides": ONLINE, "steps": STEPS, "lr": 1e-2}


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sources "plays" (40 documents) and "novels" (2) split into train / val; "essays" held out."""
    mp = pytest.MonkeyPatch()
    mp.setattr(shards_mod, "read_docs", lambda name: CORPUS[name])
    mp.setattr(shards_mod, "licence", lambda name: "public domain")
    try:
        out = tmp_path_factory.mktemp("eval-data") / "data"
        return prepare(["plays", "novels"], ByteTokenizer(), out, held_out=["essays"], val_fraction=0.2)
    finally:
        mp.undo()


@pytest.fixture(scope="session")
def run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval-run")
    train(TrainConfig(data=str(data), out=str(out), **RUN))
    return out


def copy_run(run: Path, to: Path) -> Path:
    return Path(shutil.copytree(run, to / "run"))


def one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run `nestlearn <argv>` expecting exit status 2 and one line on stderr; returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()
