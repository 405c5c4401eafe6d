"""Deep memory learned in context: per-token reference (`memory_naive`), chunk-parallel form (`memory_chunk`),
the GPU path (`memory_fused`: the linear memory's affine scan, `memory_affine`, with its Triton kernel;
`memory_auto` picks it where it applies) and the memory-lean training path (`memory_lean`), all with the same
signature. See README.md here for the derivation."""

from .affine import memory_affine
from .chunk import memory_chunk
from .common import MemorySpec, MemoryState, init_state
from .fused import memory_auto, memory_fused
from .lean import memory_lean
from .naive import memory_naive

__all__ = [
    "MemorySpec",
    "MemoryState",
    "init_state",
    "memory_affine",
    "memory_auto",
    "memory_chunk",
    "memory_fused",
    "memory_lean",
    "memory_naive",
]
