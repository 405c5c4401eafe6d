"""Deep memory learned in context: per-token reference (`memory_naive`) and chunk-parallel form
(`memory_chunk`), same signature. See README.md here for the derivation."""

from .chunk import memory_chunk
from .common import MemorySpec, MemoryState, init_state
from .naive import memory_naive

__all__ = ["MemorySpec", "MemoryState", "init_state", "memory_chunk", "memory_naive"]
