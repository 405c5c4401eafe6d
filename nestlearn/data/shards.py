"""Tokenised shards with document boundaries, and a deterministic, resumable batch sampler.

What this is: `prepare(sources, tokenizer, out)` tokenises named corpora into flat token files (`uint16` when
the vocabulary fits, else `uint32`) under `out/`: `train.bin`, `val.bin` (per-source splits: whole documents
chosen by a hash of their id, or the tail of each document for sources with few documents) and
`heldout_<source>.bin` for whole held-out domains; each with `<file>.docs.npy` (document start offsets); and
`meta.json` (tokenizer identity, per-source counts, each file's token count and SHA-256). Documents are separated
by the tokenizer's `eot` id. The directory is written under a temporary name and renamed, so it is complete or
absent. `Shards(out)` opens it (checking the tokenizer and hashes on request) and `Shards.batch(step, ...)` draws
the windows of one step from `(seed, step)` alone: any step can be re-drawn exactly (resume), and rank r of
`world` takes its slice of the global batch, so N processes see the sequences one process would.
What it is not: the corpora's download (`corpora.py`) or the tokenizers (`tokenizer.py`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .corpora import licence, read_docs
from .tokenizer import Tokenizer, check_identity

FEW_DOCS = 20  # below this a source is split inside each document instead of by documents


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
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
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
    np.save(path.with_suffix(".docs.npy"), np.asarray(starts, dtype=np.int64))
    return {"tokens": int(arr.size), "docs": len(docs), "sha256": hashlib.sha256(arr.tobytes()).hexdigest()}


class Shards:
    """A prepared directory: token files as memory maps and the step-indexed batch sampler."""

    def __init__(self, directory: str | Path, *, verify: bool = False) -> None:
        self.dir = Path(directory)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise ValueError(f"{self.dir} is not a prepared dataset (no meta.json); run `nestlearn data prepare`")
        self.meta = json.loads(meta_path.read_text())
        self.dtype = np.dtype(self.meta["dtype"])
        if verify:
            for name, info in self.meta["files"].items():
                data = np.fromfile(self.dir / name, dtype=self.dtype)
                if data.size != info["tokens"] or hashlib.sha256(data.tobytes()).hexdigest() != info["sha256"]:
                    raise ValueError(f"{self.dir / name} is truncated or corrupt; prepare the dataset again")

    def check_tokenizer(self, identity: dict[str, Any]) -> None:
        check_identity(self.meta["tokenizer"], identity, f"dataset {self.dir}")

    def tokens(self, split: str) -> np.ndarray:
        name = f"{split}.bin"
        if name not in self.meta["files"]:
            raise ValueError(f"{self.dir} has no split {split!r}; it has {sorted(self.meta['files'])}")
        return np.memmap(self.dir / name, dtype=self.dtype, mode="r")

    def batch(
        self, split: str, step: int, batch: int, seq: int, seed: int, rank: int = 0, world: int = 1
    ) -> torch.Tensor:
        """Rank `rank`'s share `[batch // world, seq + 1]` of the global batch of step `step` (int64)."""
        if batch % world:
            raise ValueError(f"the global batch {batch} is not divisible by the {world} processes")
        data = self.tokens(split)
        if data.size <= seq + 1:
            raise ValueError(f"split {split!r} has {data.size} tokens, fewer than one window of {seq + 1}")
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, data.size - seq - 1, (batch,), generator=gen)
        mine = starts.view(world, batch // world)[rank]
        return torch.from_numpy(np.stack([data[s : s + seq + 1].astype(np.int64) for s in mine.tolist()]))

    def windows(self, split: str, count: int, seq: int) -> torch.Tensor:
        """`count` fixed, evenly spaced windows `[count, seq + 1]` (for evaluation)."""
        data = self.tokens(split)
        count = max(1, min(count, (data.size - 1) // (seq + 1)))
        starts = np.linspace(0, data.size - seq - 1, count).astype(np.int64)
        return torch.from_numpy(np.stack([data[s : s + seq + 1].astype(np.int64) for s in starts]))
