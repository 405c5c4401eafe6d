"""Deep memory learned in context: per-token reference (`memory_naive`), chunk-parallel form (`memory_chunk`),
the GPU path (`memory_fused`: the linear memory's affine scan, `memory_affine`, with its Triton kernel, and the
MLP memory's Triton kernels; `memory_auto` picks the scan where it applies), the memory-lean training path
(`memory_lean`) and the MLP memory's written-out backward (`memory_adjoint`), all with the same signature. See
README.md here for the derivation."""

from .adjoint import memory_adjoint
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
    "memory_adjoint",
    "memory_affine",
    "memory_auto",
    "memory_chunk",
    "memory_fused",
    "memory_lean",
    "memory_naive",
]
