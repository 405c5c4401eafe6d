"""Shared by the training tests: a tiny byte-level dataset prepared once per session, the tiny run settings, and
readers of a run's records."""

from __future__ import annotations

from pathlib import Path

import pytest

from nestlearn.data import shards as shards_mod
from nestlearn.data.shards import prepare
from nestlearn.data.tokenizer import ByteTokenizer
from tests.data.test_shards import CORPUS


def make_data(directory: Path, corpus: dict = CORPUS) -> Path:
    mp = pytest.MonkeyPatch()
    mp.setattr(shards_mod, "read_docs", lambda name: corpus[name])
    mp.setattr(shards_mod, "licence", lambda name: "public domain")
    try:
        return prepare(list(corpus), ByteTokenizer(), directory, val_fraction=0.2)
    finally:
        mp.undo()


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("d") / "data")
