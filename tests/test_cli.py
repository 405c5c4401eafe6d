"""The `nestlearn` command: `data verify` reports each file and fails on damaged data; every `nestlearn data`
error is one line on stderr with exit status 2 (no traceback unless NESTLEARN_DEBUG=1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nestlearn.cli import main
from nestlearn.data import shards as shards_mod
from nestlearn.data.shards import prepare
from nestlearn.data.tokenizer import ByteTokenizer
from nestlearn.errors import user_errors

REPO = Path(__file__).resolve().parents[1]
CORPUS = {"plays": {f"doc{i:02d}": f"All the world's a stage ({i}).\n" * (2 + i % 3) for i in range(30)}}


@pytest.fixture
def prepared(tmp_path, monkeypatch):
    monkeypatch.setattr(shards_mod, "read_docs", lambda name: CORPUS[name])
    monkeypatch.setattr(shards_mod, "licence", lambda name: "public domain")
    monkeypatch.delenv("NESTLEARN_DEBUG", raising=False)
    return prepare(["plays"], ByteTokenizer(), tmp_path / "data", val_fraction=0.2)


def _fails(argv: list[str], capsys) -> str:
    """Run `main(argv)`, expecting exit status 2; returns stderr, checked to be one line."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def test_verify_lists_each_file(prepared, capsys) -> None:
    main(["data", "verify", str(prepared)])
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out[:2]] == ["train.bin", "val.bin"] and all(
        line.endswith("tokens  OK") for line in out[:2]
    )
    assert "tokens verified in" in out[2]


def test_verify_of_damaged_data_is_one_line_on_stderr(prepared, capsys) -> None:
    data = np.fromfile(prepared / "val.bin", dtype=np.uint16)
    data[0] ^= 1
    data.tofile(prepared / "val.bin")
    env = {k: v for k, v in os.environ.items() if k != "NESTLEARN_DEBUG"} | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "nestlearn.cli", "data", "verify", str(prepared)]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("nestlearn data verify: ")
    assert "val.bin: SHA-256" in result.stderr and "prepare the dataset again" in result.stderr
    (prepared / "train.bin").write_bytes(b"short")
    assert "the file is truncated" in _fails(["data", "verify", str(prepared)], capsys)


def test_data_errors_are_one_line(prepared, tmp_path, capsys, monkeypatch) -> None:
    assert "nestlearn data fetch: unknown corpus 'nosuch'" in _fails(["data", "fetch", "nosuch"], capsys)
    assert "is not a prepared dataset" in _fails(["data", "verify", str(tmp_path / "none")], capsys)
    (tmp_path / "file").write_text("")

    def unreachable(name):
        raise AssertionError("an unwritable --out must be refused before any corpus is read")

    monkeypatch.setattr(shards_mod, "read_docs", unreachable)
    argv = ["data", "prepare", "--sources", "plays", "--tokenizer", "bytes", "--out", str(tmp_path / "file" / "d")]
    err = _fails(argv, capsys)
    assert err.startswith(f"nestlearn data prepare: cannot create {tmp_path / 'file' / 'd'} (")
    assert "choose a writable output directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "file"]  # no temporary directory left


def test_debug_shows_the_traceback(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("NESTLEARN_DEBUG", "1")
    with pytest.raises(ValueError, match="is not a prepared dataset"):
        main(["data", "verify", str(tmp_path / "none")])


def test_user_errors_formats_os_errors_and_lets_others_through(capsys, monkeypatch) -> None:
    monkeypatch.delenv("NESTLEARN_DEBUG", raising=False)
    with pytest.raises(SystemExit) as info, user_errors("nestlearn train"):
        raise PermissionError(13, "Permission denied", "/runs/x")
    assert info.value.code == 2 and capsys.readouterr().err == "nestlearn train: /runs/x: Permission denied\n"
    with pytest.raises(SystemExit), user_errors("nestlearn train"):
        raise RuntimeError("first line\n  second line")
    assert capsys.readouterr().err == "nestlearn train: first line second line\n"
    with pytest.raises(SystemExit) as info, user_errors("nestlearn train"):
        raise KeyboardInterrupt
    assert info.value.code == 130 and capsys.readouterr().err == "\nnestlearn train: aborted\n"
    with pytest.raises(TypeError), user_errors("nestlearn train"):
        raise TypeError("a bug")
