"""Deep memory learned in context: per-token reference (`memory_naive`), chunk-parallel form (`memory_chunk`)
and the fused Triton kernel (`memory_fused`; `memory_auto` picks it where it applies), same signature. See
README.md here for the derivation."""

from .chunk import memory_chunk
from .common import MemorySpec, MemoryState, init_state
from .fused import memory_auto, memory_fused
from .naive import memory_naive

__all__ = ["MemorySpec", "MemoryState", "init_state", "memory_auto", "memory_chunk", "memory_fused", "memory_naive"]
