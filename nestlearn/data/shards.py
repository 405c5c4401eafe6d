"""Tokenised shards with document boundaries, integrity checks, and a deterministic, resumable batch sampler.

What this is: `prepare(sources, tokenizer, out)` tokenises named corpora into flat token files (`uint16` when
the vocabulary fits, else `uint32`) under `out/`: `train.bin`, `val.bin` (per-source splits: whole documents
chosen by a hash of their id, or the tail of each document for sources with few documents) and
`heldout_<source>.bin` for whole held-out domains; each with `<file>.docs.npy` (document start offsets); and
`meta.json` (tokenizer identity, per-source counts, each file's token count and SHA-256). Documents are separated
by the tokenizer's `eot` id. The directory is written under a temporary name and renamed, so it is complete or
absent. `Shards(out)` opens it and checks, without reading token data, that `meta.json` is well formed and every
file it lists exists with the byte size its token count implies. `Shards.verify()` reads everything: each file's
SHA-256 against `meta.json`, every token id below the vocabulary size, the document offsets; it leaves a stamp
`.verified.json` (each file's size, mtime and hash) so that a later `verify()` of unchanged files skips the
hashing (`full=True` ignores the stamp). `Shards.batch(step, ...)` draws the windows of one step from
`(seed, step)` alone: any step can be re-drawn exactly (resume), and rank r of `world` takes its slice of the
global batch, so N processes see the sequences one process would.
What it is not: the corpora's download (`corpora.py`), the tokenizers (`tokenizer.py`), or protection against
deliberate tampering (the stamp trusts file sizes and modification times).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import first_line
from .corpora import licence, read_docs
from .tokenizer import Tokenizer, check_identity

FEW_DOCS = 20  # below this a source is split inside each document instead of by documents
BLOCK = 1 << 23  # tokens read at a time by `verify` (16 MiB of uint16): memory stays bounded
STAMP = ".verified.json"
FIX = "prepare the dataset again (`nestlearn data prepare`)"
META_KEYS = ("tokenizer", "dtype", "eot", "files")
DTYPES = ("uint16", "uint32")


def prepare(
    sources: Sequence[str],
    tokenizer: Tokenizer,
    out: str | Path,
    *,
    held_out: Sequence[str] = (),
    val_fraction: float = 0.05,
) -> Path:
    """Tokenise `sources` (training + validation) and `held_out` (whole evaluation domains) into `out`."""
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} already exists; delete it or choose another output directory")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    if set(sources) & set(held_out):
        raise ValueError(f"{sorted(set(sources) & set(held_out))} are both training sources and held out")
    tmp = _temporary_dir(out)  # before tokenising: an unwritable `out` fails at once
    try:
        streams, stats = _tokenise(sources, held_out, tokenizer, val_fraction)
        dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
        files = {
            f"{split}.bin": _write(tmp / f"{split}.bin", docs, tokenizer.eot, dtype) for split, docs in streams.items()
        }
        meta = {"tokenizer": tokenizer.identity, "dtype": np.dtype(dtype).name, "eot": tokenizer.eot,
                "val_fraction": val_fraction, "sources": stats, "files": files}  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _temporary_dir(out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    except OSError as e:
        raise ValueError(f"cannot create {out} ({e.strerror}: {e.filename}); choose a writable output directory") from e


def _tokenise(
    sources: Sequence[str], held_out: Sequence[str], tokenizer: Tokenizer, val_fraction: float
) -> tuple[dict[str, list[list[int]]], dict[str, Any]]:
    streams: dict[str, list[list[int]]] = {"train": [], "val": []}
    stats: dict[str, Any] = {}
    for name in sources:
        train, val = _split(name, read_docs(name), tokenizer, val_fraction)
        streams["train"] += train
        streams["val"] += val
        stats[name] = {"docs_train": len(train), "docs_val": len(val), "licence": licence(name)}
    for name in held_out:
        streams[f"heldout_{name}"] = [tokenizer.encode(t) for t in read_docs(name).values()]
        stats[name] = {"held_out": True, "docs": len(streams[f"heldout_{name}"]), "licence": licence(name)}
    return streams, stats


def _split(name: str, docs: dict[str, str], tok: Tokenizer, frac: float) -> tuple[list[list[int]], list[list[int]]]:
    """Whole documents by id hash; with fewer than FEW_DOCS documents, the last `frac` of each document."""
    train, val = [], []
    for doc_id, text in docs.items():
        ids = tok.encode(text)
        if len(docs) < FEW_DOCS:
            cut = int(len(ids) * (1 - frac))
            train.append(ids[:cut])
            val.append(ids[cut:])
        elif int(hashlib.sha1(f"{name}/{doc_id}".encode()).hexdigest(), 16) % 10_000 < frac * 10_000:
            val.append(ids)
        else:
            train.append(ids)
    return train, val


def _write(path: Path, docs: list[list[int]], eot: int, dtype: type) -> dict[str, Any]:
    starts, flat = [], []
    for ids in docs:
        starts.append(len(flat))
        flat.extend(ids)
        flat.append(eot)
    arr = np.asarray(flat, dtype=dtype)
    arr.tofile(path)
    np.save(_docs_path(path), np.asarray(starts, dtype=np.int64))
    return {"tokens": int(arr.size), "docs": len(docs), "sha256": hashlib.sha256(arr.tobytes()).hexdigest()}


def _docs_path(path: Path) -> Path:
    return path.with_suffix(".docs.npy")


class Shards:
    """A prepared directory: token files as memory maps and the step-indexed batch sampler.

    Opening checks `meta.json` and every listed file's presence and size (no token data is read); `verify()`
    checks the contents.
    """

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.meta, self._meta_sha = _read_meta(self.dir)
        self.dtype = np.dtype(self.meta["dtype"])
        self._check_sizes()

    def check_tokenizer(self, identity: dict[str, Any]) -> None:
        check_identity(self.meta["tokenizer"], identity, f"dataset {self.dir}")

    def verify(self, *, full: bool = False) -> dict[str, Any]:
        """Check every file's SHA-256, token ids (< vocabulary size) and document offsets; ValueError naming the
        file and the problem. Files unchanged (size, mtime) since a recorded successful verification are not
        hashed again unless `full`. Returns `{"files": {name: tokens}, "tokens", "seconds", "hashed": [names],
        "stamp_used": bool}`."""
        start = time.perf_counter()
        self._check_sizes()
        trusted = {} if full else self._read_stamp()
        entries, hashed = {}, []
        for name, info in self.meta["files"].items():
            path = self.dir / name
            st = path.stat()  # before reading: a change during the check makes the stamp stale, not wrong
            entries[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": info["sha256"]}
            if trusted.get(name) != entries[name]:
                _check_tokens(path, self.dtype, info["sha256"], self.meta["tokenizer"]["vocab_size"])
                hashed.append(name)
            _check_docs(_docs_path(path), info["tokens"], info["docs"])
        if hashed:
            self._write_stamp(entries)
        files = {name: info["tokens"] for name, info in self.meta["files"].items()}
        return {"files": files, "tokens": sum(files.values()), "seconds": time.perf_counter() - start,
                "hashed": hashed, "stamp_used": len(hashed) < len(files)}  # fmt: skip

    def tokens(self, split: str) -> np.ndarray:
        name = f"{split}.bin"
        if name not in self.meta["files"]:
            raise ValueError(f"{self.dir} has no split {split!r}; it has {sorted(self.meta['files'])}")
        if self.meta["files"][name]["tokens"] == 0:
            return np.empty(0, dtype=self.dtype)  # a memory map of an empty file is refused
        return np.memmap(self.dir / name, dtype=self.dtype, mode="r")

    def batch(
        self, split: str, step: int, batch: int, seq: int, seed: int, rank: int = 0, world: int = 1
    ) -> torch.Tensor:
        """Rank `rank`'s share `[batch // world, seq + 1]` of the global batch of step `step` (int64)."""
        if batch % world:
            raise ValueError(f"the global batch {batch} is not divisible by the {world} processes")
        data = self._windowable(split, seq)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, data.size - seq - 1, (batch,), generator=gen)
        mine = starts.view(world, batch // world)[rank]
        return torch.from_numpy(np.stack([data[s : s + seq + 1].astype(np.int64) for s in mine.tolist()]))

    def windows(self, split: str, count: int, seq: int) -> torch.Tensor:
        """`count` fixed, evenly spaced windows `[count, seq + 1]` (for evaluation)."""
        data = self._windowable(split, seq)
        count = max(1, min(count, (data.size - 1) // (seq + 1)))
        starts = np.linspace(0, data.size - seq - 1, count).astype(np.int64)
        return torch.from_numpy(np.stack([data[s : s + seq + 1].astype(np.int64) for s in starts]))

    def _windowable(self, split: str, seq: int) -> np.ndarray:
        data = self.tokens(split)
        if data.size <= seq + 1:
            raise ValueError(
                f"split {split!r} has {data.size} tokens, fewer than one window of {seq + 1}; use a shorter seq_len"
            )
        return data

    def _check_sizes(self) -> None:
        """Every listed file exists with `tokens * itemsize` bytes, and its document offsets exist."""
        for name, info in self.meta["files"].items():
            path, want = self.dir / name, info["tokens"] * self.dtype.itemsize
            if not path.is_file():
                raise ValueError(f"{path} is missing (meta.json lists it); {FIX}")
            if (got := path.stat().st_size) != want:
                raise ValueError(
                    f"{path} has {got:,} bytes but meta.json expects {want:,} ({info['tokens']:,} {self.dtype} "
                    f"tokens): the file is {'truncated' if got < want else 'extended'}; {FIX}"
                )
            if not _docs_path(path).is_file():
                raise ValueError(f"{_docs_path(path)} (document offsets of {name}) is missing; {FIX}")

    def _read_stamp(self) -> dict[str, Any]:
        """The stamp's entries that can be trusted: same meta.json, and written after the file's last change."""
        path = self.dir / STAMP
        try:
            written = path.stat().st_mtime_ns
            stamp = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return {}
        if not isinstance(stamp, dict) or stamp.get("meta_sha256") != self._meta_sha:
            return {}
        files = stamp.get("files")
        if not isinstance(files, dict):
            return {}
        # a file changed within the clock tick in which the stamp was written could keep its mtime: distrust it
        return {n: e for n, e in files.items() if isinstance(e, dict) and _older(e.get("mtime_ns"), written)}

    def _write_stamp(self, entries: dict[str, Any]) -> None:
        """Best effort: a directory we cannot write just means hashing again next time."""
        text = json.dumps({"meta_sha256": self._meta_sha, "files": entries}, indent=1)
        tmp = self.dir / f"{STAMP}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # readable by whoever reads the data
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, self.dir / STAMP)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def _older(mtime_ns: Any, written_ns: int) -> bool:
    return isinstance(mtime_ns, int) and mtime_ns < written_ns


def _read_meta(directory: Path) -> tuple[dict[str, Any], str]:
    """`meta.json`, checked for the keys and types `Shards` relies on, and its SHA-256."""
    path = directory / "meta.json"
    if not path.is_file():
        raise ValueError(f"{directory} is not a prepared dataset (no meta.json); run `nestlearn data prepare`")
    try:
        raw = path.read_bytes()
        meta = json.loads(raw)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{path} is unreadable or not valid JSON ({first_line(e)}); the dataset is corrupt, {FIX}"
        ) from None
    problem = _meta_problem(meta)
    if problem:
        raise ValueError(f"{path} is corrupt: {problem}; {FIX}")
    return meta, hashlib.sha256(raw).hexdigest()


def _meta_problem(meta: Any) -> str | None:
    if not isinstance(meta, dict):
        return "it is not a JSON object"
    if missing := [k for k in META_KEYS if k not in meta]:
        return f"it lacks {missing}"
    if meta["dtype"] not in DTYPES:
        return f"dtype {meta['dtype']!r} is not one of {DTYPES}"
    if not isinstance(meta["tokenizer"], dict) or not _count(meta["tokenizer"].get("vocab_size"), 1):
        return "tokenizer.vocab_size is missing or not a positive integer"
    if not isinstance(meta["files"], dict) or not meta["files"]:
        return "'files' is empty or not an object"
    for name, info in meta["files"].items():
        if not re.fullmatch(r"[\w.-]+\.bin", name):
            return f"file name {name!r} is not a plain `.bin` name"
        if not (isinstance(info, dict) and _count(info.get("tokens")) and _count(info.get("docs"))):
            return f"the entry of {name} lacks a token or document count"
        if not re.fullmatch(r"[0-9a-f]{64}", str(info.get("sha256"))):
            return f"the entry of {name} lacks a SHA-256"
    return None


def _count(x: Any, least: int = 0) -> bool:
    return type(x) is int and x >= least


def _check_tokens(path: Path, dtype: np.dtype, sha256: str, vocab: int) -> None:
    """SHA-256 of the file equal to `sha256` and every id below `vocab`, read in blocks of BLOCK tokens."""
    digest, bad, pos = hashlib.sha256(), None, 0
    buf = np.empty(BLOCK, dtype=dtype)
    view = memoryview(buf).cast("B")
    with path.open("rb") as f:
        while got := f.readinto(view):
            digest.update(view[:got])
            block = buf[: got // dtype.itemsize]
            if bad is None and block.size and block.max() >= vocab:
                i = int(np.argmax(block >= vocab))
                bad = (int(block[i]), pos + i)
            pos += block.size
    if digest.hexdigest() != sha256:
        raise ValueError(
            f"{path}: SHA-256 {digest.hexdigest()[:16]}… differs from {sha256[:16]}… in meta.json (hash mismatch: "
            f"the file changed after it was prepared); {FIX}"
        )
    if bad is not None:
        raise ValueError(f"{path}: token id {bad[0]} >= vocabulary size {vocab} at position {bad[1]:,}; {FIX}")


def _check_docs(path: Path, tokens: int, docs: int) -> None:
    """Document offsets: `docs` of them, strictly increasing from 0, all below `tokens`."""
    try:
        starts = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        reason = "not a .npy array" if "pickle" in str(e) else first_line(e)  # numpy's text suggests unpickling
        raise ValueError(f"{path} is unreadable ({reason}); {FIX}") from None
    if problem := _offsets_problem(starts, tokens, docs):
        raise ValueError(f"{path}: {problem}; {FIX}")


def _offsets_problem(starts: np.ndarray, tokens: int, docs: int) -> str | None:
    if starts.ndim != 1 or starts.dtype.kind not in "iu":
        return f"holds a {starts.dtype} array of shape {starts.shape}, not 1-D integer offsets"
    if starts.size != docs:
        return f"holds {starts.size} document offsets but meta.json records {docs} documents"
    starts = starts.astype(np.int64)
    if starts.size and starts[0] != 0:
        return f"the first document starts at {starts[0]}, not 0"
    if (steps := np.diff(starts) <= 0).any():
        i = int(np.argmax(steps)) + 1
        return f"offset {i} ({starts[i]}) does not come after offset {i - 1} ({starts[i - 1]}): not sorted"
    if starts.size and starts[-1] >= tokens:
        return f"the last document starts at {starts[-1]}, beyond the file's {tokens} tokens"
    return None
