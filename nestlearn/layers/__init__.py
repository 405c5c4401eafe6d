"""nn.Modules on `[B, T, D]` with explicit state. The package exports the basic blocks (RMSNorm, RotaryEmbedding,
ShortConv, SwiGLU); attention, the memories, the hybrids and the CMS live in their own modules."""

from .basic import RMSNorm, RotaryEmbedding, ShortConv, SwiGLU

__all__ = ["RMSNorm", "RotaryEmbedding", "ShortConv", "SwiGLU"]
