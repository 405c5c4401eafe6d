"""Training stays finite: every variant trained with AdamW (gradient clip 1) at lr 1e-4, 1e-3 and 1e-2,
in float32 and under bf16 autocast, keeps every loss and gradient norm finite and non-zero; and the tiny-HOPE
divergence (the un-normalised CMS chain overflowing float32) is reproduced without the level norm and prevented by
the level norm (docs/decisions.md, "Stability and denormals")."""

from __future__ import annotations

import math

import pytest
import torch

from nestlearn.layers.cms import CMS
from nestlearn.models import CausalLM, preset
from nestlearn.models.config import VARIANTS
from tests.models.test_lm import applicable

# the smallest model of each variant that still has two blocks, two chunks of every memory, two online CMS segments,
# two MAC segments and a sliding window shorter than the sequence
TINY = dict(
    vocab_size=4, d_model=32, n_layers=2, n_heads=2, mlp_hidden=64, mem_chunk=16, proj_chunk=16, window=16,
    segment=16, n_persistent=4, cms_levels=(None, 16), max_seq_len=64,
)  # fmt: skip
LRS = (1e-4, 1e-3, 1e-2)


def running_xor(batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Bits interleaved with their running xor, `b_1 x_1 b_2 x_2 ...` (`x_t = b_1 ^ ... ^ b_t`): half the
    targets are random, half are a function of the whole prefix. -> `[batch, length]` ids in {0, 1}."""
    b = torch.randint(0, 2, (batch, length // 2), generator=gen)
    return torch.stack([b, b.cumsum(1) % 2], dim=-1).reshape(batch, -1)


def train(model: CausalLM, lr: float, steps: int, *, bf16: bool = False, batch: int = 4, length: int = 32):
    """AdamW steps with the gradient clipped to norm 1 on fresh batches. -> losses and pre-clip gradient norms
    `[steps]` (the run stops at the first step with a non-finite or zero gradient norm)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    losses, norms = [], []
    for _ in range(steps):
        ids = running_xor(batch, length, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = model.loss(ids)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        losses.append(loss.item())
        norms.append(norm.item())
        if not (math.isfinite(norms[-1]) and norms[-1] > 0):
            break
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, norms


def healthy(losses: list[float], norms: list[float]) -> bool:
    """Every loss and gradient norm finite, and no step whose gradient vanished (the overflowed final norm gives
    logits 0, the loss ln(vocab) and a gradient of exactly 0)."""
    return all(math.isfinite(x) for x in losses) and all(math.isfinite(n) and n > 0 for n in norms)


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_lr_sweep_stays_finite(variant: str) -> None:
    """8 steps at each learning rate, float32 and bf16 autocast, from the same initial weights."""
    for lr in LRS:
        for bf16 in (False, True):
            torch.manual_seed(0)
            losses, norms = train(
                CausalLM(preset("debug", variant, **applicable(variant, TINY))), lr, steps=8, bf16=bf16
            )
            assert healthy(losses, norms), (variant, lr, "bf16" if bf16 else "fp32", losses, norms)


def tiny_hope(level_norm: bool) -> CausalLM:
    """The diverging tiny model shrunk: HOPE, 2 blocks of width 32 with the preset's wide CMS levels (the default levels
    (None, 2048, 512): at 32 tokens all three act as a chain of static MLPs)."""
    torch.manual_seed(0)
    shape = dict(vocab_size=4, n_layers=2, d_model=32, n_heads=2, mem_chunk=16, proj_chunk=16)
    model = CausalLM(preset("debug", "hope", cms_level_norm=level_norm, **shape))
    assert all(isinstance(b.mlp, CMS) and b.mlp.level_norm == level_norm for b in model.blocks)
    return model


def test_level_norm_keeps_tiny_hope_trainable() -> None:
    """The divergence in 12 steps: AdamW at lr 0.1 (the lr 3e-3 GPU run's growth, compressed) grows the CMS levels'
    weights; in the un-normalised chain each level squares the scale of the previous one, the residual stream
    passes 1e19 and the final RMSNorm's mean square overflows float32 (logits 0, gradient 0, then NaN). With the
    norm on every later level's input, the same run stays finite and keeps learning."""
    old = train(tiny_hope(level_norm=False), 0.1, steps=12)
    assert not healthy(*old), old
    new = train(tiny_hope(level_norm=True), 0.1, steps=12)
    assert healthy(*new), new
