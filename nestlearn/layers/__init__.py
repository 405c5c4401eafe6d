"""nn.Modules on `[B, T, D]` with explicit state. So far: the shared basic blocks (issue 3 builds the rest)."""

from .basic import RMSNorm, RotaryEmbedding, ShortConv, SwiGLU

__all__ = ["RMSNorm", "RotaryEmbedding", "ShortConv", "SwiGLU"]
