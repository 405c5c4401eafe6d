"""nestlearn: Nested Learning (Behrouz et al., NeurIPS 2025) in PyTorch."""

from .ops.memory import MemorySpec, MemoryState, init_state, memory_chunk, memory_naive

__version__ = "0.1.0"
__all__ = ["MemorySpec", "MemoryState", "init_state", "memory_chunk", "memory_naive"]
